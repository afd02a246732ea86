"""Reading images from disk and turning them into model input.

One convention everywhere: images are uint8 RGB arrays (H, W, 3); gray files are replicated to
three channels, because the teacher was distilled from an RGB ImageNet network.
"""
from __future__ import annotations

from pathlib import Path

import cv2
import numpy as np
import torch

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff")


class ImageError(ValueError):
    """An image file that cannot be used; the message names the file and the fix."""


def read_image(path: str | Path) -> np.ndarray:
    """Read a PNG/JPEG/... file as uint8 RGB (H, W, 3)."""
    path = Path(path)
    data = np.fromfile(path, dtype=np.uint8) if path.is_file() else None
    if data is None:
        raise ImageError(f"{path}: no such file")
    return decode_image(data.tobytes(), str(path))


def decode_image(data: bytes, source: str = "<bytes>") -> np.ndarray:
    """Decode encoded image bytes as uint8 RGB (H, W, 3)."""
    if len(data) == 0:
        raise ImageError(f"{source}: the file is empty; replace it with a valid PNG or JPEG image")
    img = cv2.imdecode(np.frombuffer(data, np.uint8), cv2.IMREAD_UNCHANGED)
    if img is None or img.size == 0:
        raise ImageError(f"{source}: cannot be decoded as an image; replace or remove the file")
    if img.dtype == np.uint16:  # 16-bit sensors: keep the top 8 bits
        img = (img >> 8).astype(np.uint8)
    if img.ndim == 2:
        return cv2.cvtColor(img, cv2.COLOR_GRAY2RGB)
    if img.shape[2] == 4:
        return cv2.cvtColor(img, cv2.COLOR_BGRA2RGB)
    return cv2.cvtColor(img, cv2.COLOR_BGR2RGB)


def read_mask(path: str | Path) -> np.ndarray:
    """Read a ground-truth mask as bool (H, W): nonzero = defect."""
    path = Path(path)
    data = np.fromfile(path, dtype=np.uint8) if path.is_file() else None
    # cv2.imdecode raises (rather than returning None) on an empty buffer: a zero-byte file
    img = cv2.imdecode(data, cv2.IMREAD_GRAYSCALE) if data is not None and data.size else None
    if img is None:
        raise ImageError(f"{path}: cannot be read as a mask image; replace it with a PNG mask")
    return img > 0


def resize(image: np.ndarray, size: int) -> np.ndarray:
    """Resize an (H, W, 3) uint8 image to (size, size); area averaging when shrinking."""
    h, w = image.shape[:2]
    interp = cv2.INTER_AREA if size < min(h, w) else cv2.INTER_LINEAR
    return cv2.resize(image, (size, size), interpolation=interp)


def resize_mask(mask: np.ndarray, size: int) -> np.ndarray:
    return cv2.resize(mask.astype(np.uint8), (size, size), interpolation=cv2.INTER_NEAREST) > 0


def to_tensor(images: list[np.ndarray] | np.ndarray) -> torch.Tensor:
    """uint8 (N, H, W, 3) -> float32 (N, 3, H, W) in [0, 1]."""
    arr = np.ascontiguousarray(np.stack(images) if isinstance(images, list) else images)
    return torch.from_numpy(arr).permute(0, 3, 1, 2).float().div_(255.0)
