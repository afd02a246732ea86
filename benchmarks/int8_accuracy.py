"""Accuracy of the int8 engine against fp32 on real images: the commands a user runs, in order.

    python benchmarks/int8_accuracy.py                 # the shipped magnetic_tile sample, 64 px
    python benchmarks/int8_accuracy.py --data-root ../shared/datasets --image-size 256 --epochs 100

Trains a bundle (or takes --model), builds the int8 ONNX engine calibrated on train/good with the
parity check on test/good, then evaluates the same test set with PyTorch fp32 and ONNX Runtime int8.
Writes benchmarks/results/<name>.json with both evaluations, the parity and the differences; the
issue's bar for a lower-precision default is |au_pro_30 difference| <= 0.01 on a model that detects
defects.
"""
from __future__ import annotations

import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import click
import torch

from common import REPO, device_label, machine, write_result  # noqa: E402

KEYS = ("au_pro_30", "image_auroc", "pixel_auroc")


def ustudents(*args) -> None:
    cmd = [sys.executable, "-c", "from ustudents.cli import main; main()", *map(str, args)]
    click.echo("$ ustudents " + " ".join(map(str, args)))
    subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL)


@click.command()
@click.option("--data-root", type=click.Path(path_type=Path), default=REPO / "ustudents" / "demo_data", show_default=True)
@click.option("--category", default="magnetic_tile", show_default=True)
@click.option("--model", type=click.Path(path_type=Path), default=None, help="An existing bundle (skips training).")
@click.option("--image-size", default=64, show_default=True)
@click.option("--epochs", default=10, show_default=True)
@click.option("--crop", default=16, show_default=True)
@click.option("--batch", default=4, show_default=True)
@click.option("--name", default="int8_accuracy_cpu", show_default=True)
def main(data_root, category, model, image_size, epochs, crop, batch, name):
    cat = data_root / category
    with tempfile.TemporaryDirectory() as tmp:
        t0 = time.time()
        if model is None:
            model = Path(tmp) / "model"
            ustudents("train", category, "--data-root", data_root, "--out", model, "--image-size", image_size,
                      "--epochs", epochs, "--crop", crop, "--batch", batch, "--amp", "off", "--device", "cpu",
                      "--no-evaluate")
        ustudents("build-engines", model, "--precision", "int8", "--calibration-images", cat / "train" / "good",
                  "--check-images", cat / "test" / "good")
        entry = next(e for e in json.loads((model / "manifest.json").read_text())["engines"] if e["precision"] == "int8")
        runs = {}
        for backend, precision in (("torch", "fp32"), ("onnxruntime", "int8")):
            out = Path(tmp) / f"{precision}.json"
            ustudents("evaluate", model, "--data-root", data_root, "--backend", backend, "--precision", precision,
                      "--device", "cpu", "--json", out)
            runs[precision] = json.loads(out.read_text())
        wall = time.time() - t0
    diff = {k: runs["int8"][k] - runs["fp32"][k] for k in KEYS}
    info = machine(torch.device("cpu"))
    record = {"summary": {"device": device_label(info), "dataset": str(cat), "image_size": image_size,
                          **{f"{k}_fp32": runs["fp32"][k] for k in KEYS}, **{f"{k}_int8": runs["int8"][k] for k in KEYS},
                          "au_pro_30_difference": diff["au_pro_30"]},
              "machine": info, "parity": entry["parity"], "calibration": entry["calibration"],
              "evaluations": runs, "wall_s": wall, "command": "python benchmarks/int8_accuracy.py " + " ".join(sys.argv[1:])}
    table = "\n".join([f"{'':14}{'fp32':>8}{'int8':>8}{'diff':>8}"] +
                      [f"{k:14}{runs['fp32'][k]:8.3f}{runs['int8'][k]:8.3f}{diff[k]:+8.3f}" for k in KEYS])
    click.echo(table)
    path = write_result(name, record, f"# int8 vs fp32 accuracy: {name}\n\nMachine: {device_label(info)}. Data: "
                        f"{cat}, {image_size} px. Parity on test/good: max |diff| {entry['parity']['max_abs_diff']:.3f}, "
                        f"masks agree on {entry['parity']['mask_agreement']:.4%} of pixels.\n\n```\n{table}\n```\n\n"
                        f"Reproduce: `{record['command']}`\n")
    click.echo(f"wrote {path}")


if __name__ == "__main__":
    main()
