"""The paper's anomaly scores (Bergmann et al. 2020, Sec. 3.3), on tensors of any batch shape.

Symbols keep the paper's names: `mu` are the student means mu_i, `y` the standardized teacher
descriptor, `e` the regression error, `v` the predictive variance.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch


def standardize(t: torch.Tensor, desc_mean: torch.Tensor, desc_std: torch.Tensor) -> torch.Tensor:
    """y = (T(x) - mu) diag(sigma)^-1, channel axis -3: (..., 128, H, W)."""
    return (t - desc_mean[:, None, None]) / desc_std[:, None, None]


def regression_error(mu: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Eq. 6: e = || mean_i(mu_i) - y ||^2. mu: (B, M, 128, H, W), y: (B, 128, H, W) -> (B, H, W)."""
    return (mu.mean(dim=1) - y).square().sum(dim=1)


def predictive_variance(mu: torch.Tensor) -> torch.Tensor:
    """Eq. 7: v = 1/M sum_i ||mu_i||^2 - ||mean_i mu_i||^2, (B, M, 128, H, W) -> (B, H, W).

    Computed as the sum over channels of the (biased) variance across students, which is the same
    quantity without the cancellation of subtracting two large squares (matters in fp16).
    """
    return (mu - mu.mean(dim=1, keepdim=True)).square().mean(dim=1).sum(dim=1)


@dataclass(frozen=True)
class ScoreStats:
    """Per-scale normalization of e and v, measured on defect-free validation pixels."""

    e_mu: float
    e_sigma: float
    v_mu: float
    v_sigma: float


def scale_score(e: torch.Tensor, v: torch.Tensor, s: ScoreStats) -> torch.Tensor:
    """Eq. 8 for one scale: (e - e_mu) / e_sigma + (v - v_mu) / v_sigma."""
    return (e - s.e_mu) / s.e_sigma + (v - s.v_mu) / s.v_sigma


def fuse(scale_maps: torch.Tensor) -> torch.Tensor:
    """Multi-scale anomaly map: the mean over scales. (B, S, H, W) -> (B, H, W)."""
    return scale_maps.mean(dim=1)


# The image score. The paper scores pixels; an image needs one number. The maximum of the fused map
# is the simple choice, but on magnetic_tile most good images have their maximum on the border,
# where tile rims vary from part to part (benchmarks/results/image_score_cpu.json). Standardizing
# each pixel position by the good images' mean and std there removes that: the score is how far
# the image is above normal *at that position*. It needs enough good images to estimate the
# statistics (calibrate.MIN_POSITION_IMAGES); with fewer the maximum is used.
IMAGE_SCORES = ("max", "position_z_max")


def max_score(fused: torch.Tensor) -> torch.Tensor:
    """The maximum of each map: (B, H, W) -> (B,)."""
    return fused.flatten(1).amax(1)


def position_z(fused: torch.Tensor, position_mean: torch.Tensor, position_std: torch.Tensor) -> torch.Tensor:
    """The map standardized per pixel position: (map - mean there) / std there, (B, H, W) -> (B, H, W)."""
    return (fused - position_mean) / position_std


def position_z_max(fused: torch.Tensor, position_mean: torch.Tensor, position_std: torch.Tensor) -> torch.Tensor:
    """max over pixels of the position-standardized map: (B, H, W) -> (B,)."""
    return position_z(fused, position_mean, position_std).flatten(1).amax(1)


# The mask. At the mask's operating point (pixel FPR 0.001 by default) the few positions that are
# high on every good image (tile rims) set a threshold on the map itself, and defects elsewhere stay
# below it. With position statistics the mask thresholds the position-standardized map instead, and
# only on images the image score flags, so that a part judged good carries no mask. On magnetic_tile
# the masks then touched the defect on 43% of defective test images instead of 9%, with 35% of mask
# pixels on a defect instead of 7% (benchmarks/results/mask_rule_magnetic_tile_p17.json).
MASK_RULES = ("map", "position_z")


def reaches(values: torch.Tensor, threshold: float) -> torch.Tensor:
    """values >= `threshold` exactly as recorded (float64), for scores and maps alike. PyTorch compares
    a float32 tensor with a Python float in float32, rounding the threshold to the nearest float32,
    which can lie below it (a map just under the threshold made a mask on an image judged good): a
    float32 tensor is compared with the smallest float32 >= the threshold instead, which is exact."""
    if values.dtype != torch.float32:
        return values >= threshold
    t = np.float32(threshold)
    return values >= float(np.nextafter(t, np.float32(np.inf)) if float(t) < threshold else t)  # in float64


def mask(level: torch.Tensor, threshold: float, rule: str, anomalous: torch.Tensor) -> torch.Tensor:
    """Boolean masks from the maps the rule thresholds, `level` (B, H, W), and the verdicts (B,)."""
    over = reaches(level, threshold)
    if rule == "position_z":
        over &= anomalous.reshape(-1, *([1] * (over.dim() - 1)))
    return over
