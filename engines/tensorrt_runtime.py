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

import functools
from pathlib import Path

import numpy as np
import torch

from .files import write_atomically
from .runtime import EngineError
from .tensorrt_build import ALLOW_TF32, WORKSPACE_BYTES, context_gpu_mismatch, network_flags, profile_shapes


@functools.lru_cache(maxsize=None)
def _trt():
    """TensorRT and the process's one logger: TensorRT keeps the first logger it is given for the
    process and warns at each different one, which a runtime freed earlier may leave dangling."""
    import tensorrt as trt
    return trt, trt.Logger(trt.Logger.WARNING)


def _primary_context():
    """pycuda's primary context, checked to be the first visible GPU's: autoprimaryctx takes the GPU
    that CUDA_DEVICE or ~/.cuda_device names, while plans are checked against PyTorch's cuda:0."""
    import pycuda.autoprimaryctx as primary
    import pycuda.driver as cuda

    problem = context_gpu_mismatch(primary.device.pci_bus_id(), cuda.Device(0).pci_bus_id())
    if problem:
        raise EngineError(problem)
    return primary.context


def build_plan(onnx_path: Path, image_size: int, max_batch: int, cache_path: Path) -> bytes:
    """ONNX -> serialized plan, with one optimization profile for batch 1..max_batch and the
    timing cache at `cache_path` read before and written back after the build."""
    _primary_context()  # the builder times kernels on the primary context
    trt, logger = _trt()
    builder = trt.Builder(logger)
    network = builder.create_network(network_flags(trt))
    parser = trt.OnnxParser(network, logger)
    # the file's path too, where TensorRT finds weights kept beside an export over 2 GB (ONNX external data)
    if not parser.parse(Path(onnx_path).read_bytes(), path=str(onnx_path)):
        errors = "; ".join(str(parser.get_error(i)) for i in range(parser.num_errors))
        raise EngineError(f"{onnx_path}: TensorRT cannot parse the ONNX export: {errors}; rebuild it with "
                          "`ustudents build-engines MODEL` (same --precision), then the plan")
    config = builder.create_builder_config()
    config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, WORKSPACE_BYTES)
    if not ALLOW_TF32:
        config.clear_flag(trt.BuilderFlag.TF32)
    profile = builder.create_optimization_profile()
    for name, (lo, opt, hi) in profile_shapes(image_size, max_batch).items():
        profile.set_shape(name, lo, opt, hi)
    config.add_optimization_profile(profile)
    # A cache TensorRT refuses (another GPU's or version's, damaged) is replaced by a fresh one: it
    # only saves build time. set_timing_cache says so by returning False, not by raising.
    cache = config.create_timing_cache(cache_path.read_bytes()) if cache_path.is_file() else None
    if cache is None or not config.set_timing_cache(cache, ignore_mismatch=False):
        cache = config.create_timing_cache(b"")
        config.set_timing_cache(cache, ignore_mismatch=False)
    plan = builder.build_serialized_network(network, config)
    if plan is None:
        raise EngineError(f"{onnx_path}: TensorRT failed to build a plan (its messages are above)")
    # the cache object the build filled; atomically, as a torn file would be refused next time
    write_atomically(cache_path, bytes(memoryview(cache.serialize())))
    return bytes(memoryview(plan))


class TensorRTRunner:
    """Runs a plan on float (B, 3, S, S) host batches: copy into pinned memory, upload, execute and
    download on one pycuda stream, then return (fused, per-scale) as CPU tensors."""

    def __init__(self, plan_path: Path, max_batch: int):
        import pycuda.driver as cuda

        # A CUDA context is current per thread, and autoprimaryctx makes it current only in the thread
        # that imports it: the runner is made in one thread and called from another (a worker's
        # inference thread), so making it and each call push the context.
        self.ctx = _primary_context()
        self.cuda = cuda
        self.ctx.push()
        try:
            self._load(Path(plan_path), max_batch)
        finally:
            cuda.Context.pop()

    def _load(self, plan_path: Path, max_batch: int) -> None:
        trt, logger = _trt()
        self.runtime = trt.Runtime(logger)
        self.engine = self.runtime.deserialize_cuda_engine(plan_path.read_bytes())
        if self.engine is None:
            raise EngineError(f"{plan_path}: TensorRT cannot load this plan; rebuild it with "
                              "`ustudents build-engines MODEL --backend tensorrt`")
        self.context = self.engine.create_execution_context()
        if self.context is None:  # its activations did not fit: TensorRT returns None, raises nothing
            raise EngineError(f"{plan_path}: TensorRT could not create an execution context (its messages are "
                              "above; most often the GPU's memory is taken by other processes: nvidia-smi)")
        self.stream = self.cuda.Stream()
        self.names = [self.engine.get_tensor_name(i) for i in range(self.engine.num_io_tensors)]
        self.inputs = [n for n in self.names if self.engine.get_tensor_mode(n) == trt.TensorIOMode.INPUT]
        self.outputs = [n for n in self.names if n not in self.inputs]
        (name_in,) = self.inputs
        # Buffers sized once for max_batch (smaller batches use a prefix of each): the input's shape
        # set to it first, so that every output's shape is resolved by the context, none left -1.
        shape_in = (max_batch, *tuple(self.engine.get_tensor_shape(name_in))[1:])
        if not self.context.set_input_shape(name_in, shape_in):
            raise EngineError(f"{plan_path}: the plan does not take input {shape_in}; rebuild it with "
                              "`ustudents build-engines MODEL --backend tensorrt`")
        self.host, self.device = {}, {}
        for name in self.names:
            shape = list(self.context.get_tensor_shape(name))
            dtype = trt.nptype(self.engine.get_tensor_dtype(name))
            self.host[name] = self.cuda.pagelocked_empty(shape, dtype)
            self.device[name] = self.cuda.mem_alloc(self.host[name].nbytes)
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
        if not self.context.set_input_shape(name_in, tuple(host_in.shape)):
            raise EngineError(f"TensorRT refused input shape {tuple(host_in.shape)} (its messages are above)")
        self.cuda.memcpy_htod_async(self.device[name_in], host_in, self.stream)
        if not self.context.execute_async_v3(self.stream.handle):
            raise EngineError("TensorRT execution failed (its messages are above)")
        for name in self.outputs:
            self.cuda.memcpy_dtoh_async(self.host[name][:b], self.device[name], self.stream)
        self.stream.synchronize()
        out = {name: torch.from_numpy(self.host[name][:b].copy()) for name in self.outputs}
        return out["anomaly_map"], out["scale_maps"]


def tensorrt_runner(plan_path: Path, entry: dict) -> TensorRTRunner:
    return TensorRTRunner(plan_path, int(entry["max_batch"]))
