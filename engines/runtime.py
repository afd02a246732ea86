"""One inference API over every backend: camera frames in; anomaly maps, scores and masks out.

    engine = load_engine("models/magnetic_tile", backend="auto")
    for p in engine.predict(frames):      # a list of uint8 frames, gray or RGB, from 16 px a side
        p.score, p.anomalous, p.mask      # mask at the frame's own size

An `Engine` owns everything between a decoded frame and the verdict: resizing and normalization (on
the engine's device), the networks (through a backend `Runner`), the scoring head (inside the
network graph: e, v, their normalization and the scale fusion), the image score (scoring.py; its
statistics change on recalibration without touching any built engine), the resize of the map back
to the frame and the thresholds. Backends differ only in the runner: a callable that maps a
float (B, 3, S, S) batch in [0, 1] on the engine's device to the fused map (B, S, S) and the
per-scale maps (B, n_scales, S, S).
"""
from __future__ import annotations

import contextlib
import importlib.util
import logging
import platform
import shlex
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np
import torch
import torch.nn.functional as F

from .bundle import ENGINE_PRECISIONS, Bundle, load_bundle
from .cuda_graphs import GraphedRunner
from .fftconv import WORKSPACE
from .frame_shapes import recalibrate_copy
from .images import ImageError, checked_frame, frame_tensor, resize_tensor
from .scoring import mask, max_score, position_z, position_z_max, reaches

log = logging.getLogger(__name__)

BACKENDS = ("torch", "onnxruntime", "tensorrt")
PRECISIONS = ("fp32", "bf16", "fp16", "int8")  # most faithful first (find_engine's preference)
TORCH_PRECISIONS = ("fp32", "bf16", "fp16")  # the torch backend casts the networks itself
Runner = Callable[[torch.Tensor], tuple[torch.Tensor, torch.Tensor]]


class EngineError(ValueError):
    """An engine that cannot be made as asked; the message says what to do instead."""


@dataclass
class Prediction:
    score: float  # the image score (the bundle's method) of the map at the model's resolution
    anomalous: bool  # score >= the image threshold
    anomaly_map: np.ndarray | None  # float32 (H, W) at the frame's own size; None from predict(maps=False)
    # float32 (H, W): what the mask thresholds (scoring.mask), and what overlays colour: anomaly_map
    # itself under the map rule, its position-standardized form under the position_z rule; None
    # from predict(maps=False)
    mask_level: np.ndarray | None
    # bool (H, W): mask_level >= the mask threshold (position_z: on flagged frames only); a flagged frame
    # whose resized peak fell under it keeps its model-size mask's footprint (frame_mask)
    mask: np.ndarray


def preprocess(frames: list[np.ndarray], size: int, device: torch.device, first: int = 0) -> torch.Tensor:
    """uint8 frames of any size (from 16 px a side) -> float32 (N, 3, S, S) in [0, 1] on `device`.

    The frame goes to the device as uint8 (4x less to copy than floats) and is resized there. The
    result is rounded to 8 bits exactly as `images.resize` does for training and calibration. `first`:
    the first frame's place in the caller's list, for errors."""
    out = torch.empty(len(frames), 3, size, size, device=device)
    for i, frame in enumerate(frames):
        t = frame_tensor(frame, f"frame {first + i}").to(device, non_blocking=True)
        out[i] = resize_tensor(t[None].float(), size)[0].round_().clamp_(0, 255)
    return out.div_(255.0)


def frame_list(frames) -> list:
    """The frames of a list, tuple or other iterable; one array is refused, not taken apart row by row."""
    if isinstance(frames, (np.ndarray, torch.Tensor)):
        raise ImageError(f"frames: one array of shape {tuple(frames.shape)}, where a list of frames goes; pass [frame] "
                         "for one frame, list(batch) for a batch")
    return list(frames)


class Engine:
    """A bundle's model on one backend, precision and device."""

    def __init__(self, bundle: Bundle, runner: Runner, backend: str, precision: str, device: torch.device,
                 max_batch: int = 8, prep_device: torch.device | None = None):
        self.bundle, self.runner = bundle, runner
        self.backend, self.precision, self.device = backend, precision, device
        # Where frames are resized and maps thresholded: the model's device, except for TensorRT,
        # which takes host batches into pinned memory (see tensorrt_runtime).
        self.prep_device = prep_device or device
        self.max_batch = max_batch
        self.image_size = bundle.image_size
        self.mask_threshold, self.image_threshold = bundle.mask_threshold, bundle.image_threshold
        self.mask_rule = bundle.mask_rule
        position = bundle.position_statistics()
        self.position = None if position is None else tuple(t.to(self.prep_device) for t in position)
        # One call in the networks at a time: a CUDA graph's static input and a TensorRT plan's host and
        # device buffers (and its input shape) are the runner's own, as are the measurements a first call
        # makes, so two threads' batches of one size would overwrite each other's input
        self.running = threading.Lock()

    @property
    def info(self) -> dict[str, str]:
        return {"model": str(self.bundle.manifest["id"]), "category": str(self.bundle.manifest["category"]),
                "backend": self.backend, "precision": self.precision, "device": str(self.device)}

    def describe(self) -> str:
        return f"{self.backend} {self.precision} on {device_name(self.device)}"

    @torch.no_grad()
    def maps(self, frames: list[np.ndarray]) -> tuple[torch.Tensor, torch.Tensor]:
        """Frames -> fused maps (N, S, S) and per-scale maps (N, n_scales, S, S) at the model's size,
        float32 on `prep_device` (the engine's device; the host for TensorRT, which returns host buffers)."""
        frames = frame_list(frames)
        if not frames:
            raise ValueError("Engine.maps: no frames given")
        fused, scales = [], []  # on prep_device
        for i in range(0, len(frames), self.max_batch):
            # resized and uploaded outside the lock: one thread's frames are made ready while another's run
            x = preprocess(frames[i:i + self.max_batch], self.image_size, self.prep_device, first=i)
            # the lock until the outputs are copied out, as a runner may return buffers of its own
            with self.running, current_gpu(self.device):
                f, s = self.runner(x)
                fused.append(f.to(torch.float32, copy=True))
                scales.append(s.to(torch.float32, copy=True))
        if len(fused) == 1:
            return fused[0], scales[0]
        return torch.cat(fused), torch.cat(scales)

    def check_frame(self, frame: np.ndarray, source: str = "frame") -> None:
        """ImageError where predict would refuse `frame`, and UnexpectedShape (an ImageError) where the
        model knows no frame of its shape: predict judges any shape, which the worker dead-letters
        (`unexpected_shape`) and `ustudents predict` refuses. For a capture loop of one's own, which
        can then drop a bad frame before it fails its whole batch."""
        arr = checked_frame(frame, source)
        shapes = self.bundle.frame_shapes
        if shapes is not None:
            shapes.check(arr, source, f"recalibrate a copy of the model on good ones ({recalibrate_copy(self.bundle.path)})")

    def warm_up(self) -> None:
        """Pay before real frames arrive what a first call costs: the plans the model measures, cuDNN's
        algorithm search and, where the runner keeps a CUDA graph per batch size, each size's
        capture (every size up to max_batch: a worker's batches take any of them). Else one frame."""
        frame = np.zeros((self.image_size, self.image_size, 3), np.uint8)
        sizes = range(1, self.max_batch + 1) if isinstance(self.runner, GraphedRunner) else [1]
        try:
            for n in sizes:
                self.predict([frame] * n)
        finally:
            # FFT scratch memory is per thread (fftconv.Workspace), and a worker serves from another
            # thread than the one that warms up: do not hold this one's for the process's life
            WORKSPACE.release()

    @torch.no_grad()
    def predict(self, frames: list[np.ndarray], maps: bool = True) -> list[Prediction]:
        """Score, verdict and mask of each frame, at its own size. `maps=False` leaves out the
        full-size map and mask level (None): at 4 bytes a pixel each, a batch of tens of megapixels
        held them in gigabytes where a caller that draws no overlay needs the masks only."""
        frames = frame_list(frames)
        if not frames:
            return []
        fused, _ = self.maps(frames)
        scores = self.image_scores(fused)
        anomalous = self.verdicts(scores)
        levels = self.mask_levels(fused)
        model_masks = mask(levels, self.mask_threshold, self.mask_rule, anomalous)
        out = []
        for frame, m, level, model_mask, score, flagged in zip(frames, fused, levels, model_masks, scores.tolist(),
                                                              anomalous):
            shape = np.shape(frame)[:2]  # what maps() took: an array, or anything np.asarray makes one of
            full = map_to_frame(m, shape)
            level = full if self.mask_rule == "map" else map_to_frame(level, shape)
            over = frame_mask(level, model_mask, self.mask_threshold, self.mask_rule, flagged)
            full_np = full.cpu().numpy() if maps else None
            out.append(Prediction(score=score, anomalous=bool(flagged), anomaly_map=full_np,
                                  mask_level=None if not maps else full_np if self.mask_rule == "map" else level.cpu().numpy(),
                                  mask=over.cpu().numpy()))
            del full, level  # before the next frame's: one frame's full-size maps at a time
        return out

    def mask_levels(self, fused: torch.Tensor) -> torch.Tensor:
        """Fused maps (N, S, S) -> what the bundle's mask rule thresholds (scoring.mask), same shape."""
        if self.mask_rule == "map":
            return fused
        return position_z(fused, *self.position)

    def masks(self, fused: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        """Fused maps (N, S, S) and their image scores (N,) -> boolean masks at the model's size."""
        return mask(self.mask_levels(fused), self.mask_threshold, self.mask_rule, self.verdicts(scores))

    def verdicts(self, scores: torch.Tensor) -> torch.Tensor:
        """Image scores (N,) -> anomalous (N,) bool: score >= the image threshold, exactly as recorded."""
        return reaches(scores, self.image_threshold)

    def image_scores(self, fused: torch.Tensor) -> torch.Tensor:
        """Fused maps (N, S, S) at the model's size -> image scores (N,), by the bundle's method."""
        if self.position is None:
            return max_score(fused)
        return position_z_max(fused, *self.position)


def map_to_frame(anomaly_map: torch.Tensor, shape: tuple[int, int]) -> torch.Tensor:
    """(S, S) map at model size -> (H, W), bilinear, on the map's device."""
    if tuple(anomaly_map.shape) == tuple(shape):
        return anomaly_map
    return F.interpolate(anomaly_map[None, None], size=tuple(shape), mode="bilinear", align_corners=False)[0, 0]


def frame_mask(level: torch.Tensor, model_mask: torch.Tensor, threshold: float, rule: str,
               flagged: torch.Tensor) -> torch.Tensor:
    """A frame's mask: its mask level at the frame's size (H, W) thresholded by the mask rule, or,
    where that leaves an anomalous frame without one, its model-size mask (S, S) carried over:
    bilinear resizing can lower a peak just over the threshold below it, and shrinking to a frame
    smaller than the model can step over it. A frame pixel is then masked where its footprint on the
    model's grid touches a masked model pixel (max pooling): nearest resizing skipped S - H model rows
    of a smaller frame, and an anomalous 48 x 48 frame of a 64 px model came out with no mask in 136
    of 361 peak positions (an audit)."""
    over = mask(level[None], threshold, rule, flagged[None])[0]
    if flagged and not over.any() and model_mask.any():
        over = F.adaptive_max_pool2d(model_mask[None, None].float(), tuple(level.shape))[0, 0].bool()
    return over


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return "cpu"


def device_refusal(device: str | torch.device) -> str | None:
    """Why `device` cannot run ustudents here, or None: what the CLIs' --device and the worker's
    USTUDENTS_DEVICE each prefix with their own name."""
    try:
        parsed = torch.device(device)
    except (RuntimeError, TypeError):
        return "not a device; give auto, cpu, cuda or cuda:N"
    if parsed.type not in ("cpu", "cuda"):
        return "ustudents runs on cpu or cuda; give auto, cpu, cuda or cuda:N"
    if parsed.type == "cuda" and not torch.cuda.is_available():
        return "PyTorch sees no CUDA GPU here; use cpu or auto"
    if parsed.type == "cuda" and parsed.index is not None and parsed.index >= torch.cuda.device_count():
        return (f"PyTorch sees {torch.cuda.device_count()} GPU(s) here, cuda:0 to "
                f"cuda:{torch.cuda.device_count() - 1} (CUDA_VISIBLE_DEVICES limits and renumbers them)")
    return None


def resolve_device(device: str | torch.device) -> torch.device:
    if str(device) == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    refusal = device_refusal(device)
    if refusal:  # named as given: "cuda:7", not "cuda", when the index is the user's
        raise EngineError(f"--device {device}: {refusal}")
    parsed = torch.device(device)
    if parsed.type == "cuda" and parsed.index is not None:
        # the calling thread's current GPU made this one (the current GPU is per thread: Engine.maps makes
        # it current in the threads that call it): what takes no device acts on the current one
        # (torch.cuda.synchronize in the dense forms' timing, CUDA graph capture and its memory pool)
        torch.cuda.set_device(parsed)
    return parsed


def current_gpu(device: torch.device):
    """A block in which `device`, where it is a GPU, is the calling thread's current one (see resolve_device)."""
    return torch.cuda.device(device) if device.type == "cuda" else contextlib.nullcontext()


def native_bf16(device: torch.device) -> bool:
    if device.type == "cuda":
        return torch.cuda.is_bf16_supported()
    if not torch.backends.mkldnn.is_available():
        return False
    if platform.machine().lower() in ("x86_64", "amd64"):
        # oneDNN also takes bf16 on AVX-512 cores without bf16 instructions (Skylake, Cascade Lake), by
        # emulation: native means AVX512-BF16 or AMX, the CPUs where bf16 was measured faster here
        return bool(torch.cpu._is_avx512_bf16_supported() or torch.cpu._is_amx_tile_supported())
    return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())


def torch_runner(model: torch.nn.Module, device: torch.device, precision: str, cuda_graphs: bool = True) -> Runner:
    """The reference backend: the fused model in PyTorch. On CUDA: the networks cast to the precision
    (the scoring head stays float32), each scale's dense pass in the fastest of its equivalent forms
    (PatchNet.use_fastest_form), cuDNN's algorithms chosen by measurement, and the whole model
    replayed as CUDA graphs (cuda_graphs.py). On CPU: below."""
    if precision not in ("fp32", "bf16", "fp16"):
        raise EngineError(f"--precision {precision}: the torch backend runs fp32, bf16 or fp16")
    if precision == "fp16" and device.type != "cuda":
        here = "bf16 or fp32" if native_bf16(device) else "fp32 (this CPU has no native bfloat16 for bf16)"
        raise EngineError("--precision fp16: PyTorch's fp16 convolutions on CPU run tens of times slower than fp32; "
                          f"use {here} here, or the fp16 ONNX engine (--backend onnxruntime)")
    if precision == "bf16" and not native_bf16(device):
        raise EngineError(f"--precision bf16: {device_name(device)} has no native bfloat16; use fp32")
    model = model.to(device).eval()
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(precision)
    if device.type == "cuda":
        for ens in model.ensembles:
            ens.net.to(dtype or torch.float32).use_fastest_form()

        def run_cuda(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
            # benchmark: one image size per engine, so searching cuDNN's algorithms per shape pays.
            # No TF32: PyTorch lets cuDNN round fp32 convolutions' inputs to 10-bit mantissas, and fp32
            # here is the reference precision (half precision is asked for as fp16 or bf16).
            with torch.backends.cudnn.flags(enabled=True, benchmark=True, deterministic=False, allow_tf32=False):
                return model(x)
        return GraphedRunner(run_cuda) if cuda_graphs else run_cuda
    if precision == "fp32":
        # On CPU the large convolutions run through the FFT where the first batch measures it faster:
        # same maps up to float rounding, 1.44x the naive baseline on the 3-scale model
        # (fftconv.py; benchmarks/results/engines_cpu_planned.json).
        model.use_fft()
    else:
        # bf16 on CPU: the networks cast once (the scoring head stays float32: ScaleEnsemble), and
        # each scale's dense pass in the form (grouped or apart, NCHW or channels-last) its first
        # batch measures fastest: which one wins differs between CPUs (PatchNet.use_fastest_form).
        for ens in model.ensembles:
            ens.net.to(dtype).use_fastest_form()
        dtype = None

    def run(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        with torch.autocast(device.type, dtype=dtype or torch.float32, enabled=dtype is not None):
            return model(x)
    return run


def default_torch_precision(bundle: Bundle, device: torch.device) -> str:
    """The precision the bundle's statistics and threshold were calibrated in, where this device runs
    it natively; else fp32; on a GPU, fp16 in place of fp32. Running as calibrated keeps the
    threshold's false-positive rate as measured. bf16 (a bundle trained with `--amp` on hardware with
    native bfloat16) is a default because it kept au_pro_30 on magnetic_tile within 0.0001 of fp32
    (the bar is 0.01; bf16_accuracy_cpu.json) and ran 2.74x the naive baseline on an AVX512-BF16 EPYC
    (engines_cpu_avx512_bf16_same_day.json) and 3.21x on an AMX Xeon (engines_cpu_amx_forms.json).
    fp16 on a GPU because there it kept au_pro_30 within 0.00001 of fp32, with the same image
    verdicts and pixel false-positive rate at the bundle's thresholds on all 594 test images
    (fp16_accuracy_cuda_demo_model_magnetic_tile.json), while fp32 without TF32 ran 7.5x slower than
    bf16 on an H200 (10.9 against 81.4 frames/s at batch 1: engines_cuda_h200_first_try.json and
    engines_cuda_h200.json; all under benchmarks/results/)."""
    calibrated = bundle.manifest.get("threshold", {}).get("precision", "fp32")
    if calibrated == "bf16" and native_bf16(device):
        return "bf16"
    return "fp16" if device.type == "cuda" else "fp32"


def available_backends(device: torch.device) -> list[str]:
    """Backends usable here, fastest first."""
    from .tensorrt_build import tensorrt_available

    out = []
    if device.type == "cuda" and device.index in (None, 0) and tensorrt_available():  # see load_engine
        out.append("tensorrt")
    out.append("torch")
    if device.type == "cpu" and importlib.util.find_spec("onnxruntime"):
        out.append("onnxruntime")
    return out


def load_engine(model: str | Path | Bundle, backend: str = "auto", device: str | torch.device = "auto",
                precision: str | None = None, max_batch: int = 8, cuda_graphs: bool = True) -> Engine:
    """Load a bundle on a backend. `auto` takes the fastest backend present that the bundle has a
    current engine for: on a GPU, TensorRT with a plan built for it; else PyTorch. On CPU that is
    PyTorch with FFT convolutions where faster: 1.60x naive against ONNX Runtime fp32's 1.06x in one
    run (3-scale model, 256 px: benchmarks/results/engines_cpu_fp32.json)."""
    bundle = model if isinstance(model, Bundle) else load_bundle(model)
    dev = resolve_device(device)
    if precision is not None and precision not in PRECISIONS:
        raise EngineError(f"--precision {precision}: choose one of {', '.join(PRECISIONS)}")
    if not isinstance(max_batch, int) or isinstance(max_batch, bool) or max_batch < 1:
        raise EngineError(f"max batch {max_batch!r}: must be a whole number, at least 1")
    if backend == "auto":
        backend = auto_backend(bundle, dev, precision)
    if backend not in BACKENDS:
        raise EngineError(f"--backend {backend}: choose one of auto, {', '.join(BACKENDS)}")
    if backend == "torch":
        precision = precision or default_torch_precision(bundle, dev)
        runner = torch_runner(bundle.model(), dev, precision, cuda_graphs)
    elif backend == "onnxruntime":
        if dev.type != "cpu":
            raise EngineError("--backend onnxruntime runs on the CPU here; use --device cpu, or tensorrt/torch on a GPU")
        from .onnx_engine import onnxruntime_runner, require_onnx
        require_onnx(("onnxruntime",))
        entry = require_engine(bundle, "onnx", precision)
        precision = entry["precision"]
        runner = onnxruntime_runner(verified_file(bundle, entry))
    else:
        if dev.type != "cuda":
            raise EngineError("--backend tensorrt needs a CUDA GPU that PyTorch sees (PyTorch with CUDA, as in the GPU "
                              "image); on CPU use --backend torch or onnxruntime")
        if dev.index not in (None, 0):  # pycuda's primary context is the first visible GPU's
            raise EngineError(f"--device {dev}: the TensorRT backend runs on the first visible GPU; make that GPU "
                              "the only visible one with CUDA_VISIBLE_DEVICES (its index as nvidia-smi counts) and "
                              "give --device cuda")
        from .tensorrt_runtime import tensorrt_runner
        entry = require_engine(bundle, "tensorrt", precision)
        precision = entry["precision"]
        runner = tensorrt_runner(verified_file(bundle, entry), entry)
        max_batch = min(max_batch, int(entry["max_batch"]))
    prep = torch.device("cpu") if backend == "tensorrt" else dev
    engine = Engine(bundle, runner, backend, precision, dev, max_batch=max_batch, prep_device=prep)
    log.info("engine: %s", engine.describe())
    return engine


def torch_runs(precision: str, device: torch.device) -> bool:
    """Whether the torch backend runs `precision` on `device` (torch_runner refuses the rest)."""
    return (precision == "fp32" or (precision == "bf16" and native_bf16(device))
            or (precision == "fp16" and device.type == "cuda"))


def auto_backend(bundle: Bundle, device: torch.device, precision: str | None) -> str:
    """TensorRT where present with a plan for this GPU, else PyTorch; a precision PyTorch does not
    run here (int8 anywhere, fp16 on a CPU) from the built engine that has it."""
    present = available_backends(device)
    if "tensorrt" in present and find_engine(bundle, "tensorrt", precision) is not None:
        return "tensorrt"
    if precision is None or torch_runs(precision, device):
        return "torch"
    for backend, kind in (("tensorrt", "tensorrt"), ("onnxruntime", "onnx")):
        if backend in present and find_engine(bundle, kind, precision) is not None:
            return backend
    if device.type == "cpu" and importlib.util.find_spec("onnxruntime") is None and \
            find_engine(bundle, "onnx", precision) is not None:
        from .onnx_engine import require_onnx
        require_onnx(("onnxruntime",))  # the engine is built: what is missing is what runs it
    if precision in TORCH_PRECISIONS:  # fp16 on a CPU, bf16 where not native: torch says what to use instead
        return "torch"
    plans = [e for e in bundle.manifest.get("engines", []) if e["backend"] == "tensorrt" and e["precision"] == precision]
    if device.type == "cuda" and device.index not in (None, 0) and plans:  # see load_engine
        raise EngineError(f"--precision {precision}: PyTorch does not run it, and the TensorRT backend that runs "
                          f"{bundle.path}'s {precision} plan runs on the first visible GPU only; make that GPU the only "
                          "visible one with CUDA_VISIBLE_DEVICES (its index as nvidia-smi counts) and give --device cuda")
    kind = "tensorrt" if device.type == "cuda" else "onnx"
    raise EngineError(f"--precision {precision}: PyTorch does not run it and {bundle.path} has no {precision} engine "
                      f"for this device; build one with {build_command(bundle, kind, precision)}")


def model_digest(bundle: Bundle) -> str:
    """Fingerprint of what an engine bakes in: the weights and every statistic. An engine whose
    digest differs from its bundle's (e.g. after `ustudents calibrate`) is stale."""
    import hashlib
    import json
    baked = {"weights": bundle.manifest["weights"]["sha256"], "statistics": bundle.manifest["statistics"],
             "image_size": bundle.image_size}
    if "alignment" in bundle.manifest.get("input", {}):  # the padding; absent before format 4 (digests kept)
        baked["alignment"] = bundle.alignment
    stats = json.dumps(baked, sort_keys=True)
    return hashlib.sha256(stats.encode()).hexdigest()


def build_command(bundle: Bundle, backend: str, precision: str | None) -> str:
    """The `ustudents build-engines` command that makes the engine of `backend` ('onnx', 'tensorrt')
    and `precision`, with what int8 cannot be built without."""
    cmd = f"ustudents build-engines {shlex.quote(str(bundle.path))} --backend {backend}"
    if precision:
        cmd += f" --precision {precision}"
    if precision == "int8":
        cmd += " --calibration-images GOOD_IMAGES_DIR"
    return f"`{cmd}`"


def verified_file(bundle: Bundle, entry: dict) -> Path:
    from .bundle import sha256_file
    path = bundle.path / entry["file"]
    if not path.is_file():
        raise EngineError(f"{path}: engine file missing; rebuild it with "
                          f"{build_command(bundle, entry['backend'], entry['precision'])}")
    if sha256_file(path) != entry["sha256"]:
        raise EngineError(f"{path}: checksum mismatch, the engine file is damaged; rebuild it with "
                          f"{build_command(bundle, entry['backend'], entry['precision'])}")
    return path


def find_engine(bundle: Bundle, backend: str, precision: str | None) -> dict | None:
    """The bundle's built engine for `backend` (and precision, if given) that matches the bundle's
    current weights and statistics; for TensorRT only one built for this machine's GPU and TensorRT
    version counts. Without a precision, the most faithful one built (fp32, then fp16, then int8),
    whatever the order they were built in: a reduced precision runs only when asked for or alone."""
    found = []
    for entry in bundle.manifest.get("engines", []):
        if entry["backend"] != backend or (precision is not None and entry["precision"] != precision):
            continue
        if entry.get("model_digest") != model_digest(bundle):
            continue
        if backend == "tensorrt":
            from .tensorrt_build import plan_mismatch
            if plan_mismatch(entry) is not None:
                continue
        found.append(entry)
    return min(found, key=lambda e: PRECISIONS.index(e["precision"]), default=None)


def require_engine(bundle: Bundle, backend: str, precision: str | None) -> dict:
    entry = find_engine(bundle, backend, precision)
    if entry is not None:
        return entry
    built = sorted((e for e in bundle.manifest.get("engines", []) if e["backend"] == backend
                    and (precision is None or e["precision"] == precision)),
                   key=lambda e: ENGINE_PRECISIONS.index(e["precision"]))  # listed as calibrate lists them
    want = f" {precision}" if precision else ""
    cmd_backend = "onnx" if backend == "onnx" else "tensorrt"
    stale = [e for e in built if e.get("model_digest") != model_digest(bundle)]
    if stale:
        commands = " and ".join(build_command(bundle, cmd_backend, e["precision"]) for e in stale)
        raise EngineError(f"{bundle.path}: its {backend}{want} engine was built before the model's weights or statistics "
                          f"changed (e.g. by `ustudents calibrate`); rebuild with {commands}")
    if backend == "tensorrt" and built:
        from .tensorrt_build import plan_mismatch
        reasons = "; ".join(f"{e['file']}: {plan_mismatch(e)}" for e in built)
        commands = " and ".join(build_command(bundle, "tensorrt", e["precision"]) for e in built)
        raise EngineError(f"{bundle.path}: no usable TensorRT{want} plan ({reasons}); rebuild with {commands}")
    if precision is not None and precision not in ENGINE_PRECISIONS:
        raise EngineError(f"--precision {precision}: built {cmd_backend} engines are {', '.join(ENGINE_PRECISIONS)}; "
                          f"choose one of those, or --backend torch for {precision}")
    raise EngineError(f"{bundle.path}: has no {backend}{want} engine; build one with "
                      f"{build_command(bundle, cmd_backend, precision)}")
