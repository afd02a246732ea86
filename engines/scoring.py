"""The paper's anomaly scores (Bergmann et al. 2020, Sec. 3.3), on tensors of any batch shape.

Symbols keep the paper's names: `mu` are the student means mu_i, `y` the standardized teacher
descriptor, `e` the regression error, `v` the predictive variance.
"""
from __future__ import annotations

from dataclasses import dataclass

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
