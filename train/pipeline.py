"""`ustudents-train CATEGORY`: images -> students per scale -> calibration -> model bundle."""
from __future__ import annotations

import contextlib
import math
import platform
import time
from dataclasses import asdict, dataclass, field
from datetime import datetime, timezone
from pathlib import Path

import torch

import ustudents
from ustudents.engines.bundle import (MAX_SERVED_SIZE, MAX_STUDENTS, BundleError, check_writable, locked,
                                      manifest_on_disk, write_bundle)
from ustudents.engines.files import os_error_line, real_path
from ustudents.engines.frame_shapes import FrameShapes
from ustudents.engines.images import UINT16_BITS
from ustudents.engines.model import INPUT_MEAN, INPUT_STD, AnomalyModel
from ustudents.engines.patchnet import ALIGNMENT, DESCRIPTOR_DIM, SCALES
from ustudents.engines.runtime import resolve_device

from . import checkpoints, dataset
from .calibrate import (DEFAULT_IMAGE_FPR, DEFAULT_TARGET_FPR, MIN_POSITION_IMAGES, CalibrationError, calibrate,
                        check_rate, check_resolvable, predicted_share)
from .students import MAX_LR, MAX_SEED, StudentConfig, TrainingDiverged, train_students
from .teacher_files import DEFAULT_DIR, load_teachers

MIN_IMAGE_SIZE = 64
# Every training image's teacher descriptors are cached (N x 128 x S x S float16, per scale: 161 GB for 600 images at
# 1024 px), so larger sizes are refused rather than left to fail on memory or disk.
MAX_IMAGE_SIZE = MAX_SERVED_SIZE  # 1024: what a bundle may hold (bundle.py)


@dataclass
class TrainConfig:
    category: str
    data_root: Path
    out: Path
    scales: list[int] = field(default_factory=lambda: list(SCALES))
    image_size: int = 256
    val_fraction: float = 0.2
    target_fpr: float = DEFAULT_TARGET_FPR
    image_fpr: float = DEFAULT_IMAGE_FPR
    teachers: Path = DEFAULT_DIR
    device: str = "auto"
    student: StudentConfig = field(default_factory=StudentConfig)
    resume: bool = True  # continue from the checkpoint an interrupted run of the same inputs left


def check_config(cfg: TrainConfig) -> None:
    bad = [p for p in cfg.scales if p not in SCALES]
    if bad or not cfg.scales:
        raise ValueError(f"--scales {','.join(map(str, cfg.scales))}: each scale must be one of {SCALES}")
    if not MIN_IMAGE_SIZE <= cfg.image_size <= MAX_IMAGE_SIZE:
        raise ValueError(f"--image-size {cfg.image_size}: must be from {MIN_IMAGE_SIZE} to {MAX_IMAGE_SIZE} pixels")
    if not 2 <= cfg.student.students <= MAX_STUDENTS:
        raise ValueError(f"--students {cfg.student.students}: must be from 2 (the predictive variance needs an "
                         f"ensemble) to {MAX_STUDENTS}")
    st = cfg.student
    for option, value, low in (("--epochs", st.epochs, 1), ("--batch", st.batch, 1), ("--crop", st.crop, 0),
                               ("--seed", st.seed, 0)):
        if value < low:
            raise ValueError(f"{option} {value}: must be at least {low}")
    if not 0 <= st.weight_decay <= 1:  # NaN too; Adam adds it to the gradient, where more drowns the
        # loss's own: the run learnt nothing and was reported so, blaming --epochs and --lr
        raise ValueError(f"--weight-decay {st.weight_decay:g}: must be from 0 to 1 (paper: 1e-5)")
    if not 0 < cfg.val_fraction < 1:
        raise ValueError(f"--val-fraction {cfg.val_fraction:g}: must be between 0 and 1 (calibration needs held-out "
                         "good images)")
    if not 0 < cfg.student.lr <= MAX_LR:  # NaN too; inf diverged only after the teacher-target pass
        raise ValueError(f"--lr {cfg.student.lr:g}: a learning rate must be more than 0, and at most {MAX_LR:g}")
    if st.seed > MAX_SEED:
        raise ValueError(f"--seed {st.seed}: must be at most {MAX_SEED}")
    if not 0 <= cfg.student.max_minutes < float("inf"):  # NaN too; inf is not JSON for the manifest
        raise ValueError(f"--max-minutes {cfg.student.max_minutes:g}: must be 0 (no limit) or more, and finite")
    for option, rate in (("--target-fpr", cfg.target_fpr), ("--image-fpr", cfg.image_fpr)):
        check_rate(option, rate)


def image_score_line(record: dict) -> str:
    """One line on the image score for the logs."""
    if record["method"] == "max":
        return f"image score: the map's maximum ({record['why']}), anomalous at the mask threshold"
    return (f"image score: position-standardized maximum, threshold {record['threshold']:.3f} "
            f"(flags about {record['expected_image_fpr']:.1%} of new good images; "
            f"{record['validation_image_fpr']:.1%} of {record['images']} validation images left out in turn)")


# Below this share of the teacher's variance predicted on good images, a scale hardly detects: the
# trained models measured here predict 0.64-0.93 of it (benchmarks/README.md, magnetic_tile)
LOW_SHARE = 0.10


def low_share_warning(p: int, share: float, st: StudentConfig) -> str | None:
    """A WARNING for students that learned too little of the teacher to tell defects from good parts."""
    if share >= LOW_SHARE:
        return None
    how = ("predict the teacher no better than its mean" if share <= 0 else
           f"predict only {share:.0%} of the teacher's descriptor variance on good images")
    return (f"WARNING: p={p}: the students {how}: this scale cannot tell defects from good parts; train longer "
            f"(--epochs, now {st.epochs}) or lower --lr (now {st.lr:g})")


def image_fpr_warning(record: dict, image_fpr: float, more: str) -> str | None:
    """A warning where too few validation images flag more good images than --image-fpr asked for:
    with the position score, a rate below 1 in images + 1 (its threshold is then their highest
    score); without it, --image-fpr is unused and the mask threshold decides (up to all of them).
    `more`: how to add images."""
    if record["method"] != "max":
        if record["expected_image_fpr"] <= image_fpr:
            return None
        n = record["images"]
        return (f"WARNING: --image-fpr {image_fpr} needs at least {math.ceil(1 / image_fpr) - 1} good images to "
                f"calibrate on; from {n}, the image threshold is the highest of their scores and flags about "
                f"{record['expected_image_fpr']:.1%} (1 in {n + 1}) of good images; {more}")
    if record["validation_image_fpr"] <= image_fpr:
        return None
    return (f"WARNING: {record['validation_image_fpr']:.0%} of the {record['images']} good images calibrated on are "
            f"flagged anomalous: --image-fpr {image_fpr} is not used, as the image score that sets it needs "
            f"{MIN_POSITION_IMAGES} of them; {more}")


def mask_line(threshold: dict) -> str:
    """One line on the mask threshold for the logs."""
    if threshold["method"] == "pixel_fpr":
        return f"mask threshold {threshold['value']:.3f} on the map (pixel FPR {threshold['target_pixel_fpr']})"
    return (f"mask threshold {threshold['value']:.3f} on the position-standardized map (pixel FPR "
            f"{threshold['target_pixel_fpr']}), on flagged images only")


def environment() -> dict:
    return {"ustudents": ustudents.__version__, "torch": torch.__version__, "python": platform.python_version(),
            "machine": platform.processor() or platform.machine(), "threads": torch.get_num_threads()}


class TrainingInterrupted(KeyboardInterrupt):
    """Ctrl-C or SIGTERM during training (still a KeyboardInterrupt to callers that stop on one);
    `held`: what the checkpoint folder keeps for this run; `other`: what it keeps of other settings or
    data, or, not `checked` (stopped before this run's settings were known: while its images load),
    every checkpoint it keeps; `written`: the bundle's path where the interrupt came after this run's
    bundle was in place (its last clean-up steps), else None."""

    def __init__(self, folder: Path, held: str, written: Path | None = None, other: str = "", checked: bool = True):
        super().__init__(held)
        self.folder, self.held, self.written, self.other, self.checked = folder, held, written, other, checked

    def kept(self, how: str) -> str:
        """'; <folder> holds ...': what the checkpoint folder keeps, for the interrupt's line ('' for
        nothing), with its size, to delete it if no run will continue; `how`: the command that continues."""
        if not (self.held or self.other):
            return ""
        size = checkpoints.size_on_disk(self.folder)
        if self.held:
            return (f"; {self.folder} holds {self.held} ({size}" +
                    (f", with checkpoints of other settings or data: {self.other}" if self.other else "") +
                    f"): run {how} again to continue from there, or delete that folder if you will not")
        if not self.checked:
            return (f"; {self.folder} holds checkpoints ({self.other}; {size}), not yet compared with this run's "
                    "settings: the command that saved them continues from them; delete that folder if none will run "
                    "again")
        return (f"; {self.folder} keeps checkpoints of other settings or data ({self.other}; {size}), which this "
                "command does not continue from: delete that folder unless the command that saved them will run again")


def check_not_blank(good: Path | str, samples: list, images: list, log, calibrating: bool = False) -> None:
    """Blank frames (a lens cap, a dropped exposure) in train/good, or in `ustudents calibrate`'s
    images: all blank, there is nothing to learn or calibrate on (training found it only at its
    calibration); some, and the model learns, or its thresholds take, a blank frame as good."""
    blank = [s.path.name for s, img in zip(samples, images) if img.min() == img.max()]
    if blank and len(blank) == len(samples):
        raise dataset.DatasetError(f"{good}: every image is one flat colour (blank frames?), so there is nothing to "
                                   f"{'calibrate on' if calibrating else 'learn'}; put images of good parts there")
    if blank:
        taken = "calibration takes such a frame as good: remove them and calibrate again" if calibrating else \
            "the model learns that such a frame is good: remove them and train again"
        log(f"WARNING: {good}: {len(blank)} image(s) are one flat colour (blank frames?), e.g. {', '.join(blank[:3])}; "
            f"{taken}")


def train(cfg: TrainConfig, log=print) -> Path:
    """Train every scale, calibrate, write the bundle atomically to cfg.out and return its path.
    Ctrl-C before the bundle is written raises TrainingInterrupted (see checkpoints)."""
    saves, keys = checkpoints.folder_for(cfg.out), {}  # keys: filled in as soon as they are known
    # The checkpoint folder is held (locked) from when _train opens it until it is cleaned up here, so
    # that no second run to the same --out can use or remove it in between; a run that stops before
    # holding it (refused, or a bad teacher) leaves it alone: it may be another run's.
    with contextlib.ExitStack() as lock:
        run: dict = {}  # _train sets "held" once it holds the folder, "bundle_id" before writing the bundle
        try:
            path = _train(cfg, log, saves, keys, lock, run)
            checkpoints.remove(saves)  # the bundle holds it all now
        except KeyboardInterrupt:
            # decided by what is on disk: an interrupt can land after the bundle's swap, in the steps after it
            written = (manifest_on_disk(cfg.out) or {}).get("id")
            if run.get("bundle_id") is not None and written == run["bundle_id"]:
                with contextlib.suppress(OSError):
                    checkpoints.remove(saves)
                raise TrainingInterrupted(saves, "", written=cfg.out) from None
            if run.get("held"):
                checkpoints.drop_if_empty(saves)
            held = run.get("held") and saves.is_dir()
            raise TrainingInterrupted(saves, checkpoints.describe(saves, keys) if held else "",
                                      other=checkpoints.describe(saves, keys, others=True) if held else "",
                                      checked=bool(keys)) from None
        except TrainingDiverged:
            checkpoints.remove(saves)  # continuing a run that learned nothing would fail the same way
            raise
        except BaseException:
            if run.get("held"):
                checkpoints.drop_if_empty(saves)  # an error before any checkpoint leaves nothing behind
            raise
    return path


def _train(cfg: TrainConfig, log, saves: Path, keys: dict[int, str], lock: contextlib.ExitStack, run: dict) -> Path:
    check_config(cfg)
    device = resolve_device(cfg.device)
    t0 = time.time()
    # Check everything that can be checked before hours of training.
    check_writable(cfg.out)
    train_all = dataset.train_samples(cfg.data_root, cfg.category)
    fit, val = dataset.split_train_val(train_all, cfg.val_fraction, cfg.student.seed)
    # --val-fraction 0.999 trained on one image, and its warnings said to raise it (a tiny train/good,
    # where calibration's minimum of validation images outweighs the rest, is not the fraction's doing)
    if cfg.val_fraction > 0.5 and len(fit) < len(val):
        raise dataset.DatasetError(f"--val-fraction {cfg.val_fraction:g}: leaves {len(fit)} of the {len(train_all)} "
                                   f"images in train/good to train on ({len(val)} to calibrate); keep most for "
                                   "training (the default is 0.2)")
    check_resolvable(cfg.target_fpr, len(val), cfg.image_size)  # calibration's pixels, as `calibrate` checks
    teachers, teacher_records = load_teachers(cfg.teachers, cfg.scales)  # a damaged file stops the run now
    lock.enter_context(checkpoints.opened(saves, cfg.resume, cfg.out))  # makes out's parent folders too
    run["held"] = True
    log(f"{cfg.category}: {len(fit)} training and {len(val)} validation images (of train/good), "
        f"scales {cfg.scales}, M={cfg.student.students}, {cfg.image_size}px, device {device}")
    for p in cfg.scales:
        if p > cfg.image_size:
            log(f"WARNING: p={p}: a patch wider than the {cfg.image_size} px image: this scale sees only whole "
                f"images, padded; use --image-size of at least {p} or leave p={p} out (--scales)")
    good = Path(cfg.data_root) / cfg.category / "train" / "good"
    depths = dataset.bit_depths(train_all)
    bits = depths.bits or UINT16_BITS
    if depths.used:
        which = (f"{len(depths.used)} of the {len(train_all)} training images are 16-bit (e.g. "
                 f"{min(depths.used).name}), the others 8-bit; the 16-bit ones hold" if depths.eight_bit else
                 "16-bit training images holding")
        log(f"{which} {bits} bits: every 16-bit image and frame for this model becomes 8 bits by dropping the "
            f"lowest {bits - 8} (brighter frames saturate)")
        warning = depths.mixed_warning(str(good))
        if warning:
            log(warning)
    shapes: list[tuple[int, int]] = []  # of the frames the model may judge (engines.frame_shapes)
    fit_images = dataset.load_images(fit, cfg.image_size, desc="loading training images", bits=bits, dark_hint=False,
                                     shapes=shapes)
    val_images = dataset.load_images(val, cfg.image_size, desc="loading validation images", bits=bits,
                                     dark_hint=False, shapes=shapes)
    check_not_blank(good, fit + val, [*fit_images, *val_images], log)
    dataset.refuse_copies(str(good), fit + val, [*fit_images, *val_images])

    model = AnomalyModel(cfg.scales, cfg.student.students, ALIGNMENT)
    tensors, records = {}, {}
    data_fingerprint = dataset.fingerprint(train_all)
    inputs = {}
    for p in cfg.scales:
        keys[p], inputs[p] = checkpoints.scale_key(p, teachers[p], asdict(cfg.student), cfg.image_size,
                                                   [s.path.name for s in fit], data_fingerprint, bits, device)
    end = time.monotonic() + cfg.student.max_minutes * 60
    for i, ens in enumerate(model.ensembles):
        p = ens.p
        deadline = None
        if cfg.student.max_minutes:  # the time left is shared by the scales still to train
            now = time.monotonic()
            deadline = now + max(end - now, 0.0) / (len(model.ensembles) - i)
        students, desc_mean, desc_std, record = train_students(
            p, teachers[p], fit_images, cfg.student, device, workdir=saves, deadline=deadline,
            checkpoint=checkpoints.ScaleCheckpoint(saves / f"p{p}.safetensors", keys[p], inputs[p]), log=log)
        ens.net.load_state_dict({k: torch.cat([teachers[p][k], students[k]]) for k in students})
        ens.desc_mean.copy_(desc_mean)
        ens.desc_std.copy_(desc_std)
        tensors.update({f"{p}.teacher.{k}": v for k, v in teachers[p].items()})
        tensors.update({f"{p}.students.{k}": v for k, v in students.items()})
        records[str(p)] = record
        cut = (f", {record['epochs_trained']} of {cfg.student.epochs} epochs: the rest would overrun "
               f"--max-minutes {cfg.student.max_minutes:g}" if record["stopped_by_time_limit"] else "")
        log(f"p={p}: students trained in {record['wall_s']:.0f} s{cut}, final loss per student "
            f"{record['loss_per_student_by_epoch'][-1]:.3f}")

    try:
        cal = calibrate(model, val_images, device, cfg.target_fpr, cfg.image_fpr, bf16=cfg.student.amp)
    except CalibrationError as err:
        # A far too high --lr can leave the students with one constant output and finite weights: they
        # then predict no more of the teacher than its mean (a loss of DESCRIPTOR_DIM per student), and
        # calibration finds a constant error. That is training's fault, not the validation images'.
        stuck = {p: r["loss_per_student_by_epoch"][-1] for p, r in records.items()
                 if r["loss_per_student_by_epoch"] and r["loss_per_student_by_epoch"][-1] >= DESCRIPTOR_DIM}
        if stuck:
            raise TrainingDiverged(
                "; ".join(f"p={p}: final loss per student {v:.1f}" for p, v in stuck.items()) +
                f", no better than predicting the teacher's mean ({DESCRIPTOR_DIM}): the students learned nothing; "
                f"train again with a lower --lr (now {cfg.student.lr:g}) or more --epochs. No model was written"
            ) from None
        good = Path(cfg.data_root) / cfg.category / "train" / "good"
        raise CalibrationError(f"{good}: on its {len(val_images)} validation images, {err}") from None
    stats, threshold = cal.stats, cal.threshold
    tensors.update(cal.tensors)
    for p, s in stats.items():
        # How well the students learned the normal data: the share of the teacher's standardized
        # descriptor variance (128 per pixel on the training images) that the ensemble mean predicts
        # on held-out good images. Far below 1, good images already score high and defects hide.
        share = predicted_share(s)
        records[str(p)]["validation_predicted_share"] = round(share, 4)
        log(f"p={p}: on the {len(val_images)} validation images the students predict {share:.0%} of the "
            f"teacher's descriptor variance (e_mu {s.e_mu:.1f} of {DESCRIPTOR_DIM}); low means train longer")
        warning = low_share_warning(p, share, cfg.student)
        if warning:  # written all the same (a quick smoke run may want it), but it is hardly a detector
            log(warning)
    statistics = {str(ens.p): {"desc_mean": ens.desc_mean.tolist(), "desc_std": ens.desc_std.tolist(),
                               **asdict(stats[ens.p])} for ens in model.ensembles}
    created = datetime.now(timezone.utc)
    manifest = {
        "id": f"{cfg.category}-{created.strftime('%Y%m%dT%H%M%SZ')}",
        "created": created.isoformat(timespec="seconds"),
        "category": cfg.category,
        "image_size": cfg.image_size,
        "scales": cfg.scales,
        "students": cfg.student.students,
        "input": {"channels": "RGB", "range": [0, 1], "mean": list(INPUT_MEAN), "std": list(INPUT_STD),
                  "resize": "square, bilinear with antialiasing (images.resize_tensor)", "padding": "reflect",
                  "alignment": ALIGNMENT, "uint16_bits": bits},
        "statistics": statistics,
        "threshold": threshold,
        "image_score": cal.image_score,
        "frame_shapes": FrameShapes.of(shapes).to_json(),
        "training": {"student": asdict(cfg.student), "val_fraction": cfg.val_fraction, "device": str(device),
                     "teachers": {p: teacher_records.get(str(p), {}).get("config", {})
                                  for p in map(str, cfg.scales)},
                     "per_scale": records, "wall_s": round(time.time() - t0, 1), "environment": environment()},
        "data": {"root": str(Path(cfg.data_root).absolute()), "train_images": len(fit), "validation_images": len(val),
                 "validation_files": [s.path.name for s in val],
                 "fingerprint": data_fingerprint},
        "evaluation": None,
    }
    run["bundle_id"] = manifest["id"]
    try:
        parent = real_path(cfg.out).parent  # the folder write_bundle writes in, through a link as it does
        parent.mkdir(parents=True, exist_ok=True)
        # one writer of bundles in the folder at a time, as calibrate --out holds it: each one's write
        # removes what it takes for a killed write's work folder, the other's that is being written
        with locked(parent, f"--out {cfg.out}: another command holds {parent} (a calibrate --out or a training "
                            "writing its bundle there); this model is written when it lets go", wait=True):
            path = write_bundle(cfg.out, manifest, tensors)
    except (OSError, BundleError) as err:  # a full disk; a file put into --out meanwhile: the students stay
        kept = checkpoints.describe(saves, keys)
        raise OSError(f"{os_error_line(err)}; no model was written to {cfg.out}" + (
            f"; {saves} keeps the students ({kept}): run the same command again to finish from there"
            if kept else "")) from None
    log(f"bundle written to {path} in {time.time() - t0:.0f} s: {mask_line(threshold)}; "
        f"{image_score_line(cal.image_score)}")
    warning = image_fpr_warning(cal.image_score, cfg.image_fpr, "put more good images in train/good, or raise "
                                f"--val-fraction ({cfg.val_fraction} now), and train again")
    if warning:
        log(warning)
    return path
