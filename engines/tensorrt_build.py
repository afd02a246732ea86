"""Every decision about a TensorRT engine, in plain Python: which ONNX it builds from, the
optimization profile, how precision is chosen, what the manifest records, and whether a stored
plan may run on this machine. `tensorrt_runtime` only carries these out against the TensorRT API,
so all of this is tested where TensorRT is not installed.

Precision without builder flags: TensorRT 11 removed the FP16/INT8 builder flags (deprecated in
10), so every plan is built from a *strongly typed* network, whose layer precisions are the ONNX
graph's own types. fp32 builds from the fp32 export, fp16 from the mixed-precision export
(networks fp16, scoring head fp32), int8 from the export with explicit QuantizeLinear /
DequantizeLinear nodes (symmetric, per-channel weights: `quantize`), which a strongly typed network
runs as explicit quantization. The same code therefore builds identical plans on TensorRT 10 and 11.
"""
from __future__ import annotations

import importlib.util

from .onnx_engine import ENGINE_DIR
from .export import INPUT

TRT_PRECISIONS = ("fp32", "fp16", "int8")
WORKSPACE_BYTES = 4 << 30  # builder scratch space; the dense networks need well under this
# TensorRT lets float32 layers run in TF32 unless told not to (BuilderFlag.TF32, on by default); the
# torch CUDA engine turns TF32 off (runtime: 10-bit mantissas in fp32 convolutions), and a plan is
# checked against that engine within the fp32 tolerance, so plans are built without it too.
ALLOW_TF32 = False


def tensorrt_available() -> bool:
    return importlib.util.find_spec("tensorrt") is not None and importlib.util.find_spec("pycuda") is not None


def _slug(name: str) -> str:
    return "".join(c if c.isalnum() else "-" for c in name.lower()).strip("-")


def plan_file(precision: str, gpu: str) -> str:
    """A plan is specific to its GPU model: the name keeps plans for several GPUs side by side."""
    return f"{ENGINE_DIR}/model-{precision}-{_slug(gpu)}.plan"


def timing_cache_file(gpu: str, trt_version: str) -> str:
    """A timing cache holds one GPU's kernel timings under one TensorRT version, which refuses another's
    cache: one per GPU and version, as the plans are kept, so a bundle copied to a second GPU builds
    there with its own cache and keeps the first's."""
    return f"{ENGINE_DIR}/tensorrt-{_slug(gpu)}-{_slug(trt_version)}.timing-cache"


def onnx_source(precision: str) -> str:
    """The ONNX export a plan of `precision` is built from (see the module docstring)."""
    if precision not in TRT_PRECISIONS:
        raise ValueError(f"--precision {precision}: TensorRT plans are built in {', '.join(TRT_PRECISIONS)}")
    return precision


def profile_shapes(image_size: int, max_batch: int) -> dict[str, tuple[tuple[int, ...], ...]]:
    """One optimization profile over batch 1..max_batch at the bundle's fixed image size; tuned for
    the largest batch, which is what a busy line runs."""
    if max_batch < 1:
        raise ValueError(f"--max-batch {max_batch}: must be at least 1")
    shape = lambda b: (b, 3, image_size, image_size)  # noqa: E731
    return {INPUT: (shape(1), shape(max_batch), shape(max_batch))}


def network_flags(trt) -> int:
    """Creation flags: strongly typed (precision from the ONNX types). Explicit batch is the only
    mode since TensorRT 10, so it is never set (11 removed the flag). TensorRT 11 keeps
    STRONGLY_TYPED, as value 0 instead of 10's 1, deprecated and ignored (networks are always strongly
    typed there): it is set by its value wherever it exists, and a release without it gets none."""
    flag = getattr(trt.NetworkDefinitionCreationFlag, "STRONGLY_TYPED", None)
    return 0 if flag is None else 1 << int(flag)


def context_gpu_mismatch(context_bus_id: str, first_bus_id: str) -> str | None:
    """Why pycuda's context is on the wrong GPU, or None. The TensorRT backend runs on the first
    visible GPU, whose name the plans are checked against; pycuda.autoprimaryctx attaches to the GPU
    that CUDA_DEVICE or ~/.cuda_device names, if any. Arguments: PCI bus ids (Device.pci_bus_id())."""
    if context_bus_id == first_bus_id:
        return None
    return (f"pycuda attached to the GPU at PCI {context_bus_id}, not the first visible one at {first_bus_id} that "
            "TensorRT plans are checked against (the environment variable CUDA_DEVICE or the file ~/.cuda_device "
            "chooses pycuda's GPU): unset CUDA_DEVICE and remove ~/.cuda_device, and choose the GPU with "
            "CUDA_VISIBLE_DEVICES instead")


def plan_entry(precision: str, gpu: str, trt_version: str, max_batch: int, image_size: int,
               plan_sha256: str, onnx_sha256: str, model_digest: str) -> dict:
    """The manifest record of a built plan."""
    return {"backend": "tensorrt", "precision": precision, "file": plan_file(precision, gpu),
            "sha256": plan_sha256, "gpu": gpu, "tensorrt_version": trt_version, "max_batch": max_batch,
            "image_size": image_size, "onnx_sha256": onnx_sha256, "model_digest": model_digest}


def plan_mismatch(entry: dict, trt_version: str | None = None, gpu: str | None = None) -> str | None:
    """Why a stored plan cannot run here, or None if it can. A plan runs only under the exact
    TensorRT version and on the GPU model it was built for."""
    if trt_version is None or gpu is None:
        here_version, here_gpu = this_machine()
        trt_version, gpu = trt_version or here_version, gpu or here_gpu
    if trt_version is None:
        return "TensorRT is not installed here"
    if gpu is None:
        return "no CUDA GPU here"
    if entry.get("tensorrt_version") != trt_version:
        return f"built with TensorRT {entry.get('tensorrt_version')}, this machine has {trt_version}"
    if entry.get("gpu") != gpu:
        return f"built for {entry.get('gpu')}, this machine has {gpu}"
    return None


def this_machine() -> tuple[str | None, str | None]:
    """(TensorRT version, GPU name) here; None for what is missing."""
    version = gpu = None
    if importlib.util.find_spec("tensorrt") is not None:
        import tensorrt
        version = tensorrt.__version__
    import torch
    if torch.cuda.is_available():  # the backend needs CUDA PyTorch anyway (load_engine's device)
        gpu = torch.cuda.get_device_name(0)
    return version, gpu


def require_tensorrt() -> tuple[str, str]:
    """(TensorRT version, GPU name), or an EngineError saying what is missing and what to do."""
    from .runtime import EngineError

    if not tensorrt_available():
        raise EngineError("TensorRT is not installed here: on a machine with CUDA, "
                          "`pip install 'ustudents[tensorrt]'` (NVIDIA's index), or use the GPU image")
    version, gpu = this_machine()
    if gpu is None:
        raise EngineError("PyTorch sees no CUDA GPU here (a CPU build of PyTorch, or no GPU): TensorRT plans are "
                          "built on the GPU that will run them, and the TensorRT backend needs PyTorch with CUDA "
                          "(the GPU image has both)")
    return version, gpu


def build_tensorrt(bundle, precision: str, max_batch: int) -> dict:
    """Build (or rebuild) this GPU's plan from the bundle's ONNX engine of the same precision
    (`build_onnx` first), store it atomically and record it in the manifest."""
    from .bundle import sha256_file
    from .files import write_atomically
    from .onnx_engine import forget_engine, record_engine
    from .runtime import EngineError, build_command, find_engine, model_digest

    onnx_source(precision)
    version, gpu = require_tensorrt()
    source = find_engine(bundle, "onnx", precision)
    if source is None:
        raise EngineError(f"{bundle.path}: no current {precision} ONNX engine to build from; run "
                          f"{build_command(bundle, 'onnx', precision)} first")
    from .tensorrt_runtime import build_plan

    plan = build_plan(bundle.path / source["file"], bundle.image_size, max_batch,
                      bundle.path / timing_cache_file(gpu, version))
    rel = plan_file(precision, gpu)
    final = bundle.path / rel
    forget_engine(bundle, "tensorrt", precision, gpu)
    write_atomically(final, plan)
    entry = plan_entry(precision, gpu, version, max_batch, bundle.image_size, sha256_file(final),
                       source["sha256"], model_digest(bundle))
    record_engine(bundle, entry)
    return entry
