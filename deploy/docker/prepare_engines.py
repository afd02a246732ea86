"""GPU image start: a TensorRT plan for this GPU and TensorRT for every bundle the worker serves.

Reads USTUDENTS_MODEL (bundle directories, comma-separated; mounted read-only),
USTUDENTS_ENGINE_CACHE (a writable folder, a volume so builds survive restarts),
USTUDENTS_PRECISION, else USTUDENTS_ENGINE_PRECISION (the precision the worker runs: the entrypoint
sets USTUDENTS_PRECISION from USTUDENTS_ENGINE_PRECISION where it is unset; fp32 and fp16 plans are
built here, an int8 plan must come with the bundle, as it needs calibration images) and
USTUDENTS_BATCH (the worker's batch: the plan's largest batch). Run only for the TensorRT backend.
Prints the bundle directories the worker should serve, comma-separated: a bundle that already has a
usable plan as it is; otherwise its copy in the cache, into which `ustudents build-engines COPY
--backend tensorrt` has built one. Progress goes to stderr.

A copy in the cache is named after the bundle id, the GPU, the TensorRT version, the precision and
a hash of the source manifest: a cache shared by different GPUs never mixes plans, and a
recalibrated bundle (new statistics and threshold, which the plan's scoring head contains) never
reuses a plan built before. Older copies of the same bundle for the same GPU are removed.
Concurrent starts on one cache wait for each other (a lock per copy). Exit code 2 with one line
when a bundle is missing or the build fails.
"""
from __future__ import annotations

import fcntl
import hashlib
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Callable

DEFAULT_BATCH = 8
BUILT = ("fp32", "fp16")  # built at start; int8 only shipped in the bundle
PRECISIONS = BUILT + ("int8",)


class PrepareError(Exception):
    """Cannot give the worker a bundle with a plan; the message says what to do."""


def log(msg: str) -> None:
    print(f"prepare-engines: {msg}", file=sys.stderr, flush=True)


def has_plan(bundle_dir: Path, precision: str, max_batch: int) -> bool:
    """The runtime's own test, a TensorRT engine entry whose plan matches this GPU and TensorRT, for
    the precision the worker is to run and a batch as large as its own: a shipped fp16 plan must not
    stand in for fp32, nor one built for batches up to 8 serve a worker batching 16."""
    from ustudents.engines.bundle import load_bundle
    from ustudents.engines.runtime import find_engine

    entry = find_engine(load_bundle(bundle_dir), "tensorrt", precision)
    return entry is not None and entry["max_batch"] >= max_batch


def gpu_tag() -> str:
    """e.g. 'NVIDIA-H100-80GB-HBM3-sm90-trt10.3.0'."""
    import tensorrt
    import torch

    name = torch.cuda.get_device_name(0)
    major, minor = torch.cuda.get_device_capability(0)
    return f"{name}-sm{major}{minor}-trt{tensorrt.__version__}"


def build_plan(bundle_dir: Path, precision: str, max_batch: int) -> None:
    cmd = ["ustudents", "build-engines", str(bundle_dir), "--backend", "tensorrt",
           "--precision", precision, "--max-batch", str(max_batch)]
    log(" ".join(cmd))
    done = subprocess.run(cmd, stdout=sys.stderr)
    if done.returncode != 0:
        raise PrepareError(f"{bundle_dir}: `{' '.join(cmd)}` failed (exit {done.returncode}); see its output above")


def bundle_key(bundle_dir: Path) -> tuple[str, str]:
    """(bundle id, short hash of its manifest)."""
    import json

    try:
        raw = (bundle_dir / "manifest.json").read_bytes()
        return str(json.loads(raw)["id"]), hashlib.sha256(raw).hexdigest()[:12]
    except (OSError, ValueError, KeyError) as err:
        raise PrepareError(f"{bundle_dir}: not a model bundle ({err}); mount one (manifest.json + weights.safetensors)") from None


def slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]+", "-", text).strip("-")


def check_precision(precision: str) -> None:
    if precision not in PRECISIONS:
        raise PrepareError(f"precision {precision} (USTUDENTS_PRECISION, else USTUDENTS_ENGINE_PRECISION): TensorRT "
                           f"plans are one of {', '.join(PRECISIONS)}")


def prepare(model_dirs: list[Path], cache: Path, precision: str, max_batch: int, *,
            has_plan: Callable[[Path, str, int], bool] = has_plan, tag: Callable[[], str] = gpu_tag,
            build: Callable[[Path, str, int], None] = build_plan) -> list[Path]:
    check_precision(precision)
    served = []
    for src in model_dirs:
        ident, digest = bundle_key(src)
        if has_plan(src, precision, max_batch):
            log(f"{src}: has a TensorRT {precision} plan for this GPU and batch {max_batch}")
            served.append(src)
            continue
        if precision not in BUILT:
            raise PrepareError(f"{src}: no TensorRT {precision} plan for this GPU and batch {max_batch}, and int8 plans "
                               "are not built at start (they need calibration images): build one into the bundle "
                               f"(ustudents build-engines BUNDLE --backend tensorrt --precision int8 --max-batch "
                               f"{max_batch} --calibration-images DIR) or run fp16")
        cache.mkdir(parents=True, exist_ok=True)
        # the batch is in the key: a plan serves batches up to the max it was built for, so raising
        # USTUDENTS_BATCH must build a new one rather than quietly run at the old maximum
        family = slug(f"{ident}--{tag()}-{precision}-b{max_batch}") + "--"
        dst = cache / f"{family}{digest}"
        with open(cache / f".{dst.name}.lock", "w") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)  # another worker on this cache may be building it
            if dst.is_dir() and has_plan(dst, precision, max_batch):
                log(f"{src}: using the plan built earlier in {dst}")
            else:
                log(f"{src}: no TensorRT plan for this GPU; building one in {dst} (once; minutes)")
                tmp = cache / f".{dst.name}.partial"
                shutil.rmtree(tmp, ignore_errors=True)
                # not an interrupted command's leftovers (.*.partial), which may not even be readable here
                shutil.copytree(src, tmp, ignore=shutil.ignore_patterns(".*.partial"))
                for f in tmp.rglob("*"):  # the source may be a read-only mount: make the copy writable
                    f.chmod(f.stat().st_mode | 0o200)
                tmp.chmod(tmp.stat().st_mode | 0o200)
                build(tmp, precision, max_batch)
                if not has_plan(tmp, precision, max_batch):
                    raise PrepareError(f"{src}: `ustudents build-engines` finished but the runtime finds no usable "
                                       f"TensorRT plan in {tmp}")
                shutil.rmtree(dst, ignore_errors=True)
                os.replace(tmp, dst)
                for old in cache.glob(f"{family}*"):  # plans of earlier versions of this bundle
                    if old != dst and old.is_dir():
                        log(f"removing {old} (an earlier version of {ident})")
                        shutil.rmtree(old, ignore_errors=True)
        served.append(dst)
    return served


def serve_while_building():
    """The worker's endpoints during the build (minutes): /metrics up with ustudents_ready 0 and
    /healthz, /readyz 503 'starting: building TensorRT engines', so Prometheus sees a worker starting,
    not one down. Settings as the worker reads them (USTUDENTS_STREAM, _METRICS_PORT, _METRICS_HOST);
    None where they are incomplete or the port is taken (the worker reports that itself)."""
    from ustudents.worker.metrics import starting
    from ustudents.worker.settings import WorkerSettings

    try:
        s = WorkerSettings()
        return starting(s.stream, s.metrics_host, s.metrics_port, "building TensorRT engines") if s.metrics_port else None
    except (ValueError, OSError) as err:  # pydantic's ValidationError is a ValueError
        log(f"no metrics endpoint during the build ({str(err).splitlines()[0]})")
        return None


def main() -> int:
    models = [Path(p.strip()) for p in os.environ.get("USTUDENTS_MODEL", "").split(",") if p.strip()]
    try:
        if not models:
            raise PrepareError("USTUDENTS_MODEL is not set: give the bundle directory, e.g. /models/magnetic_tile")
        missing = [m for m in models if not m.is_dir()]
        if missing:
            raise PrepareError(f"{missing[0]}: no such bundle directory; check the model volume and USTUDENTS_MODEL")
        batch = os.environ.get("USTUDENTS_BATCH", str(DEFAULT_BATCH))
        if not batch.isdigit() or int(batch) < 1:
            raise PrepareError(f"USTUDENTS_BATCH={batch}: give a positive whole number")
        precision = os.environ.get("USTUDENTS_PRECISION") or os.environ.get("USTUDENTS_ENGINE_PRECISION", "fp32")
        check_precision(precision)  # before the endpoints: one line, not two
        server = serve_while_building()
        try:
            served = prepare(models, Path(os.environ.get("USTUDENTS_ENGINE_CACHE", "/var/cache/ustudents/engines")),
                             precision, int(batch))
        finally:
            if server:
                server.stop()  # the worker binds the port next
    except PrepareError as err:
        print(f"prepare-engines: {err}", file=sys.stderr)
        return 2
    print(",".join(str(p) for p in served))
    return 0


if __name__ == "__main__":
    sys.exit(main())
