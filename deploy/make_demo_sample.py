"""Cut the small real sample that `ustudents demo` ships from the full magnetic_tile dataset.

    python deploy/make_demo_sample.py ../shared/datasets/magnetic_tile ustudents/demo_data/magnetic_tile

Deterministic: within each folder, files are taken in the order of a SHA-256 hash of their name
(not by any model's score), among those that pass two checks stated up front:
  * aspect ratio between 1:2 and 2:1, so the model's square resize distorts the tile little;
  * for defective images, a defect covering at least 0.3% of the image (about 28 pixels at the
    demo's 96 px), so it is still there after downscaling; empty masks are never taken.
Images are downscaled so their longer side is at most MAX_SIDE (area interpolation) and written as
JPEG quality 92; masks with nearest-neighbour interpolation as PNG (0/255), at the image's new size.
"""
from __future__ import annotations

import hashlib
import sys
from pathlib import Path

import ustudents  # noqa: F401  before cv2: importing it caps the pixels OpenCV decodes
import cv2
import numpy as np

MAX_SIDE = 192
MIN_DEFECT_SHARE = 0.003
# 170 training images: the 20% held out for calibration (34) reach the 30 that the
# position-standardized image score needs (train/calibrate.py: MIN_POSITION_IMAGES).
COUNTS = {"train/good": 170, "test/good": 8,
          "test/blowhole": 3, "test/break": 4, "test/crack": 3, "test/fray": 3, "test/uneven": 3}

CREDIT = """# magnetic_tile sample (ships with `ustudents demo`)

{n_train} defect-free training images, {n_good} defect-free test images and {n_bad} defective test images
({types}) with their pixel masks, in the MVTec AD layout, downscaled to at most {side} px a side.

Cut by `deploy/make_demo_sample.py` from the project's copy of the dataset: files taken in the
order of a hash of their name among those with an aspect ratio between 1:2 and 2:1 and, for
defective images, a defect covering at least {share:.1%} of the image.

Source: the Magnetic Tile Defect dataset of Huang, Qiu and Yuan, "Surface defect saliency of
magnetic tile", The Visual Computer 2020 (repository abin24/Magnetic-tile-defect-datasets).
For research and testing; cite the paper when you publish results on it.
"""


def _order(path: Path) -> str:
    return hashlib.sha256(path.name.encode()).hexdigest()


def _shrink(img: np.ndarray, interp: int) -> np.ndarray:
    h, w = img.shape[:2]
    f = MAX_SIDE / max(h, w)
    if f >= 1:
        return img
    return cv2.resize(img, (max(1, round(w * f)), max(1, round(h * f))), interpolation=interp)


def main(src: Path, dst: Path) -> None:
    if dst.exists() and any(dst.iterdir()):
        sys.exit(f"{dst}: exists and is not empty; remove it first")
    for folder, count in COUNTS.items():
        defect = folder.split("/")[1]
        taken = 0
        for f in sorted((src / folder).iterdir(), key=_order):
            img = cv2.imread(str(f), cv2.IMREAD_GRAYSCALE)
            h, w = img.shape
            if not 0.5 <= w / h <= 2:
                continue
            mask = None
            if defect != "good":
                mask = cv2.imread(str(src / "ground_truth" / defect / f"{f.stem}_mask.png"), cv2.IMREAD_GRAYSCALE)
                if (mask > 0).mean() < MIN_DEFECT_SHARE:
                    continue
            small = _shrink(img, cv2.INTER_AREA)
            out = dst / folder / f"{f.stem}.jpg"
            out.parent.mkdir(parents=True, exist_ok=True)
            cv2.imwrite(str(out), small, [cv2.IMWRITE_JPEG_QUALITY, 92])
            if mask is not None:
                m = cv2.resize(mask, small.shape[::-1], interpolation=cv2.INTER_NEAREST)
                mout = dst / "ground_truth" / defect / f"{f.stem}_mask.png"
                mout.parent.mkdir(parents=True, exist_ok=True)
                cv2.imwrite(str(mout), np.where(m > 0, 255, 0).astype(np.uint8))
            taken += 1
            if taken == count:
                break
        if taken < count:
            sys.exit(f"{src / folder}: only {taken} of {count} images qualify")
    types = [k.split("/")[1] for k in COUNTS if not k.endswith("good")]
    (dst / "README.md").write_text(CREDIT.format(
        n_train=COUNTS["train/good"], n_good=COUNTS["test/good"],
        n_bad=sum(v for k, v in COUNTS.items() if not k.endswith("good")),
        types=", ".join(f"{t} {COUNTS['test/' + t]}" for t in types), side=MAX_SIDE, share=MIN_DEFECT_SHARE))


if __name__ == "__main__":
    if len(sys.argv) != 3:
        sys.exit(__doc__.strip().splitlines()[2].strip())
    main(Path(sys.argv[1]), Path(sys.argv[2]))
