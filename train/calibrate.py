"""Calibration (paper Sec. 3.3): per scale, the mean and std of the regression error e and the
predictive variance v over defect-free validation pixels, and the mask threshold.

The threshold is the (1 - target_fpr) quantile of the fused anomaly map over the validation pixels:
on defect-free images like those, about `target_fpr` of pixels end up in a mask. Descriptor
mean/std are not re-estimated here: they define the targets the students were trained on.
"""
from __future__ import annotations

import numpy as np
import torch
from tqdm import tqdm

from ustudents.engines.images import to_tensor
from ustudents.engines.model import AnomalyModel, normalize_input
from ustudents.engines.patchnet import DESCRIPTOR_DIM
from ustudents.engines.scoring import ScoreStats, fuse, scale_score

DEFAULT_TARGET_FPR = 1e-3


class CalibrationError(ValueError):
    pass


@torch.no_grad()
def errors_and_variances(model: AnomalyModel, images: np.ndarray, device: torch.device,
                         batch: int = 4, bf16: bool = False) -> tuple[np.ndarray, np.ndarray]:
    """e and v of every scale on uint8 images (N, S, S, 3): two float32 arrays (n_scales, N, S, S)."""
    model = model.to(device).eval()
    es, vs = [], []
    for i in tqdm(range(0, len(images), batch), desc="calibration", unit="batch", leave=False):
        x = normalize_input(to_tensor(images[i:i + batch]).to(device))
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16):
            ev = [ens.error_and_variance(x) for ens in model.ensembles]
        es.append(torch.stack([e for e, _ in ev]).cpu())
        vs.append(torch.stack([v for _, v in ev]).cpu())
    return torch.cat(es, dim=1).numpy(), torch.cat(vs, dim=1).numpy()


def score_stats(e: np.ndarray, v: np.ndarray) -> ScoreStats:
    """e_mu, e_sigma, v_mu, v_sigma over all given pixels of one scale (float64 accumulation)."""
    e64, v64 = e.astype(np.float64), v.astype(np.float64)
    e_sigma, v_sigma = float(e64.std()), float(v64.std())
    if not (e_sigma > 0 and v_sigma > 0):
        raise CalibrationError("the regression error or predictive variance is constant over the validation "
                               "images; calibrate on more (and more varied) good images")
    return ScoreStats(e_mu=float(e64.mean()), e_sigma=e_sigma, v_mu=float(v64.mean()), v_sigma=v_sigma)


def predicted_share(s: ScoreStats) -> float:
    """1 - e_mu / 128: the share of the standardized teacher descriptors' variance (128 per pixel, one per
    channel, on the training images) that the students' mean predicts on the validation pixels.
    1 = perfect regression; 0 = no better than predicting the training mean; negative = worse."""
    return 1.0 - s.e_mu / DESCRIPTOR_DIM


def threshold_at_fpr(fused_maps: np.ndarray, target_fpr: float) -> float:
    """The fused-map value exceeded by a fraction `target_fpr` of the validation pixels."""
    if not 0 < target_fpr < 1:
        raise CalibrationError(f"target false-positive rate {target_fpr} must be between 0 and 1")
    return float(np.quantile(fused_maps.astype(np.float64), 1.0 - target_fpr))


def calibrate(model: AnomalyModel, images: np.ndarray, device: torch.device,
              target_fpr: float = DEFAULT_TARGET_FPR, bf16: bool = False) -> tuple[dict[int, ScoreStats], dict]:
    """Set the model's score statistics from good images and choose the threshold.

    Returns the per-scale statistics and the threshold record for the manifest."""
    e, v = errors_and_variances(model, images, device, bf16=bf16)
    stats = {}
    maps = []
    for k, ens in enumerate(model.ensembles):
        s = score_stats(e[k], v[k])
        stats[ens.p] = s
        ens.score_stats.copy_(torch.tensor([s.e_mu, s.e_sigma, s.v_mu, s.v_sigma]))
        maps.append(scale_score(torch.from_numpy(e[k]), torch.from_numpy(v[k]), s))
    fused = fuse(torch.stack(maps, dim=1)).numpy()
    threshold = {"value": threshold_at_fpr(fused, target_fpr), "method": "pixel_fpr",
                 "target_pixel_fpr": target_fpr, "images": int(len(images)),
                 "precision": "bf16" if bf16 else "fp32"}
    # What the threshold means per image: the share of validation images it would flag.
    threshold["validation_image_fpr"] = float((fused.reshape(len(images), -1).max(1) >= threshold["value"]).mean())
    return stats, threshold
