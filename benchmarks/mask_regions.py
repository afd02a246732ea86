"""How many defect regions PRO weighs on a real dataset's ground truth, found at the masks' own size
(as `ustudents evaluate` does: dataset.load_regions) against found after shrinking each mask to the
model's size (the earlier way, which split thin defects into pieces).

    python benchmarks/mask_regions.py ../shared/datasets/magnetic_tile --size 256 --name mask_regions_magnetic_tile

Per defect type: masks, 8-connected regions at the masks' own size, regions left at --size (a region
smaller than a pixel there gets the pixel it covers most, images.resize_regions; it vanished before
2026-12-07), and regions counted after shrinking (nearest); with the masks whose count changed. With --model, also that bundle's AU-PRO (FPR <= 0.3) on ROOT's test set at its own
size, its fused maps against the regions counted each of the three ways (what the count changes in
the metric). Writes benchmarks/results/<name>.json and .md, with the machine named.

    python benchmarks/mask_regions.py ../shared/datasets/magnetic_tile --model MODEL --name NAME
"""
from __future__ import annotations

import sys
from collections import defaultdict
from pathlib import Path

import click
import ustudents  # noqa: F401  before cv2: importing it caps the pixels OpenCV decodes
import cv2
import numpy as np
import torch

from common import machine, name_option, one_line_errors, write_result
from ustudents.engines.bundle import load_bundle
from ustudents.engines.images import IMAGE_SUFFIXES, defect_regions, read_mask, resize_regions


def counts(mask: np.ndarray, size: int) -> tuple[int, int, int]:
    """(regions at the mask's size, of them left at `size`, regions of the mask shrunk to `size`)."""
    regions = defect_regions(mask)
    kept = np.unique(resize_regions(regions, size))
    shrunk = defect_regions(cv2.resize(mask.astype(np.uint8), (size, size), interpolation=cv2.INTER_NEAREST) > 0)
    return int(regions.max()), int((kept > 0).sum()), int(shrunk.max())


def model_au_pro(model: Path, root: Path) -> dict[str, float]:
    """The bundle's fused AU-PRO on root's test set, against its regions found at the masks' own size
    with specks kept (as `ustudents evaluate` counts them), at their own size as nearest resizing
    leaves them (before 2026-12-07), and found after shrinking the masks (before 2026-12-06)."""
    from ustudents.engines.runtime import load_engine
    from ustudents.train import dataset
    from ustudents.train.evaluate import engine_maps
    from ustudents.train.metrics import au_pro

    engine = load_engine(model, backend="torch", device="cpu")
    size = engine.image_size
    test = dataset.test_samples(root.parent, root.name)
    fused, _ = engine_maps(engine, dataset.load_images(test, size, bits=engine.bundle.uint16_bits), desc="test maps")
    kept = dataset.load_regions(test, size)
    nearest = np.zeros_like(kept)
    for i, s in enumerate(test):
        if s.mask_path is not None:
            nearest[i] = cv2.resize(defect_regions(read_mask(s.mask_path)), (size, size),
                                    interpolation=cv2.INTER_NEAREST)
    return {"own size, specks kept": au_pro(fused, kept, numbered=True),
            "own size, nearest": au_pro(fused, nearest, numbered=True),
            "after shrinking": au_pro(fused, nearest > 0)}


@click.command()
@click.argument("root", type=click.Path(exists=True, file_okay=False, path_type=Path))
@click.option("--size", default=256, show_default=True, type=click.IntRange(16, 4096), help="The model's image size.")
@name_option
@click.option("--model", default=None, type=click.Path(exists=True, file_okay=False, path_type=Path),
              help="A bundle of ROOT's category: its AU-PRO on ROOT's test set with each count (--size is its own).")
@one_line_errors
def main(root, size, name, model):
    if model is not None:
        bundle = load_bundle(model)
        size = bundle.image_size
        if bundle.manifest["category"] != root.name:  # its AU-PRO on another category's test set means nothing
            raise click.BadParameter(f"{model}: a bundle of category {bundle.manifest['category']!r}, and ROOT is "
                                     f"{root.name!r}; give ROOT's bundle", param_hint="--model")
    if not any(p.suffix.lower() in IMAGE_SUFFIXES for p in (root / "ground_truth").rglob("*")):
        # a dataset root, or an empty folder: a result of 0 masks was written
        raise click.BadParameter(f"{root}: no masks under {root / 'ground_truth'}; give a category folder of an "
                                 "MVTec AD-layout dataset (e.g. ../shared/datasets/magnetic_tile)", param_hint="ROOT")
    by_type: dict[str, dict] = defaultdict(lambda: {"masks": 0, "regions": 0, "kept": 0, "shrunk": 0,
                                                    "masks_split": 0, "masks_losing_a_region": 0})
    for path in sorted((root / "ground_truth").rglob("*")):
        if path.suffix.lower() not in IMAGE_SUFFIXES:
            continue
        own, kept, shrunk = counts(read_mask(path), size)
        row = by_type[path.parent.name]
        row["masks"] += 1
        row["regions"] += own
        row["kept"] += kept
        row["shrunk"] += shrunk
        row["masks_split"] += shrunk > own
        row["masks_losing_a_region"] += kept < own
    total = {k: sum(r[k] for r in by_type.values()) for k in ("masks", "regions", "kept", "shrunk", "masks_split",
                                                              "masks_losing_a_region")}
    rows = {**dict(sorted(by_type.items())), "all": total}
    table = "\n".join(["| type | masks | regions (own size) | left at size | counted after shrinking | masks split | "
                       "masks losing a region |", "|---|---|---|---|---|---|---|"] +
                      [f"| {t} | {r['masks']} | {r['regions']} | {r['kept']} | {r['shrunk']} | {r['masks_split']} | "
                       f"{r['masks_losing_a_region']} |" for t, r in rows.items()])
    click.echo(table)
    au_pro_by_count = model_au_pro(model, root) if model is not None else None
    if au_pro_by_count:
        table += "\n\n| regions counted | AU-PRO (FPR <= 0.3), fused |\n|---|---|\n" + "\n".join(
            f"| {how} | {v:.4f} |" for how, v in au_pro_by_count.items())
        click.echo(table.split("\n\n")[-1])
    name = name or f"mask_regions_{root.name}_{size}"
    command = " ".join(["python", "benchmarks/mask_regions.py"] + sys.argv[1:])
    m = machine(torch.device("cpu"))
    summary = {**total, **({"au_pro_30": au_pro_by_count} if au_pro_by_count else {})}
    path = write_result(name, {"summary": summary, "machine": m, "root": root.name, "size": size, "by_type": rows,
                               "model": str(model) if model else None, "command": command},
                        f"# Defect regions: {name}\n\n{root.name} ground truth at {size} px.\n\n{table}\n\n"
                        f"Reproduce: `{command}`\n")
    click.echo(f"wrote {path} and .md")


if __name__ == "__main__":
    main()
