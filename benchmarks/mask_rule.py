"""Which mask rule shows the defects, on a trained bundle's own maps, at the operating point.

    python benchmarks/mask_rule.py MODEL --data-root ../shared/datasets

AU-PRO integrates over pixel FPRs up to 0.3; a mask is one threshold at a far lower FPR (the
default target is 0.001), where a few positions that are high on every good image (tile rims) can
decide the threshold alone. This benchmark computes the bundle's fused maps once, on the validation
images it was calibrated on (never the test set) and on the test set, and compares rules that need
no retraining, each with its threshold set on the validation images at `--target-fpr`:
- `map`: the fused map >= its (1 - fpr) quantile over the validation pixels;
- `position_z`: the map standardized per pixel position (calibrate.position_statistics, as the
  image score is) >= the (1 - fpr) quantile of the validation images' standardized maps, each
  image standardized by the statistics of the others (leave one out, as a new image would be);
- `position_z_gated`: `position_z` on the images whose image score flags them only, so that a part
  judged good carries no mask, with the threshold capped at the image threshold: the product's rule
  for a bundle calibrated on at least 30 images (calibrate.position_mask_threshold, scoring.mask).
Per rule, on the test set: pixel FPR and TPR, PRO at the threshold (mean overlap over defect
regions), the share of defective images whose mask touches their defect, the share of good images
with a mask, the share of mask pixels that are defect (precision) and the mean IoU on defective
images. Writes benchmarks/results/<name>.json.
"""
from __future__ import annotations

import sys
import time
from pathlib import Path

import click
import ustudents  # noqa: F401  before cv2: importing it caps the pixels OpenCV decodes
import cv2
import numpy as np
import torch

from common import device_label, machine, name_option, one_line_errors, position_standardized, validation_and_test_maps, write_result  # noqa: E402

from ustudents.engines.runtime import load_engine
from ustudents.engines.scoring import mask
from ustudents.train.calibrate import (DEFAULT_IMAGE_FPR, DEFAULT_TARGET_FPR, image_score_calibration,
                                       leave_one_out_z_maps, position_mask_threshold, threshold_at_fpr)


def mask_quality(pred: np.ndarray, gt: np.ndarray, labels: np.ndarray) -> dict:
    """What a binary mask rule does on the test set: pred, gt (N, H, W) bool, labels (N,) bool."""
    overlaps = []
    for p, g in zip(pred[labels], gt[labels]):
        n, lab = cv2.connectedComponents(g.astype(np.uint8), connectivity=8)
        overlaps += [p[lab == r].mean() for r in range(1, n)]
    touched = (pred & gt).reshape(len(pred), -1).any(1)
    union = (pred | gt)[labels].reshape(int(labels.sum()), -1).sum(1)
    inter = (pred & gt)[labels].reshape(int(labels.sum()), -1).sum(1)
    return {"pixel_fpr": float(pred[~gt].mean()), "pixel_tpr": float(pred[gt].mean()),
            "pro_at_threshold": float(np.mean(overlaps)),
            "defective_images_touched": float(touched[labels].mean()),
            "good_images_with_mask": float(pred[~labels].reshape(int((~labels).sum()), -1).any(1).mean()),
            "mask_precision": float((pred & gt).sum() / max(pred.sum(), 1)),
            "mean_iou_defective": float(np.mean(inter / np.maximum(union, 1)))}


COLUMNS = {"threshold": "thr", "pixel_fpr": "px FPR", "pixel_tpr": "px TPR", "pro_at_threshold": "PRO@thr",
           "defective_images_touched": "hit", "good_images_with_mask": "good+mask",
           "mask_precision": "precision", "mean_iou_defective": "IoU"}


@click.command()
@click.argument("model", type=click.Path(exists=True, path_type=Path))
@click.option("--data-root", type=click.Path(path_type=Path), required=True)
@click.option("--test-every", default=1, show_default=True, help="Use every k-th test image of each type.")
@click.option("--target-fpr", default=DEFAULT_TARGET_FPR, show_default=True, help="As `ustudents calibrate`.")
@click.option("--image-fpr", default=DEFAULT_IMAGE_FPR, show_default=True, help="As `ustudents calibrate`.")
@name_option
@one_line_errors
def main(model, data_root, test_every, target_fpr, image_fpr, name):
    t0 = time.time()
    engine = load_engine(model, backend="torch", device="cpu", max_batch=4)
    category, size = engine.bundle.manifest["category"], engine.image_size
    m = validation_and_test_maps(engine, data_root, test_every)
    val, test, gt, labels = m["val"], m["test"], m["gt"], m["labels"]
    val_maps, test_maps = m["val_fused"], m["test_fused"]

    z_test = position_standardized(test_maps, val_maps)
    loo_z = leave_one_out_z_maps(val_maps)
    map_threshold = threshold_at_fpr(val_maps, target_fpr)
    image, _ = image_score_calibration(val_maps, map_threshold, image_fpr, loo_z)
    if image["method"] == "max":
        raise click.ClickException(f"{len(val)} validation images: the position rules need at least 30")
    flagged = torch.from_numpy(z_test.reshape(len(test), -1).max(1).astype(np.float64) >= image["threshold"])
    z_threshold = threshold_at_fpr(loo_z, target_fpr)
    product = position_mask_threshold(loo_z, target_fpr, image["threshold"])["value"]
    z = torch.from_numpy(z_test)
    rules = {"map": (test_maps >= map_threshold, map_threshold),
             "position_z": (z_test >= z_threshold, z_threshold),
             "position_z_gated": (mask(z, product, "position_z", flagged).numpy(), product)}
    results = {k: {"threshold": t, **mask_quality(pred, gt, labels)} for k, (pred, t) in rules.items()}
    record = {"summary": {"device": device_label(machine(torch.device("cpu"))), "dataset": str(data_root / category),
                          "model": model.name, "image_size": size, "test_images": len(test),
                          "validation_images": len(val), "target_fpr": target_fpr, "image_score": image,
                          "rules": results},
              "machine": machine(torch.device("cpu")), "wall_s": round(time.time() - t0, 1),
              "command": "python benchmarks/mask_rule.py " + " ".join(sys.argv[1:])}
    table = "\n".join([f"{'rule':18}" + "".join(f"{c:>10}" for c in COLUMNS.values())] +
                      [f"{k:18}" + "".join(f"{v[c]:>10.4f}" for c in COLUMNS) for k, v in results.items()])
    table += "\n" + "; ".join(f"{short}: {c}" for c, short in COLUMNS.items())
    click.echo(table)
    path = write_result(name, record, f"# Mask rules: {name}\n\nMachine: {record['summary']['device']}. Model "
                        f"{model.name} ({size} px), {len(val)} validation and {len(test)} test images, thresholds "
                        f"at pixel FPR {target_fpr} on the validation images.\n\n```\n{table}\n```\n\n"
                        f"Reproduce: `{record['command']}`\n")
    click.echo(f"wrote {path}")


if __name__ == "__main__":
    main()
