"""Shared fixtures for the whole test suite.

`tiny_mvtec` writes a small MVTec-AD-layout dataset once per session; tests must treat it as
read-only (copy it with shutil.copytree to tmp_path before changing anything).
"""
from __future__ import annotations

import importlib
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

TINY_CATEGORY = "tiles"
DEPLOY = Path(__file__).resolve().parents[1] / "deploy"


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


@pytest.fixture(scope="session")
def tiny_mvtec(tmp_path_factory) -> Path:
    """ROOT/tiles/{train/good (16), test/good (4), test/scratch (4), test/spot (4)} with
    ROOT/tiles/ground_truth/{scratch,spot}/NNN_mask.png. Images are 48..64 px per side
    (not square), even indices gray PNG, odd indices colour JPEG. Returns ROOT."""
    root = tmp_path_factory.mktemp("mvtec")
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
    return root


@pytest.fixture(scope="session")
def random_teachers(tmp_path_factory) -> Path:
    """A folder of random-init teachers for p=17 and p=33 (no distillation: fast, for CLI tests)."""
    import torch

    from ustudents.engines.patchnet import PatchNet
    from ustudents.train.teacher_files import save_teacher

    folder = tmp_path_factory.mktemp("teachers")
    for p in (17, 33):
        torch.manual_seed(p)
        save_teacher(folder, p, PatchNet(p).state_dict(), {"config": {"random_init": True}})
    return folder


@pytest.fixture(scope="session")
def tiny_bundle(tmp_path_factory, tiny_mvtec, random_teachers) -> Path:
    """A bundle trained by `ustudents train` on tiny_mvtec (1 epoch, 64 px, scales 17,33, M=2).
    Read-only: copy it with shutil.copytree before changing anything."""
    from click.testing import CliRunner

    from ustudents.cli import main

    out = tmp_path_factory.mktemp("bundle") / "tiles-model"
    result = CliRunner().invoke(main, [
        "train", "--data-root", str(tiny_mvtec), TINY_CATEGORY, "--out", str(out), "--scales", "17,33",
        "--students", "2", "--epochs", "1", "--image-size", "64", "--teachers", str(random_teachers),
        "--no-evaluate", "--amp", "off", "--seed", "0",
        # CPU economy (same code paths): one step per epoch on 8x8 windows of the dense output, and
        # 3 instead of 5 validation images (calibration runs all networks on whole images)
        "--crop", "8", "--batch", "16", "--val-fraction", "0.1"])
    assert result.exit_code == 0, result.output + repr(result.exception)
    return out


@pytest.fixture(scope="session")
def small_bundle(tiny_bundle, tmp_path_factory) -> Path:
    """tiny_bundle served at 32 px (a copy with image_size 32): the same networks and statistics at
    a quarter of the CPU time, for tests of what surrounds the networks. Read-only."""
    from ustudents.engines.bundle import update_manifest

    path = tmp_path_factory.mktemp("small-bundle") / "tiles-32"
    shutil.copytree(tiny_bundle, path)
    update_manifest(path, image_size=32)
    return path


@pytest.fixture(scope="session")
def many_good_images(tmp_path_factory) -> Path:
    """A folder of 32 defect-free textures like tiny_mvtec's: enough for the position image score."""
    from ustudents.train.calibrate import MIN_POSITION_IMAGES

    folder = tmp_path_factory.mktemp("many-good")
    rng = np.random.default_rng(99)
    for i in range(MIN_POSITION_IMAGES + 2):
        write_image(folder / f"{i:03d}.png", _texture(rng, 48, 56, color=i % 2 == 1))
    return folder


@pytest.fixture(scope="session")
def position_bundle(small_bundle, many_good_images, tmp_path_factory) -> Path:
    """small_bundle recalibrated by `ustudents calibrate` on many_good_images: its image score is the
    position-standardized maximum. Read-only."""
    from click.testing import CliRunner

    from ustudents.cli import main

    path = tmp_path_factory.mktemp("position-bundle") / "tiles-32"
    shutil.copytree(small_bundle, path)
    result = CliRunner().invoke(main, ["calibrate", str(path), "--images", str(many_good_images),
                                       "--image-fpr", "0.1", "--device", "cpu"])
    assert result.exit_code == 0, result.output + repr(result.exception)
    return path
