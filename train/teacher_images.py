"""The natural images teachers are distilled on, and the pool that holds them.

The paper cuts its patches from ImageNet: 1.28 million photos, far more than memory holds once P's
dense feature maps of each are cached (about 60 MB per 500 x 375 photo at p = 17, measured:
benchmarks/results/teacher_pool_cpu_epyc.json). So a folder is listed, not loaded: an `ImagePool`
holds the pyramid levels (and targets) of at most `size` images at a time, and a folder of more
streams through it, one image replacing the one held longest every few steps. A source that fits
(scikit-image's 19 photos, a small folder) is held whole in its files' order and never replaced,
which is what distillation did before the pool.
"""
from __future__ import annotations

from collections import deque
from pathlib import Path
from typing import Callable, Iterator

import numpy as np
import torch
import torch.nn.functional as F
from tqdm import tqdm

from ustudents.engines.images import ImageError, is_image_file, missing_folder_hint, read_image, refuse_broken_links

SKIMAGE_SOURCE = "skimage"
# The natural photographs scikit-image ships inside its wheel (no download): people, animals,
# objects, textures, scenery, micrographs. Drawings and synthetic images are left out.
SKIMAGE_PHOTOS = ("astronaut.png", "brick.png", "camera.png", "cell.png", "chelsea.png", "clock_motion.png",
                  "coffee.png", "coins.png", "grass.png", "gravel.png", "hubble_deep_field.jpg", "ihc.png",
                  "moon.png", "motorcycle_left.png", "motorcycle_right.png", "page.png", "retina.jpg",
                  "rocket.jpg", "text.png")
PYRAMID = (1.0, 0.5, 0.25)  # patches are cut at several image scales for more varied content
POOL_IMAGES = 32  # images held at once by default: about 2 GB of dense targets for ImageNet-sized photos
POOL_REFRESH = 10  # steps per replaced image by default: P's maps of a photo cost about 2.5 CPU-core s at p = 17


class TeacherError(ValueError):
    pass


def natural_image_files(source: str) -> list[Path]:
    """The image files of `source`: scikit-image's photos for `skimage`, else every image under a
    folder (recursively, sorted). Nothing is read yet."""
    if source == SKIMAGE_SOURCE:
        try:
            import skimage
        except ImportError:
            raise TeacherError("the default teacher images come from scikit-image: "
                               "pip install 'ustudents[teacher]', or pass --images DIR") from None
        folder = Path(skimage.__file__).parent / "data"
        return [folder / name for name in SKIMAGE_PHOTOS]
    root = Path(source)
    if not root.is_dir():
        raise TeacherError(f"--images {root}: " + ("a file; give the folder that holds the images" if root.exists() else
                           f"folder not found{missing_folder_hint(root)}") + ", or 'skimage' for scikit-image's photos")
    entries = list(root.rglob("*"))
    refuse_broken_links(root, entries)  # not skipped: links into an unmounted share would shrink the set unseen
    files = sorted(f for f in entries if is_image_file(f))
    if not files:
        raise TeacherError(f"{root}: no images (.png/.jpg/...) found; --images must be a folder of natural "
                           "images (e.g. an ImageNet train folder) or 'skimage'")
    return files


def read_natural_image(path: Path) -> np.ndarray | None:
    """uint8 RGB, or None (with a line naming the file) when it cannot be read: one bad photo among
    thousands must not stop a distillation. A tiny one is read: the pool counts it too small for the
    scale (it was "skipping ... not an inspection image", counted unreadable)."""
    try:  # each picture with the bits its 16-bit data uses: a 12-bit camera's were read 16x too dark
        return read_image(path, bits=None, inspection=False)
    except ImageError as err:
        tqdm.write(f"skipping {err}")
        return None


def load_natural_images(source: str) -> list[np.ndarray]:
    """Every readable image of `source` at once (for small sets: the benchmarks' probes)."""
    files = natural_image_files(source)
    images = [img for img in map(read_natural_image, files) if img is not None]
    if not images:
        raise none_readable(source, len(files))
    return images


def none_readable(source: str, files: int) -> TeacherError:
    return TeacherError(f"{source}: none of its {files} image files could be read (each is named above); "
                        "--images must be a folder of readable natural images")


def pyramid(images: list[np.ndarray], p: int) -> list[torch.Tensor]:
    """Each image (3, H, W) in [0, 1] at the PYRAMID scales where a p x p patch, with a margin, fits."""
    levels = []
    for img in images:
        t = torch.from_numpy(img).permute(2, 0, 1).float().div(255)
        for s in PYRAMID:
            h, w = int(t.shape[1] * s), int(t.shape[2] * s)
            if min(h, w) >= p + 8:
                levels.append(F.interpolate(t[None], size=(h, w), mode="area")[0] if s < 1 else t)
    return levels


class ImagePool:
    """The usable pyramid levels of at most `size` images at a time, each image's with its targets.

    `usable` keeps the levels of an image that training can use (an image with none is passed over).
    Targets, when the training has per-pixel ones, are set with `assign` for the images held and made
    by `targets_of` for each image taken in later. `levels` and `targets` list every held image's, in
    the order the images came in, and `photos` the file each level was cut from (the triplet loss
    draws its negatives from another photo). A file that cannot be read, or has no usable level, is
    tried once.
    """

    def __init__(self, files: list[Path], p: int, size: int, seed: int,
                 usable: Callable[[list[torch.Tensor]], list[torch.Tensor]]):
        self.files, self.p, self.size, self.usable = files, p, size, usable
        self.streaming = len(files) > size
        self._order = self._visiting_order(seed)
        self._held: deque[tuple[int, list[torch.Tensor], list[torch.Tensor] | None]] = deque()  # file, levels, targets
        self.targets_of: Callable[[list[torch.Tensor]], list[torch.Tensor]] | None = None
        self.taken: set[int] = set()  # files taken in at some time
        self.swaps = 0  # images replaced by the next (streaming)
        self.unreadable: set[int] = set()
        self.unusable: set[int] = set()  # read, but no level training can use (too small)
        self.levels: list[torch.Tensor] = []
        self.photos: list[int] = []  # per level: the index of its file in `files`
        self.targets: list[torch.Tensor] = []
        while len(self._held) < size and self._take_next():
            pass
        if len(self._held) < size:  # every usable image is held: nothing left to stream
            self._stop_streaming()
        self._flatten()

    def _visiting_order(self, seed: int) -> Iterator[int]:
        if not self.streaming:
            yield from range(len(self.files))
            return
        gen = torch.Generator().manual_seed(seed)  # apart from training's generator: its draws stay as they were
        while True:  # a fresh shuffle for every pass over the folder
            yield from torch.randperm(len(self.files), generator=gen).tolist()

    def _stop_streaming(self) -> None:
        """All the usable images are held: keep them in their files' order, as a folder that fits is."""
        self.streaming = False
        self._held = deque(sorted(self._held, key=lambda held: held[0]))

    def _take_next(self) -> bool:
        """Take in the next image of the order that is not held and has usable levels, within one pass
        over the files; False when there is none."""
        skip = {i for i, _, _ in self._held} | self.unreadable | self.unusable
        if len(skip) >= len(self.files):
            return False
        for _ in range(2 * len(self.files)):  # two passes' worth of the order hold one whole pass
            i = next(self._order, None)
            if i is None:
                return False
            if i in skip:
                continue
            img = read_natural_image(self.files[i])
            if img is None:
                self.unreadable.add(i)
                continue
            levels = self.usable(pyramid([img], self.p))
            if not levels:
                self.unusable.add(i)
                continue
            self.taken.add(i)
            self._held.append((i, levels, self.targets_of(levels) if self.targets_of else None))
            return True
        return False

    def _flatten(self) -> None:
        self.levels = [t for _, levels, _ in self._held for t in levels]
        self.photos = [i for i, levels, _ in self._held for _ in levels]
        self.targets = [t for _, _, targets in self._held if targets is not None for t in targets]

    def assign(self, targets: list[torch.Tensor]) -> None:
        """The targets of every level held now, in `levels`' order."""
        assert len(targets) == len(self.levels)
        it = iter(targets)
        self._held = deque((i, levels, [next(it) for _ in levels]) for i, levels, _ in self._held)
        self._flatten()

    def advance(self, n: int = 1) -> None:
        """Replace the n images held longest by the next ones (streaming only; else nothing changes).
        While an image is swapped, one more than `size` is held for a moment."""
        for _ in range(min(n, len(self._held)) if self.streaming else 0):
            if not self._take_next():
                self._stop_streaming()  # no usable image is left outside the pool
                break
            self._held.popleft()
            self.swaps += 1
            self._flatten()  # the old image's tensors go now, not after the last swap
        self._flatten()
