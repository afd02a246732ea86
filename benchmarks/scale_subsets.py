"""Which scales to fuse, on one trained multi-scale bundle's own maps: every subset of its scales.

    python benchmarks/scale_subsets.py MODEL --data-root ../shared/datasets

The paper's fused map is the mean of the scales' normalized maps (scoring.fuse), and each scale's
map depends on that scale's teacher, students and statistics only. So the bundle's per-scale maps,
computed once on its validation images (the held-out part of train/good it was calibrated on) and on
the test set, give the fused map of any subset of its scales exactly as a bundle trained with
`--scales` = that subset would (the same networks and statistics). Per subset: AU-PRO, pixel AUROC,
and image AUROC of the position score (its statistics from the subset's validation maps,
calibrate.position_statistics) and of the map's maximum. Writes benchmarks/results/<name>.json.
"""
from __future__ import annotations

import itertools
import sys
import time
from pathlib import Path

import click
import torch

from common import device_label, machine, name_option, one_line_errors, position_standardized, validation_and_test_maps, write_result  # noqa: E402

from ustudents.engines.runtime import load_engine
from ustudents.train.evaluate import max_scores, metrics_for
from ustudents.train.metrics import image_auroc


@click.command()
@click.argument("model", type=click.Path(exists=True, path_type=Path))
@click.option("--data-root", type=click.Path(path_type=Path), required=True)
@click.option("--test-every", default=1, show_default=True, help="Use every k-th test image of each type.")
@name_option
@one_line_errors
def main(model, data_root, test_every, name):
    t0 = time.time()
    engine = load_engine(model, backend="torch", device="cpu", max_batch=4)
    manifest = engine.bundle.manifest
    category, size, scales = manifest["category"], engine.image_size, engine.bundle.scales
    if len(scales) < 2:
        raise click.ClickException(f"{model}: one scale ({scales[0]}); give a bundle trained with several")
    m = validation_and_test_maps(engine, data_root, test_every)
    val, test, labels = m["val"], m["test"], m["labels"]
    val_scales, test_scales = m["val_scales"], m["test_scales"]

    results = {}
    for n in range(1, len(scales) + 1):
        for subset in itertools.combinations(range(len(scales)), n):
            key = "+".join(str(scales[k]) for k in subset)
            fused_val, fused_test = val_scales[:, subset].mean(1), test_scales[:, subset].mean(1)
            position = position_standardized(fused_test, fused_val).reshape(len(test), -1).max(1)
            results[key] = {**metrics_for(fused_test, m["regions"], labels, position),
                            "image_auroc_of_max": image_auroc(max_scores(fused_test), labels)}
            click.echo(f"{key:12} " + "  ".join(f"{k} {v:.3f}" for k, v in results[key].items()))
    record = {"summary": {"device": device_label(machine(torch.device("cpu"))), "dataset": str(data_root / category),
                          "model": model.name, "image_size": size, "scales": scales, "test_images": len(test),
                          "validation_images": len(val), "subsets": results},
              "machine": machine(torch.device("cpu")), "wall_s": round(time.time() - t0, 1),
              "command": "python benchmarks/scale_subsets.py " + " ".join(sys.argv[1:])}
    columns = ("au_pro_30", "image_auroc", "image_auroc_of_max", "pixel_auroc")
    table = "\n".join([f"{'scales':12}" + "".join(f"{c:>20}" for c in columns)] +
                      [f"{k:12}" + "".join(f"{r[c]:>20.3f}" for c in columns) for k, r in results.items()])
    table += "\nimage_auroc: the position score (per subset); image_auroc_of_max: the fused map's maximum"
    click.echo(table)
    path = write_result(name, record, f"# Scale subsets: {name}\n\nMachine: {record['summary']['device']}. Model "
                        f"{model.name} ({size} px, scales {scales}), {len(val)} validation and {len(test)} test "
                        f"images.\n\n```\n{table}\n```\n\nReproduce: `{record['command']}`\n")
    click.echo(f"wrote {path}")


if __name__ == "__main__":
    main()
