"""Running a loaded AnomalyModel on frames: resize, batch, forward, and maps back at frame size."""
from __future__ import annotations

from dataclasses import dataclass

import cv2
import numpy as np
import torch
from tqdm import tqdm

from .images import resize, to_tensor
from .model import AnomalyModel


@torch.no_grad()
def anomaly_maps(model: AnomalyModel, images: np.ndarray, device: torch.device, batch: int = 4,
                 desc: str | None = None, bf16: bool = False) -> tuple[np.ndarray, np.ndarray]:
    """uint8 images (N, S, S, 3) at the model's size -> fused maps (N, S, S) and per-scale maps
    (N, n_scales, S, S), float32. `bf16` runs the networks under bfloat16 autocast."""
    model = model.to(device).eval()
    fused, scales = [], []
    for i in tqdm(range(0, len(images), batch), desc=desc, unit="batch", leave=False, disable=desc is None):
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16):
            f, s = model(to_tensor(images[i:i + batch]).to(device))
        fused.append(f.float().cpu())
        scales.append(s.float().cpu())
    return torch.cat(fused).numpy(), torch.cat(scales).numpy()


@dataclass
class Prediction:
    score: float  # maximum of the anomaly map
    anomalous: bool  # score >= threshold
    anomaly_map: np.ndarray  # float32 (H, W) at the frame's own size
    mask: np.ndarray  # bool (H, W): anomaly_map >= threshold


def predict_frames(model: AnomalyModel, frames: list[np.ndarray], image_size: int, threshold: float,
                   device: torch.device, batch: int = 4) -> list[Prediction]:
    """uint8 RGB frames of any size -> one Prediction each, maps resized back to the frame."""
    fused, _ = anomaly_maps(model, np.stack([resize(f, image_size) for f in frames]), device, batch)
    out = []
    for frame, m in zip(frames, fused):
        h, w = frame.shape[:2]
        full = cv2.resize(m, (w, h), interpolation=cv2.INTER_LINEAR)
        # The score is taken at the model's resolution, where calibration measured it, so the same
        # image scores the same whatever size the camera delivers it at.
        score = float(m.max())
        out.append(Prediction(score=score, anomalous=score >= threshold, anomaly_map=full, mask=full >= threshold))
    return out


def heatmap_overlay(frame: np.ndarray, anomaly_map: np.ndarray, threshold: float, mask: np.ndarray) -> np.ndarray:
    """RGB uint8 picture: the frame with the map in JET colours (0 .. 1.5 x threshold) and the mask
    outlined in red."""
    scale = max(1.5 * threshold, 1e-6)
    norm = np.clip(anomaly_map / scale, 0, 1)
    heat = cv2.applyColorMap((norm * 255).astype(np.uint8), cv2.COLORMAP_JET)[:, :, ::-1]
    out = (0.55 * frame + 0.45 * heat).astype(np.uint8)
    contours, _ = cv2.findContours(mask.astype(np.uint8), cv2.RETR_EXTERNAL, cv2.CHAIN_APPROX_SIMPLE)
    cv2.drawContours(out, contours, -1, (255, 0, 0), 1)
    return out
