"""TensorRT: build a plan from the bundle's ONNX export and run it. Deliberately thin: shapes,
profiles, precision and metadata are decided in `tensorrt_build` (tested without TensorRT); this
module only calls the TensorRT 10/11 Python API and pycuda.

Never run here: TensorRT is not installable on the project's machines (README, "What ran where").
Written from the TensorRT Python API reference: strongly typed networks, name-based I/O
(`set_input_shape`, `set_tensor_address`, `execute_async_v3`), serialized timing cache.

CUDA context: pycuda attaches to the device's *primary* context (`pycuda.autoprimaryctx`), the one
the CUDA runtime and PyTorch use. `pycuda.autoinit` would create a second context beside PyTorch's,
which hangs or fails with invalid resource handles (NVIDIA/TensorRT#4608).
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from .files import write_atomically
from .tensorrt_build import WORKSPACE_BYTES, network_flags, profile_shapes


def _trt():
    import tensorrt as trt
    return trt, trt.Logger(trt.Logger.WARNING)


def build_plan(onnx_path: Path, image_size: int, max_batch: int, cache_path: Path) -> bytes:
    """ONNX -> serialized plan, with one optimization profile for batch 1..max_batch and the
    timing cache at `cache_path` read before and written back after the build."""
    import pycuda.autoprimaryctx  # noqa: F401  (the builder times kernels on the primary context)

    trt, logger = _trt()
    builder = trt.Builder(logger)
    network = builder.create_network(network_flags(trt))
    parser = trt.OnnxParser(network, logger)
    if not parser.parse(Path(onnx_path).read_bytes()):
        errors = "; ".join(str(parser.get_error(i)) for i in range(parser.num_errors))
        raise RuntimeError(f"{onnx_path}: TensorRT cannot parse the ONNX export: {errors}")
    config = builder.create_builder_config()
    config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, WORKSPACE_BYTES)
    profile = builder.create_optimization_profile()
    for name, (lo, opt, hi) in profile_shapes(image_size, max_batch).items():
        profile.set_shape(name, lo, opt, hi)
    config.add_optimization_profile(profile)
    cache = config.create_timing_cache(cache_path.read_bytes() if cache_path.is_file() else b"")
    config.set_timing_cache(cache, ignore_mismatch=False)
    plan = builder.build_serialized_network(network, config)
    if plan is None:
        raise RuntimeError(f"{onnx_path}: TensorRT failed to build a plan (see the messages above)")
    # atomically: the next build reads it with ignore_mismatch=False, so a torn file would fail it
    write_atomically(cache_path, bytes(memoryview(config.get_timing_cache().serialize())))
    return bytes(memoryview(plan))


class TensorRTRunner:
    """Runs a plan on float (B, 3, S, S) host batches: copy into pinned memory, upload, execute and
    download on one pycuda stream, then return (fused, per-scale) as CPU tensors."""

    def __init__(self, plan_path: Path, max_batch: int):
        import pycuda.autoprimaryctx as primary
        import pycuda.driver as cuda

        # A CUDA context is current per thread, and autoprimaryctx makes it current only in the thread
        # that imports it; a worker calls the runner from its inference thread, so each call pushes it.
        self.ctx = primary.context

        trt, logger = _trt()
        self.cuda = cuda
        self.runtime = trt.Runtime(logger)
        self.engine = self.runtime.deserialize_cuda_engine(Path(plan_path).read_bytes())
        if self.engine is None:
            raise RuntimeError(f"{plan_path}: TensorRT cannot load this plan; rebuild it with "
                               "`ustudents build-engines MODEL --backend tensorrt`")
        self.context = self.engine.create_execution_context()
        self.stream = cuda.Stream()
        self.names = [self.engine.get_tensor_name(i) for i in range(self.engine.num_io_tensors)]
        self.inputs = [n for n in self.names if self.engine.get_tensor_mode(n) == trt.TensorIOMode.INPUT]
        self.outputs = [n for n in self.names if n not in self.inputs]
        # Buffers sized for max_batch once; smaller batches use a prefix of each.
        self.host, self.device = {}, {}
        for name in self.names:
            shape = list(self.engine.get_tensor_shape(name))
            shape[0] = max_batch
            dtype = trt.nptype(self.engine.get_tensor_dtype(name))
            self.host[name] = cuda.pagelocked_empty(shape, dtype)
            self.device[name] = cuda.mem_alloc(self.host[name].nbytes)
            self.context.set_tensor_address(name, int(self.device[name]))
        self.max_batch = max_batch

    def __call__(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        b = x.shape[0]
        if b > self.max_batch:
            raise ValueError(f"batch {b} exceeds the plan's max batch {self.max_batch}")
        self.ctx.push()
        try:
            return self._run(x, b)
        finally:
            self.cuda.Context.pop()

    def _run(self, x: torch.Tensor, b: int) -> tuple[torch.Tensor, torch.Tensor]:
        (name_in,) = self.inputs
        host_in = self.host[name_in][:b]
        np.copyto(host_in, x.numpy())
        self.context.set_input_shape(name_in, tuple(host_in.shape))
        self.cuda.memcpy_htod_async(self.device[name_in], host_in, self.stream)
        if not self.context.execute_async_v3(self.stream.handle):
            raise RuntimeError("TensorRT execution failed (see the messages above)")
        for name in self.outputs:
            self.cuda.memcpy_dtoh_async(self.host[name][:b], self.device[name], self.stream)
        self.stream.synchronize()
        out = {name: torch.from_numpy(self.host[name][:b].copy()) for name in self.outputs}
        return out["anomaly_map"], out["scale_maps"]


def tensorrt_runner(plan_path: Path, entry: dict) -> TensorRTRunner:
    return TensorRTRunner(plan_path, int(entry["max_batch"]))
