"""Shared fixtures for the whole test suite.

`tiny_mvtec` writes a small MVTec-AD-layout dataset once per run (shared by the run's processes:
`made_once`); tests must treat it as read-only (copy it with shutil.copytree to tmp_path before
changing anything), as every session fixture's folder.
"""
from __future__ import annotations

import importlib
import logging
import os
import shutil
import sys
from pathlib import Path

if os.environ.get("PYTEST_XDIST_WORKER"):
    # The suite runs in one process per core (pytest-xdist, pyproject's addopts): each takes one thread,
    # as two processes of two threads each would make OpenMP's threads wait on each other. Set before
    # torch is imported, and inherited by the commands the tests start as subprocesses.
    os.environ["OMP_NUM_THREADS"] = "1"
importlib.import_module("ustudents")  # before cv2, as the commands and the worker: it caps OpenCV's decoding
import cv2  # noqa: E402
import numpy as np
import pytest
from filelock import FileLock

try:
    import tomllib
except ModuleNotFoundError:  # Python 3.10: pytest's own dependency
    import tomli as tomllib

TINY_CATEGORY = "tiles"
DEPLOY = Path(__file__).resolve().parents[1] / "deploy"


@pytest.fixture(autouse=True)
def worker_logging_removed():
    """A test that runs a worker in this process leaves its stderr handler on the root logger, at INFO
    (worker.logs.setup_logging): a later test's command then printed the worker's lines in its own
    output, and a test asserting that output failed, or not, by the order the tests ran in."""
    from ustudents.worker.logs import _Stderr

    root, ours = logging.getLogger(), logging.getLogger("ustudents")
    levels = root.level, ours.level
    yield
    for handler in [h for h in root.handlers if isinstance(h, _Stderr)]:
        root.removeHandler(handler)
    root.setLevel(levels[0])
    ours.setLevel(levels[1])


def deploy_script(relative: str):
    """A script of deploy/ (not an installed module), imported by its path there, e.g. "check_stack.py"."""
    path = DEPLOY / relative
    sys.path.insert(0, str(path.parent))
    try:
        return importlib.import_module(path.stem)
    finally:
        sys.path.pop(0)


def write_image(path: str | Path, array: np.ndarray) -> Path:
    """Write a uint8 gray (H, W) or RGB (H, W, 3) array; the format follows the suffix."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    img = array if array.ndim == 2 else cv2.cvtColor(array, cv2.COLOR_RGB2BGR)
    ok, buf = cv2.imencode(path.suffix, img)
    assert ok, f"cannot encode {path}"
    buf.tofile(path)
    return path


def as_12_bit(array: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """The uint16 image a 12-bit camera gives for a uint8 one: each value times 16 plus noise in
    the 4 low bits, which the conversion to 8 bits drops again."""
    return array.astype(np.uint16) * 16 + rng.integers(0, 16, array.shape, dtype=np.uint16)


def copy_as_png(root: Path, out: Path, bits: int) -> Path:
    """A copy of an MVTec-layout root with every image a PNG of `bits` 8 or 12 (masks unchanged):
    two such copies hold the same 8-bit images under the same names. Returns out."""
    from ustudents.engines.images import IMAGE_SUFFIXES, read_image

    rng = np.random.default_rng(12)
    shutil.copytree(root, out)
    for path in sorted(out.rglob("*")):
        if path.suffix.lower() in IMAGE_SUFFIXES and "ground_truth" not in path.parts:
            image = read_image(path)
            path.unlink()
            write_image(path.with_suffix(".png"), as_12_bit(image, rng) if bits == 12 else image)
    return out


def _texture(rng: np.random.Generator, h: int, w: int, color: bool) -> np.ndarray:
    """A smooth defect-free texture: low-pass-filtered noise plus a sine stripe pattern."""
    noise = cv2.GaussianBlur(rng.normal(0.0, 1.0, (h, w)).astype(np.float32), (0, 0), 3.0)
    noise /= noise.std() + 1e-6
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
    angle, period = rng.uniform(0.6, 0.9), 9.0
    stripes = np.sin(2 * np.pi * (xx * np.cos(angle) + yy * np.sin(angle)) / period)
    gray = np.clip(125 + 18 * noise + 25 * stripes, 40, 210)
    if not color:
        return gray.astype(np.uint8)
    tint = np.array([1.05, 0.95, 0.85], np.float32)  # a warm, tile-like colour
    return np.clip(gray[..., None] * tint, 0, 255).astype(np.uint8)


def made_once(tmp_path_factory, name: str, make) -> Path:
    """The folder `name`, filled by make(folder) once per test run. Under pytest-xdist the first
    process to ask makes it while holding a file lock and the others wait and share it, where each
    would make its own (the trained bundles take 13-15 s each; the xdist docs' pattern). What the
    session fixtures return is read-only, so sharing it between processes changes nothing."""
    base = tmp_path_factory.getbasetemp()
    if os.environ.get("PYTEST_XDIST_WORKER"):
        base = base.parent  # pytest-N/popen-gwK: pytest-N is this run's, the same for all its processes
    folder = base / "made-once" / name
    folder.parent.mkdir(exist_ok=True)
    with FileLock(f"{folder}.lock"):
        if not folder.exists():
            partial = folder.with_name(f"{name}.partial")  # a fixture that failed part-way is no folder
            shutil.rmtree(partial, ignore_errors=True)
            partial.mkdir()
            make(partial)
            partial.rename(folder)
    return folder


@pytest.fixture(scope="session")
def tiny_mvtec(tmp_path_factory) -> Path:
    """ROOT/tiles/{train/good (16), test/good (4), test/scratch (4), test/spot (4)} with
    ROOT/tiles/ground_truth/{scratch,spot}/NNN_mask.png. Images are 48..64 px per side
    (not square), even indices gray PNG, odd indices colour JPEG. Returns ROOT."""
    return made_once(tmp_path_factory, "mvtec", write_tiny_mvtec)


def write_tiny_mvtec(root: Path) -> None:
    cat = root / TINY_CATEGORY
    rng = np.random.default_rng(1234)

    def image(i: int) -> tuple[np.ndarray, str]:
        h, w = (int(v) for v in rng.integers(48, 65, size=2))
        color = i % 2 == 1
        return _texture(rng, h, w, color), (".jpg" if color else ".png")

    for i in range(16):
        img, suffix = image(i)
        write_image(cat / "train" / "good" / f"{i:03d}{suffix}", img)
    for i in range(4):
        img, suffix = image(i)
        write_image(cat / "test" / "good" / f"{i:03d}{suffix}", img)
    for defect in ("scratch", "spot"):
        for i in range(4):
            img, suffix = image(i)
            h, w = img.shape[:2]
            mask = np.zeros((h, w), np.uint8)
            value = 255 if defect == "scratch" else 20
            if defect == "scratch":  # a bright line
                p0 = (int(rng.integers(2, w // 3)), int(rng.integers(2, h - 2)))
                p1 = (int(rng.integers(2 * w // 3, w - 2)), int(rng.integers(2, h - 2)))
                cv2.line(img, p0, p1, (value,) * 3, 2)
                cv2.line(mask, p0, p1, 255, 2)
            else:  # a dark filled circle
                c = (int(rng.integers(12, w - 12)), int(rng.integers(12, h - 12)))
                r = int(rng.integers(4, 9))
                cv2.circle(img, c, r, (value,) * 3, -1)
                cv2.circle(mask, c, r, 255, -1)
            write_image(cat / "test" / defect / f"{i:03d}{suffix}", img)
            write_image(cat / "ground_truth" / defect / f"{i:03d}_mask.png", mask)


@pytest.fixture(scope="session")
def random_teachers(tmp_path_factory) -> Path:
    """A folder of random-init teachers for p=17 and p=33 (no distillation: fast, for CLI tests)."""
    import torch

    from ustudents.engines.patchnet import PatchNet
    from ustudents.train.teacher_files import save_teacher

    def make(folder: Path) -> None:
        for p in (17, 33):
            torch.manual_seed(p)
            save_teacher(folder, p, PatchNet(p).state_dict(), {"config": {"random_init": True}})

    return made_once(tmp_path_factory, "teachers", make)


@pytest.fixture(scope="session")
def tiny_bundle(tmp_path_factory, tiny_mvtec, random_teachers) -> Path:
    """A bundle trained by `ustudents train` on tiny_mvtec (1 epoch, 64 px, scales 17,33, M=2).
    Read-only: copy it with shutil.copytree before changing anything."""
    from click.testing import CliRunner

    from ustudents.cli import main

    def make(folder: Path) -> None:
        result = CliRunner().invoke(main, [
            "train", "--data-root", str(tiny_mvtec), TINY_CATEGORY, "--out", str(folder / "tiles-model"),
            "--scales", "17,33", "--students", "2", "--epochs", "1", "--image-size", "64",
            "--teachers", str(random_teachers), "--no-evaluate", "--amp", "off", "--seed", "0",
            # CPU economy (same code paths): one step per epoch on 8x8 windows of the dense output, and
            # 3 instead of 5 validation images (calibration runs all networks on whole images)
            "--crop", "8", "--batch", "16", "--val-fraction", "0.1"])
        assert result.exit_code == 0, result.output + repr(result.exception)

    return made_once(tmp_path_factory, "bundle", make) / "tiles-model"


@pytest.fixture(scope="session")
def small_bundle(tiny_bundle, tmp_path_factory) -> Path:
    """tiny_bundle served at 32 px (a copy with image_size 32): the same networks and statistics at
    a quarter of the CPU time, for tests of what surrounds the networks. Read-only."""
    from ustudents.engines.bundle import update_manifest

    def make(folder: Path) -> None:
        shutil.copytree(tiny_bundle, folder / "tiles-32")
        update_manifest(folder / "tiles-32", image_size=32)

    return made_once(tmp_path_factory, "small-bundle", make) / "tiles-32"


@pytest.fixture(scope="session")
def many_good_images(tmp_path_factory) -> Path:
    """A folder of 32 defect-free textures like tiny_mvtec's: enough for the position image score."""
    from ustudents.train.calibrate import MIN_POSITION_IMAGES

    def make(folder: Path) -> None:
        rng = np.random.default_rng(99)
        for i in range(MIN_POSITION_IMAGES + 2):
            write_image(folder / f"{i:03d}.png", _texture(rng, 48, 56, color=i % 2 == 1))

    return made_once(tmp_path_factory, "many-good", make)


@pytest.fixture(scope="session")
def position_bundle(small_bundle, many_good_images, tmp_path_factory) -> Path:
    """small_bundle recalibrated by `ustudents calibrate` on many_good_images: its image score is the
    position-standardized maximum. Read-only."""
    from click.testing import CliRunner

    from ustudents.cli import main

    def make(folder: Path) -> None:
        path = Path(shutil.copytree(small_bundle, folder / "tiles-32"))
        result = CliRunner().invoke(main, ["calibrate", str(path), "--images", str(many_good_images),
                                           "--image-fpr", "0.1", "--device", "cpu"])
        assert result.exit_code == 0, result.output + repr(result.exception)

    return made_once(tmp_path_factory, "position-bundle", make) / "tiles-32"


def pyproject() -> dict:
    """The repository's pyproject.toml, parsed."""
    return tomllib.loads((Path(__file__).resolve().parents[1] / "pyproject.toml").read_text())
