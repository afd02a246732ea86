"""Inference speed of every backend and precision against the naive baseline, in one run.

    python benchmarks/engines.py                       # CPU: 3-scale model and each scale at 256 px
    python benchmarks/engines.py --device cuda --batches 1,8 --precisions fp32,bf16,fp16 --repeats 200 \
        --cuda-graphs on,off

Per configuration (backend, precision, batch, scales): frames/s, p50/p99 latency of a batch (frame
in -> map out at the frame's size: normalization, the networks, the scoring head, the thresholds;
resizing too where --frame-size differs from the model's size, which by default it does not),
achieved GFLOP/s against the machine's measured peak (a large matrix product), and peak memory.
GFLOP/s counts the direct convolutions' operations: a configuration computing them another way
(the CPU's FFT convolutions) does fewer, so its "% of peak" can pass 100; int8 rows are set
against the fp32 peak, the naive baseline on a GPU against the TF32 peak (it runs with TF32).
The naive baseline is what a reference implementation does: every network of every scale run one
after another in plain PyTorch fp32, frame by frame; every speed is also given as a ratio to it.

Weights are random (speed does not depend on them); the FLOP count is the convolutions' multiply-
adds x 2, counted by PyTorch's FlopCounterMode. On CPU each configuration runs in its own process, so
its peak resident memory is its own; for onnxruntime that process also builds the engine (export and
parity check against PyTorch), which the peak includes. On a GPU the configurations run one after
another in one process (a CUDA start per configuration would cost more device time than the
timings), each with its own peak of allocated GPU memory; the naive baseline runs with PyTorch's
default cuDNN settings (no algorithm search; TF32 allowed, as PyTorch ships), whatever the engines
before it set. The machine's memory bandwidth (a large copy) is recorded before and after the
configurations: the CPU FFT path's speed follows it.
Writes benchmarks/results/engines_<device>.json and a .md table.
"""
from __future__ import annotations

import gc
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

from common import device_label, machine, memory_gbps, name_option, one_line_errors, peak_gflops, percentiles, sync, write_result  # noqa: E402
from ustudents.engines.bundle import load_bundle, write_bundle  # noqa: E402
from ustudents.engines.model import AnomalyModel, normalize_input  # noqa: E402
from ustudents.engines.patchnet import PatchNet, split  # noqa: E402
from ustudents.engines.runtime import Engine, load_engine, resolve_device  # noqa: E402
from ustudents.engines.scoring import (ScoreStats, fuse, predictive_variance, regression_error,  # noqa: E402
                                       scale_score, standardize)

STUDENTS = 3
MIN_BATCHES = 10  # timed batches per configuration at least, whatever --seconds says


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
        nets[ens.p] = [PatchNet(ens.p, alignment=bundle.alignment).eval().to(device) for _ in parts]
        for net, state in zip(nets[ens.p], parts):
            net.load_state_dict(state)
    model.to(device)

    def run(x: torch.Tensor):
        x = normalize_input(x)
        maps = []
        # PyTorch's defaults, whatever an engine timed before in this process set
        with torch.backends.cudnn.flags(enabled=True, benchmark=False, deterministic=False, allow_tf32=True):
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
    if "fft_chunk_mb" in cfg:
        from ustudents.engines import fftconv
        fftconv.CHUNK_BYTES = cfg["fft_chunk_mb"] * 2 ** 20
    plan = PlanLog()  # what the engine's first batch measured and chose (PatchNet's planning log lines)
    logging.getLogger("ustudents.engines.patchnet").addHandler(plan)
    logging.getLogger("ustudents.engines.patchnet").setLevel(logging.INFO)
    with tempfile.TemporaryDirectory() as tmp:
        path = random_bundle(Path(tmp), cfg["scales"], cfg["size"])
        if cfg["backend"] == "naive":
            bundle = load_bundle(path)
            engine = Engine(bundle, naive_runner(bundle, device), "naive", "fp32", device, max_batch=1)
        else:
            if cfg["backend"] in ("onnxruntime", "tensorrt"):  # a TensorRT plan is built from the ONNX engine
                from ustudents.engines.onnx_engine import build_onnx
                calibration = frames_for(cfg["size"], 4, seed=1) if cfg["precision"] == "int8" else None
                build_onnx(load_bundle(path), cfg["precision"], calibration=calibration)
            if cfg["backend"] == "tensorrt":
                from ustudents.engines.tensorrt_build import build_tensorrt
                build_tensorrt(load_bundle(path), cfg["precision"], cfg["batch"])
            engine = load_engine(path, cfg["backend"], device, cfg["precision"], max_batch=cfg["batch"],
                                 cuda_graphs=cfg.get("graphs", True))
        frames = frames_for(cfg.get("frame_size", cfg["size"]), cfg["batch"])
        started = time.perf_counter()
        engine.predict(frames)  # warm-up: allocations, kernel selection, the forms' plan, graph capture
        first_s = time.perf_counter() - started
        for _ in range(2 if device.type == "cuda" else 0):
            engine.predict(frames)
        if device.type == "cuda":  # the first call's (plans, cuDNN's search) apart from serving's
            first_peak = torch.cuda.max_memory_allocated(device) / 2 ** 20
            torch.cuda.reset_peak_memory_stats(device)
        lat = []
        while len(lat) < cfg["batches"] and (len(lat) < MIN_BATCHES or sum(lat) < cfg.get("seconds", float("inf"))):
            sync(device)
            t = time.perf_counter()
            engine.predict(frames)
            sync(device)
            lat.append(time.perf_counter() - t)
        logging.getLogger("ustudents.engines.patchnet").removeHandler(plan)
        del engine
    out = {"latency_ms": {k: v * 1e3 if k != "n" else v for k, v in percentiles(lat).items()},
           "frames_per_s": cfg["batch"] * len(lat) / sum(lat), "first_call_s": first_s,
           "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 / 1e6}  # Linux: KiB
    if plan.lines:
        out["plan"] = plan.lines
    if device.type == "cuda":
        out["peak_gpu_mb"] = torch.cuda.max_memory_allocated(device) / 2 ** 20
        out["peak_gpu_mb_first_call"] = first_peak
        gc.collect()
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)
    return out


def run_one(cfg: dict) -> dict:
    """A configuration in a process of its own on CPU; on a GPU in this one (module docstring)."""
    if not cfg["device"].startswith("cuda"):
        return in_subprocess(cfg)
    try:
        return run_config(cfg)
    except Exception as exc:  # noqa: BLE001  (one failing configuration must not lose the others' timings)
        logging.getLogger(__name__).exception("configuration %s failed", cfg)
        gc.collect()
        torch.cuda.empty_cache()
        return {"error": f"{type(exc).__name__}: {exc}"}


def in_subprocess(cfg: dict) -> dict:
    proc = subprocess.run([sys.executable, __file__, "--config", json.dumps(cfg), "--name", "child"], capture_output=True,
                          text=True)
    if proc.returncode != 0:
        return {"error": proc.stderr.strip().splitlines()[-1] if proc.stderr.strip() else f"exit {proc.returncode}"}
    return json.loads(proc.stdout.strip().splitlines()[-1])


def listed(value: str, choices: tuple[str, ...] | None) -> str:
    """A comma-separated option, each item one of `choices` (None: a whole number from 1): an unknown
    backend was passed over in silence, and a batch 'a' ended in a traceback."""
    items = value.split(",")
    good = [i.isdigit() and int(i) >= 1 for i in items] if choices is None else [i in choices for i in items]
    if not all(good):
        raise click.BadParameter(f"{value!r}: give a comma-separated list of "
                                 f"{'whole numbers from 1' if choices is None else ', '.join(choices)}")
    return value


@click.command()
@click.option("--device", default="cpu", show_default=True)
@click.option("--image-size", "size", default=256, show_default=True, type=click.IntRange(min=64),
              help="The model's side (64 and up, as ustudents-train takes).")
@click.option("--frame-size", "frame_size", default=None, type=click.IntRange(min=1),
              help="Side of the square frames fed in; a size other than --image-size times the engine's resize "
                   "in and the map's resize back too.  [default: --image-size]")
@click.option("--batches", default="1,2", show_default=True, callback=lambda c, p, v: listed(v, None),
              help="Batch sizes to time.")
@click.option("--backends", default="torch,onnxruntime", show_default=True,
              callback=lambda c, p, v: listed(v, ("torch", "onnxruntime", "tensorrt")))
@click.option("--precisions", default="fp32,bf16,int8", show_default=True,
              callback=lambda c, p, v: listed(v, ("fp32", "bf16", "fp16", "int8")),
              help="Tried per backend where it applies (bf16: torch with native support; fp16: CUDA only; "
                   "int8: onnxruntime and tensorrt, calibrated on random frames).")
@click.option("--repeats", default=3, show_default=True, help="Timed batches per configuration (after one warm-up).")
@click.option("--seconds", default=None, type=float,
              help="Stop timing a configuration after this many seconds (at least 10 batches): a slow "
                   "configuration gets fewer than --repeats.")
@click.option("--per-scale/--no-per-scale", default=True, show_default=True,
              help="Also time each scale alone (torch in fp32 and, where native, bf16; batch 1; against its own "
                   "naive baseline).")
@click.option("--cuda-graphs", "graphs", default="on", show_default=True,
              help="GPU: time the torch backend with CUDA graphs (on), without (off), or both (on,off).")
@click.option("--fft-chunk-mb", "chunk_mb", default=None, type=click.IntRange(min=1),
              help="Cap the CPU FFT convolutions' complex intermediates at this many MB each (fftconv.CHUNK_BYTES), "
                   "to time the cap against memory.  [default: the code's]")
@name_option
@click.option("--from-log", "from_log", type=click.Path(exists=True, path_type=Path), default=None,
              help="Write the result from the log of a run that a time limit cut short (its configurations' "
                   "lines), instead of running; --cuda-graphs says what its torch rows used, --name names it.")
@click.option("--machine-from", "machine_from", type=click.Path(exists=True, path_type=Path), default=None,
              help="With --from-log, for logs without a machine line: a result JSON from the same run's machine.")
@click.option("--config", default=None, hidden=True, is_eager=True)  # before --name: a child writes no result
@one_line_errors
def main(device, size, frame_size, batches, backends, precisions, repeats, seconds, per_scale, graphs, chunk_mb, name,
         from_log, machine_from, config):
    if config:  # child process: one configuration
        print(json.dumps(run_config(json.loads(config))))
        return
    if from_log:
        info, rows = rows_from_log(from_log, graphs == "on")
        info = info or json.loads(machine_from.read_text())["machine"]
        repeats = max((r["latency_ms"]["n"] for r in rows if "latency_ms" in r), default=0)
        write_record(name or from_log.stem, rows, info, {}, [], size, repeats, "cuda" if "gpu" in info else "cpu",
                     note=f"Rebuilt from the log {from_log.name} (committed beside this file): the run was cut by its "
                          "time limit before it wrote its result; the machine's peak and bandwidth were not kept.")
        return
    dev = resolve_device(device)
    info = machine(dev)
    frame_size = frame_size or size
    from ustudents.engines.runtime import native_bf16
    dtypes = {"fp32": torch.float32}
    if native_bf16(dev):
        dtypes["bf16"] = torch.bfloat16
    if dev.type == "cuda":
        dtypes["fp16"] = torch.float16
    # Measured before and after the configurations, keeping the higher: on a shared (virtual)
    # machine one measurement can catch a slow moment and overstate every "% of peak".
    peak = {k: peak_gflops(dev, t) for k, t in dtypes.items()}
    if dev.type == "cuda":  # the naive baseline runs with TF32, as PyTorch's cuDNN default allows
        peak["tf32"] = peak_gflops(dev, torch.float32, tf32=True)
    bandwidth = [memory_gbps(dev)]  # before and after: the FFT path's speed follows it
    full = [17, 33, 65]
    todo = [dict(backend="naive", precision="fp32", batch=1, scales=full)]
    for backend in backends.split(","):
        for precision in precisions.split(","):
            if precision == "bf16" and (backend != "torch" or "bf16" not in peak):
                continue
            if precision == "int8" and backend not in ("onnxruntime", "tensorrt"):
                continue
            if precision == "fp16" and dev.type != "cuda":
                continue
            for b in map(int, batches.split(",")):
                for graphed in ([g == "on" for g in graphs.split(",")] if backend == "torch" and dev.type == "cuda"
                                else [False]):
                    todo.append(dict(backend=backend, precision=precision, batch=b, scales=full, graphs=graphed))
    if per_scale:
        torch_precisions = [q for q in precisions.split(",") if q in peak]
        for p in full:
            todo += [dict(backend="naive", precision="fp32", batch=1, scales=[p])]
            todo += [dict(backend="torch", precision=q, batch=1, scales=[p],
                          graphs=dev.type == "cuda" and graphs.split(",")[0] == "on")
                     for q in torch_precisions]
    rows = []
    name = name or f"engines_{dev.type}"
    click.echo("machine: " + json.dumps(info))
    for cfg in todo:
        cfg.update(device=str(dev), size=size, frame_size=frame_size, batches=repeats,
                   **({"seconds": seconds} if seconds else {}), **({"fft_chunk_mb": chunk_mb} if chunk_mb else {}))
        graphed = f" graphs {'on' if cfg['graphs'] else 'off'}" if "graphs" in cfg and dev.type == "cuda" else ""
        click.echo(f"running {cfg['backend']} {cfg['precision']} batch {cfg['batch']} scales {cfg['scales']}{graphed} ...")
        res = run_one(cfg)
        # each result as it comes: a run cut short by a time limit leaves its numbers in the log (--from-log)
        click.echo("  -> " + json.dumps(res))
        rows.append({**{k: cfg[k] for k in ("backend", "precision", "batch", "scales", "graphs") if k in cfg}, **res})
        # and in the result file, rewritten after every configuration
        write_record(name, rows, info, peak, bandwidth, size, repeats, dev.type, quiet=True, frame_size=frame_size)
    peak = {k: max(v, peak_gflops(dev, dtypes.get(k, torch.float32), tf32=k == "tf32")) for k, v in peak.items()}
    bandwidth.append(memory_gbps(dev))
    write_record(name, rows, info, peak, bandwidth, size, repeats, dev.type, frame_size=frame_size)


def rows_from_log(log: Path, graphs: bool) -> tuple[dict | None, list[dict]]:
    """The machine line and the configurations' results of a run's log ("running ..." then "  -> {...}"),
    for a run that a time limit cut before it wrote its result. `graphs`: whether the GPU's torch
    configurations used CUDA graphs, for logs from before the running lines said so."""
    info, rows, cfg = None, [], None
    for line in log.read_text().splitlines():
        if line.startswith("machine: "):
            info = json.loads(line[len("machine: "):])
        elif line.startswith("running "):
            words = line.split()
            cfg = {"backend": words[1], "precision": words[2], "batch": int(words[4]),
                   "scales": json.loads(line[line.index("["):line.index("]") + 1]),
                   "graphs": ("graphs on" in line) if " graphs " in line else graphs and words[1] == "torch"}
        elif line.startswith("  -> ") and cfg is not None:
            row = {**cfg, **json.loads(line[len("  -> "):])}
            if "peak_gpu_mb" in row and "peak_gpu_mb_first_call" not in row:  # logs of before the split
                row["peak_gpu_mb_first_call"] = row.pop("peak_gpu_mb")  # the peak then included the first call
            rows.append(row)
            cfg = None
    return info, rows


def write_record(name: str, rows: list[dict], info: dict, peak: dict, bandwidth: list, size: int, repeats: int,
                 device_type: str, note: str | None = None, quiet: bool = False, frame_size: int | None = None) -> None:
    """Derived figures (GFLOP/s, % of the measured peak, speed-up against the naive baseline of the
    same scales), the summary of the fastest 3-scale configuration, the JSON and the table.
    `bandwidth`: the copies measured so far (before the configurations, and after them once done)."""
    full, frame_size = [17, 33, 65], frame_size or size
    flops = {tuple(s): flops_per_frame(list(s), size) for s in {tuple(r["scales"]) for r in rows}}
    for r in rows:
        if "error" in r:
            continue
        base = next((x for x in rows if x["backend"] == "naive" and x["scales"] == r["scales"] and "error" not in x), None)
        r["gflop_per_frame"] = flops[tuple(r["scales"])] / 1e9
        r["gflop_per_s"] = r["gflop_per_frame"] * r["frames_per_s"]
        kind = "tf32" if r["backend"] == "naive" and "tf32" in peak else r["precision"]
        rate = peak.get(kind, peak.get("fp32")) if peak else None
        r["pct_of_peak"] = 100 * r["gflop_per_s"] / rate if rate else None
        r["speedup_vs_naive"] = r["frames_per_s"] / base["frames_per_s"] if base else None
    ok = [r for r in rows if "error" not in r and r["scales"] == full and r["backend"] != "naive"]
    best = max(ok, key=lambda r: r["frames_per_s"]) if ok else None
    summary = None if best is None else {
        "device": device_label(info), "backend": best["backend"], "precision": best["precision"],
        "batch": best["batch"], "frames_per_s": best["frames_per_s"], "p99_ms": best["latency_ms"]["p99"],
        "speedup_vs_naive": best["speedup_vs_naive"], "image_size": size, "frame_size": frame_size,
        **({"cuda_graphs": best["graphs"]} if device_type == "cuda" else {})}
    record = {"summary": summary, "machine": info, "peak_gflop_per_s": peak,
              "memory_gb_per_s": dict(zip(("before", "after"), bandwidth)) or None,
              "frame_size": frame_size,
              "flop_count": "the direct convolutions' multiply-adds x 2 per frame; FFT rows do fewer operations, "
                            "int8 rows are set against the fp32 peak, a GPU's naive row against the TF32 peak",
              "students": STUDENTS, "repeats": repeats, "weights": "random (speed does not depend on them)",
              "results": rows, "command": "python benchmarks/engines.py " + " ".join(sys.argv[1:]),
              **({"note": note} if note else {})}
    table = format_rows(rows)
    copies = ", ".join(f"{v:.1f} GB/s {k}" for k, v in zip(("before", "after"), bandwidth))
    measured = (f"Measured peak GFLOP/s: {', '.join(f'{k} {v:.0f}' for k, v in peak.items())}; "
                f"memory copy {copies}. " if peak else "")
    path = write_result(name, record,
        f"# Engines: {name}\n\nMachine: {device_label(info)}, {', '.join(info['cpu_features'])}; "
        f"torch {info['torch']}. {measured}"
        f"{size}x{size} model, {frame_size}x{frame_size} frames, M={STUDENTS}, up to {repeats} "
        f"timed batches per row after a warm-up; latency = one batch, frame in to map out; GFLOP/s = the direct "
        f"convolutions' count x frames/s (FFT rows do fewer operations, so %peak can pass 100; int8 against "
        f"the fp32 peak{', the naive row against the TF32 peak' if device_type == 'cuda' else ''}); " + (
            "GPU MB = the configuration's peak of allocated GPU memory while serving (where a row has only "
            "`peak_gpu_mb_first_call`, its first call's included); `torch+graph` = CUDA graphs; the naive "
            "baseline with PyTorch's default cuDNN settings (TF32 allowed), the torch engine's fp32 without "
            "TF32.\n\n" if device_type == "cuda" else
            "RSS = the configuration's process peak (onnxruntime: building the engine included).\n\n") +
        (f"{note}\n\n" if note else "") +
        f"```\n{table}\n```\n\nReproduce: `{record['command']}`\n")
    if not quiet:
        click.echo(table)
        click.echo(f"wrote {path}")


def format_rows(rows: list[dict]) -> str:
    """The table: latency in ms with a decimal on a GPU; memory is the process's peak RSS on CPU and
    the configuration's peak of allocated GPU memory on a GPU. `torch+graph`: CUDA graphs."""
    gpu = any("peak_gpu_mb_first_call" in r for r in rows)
    ms, gf = (".1f", ".0f") if gpu else (".0f", ".1f")
    head = f"{'scales':<10}{'backend':<13}{'prec':<6}{'batch':>5}{'frames/s':>10}{'p50 ms':>10}{'p99 ms':>10}" \
           f"{'GFLOP/s':>9}{'%peak':>7}{'vs naive':>9}{'GPU MB' if gpu else 'RSS MB':>8}"
    lines = [head]
    for r in rows:
        label = "all" if len(r["scales"]) == 3 else f"p={r['scales'][0]}"
        backend = r["backend"] + ("+graph" if r.get("graphs") else "")
        if "error" in r:
            lines.append(f"{label:<10}{backend:<13}{r['precision']:<6}{r['batch']:>5}  error: {r['error']}")
            continue
        memory = r.get("peak_gpu_mb", r.get("peak_gpu_mb_first_call")) if gpu else r["peak_rss_mb"]
        lines.append(f"{label:<10}{backend:<13}{r['precision']:<6}{r['batch']:>5}{r['frames_per_s']:>10.3f}"
                     f"{r['latency_ms']['p50']:>10{ms}}{r['latency_ms']['p99']:>10{ms}}{r['gflop_per_s']:>9{gf}}"
                     f"{optional(r['pct_of_peak'], 7, '.1f')}{optional(r['speedup_vs_naive'], 9, '.2f')}{memory:>8.0f}")
    return "\n".join(lines)


def optional(value: float | None, width: int, spec: str) -> str:
    """A table cell: the number, or "-" where it is unknown (no naive row, no measured peak)."""
    return f"{'-':>{width}}" if value is None else f"{value:>{width}{spec}}"


if __name__ == "__main__":
    main()
