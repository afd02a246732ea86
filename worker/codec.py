"""Frames in and pictures out: checking an entry's image payload, decoding it, encoding PNGs."""
from __future__ import annotations

import cv2
import numpy as np

from ustudents.engines.images import ImageError, check_image_size, decode_image
from ustudents.engines.overlay import heatmap_overlay

from .schema import EMPTY, IMAGE, IMAGE_KEY, INVALID_ENTRY, KEY_DENIED, MISSING_IMAGE, TOO_LARGE, DeadLetter


def payload(fields: dict[bytes, bytes], fetched: bytes | int | None | Exception, max_bytes: int) -> bytes | DeadLetter:
    """The encoded image of an entry, or why there is none. `fetched` is what its `image_key` held
    (see StreamIO.fetch_images) when the entry names one instead of carrying `image`."""
    data = fields.get(IMAGE.encode())
    where = "image"
    if data is not None and IMAGE_KEY.encode() in fields:  # which one is the frame? the producer is at fault
        return DeadLetter(INVALID_ENTRY, "the entry has both an `image` and an `image_key` field; the stream contract "
                                         "takes exactly one (fix the producer)")
    if data is None:
        key = fields.get(IMAGE_KEY.encode())
        if key is None:
            return DeadLetter(MISSING_IMAGE, "the entry has neither an `image` nor an `image_key` field")
        where = f"image_key {key.decode('utf-8', 'replace')!r}"
        if fetched is None:
            return DeadLetter(MISSING_IMAGE, f"{where} holds no image (expired, deleted or not a string)")
        if isinstance(fetched, Exception):  # NOPERM for the key (StreamIO.fetch_images)
            return DeadLetter(KEY_DENIED, f"Redis refuses the worker's user the {where} ({fetched}): name image keys "
                                          "within the key pattern its ACL grants (the line's keys, e.g. line1:img:..., "
                                          "for ~line1*), or grant it theirs")
        if isinstance(fetched, int):
            return DeadLetter(TOO_LARGE, f"{where} holds {fetched} bytes, more than max_frame_bytes={max_bytes}")
        data = fetched
    if len(data) == 0:
        return DeadLetter(EMPTY, f"{where} is empty (0 bytes)")
    if len(data) > max_bytes:
        return DeadLetter(TOO_LARGE, f"{where} has {len(data)} bytes, more than max_frame_bytes={max_bytes}")
    return data


def decode(data: bytes, source: str, uint16_bits: int | None) -> np.ndarray:
    """Encoded bytes -> uint8 RGB (H, W, 3), 16-bit data holding `uint16_bits` bits (the model's);
    ImageError when they are not an image."""
    try:
        frame = decode_image(data, source, uint16_bits)
    except cv2.error as err:  # OpenCV rejects some malformed headers by raising
        raise ImageError(f"{source}: cannot be decoded as an image ({str(err).strip().splitlines()[-1]})") from None
    return check_image_size(frame, source, "a frame")  # a fault, not a part: dead-lettered


def png(image: np.ndarray) -> bytes:
    """PNG bytes of a gray (H, W) or RGB (H, W, 3) uint8 image."""
    ok, buf = cv2.imencode(".png", image[:, :, ::-1] if image.ndim == 3 else image)
    if not ok:
        raise ValueError(f"PNG encoding of a {image.shape} image failed")
    return buf.tobytes()


def mask_png(mask: np.ndarray) -> bytes:
    """The binary mask as a gray PNG: 255 = anomalous pixel, 0 = good (as `ustudents predict` writes)."""
    return png(mask.astype(np.uint8) * 255)


def heatmap_png(frame: np.ndarray, level: np.ndarray, threshold: float, mask: np.ndarray) -> bytes:
    """The frame with what its mask thresholds in colour and the mask outlined (`ustudents predict`'s overlay)."""
    return png(heatmap_overlay(frame, level, threshold, mask))
