"""Pictures of a verdict: the frame with what its mask thresholds as a heatmap and the mask outlined."""
from __future__ import annotations

import cv2
import numpy as np


def heatmap_overlay(frame: np.ndarray, level: np.ndarray, threshold: float, mask: np.ndarray) -> np.ndarray:
    """RGB uint8 picture: the frame with `level` (runtime.Prediction.mask_level: the map, or its
    position-standardized form) in JET colours (0 .. 1.5 x the mask threshold) and the mask outlined
    in red."""
    scale = max(1.5 * threshold, 1e-6)
    norm = np.clip(level / scale, 0, 1)
    heat = cv2.applyColorMap((norm * 255).astype(np.uint8), cv2.COLORMAP_JET)[:, :, ::-1]
    # blended in uint8 by OpenCV: numpy's float64 arithmetic took 24 bytes a pixel a step, gigabytes
    # for one frame of tens of megapixels (benchmarks/worker_memory.py)
    out = cv2.addWeighted(np.ascontiguousarray(frame), 0.55, np.ascontiguousarray(heat), 0.45, 0.0)
    contours, _ = cv2.findContours(mask.astype(np.uint8), cv2.RETR_EXTERNAL, cv2.CHAIN_APPROX_SIMPLE)
    cv2.drawContours(out, contours, -1, (255, 0, 0), 1)
    return out
