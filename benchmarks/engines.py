"""Inference speed of every backend and precision against the naive baseline, in one run.

    python benchmarks/engines.py                       # CPU: 3-scale model and each scale at 256 px
    python benchmarks/engines.py --device cuda --batches 1,8,32 --precisions fp32,bf16,fp16

Per configuration (backend, precision, batch, scales): frames/s, p50/p99 latency of a batch (frame
in -> map out at the frame's size, resizing included), achieved GFLOP/s against the machine's
measured peak (a large matrix product), and peak memory. The naive baseline is what a reference
implementation does: every network of every scale run one after another in plain PyTorch fp32,
frame by frame; every speed is also given as a ratio to it.

Weights are random (speed does not depend on them); the FLOP count is the convolutions' multiply-
adds x 2, counted by PyTorch's FlopCounterMode. Each configuration runs in its own process, so its
peak resident memory is its own; for onnxruntime that process also builds the engine (export and
parity check against PyTorch), which the peak includes. The machine's memory bandwidth (a large
copy) is recorded before and after the configurations: the CPU FFT path's speed follows it.
Writes benchmarks/results/engines_<device>.json and a .md table.
"""
from __future__ import annotations

import json
import logging
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import click
import numpy as np

import ustudents  # noqa: F401  (first: sets THP_MEM_ALLOC_ENABLE before torch allocates, for every configuration alike)
import torch

from common import device_label, machine, memory_gbps, peak_gflops, percentiles, sync, write_result  # noqa: E402
from ustudents.engines.bundle import load_bundle, write_bundle  # noqa: E402
from ustudents.engines.model import AnomalyModel, normalize_input  # noqa: E402
from ustudents.engines.patchnet import PatchNet, split  # noqa: E402
from ustudents.engines.runtime import Engine, load_engine, resolve_device  # noqa: E402
from ustudents.engines.scoring import (ScoreStats, fuse, predictive_variance, regression_error,  # noqa: E402
                                       scale_score, standardize)

STUDENTS = 3


def random_bundle(folder: Path, scales: list[int], size: int) -> Path:
    """A loadable bundle with random weights and plausible statistics."""
    torch.manual_seed(0)
    tensors, stats = {}, {}
    for p in scales:
        for role, n in (("teacher", 1), ("students", STUDENTS)):
            for k, v in PatchNet(p, n).state_dict().items():
                tensors[f"{p}.{role}.{k}"] = v
        stats[str(p)] = {"desc_mean": [0.0] * 128, "desc_std": [1.0] * 128, "e_mu": 1.0, "e_sigma": 1.0,
                         "v_mu": 1.0, "v_sigma": 1.0}
    manifest = {"id": f"random-{'-'.join(map(str, scales))}", "category": "benchmark", "image_size": size,
                "scales": scales, "students": STUDENTS, "statistics": stats, "threshold": {"value": 3.0}}
    return write_bundle(folder / f"random-{'-'.join(map(str, scales))}", manifest, tensors)


def naive_runner(bundle, device: torch.device):
    """Each network of each scale separately, one after another, fp32; the same scoring formulas."""
    model = bundle.model()
    nets = {}
    for ens in model.ensembles:
        parts = split(ens.net.state_dict(), STUDENTS + 1)
        nets[ens.p] = [PatchNet(ens.p).eval().to(device) for _ in parts]
        for net, state in zip(nets[ens.p], parts):
            net.load_state_dict(state)
    model.to(device)

    def run(x: torch.Tensor):
        x = normalize_input(x)
        maps = []
        for ens in model.ensembles:
            out = [net.dense_image(x)[:, 0] for net in nets[ens.p]]
            y = standardize(out[0], ens.desc_mean, ens.desc_std)
            mu = torch.stack(out[1:], dim=1)
            e, v = regression_error(mu, y), predictive_variance(mu)
            maps.append(scale_score(e, v, ScoreStats(*ens.score_stats.unbind())))
        maps = torch.stack(maps, dim=1)
        return fuse(maps), maps
    return run


def flops_per_frame(scales: list[int], size: int) -> float:
    from torch.utils.flop_counter import FlopCounterMode

    model = AnomalyModel(scales, STUDENTS).to("meta")
    counter = FlopCounterMode(display=False)
    with counter, torch.no_grad():
        model(torch.empty(1, 3, size, size, device="meta"))
    return float(counter.get_total_flops())


def frames_for(size: int, n: int, seed: int = 0) -> list[np.ndarray]:
    rng = np.random.default_rng(seed)
    return [rng.integers(0, 256, (size, size, 3), dtype=np.uint8) for _ in range(n)]


class PlanLog(logging.Handler):
    def __init__(self):
        super().__init__(logging.INFO)
        self.lines: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.lines.append(record.getMessage())


def run_config(cfg: dict) -> dict:
    """One configuration, in this process: warm up, then time `batches` calls of engine.predict."""
    device = resolve_device(cfg["device"])
    plan = PlanLog()  # what the engine's first batch measured and chose (PatchNet's planning log lines)
    logging.getLogger("ustudents.engines.patchnet").addHandler(plan)
    logging.getLogger("ustudents.engines.patchnet").setLevel(logging.INFO)
    with tempfile.TemporaryDirectory() as tmp:
        path = random_bundle(Path(tmp), cfg["scales"], cfg["size"])
        if cfg["backend"] == "naive":
            bundle = load_bundle(path)
            engine = Engine(bundle, naive_runner(bundle, device), "naive", "fp32", device, max_batch=1)
        else:
            if cfg["backend"] == "onnxruntime":
                from ustudents.engines.onnx_engine import build_onnx
                calibration = frames_for(cfg["size"], 4, seed=1) if cfg["precision"] == "int8" else None
                build_onnx(load_bundle(path), cfg["precision"], max_batch=cfg["batch"], calibration=calibration)
            engine = load_engine(path, cfg["backend"], device, cfg["precision"], max_batch=cfg["batch"])
        frames = frames_for(cfg["size"], cfg["batch"])
        engine.predict(frames)  # warm-up: allocations, kernel selection
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)
        lat = []
        for _ in range(cfg["batches"]):
            sync(device)
            t = time.perf_counter()
            engine.predict(frames)
            sync(device)
            lat.append(time.perf_counter() - t)
    out = {"latency_ms": {k: v * 1e3 if k != "n" else v for k, v in percentiles(lat).items()},
           "frames_per_s": cfg["batch"] * len(lat) / sum(lat),
           "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}
    if plan.lines:
        out["plan"] = plan.lines
    if device.type == "cuda":
        out["peak_gpu_mb"] = torch.cuda.max_memory_allocated(device) / 2 ** 20
    return out


def in_subprocess(cfg: dict) -> dict:
    proc = subprocess.run([sys.executable, __file__, "--config", json.dumps(cfg)], capture_output=True, text=True)
    if proc.returncode != 0:
        return {"error": proc.stderr.strip().splitlines()[-1] if proc.stderr.strip() else f"exit {proc.returncode}"}
    return json.loads(proc.stdout.strip().splitlines()[-1])


@click.command()
@click.option("--device", default="cpu", show_default=True)
@click.option("--image-size", "size", default=256, show_default=True)
@click.option("--batches", default="1,2", show_default=True, help="Batch sizes to time.")
@click.option("--backends", default="torch,onnxruntime", show_default=True)
@click.option("--precisions", default="fp32,bf16,int8", show_default=True,
              help="Tried per backend where it applies (bf16: torch with native support; fp16: CUDA only; "
                   "int8: onnxruntime, calibrated on random frames).")
@click.option("--repeats", default=3, show_default=True, help="Timed batches per configuration (after one warm-up).")
@click.option("--per-scale/--no-per-scale", default=True, show_default=True,
              help="Also time each scale alone (torch in fp32 and, where native, bf16; batch 1; against its own "
                   "naive baseline).")
@click.option("--name", default=None, help="Result file name.  [default: engines_<device>]")
@click.option("--config", default=None, hidden=True)
def main(device, size, batches, backends, precisions, repeats, per_scale, name, config):
    if config:  # child process: one configuration
        print(json.dumps(run_config(json.loads(config))))
        return
    dev = resolve_device(device)
    info = machine(dev)
    from ustudents.engines.runtime import native_bf16
    dtypes = {"fp32": torch.float32}
    if native_bf16(dev):
        dtypes["bf16"] = torch.bfloat16
    if dev.type == "cuda":
        dtypes["fp16"] = torch.float16
    # Measured before and after the configurations, keeping the higher: on a shared (virtual)
    # machine one measurement can catch a slow moment and overstate every "% of peak".
    peak = {k: peak_gflops(dev, t) for k, t in dtypes.items()}
    bandwidth = [memory_gbps(dev)]  # before and after: the FFT path's speed follows it
    full = [17, 33, 65]
    todo = [dict(backend="naive", precision="fp32", batch=1, scales=full)]
    for backend in backends.split(","):
        for precision in precisions.split(","):
            if precision == "bf16" and (backend != "torch" or "bf16" not in peak):
                continue
            if precision == "int8" and backend != "onnxruntime":
                continue
            if precision == "fp16" and dev.type != "cuda":
                continue
            for b in map(int, batches.split(",")):
                todo.append(dict(backend=backend, precision=precision, batch=b, scales=full))
    if per_scale:
        torch_precisions = [q for q in precisions.split(",") if q == "fp32" or (q == "bf16" and "bf16" in peak)]
        for p in full:
            todo += [dict(backend="naive", precision="fp32", batch=1, scales=[p])]
            todo += [dict(backend="torch", precision=q, batch=1, scales=[p]) for q in torch_precisions]
    rows = []
    for cfg in todo:
        cfg.update(device=str(dev), size=size, batches=repeats)
        click.echo(f"running {cfg['backend']} {cfg['precision']} batch {cfg['batch']} scales {cfg['scales']} ...")
        res = in_subprocess(cfg)
        rows.append({**{k: cfg[k] for k in ("backend", "precision", "batch", "scales")}, **res})
    peak = {k: max(v, peak_gflops(dev, dtypes[k])) for k, v in peak.items()}
    bandwidth.append(memory_gbps(dev))
    flops = {tuple(s): flops_per_frame(list(s), size) for s in {tuple(r["scales"]) for r in rows}}
    for r in rows:
        if "error" in r:
            continue
        base = next(x for x in rows if x["backend"] == "naive" and x["scales"] == r["scales"])
        r["gflop_per_frame"] = flops[tuple(r["scales"])] / 1e9
        r["gflop_per_s"] = r["gflop_per_frame"] * r["frames_per_s"]
        r["pct_of_peak"] = 100 * r["gflop_per_s"] / peak.get(r["precision"], peak["fp32"])
        r["speedup_vs_naive"] = r["frames_per_s"] / base["frames_per_s"] if "frames_per_s" in base else None
    ok = [r for r in rows if "error" not in r and r["scales"] == full and r["backend"] != "naive"]
    best = max(ok, key=lambda r: r["frames_per_s"])
    record = {"summary": {"device": device_label(info), "backend": best["backend"], "precision": best["precision"],
                          "batch": best["batch"], "frames_per_s": best["frames_per_s"],
                          "p99_ms": best["latency_ms"]["p99"], "speedup_vs_naive": best["speedup_vs_naive"],
                          "image_size": size},
              "machine": info, "peak_gflop_per_s": peak,
              "memory_gb_per_s": {"before": bandwidth[0], "after": bandwidth[1]}, "students": STUDENTS, "repeats": repeats,
              "weights": "random (speed does not depend on them)", "results": rows,
              "command": "python benchmarks/engines.py " + " ".join(sys.argv[1:])}
    table = format_rows(rows)
    click.echo(table)
    path = write_result(name or f"engines_{dev.type}", record,
        f"# Engines: {name or f'engines_{dev.type}'}\n\nMachine: {device_label(info)}, {', '.join(info['cpu_features'])}; "
        f"torch {info['torch']}. Measured peak GFLOP/s: {', '.join(f'{k} {v:.0f}' for k, v in peak.items())}; "
        f"memory copy {bandwidth[0]:.1f} GB/s before, {bandwidth[1]:.1f} after. "
        f"{size}x{size} frames, M={STUDENTS}, {repeats} timed batches per row after a warm-up; "
        f"latency = one batch, frame in to map out; RSS = the configuration's process peak (onnxruntime: "
        f"building the engine included).\n\n"
        f"```\n{table}\n```\n\nReproduce: `{record['command']}`\n")
    click.echo(f"wrote {path}")


def format_rows(rows: list[dict]) -> str:
    head = f"{'scales':<10}{'backend':<13}{'prec':<6}{'batch':>5}{'frames/s':>10}{'p50 ms':>10}{'p99 ms':>10}" \
           f"{'GFLOP/s':>9}{'%peak':>7}{'vs naive':>9}{'RSS MB':>8}"
    lines = [head]
    for r in rows:
        label = "all" if len(r["scales"]) == 3 else f"p={r['scales'][0]}"
        if "error" in r:
            lines.append(f"{label:<10}{r['backend']:<13}{r['precision']:<6}{r['batch']:>5}  error: {r['error']}")
            continue
        lines.append(f"{label:<10}{r['backend']:<13}{r['precision']:<6}{r['batch']:>5}{r['frames_per_s']:>10.3f}"
                     f"{r['latency_ms']['p50']:>10.0f}{r['latency_ms']['p99']:>10.0f}{r['gflop_per_s']:>9.1f}"
                     f"{r['pct_of_peak']:>7.1f}{r['speedup_vs_naive']:>9.2f}{r['peak_rss_mb']:>8.0f}")
    return "\n".join(lines)


if __name__ == "__main__":
    main()
