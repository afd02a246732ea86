"""The ground-truth checks of `read_mask` on a real dataset: every mask must pass, every image given
as a mask (a test image copied by mistake) must be refused. Also the largest share of grey-edge
pixels among the masks, against the PHOTO_GREY_SHARE that would refuse one.

    python benchmarks/mask_check.py ../shared/datasets/magnetic_tile --name mask_check_magnetic_tile

Writes benchmarks/results/<name>.json (`summary`: masks, masks_refused, images, images_accepted,
largest_grey_share_of_a_mask, refuse_above) and <name>.md, with the machine named.
"""
from __future__ import annotations

import sys
from pathlib import Path

import click
import torch

from common import device_label, machine, name_option, one_line_errors, write_result
from ustudents.engines.images import IMAGE_SUFFIXES, PHOTO_GREY_SHARE, ImageError, read_image, read_mask


def grey_share(path: Path) -> float:
    """The share of a mask's pixels strictly between its darkest and brightest values (its edges)."""
    value = read_image(path, None).max(axis=2)
    lo, hi = value.min(), value.max()
    return float(((value > lo) & (value < hi)).mean())


def refused(path: Path) -> str | None:
    try:
        read_mask(path)
    except ImageError as err:
        return str(err)
    return None


@click.command()
@click.argument("category", type=click.Path(exists=True, file_okay=False, path_type=Path))
@name_option
@one_line_errors
def main(category: Path, name: str) -> None:
    masks = sorted(p for p in (category / "ground_truth").rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES)
    images = sorted(p for folder in ("train", "test") for p in (category / folder).rglob("*")
                    if p.suffix.lower() in IMAGE_SUFFIXES)
    masks_refused = {str(p): why for p in masks if (why := refused(p))}
    images_accepted = [str(p) for p in images if refused(p) is None]
    info = machine(torch.device("cpu"))
    summary = {"masks": len(masks), "masks_refused": len(masks_refused), "images": len(images),
               "images_accepted": len(images_accepted),
               "largest_grey_share_of_a_mask": round(max(grey_share(p) for p in masks), 4),
               "refuse_above": PHOTO_GREY_SHARE, "device": device_label(info)}
    command = f"python benchmarks/mask_check.py {' '.join(sys.argv[1:])}"
    table = "\n".join(["| what | count |", "|---|---|", f"| masks read | {len(masks)} |",
                       f"| masks refused | {len(masks_refused)} |", f"| images given as masks | {len(images)} |",
                       f"| images accepted as masks | {len(images_accepted)} |",
                       f"| largest grey-edge share of a mask | {summary['largest_grey_share_of_a_mask']:.2%} |"])
    print(table)
    path = write_result(name, {"summary": summary, "masks_refused": masks_refused, "images_accepted": images_accepted,
                               "machine": info, "command": command}, (
        f"# Mask checks on {category.name}\n\nMachine: {device_label(info)}. A mask is refused as a photograph "
        f"above {PHOTO_GREY_SHARE:.0%} grey pixels (and 16 levels).\n\n{table}\n\nReproduce: `{command}`\n"))
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
