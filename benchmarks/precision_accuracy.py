"""Accuracy of a lower-precision engine against fp32 on real images: the commands a user runs, in order.

    python benchmarks/precision_accuracy.py --precision int8     # the shipped magnetic_tile sample, 64 px
    python benchmarks/precision_accuracy.py --precision bf16 --data-root DIR --image-size 128 --epochs 2

Trains a bundle (or takes --model), then evaluates the same test set with PyTorch fp32 and with the
lower precision: int8 is the ONNX Runtime engine (built calibrated on train/good, with its parity
check on test/good), bf16 and fp16 the PyTorch backend under autocast (bf16 on CPUs with native
bfloat16, fp16 on CUDA). Writes benchmarks/results/<name>.json with both evaluations and the
differences; the issue's bar for a lower-precision default is |au_pro_30 difference| <= 0.01.
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
@click.option("--precision", type=click.Choice(["int8", "bf16", "fp16"]), default="int8", show_default=True)
@click.option("--device", default="cpu", show_default=True)
@click.option("--data-root", type=click.Path(path_type=Path), default=REPO / "ustudents" / "demo_data", show_default=True)
@click.option("--category", default="magnetic_tile", show_default=True)
@click.option("--model", type=click.Path(path_type=Path), default=None, help="An existing bundle (skips training).")
@click.option("--image-size", default=64, show_default=True)
@click.option("--epochs", default=10, show_default=True)
@click.option("--crop", default=16, show_default=True)
@click.option("--batch", default=4, show_default=True)
@click.option("--amp", default="off", show_default=True, help="Training autocast (ustudents train --amp).")
@click.option("--name", default=None, help="Result file name.  [default: <precision>_accuracy_<device>]")
def main(precision, device, data_root, category, model, image_size, epochs, crop, batch, amp, name):
    cat = data_root / category
    name = name or f"{precision}_accuracy_{torch.device(device).type}"
    parity = calibration = None
    with tempfile.TemporaryDirectory() as tmp:
        t0 = time.time()
        if model is None:
            model = Path(tmp) / "model"
            ustudents("train", category, "--data-root", data_root, "--out", model, "--image-size", image_size,
                      "--epochs", epochs, "--crop", crop, "--batch", batch, "--amp", amp, "--device", device,
                      "--no-evaluate")
        trained = time.time()
        low_backend = "onnxruntime" if precision == "int8" else "torch"
        if precision == "int8":
            ustudents("build-engines", model, "--precision", "int8", "--calibration-images", cat / "train" / "good",
                      "--check-images", cat / "test" / "good")
            entry = next(e for e in json.loads((model / "manifest.json").read_text())["engines"]
                         if e["precision"] == "int8")
            parity, calibration = entry["parity"], entry["calibration"]
        runs, eval_s = {}, {}
        for backend, prec in (("torch", "fp32"), (low_backend, precision)):
            out = Path(tmp) / f"{prec}.json"
            start = time.time()
            ustudents("evaluate", model, "--data-root", data_root, "--backend", backend, "--precision", prec,
                      "--device", device, "--json", out)
            eval_s[prec] = time.time() - start
            runs[prec] = json.loads(out.read_text())
        wall = time.time() - t0
    diff = {k: runs[precision][k] - runs["fp32"][k] for k in KEYS}
    info = machine(torch.device(device))
    record = {"summary": {"device": device_label(info), "dataset": str(cat), "image_size": image_size,
                          "precision": precision, "backend": low_backend,
                          **{f"{k}_fp32": runs["fp32"][k] for k in KEYS},
                          **{f"{k}_{precision}": runs[precision][k] for k in KEYS},
                          "au_pro_30_difference": diff["au_pro_30"]},
              "machine": info, "parity": parity, "calibration": calibration, "evaluations": runs,
              "wall_s": {"total": wall, "train": trained - t0, "evaluate": eval_s},
              "command": "python benchmarks/precision_accuracy.py " + " ".join(sys.argv[1:])}
    table = "\n".join([f"{'':14}{'fp32':>8}{precision:>8}{'diff':>8}"] +
                      [f"{k:14}{runs['fp32'][k]:8.3f}{runs[precision][k]:8.3f}{diff[k]:+8.3f}" for k in KEYS])
    click.echo(table)
    checked = (f" Parity on test/good: max |diff| {parity['max_abs_diff']:.3f}, masks agree on "
               f"{parity['mask_agreement']:.4%} of pixels." if parity else "")
    path = write_result(name, record, f"# {precision} vs fp32 accuracy: {name}\n\nMachine: {device_label(info)}. "
                        f"Data: {cat}, {image_size} px; {precision} on {low_backend}.{checked}\n\n```\n{table}\n```\n\n"
                        f"Reproduce: `{record['command']}`\n")
    click.echo(f"wrote {path}")


if __name__ == "__main__":
    main()
