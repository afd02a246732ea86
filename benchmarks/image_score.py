"""Which image score separates good from defective images best, on a trained bundle's own maps.

    python benchmarks/image_score.py MODEL --data-root ../shared/datasets --test-every 3

The product's image score is the anomaly map's maximum, or with enough validation images its
position-standardized maximum (`position_z_max`, calibrate.py). This benchmark computes the bundle's fused
maps once, on the validation images it was calibrated on (the held-out part of train/good, never
the test set) and on the test set, and reports image AUROC for alternatives that need no retraining:
- `max`: the maximum;
- `interior_max_<b>`: the maximum at least b pixels from the image border;
- `top_<q>`: the q-th percentile of the map;
- `position_z_max`: the maximum of the map standardized per pixel position by the validation maps'
  mean and std there (so a position where good images always score high, e.g. the border, no
  longer dominates); AU-PRO and pixel AUROC of that standardized map are reported too.
It also reports where good images' maxima sit (the share within `--border` pixels of the edge), and
what calibration makes of the validation maps (`ustudents calibrate` on those images: the image score
method and its leave-one-out image threshold) with that threshold's image TPR and FPR on the test set.
Writes benchmarks/results/<name>.json.
"""
from __future__ import annotations

import sys
import time
from pathlib import Path

import click
import numpy as np
import torch

from common import device_label, machine, name_option, one_line_errors, position_standardized, validation_and_test_maps, write_result  # noqa: E402

from ustudents.engines.runtime import load_engine
from ustudents.engines.scoring import position_z_max
from ustudents.train.calibrate import DEFAULT_IMAGE_FPR, image_score_calibration
from ustudents.train.evaluate import at_threshold, max_scores, metrics_for
from ustudents.train.metrics import image_auroc


def border_distance_of_max(maps: np.ndarray) -> np.ndarray:
    n, h, w = maps.shape
    r, c = np.divmod(maps.reshape(n, -1).argmax(1), w)
    return np.minimum(np.minimum(r, h - 1 - r), np.minimum(c, w - 1 - c))


def score_alternatives(test: np.ndarray, z: np.ndarray, border: int) -> dict[str, np.ndarray]:
    """Image scores from the maps (N, H, W) and their position-standardized form z."""
    flat, (h, w) = test.reshape(len(test), -1), test.shape[1:]
    return {"max": flat.max(1),
            **{f"interior_max_{b}": test[:, b:h - b, b:w - b].reshape(len(test), -1).max(1)
               for b in (border // 2, border)},
            "top_99": np.percentile(flat, 99, axis=1),
            "top_99.9": np.percentile(flat, 99.9, axis=1),
            "position_z_max": z.reshape(len(z), -1).max(1)}


@click.command()
@click.argument("model", type=click.Path(exists=True, path_type=Path))
@click.option("--data-root", type=click.Path(path_type=Path), required=True)
@click.option("--test-every", default=1, show_default=True, help="Use every k-th test image of each type.")
@click.option("--border", default=8, show_default=True, type=click.IntRange(min=0),
              help="Pixels counted as the border.")
@click.option("--image-fpr", default=DEFAULT_IMAGE_FPR, show_default=True, help="As `ustudents calibrate --image-fpr`.")
@name_option
@one_line_errors
def main(model, data_root, test_every, border, image_fpr, name):
    t0 = time.time()
    engine = load_engine(model, backend="torch", device="cpu", max_batch=4)
    category, size = engine.bundle.manifest["category"], engine.image_size
    m = validation_and_test_maps(engine, data_root, test_every)
    val, test, masks, labels = m["val"], m["test"], m["gt"], m["labels"]
    val_maps, test_maps = m["val_fused"], m["test_fused"]

    z_maps = position_standardized(test_maps, val_maps)
    scores = {k: image_auroc(v, labels) for k, v in score_alternatives(test_maps, z_maps, border).items()}
    # What calibration (calibrate.image_score_calibration) makes of these validation maps, and what
    # its image threshold does on the test set; a bundle calibrated on them holds the same.
    bundle = engine.bundle
    calibrated, tensors = image_score_calibration(val_maps, bundle.mask_threshold, image_fpr)
    product = (max_scores(test_maps) if calibrated["method"] == "max" else
               position_z_max(torch.from_numpy(test_maps), *tensors.values()).numpy())
    predicted = engine.masks(torch.from_numpy(test_maps), torch.from_numpy(product).float()).numpy()  # the bundle's rule
    decisions = at_threshold(predicted, product, masks, labels, calibrated["threshold"], bundle.mask_threshold)
    near = border_distance_of_max(test_maps) < border
    record = {"summary": {"device": device_label(machine(torch.device("cpu"))), "dataset": str(data_root / category),
                          "model": model.name, "image_size": size, "test_images": len(test),
                          "validation_images": len(val), "image_auroc": scores,
                          "calibrated_image_score": calibrated, "calibrated_at_threshold": decisions,
                          f"share_of_maxima_within_{border}px_of_border": {"good": float(near[~labels].mean()),
                                                                          "defective": float(near[labels].mean())}},
              "maps": {"as_is": metrics_for(test_maps, m["regions"], labels),
                       "position_standardized": metrics_for(z_maps, m["regions"], labels)},
              "machine": machine(torch.device("cpu")), "wall_s": round(time.time() - t0, 1),
              "command": "python benchmarks/image_score.py " + " ".join(sys.argv[1:])}
    table = "\n".join([f"{'image score':22}{'image AUROC':>12}"] + [f"{k:22}{v:12.3f}" for k, v in scores.items()])
    maps = "\n".join(f"{k:22}" + "  ".join(f"{m} {v:.3f}" for m, v in r.items()) for k, r in record["maps"].items())
    decided = (f"calibrated {calibrated['method']}, image threshold {decisions['image_threshold']:.3f} (target image "
               f"FPR {image_fpr}, validation {calibrated['validation_image_fpr']:.3f}): test image TPR "
               f"{decisions['image_tpr']:.3f}, image FPR {decisions['image_fpr']:.3f}")
    table += "\n" + decided
    click.echo(table + "\n" + maps)
    path = write_result(name, record, f"# Image score alternatives: {name}\n\nMachine: {record['summary']['device']}. "
                        f"Model {model.name} ({size} px), {len(val)} validation and {len(test)} test images. "
                        f"Maxima within {border} px of the border: good {near[~labels].mean():.0%}, defective "
                        f"{near[labels].mean():.0%}.\n\n```\n{table}\n\n{maps}\n```\n\nReproduce: `{record['command']}`\n")
    click.echo(f"wrote {path}")


if __name__ == "__main__":
    main()
