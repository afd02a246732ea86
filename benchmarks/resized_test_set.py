"""A category's test set resized to a model's size, small enough to travel to a lent GPU machine.

    python benchmarks/resized_test_set.py ../shared/datasets/magnetic_tile .devdata/magnetic_tile --size 96

The GPU machine takes the working tree only (64 MiB, the dataset is 53 MB), so gpu_checks.sh
evaluates on this copy: every test image resized by the engines' own resize (images.resize) and
written as lossless PNG, every mask by the evaluation's (images.resize_regions), plus a few train/good
images so the layout is complete. A model of that size evaluates on it exactly as on the originals:
the engine's resize of an image already at its size is the identity (checked here per image).
"""
from __future__ import annotations

from pathlib import Path

import click
import ustudents  # noqa: F401  before cv2: importing it caps the pixels OpenCV decodes
import cv2
import numpy as np

from ustudents.engines.images import IMAGE_SUFFIXES, defect_regions, read_image, read_mask, resize, resize_regions

TRAIN_IMAGES = 8


def write_image(image: np.ndarray, out: Path) -> None:
    """RGB uint8 -> PNG, one channel where the image is gray (a third of the bytes; read back the same)."""
    out.parent.mkdir(parents=True, exist_ok=True)
    gray = (image[..., 0] == image[..., 1]).all() and (image[..., 0] == image[..., 2]).all()
    cv2.imwrite(str(out), image[..., 0] if gray else cv2.cvtColor(image, cv2.COLOR_RGB2BGR))
    if not np.array_equal(read_image(out), image):
        raise click.ClickException(f"{out}: does not read back as written")


@click.command()
@click.argument("category_dir", type=click.Path(exists=True, file_okay=False, path_type=Path))
@click.argument("out", type=click.Path(path_type=Path))
@click.option("--size", default=96, show_default=True, help="The model's image size.")
def main(category_dir: Path, out: Path, size: int) -> None:
    def images(folder: Path) -> list[Path]:
        return sorted(p for p in folder.glob("*") if p.suffix.lower() in IMAGE_SUFFIXES)

    n = 0
    for folder in sorted((category_dir / "test").iterdir()):
        for path in images(folder):
            write_image(resize(read_image(path), size), out / "test" / folder.name / f"{path.stem}.png")
            n += 1
    for folder in sorted((category_dir / "ground_truth").iterdir()):
        for path in images(folder):
            mask = (resize_regions(defect_regions(read_mask(path)), size) > 0).astype(np.uint8) * 255
            (out / "ground_truth" / folder.name).mkdir(parents=True, exist_ok=True)
            cv2.imwrite(str(out / "ground_truth" / folder.name / f"{path.stem}.png"), mask)
    for path in images(category_dir / "train" / "good")[:TRAIN_IMAGES]:
        write_image(resize(read_image(path), size), out / "train" / "good" / f"{path.stem}.png")
    click.echo(f"{out}: {n} test images at {size} px")


if __name__ == "__main__":
    main()
