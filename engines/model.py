"""The multi-scale student-teacher ensemble as one module: image in, anomaly maps out.

Per scale, the teacher and its M students run as one fused PatchNet(M+1) (group 0 is the teacher),
so they share the input and a single pass yields every descriptor. Standardization, e, v, their
normalization and the scale fusion are all tensor ops inside `forward`, so an export of this module
carries the whole scoring head.
"""
from __future__ import annotations

import functools

import torch
from torch import nn

from .patchnet import ALIGNMENT, DESCRIPTOR_DIM, PatchNet
from .scoring import ScoreStats, fuse, predictive_variance, regression_error, scale_score, standardize

# Teacher input normalization: ImageNet statistics, as for the network it was distilled from.
INPUT_MEAN = (0.485, 0.456, 0.406)
INPUT_STD = (0.229, 0.224, 0.225)


def normalize_input(x: torch.Tensor) -> torch.Tensor:
    """(B, 3, H, W) in [0, 1] -> network input."""
    mean, std = input_statistics(x.device, x.dtype)
    return (x - mean) / std


@functools.lru_cache(maxsize=None)
def input_statistics(device: torch.device, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """INPUT_MEAN and INPUT_STD as (3, 1, 1) tensors, made once per device and dtype: a copy from the
    host while a CUDA graph is being captured would break the capture (cuda_graphs.py)."""
    return (torch.tensor(INPUT_MEAN, dtype=dtype, device=device)[:, None, None],
            torch.tensor(INPUT_STD, dtype=dtype, device=device)[:, None, None])


class ScaleEnsemble(nn.Module):
    """Teacher + M students of one receptive field p, with their calibration statistics."""

    def __init__(self, p: int, students: int, alignment: str = ALIGNMENT):
        super().__init__()
        self.p, self.students = p, students
        self.net = PatchNet(p, n=students + 1, alignment=alignment)
        self.register_buffer("desc_mean", torch.zeros(DESCRIPTOR_DIM))
        self.register_buffer("desc_std", torch.ones(DESCRIPTOR_DIM))
        self.register_buffer("score_stats", torch.tensor([0.0, 1.0, 0.0, 1.0]))  # e_mu, e_sigma, v_mu, v_sigma

    def error_and_variance(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Normalized input (B, 3, H, W) -> e, v, each (B, H, W)."""
        # float32 from here on: under bfloat16 autocast only the networks run in reduced precision,
        # the sums of squares over 128 channels do not.
        # The input takes the networks' dtype, so a half-precision copy of the networks (the fp16
        # engine export) runs in fp16 while the scoring head stays float32.
        out = self.net.dense_image(x.to(self.net.convs[0].weight.dtype)).float()  # (B, M+1, 128, H, W)
        y = standardize(out[:, 0], self.desc_mean, self.desc_std)
        mu = out[:, 1:]
        return regression_error(mu, y), predictive_variance(mu)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        e, v = self.error_and_variance(x)
        return scale_score(e, v, ScoreStats(*self.score_stats.unbind()))


class AnomalyModel(nn.Module):
    """All scales of a bundle. forward: images in [0, 1] (B, 3, S, S) -> fused map (B, S, S) and the
    per-scale maps (B, n_scales, S, S)."""

    def __init__(self, scales: list[int], students: int, alignment: str = ALIGNMENT):
        super().__init__()
        self.scales = list(scales)
        self.ensembles = nn.ModuleList(ScaleEnsemble(p, students, alignment) for p in self.scales)

    def use_fft(self, enable: bool = True, measure: bool = True) -> "AnomalyModel":
        """FFT convolutions in every scale's dense networks where they are faster (PatchNet.use_fft);
        CPU, float32."""
        for ens in self.ensembles:
            ens.net.use_fft(enable, measure)
        return self

    def forward(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        x = normalize_input(images)
        maps = torch.stack([ens(x) for ens in self.ensembles], dim=1)
        return fuse(maps), maps
