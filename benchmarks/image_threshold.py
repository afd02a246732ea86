"""Does the image threshold flag `--image-fpr` of new good images? Resampled calibrations on real maps.

    python benchmarks/image_threshold.py MODEL --data-root ../shared/datasets

The image threshold (calibrate.image_score_calibration) is set on n good images and then judges good
parts it has never seen. This benchmark computes the bundle's fused maps once, on every good image
it was not trained on (its validation images and the test set's good images), then many times over
calibrates the image score on n of them drawn at random, as `ustudents calibrate` on n images would,
and counts the share of the other good images that its threshold flags: the false-positive rate a
plant sees on new good parts. Beside the product's quantile (the Weibull plotting position) it
reports numpy's default quantile, the rule before 2026-12-06, on the same draws and scores.
Writes benchmarks/results/<name>.json.
"""
from __future__ import annotations

import sys
import time
from pathlib import Path

import click
import numpy as np
import torch

from common import device_label, machine, name_option, one_line_errors, validation_samples, write_result  # noqa: E402

from ustudents.engines.bundle import POSITION_TENSORS
from ustudents.engines.runtime import load_engine
from ustudents.engines.scoring import position_z_max
from ustudents.train import dataset
from ustudents.train.calibrate import (DEFAULT_IMAGE_FPR, MIN_POSITION_IMAGES, image_score_calibration,
                                       leave_one_out_z_maps)
from ustudents.train.evaluate import engine_maps


def resampled_fpr(maps: np.ndarray, n: int, trials: int, image_fpr: float, seed: int = 0) -> dict:
    """Over `trials` random draws of n calibration maps from `maps` (N, S, S), the share of the other
    maps at or above the image threshold: with the product's quantile and with numpy's default."""
    if not MIN_POSITION_IMAGES <= n < len(maps):
        raise click.BadParameter(f"{n} calibration images: the position score needs {MIN_POSITION_IMAGES} or "
                                 f"more, and fewer than the {len(maps)} good images, to leave some to judge")
    rng = np.random.default_rng(seed)
    shares = {"product": [], "numpy_default": []}
    for _ in range(trials):
        order = rng.permutation(len(maps))
        cal, new = maps[order[:n]], torch.from_numpy(maps[order[n:]])
        loo_z = leave_one_out_z_maps(cal)
        record, tensors = image_score_calibration(cal, pixel_threshold=0.0, image_fpr=image_fpr, loo_z=loo_z)
        scores = position_z_max(new, *(tensors[k] for k in POSITION_TENSORS)).numpy()
        before = float(np.quantile(loo_z.reshape(n, -1).max(1).astype(np.float64), 1.0 - image_fpr))
        shares["product"].append(float((scores >= record["threshold"]).mean()))
        shares["numpy_default"].append(float((scores >= before).mean()))
    return {"calibration_images": n, "judged_images": len(maps) - n, "trials": trials,
            "expected_image_fpr": record["expected_image_fpr"],
            **{k: {"mean": float(np.mean(v)), "std": float(np.std(v))} for k, v in shares.items()}}


def fpr_table(rows: list[dict], first: str | None = None) -> str:
    """resampled_fpr rows as a text table, led by the column `first` of each row where given."""
    lead = (lambda r: f"{r[first]:>6}") if first else (lambda r: "")
    head = (f"{first:>6}" if first else "") + f"{'n':>5}{'judged':>8}{'trials':>8}{'expected':>10}{'product':>16}" \
        f"{'numpy default':>16}"
    return "\n".join([head] + [
        f"{lead(r)}{r['calibration_images']:5d}{r['judged_images']:8d}{r['trials']:8d}{r['expected_image_fpr']:10.3f}"
        f"{r['product']['mean']:9.3f} ± {r['product']['std']:.3f}"
        f"{r['numpy_default']['mean']:9.3f} ± {r['numpy_default']['std']:.3f}" for r in rows])

@click.command()
@click.argument("model", type=click.Path(exists=True, path_type=Path))
@click.option("--data-root", type=click.Path(path_type=Path), required=True)
@click.option("--sizes", default="30,60", show_default=True, help="Calibration set sizes n, comma-separated.")
@click.option("--trials", default=500, show_default=True, type=click.IntRange(min=1))
@click.option("--image-fpr", default=DEFAULT_IMAGE_FPR, show_default=True, help="As `ustudents calibrate --image-fpr`.")
@name_option
@one_line_errors
def main(model, data_root, sizes, trials, image_fpr, name):
    t0 = time.time()
    engine = load_engine(model, backend="torch", device="cpu", max_batch=4)
    manifest, size = engine.bundle.manifest, engine.image_size
    test = dataset.test_samples(data_root, manifest["category"])
    good = validation_samples(manifest, data_root) + [s for s in test if s.defect == dataset.GOOD]
    maps, _ = engine_maps(engine, dataset.load_images(good, size, bits=engine.bundle.uint16_bits), desc="good maps")
    rows = [resampled_fpr(maps, int(n), trials, image_fpr) for n in sizes.split(",")]
    info = machine(torch.device("cpu"))
    record = {"summary": {"device": device_label(info), "dataset": str(data_root / manifest["category"]),
                          "model": model.name, "image_size": size, "good_images": len(good),
                          "target_image_fpr": image_fpr, "rows": rows},
              "machine": info, "wall_s": round(time.time() - t0, 1),
              "command": "python benchmarks/image_threshold.py " + " ".join(sys.argv[1:])}
    table = fpr_table(rows)
    click.echo(table)
    path = write_result(name, record, f"# Image threshold on new good images: {name}\n\nMachine: "
                        f"{record['summary']['device']}. Model {model.name} ({size} px); {len(good)} good images it "
                        f"was not trained on. Per row: n of them drawn at random calibrate the image score at "
                        f"--image-fpr {image_fpr}; the share of the other good images flagged, mean ± std over the "
                        f"draws, with the product's quantile and with numpy's default.\n\n```\n{table}\n```\n\n"
                        f"Reproduce: `{record['command']}`\n")
    click.echo(f"wrote {path}")


if __name__ == "__main__":
    main()
