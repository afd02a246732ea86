"""What every benchmark shares: a description of the machine it ran on, its measured peak, and latency percentiles."""
from __future__ import annotations

import os
import platform
import re
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

import click
import numpy as np
import redis
import torch

REPO = Path(__file__).resolve().parents[1]
RESULTS = REPO / "benchmarks" / "results"


def machine(device: torch.device) -> dict:
    """CPU model and core count, instruction sets that decide CPU speed, GPU name, software."""
    cpu, flags = platform.processor() or platform.machine(), set()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
            elif line.startswith("flags"):
                flags = set(line.split(":", 1)[1].split())
    except OSError:
        pass
    out = {"cpu": cpu, "cores": len(os.sched_getaffinity(0)),  # those this process may use (taskset), not the host's
           "torch_threads": torch.get_num_threads(),
           "cpu_features": sorted(f for f in flags if f in {"avx2", "fma", "avx512f", "avx512_bf16", "amx_bf16",
                                                             "avx512_vnni", "avx_vnni"}),
           "torch": torch.__version__, "device": str(device),
           "python": platform.python_version(), "os": platform.platform()}
    if device.type == "cuda":
        out["gpu"] = torch.cuda.get_device_name(device)
    return out


def device_label(info: dict) -> str:
    """The `summary.device` string: the GPU name, else the CPU model and its core count."""
    return info.get("gpu") or f"{info['cpu']} ({info['cores']} cores)"


def peak_gflops(device: torch.device, dtype: torch.dtype, tf32: bool = False) -> float:
    """Best of several 4096^2 (GPU) or 2048^2 (CPU) matrix products and, on CPU, 1x1 convolutions of
    the same arithmetic, after a warm-up each. The convolution is there because PyTorch's CPU matrix
    product can go through a library that picks a slower code path on some CPUs (measured on an
    AVX-512 EPYC: 226 GFLOP/s for the product, while oneDNN's convolutions ran at 391), and a peak
    below what the networks reach would overstate every "% of peak". `tf32`: float32 products on a
    GPU's TF32 units (PyTorch's matrix products default to full float32, its cuDNN convolutions to TF32)."""
    n = 4096 if device.type == "cuda" else 2048
    a = torch.randn(n, n, device=device, dtype=dtype)
    candidates = [lambda: a @ a]
    if device.type == "cpu":  # (1, n, 32, n/32) through a 1x1 conv of n -> n channels: 2 n^3 FLOP as well
        x = torch.randn(1, n, 32, n // 32, dtype=dtype)
        w = torch.randn(n, n, 1, 1, dtype=dtype)
        candidates.append(lambda: torch.nn.functional.conv2d(x, w))
    best, allowed = float("inf"), torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = tf32
    try:
        for op in candidates:
            op()
            for _ in range(10):
                sync(device)
                t = time.perf_counter()
                op()
                sync(device)
                best = min(best, time.perf_counter() - t)
    finally:
        torch.backends.cuda.matmul.allow_tf32 = allowed
    return 2 * n ** 3 / best / 1e9


def memory_gbps(device: torch.device) -> float:
    """Best of several copies of a 256 MiB float32 tensor, in GB/s read plus written. The FFT path
    is bound by memory more than by arithmetic, and on a shared machine the bandwidth left to it
    varies while the matrix-product peak does not (engines_cpu_avx2_tiles*.json: 1.55x and 2.05x
    the naive baseline in two runs of one day at the same peak)."""
    src = torch.ones(2 ** 26, device=device)
    dst = torch.empty_like(src)
    best = float("inf")
    for _ in range(6):
        sync(device)
        t = time.perf_counter()
        dst.copy_(src)
        sync(device)
        best = min(best, time.perf_counter() - t)
    return 2 * src.numel() * src.element_size() / best / 1e9


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def percentiles(values: list[float]) -> dict:
    if not values:
        return {}
    a = np.asarray(values)
    return {"p50": float(np.percentile(a, 50)), "p95": float(np.percentile(a, 95)),
            "p99": float(np.percentile(a, 99)), "mean": float(a.mean()), "n": int(a.size)}


def every_kth_per_type(samples: list, k: int) -> list:
    """Every k-th test sample of each defect type (and of good): a smaller test set with the same mix."""
    return [s for d in sorted({s.defect for s in samples}) for s in [t for t in samples if t.defect == d][::k]]


def free_port() -> int:
    """A TCP port free on 127.0.0.1 now (for a server a benchmark starts)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_redis(folder: Path) -> tuple[subprocess.Popen, str]:
    """A redis-server on a free loopback port, without persistence, in `folder`: (process, URL)."""
    exe = shutil.which("redis-server")
    if exe is None:
        raise click.ClickException("no redis-server on PATH; install it or pass --redis-url")
    port = free_port()
    proc = subprocess.Popen([exe, "--port", str(port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no",
                             "--dir", str(folder)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    url = f"redis://127.0.0.1:{port}/0"
    for _ in range(200):
        try:
            redis.Redis.from_url(url).ping()
            return proc, url
        except redis.ConnectionError:
            time.sleep(0.05)
    proc.kill()
    raise click.ClickException("redis-server did not start")


def judging_frames_of(model: Path, height: int, width: int, folder: Path) -> Path:
    """A copy of MODEL in FOLDER that also judges frames of this shape. A worker benchmark's frames are
    synthetic squares of its chosen size, which a worker serving the model as trained would dead-letter
    `unexpected_shape` (engines.frame_shapes) and so time dead-lettering, not scoring."""
    from ustudents.engines.bundle import load_bundle, update_manifest
    from ustudents.engines.frame_shapes import FrameShapes

    copy = Path(shutil.copytree(model, folder / Path(model).resolve().name))
    known = FrameShapes.of([(height, width)]).union(load_bundle(copy).frame_shapes)
    update_manifest(copy, frame_shapes=known.to_json())
    return copy


def wait_ready(port: int, worker: subprocess.Popen, log: Path, timeout_s: float = 300.0) -> None:
    """Until the worker started on `port` answers /readyz 200; its log's tail if it exits or does not in time."""
    import urllib.request

    deadline = time.monotonic() + timeout_s
    while True:
        try:
            if urllib.request.urlopen(f"http://127.0.0.1:{port}/readyz", timeout=1).status == 200:
                return
        except OSError:
            pass
        if worker.poll() is not None or time.monotonic() > deadline:
            raise click.ClickException(f"the worker did not get ready: {log.read_text()[-2000:]}")
        time.sleep(0.1)


def rss_bytes(pid: int, field: str = "VmRSS") -> int:
    """A process's resident memory now (VmRSS) or at its peak so far (VmHWM), from /proc."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(f"{field}:"):
            return int(line.split()[1]) * 1024
    return 0


def free_result_name(ctx, param, name: str) -> str:
    """--name of every benchmark, checked before any work: a file name not yet in benchmarks/results/.
    A default name wrote over the committed result README cites (README's own command did), in silence."""
    if ctx.params.get("config") or ctx.params.get("child"):  # a benchmark's child process (eager): it writes none
        return name
    if not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9_.-]*", name):
        raise click.BadParameter(f"{name!r}: give a file name (letters, digits, '_', '.', '-'), no folder")
    taken = next((f for f in (RESULTS / f"{name}.json", RESULTS / f"{name}.md") if f.exists()), None)
    if taken is not None:
        raise click.BadParameter(f"{name!r}: {taken} exists (a committed result?); give another --name, or delete "
                                 "it to measure again under this one")
    return name


name_option = click.option("--name", required=True, callback=free_result_name,
                           help="Result file name under benchmarks/results/ (a new one: none is replaced).")


def check_redis(url: str) -> None:
    """--redis-url answers, checked before any work: a worker waits for a Redis it cannot reach,
    healthy and never ready, and the benchmark with it."""
    from ustudents.engines.cli import InputError

    try:
        redis.Redis.from_url(url, socket_connect_timeout=5).ping()
    except (redis.RedisError, ValueError) as err:
        raise InputError(f"--redis-url {url}: cannot reach Redis ({err}); start it, or give another") from None


def one_line_errors(fn):
    """A benchmark's bad input (a folder that is no bundle, a backend or device not here, a Redis not
    reached) as one line and exit 2, as the ustudents commands give it, not a traceback."""
    from ustudents.engines.bundle import BundleError
    from ustudents.engines.cli import user_errors_for
    from ustudents.engines.images import ImageError
    from ustudents.engines.runtime import EngineError
    from ustudents.train.dataset import DatasetError

    return user_errors_for((BundleError, EngineError, ImageError, DatasetError, redis.ConnectionError))(fn)


def write_result(name: str, record: dict, markdown: str) -> Path:
    """benchmarks/results/<name>.json (the record) and <name>.md (the summary); returns the JSON path."""
    import json

    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / f"{name}.json").write_text(json.dumps(record, indent=2) + "\n")
    (RESULTS / f"{name}.md").write_text(markdown)
    return RESULTS / f"{name}.json"


def write_layer_result(name: str, title: str, table: str, fields: dict, bandwidth: list[float], size: int,
                       rounds: int, note: str = "") -> None:
    """Record, print and write a per-layer CPU timing of the 3-scale model's FFT layers (fft_tiles.py,
    fftconv_ab.py): the machine, the memory bandwidth before and after, the settings and `fields`."""
    info = machine(torch.device("cpu"))
    record = {"machine": info, "image_size": size, "students": 3, "rounds": rounds, **fields,
              "memory_gb_per_s": {"before": bandwidth[0], "after": bandwidth[1]},
              "weights": "random (speed does not depend on them)",
              "command": f"python benchmarks/{Path(sys.argv[0]).name} " + " ".join(sys.argv[1:])}
    print(table)
    path = write_result(name, record,
        f"# {title}\n\nMachine: {device_label(info)}, {', '.join(info['cpu_features'])}; torch {info['torch']}; "
        f"memory copy {bandwidth[0]:.1f} / {bandwidth[1]:.1f} GB/s before / after. {size} px, M=3 (4 groups); "
        f"median of {rounds} alternating rounds{note}.\n\n```\n{table}\n```\n\nReproduce: `{record['command']}`\n")
    print(f"wrote {path}")


def validation_samples(manifest: dict, data_root: Path) -> list:
    """The bundle's validation images: train/good split as its training split it (the images it was
    calibrated on, never trained on)."""
    from ustudents.train import dataset

    training = manifest["training"]
    _, val = dataset.split_train_val(dataset.train_samples(data_root, manifest["category"]),
                                     training["val_fraction"], training["student"]["seed"])
    return val


def validation_and_test_maps(engine, data_root: Path, test_every: int = 1) -> dict:
    """A bundle's maps on the validation images it was calibrated on (its training split of
    train/good, never the test set) and on every k-th test image of each type: fused (N, S, S) and
    per-scale (N, n_scales, S, S) maps, with the samples, ground-truth masks, defect regions and labels."""
    from ustudents.train import dataset
    from ustudents.train.evaluate import engine_maps

    manifest, size = engine.bundle.manifest, engine.image_size
    val = validation_samples(manifest, data_root)
    test = every_kth_per_type(dataset.test_samples(data_root, manifest["category"]), test_every)
    bits = engine.bundle.uint16_bits  # 16-bit data scaled as training and evaluation scale it
    val_fused, val_scales = engine_maps(engine, dataset.load_images(val, size, bits=bits), desc="validation maps")
    test_fused, test_scales = engine_maps(engine, dataset.load_images(test, size, bits=bits), desc="test maps")
    regions = dataset.load_regions(test, size)  # for PRO; gt: the masks
    return {"val": val, "test": test, "gt": regions > 0, "regions": regions,
            "labels": np.array([s.defect != dataset.GOOD for s in test]),
            "val_fused": val_fused, "val_scales": val_scales, "test_fused": test_fused, "test_scales": test_scales}


def position_standardized(test: np.ndarray, val: np.ndarray) -> np.ndarray:
    """Each pixel position standardized by the validation maps' mean and std there (as the product's
    position_z_max score and position_z mask do: calibrate.position_statistics)."""
    from ustudents.train.calibrate import position_statistics

    mean, std = position_statistics(val)
    return (test - mean) / std
