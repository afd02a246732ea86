"""The frame shapes a model knows, and the check that a frame is one of them.

Every image is squashed into the model's square (images.resize_tensor), so a model has seen only the
aspect ratios and sizes of the images it was trained and calibrated on. A frame far outside them (a
camera whose region of interest changed, a line-scan strip, two frames a grabber stitched together) is
squashed or scaled into textures no good image showed, and its score judges nothing (a strip squashed
many times along its length can smooth a defect away and pass as "ok"). The worker dead-letters such a frame
(`unexpected_shape`) and `ustudents predict` refuses it, naming the shapes the model knows; recalibrating
on good frames of the new shape (`ustudents calibrate`) adds theirs.

The manifest records them as `frame_shapes`: {"aspect": [min, max] of width / height, "width": [min,
max], "height": [min, max]} in pixels, over every image training (and each calibration since) read.
A bundle from before the record checks nothing.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Iterable

import numpy as np

from .images import ImageError

# How far beyond the known ranges a frame may lie, as a factor either way (above the largest, below the
# smallest): a few percent of jitter in a region of interest, or a camera a few pixels off, is the same
# picture; a frame a quarter longer or larger than any the model saw is squashed or scaled that much
# more than any good image was.
SLACK = 1.25


def recalibrate_copy(bundle_path) -> str:
    """The command that adds a line's frame shapes to a copy of a model, for the refusals' advice."""
    return f"ustudents calibrate {bundle_path} --images DIR --out COPY"


class UnexpectedShape(ImageError):
    """A frame outside the shapes its model knows (FrameShapes.check)."""


@dataclass(frozen=True)
class FrameShapes:
    aspect: tuple[float, float]  # width / height
    width: tuple[int, int]
    height: tuple[int, int]

    @classmethod
    def of(cls, shapes: Iterable[tuple[int, int]]) -> FrameShapes:
        """The ranges of (height, width) pairs, at least one."""
        heights, widths = zip(*shapes)
        aspects = [w / h for h, w in zip(heights, widths)]  # unrounded: JSON keeps a float exactly
        return cls((min(aspects), max(aspects)), (min(widths), max(widths)), (min(heights), max(heights)))

    def union(self, other: FrameShapes | None) -> FrameShapes:
        if other is None:
            return self
        def span(a, b):
            return min(a[0], b[0]), max(a[1], b[1])
        return FrameShapes(span(self.aspect, other.aspect), span(self.width, other.width),
                           span(self.height, other.height))

    def to_json(self) -> dict[str, list]:
        return {"aspect": list(self.aspect), "width": list(self.width),
                "height": list(self.height)}

    @classmethod
    def from_json(cls, record: Any) -> FrameShapes:
        """ValueError naming what is wrong with a manifest's record (a hand edit)."""
        if not isinstance(record, dict):
            raise ValueError(f"frame_shapes {record!r} is not an object")
        out = {}
        for key, kind in (("aspect", (int, float)), ("width", int), ("height", int)):
            v = record.get(key)
            if not (isinstance(v, list) and len(v) == 2 and all(isinstance(x, kind) and not isinstance(x, bool)
                                                                 and math.isfinite(x) and x > 0 for x in v)
                    and v[0] <= v[1]):
                raise ValueError(f"frame_shapes.{key} {v!r} is not a [min, max] pair of numbers above 0")
            out[key] = (v[0], v[1])
        return cls(**out)

    def knows(self, height: int, width: int) -> bool:
        return (self.aspect[0] / SLACK <= width / height <= self.aspect[1] * SLACK
                and self.width[0] / SLACK <= width <= self.width[1] * SLACK
                and self.height[0] / SLACK <= height <= self.height[1] * SLACK)

    def check(self, image: np.ndarray, source: str, recalibrate: str) -> np.ndarray:
        """`image` itself, or UnexpectedShape saying how it differs and what to do (`recalibrate`: how,
        for the caller's user)."""
        height, width = image.shape[:2]
        if self.knows(height, width):
            return image
        aspect = width / height
        raise UnexpectedShape(
            f"{source}: {width} x {height} pixels (width/height {aspect:.2f}), unlike every image the model was "
            f"trained and calibrated on ({self.describe()}): squashed into the "
            "model's square it would show textures no good image showed, and its score would judge nothing. Has the "
            f"camera's region of interest or the grabber changed? Fix it; if the line now makes such frames, "
            f"{recalibrate}, which adds their shapes")

    def describe(self) -> str:
        def span(r, fmt="{}"):
            low, high = fmt.format(r[0]), fmt.format(r[1])
            return low if low == high else f"{low} to {high}"
        return (f"width/height {span(self.aspect, '{:.2f}')}, {span(self.width)} px wide, "
                f"{span(self.height)} px high, each range widened by a factor of {SLACK} either way")
