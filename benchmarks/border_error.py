"""Diagnostic: where on good images is the regression error of a trained bundle?

For the first N validation images of a bundle (its manifest lists them), compares the mean
regression error e of one scale in the outer BORDER pixels with the centre, and writes
benchmarks/results/<name>.json with the machine named. Used to explain the CPU magnetic_tile result.

    python benchmarks/border_error.py runs/magnetic_tile --data-root ../shared/datasets
"""
from __future__ import annotations

import json
import sys
from pathlib import Path

import click
import numpy as np
import torch

from common import machine, name_option, one_line_errors  # noqa: E402

from ustudents.engines.bundle import load_bundle
from ustudents.engines.images import read_image, resize, to_tensor
from ustudents.engines.model import normalize_input

REPO = Path(__file__).resolve().parents[1]


@click.command()
@click.argument("model", type=click.Path(path_type=Path))
@click.option("--data-root", type=click.Path(path_type=Path), required=True)
@click.option("--scale", default=17, show_default=True)
@click.option("--images", default=40, show_default=True)
@click.option("--border", default=8, show_default=True)
@name_option
@one_line_errors
def main(model, data_root, scale, images, border, name):
    bundle = load_bundle(model)
    ens = next(e for e in bundle.model().ensembles if e.p == scale)
    folder = data_root / bundle.manifest["category"] / "train" / "good"
    rows = []
    for file in bundle.manifest["data"]["validation_files"][:images]:
        img = read_image(folder / file)
        x = normalize_input(to_tensor([resize(img, bundle.image_size)]))
        with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
            e = ens.error_and_variance(x)[0][0]
        inner = torch.zeros_like(e, dtype=torch.bool)
        inner[border:-border, border:-border] = True
        rows.append({"image": file, "height": img.shape[0], "width": img.shape[1], "e_mean": float(e.mean()),
                     "e_border": float(e[~inner].mean()), "e_centre": float(e[inner].mean())})
    ratio = np.array([r["e_border"] / r["e_centre"] for r in rows])
    summary = {"scale": scale, "images": len(rows), "border_px": border,
               "border_to_centre_ratio_min": float(ratio.min()), "border_to_centre_ratio_median": float(np.median(ratio)),
               "border_to_centre_ratio_max": float(ratio.max()),
               "calibration_e_mu": bundle.manifest["statistics"][str(scale)]["e_mu"],
               "calibration_e_sigma": bundle.manifest["statistics"][str(scale)]["e_sigma"]}
    for k, v in summary.items():
        click.echo(f"{k:34s} {v}")
    out = REPO / "benchmarks" / "results" / f"{name}.json"
    out.write_text(json.dumps({"summary": summary, "machine": machine(torch.device("cpu")),
                               "command": "python benchmarks/border_error.py " + " ".join(sys.argv[1:]),
                               "bundle": bundle.manifest["id"], "images": rows}, indent=2) + "\n")
    click.echo(f"wrote {out}")


if __name__ == "__main__":
    main()
