"""The model bundle: a directory with `manifest.json` and `weights.safetensors` (after a recalibration in
place, `weights.<sha256[:12]>.safetensors`). No pickle.

Weights are stored per scale as `<p>.teacher.<param>` (one network) and `<p>.students.<param>`
(the M students fused along the output-channel axis, see patchnet.merge), and, for the
`position_z_max` image score, `image_score.position_mean` / `image_score.position_std` (S x S). All
other statistics, the thresholds, training settings, data fingerprint and evaluation results live in
the manifest.

Format versions: 2 added the image score (manifest `image_score`); 3 added the mask rule (manifest
`threshold.method`: `position_z_pixel_fpr` thresholds the position-standardized map, scoring.mask).
Older bundles are read as what they were: version 1 scores the map's maximum against the mask
threshold, and versions 1 and 2 threshold the map itself.

Writes are atomic: a bundle is assembled in a hidden sibling directory and renamed into place, and a
manifest update goes through a temporary file and os.replace, so a crash or Ctrl-C never leaves a
half-written bundle.
"""
from __future__ import annotations

import contextlib
import errno
import hashlib
import json
import logging
import math
import os
import re
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from .files import real_path, write_atomically
from .frame_shapes import FrameShapes
from .images import UINT16_BITS, missing_folder_hint
from .memory import out_of_memory_line
from .model import AnomalyModel
from .patchnet import ALIGNMENTS, DESCRIPTOR_DIM, SCALES, PatchNet
from .scoring import IMAGE_SCORES, MASK_RULES

POSITION_TENSORS = ("image_score.position_mean", "image_score.position_std")

FORMAT = "ustudents-bundle"
FORMAT_VERSION = 4
READABLE_VERSIONS = (1, 2, 3, 4)
# manifest threshold.method -> scoring.MASK_RULES
MASK_RULE_OF = {"pixel_fpr": "map", "position_z_pixel_fpr": "position_z"}
MANIFEST = "manifest.json"
WEIGHTS = "weights.safetensors"
ENGINE_DIR = "engines"  # built engines and TensorRT's timing cache, inside the bundle
ENGINE_PRECISIONS = ("fp32", "fp16", "int8")  # what `ustudents build-engines` makes, for either backend
ENGINE_KINDS = {(backend, p) for backend in ("onnx", "tensorrt") for p in ENGINE_PRECISIONS}
# what the longest work name beside a bundle adds to its name: "." + ".XXXXXXXX.partial" (write_bundle's
# mkdtemp); the checkpoint folder's ".checkpoint" and the swap's aside folder ".XXXXXXXX.old" are shorter
WORK_NAME_EXTRA = 18


class BundleError(ValueError):
    """A bundle that cannot be used; the message names the file and what to do."""


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def expected_shapes(scales: list[int], students: int, image_size: int, image_score: str) -> dict[str, list[int]]:
    """Every tensor name a bundle of this shape must hold, with its shape."""
    shapes = {}
    for p in scales:
        for role, n in (("teacher", 1), ("students", students)):
            for name, t in PatchNet(p, n).state_dict().items():
                shapes[f"{p}.{role}.{name}"] = list(t.shape)
    if image_score == "position_z_max":
        shapes.update({k: [image_size, image_size] for k in POSITION_TENSORS})
    return shapes


def image_score_record(manifest: dict[str, Any]) -> dict[str, Any]:
    """The manifest's image score; a version 1 bundle's is the maximum against the mask threshold."""
    return manifest.get("image_score") or {"method": "max", "threshold": manifest["threshold"]["value"]}


@dataclass
class Bundle:
    path: Path
    manifest: dict[str, Any]
    tensors: dict[str, torch.Tensor]

    @property
    def scales(self) -> list[int]:
        return list(self.manifest["scales"])

    @property
    def students(self) -> int:
        return int(self.manifest["students"])

    @property
    def image_size(self) -> int:
        return int(self.manifest["image_size"])

    @property
    def uint16_bits(self) -> int:
        """The bits 16-bit frames hold for this model, as in its training images (engines.images)."""
        return int(_uint16_bits(self.manifest))

    @property
    def alignment(self) -> str:
        """Where the dense networks put a pixel's descriptor (patchnet.ALIGNMENTS): the manifest's
        input.alignment; "patch" for bundles from before it (format version 4)."""
        return _alignment(self.manifest)

    @property
    def frame_shapes(self) -> FrameShapes | None:
        """The frame shapes the model knows (engines.frame_shapes); None for a bundle from before the record."""
        record = self.manifest.get("frame_shapes")
        return None if record is None else FrameShapes.from_json(record)

    @property
    def mask_threshold(self) -> float:
        """Pixels whose level (the map, or its position-standardized form: mask_rule) is at or above
        it form the mask."""
        return float(self.manifest["threshold"]["value"])

    @property
    def mask_rule(self) -> str:
        """What the mask thresholds: one of scoring.MASK_RULES."""
        return MASK_RULE_OF[self.manifest["threshold"].get("method", "pixel_fpr")]

    def mask_threshold_on_map(self) -> float | torch.Tensor:
        """The mask threshold in the map's own units: a number under the map rule, per position
        (S, S) under the position_z rule (mean + threshold x std there)."""
        if self.mask_rule == "map":
            return self.mask_threshold
        mean, std = self.position_statistics()
        return mean + self.mask_threshold * std

    @property
    def image_score(self) -> str:
        """How an image's score is computed from its map: one of scoring.IMAGE_SCORES."""
        return image_score_record(self.manifest)["method"]

    @property
    def image_threshold(self) -> float:
        """An image whose score is at or above it is anomalous."""
        return float(image_score_record(self.manifest)["threshold"])

    def position_statistics(self) -> tuple[torch.Tensor, torch.Tensor] | None:
        """(mean, std), each (S, S), for the position_z_max image score; None for the maximum."""
        if self.image_score != "position_z_max":
            return None
        return self.tensors[POSITION_TENSORS[0]], self.tensors[POSITION_TENSORS[1]]

    def network_state(self, p: int, role: str) -> dict[str, torch.Tensor]:
        prefix = f"{p}.{role}."
        return {k[len(prefix):]: v for k, v in self.tensors.items() if k.startswith(prefix)}

    def network_tensors(self) -> dict[str, torch.Tensor]:
        """The teachers' and students' weights (what retraining, not recalibration, changes)."""
        return {k: v for k, v in self.tensors.items() if k not in POSITION_TENSORS}

    def model(self) -> AnomalyModel:
        """The fused inference module with statistics loaded, in eval mode."""
        model = AnomalyModel(self.scales, self.students, self.alignment)
        for ens in model.ensembles:
            teacher, students = self.network_state(ens.p, "teacher"), self.network_state(ens.p, "students")
            ens.net.load_state_dict({k: torch.cat([teacher[k], students[k]]) for k in teacher})
            st = self.manifest["statistics"][str(ens.p)]
            ens.desc_mean.copy_(torch.tensor(st["desc_mean"]))
            ens.desc_std.copy_(torch.tensor(st["desc_std"]))
            ens.score_stats.copy_(torch.tensor([st["e_mu"], st["e_sigma"], st["v_mu"], st["v_sigma"]]))
        return model.eval()


def is_bundle(folder: Path) -> bool:
    """A folder whose manifest says it is a ustudents bundle (not any manifest.json: web apps have them)."""
    try:
        return json.loads((Path(folder) / MANIFEST).read_text()).get("format") == FORMAT
    except (OSError, ValueError, AttributeError):
        return False


# The names the commands give weights (rewrite_bundle: weights.<sha256[:12]>.safetensors) and engine
# files (onnx_engine.onnx_file, tensorrt_build: model-<precision>[-<gpu>].onnx/.plan and the timing
# cache): a user's weights-before-recalibration.safetensors or engines/README.txt is not one of them.
OWN_WEIGHTS = re.compile(r"weights(\.[0-9a-f]{12})?\.safetensors")
OWN_ENGINE_FILE = re.compile(r"model-[a-z0-9-]+\.(onnx|plan)|tensorrt-[a-z0-9-]+\.timing-cache")


def _passing(name: str) -> bool:
    """A name left by an interrupted write (.partial), NFS's .nfs* stand-ins for files still open, the
    writability probe, macOS's .DS_Store and ._* (AppleDouble files a Mac leaves beside each file it
    copies to a stick or share)."""
    return name == ".DS_Store" or name.endswith(".partial") or name.startswith((".nfs", ".ustudents-probe-", "._"))


def _bundles_own(name: str) -> bool:
    """A name a bundle's own commands leave in its folder: its files, a weights file an interrupted
    recalibration left unnamed, _passing ones. Any other name, hidden ones included (.git, a user's
    .notes, a backup of the weights), is the user's."""
    return name in (MANIFEST, ENGINE_DIR) or _passing(name) or OWN_WEIGHTS.fullmatch(name) is not None


def _engines_own(name: str) -> bool:
    """The same for the bundle's engines/ folder."""
    return _passing(name) or OWN_ENGINE_FILE.fullmatch(name) is not None


def check_writable(out: Path) -> None:
    """`out` must be absent, an empty folder, or a bundle (which will be replaced): never anything
    else, which replacing would delete."""
    out = Path(out)
    if not out.exists() or (out.is_dir() and not any(out.iterdir())):
        return
    if not is_bundle(out):
        raise BundleError(f"{out}: exists and is not a model bundle; choose another --out (it would be replaced)")
    extra = sorted(f.name for f in out.iterdir() if not _bundles_own(f.name))
    if (out / ENGINE_DIR).is_dir():
        extra += sorted(f"{ENGINE_DIR}/{f.name}" for f in (out / ENGINE_DIR).iterdir() if not _engines_own(f.name))
    if extra:  # a user's notes, overlays or .git beside the bundle: replacing the folder would delete them
        shown = ", ".join(extra[:5]) + (f" and {len(extra) - 5} more" if len(extra) > 5 else "")
        raise BundleError(f"{out}: holds {shown} besides its model bundle, which replacing the bundle would delete; "
                          f"move them out of {out}, or choose another --out")


def check_replaceable(out: Path) -> None:
    """Refuse now, not after hours of training, an `out` that write_bundle cannot rename a finished
    bundle onto: a mount point (a container volume at the bundle's path), or one whose folder is not
    writable. A symlink is followed: the bundle goes where it points, and the link stays."""
    real = real_path(out)
    parent = real.parent
    while not parent.exists():
        parent = parent.parent
    try:
        name_max = os.pathconf(parent, "PC_NAME_MAX")
    except (OSError, ValueError):
        name_max = 0
    name_max = name_max if name_max > 0 else 255  # -1: no limit known (some FUSE mounts)
    longest = max(len(os.fsencode(Path(out).name)), len(os.fsencode(real.name)))
    if longest + WORK_NAME_EXTRA > name_max:  # found now, not when the finished bundle is to be written
        raise BundleError(f"--out {out}: a name of {longest} bytes; the work folders made beside it (.<name>.checkpoint, "
                          f".<name>.<random>.partial) need it to be at most {name_max - WORK_NAME_EXTRA} on this file "
                          "system; give a shorter name")
    if real.exists() and os.path.ismount(real):
        raise BundleError(f"--out {out}: a mount point (a volume?), onto which a finished bundle cannot be renamed; "
                          f"give a folder inside it, e.g. --out {Path(out) / real.name}")
    if not os.access(parent, os.W_OK):
        raise BundleError(f"--out {out}: {parent} is not writable here, so the bundle cannot be put in place; "
                          "choose another --out")


def _save_weights(path: Path, tensors: dict[str, torch.Tensor], where: Path) -> dict[str, Any]:
    """Write the tensors (float32) to `path`, flushed to disk, readable by all; returns the manifest's
    `weights` record (the file name is the caller's to set). `where`: the folder to name on failure."""
    weights = {k: v.detach().to(torch.float32).contiguous() for k, v in tensors.items()}
    try:
        save_file(weights, str(path))
    except SafetensorError as err:  # its I/O errors (e.g. a full disk) are not OSError
        raise OSError(f"{where}: writing the model's weights failed ({err}); free space there") from None
    path.chmod(0o644)
    with open(path, "rb") as f:
        os.fsync(f.fileno())
    return {"file": path.name, "sha256": sha256_file(path),
            "tensors": {k: list(v.shape) for k, v in sorted(weights.items())}}


def _sweep_killed_write(out: Path) -> None:
    """What an earlier write_bundle to `out` that was killed (SIGKILL, an OOM kill, a power cut) left
    beside it: its new bundle in the making (`.NAME.xxxxxxxx.partial`, removed), and, killed between
    the swap's two renames, the old bundle moved aside (`.NAME.xxxxxxxx.old`: put back where `out` is
    missing, else removed). One training runs to an --out at a time (its checkpoint folder's lock),
    so none of these is another run's."""
    leftover = re.compile(rf"\.{re.escape(out.name)}\.[a-z0-9_]{{8}}\.(partial|old)")  # mkdtemp's names
    for p in sorted(out.parent.iterdir()):
        kind = leftover.fullmatch(p.name)
        if kind is None or not p.is_dir() or p.is_symlink():
            continue
        if kind[1] == "old" and not os.path.lexists(out) and (p / MANIFEST).is_file():
            os.replace(p, out)
        else:
            shutil.rmtree(p, ignore_errors=True)


def write_bundle(out: Path, manifest: dict[str, Any], tensors: dict[str, torch.Tensor]) -> Path:
    """Write a complete bundle to `out` atomically, replacing an existing bundle there (through a
    symlink: at its target, so that the link, a plant's `current`, keeps pointing at the bundle)."""
    out = real_path(out) if Path(out).is_symlink() else Path(out)
    check_writable(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    _sweep_killed_write(out)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", suffix=".partial", dir=out.parent))
    try:
        tmp.chmod(0o755)  # mkdtemp makes 0700; a bundle is read by other users (e.g. a worker container)
        manifest = dict(manifest, format=FORMAT, format_version=FORMAT_VERSION,
                        weights=_save_weights(tmp / WEIGHTS, tensors, out.parent))
        _write_json(tmp / MANIFEST, manifest)
        (tmp / MANIFEST).chmod(0o644)
        _fsync_dir(tmp)
        if out.exists():
            # Swap: the old bundle is moved aside first, so `out` is at every instant either the
            # old complete bundle, absent for one rename, or the new complete bundle.
            # aside under a fresh name: in a container the pid is always the same, and a name left by
            # a killed run would stop every later one
            old = Path(tempfile.mkdtemp(prefix=f".{out.name}.", suffix=".old", dir=out.parent))
            # Held as the commands that change a bundle hold it: a calibrate still writing the old
            # bundle by its path would otherwise write into the new one, its old networks over the new
            try:
                held = locked(out, f"{out}: another command is changing this bundle (calibrate, build-engines or "
                                   "evaluate storing its results); the new bundle replaces it once that has "
                                   "finished", wait=True) if out.is_dir() else contextlib.nullcontext()
                with held:
                    try:
                        os.replace(out, old)
                    except OSError as err:  # named by the bundle, not by the hidden name it was to move to
                        raise OSError(err.errno, err.strerror, str(out)) from None
                    os.replace(tmp, out)
            except BaseException:
                # Ctrl-C lands after a rename returns: decided by what is on disk, not by how far the code got
                if not os.path.lexists(out) and any(old.iterdir()):
                    os.replace(old, out)  # the old bundle back, not missing
                raise
            finally:
                if os.path.lexists(out):
                    shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, out)
        _fsync_dir(out.parent)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out


def manifest_on_disk(path: str | Path) -> dict[str, Any] | None:
    """The manifest in the folder now, unchecked (None where there is none to read): for deciding
    what an interrupted or concurrent write left, not for loading (load_bundle)."""
    try:
        manifest = json.loads((Path(path) / MANIFEST).read_text())
    except (OSError, ValueError):
        return None
    return manifest if isinstance(manifest, dict) else None


def rewrite_bundle(path: Path, manifest: dict[str, Any], tensors: dict[str, torch.Tensor]) -> None:
    """Give an existing bundle new weights and manifest in place (recalibration). The folder stays, with
    whatever else it holds and any symlink to it; write_bundle's swap would replace it. Weights that
    changed go to a new file first, then the manifest, replaced atomically, names them, then the old
    file goes: at every instant the manifest names a complete weights file with its checksum. Built
    engines the old manifest listed and the new one does not are removed last."""
    path = Path(path)
    old = load_bundle(path).manifest
    # What a rewrite stopped after its manifest's rename (Ctrl-C in the cleanup) or killed outright left:
    # weights files no manifest names any more, full-size copies that nothing else removes. The caller
    # holds the bundle's lock, so no other rewrite is writing them now.
    for left in path.glob("weights*.safetensors"):
        if left.name != old["weights"]["file"] and left.is_file() and OWN_WEIGHTS.fullmatch(left.name):
            left.unlink(missing_ok=True)
    for left in path.glob(".weights.*.partial"):  # staging folders (files, before safetensors 0.8 wrote via .tmp*)
        shutil.rmtree(left) if left.is_dir() and not left.is_symlink() else left.unlink(missing_ok=True)
    # A folder of its own to write in: safetensors writes through a temporary file beside its target
    # (.tmpXXXXXX), which a kill left in the bundle, full size, one more per kill, never removed
    stage = path / f".weights.{os.getpid()}.partial"
    try:
        stage.mkdir()
        record = _save_weights(stage / WEIGHTS, tensors, path)
        sha = record["sha256"]
        name = old["weights"]["file"] if sha == old["weights"]["sha256"] else f"weights.{sha[:12]}.safetensors"
        if name != old["weights"]["file"]:
            os.replace(stage / WEIGHTS, path / name)
            _fsync_dir(path)
    finally:
        shutil.rmtree(stage, ignore_errors=True)
    manifest = dict(manifest, format=FORMAT, format_version=FORMAT_VERSION, weights=dict(record, file=name))
    try:
        write_atomically(path / MANIFEST, json.dumps(manifest, indent=2) + "\n", mode=0o644)
    except BaseException:
        # Ctrl-C can land after the manifest's rename: what the folder's manifest names decides
        if name != old["weights"]["file"] and (manifest_on_disk(path) or {}).get("weights") != manifest["weights"]:
            (path / name).unlink(missing_ok=True)
        raise
    _fsync_dir(path)
    kept = {e["file"] for e in manifest.get("engines") or []} | {name}
    for f in [old["weights"]["file"]] + [e["file"] for e in old.get("engines") or []]:
        if f not in kept:
            (path / f).unlink(missing_ok=True)


# folders already warned about: a command may lock one twice (training probes its lock before the test
# set is read, then takes it), and one warning says it
_UNLOCKABLE_WARNED: set[str] = set()


@contextlib.contextmanager
def locked(path: str | Path, busy: str, wait: bool = False):
    """An exclusive flock on the folder `path` itself, held for the block; `busy`: the error when another
    process holds it, or with `wait`, the warning before waiting for it to let go. No lock file to leave
    behind, and the OS lets go when the process ends, however it ends."""
    import fcntl

    fd = os.open(path, os.O_RDONLY)
    try:
        try:
            told = False
            while True:
                try:
                    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                except BlockingIOError:
                    if not wait:
                        raise BundleError(busy) from None
                    if not told:
                        logging.getLogger(__name__).warning("%s", busy)
                        told = True
                    fcntl.flock(fd, fcntl.LOCK_EX)
                # A new bundle swapped in (write_bundle) between the open and the lock: the lock is on
                # the old folder, moved aside, and guards nothing. Lock the folder now at `path`.
                now = os.stat(path)
                held = os.fstat(fd)
                if (now.st_dev, now.st_ino) == (held.st_dev, held.st_ino):
                    break
                os.close(fd)
                fd = os.open(path, os.O_RDONLY)
        except OSError as err:
            if err.errno not in (errno.EBADF, errno.ENOLCK, errno.EOPNOTSUPP, errno.EINVAL):
                raise
            # NFS may emulate flock with POSIX locks, which refuse a read-only descriptor: the command
            # goes on unguarded, as it did before there was a lock, rather than not at all
            if str(path) not in _UNLOCKABLE_WARNED:
                _UNLOCKABLE_WARNED.add(str(path))
                logging.getLogger(__name__).warning("%s: cannot lock this folder on this file system (%s); make sure "
                                                    "no other command writes it meanwhile", path, err.strerror)
        yield
    finally:
        os.close(fd)


def changing(path: str | Path):
    """Hold a bundle for a command that changes it (build-engines, calibrate). Two at once each
    wrote the manifest they had read, and one's change was lost while both reported success."""
    return locked(path, f"{path}: another command is changing this bundle now (build-engines, calibrate or evaluate "
                        "storing its results); run this one when it has finished")


def update_manifest(path: Path, **fields: Any) -> dict[str, Any]:
    """Replace top-level manifest fields of an existing (verified) bundle atomically."""
    bundle = load_bundle(path)
    manifest = dict(bundle.manifest, **fields)
    write_atomically(Path(path) / MANIFEST, json.dumps(manifest, indent=2) + "\n", mode=0o644)
    return manifest


def _uint16_bits(manifest: dict[str, Any]) -> Any:
    """The manifest's input.uint16_bits; UINT16_BITS for bundles from before it (load_bundle checks it)."""
    return manifest.get("input", {}).get("uint16_bits", UINT16_BITS)


def _alignment(manifest: dict[str, Any]) -> Any:
    """The manifest's input.alignment; "patch" for bundles from before it (load_bundle checks it)."""
    return manifest.get("input", {}).get("alignment", "patch")


MIN_SERVED_SIZE = 32  # the smallest image size a bundle is served at (the tests serve at 32 px)
MAX_SERVED_SIZE = 1024  # the largest ustudents-train makes (pipeline.MAX_IMAGE_SIZE); a larger one is an edit
MAX_STUDENTS = 16  # the most ustudents-train makes; more is an edit, and each is a network held in memory


def bad_value(manifest: dict[str, Any], scales: list[int]) -> str | None:
    """What among a manifest's values the model cannot run with, or None. Keys are checked before;
    this catches a hand edit such as a null or zero sigma, a short statistics vector or a text size."""
    def number(x, positive: bool = False) -> bool:
        return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x) and (x > 0 or not positive)

    size, students = manifest["image_size"], manifest["students"]
    if not (isinstance(size, int) and not isinstance(size, bool) and MIN_SERVED_SIZE <= size <= MAX_SERVED_SIZE):
        return f"image_size {size!r} is not a whole number of pixels from {MIN_SERVED_SIZE} to {MAX_SERVED_SIZE}"
    if not (isinstance(students, int) and not isinstance(students, bool) and 2 <= students <= MAX_STUDENTS):
        return f"students {students!r} is not a whole number from 2 to {MAX_STUDENTS}"
    if not isinstance(manifest.get("input", {}), dict):
        return f"input {manifest['input']!r} is not an object"
    if _alignment(manifest) not in ALIGNMENTS:
        return f"input.alignment {_alignment(manifest)!r} is not one of {', '.join(ALIGNMENTS)}"
    if manifest.get("frame_shapes") is not None:
        try:
            FrameShapes.from_json(manifest["frame_shapes"])
        except ValueError as err:
            return str(err)
    for p in scales:
        st = manifest["statistics"][str(p)]
        for key in ("desc_mean", "desc_std"):
            v, positive = st[key], key == "desc_std"
            if not (isinstance(v, list) and len(v) == DESCRIPTOR_DIM and all(number(x, positive) for x in v)):
                return f"statistics.{p}.{key} is not {DESCRIPTOR_DIM} finite numbers{' above 0' if positive else ''}"
        for key in ("e_mu", "e_sigma", "v_mu", "v_sigma"):
            positive = key.endswith("sigma")
            if not number(st[key], positive):
                return f"statistics.{p}.{key} {st[key]!r} is not a finite number{' above 0' if positive else ''}"
    for name, v in (("threshold.value", manifest["threshold"]["value"]),
                    ("the image score's threshold", image_score_record(manifest)["threshold"])):
        if not number(v):
            return f"{name} {v!r} is not a finite number"
    return None


def load_bundle(path: str | Path) -> Bundle:
    """Load and verify a bundle: format version, checksum, tensor names and shapes. A bundle rewritten
    while it loads (`ustudents calibrate` removes the weights file the old manifest named; retraining
    swaps the folder) is read again: a worker starting at that instant must not call it damaged."""
    before = manifest_on_disk(path)
    try:
        return _load_bundle(path)
    except BundleError:
        if before is None or manifest_on_disk(path) in (before, None):
            raise
    return _load_bundle(path)


def _load_bundle(path: str | Path) -> Bundle:
    path = Path(path)
    mpath = path / MANIFEST
    if not path.is_dir():
        if path.name == MANIFEST and path.is_file():
            raise BundleError(f"{path}: the bundle's manifest file; pass its folder, {path.parent}")
        what = "a file, not a folder" if path.exists() else f"not found{missing_folder_hint(path)}"
        raise BundleError(f"{path}: {what}; pass a model bundle, the folder `ustudents-train --out` wrote (the one "
                          f"holding {MANIFEST})")
    if not mpath.is_file():
        if mpath.is_dir() or (path / ENGINE_DIR).is_dir() or any(path.glob("weights*.safetensors")):
            what = "a folder, not the bundle's manifest file" if mpath.is_dir() else "missing"
            raise BundleError(f"{mpath}: {what}; {path} holds a model bundle's files but no manifest (restore it from "
                              "a copy, or retrain with `ustudents-train`)")
        dataset = [d for d in ("train", "test", "ground_truth") if (path / d).is_dir()]
        looks = f" (it looks like a dataset's category: {', '.join(dataset)}/)" if dataset else ""
        raise BundleError(f"{path}: no {MANIFEST} here, so not a model bundle{looks}; pass the folder "
                          "`ustudents-train --out` wrote")
    try:
        manifest = json.loads(mpath.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise BundleError(f"{mpath}: damaged ({err}); restore the bundle from a copy or retrain") from None
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
        raise BundleError(f"{mpath}: not a ustudents bundle manifest; retrain with `ustudents-train`")
    version = manifest.get("format_version")
    if type(version) is not int or version not in READABLE_VERSIONS:  # JSON true == 1 in Python
        raise BundleError(
            f"{mpath}: bundle format version {version!r}, but this ustudents reads versions "
            f"{', '.join(map(str, READABLE_VERSIONS))}; retrain the model with this version or use the ustudents "
            "release that wrote it")
    try:
        wmeta = manifest["weights"]
        wpath = path / wmeta["file"]
        if not isinstance(manifest["scales"], list) or not all(type(p) is int for p in manifest["scales"]):
            raise ValueError("'scales' is not a list of receptive fields")
        scales, students = manifest["scales"], int(manifest["students"])
        if not scales or any(p not in SCALES for p in scales) or len(set(scales)) < len(scales):
            raise ValueError(f"'scales' {scales} is not a set of receptive fields among {list(SCALES)}")
        stats = manifest["statistics"]
        for p in scales:
            for key in ("desc_mean", "desc_std", "e_mu", "e_sigma", "v_mu", "v_sigma"):
                stats[str(p)][key]
        manifest["threshold"]["value"]
        if not isinstance(manifest["threshold"].get("method", ""), str):
            raise ValueError("'threshold.method' is not a name")
        for key in ("category", "id"):
            if not isinstance(manifest[key], str) or not manifest[key]:
                raise ValueError(f"{key!r} is not a name")
        if not isinstance(wmeta["file"], str) or not isinstance(wmeta["sha256"], str):
            raise ValueError("'weights' does not name a file and its checksum")
        image_size = int(manifest["image_size"])
        score = image_score_record(manifest)
        float(score["threshold"]), score["method"]
        engines = manifest.get("engines", [])
        if not isinstance(engines, list):
            raise ValueError("'engines' is not a list")
        for e in engines:
            if not all(isinstance(e.get(k), str) for k in ("backend", "precision", "file", "sha256")):
                raise ValueError("an 'engines' entry lacks its backend, precision, file or checksum")
            if (e["backend"], e["precision"]) not in ENGINE_KINDS:  # a newer release's, or a typo ("FP32")
                raise BundleError(
                    f"{mpath}: its engines list a {e['backend']} {e['precision']} engine ({e['file']}), which this "
                    f"version of ustudents does not know (it builds {' and '.join(sorted({b for b, _ in ENGINE_KINDS}))} "
                    f"engines in {', '.join(ENGINE_PRECISIONS)}); a bundle from a newer ustudents needs that version, "
                    "and an entry edited by hand must be put back or removed from 'engines'")
        # calibrate and retraining delete the files the manifest named: the weights must be a file of the
        # bundle's own folder, not its manifest, and engines files inside engines/
        if Path(wmeta["file"]).name != wmeta["file"] or wmeta["file"] in (MANIFEST, ENGINE_DIR, "", ".", ".."):
            raise ValueError(f"the weights {wmeta['file']!r} is not a file inside the bundle (beside its manifest)")
        for e in engines:
            parts = Path(e["file"]).parts
            if len(parts) != 2 or parts[0] != ENGINE_DIR or parts[1] in (".", ".."):
                raise ValueError(f"the engine file {e['file']!r} is not inside {ENGINE_DIR}/")
    except BundleError:
        raise  # said in full where it was found
    except KeyError as err:
        raise BundleError(f"{mpath}: incomplete manifest (missing {err}); the manifest was edited or damaged: "
                          "restore the bundle from a copy, or retrain") from None
    except (TypeError, ValueError, AttributeError, OverflowError) as err:  # OverflowError: int(1e999)
        raise BundleError(f"{mpath}: malformed manifest ({err}); the manifest was edited or damaged: restore the "
                          "bundle from a copy, or retrain") from None
    bad = bad_value(manifest, scales)
    if bad:
        raise BundleError(f"{mpath}: {bad}; the manifest was edited or damaged: restore the bundle from a copy, "
                          "or retrain")
    rule = MASK_RULE_OF.get(manifest["threshold"].get("method", "pixel_fpr"))
    if rule not in MASK_RULES or (rule == "position_z" and score["method"] != "position_z_max"):
        raise BundleError(f"{mpath}: mask threshold method {manifest['threshold'].get('method')!r} is not one this "
                          f"ustudents applies with the {score['method']} image score; use the ustudents release "
                          "that wrote the bundle")
    if score["method"] not in IMAGE_SCORES:
        raise BundleError(f"{mpath}: image score {score['method']!r} is not one this ustudents computes "
                          f"({', '.join(IMAGE_SCORES)}); use the ustudents release that wrote the bundle")
    bits = _uint16_bits(manifest)
    if not (isinstance(bits, int) and 8 <= bits <= 16):
        raise BundleError(f"{mpath}: input.uint16_bits {bits!r} is not a bit count from 8 to 16; restore the bundle "
                          "or retrain")
    missing = BundleError(f"{wpath}: weights file missing; restore the bundle from a copy or retrain")
    if not wpath.is_file():
        raise missing
    try:
        digest = sha256_file(wpath)
    except FileNotFoundError:  # removed since: a calibrate meanwhile (load_bundle reads again)
        raise missing from None
    if digest != wmeta["sha256"]:
        raise BundleError(f"{wpath}: checksum mismatch, the weights are damaged; restore the bundle or retrain")
    try:
        tensors = load_file(str(wpath))
    except Exception as err:  # safetensors raises its own error types for malformed files
        if out_of_memory_line(err):  # the machine, not the file: "restore the bundle" would not help
            raise
        raise BundleError(f"{wpath}: unreadable safetensors file ({err}); restore the bundle or retrain") from None
    want = expected_shapes(scales, students, image_size, score["method"])
    got = {k: list(v.shape) for k, v in tensors.items()}
    if got != want:
        bad = sorted(set(want) ^ set(got)) or sorted(k for k in want if want[k] != got[k])
        raise BundleError(f"{wpath}: tensors do not match scales {scales} with {students} students and "
                          f"the {score['method']} image score (first mismatch: {bad[0]}); the bundle is damaged or "
                          "from another build")
    return Bundle(path=path, manifest=manifest, tensors=tensors)


def _write_json(path: Path, obj: Any) -> None:
    with open(path, "w") as f:
        json.dump(obj, f, indent=2)
        f.write("\n")
        f.flush()
        os.fsync(f.fileno())


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
