"""Reading images from disk and turning them into model input.

One convention everywhere: images are uint8 RGB arrays (H, W, 3); gray files are replicated to
three channels, because the teacher was distilled from an RGB ImageNet network.
"""
from __future__ import annotations

from pathlib import Path

import cv2
import numpy as np
import torch
import torch.nn.functional as F

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


def frame_tensor(frame: np.ndarray) -> torch.Tensor:
    """A decoded camera frame, uint8 (H, W), (H, W, 1), (H, W, 3) or (H, W, 4), as uint8 RGB (3, H, W)."""
    arr = np.asarray(frame)
    if arr.dtype != np.uint8 or arr.ndim not in (2, 3) or (arr.ndim == 3 and arr.shape[2] not in (1, 3, 4)) \
            or arr.size == 0:
        raise ImageError(f"frame of dtype {arr.dtype} and shape {arr.shape}: expected a non-empty uint8 image "
                         "(H, W) gray or (H, W, 3) RGB, as decode_image returns")
    t = torch.from_numpy(np.ascontiguousarray(arr))
    t = t[None] if t.ndim == 2 else t.permute(2, 0, 1)
    return t[:3].expand(3, -1, -1) if t.shape[0] == 1 else t[:3]


def resize_tensor(images: torch.Tensor, size: int | tuple[int, int]) -> torch.Tensor:
    """Resize float (N, C, H, W) to `size` (a square side or (h, w)): bilinear with antialiasing,
    so shrinking averages like area interpolation. The one resize used everywhere (training,
    calibration, every engine, on whatever device holds the tensor), so that scores measured in
    calibration hold in production."""
    size = (size, size) if isinstance(size, int) else tuple(size)
    if tuple(images.shape[-2:]) == size:
        return images
    return F.interpolate(images, size=size, mode="bilinear", antialias=True, align_corners=False)


def resize(image: np.ndarray, size: int) -> np.ndarray:
    """Resize an (H, W, 3) uint8 image to (size, size) uint8 with `resize_tensor`."""
    x = resize_tensor(frame_tensor(image)[None].float(), size)
    return x[0].round_().clamp_(0, 255).to(torch.uint8).permute(1, 2, 0).numpy()


def resize_mask(mask: np.ndarray, size: int) -> np.ndarray:
    return cv2.resize(mask.astype(np.uint8), (size, size), interpolation=cv2.INTER_NEAREST) > 0


def to_tensor(images: list[np.ndarray] | np.ndarray) -> torch.Tensor:
    """uint8 (N, H, W, 3) -> float32 (N, 3, H, W) in [0, 1]."""
    arr = np.ascontiguousarray(np.stack(images) if isinstance(images, list) else images)
    return torch.from_numpy(arr).permute(0, 3, 1, 2).float().div_(255.0)
