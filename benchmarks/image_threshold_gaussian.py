"""The image threshold's own bias: the resampled calibrations of image_threshold.py on simulated maps
that meet the position score's assumptions exactly (each pixel Gaussian, its own mean and spread, the
images independent and alike), so that whatever gap remains between --image-fpr and the share of new
good images flagged is the rule's, not the real maps'.

    python benchmarks/image_threshold_gaussian.py --name image_threshold_gaussian

Per map side (pixels per map) and calibration set size n: 400 maps are simulated, and `trials` times
n of them calibrate the image score and the other 400 - n are judged. Writes
benchmarks/results/<name>.json and <name>.md.
"""
from __future__ import annotations

import sys
import time

import click
import numpy as np
import torch

from common import device_label, machine, name_option, one_line_errors, write_result
from image_threshold import fpr_table, resampled_fpr

from ustudents.train.calibrate import DEFAULT_IMAGE_FPR

POOL = 400


@click.command()
@click.option("--sides", default="6,16,32,64", show_default=True, help="Map sides, comma-separated.")
@click.option("--sizes", default="30,60,120", show_default=True, help="Calibration set sizes n, comma-separated.")
@click.option("--trials", default=1000, show_default=True, type=click.IntRange(min=1))
@click.option("--image-fpr", default=DEFAULT_IMAGE_FPR, show_default=True, help="As `ustudents calibrate --image-fpr`.")
@name_option
@one_line_errors
def main(sides, sizes, trials, image_fpr, name):
    t0 = time.time()
    rng = np.random.default_rng(0)
    rows = []
    for side in (int(s) for s in sides.split(",")):
        centre, spread = rng.normal(size=(side, side)), rng.uniform(0.5, 2.0, size=(side, side))
        maps = (centre + spread * rng.normal(size=(POOL, side, side))).astype(np.float32)
        for n in (int(k) for k in sizes.split(",")):
            rows.append({"side": side, **resampled_fpr(maps, n, trials, image_fpr, seed=side * 1000 + n)})
            r = rows[-1]
            click.echo(f"{side:3d} px side  n {n:4d}  product {r['product']['mean']:.4f} ± {r['product']['std']:.4f}"
                       f"  numpy default {r['numpy_default']['mean']:.4f}", err=True)
    info = machine(torch.device("cpu"))
    record = {"summary": {"device": device_label(info), "maps": POOL, "target_image_fpr": image_fpr, "rows": rows},
              "machine": info, "wall_s": round(time.time() - t0, 1),
              "command": "python benchmarks/image_threshold_gaussian.py " + " ".join(sys.argv[1:])}
    table = fpr_table(rows, "side")
    click.echo(table)
    path = write_result(name, record, f"# Image threshold on simulated Gaussian maps: {name}\n\n{POOL} maps per "
                        f"side, each pixel Gaussian with its own mean and spread. Per row: n maps drawn at random "
                        f"calibrate the image score at --image-fpr {image_fpr}; the share of the other maps flagged, "
                        f"mean ± std over the draws, with the product's quantile and with numpy's default.\n\n"
                        f"```\n{table}\n```\n\nReproduce: `{record['command']}`\n")
    click.echo(f"wrote {path}")


if __name__ == "__main__":
    main()
