"""Accuracy of a lower-precision engine against fp32 on real images: the commands a user runs, in order.

    python benchmarks/precision_accuracy.py --precision int8     # the shipped magnetic_tile sample, 64 px
    python benchmarks/precision_accuracy.py --precision bf16 --data-root DIR --image-size 128 --epochs 2
    python benchmarks/precision_accuracy.py --precision fp16 --model MODEL --data-root DIR --image-size 96

Trains a bundle (or takes --model), then evaluates the same test set with PyTorch fp32 and with the
lower precision: int8 is the ONNX Runtime engine (built calibrated on train/good, with its parity
check on test/good), bf16 the PyTorch backend (CPUs with native bfloat16, or CUDA), fp16 the
PyTorch backend on CUDA (networks cast to half, scoring head in fp32: runtime.torch_runner); on CPU, `--fp16 onnx` is the fp16 ONNX graph (networks in
half, scoring head in fp32: the graph a TensorRT fp16 plan is built from) under ONNX Runtime, with
its parity check on test/good, and `--fp16 emulated` the PyTorch networks with every weight and
every tensor between layers rounded to fp16, accumulating in fp32 (emulated_fp16_engine). Writes
benchmarks/results/<name>.json with both evaluations and the differences; the issue's bar for a lower-precision default is |au_pro_30 difference| <= 0.01.
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

from common import REPO, device_label, machine, name_option, one_line_errors, write_result  # noqa: E402

KEYS = ("au_pro_30", "image_auroc", "pixel_auroc")


def ustudents(*args) -> None:
    cmd = [sys.executable, "-c", "from ustudents.cli import main; main()", *map(str, args)]
    click.echo("$ ustudents " + " ".join(map(str, args)))
    subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL)


def emulated_fp16_engine(model: Path):
    """A CPU engine whose networks hold fp16 values and accumulate in fp32, as fp16 GPU kernels with
    fp32 accumulation do: every weight is rounded to fp16, and so is every convolution's input and
    output (so every tensor between layers: pools and LeakyReLU act on rounded values); the scoring
    head stays float32, as in the fp16 export. PyTorch's own fp16 convolutions run on this CPU, but
    about 50x slower than fp32 (measured: one 128 -> 256 5x5 layer on 4 x 64 x 64, 3.5 s against
    0.07 s), too slow for a test set; ONNX Runtime's CPU provider computes an fp16 graph's
    convolutions in float32 between casts, which rounds the weights and the graph's edges only."""
    from ustudents.engines.bundle import load_bundle
    from ustudents.engines.runtime import Engine, torch_runner

    bundle = load_bundle(model)
    net_model = bundle.model()
    for ens in net_model.ensembles:
        net = ens.net
        with torch.no_grad():
            for w in net.parameters():
                w.copy_(w.half().float())
        plain = net._conv
        net._conv = (lambda i, x, step, dense, plain=plain:
                     plain(i, x.half().float(), step, dense).half().float())
    runner = torch_runner(net_model, torch.device("cpu"), "fp32")
    net_model.use_fft(False)  # direct convolutions: the FFT's own rounding is not fp16's
    return Engine(bundle, runner, "torch", "fp16-emulated", torch.device("cpu"), max_batch=4,
                  prep_device=torch.device("cpu"))


@click.command()
@click.option("--precision", type=click.Choice(["int8", "bf16", "fp16"]), default="int8", show_default=True)
@click.option("--device", default="cpu", show_default=True)
@click.option("--data-root", type=click.Path(path_type=Path), default=REPO / "ustudents" / "demo_data", show_default=True)
@click.option("--category", default="magnetic_tile", show_default=True)
@click.option("--model", type=click.Path(path_type=Path), default=None, help="An existing bundle (skips training).")
@click.option("--image-size", default=64, show_default=True, help="Of the model trained here (--model: its own).")
@click.option("--epochs", default=10, show_default=True)
@click.option("--crop", default=16, show_default=True)
@click.option("--batch", default=4, show_default=True)
@click.option("--amp", default="off", show_default=True, help="Training autocast (ustudents train --amp).")
@click.option("--fp16", "fp16_mode", type=click.Choice(["onnx", "emulated"]), default="onnx", show_default=True,
              help="fp16 on CPU: the fp16 ONNX graph under ONNX Runtime, or fp16 values emulated in PyTorch.")
@name_option
@one_line_errors
def main(precision, device, data_root, category, model, image_size, epochs, crop, batch, amp, fp16_mode, name):
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
        image_size = json.loads((Path(model) / "manifest.json").read_text())["image_size"]  # --model's own, not the flag
        # the torch backend serves fp16 on CUDA only; on CPU fp16 is the ONNX graph or the emulation
        cpu_fp16 = precision == "fp16" and torch.device(device).type != "cuda"
        emulated = cpu_fp16 and fp16_mode == "emulated"
        onnx = precision == "int8" or (cpu_fp16 and not emulated)
        low_backend = "onnxruntime" if onnx else "torch (fp16 emulated)" if emulated else "torch"
        if onnx:
            calibrate = ("--calibration-images", cat / "train" / "good") if precision == "int8" else ()
            ustudents("build-engines", model, "--precision", precision, *calibrate, "--check-images", cat / "test" / "good")
            entry = next(e for e in json.loads((model / "manifest.json").read_text())["engines"]
                         if e["precision"] == precision)
            parity, calibration = entry["parity"], entry.get("calibration")
        runs, eval_s = {}, {}
        for backend, prec in (("torch", "fp32"), (low_backend, precision)):
            out = Path(tmp) / f"{prec}.json"
            start = time.time()
            if emulated and prec == "fp16":
                from ustudents.train.evaluate import evaluate
                click.echo("$ (in process) evaluate with the fp16-emulated PyTorch engine")
                out.write_text(json.dumps(evaluate(emulated_fp16_engine(model), data_root, log=click.echo)))
            else:
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
