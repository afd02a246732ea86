"""Calibration (paper Sec. 3.3): per scale, the mean and std of the regression error e and the
predictive variance v over defect-free validation pixels, and the mask threshold.

The mask threshold is a (1 - target_fpr) quantile over the validation pixels, so that on defect-free
images like those about `target_fpr` of pixels end up in a mask. With the position score (below) it
is the quantile of the position-standardized maps, each validation image standardized by the
others (leave one out), and the mask is drawn on flagged images only (scoring.mask); the threshold
is capped at the image threshold, so that every flagged image's mask shows where its score came
from. Without it, the quantile of the fused map itself. Descriptor mean/std are not re-estimated
here: they define the targets the students were trained on.

The image score (scoring.IMAGE_SCORES): with at least MIN_POSITION_IMAGES validation images, the
fused map's per-position mean and std over them, and an image threshold that flags `image_fpr` of
new good images on average (expected_image_fpr: no fewer than 1 in images + 1). Each validation
image is scored against the statistics of the others (leave one out), as a new good image would be:
scored against statistics that include it, it would score lower and the threshold would flag more
good images than asked. With fewer images the score is the map's maximum and an image is anomalous
when its mask is not empty (threshold = mask threshold).
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from ustudents.engines.bundle import POSITION_TENSORS
from ustudents.engines.images import to_tensor
from ustudents.engines.model import AnomalyModel, normalize_input
from ustudents.engines.patchnet import DESCRIPTOR_DIM
from ustudents.engines.scoring import ScoreStats, fuse, scale_score

from .progress import progress

DEFAULT_TARGET_FPR = 1e-3
DEFAULT_IMAGE_FPR = 0.05  # share of good images flagged: 1 in 20 good parts goes to a second look
MIN_POSITION_IMAGES = 30  # per-position std from 30 images: about 13% relative error
STD_FLOOR = 0.01  # position std floor, as a share of the map's overall std (see position_statistics)
# At half or more, the threshold sits at or below the good images' median: half of every good part
# masked, or every other good part sent back. No inspection wants that; it is a typo (0.5 for 0.005).
MAX_RATE = 0.5


class CalibrationError(ValueError):
    pass


@torch.no_grad()
def errors_and_variances(model: AnomalyModel, images: np.ndarray, device: torch.device,
                         batch: int = 4, bf16: bool = False) -> tuple[np.ndarray, np.ndarray]:
    """e and v of every scale on uint8 images (N, S, S, 3): two float32 arrays (n_scales, N, S, S)."""
    model = model.to(device).eval()
    es, vs = [], []
    for i in progress(range(0, len(images), batch), desc="calibration", unit="batch", leave=False):
        x = normalize_input(to_tensor(images[i:i + batch]).to(device))
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16):
            ev = [ens.error_and_variance(x) for ens in model.ensembles]
        es.append(torch.stack([e for e, _ in ev]).cpu())
        vs.append(torch.stack([v for _, v in ev]).cpu())
    return torch.cat(es, dim=1).numpy(), torch.cat(vs, dim=1).numpy()


def score_stats(e: np.ndarray, v: np.ndarray) -> ScoreStats:
    """e_mu, e_sigma, v_mu, v_sigma over all given pixels of one scale (float64 accumulation)."""
    e64, v64 = e.astype(np.float64), v.astype(np.float64)
    if not (np.isfinite(e64).all() and np.isfinite(v64).all()):  # std would warn, then give NaN
        raise CalibrationError("the regression error or predictive variance is not finite on these images (the "
                               "students' outputs overflow); train again with a lower --lr")
    e_sigma, v_sigma = float(e64.std()), float(v64.std())
    if not (e_sigma > 0 and v_sigma > 0):
        raise CalibrationError("the regression error or predictive variance is the same at every pixel of these "
                               "images (blank or identical frames?); give more, and more varied, good images")
    return ScoreStats(e_mu=float(e64.mean()), e_sigma=e_sigma, v_mu=float(v64.mean()), v_sigma=v_sigma)


def predicted_share(s: ScoreStats) -> float:
    """1 - e_mu / 128: the share of the standardized teacher descriptors' variance (128 per pixel, one per
    channel, on the training images) that the students' mean predicts on the validation pixels.
    1 = perfect regression; 0 = no better than predicting the training mean; negative = worse."""
    return 1.0 - s.e_mu / DESCRIPTOR_DIM


def check_rate(option: str, rate: object) -> None:
    """A false-positive rate from the command line or a manifest: ValueError unless 0 < rate < MAX_RATE."""
    if not (isinstance(rate, (int, float)) and 0 < rate < 1):  # NaN too
        raise ValueError(f"{option} {rate}: a false-positive rate must be between 0 and 1")
    if rate >= MAX_RATE:
        what, default = (("good pixels masked", DEFAULT_TARGET_FPR) if option == "--target-fpr" else
                         ("good images flagged", DEFAULT_IMAGE_FPR))
        raise ValueError(f"{option} {rate:g}: {rate:.0%} of {what} is no inspection; a rate is a small share, "
                         f"below {MAX_RATE:g} (default {default:g})")


def check_resolvable(target_fpr: float, images: int, size: int) -> None:
    """The mask threshold is a quantile of the calibration pixels' values: a rate below one pixel in
    all of them cannot be met, only reported. ValueError with what to change."""
    pixels = images * size ** 2
    if target_fpr * pixels < 1:
        raise ValueError(f"--target-fpr {target_fpr:g}: {images} images of {size} x {size} pixels resolve rates down "
                         f"to {1 / pixels:.1e} only; give a larger rate or more images")


def threshold_at_fpr(fused_maps: np.ndarray, target_fpr: float) -> float:
    """The fused-map value exceeded by a fraction `target_fpr` of the validation pixels."""
    if not 0 < target_fpr < 1:
        raise CalibrationError(f"target false-positive rate {target_fpr} must be between 0 and 1")
    return float(np.quantile(fused_maps.astype(np.float64), 1.0 - target_fpr))


def position_statistics(fused: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Per-position mean and std of fused maps (N, H, W), float64. The std is floored at STD_FLOOR of
    the maps' overall std, so that a position where good images never vary cannot decide an image."""
    m = fused.astype(np.float64)
    return m.mean(0), np.maximum(m.std(0), STD_FLOOR * m.std())


def leave_one_out_z_maps(fused: np.ndarray) -> np.ndarray:
    """Each map (N, H, W) standardized per position by the statistics of the other maps, float32."""
    m = fused.astype(np.float64)
    n = len(m)
    total, squares = m.sum(0), np.square(m).sum(0)
    floor = STD_FLOOR * m.std()
    z = np.empty(m.shape, dtype=np.float32)
    for i in range(n):
        mean = (total - m[i]) / (n - 1)
        std = np.maximum(np.sqrt(np.maximum((squares - m[i] ** 2) / (n - 1) - mean ** 2, 0)), floor)
        z[i] = (m[i] - mean) / std
    return z


def expected_image_fpr(image_fpr: float, images: int) -> float:
    """The share of new good images the position score's threshold flags, on average, from `images`
    validation images: image_fpr, or 1 / (images + 1) where image_fpr is smaller than that (the
    threshold is then the highest validation score, which a new good image tops that often)."""
    return max(image_fpr, 1.0 / (images + 1))


def image_score_calibration(fused: np.ndarray, pixel_threshold: float, image_fpr: float,
                            loo_z: np.ndarray | None = None) -> tuple[dict, dict[str, torch.Tensor]]:
    """The image score's manifest record and its bundle tensors, from the validation images' fused maps
    (and their leave_one_out_z_maps, where already computed)."""
    if not 0 < image_fpr < 1:
        raise CalibrationError(f"image false-positive rate {image_fpr} must be between 0 and 1")
    n = len(fused)
    if n < MIN_POSITION_IMAGES:
        flagged = fused.reshape(n, -1).max(1) >= pixel_threshold
        # target_image_fpr unused here, kept for a later recalibration on enough images (its default)
        return {"method": "max", "threshold": pixel_threshold, "target_image_fpr": image_fpr, "images": n,
                "validation_image_fpr": float(flagged.mean()),
                "why": f"{n} validation images; the position score needs {MIN_POSITION_IMAGES}"}, {}
    mean, std = position_statistics(fused)
    loo = (leave_one_out_z_maps(fused) if loo_z is None else loo_z).reshape(n, -1).max(1).astype(np.float64)
    # Weibull plotting position: the (1 - image_fpr)(n + 1)-th smallest score, interpolated. A new good
    # image's score, exchangeable with these n, lands above it with probability image_fpr on average.
    # numpy's default quantile (position (1 - image_fpr)(n - 1) + 1) sits lower: at n = 30 it flags
    # 7.9% of new good images on average instead of 5% (the Weibull rule: tests/test_scoring.py).
    value = float(np.quantile(loo, 1.0 - image_fpr, method="weibull"))
    flagged = float((loo >= value).mean())
    if flagged >= MAX_RATE:  # a threshold every other good image reaches: it flags every part
        raise CalibrationError(f"{flagged:.0%} of the {n} good images calibrated on score the same, so no threshold "
                               "sets them apart (near-copies: frames that hardly differ?); give good images of "
                               "different parts")
    record = {"method": "position_z_max", "threshold": value, "target_image_fpr": image_fpr, "images": n,
              "validation_image_fpr": flagged,
              "expected_image_fpr": expected_image_fpr(image_fpr, n)}
    tensors = dict(zip(POSITION_TENSORS, (torch.from_numpy(mean).float(), torch.from_numpy(std).float())))
    return record, tensors


@dataclass
class Calibration:
    """What calibration sets: per-scale statistics, the mask threshold, the image score (manifest
    records) and the image score's tensors (bundle weights)."""

    stats: dict[int, ScoreStats]
    threshold: dict
    image_score: dict
    tensors: dict[str, torch.Tensor]


def calibrate(model: AnomalyModel, images: np.ndarray, device: torch.device, target_fpr: float = DEFAULT_TARGET_FPR,
              image_fpr: float = DEFAULT_IMAGE_FPR, bf16: bool = False) -> Calibration:
    """Set the model's score statistics from good images, choose the thresholds and the image score."""
    e, v = errors_and_variances(model, images, device, bf16=bf16)
    stats = {}
    maps = []
    for k, ens in enumerate(model.ensembles):
        s = score_stats(e[k], v[k])
        stats[ens.p] = s
        ens.score_stats.copy_(torch.tensor([s.e_mu, s.e_sigma, s.v_mu, s.v_sigma]))
        maps.append(scale_score(torch.from_numpy(e[k]), torch.from_numpy(v[k]), s))
    fused = fuse(torch.stack(maps, dim=1)).numpy()
    n = len(images)
    map_threshold = threshold_at_fpr(fused, target_fpr)
    common = {"target_pixel_fpr": target_fpr, "images": int(n), "precision": "bf16" if bf16 else "fp32"}
    if n < MIN_POSITION_IMAGES:
        image_score, tensors = image_score_calibration(fused, map_threshold, image_fpr)
        # What the mask threshold means per image: the share of validation images with a non-empty mask.
        threshold = {"value": map_threshold, "method": "pixel_fpr", **common,
                     "validation_image_fpr": float((fused.reshape(n, -1).max(1) >= map_threshold).mean())}
    else:
        loo_z = leave_one_out_z_maps(fused)
        image_score, tensors = image_score_calibration(fused, map_threshold, image_fpr, loo_z)
        threshold = position_mask_threshold(loo_z, target_fpr, image_score["threshold"])
        threshold.update(common, validation_image_fpr=image_score["validation_image_fpr"])
    return Calibration(stats=stats, threshold=threshold, image_score=image_score, tensors=tensors)


def position_mask_threshold(loo_z: np.ndarray, target_fpr: float, image_threshold: float) -> dict:
    """The position_z mask threshold: the (1 - target_fpr) quantile of the leave-one-out standardized
    validation maps, capped at the image threshold (so a flagged image never has an empty mask at the
    model's resolution)."""
    quantile = threshold_at_fpr(loo_z, target_fpr)
    return {"value": min(quantile, image_threshold), "method": "position_z_pixel_fpr", "quantile": quantile}
