"""ONNX engines: export the fused multi-scale model into the bundle, check it under ONNX Runtime
against PyTorch, and run it.

An engine file is `<bundle>/engines/model-<precision>.onnx`, listed in the manifest's `engines`
with its checksum and the parity measured when it was built (no batch limit: its batch axis is
dynamic, and ONNX Runtime runs any batch):

    {"backend": "onnx", "precision": "fp32", "file": "engines/model-fp32.onnx", "sha256": ...,
     "image_size": 256, "parity": {"max_abs_diff": ..., "tolerance": ..., ...}}

Precisions: fp32; fp16 as a mixed-precision graph (networks in fp16, the scoring head in fp32),
the form a strongly typed TensorRT network builds from unchanged; int8 as explicit quantize/
dequantize nodes around every convolution, calibrated on good images (`quantize`).
"""
from __future__ import annotations

import copy
import importlib.util
import os
import shutil
import tempfile
import threading
import time
from pathlib import Path

import numpy as np
import torch

from .bundle import (ENGINE_DIR, ENGINE_PRECISIONS, Bundle, load_bundle, manifest_on_disk, sha256_file,
                     update_manifest)
from .export import INPUT, export_onnx
from .model import AnomalyModel

# Largest allowed |map difference| against PyTorch fp32, in the anomaly map's units (standard
# deviations of the validation scores). fp32: kernel order only. fp16: 10-bit mantissa through
# four layers and a squared difference of 128 channels. int8: 7/8-bit steps at every convolution;
# measured on a trained bundle, defect images included (engines/quantize.py): max 0.42.
TOLERANCE = {"fp32": 1e-3, "fp16": 0.25, "int8": 1.0}


class ParityError(RuntimeError):
    """The exported engine does not reproduce the PyTorch model within tolerance."""


def onnx_file(precision: str) -> str:
    return f"{ENGINE_DIR}/model-{precision}.onnx"


def model_for_export(model: AnomalyModel, precision: str) -> AnomalyModel:
    """fp32: the model as is. fp16: the networks cast to half; inputs and scoring stay float32
    (ScaleEnsemble casts its input to the network's dtype and the output back to float32)."""
    model = copy.deepcopy(model).float().eval()
    if precision == "fp16":
        for ens in model.ensembles:
            ens.net.half()
    return model


def trace_device(precision: str) -> torch.device:
    """Where the export traces the model (runs it once): a CUDA GPU for fp16 where there is one. A CPU
    has no fp16 arithmetic, and traces it in channels-last (export.export_onnx), where PyTorch's fp16
    convolutions ran 4.5-5.9 times slower than fp32 (benchmarks/results/cpu_fp16_conv_channels_last_epyc.json)."""
    return torch.device("cuda") if precision == "fp16" and torch.cuda.is_available() else torch.device("cpu")


def require_onnx(modules: tuple[str, ...] = ("onnx", "onnxruntime")) -> None:
    """An EngineError naming the missing packages of the optional `onnx` extra (export needs `onnx`,
    the check and the backend `onnxruntime`), instead of an ImportError traceback."""
    from .runtime import EngineError

    missing = [m for m in modules if importlib.util.find_spec(m) is None]
    if missing:
        raise EngineError(f"{' and '.join(missing)} not installed here (ONNX engines need them): "
                          "pip install 'ustudents[onnx]'")


def onnxruntime_session(path: Path):
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.intra_op_num_threads = torch.get_num_threads()
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    return ort.InferenceSession(str(path), sess_options=opts, providers=["CPUExecutionProvider"])


POLL_S = 0.01  # how often interruptible_run looks whether the run has ended
START_WAIT_S = 2.0  # how long a stopped interruptible_run waits for a run that has not begun


def interruptible_run(session, feeds: dict) -> list:
    """session.run(None, feeds), stoppable by Ctrl-C.

    Python takes a signal only between bytecodes of the main thread, so a run (seconds to minutes
    for an fp16 graph on a CPU without fp16 arithmetic) would hold Ctrl-C until it ended. The run
    goes to a thread while the main thread waits; on KeyboardInterrupt ONNX Runtime is told to stop
    before its next node (RunOptions.terminate) and the run's end is awaited, so nothing runs on
    behind (a run still inside ONNX Runtime at interpreter exit aborts the process). The main thread
    polls a flag: a KeyboardInterrupt landing inside Event.wait (or Thread.join) can leave that
    Event's own lock held, and the wait after it then never returned (CPython bpo-29988)."""
    import onnxruntime as ort

    if threading.current_thread() is not threading.main_thread():  # no signal reaches it there
        return session.run(None, feeds)
    options, outcome = ort.RunOptions(), {}

    def target():
        outcome["began"] = True
        try:
            outcome["outputs"] = session.run(None, feeds, options)
        except BaseException as exc:  # re-raised by the caller's thread
            outcome["error"] = exc
        finally:
            outcome["done"] = True
    run = threading.Thread(target=target, name="onnxruntime-run", daemon=True)
    try:
        run.start()  # inside the try: a Ctrl-C inside start() left the run going, never told to stop
        while "done" not in outcome:
            time.sleep(POLL_S)
    except KeyboardInterrupt:
        # the run's end; not for ever where it never began (a Ctrl-C inside start() can leave the thread
        # unstarted), as a run that begins once told to terminate stops at once
        unstarted_by = time.monotonic() + START_WAIT_S
        while True:
            try:  # all of it: a second Ctrl-C anywhere here waits for the same stop
                options.terminate = True  # ONNX Runtime stops before its next node
                if "done" in outcome or ("began" not in outcome and time.monotonic() > unstarted_by):
                    break
                time.sleep(POLL_S)
            except KeyboardInterrupt:
                continue
        raise
    if "error" in outcome:
        raise outcome["error"]
    return outcome["outputs"]


def onnxruntime_runner(path: Path):
    """A runner (float (B, 3, S, S) CPU tensor -> fused, per-scale maps) over an ONNX file."""
    session = onnxruntime_session(path)

    def run(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        try:
            fused, scales = interruptible_run(session, {INPUT: x.cpu().numpy()})
        except Exception as err:
            if not type(err).__module__.startswith("onnxruntime"):
                raise
            raise onnxruntime_failure(err, path) from None
        return torch.from_numpy(fused), torch.from_numpy(scales)
    return run


def onnxruntime_failure(err: Exception, path: Path) -> Exception:
    """ONNX Runtime's own error (its classes derive from Exception alone, so the commands' one-line
    handling passed them by as a traceback) as ours: memory it could not get as MemoryError, which the
    commands tell as out of memory, as PyTorch's; any other failure as EngineError naming the engine."""
    from .runtime import EngineError

    text = " ".join(str(err).split())
    if "Failed to allocate memory" in text or "bad_alloc" in text:
        return MemoryError(text)
    return EngineError(f"{path}: ONNX Runtime failed running it ({text[:300]}); build the engine again "
                       f"(ustudents build-engines {path.parent.parent}), or use --backend torch")


def parity(reference: AnomalyModel, runner, images: torch.Tensor, threshold: float | torch.Tensor,
           precision: str) -> dict:
    """Compare a runner's maps with the PyTorch fp32 model on `images` (N, 3, S, S) in [0, 1].

    Maps must agree within the precision's tolerance. Masks must agree at every pixel whose
    reference score is farther than the tolerance from the threshold (pixels closer than that may
    legitimately fall either side). `threshold` is in the map's units, a number or per position
    (S, S): Bundle.mask_threshold_on_map."""
    with torch.no_grad():
        ref_fused, ref_scales = reference.float().eval()(images)
        fused, scales = runner(images)
    diff = float(max((fused - ref_fused).abs().max(), (scales - ref_scales).abs().max()))
    tol = TOLERANCE[precision]
    decided = (ref_fused - threshold).abs() > tol
    flips = int(((fused >= threshold) != (ref_fused >= threshold))[decided].sum())
    mask_agreement = float(((fused >= threshold) == (ref_fused >= threshold)).float().mean())
    return {"images": int(len(images)), "max_abs_diff": diff, "tolerance": tol,
            "mask_agreement": mask_agreement, "mask_flips_beyond_tolerance": flips,
            "ok": diff <= tol and flips == 0}


def check_images(bundle: Bundle, frames: list[np.ndarray] | None, count: int = 4, seed: int = 0) -> torch.Tensor:
    """Images for the parity check: the given frames (real images) or, without any, uniform noise."""
    from .runtime import preprocess

    if frames:
        return preprocess(frames, bundle.image_size, torch.device("cpu"))
    g = torch.Generator().manual_seed(seed)
    return torch.rand(count, 3, bundle.image_size, bundle.image_size, generator=g)


def build_onnx(bundle: Bundle, precision: str = "fp32",
               frames: list[np.ndarray] | None = None, calibration: list[np.ndarray] | None = None) -> dict:
    """Export, check under ONNX Runtime, and record the engine in the bundle's manifest.
    int8 needs `calibration`: good images whose activations set the quantization ranges.
    Raises ParityError (and keeps nothing) when the check fails."""
    if precision not in ENGINE_PRECISIONS:
        raise ValueError(f"--precision {precision}: ONNX engines are built in {', '.join(ENGINE_PRECISIONS)}")
    if precision == "int8" and not calibration:
        raise ValueError("--precision int8: give good images to calibrate the quantization on "
                         "(--calibration-images DIR, e.g. the category's train/good)")
    reference = bundle.model()
    rel = onnx_file(precision)
    final = bundle.path / rel
    final.parent.mkdir(exist_ok=True)
    tmp = final.with_name(f".{final.name}.partial")
    sweep_killed_builds(final.parent)
    # int8: the fp32 export and what the quantizer writes beside it (its shape-inferred copy) go
    # in a folder of their own, removed with everything in it however the build ends
    work = Path(tempfile.mkdtemp(prefix=f".{final.name}.", suffix=".partial", dir=final.parent)) \
        if precision == "int8" else None
    if work is not None:  # mkdtemp's 0700: left by a SIGKILL, it made the bundle uncopyable by other users
        work.chmod(0o755)
    try:
        try:
            if precision == "int8":
                from google.protobuf.message import DecodeError

                from .quantize import quantize_int8
                from .runtime import EngineError, preprocess
                export_onnx(model_for_export(reference, "fp32"), bundle.image_size, work / "model-fp32.onnx")
                try:
                    quantize_int8(work / "model-fp32.onnx", tmp,
                                  preprocess(calibration, bundle.image_size, torch.device("cpu")))
                except DecodeError:  # ONNX's shape inference writes its copy cut short on a full disk, silently
                    free = shutil.disk_usage(final.parent).free
                    raise EngineError(f"{final.parent}: the quantizer could not read back the model it wrote there "
                                      f"(cut short; {free / 1e6:.0f} MB free on that disk); free space there and build "
                                      "again") from None
            else:
                export_onnx(model_for_export(reference, precision).to(trace_device(precision)), bundle.image_size, tmp)
        except OSError as err:  # the exporter's own errors name no file (a full disk, a file size limit)
            if err.filename is None:
                raise OSError(err.errno, err.strerror or str(err), str(final)) from None
            raise
        images = check_images(bundle, frames)
        result = parity(reference, onnxruntime_runner(tmp), images, bundle.mask_threshold_on_map(), precision)
        if not result["ok"]:
            raise ParityError(f"{final}: ONNX Runtime differs from PyTorch by {result['max_abs_diff']:.3g} "
                              f"(tolerance {result['tolerance']}), {result['mask_flips_beyond_tolerance']} mask "
                              f"pixels flipped; not stored")
        from .runtime import model_digest
        entry = {"backend": "onnx", "precision": precision, "file": rel, "sha256": sha256_file(tmp),
                 "model_digest": model_digest(bundle), "image_size": bundle.image_size,
                 "opset": 17, "parity": {**result, "against": "pytorch fp32",
                                         "on": "real images" if frames else "uniform noise"}}
        if precision == "int8":
            from .quantize import HEADROOM
            entry["calibration"] = {"images": len(calibration),
                                    "ranges": f"{HEADROOM:g}x the max |activation| over these good images"}
        # From here the file and its entry change together: an interrupt between them left the engine
        # file in the bundle and no entry naming it (or, before forget_engine, the old entry naming the
        # new file), so whatever stops it, a file the manifest does not list goes
        try:
            forget_engine(bundle, "onnx", precision)
            os.replace(tmp, final)
            record_engine(bundle, entry)
        except BaseException:
            if not listed(bundle, rel):
                final.unlink(missing_ok=True)
            raise
    finally:
        tmp.unlink(missing_ok=True)
        if work is not None:
            shutil.rmtree(work, ignore_errors=True)
    return entry


def listed(bundle: Bundle, rel: str) -> bool:
    """Whether the manifest on disk now lists an engine in file `rel`."""
    return any(e.get("file") == rel for e in (manifest_on_disk(bundle.path) or {}).get("engines") or [])


def sweep_killed_builds(engines: Path) -> None:
    """Remove what builds killed outright (SIGKILL, a power cut) left in the bundle's `engines`
    folder: partial files, and int8 builds' work folders (tens of MB, copied with the bundle ever
    after). Only one build of a bundle runs at a time (the CLI's lock), so none of them is in use."""
    for left in engines.glob(".model-*.partial"):
        if left.is_dir() and not left.is_symlink():
            shutil.rmtree(left, ignore_errors=True)
        else:
            left.unlink(missing_ok=True)


def record_engine(bundle: Bundle, entry: dict) -> None:
    """Add or replace (same backend, precision and GPU) the engine entry in the manifest."""
    _write_engines(bundle, (entry["backend"], entry["precision"], entry.get("gpu")), entry)


def forget_engine(bundle: Bundle, backend: str, precision: str, gpu: str | None = None) -> None:
    """Drop the manifest's entry for an engine whose file is about to be replaced: between the new file
    and its entry, an interrupt left the old entry naming the new file ("damaged, rebuild"); without an
    entry the engine is merely not built yet."""
    _write_engines(bundle, (backend, precision, gpu), None)


def _write_engines(bundle: Bundle, key: tuple, entry: dict | None) -> None:
    current = load_bundle(bundle.path).manifest  # as it is on disk now, not as it was when the build began
    engines = current.get("engines") or []
    kept = [e for e in engines if (e["backend"], e["precision"], e.get("gpu")) != key]
    if entry is None and len(kept) == len(engines):
        return
    bundle.manifest = update_manifest(bundle.path, engines=kept + ([entry] if entry else []))
