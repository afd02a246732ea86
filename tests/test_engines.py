"""The inference API behind every backend: frames of any size in, maps/scores/masks out; ONNX
engines built into the bundle and checked against PyTorch; TensorRT decisions (tested without
TensorRT) and the TensorRT path itself where TensorRT exists."""
from __future__ import annotations

import contextlib
import dataclasses
import importlib.util
import json
import os
import re
import shutil
import sys
import threading
import time
import warnings
from pathlib import Path

import cv2
import numpy as np
import pytest
import torch
from click.testing import CliRunner

from conftest import TINY_CATEGORY, made_once
from ustudents.cli import main
from ustudents.engines.bundle import MANIFEST, load_bundle, update_manifest
from ustudents.engines.images import ImageError, read_image, resize, to_8_bit, to_tensor
from ustudents.engines.onnx_engine import TOLERANCE, build_onnx
from ustudents.engines.patchnet import PatchNet
from ustudents.engines import runtime
from ustudents.engines.runtime import Engine, EngineError, load_engine, preprocess
from ustudents.engines.tensorrt_build import (context_gpu_mismatch, network_flags, plan_entry, plan_file, plan_mismatch,
                                              profile_shapes, timing_cache_file)

pytest.importorskip("onnxruntime", reason="onnxruntime not installed (pip install 'ustudents[onnx]')")


def invoke(*args):
    return CliRunner().invoke(main, [str(a) for a in args])


def test_images(root: Path) -> list[Path]:
    return sorted((root / TINY_CATEGORY / "test").rglob("*.*"))


test_images.__test__ = False


@pytest.fixture()
def bundle_copy(small_bundle, tmp_path) -> Path:
    return Path(shutil.copytree(small_bundle, tmp_path / "model"))


@pytest.fixture(scope="module")
def built_bundle(small_bundle, tiny_mvtec, tmp_path_factory) -> Path:
    """small_bundle with fp32 and fp16 ONNX engines built (max batch 2, parity checked on two real
    test images), once. Read-only: copy it before changing anything."""
    def make(folder: Path) -> None:
        path = Path(shutil.copytree(small_bundle, folder / "model"))
        frames = [read_image(p) for p in test_images(tiny_mvtec)[:2]]
        for precision in ("fp32", "fp16"):
            build_onnx(load_bundle(path), precision, frames=frames)

    return made_once(tmp_path_factory, "built-bundle", make) / "model"


@pytest.fixture(scope="module")
def eval_root(tiny_mvtec, tmp_path_factory) -> Path:
    """tiny_mvtec with its test set cut to two images per type (good, scratch, spot; their masks stay):
    evaluate still sees every defect type and both labels, at half the forward passes. Read-only."""
    root = Path(shutil.copytree(tiny_mvtec, tmp_path_factory.mktemp("eval") / "root"))
    for folder in sorted((root / TINY_CATEGORY / "test").iterdir()):
        for f in sorted(folder.iterdir())[2:]:
            f.unlink()
    return root


def good_images(tiny_mvtec: Path, folder: Path, n: int) -> Path:
    """A folder of the first n of tiny_mvtec's train/good images."""
    folder.mkdir()
    for f in sorted((tiny_mvtec / TINY_CATEGORY / "train" / "good").iterdir())[:n]:
        shutil.copy(f, folder)
    return folder


def built_entry(bundle: Path, precision: str) -> dict:
    (entry,) = [e for e in load_bundle(bundle).manifest["engines"] if e["precision"] == precision]
    return entry


# ------------------------------------------------------------------------- preprocessing and API

def test_engine_preprocessing_equals_training_preprocessing():
    """Calibration statistics hold in production only if the engine feeds the networks exactly
    what training and calibration fed them: `images.resize` then [0, 1] scaling."""
    rng = np.random.default_rng(0)
    frames = [rng.integers(0, 256, (70, 90, 3), dtype=np.uint8),   # shrink, not square
              rng.integers(0, 256, (40, 50), dtype=np.uint8),      # gray, enlarge
              rng.integers(0, 256, (64, 64, 3), dtype=np.uint8)]   # already the model's size
    got = preprocess(frames, 64, torch.device("cpu"))
    gray_as_rgb = np.repeat(frames[1][:, :, None], 3, axis=2)
    want = to_tensor(np.stack([resize(frames[0], 64), resize(gray_as_rgb, 64), frames[2]]))
    assert torch.equal(got, want)


@pytest.mark.slow
def test_predict_gives_map_score_and_mask_at_the_frames_size(small_bundle, tiny_mvtec):
    engine = load_engine(small_bundle, backend="torch", device="cpu", precision="fp32")
    frames = [read_image(p) for p in test_images(tiny_mvtec)[:3]]
    frames.append(frames[0][:, :, 0].copy())  # a gray frame as a mono camera delivers it
    preds = engine.predict(frames)
    fused, _ = engine.maps(frames)
    for frame, pred, m in zip(frames, preds, fused):
        assert pred.anomaly_map.shape == pred.mask.shape == frame.shape[:2]
        # Scored at the model's resolution. The first call plans the FFT (its layers return the direct
        # convolution's outputs) and the second runs the plan: equal up to float rounding.
        assert pred.score == pytest.approx(float(m.max()), rel=1e-5)
        assert pred.anomalous == (pred.score >= engine.image_threshold)
        assert np.array_equal(pred.mask, pred.anomaly_map.astype(np.float64) >= engine.mask_threshold)
    assert engine.image_threshold == engine.mask_threshold  # few validation images: the maximum's rule
    # maps=False (the worker without overlays): the same verdicts and masks, without the full-size maps
    for full, lean in zip(preds, engine.predict(frames, maps=False)):
        assert lean.anomaly_map is None and lean.mask_level is None
        assert (lean.score, lean.anomalous) == pytest.approx((full.score, full.anomalous), rel=1e-5)
        assert np.array_equal(lean.mask, full.mask)
    assert preds[3].score == pytest.approx(preds[0].score, abs=1e-5)  # gray = its RGB replica
    assert engine.describe() == "torch fp32 on cpu"
    with pytest.raises(ImageError, match=r"to_8_bit\(frame, engine.bundle.uint16_bits\)"):  # bits: the bundle's
        engine.predict([frames[0].astype(np.uint16) * 16])
    assert engine.predict([to_8_bit(frames[0].astype(np.uint16) << 8, 16)])[0].score == pytest.approx(preds[0].score)



def test_an_anomalous_frame_has_a_mask_and_a_good_one_none_at_the_threshold_itself(small_bundle):
    """The map rule promises anomalous = a non-empty mask. The mask compared the map with the threshold
    rounded to float32 (a map just under it: a whole mask on a frame judged good), and bilinear
    resizing to the frame could lower a peak just over it below it (anomalous, no mask)."""
    bundle = load_bundle(small_bundle)
    assert bundle.mask_rule == "map"
    size, level = bundle.image_size, np.float32(15.5)
    peak = torch.zeros(size, size)
    peak[5, 7] = float(level) + 0.01  # one pixel just over the threshold
    maps = {"flat": torch.full((size, size), float(level)), "peak": peak}
    shown = []
    engine = Engine(bundle, lambda x: (maps[shown[-1]].expand(len(x), -1, -1),
                                       maps[shown[-1]].expand(len(x), 1, -1, -1)), "torch", "fp32", torch.device("cpu"))
    # a recorded threshold a little over a float32 value: float32 rounds it down onto the flat map
    engine.mask_threshold = engine.image_threshold = float(level) + 1e-7
    assert np.float32(engine.mask_threshold) == level
    shown.append("flat")
    (flat,) = engine.predict([np.zeros((size, size, 3), np.uint8)])
    assert not flat.anomalous and not flat.mask.any()
    shown.append("peak")
    class SdkBuffer:  # a camera SDK's image object (PIL's Image too): np.asarray reads it, it has no .shape
        def __array__(self, dtype=None, copy=None):
            return np.zeros((3 * size + 1, 2 * size + 3, 3), np.uint8)

    (pred,) = engine.predict([SdkBuffer()])
    assert pred.anomalous and pred.anomaly_map.max() < engine.mask_threshold  # the resize lowered the peak
    assert pred.mask.shape == (3 * size + 1, 2 * size + 3) and pred.mask.any()
    rows, cols = np.nonzero(pred.mask)  # the peak's pixel, nearest-resized: where the defect is
    assert 5 * 3 <= rows.min() <= rows.max() <= 6 * 3 + 1 and 7 * 2 <= cols.min() <= cols.max() <= 8 * 2 + 1

def _peak_engine(bundle, peak: torch.Tensor) -> Engine:
    """An Engine of `bundle` whose networks give the map `peak` for every frame."""
    return Engine(bundle, lambda x: (peak.expand(len(x), -1, -1), peak.expand(len(x), 1, -1, -1)), "torch", "fp32",
                  torch.device("cpu"))


def test_an_anomalous_frame_smaller_than_the_model_has_a_mask_wherever_its_peak_is(small_bundle):
    """Shrinking the map to a frame smaller than the model (images of a small part, a Python caller's
    crop) stepped over a one-pixel peak, and the fallback, nearest resizing, skipped the same model
    rows: an anomalous frame with an empty mask at 136 of 361 peak positions on a 48 x 48 frame of a
    64 px model (an audit). The mask now holds the frame pixels whose footprint holds the peak."""
    bundle = load_bundle(small_bundle)
    size, level = bundle.image_size, 15.5
    h, w = size * 3 // 4, size // 2 + 3  # 24 x 19 at 32 px: both sides shrink, by different factors
    for r in range(size):
        for c in range(size):
            peak = torch.zeros(size, size)
            peak[r, c] = level + 0.01
            engine = _peak_engine(bundle, peak)
            engine.mask_threshold = engine.image_threshold = level
            (pred,) = engine.predict([np.zeros((h, w, 3), np.uint8)])
            assert pred.anomalous and pred.mask.shape == (h, w), (r, c)
            rows, cols = np.nonzero(pred.mask)
            assert len(rows), (r, c)
            # frame pixel i covers model rows [i * size / h, (i + 1) * size / h)
            assert all(i * size // h <= r < -(-(i + 1) * size // h) for i in rows), (r, c, rows)
            assert all(j * size // w <= c < -(-(j + 1) * size // w) for j in cols), (c, cols)


def test_evaluate_overlays_draw_the_mask_predict_gives(small_bundle, tmp_path):
    """`evaluate --overlays` thresholded the resized map alone, without predict's fallback for a peak
    that resizing lowers below the threshold: predict gave an anomalous frame a mask, the overlay of
    the same image outlined nothing (an audit). Both draw one mask now."""
    from ustudents.engines.overlay import heatmap_overlay
    from ustudents.train.dataset import Sample
    from ustudents.train.evaluate import write_overlays

    bundle = load_bundle(small_bundle)
    size, level = bundle.image_size, 15.5
    peak = torch.zeros(size, size)
    peak[5, 7] = level + 0.01
    engine = _peak_engine(bundle, peak)
    engine.mask_threshold = engine.image_threshold = level
    image = tmp_path / "part.png"
    cv2.imwrite(str(image), np.full((3 * size + 1, 2 * size + 3, 3), 90, np.uint8))
    frame = read_image(image, bundle.uint16_bits)
    (pred,) = engine.predict([frame])
    assert pred.anomalous and pred.mask.any() and pred.anomaly_map.max() < level  # the fallback's case
    fused, _ = engine.maps([frame])
    write_overlays(tmp_path / "overlays", [Sample(image, "spot")], engine, fused, engine.image_scores(fused))
    drawn = cv2.imread(str(tmp_path / "overlays" / "spot" / "part.png"), cv2.IMREAD_COLOR)
    expected = heatmap_overlay(frame, pred.mask_level, engine.mask_threshold, pred.mask)
    assert np.array_equal(drawn, cv2.cvtColor(expected, cv2.COLOR_RGB2BGR))


def test_frames_the_engine_would_misread_are_refused_by_their_place_in_the_list(small_bundle, tiny_mvtec):
    """Resized to the model's size, a 1 x 5000 strip or a 1-pixel frame got a confident verdict; a
    4-channel frame was read as RGBA, where OpenCV and most camera SDKs give BGRA; one array passed
    for the list was taken apart row by row (a numpy truth-value error)."""
    engine = load_engine(small_bundle, backend="torch", device="cpu", precision="fp32", max_batch=2)
    frame = read_image(test_images(tiny_mvtec)[0])
    h, w = frame.shape[:2]
    cases = [([frame, np.zeros((1, 5000, 3), np.uint8)], "frame 1: a frame of 5000 x 1 pixels, under 16 on a side"),
             ([np.zeros((15, 640), np.uint8)], "frame 0: a frame of 640 x 15 pixels"),
             ([np.dstack([frame, np.full((h, w), 255, np.uint8)])], r"frame 0: 4 channels, shape .* "
                                                                     r"cv2.COLOR_BGRA2RGB"),
             (frame, rf"frames: one array of shape \({h}, {w}, 3\), where a list of frames goes; pass \[frame\]"),
             (torch.from_numpy(np.stack([frame] * 2)), rf"one array of shape \(2, {h}, {w}, 3\)")]
    for frames, says in cases:
        with pytest.raises(ImageError, match=says):
            engine.predict(frames)
    with pytest.raises(ImageError, match="frame 3: a frame of 5000 x 1 pixels"):  # its place past the first batch
        engine.predict([frame] * 3 + [np.zeros((1, 5000, 3), np.uint8)])
    read_only = np.frombuffer(frame.tobytes(), np.uint8).reshape(frame.shape)  # a camera SDK's buffer
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # torch's "not writable ... undefined behavior" warning
        got = engine.predict(iter([read_only, frame]))  # any iterable of frames
    assert got[0].score == got[1].score


def test_check_frame_refuses_what_predict_refuses_and_a_shape_the_model_never_saw(small_bundle, tiny_mvtec):
    """An integrator's capture loop had no way to drop a bad frame before it failed its batch, and
    predict judges a frame of any shape, which the worker dead-letters and `ustudents predict`
    refuses (a 40 x 600 strip got a confident verdict through the API; audit)."""
    from ustudents.engines.frame_shapes import UnexpectedShape

    engine = load_engine(small_bundle, backend="torch", device="cpu", precision="fp32")
    frame = read_image(test_images(tiny_mvtec)[0])
    bad = [frame.astype(np.float32), frame.astype(np.uint16), np.dstack([frame, frame[..., :1]]),
           np.zeros((15, 40), np.uint8), frame[..., :2], np.zeros((0, 0), np.uint8)]
    for i, f in enumerate([frame, frame[:, ::-1], frame[..., 0]] + bad):
        said = None
        try:
            engine.check_frame(f, f"frame {i}")
        except ImageError as err:
            said = str(err)
        with pytest.raises(ImageError) if said else contextlib.nullcontext():
            engine.predict([f])
        assert (said is None) == (i < 3) and (said is None or said.startswith(f"frame {i}: ")), said
    strip = np.zeros((600, 40, 3), np.uint8)
    with pytest.raises(UnexpectedShape, match=rf"cam7: 40 x 600 pixels .*\(ustudents calibrate {re.escape(str(small_bundle))} "
                                              r"--images DIR --out COPY"):
        engine.check_frame(strip, "cam7")
    assert len(engine.predict([strip])) == 1  # predict itself judges it: the check is the caller's


def test_one_engine_shared_by_threads_gives_each_its_own_maps(small_bundle):
    """A CUDA graph's and a TensorRT plan's output buffers belong to the runner: two threads' batches
    of one size overwrote each other's maps before they were copied out (audit, by reading). Here a
    runner with one shared output buffer, as theirs."""
    engine = load_engine(small_bundle, backend="torch", device="cpu", precision="fp32")
    size = engine.image_size
    shared_fused, shared_scales = torch.empty(1, size, size), torch.empty(1, 1, size, size)

    def runner(x):
        shared_fused.copy_(x.mean().expand(1, size, size))  # each thread's frame says which it is
        time.sleep(0.02)  # another thread's batch gets in here
        shared_scales.copy_(shared_fused[:, None])
        return shared_fused, shared_scales
    engine.runner = runner
    frames = {k: np.full((size, size, 3), 40 * k, np.uint8) for k in range(1, 5)}
    got, errors = {}, []

    def call(k):
        try:
            got[k] = [engine.maps([frames[k]])[0][0, 0, 0].item() for _ in range(5)]
        except Exception as err:  # noqa: BLE001
            errors.append(err)
    threads = [threading.Thread(target=call, args=(k,)) for k in frames]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert errors == []
    assert got == {k: [pytest.approx(40 * k / 255)] * 5 for k in frames}


def test_a_threads_frames_are_resized_while_another_threads_run_in_the_networks(small_bundle, monkeypatch):
    """The engine's lock (one call in the networks at a time) also held the resizing and upload, so
    threads sharing an engine waited on each other's preprocessing (36 MP frames: seconds) too."""
    engine = load_engine(small_bundle, backend="torch", device="cpu", precision="fp32")
    size = engine.image_size
    inside, prepared_meanwhile = threading.Event(), threading.Event()
    overlapped = []

    def preprocess(frames, *args, **kwargs):
        if inside.is_set():
            prepared_meanwhile.set()
        return real(frames, *args, **kwargs)
    real = runtime.preprocess
    monkeypatch.setattr(runtime, "preprocess", preprocess)

    def runner(x):
        if not inside.is_set():  # the first thread's call: the second's frames are resized meanwhile
            inside.set()
            overlapped.append(prepared_meanwhile.wait(10))
        return torch.zeros(len(x), size, size), torch.zeros(len(x), 1, size, size)
    engine.runner = runner
    frame = np.zeros((size, size, 3), np.uint8)
    first = threading.Thread(target=engine.maps, args=([frame],))
    first.start()
    assert inside.wait(30)
    engine.maps([frame])
    first.join(30)
    assert overlapped == [True]


@pytest.mark.slow
def test_position_score_is_the_standardized_maximum_against_the_image_threshold(position_bundle, tiny_mvtec):
    engine = load_engine(position_bundle, backend="torch", device="cpu", precision="fp32")
    bundle = load_bundle(position_bundle)
    mean, std = bundle.position_statistics()
    frames = [read_image(p) for p in test_images(tiny_mvtec)]
    fused, _ = engine.maps(frames)
    preds = engine.predict(frames)
    assert bundle.mask_rule == "position_z" and bundle.mask_threshold <= bundle.image_threshold
    for frame, pred, m in zip(frames, preds, fused):
        z = (m - mean) / std
        assert pred.score == pytest.approx(float(z.max()), rel=1e-5)
        assert pred.anomalous == (pred.score >= bundle.image_threshold)
        # the mask: the standardized map at the frame's size over the mask threshold, on flagged frames only
        level = runtime.map_to_frame(z, frame.shape[:2]).numpy()
        assert np.allclose(pred.mask_level, level, atol=1e-4)
        assert np.array_equal(pred.mask, (pred.mask_level >= bundle.mask_threshold) & pred.anomalous)
    # at the model's resolution a flagged frame always shows where, and a good one has no mask
    model_size = engine.masks(fused, engine.image_scores(fused))
    assert model_size.flatten(1).any(1).tolist() == [p.anomalous for p in preds]
    assert {p.anomalous for p in preds} == {True, False}  # both kinds of frame were checked


@pytest.mark.slow
def test_a_version_2_bundle_keeps_masking_the_map_itself(position_bundle, tmp_path, tiny_mvtec):
    old = Path(shutil.copytree(position_bundle, tmp_path / "v2"))
    manifest = json.loads((old / MANIFEST).read_text())
    manifest["format_version"] = 2
    manifest["threshold"] = {"value": 6.0, "method": "pixel_fpr"}  # what version 2 wrote: a threshold on the map
    (old / MANIFEST).write_text(json.dumps(manifest))
    engine = load_engine(old, backend="torch", device="cpu", precision="fp32")
    assert engine.mask_rule == "map"
    for pred in engine.predict([read_image(p) for p in test_images(tiny_mvtec)]):
        assert np.array_equal(pred.mask, pred.anomaly_map >= 6.0) and pred.mask_level is pred.anomaly_map


def test_bad_backend_and_precision_requests_are_refused_clearly(tiny_bundle):
    with pytest.raises(EngineError, match="build-engines"):
        load_engine(tiny_bundle, backend="onnxruntime", device="cpu")
    with pytest.raises(EngineError, match="fp16"):
        load_engine(tiny_bundle, backend="torch", device="cpu", precision="fp16")
    with pytest.raises(EngineError, match="GPU"):
        load_engine(tiny_bundle, backend="tensorrt", device="cpu")
    # a command the user can run: build-engines makes no bf16 engines, torch runs bf16 itself
    with pytest.raises(EngineError, match="built onnx engines are fp32, fp16, int8; choose one of those, or "
                                          "--backend torch for bf16"):
        load_engine(tiny_bundle, backend="onnxruntime", device="cpu", precision="bf16")
    # auto with a precision only built engines have: says what to build, not what torch lacks
    with pytest.raises(EngineError, match=r"--precision int8: PyTorch does not run it and .* has no int8 engine for "
                                          r"this device; build one with `ustudents build-engines \S+ --backend onnx "
                                          r"--precision int8 --calibration-images GOOD_IMAGES_DIR`"):
        load_engine(tiny_bundle, backend="auto", device="cpu", precision="int8")
    for bad in (0, 2.5, "4", True):  # a float or string went through, to fail inside the first predict
        with pytest.raises(EngineError, match=f"max batch {bad!r}: must be a whole number, at least 1"):
            load_engine(tiny_bundle, backend="torch", device="cpu", max_batch=bad)
    for bad in ("gpu", "mps", 3.5):  # torch's own error lists 20 device types ustudents does not run on
        with pytest.raises(EngineError, match=f"--device {bad}: .*give auto, cpu, cuda or cuda:N"):
            load_engine(tiny_bundle, backend="torch", device=bad)


def test_torch_runs_by_default_in_the_precision_the_bundle_was_calibrated_in_where_native(tiny_bundle, monkeypatch):
    bundle = load_bundle(tiny_bundle)  # trained with --amp off: calibrated in fp32
    cpu = torch.device("cpu")
    assert runtime.default_torch_precision(bundle, cpu) == "fp32"
    bundle.manifest["threshold"]["precision"] = "bf16"  # as `ustudents train --amp on` records it
    monkeypatch.setattr(runtime, "native_bf16", lambda device: False)
    assert runtime.default_torch_precision(bundle, cpu) == "fp32"  # emulated bf16 would be slow: fp32
    monkeypatch.setattr(runtime, "native_bf16", lambda device: True)
    assert runtime.default_torch_precision(bundle, cpu) == "bf16"
    engine = load_engine(bundle, backend="auto", device="cpu")
    assert (engine.backend, engine.precision) == ("torch", "bf16")
    assert load_engine(bundle, backend="auto", device="cpu", precision="fp32").precision == "fp32"  # asked wins


def test_on_a_gpu_the_default_is_fp16_unless_the_bundle_was_calibrated_in_native_bf16(tiny_bundle, monkeypatch):
    # fp16 kept au_pro_30 within 1e-5 of fp32 on an H200, at 7.5x fp32's speed (runtime.default_torch_precision)
    bundle = load_bundle(tiny_bundle)  # calibrated in fp32
    gpu = torch.device("cuda")
    assert runtime.default_torch_precision(bundle, gpu) == "fp16"
    bundle.manifest["threshold"]["precision"] = "bf16"
    monkeypatch.setattr(runtime, "native_bf16", lambda device: True)
    assert runtime.default_torch_precision(bundle, gpu) == "bf16"


def test_warm_up_leaves_no_fft_scratch_memory_held_by_its_thread(tiny_bundle):
    """A worker warms up on its main thread and serves from another; the FFT workspace is per thread,
    so the warming thread's (1.2 GB for the 3-scale model at 256 px) would otherwise be held for the
    process's life."""
    from ustudents.engines.fftconv import WORKSPACE

    engine = load_engine(tiny_bundle, backend="torch", device="cpu", precision="fp32")
    WORKSPACE.get("probe", (1024,), torch.zeros(1))  # as a planned FFT layer's first call leaves it
    engine.warm_up()
    assert WORKSPACE.buffers == {}


def test_first_dense_calls_from_two_threads_measure_once_and_agree():
    """The first dense pass times every form and frees the slower ones; a second thread's first call
    meanwhile must wait for it, not look up a freed form (KeyError, found in review)."""
    torch.manual_seed(0)
    net = PatchNet(17, 2).eval().use_fastest_form()
    x = torch.rand(1, 3, 16 + 16, 16 + 16)
    ref = PatchNet(17, 2).eval()
    ref.load_state_dict(net.state_dict())
    out, errors = {}, []

    def call(k):
        try:
            out[k] = net.dense(x)
        except Exception as err:  # noqa: BLE001
            errors.append(err)

    threads = [threading.Thread(target=call, args=(k,)) for k in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert errors == [] and len(net.forms) == 1
    for y in out.values():
        assert torch.allclose(y, ref.dense(x), atol=1e-4)


def test_warm_up_pays_the_first_call_once_per_batch_size_the_runner_keeps(tiny_bundle, monkeypatch):
    engine = load_engine(tiny_bundle, backend="torch", device="cpu", precision="fp32", max_batch=3)
    sizes = []
    runner = engine.runner
    engine.runner = lambda x: (sizes.append(x.shape[0]), runner(x))[1]
    engine.warm_up()
    assert sizes == [1]  # on CPU no graphs: one frame plans the model
    sizes.clear()
    monkeypatch.setattr(runtime, "GraphedRunner", type(engine.runner))  # as if it kept a CUDA graph per size
    engine.warm_up()
    assert sizes == [1, 2, 3]


@pytest.mark.slow
def test_auto_backend_on_cpu_takes_torch_the_fastest_even_with_an_onnx_engine(bundle_copy):
    # PyTorch with FFT convolutions beat ONNX Runtime fp32 in the same benchmark run (README).
    build_onnx(load_bundle(bundle_copy), "fp32")
    engine = load_engine(bundle_copy, backend="auto", device="cpu")
    assert (engine.backend, engine.precision) == ("torch", "fp32")
    assert load_engine(bundle_copy, backend="onnxruntime", device="cpu").backend == "onnxruntime"


def test_auto_on_cpu_takes_a_built_fp16_engine_for_fp16_which_pytorch_runs_on_gpus_only(small_bundle, built_bundle):
    """auto with --precision fp16 on a CPU took torch, which refuses fp16 there, though the bundle had
    a built fp16 ONNX engine (the README says auto takes the built engine that has it)."""
    with pytest.raises(EngineError, match="PyTorch's fp16 convolutions on CPU"):  # none built: torch says why
        load_engine(small_bundle, backend="auto", device="cpu", precision="fp16")
    engine = load_engine(built_bundle, backend="auto", device="cpu", precision="fp16")
    assert (engine.backend, engine.precision) == ("onnxruntime", "fp16")


def test_without_the_onnx_extra_onnx_engines_are_refused_in_one_line(bundle_copy, tiny_mvtec, tmp_path, monkeypatch):
    """Without `pip install 'ustudents[onnx]'` build-engines (its default backend) and --backend
    onnxruntime ended in ImportError tracebacks."""
    monkeypatch.setitem(sys.modules, "onnx", None)  # not importable, as where the extra is missing
    result = invoke("build-engines", bundle_copy)
    assert result.exit_code == 2 and "onnx not installed here" in result.output, result.output
    assert "pip install 'ustudents[onnx]'" in result.output and "Traceback" not in result.output
    assert not (bundle_copy / "engines").exists() or not any((bundle_copy / "engines").iterdir())
    monkeypatch.setitem(sys.modules, "onnxruntime", None)
    image = test_images(tiny_mvtec)[0]
    result = invoke("predict", bundle_copy, image, "--out", tmp_path / "p", "--backend", "onnxruntime")
    assert result.exit_code == 2 and "onnxruntime not installed here" in result.output, result.output


def test_device_takes_cuda_n_as_the_messages_offer_and_refuses_what_is_no_device(bundle_copy, tiny_mvtec, tmp_path):
    image = test_images(tiny_mvtec)[0]
    result = invoke("predict", bundle_copy, image, "--out", tmp_path / "p", "--device", "cuda:1")
    assert result.exit_code == 2 and "is not one of" not in result.output, result.output  # checked by load_engine
    if not torch.cuda.is_available():
        assert "--device cuda:1: PyTorch sees no CUDA GPU here" in result.output, result.output  # as written
    result = invoke("predict", bundle_copy, image, "--out", tmp_path / "p", "--device", "gpu")
    assert result.exit_code == 2 and "'gpu': give auto, cpu, cuda or cuda:N" in result.output, result.output


def test_a_gpu_index_past_the_visible_gpus_is_refused_with_what_is_there(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    monkeypatch.setattr(torch.cuda, "set_device", lambda device: None)
    assert runtime.resolve_device("cuda:0") == torch.device("cuda:0")
    with pytest.raises(EngineError, match=r"--device cuda:1: PyTorch sees 1 GPU\(s\) here, cuda:0 to cuda:0"):
        runtime.resolve_device("cuda:1")


def test_a_gpu_chosen_by_index_becomes_the_processs_current_one(monkeypatch):
    """--device cuda:1 put the networks on GPU 1 while what takes no device (torch.cuda.synchronize in
    the timing of the dense forms, CUDA graph capture) acted on GPU 0, the current one."""
    made_current = []
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    monkeypatch.setattr(torch.cuda, "set_device", made_current.append)
    assert runtime.resolve_device("cuda:1") == torch.device("cuda:1")
    assert made_current == [torch.device("cuda:1")]
    runtime.resolve_device("cuda")  # PyTorch's current GPU: left as it is
    assert made_current == [torch.device("cuda:1")]


def test_the_engines_gpu_is_current_in_every_thread_that_calls_it(small_bundle, monkeypatch):
    """torch.cuda.set_device is per thread: --device cuda:1 made GPU 1 current in the thread that loaded
    the engine, while a worker's inference thread ran it with GPU 0 current (a CUDA graph captured, a
    synchronize timed, on GPU 0). Faked here: the calls made current, by thread."""
    import contextlib

    made_current = []

    @contextlib.contextmanager
    def current(device):
        made_current.append((threading.current_thread().name, torch.device(device)))
        yield
    monkeypatch.setattr(torch.cuda, "device", current)
    engine = load_engine(small_bundle, backend="torch", device="cpu", precision="fp32")
    engine.device = torch.device("cuda:1")  # its networks' device; frames stay on the CPU (prep_device) here
    frame = np.zeros((engine.image_size, engine.image_size, 3), np.uint8)
    inference = threading.Thread(target=engine.maps, args=([frame],), name="worker-inference")
    inference.start()
    inference.join(60)
    assert made_current == [("worker-inference", torch.device("cuda:1"))]


def test_a_write_error_inside_the_onnx_exporter_names_the_engine_file(bundle_copy, monkeypatch):
    """The exporter's own OSError (a full disk, `ulimit -f`) has no file name: the line read only
    'writing the output: File too large'."""
    import errno

    from ustudents.engines import onnx_engine

    def full(*args, **kwargs):
        raise OSError(errno.EFBIG, "File too large")

    monkeypatch.setattr(onnx_engine, "export_onnx", full)
    result = invoke("build-engines", bundle_copy)
    assert result.exit_code == 2 and "engines/model-fp32.onnx: File too large" in result.output, result.output
    assert not any(p.name.endswith(".partial") for p in bundle_copy.rglob("*"))


def test_commands_in_messages_can_be_pasted_for_a_bundle_path_with_a_space(bundle_copy, tmp_path):
    spaced = Path(shutil.move(bundle_copy, tmp_path / "my model"))
    with pytest.raises(EngineError, match=f"ustudents build-engines '{spaced}' --backend onnx`"):
        load_engine(spaced, backend="onnxruntime", device="cpu")


# ------------------------------------------------------------------------------- ONNX engines

@pytest.mark.slow
@pytest.mark.parametrize("precision", ["fp32", "fp16"])
def test_onnx_engine_matches_pytorch_on_real_images(built_bundle, tiny_mvtec, precision):
    frames = [read_image(p) for p in test_images(tiny_mvtec)[:4]]
    entry = built_entry(built_bundle, precision)  # the one engine of its precision the build recorded
    assert (built_bundle / entry["file"]).is_file() and entry["parity"]["ok"]

    ref = load_engine(built_bundle, backend="torch", device="cpu", precision="fp32")
    onnx = load_engine(built_bundle, backend="onnxruntime", device="cpu", precision=precision)
    assert onnx.precision == precision
    ref_maps, ref_scales = ref.maps(frames)
    maps, scales = onnx.maps(frames)  # 4 frames, 2 a batch (the engine's max)
    tol = TOLERANCE[precision]
    assert float((maps - ref_maps).abs().max()) <= tol
    assert float((scales - ref_scales).abs().max()) <= tol
    # Same masks wherever the reference is not within the tolerance of the threshold.
    for p, r in zip(onnx.predict(frames), ref.predict(frames)):
        decided = np.abs(r.anomaly_map - ref.mask_threshold) > tol
        assert np.array_equal(p.mask[decided], r.mask[decided])


@pytest.mark.slow
@pytest.mark.parametrize("failure", ["memory", "other"])
def test_an_onnx_runtime_failure_is_one_line_as_pytorchs_is(failure, built_bundle, tiny_mvtec, tmp_path, monkeypatch):
    """ONNX Runtime's errors derive from Exception alone: out of memory in a run (a small factory PC,
    a large --batch) ended predict and evaluate in a traceback, exit 1, where the torch backend said
    'out of memory: ...' in one line, exit 2."""
    from onnxruntime.capi.onnxruntime_pybind11_state import Fail

    from ustudents.engines import onnx_engine

    text = {"memory": "[ONNXRuntimeError] : 1 : FAIL : Non-zero status code returned while running Conv node. "
                      "Name:'/conv' Status Message: BFCArena::AllocateRawInternal Failed to allocate memory for "
                      "requested buffer of size 152635392",
            "other": "[ONNXRuntimeError] : 1 : FAIL : Non-zero status code returned while running Conv node"}[failure]

    def failing(session, feeds):
        raise Fail(text)

    monkeypatch.setattr(onnx_engine, "interruptible_run", failing)
    result = invoke("predict", built_bundle, test_images(tiny_mvtec)[0], "--out", tmp_path / "p",
                    "--backend", "onnxruntime", "--precision", "fp32")
    errors = [line for line in result.output.splitlines() if line.startswith("Error: ")]
    assert result.exit_code == 2 and len(errors) == 1 and "Traceback" not in result.output, result.output
    assert errors[0] == ("Error: out of memory: an allocation of 0.1 GiB failed; lower the options that size the "
                         "work (--batch, image or input sizes), or free memory") if failure == "memory" else \
        "ONNX Runtime failed running it ([ONNXRuntimeError]" in errors[0] and "build-engines" in errors[0], errors


@pytest.mark.slow
def test_the_fp16_engine_holds_its_networks_in_fp16_and_scores_in_fp32(built_bundle):
    """It was fp32 throughout, only its weights rounded to fp16 values (the export cast the model
    back to float): the same size as the fp32 engine, and a 'strongly typed' TensorRT plan from it
    would have run in fp32."""
    import onnx

    sizes = {}
    for precision in ("fp32", "fp16"):
        entry = built_entry(built_bundle, precision)
        sizes[precision] = (built_bundle / entry["file"]).stat().st_size
        graph = onnx.load(str(built_bundle / entry["file"])).graph
        kinds = {onnx.TensorProto.DataType.Name(t.data_type) for t in graph.initializer if len(t.dims) == 4}
        assert kinds == ({"FLOAT16"} if precision == "fp16" else {"FLOAT"}), kinds  # the convolution weights
        outputs = [onnx.TensorProto.DataType.Name(o.type.tensor_type.elem_type) for o in graph.output]
        assert outputs == ["FLOAT", "FLOAT"]  # the scoring head and its maps stay float32
    assert sizes["fp16"] < 0.6 * sizes["fp32"], sizes


def test_check_and_calibration_images_of_a_shape_the_model_does_not_know_are_refused(bundle_copy, tmp_path):
    """predict and the worker refuse such frames, build-engines took them: 16 x 2000 strips of noise set
    int8 ranges on textures no frame shows, and passed the parity check made on those same strips."""
    strips = tmp_path / "strips"
    strips.mkdir()
    rng = np.random.default_rng(0)
    for i in range(8):
        cv2.imwrite(str(strips / f"{i}.png"), rng.integers(0, 256, (16, 400, 3), dtype=np.uint8))
    for args, option in ((["--check-images", strips], "--check-images"),
                         (["--precision", "int8", "--calibration-images", strips], "--calibration-images")):
        result = invoke("build-engines", bundle_copy, *args)
        assert result.exit_code == 2, result.output
        assert (f"{strips / '0.png'}: 400 x 16 pixels (width/height 25.00), unlike every image the model was "
                "trained and calibrated on") in result.output
        assert f"give good images of those frames in {option}, after recalibrating a copy" in result.output
        assert not load_bundle(bundle_copy).manifest.get("engines")


@pytest.mark.slow
def test_int8_engine_is_symmetric_qdq_calibrated_on_good_images_and_matches_pytorch(bundle_copy, tiny_mvtec, tmp_path):
    import onnx

    from ustudents.engines.cli import MIN_CALIBRATION_IMAGES

    # as few good images as int8 ranges are built from (each is one calibration step and one parity image)
    good = good_images(tiny_mvtec, tmp_path / "good", MIN_CALIBRATION_IMAGES)
    refused = invoke("build-engines", bundle_copy, "--precision", "int8")
    assert refused.exit_code == 2 and "--calibration-images" in refused.output
    for args, needle in ((["--calibration-images", good], "only --precision int8 is calibrated (this is fp32)"),
                         (["--precision", "int8", "--calibration-images", good / "nope"], "nope: folder not found")):
        refused = invoke("build-engines", bundle_copy, *args)  # was ignored / said "no images"
        assert refused.exit_code == 2 and needle in refused.output, refused.output
    # no --check-images: parity on the good calibration images (int8 ranges saturate on noise)
    result = invoke("build-engines", bundle_copy, "--precision", "int8", "--calibration-images", good)
    assert result.exit_code == 0, result.output
    entry = load_bundle(bundle_copy).manifest["engines"][0]
    assert entry["parity"]["on"] == "real images"
    assert entry["precision"] == "int8" and entry["calibration"]["images"] == len(list(good.iterdir())) and entry["parity"]["ok"]

    # Explicit quantization as TensorRT takes it: every convolution's input and weights come
    # through DequantizeLinear of int8 with zero points all 0 (symmetric); no int32 (bias) DQ.
    graph = onnx.load(bundle_copy / entry["file"]).graph
    producers = {out: node for node in graph.node for out in node.output}
    convs = [n for n in graph.node if n.op_type == "Conv"]
    assert convs and all(producers[i].op_type == "DequantizeLinear" for n in convs for i in n.input[:2])
    zero_points = {t.name: onnx.numpy_helper.to_array(t) for t in graph.initializer if "zero_point" in t.name}
    assert zero_points and all(z.dtype == np.int8 and not z.any() for z in zero_points.values())

    frames = [read_image(p) for p in test_images(tiny_mvtec)]
    ref = load_engine(bundle_copy, backend="torch", device="cpu", precision="fp32")
    int8 = load_engine(bundle_copy, backend="onnxruntime", device="cpu", precision="int8")
    tol = TOLERANCE["int8"]
    # On defect images too: activation ranges have headroom over the good images, so a strong
    # defect does not saturate them.
    assert float((int8.maps(frames)[0] - ref.maps(frames)[0]).abs().max()) <= tol
    for p, r in zip(int8.predict(frames), ref.predict(frames)):
        decided = np.abs(r.anomaly_map - ref.mask_threshold) > tol
        assert np.array_equal(p.mask[decided], r.mask[decided])
    # Never picked behind the user's back: auto on CPU stays with fp32 engines, and with an fp32
    # engine built after it, onnxruntime without a precision runs fp32 (not the first built)
    assert load_engine(bundle_copy, backend="auto", device="cpu").backend == "torch"
    # ... and auto asked for int8 takes the engine that has it
    assert load_engine(bundle_copy, backend="auto", device="cpu", precision="int8").backend == "onnxruntime"
    assert invoke("build-engines", bundle_copy, "--precision", "fp32").exit_code == 0
    assert [e["precision"] for e in load_bundle(bundle_copy).manifest["engines"]] == ["int8", "fp32"]
    assert load_engine(bundle_copy, backend="onnxruntime", device="cpu").precision == "fp32"


@pytest.mark.slow
def test_build_engines_cli_and_evaluate_with_onnxruntime(bundle_copy, tiny_mvtec, eval_root, tmp_path):
    result = invoke("build-engines", bundle_copy, "--max-batch", "4",
                    "--check-images", tiny_mvtec / TINY_CATEGORY / "train" / "good")
    assert result.exit_code == 0, result.output
    assert "ONNX Runtime vs PyTorch on 8 real images" in result.output
    # --max-batch bounds a TensorRT plan; the ONNX engine's batch axis is dynamic: it records no limit
    # it would not keep (a worker batching 8 ran it at 8 beside a recorded 4)
    assert "max_batch" not in load_bundle(bundle_copy).manifest["engines"][0]
    assert load_engine(bundle_copy, backend="onnxruntime", device="cpu", max_batch=8).max_batch == 8
    runs = {}
    for backend in ("torch", "onnxruntime"):
        out = tmp_path / f"{backend}.json"
        r = invoke("evaluate", bundle_copy, "--data-root", eval_root, "--backend", backend,
                   "--precision", "fp32", "--device", "cpu", "--json", out)
        assert r.exit_code == 0, r.output
        runs[backend] = json.loads(out.read_text())
    assert runs["onnxruntime"]["backend"] == "onnxruntime"
    for key in ("image_auroc", "pixel_auroc", "au_pro_30"):
        assert runs["onnxruntime"][key] == pytest.approx(runs["torch"][key], abs=1e-3)


@pytest.mark.slow
def test_stale_or_damaged_engines_are_refused(bundle_copy, tiny_mvtec):
    bundle = load_bundle(bundle_copy)
    entry = build_onnx(bundle, "fp32")
    # Changed statistics (what `ustudents calibrate` does) make the baked-in engine stale.
    stats = bundle.manifest["statistics"]
    first = next(iter(stats))
    stats[first]["e_mu"] += 1.0
    update_manifest(bundle_copy, statistics=stats)
    with pytest.raises(EngineError, match=f"rebuild with `ustudents build-engines {bundle_copy} --backend onnx "
                                          "--precision fp32`"):  # the one that was built, not the default
        load_engine(bundle_copy, backend="onnxruntime", device="cpu")
    stats[first]["e_mu"] -= 1.0
    update_manifest(bundle_copy, statistics=stats)
    load_engine(bundle_copy, backend="onnxruntime", device="cpu")  # current again
    path = bundle_copy / entry["file"]
    path.write_bytes(path.read_bytes()[:-10])
    result = invoke("predict", bundle_copy, test_images(tiny_mvtec)[0], "--out", bundle_copy.parent / "out",
                    "--backend", "onnxruntime")
    assert result.exit_code == 2 and "checksum mismatch" in result.output
    assert f"build-engines {bundle_copy} --backend onnx --precision fp32`" in result.output


@pytest.mark.slow
def test_two_commands_changing_one_bundle_at_once_lose_nothing(bundle_copy, built_bundle, tiny_mvtec, eval_root):
    """Two build-engines at once (fp32 and fp16) both reported success, and the manifest listed one
    engine: each wrote back the list it had read at its start."""
    from ustudents.engines.bundle import changing
    from ustudents.engines.onnx_engine import record_engine

    first, second = load_bundle(bundle_copy), load_bundle(bundle_copy)  # both read before either writes
    build_onnx(first, "fp32")
    # the second ends as its fp16 build ends (the export of an fp16 network takes ~30 s on a CPU:
    # built_bundle's file stands in for it), recording its engine through the bundle it read first
    fp16 = built_entry(built_bundle, "fp16")
    shutil.copyfile(built_bundle / fp16["file"], bundle_copy / fp16["file"])
    record_engine(second, fp16)
    assert sorted(e["precision"] for e in load_bundle(bundle_copy).manifest["engines"]) == ["fp16", "fp32"]
    good = tiny_mvtec / TINY_CATEGORY / "test" / "good"
    with changing(bundle_copy):  # a command is changing it: the next is refused, not interleaved
        for command in (["build-engines", bundle_copy, "--precision", "fp32"],
                        ["calibrate", bundle_copy, "--images", good]):
            result = invoke(*command)
            assert result.exit_code == 2 and "another command is changing this bundle now" in result.output, \
                result.output
        # evaluate stores its results under the same lock: held, it reports them and does not store them
        evaluated = invoke("evaluate", bundle_copy, "--data-root", eval_root)
        assert evaluated.exit_code == 0 and "results not stored" in evaluated.output and \
            "another command is changing this bundle now" in evaluated.output, evaluated.output
    assert sorted(e["precision"] for e in load_bundle(bundle_copy).manifest["engines"]) == ["fp16", "fp32"]
    assert load_bundle(bundle_copy).manifest.get("evaluation") is None
    assert invoke("build-engines", bundle_copy, "--precision", "fp32").exit_code == 0  # and free again after


@pytest.mark.slow
def test_an_engine_interrupted_between_its_file_and_its_entry_is_unbuilt_not_damaged(bundle_copy, tiny_mvtec,
                                                                                      monkeypatch):
    """The new file replaced the old one, then the build stopped before the manifest was written: the
    old entry named the new file, and every later run said "checksum mismatch, damaged". Then the
    file stayed with no entry naming it (a stray no later command removed). An engine is listed in
    the manifest or not in the bundle at all, wherever the interrupt lands; and what a build killed
    outright left (its partial file, an int8 build's work folder) goes at the next build."""
    from ustudents.engines import onnx_engine

    engine = bundle_copy / "engines" / "model-fp32.onnx"
    # each build's parity check on one real image, not four noise images: where it stops is the point here
    frames = [read_image(test_images(tiny_mvtec)[0])]
    real = {name: getattr(onnx_engine, name) for name in ("forget_engine", "record_engine")}
    for where in real:
        build_onnx(load_bundle(bundle_copy), "fp32", frames=frames)
        assert engine.is_file()

        def then_stop(*args, where=where):
            if where == "forget_engine":
                real[where](*args)  # the old entry forgotten, the new file not yet in place
            raise KeyboardInterrupt
        monkeypatch.setattr(onnx_engine, where, then_stop)
        with pytest.raises(KeyboardInterrupt):
            build_onnx(load_bundle(bundle_copy), "fp32", frames=frames)
        monkeypatch.undo()
        with pytest.raises(EngineError, match="has no onnx engine; build one with") as refused:
            load_engine(bundle_copy, backend="onnxruntime", device="cpu")
        assert "damaged" not in str(refused.value)
        assert sorted(f.name for f in (bundle_copy / "engines").iterdir()) == [], where
    (bundle_copy / "engines" / ".model-fp32.onnx.partial").write_bytes(b"cut short")
    (bundle_copy / "engines" / ".model-int8.onnx.k1ll3d.partial").mkdir()
    (bundle_copy / "engines" / ".model-int8.onnx.k1ll3d.partial" / "model-fp32.onnx").write_bytes(b"x" * 1000)
    build_onnx(load_bundle(bundle_copy), "fp32", frames=frames)
    assert sorted(f.name for f in (bundle_copy / "engines").iterdir()) == ["model-fp32.onnx"]


@pytest.mark.slow
def test_sigterm_during_build_engines_leaves_the_bundle_as_it_was_and_no_partial_file(bundle_copy):
    """`docker stop` or a Kubernetes Job's end: the build died where it stood and left a hidden 36 MB
    `.model-fp32.onnx.partial` in the bundle."""
    import signal
    import subprocess
    import sys
    import time

    manifest = (bundle_copy / MANIFEST).read_text()
    proc = subprocess.Popen([sys.executable, "-c", "from ustudents.cli import main; main()", "build-engines",
                             str(bundle_copy)], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    partial = bundle_copy / "engines" / ".model-fp32.onnx.partial"
    deadline = time.monotonic() + 120
    while not partial.exists() and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.005)
    assert partial.exists(), "the build should be under way"
    proc.send_signal(signal.SIGTERM)
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 130, out + err
    assert f"interrupted: {bundle_copy} holds nothing half-written" in err and "Traceback" not in err
    assert (bundle_copy / MANIFEST).read_text() == manifest and list((bundle_copy / "engines").iterdir()) == []


def test_a_stale_engines_error_lists_the_rebuilds_in_the_order_the_backends_run_them(built_bundle, tmp_path):
    """calibrate listed them fp16 before fp32, a stale engine's error in the order they were built."""
    bundle_copy = Path(shutil.copytree(built_bundle, tmp_path / "model"))
    manifest = json.loads((bundle_copy / MANIFEST).read_text())
    engines = sorted(manifest["engines"], key=lambda e: e["precision"] != "fp16")  # fp16 built first
    stats = manifest["statistics"]
    stats[next(iter(stats))]["e_mu"] += 1.0  # as `ustudents calibrate` changes them
    update_manifest(bundle_copy, statistics=stats, engines=engines)
    with pytest.raises(EngineError, match=f"rebuild with `ustudents build-engines {bundle_copy} --backend onnx "
                                          f"--precision fp32` and `ustudents build-engines {bundle_copy} --backend onnx "
                                          "--precision fp16`"):
        load_engine(bundle_copy, backend="onnxruntime", device="cpu")


@pytest.mark.slow
def test_calibrate_drops_engines_that_hold_old_statistics(built_bundle, tiny_mvtec, tmp_path):
    bundle_copy = Path(shutil.copytree(built_bundle, tmp_path / "model"))
    entry = built_entry(bundle_copy, "fp32")
    good = tiny_mvtec / TINY_CATEGORY / "test" / "good"
    result = invoke("calibrate", bundle_copy, "--images", good, "--device", "cpu")
    assert result.exit_code == 0, result.output
    # each one that was built, in the order the backends run them (fp32 first), as a stale engine's error lists them
    assert (f"rebuild with `ustudents build-engines {bundle_copy} --backend onnx --precision fp32` and `ustudents "
            f"build-engines {bundle_copy} --backend onnx --precision fp16`") in result.output
    assert load_bundle(bundle_copy).manifest["engines"] == []
    assert not (bundle_copy / entry["file"]).exists()  # the stale file went with the rewritten bundle


def test_build_engines_tensorrt_without_tensorrt_says_what_to_do(bundle_copy):
    if importlib.util.find_spec("tensorrt") is not None:
        pytest.skip("tensorrt is installed: this checks the message where it is not")
    result = invoke("build-engines", bundle_copy, "--backend", "tensorrt", "--max-batch", "2")
    assert result.exit_code == 2, result.output
    assert "TensorRT is not installed" in result.output and "ustudents[tensorrt]" in result.output


# ------------------------------------------------------------------ TensorRT, decided in Python

def test_tensorrt_profile_covers_batch_one_to_max_at_the_bundle_size():
    (name, (lo, opt, hi)), = profile_shapes(256, 8).items()
    assert name == "images" and lo == (1, 3, 256, 256) and opt == hi == (8, 3, 256, 256)
    with pytest.raises(ValueError, match="at least 1"):
        profile_shapes(256, 0)


def test_a_plan_runs_only_on_its_gpu_and_tensorrt_version():
    entry = plan_entry("fp16", "NVIDIA H100 80GB HBM3", "10.9.0", 8, 256, "p", "o", "d")
    assert entry["file"] == "engines/model-fp16-nvidia-h100-80gb-hbm3.plan"
    assert plan_file("fp16", "NVIDIA L4") != entry["file"]  # plans for two GPUs live side by side
    assert plan_mismatch(entry, "10.9.0", "NVIDIA H100 80GB HBM3") is None
    assert "TensorRT 10.9.0" in plan_mismatch(entry, "11.0.0", "NVIDIA H100 80GB HBM3")
    assert "NVIDIA L4" in plan_mismatch(entry, "10.9.0", "NVIDIA L4")


def test_each_gpu_and_tensorrt_version_keeps_its_own_timing_cache():
    """One cache per bundle: a second GPU's build found the first's cache, which TensorRT refuses, and
    the file was written back from no cache at all, losing the plan it had just built."""
    h100 = timing_cache_file("NVIDIA H100 80GB HBM3", "10.9.0")
    assert h100 == "engines/tensorrt-nvidia-h100-80gb-hbm3-10-9-0.timing-cache"
    assert len({h100, timing_cache_file("NVIDIA L4", "10.9.0"), timing_cache_file("NVIDIA H100 80GB HBM3", "11.0.0")}) == 3


def test_networks_are_strongly_typed_where_the_flag_exists_and_need_none_where_it_is_gone():
    """TensorRT 10 needs the flag for precision from the ONNX types (STRONGLY_TYPED = 1 beside the
    deprecated EXPLICIT_BATCH = 0); 11 removed EXPLICIT_BATCH and keeps STRONGLY_TYPED as 0, ignored
    (always strongly typed); a release without it must still build, not fail on a missing attribute."""
    from types import SimpleNamespace

    def flags(**values):
        return network_flags(SimpleNamespace(NetworkDefinitionCreationFlag=SimpleNamespace(**values)))

    assert flags(EXPLICIT_BATCH=0, STRONGLY_TYPED=1) == 0b10  # TensorRT 10
    assert flags(STRONGLY_TYPED=0) == 0b1  # TensorRT 11
    assert flags() == 0


def test_tensorrt_refuses_a_pycuda_context_on_another_gpu_than_the_first_visible_one():
    """pycuda.autoprimaryctx attaches to the GPU that CUDA_DEVICE or ~/.cuda_device names: a plan
    checked against the first visible GPU's name would be built or run on another GPU."""
    assert context_gpu_mismatch("0000:17:00.0", "0000:17:00.0") is None
    problem = context_gpu_mismatch("0000:65:00.0", "0000:17:00.0")
    assert "0000:65:00.0" in problem and "0000:17:00.0" in problem
    assert "unset CUDA_DEVICE" in problem and "CUDA_VISIBLE_DEVICES" in problem


def test_tensorrt_runs_on_the_first_visible_gpu_and_says_how_to_choose_another(tiny_bundle, monkeypatch):
    """pycuda's primary context is the first visible GPU's: a plan asked for on cuda:1 would be checked
    against one GPU's name and run on another."""
    import ustudents.engines.runtime as runtime
    import ustudents.engines.tensorrt_build as tensorrt_build

    monkeypatch.setattr(tensorrt_build, "tensorrt_available", lambda: True)
    assert "tensorrt" in runtime.available_backends(torch.device("cuda"))
    assert "tensorrt" not in runtime.available_backends(torch.device("cuda:1"))  # auto does not pick it
    monkeypatch.setattr(runtime, "resolve_device", lambda device: torch.device(device))
    with pytest.raises(EngineError, match=r"--device cuda:1: .* CUDA_VISIBLE_DEVICES .* give --device cuda"):
        load_engine(tiny_bundle, backend="tensorrt", device="cuda:1")
    # auto with a precision only the plan runs: the same advice, not "no int8 engine" beside the plan
    bundle = load_bundle(tiny_bundle)
    plan = {"backend": "tensorrt", "precision": "int8", "file": "engine.int8.plan"}
    with_plan = dataclasses.replace(bundle, manifest={**bundle.manifest, "engines": [plan]})
    with pytest.raises(EngineError, match=r"int8 plan runs on the first visible GPU only; .* CUDA_VISIBLE_DEVICES"):
        runtime.auto_backend(with_plan, torch.device("cuda:1"), "int8")
    with pytest.raises(EngineError, match=r"has no int8 engine for this device"):
        runtime.auto_backend(bundle, torch.device("cuda:1"), "int8")


def test_building_a_plan_where_pytorch_sees_no_gpu_names_the_cause(monkeypatch):
    import ustudents.engines.tensorrt_build as tensorrt_build

    monkeypatch.setattr(tensorrt_build, "tensorrt_available", lambda: True)
    monkeypatch.setattr(tensorrt_build, "this_machine", lambda: ("10.9.0", None))
    with pytest.raises(EngineError, match="PyTorch sees no CUDA GPU here .* needs PyTorch with CUDA"):
        tensorrt_build.require_tensorrt()


@pytest.mark.skipif(importlib.util.find_spec("tensorrt") is None or importlib.util.find_spec("pycuda") is None
                    or not torch.cuda.is_available(),
                    reason="TensorRT path not run: tensorrt (NVIDIA's index only) or pycuda is not installed, or no "
                           "CUDA GPU")
@pytest.mark.parametrize("precision", ["fp32", "fp16", "int8"])
def test_tensorrt_plan_matches_pytorch(bundle_copy, tiny_mvtec, precision):
    frames = [read_image(p) for p in test_images(tiny_mvtec)[:4]]
    calibration = ["--calibration-images", tiny_mvtec / TINY_CATEGORY / "train" / "good"] if precision == "int8" else []
    result = invoke("build-engines", bundle_copy, "--backend", "tensorrt", "--precision", precision, "--max-batch", "4",
                    *calibration)
    assert result.exit_code == 0, result.output
    ref = load_engine(bundle_copy, backend="torch", device="cuda", precision="fp32")
    trt = load_engine(bundle_copy, backend="tensorrt", device="cuda", precision=precision)
    assert float((trt.maps(frames)[0] - ref.maps(frames)[0].cpu()).abs().max()) <= TOLERANCE[precision]


def test_a_plan_whose_execution_context_cannot_be_made_is_refused_in_one_line(tmp_path, monkeypatch):
    """TensorRT's create_execution_context returns None, raising nothing, where the plan's activations do
    not fit in the GPU's free memory: the runner went on to an AttributeError on None. Run here on a
    stand-in for the TensorRT API (TensorRT cannot be installed here); the check itself is ustudents'."""
    import types

    from ustudents.engines import tensorrt_runtime

    engine = types.SimpleNamespace(create_execution_context=lambda: None)
    fake_trt = types.SimpleNamespace(Runtime=lambda logger: types.SimpleNamespace(
        deserialize_cuda_engine=lambda data: engine))
    monkeypatch.setattr(tensorrt_runtime, "_trt", lambda: (fake_trt, None))
    plan = tmp_path / "engine.fp16.plan"
    plan.write_bytes(b"plan")
    runner = tensorrt_runtime.TensorRTRunner.__new__(tensorrt_runtime.TensorRTRunner)  # no CUDA context here
    with pytest.raises(EngineError, match=r"engine.fp16.plan: TensorRT could not create an execution context .*nvidia-smi"):
        runner._load(plan, 4)


def test_native_bfloat16_on_x86_means_bf16_instructions_not_onednns_emulation(monkeypatch):
    """oneDNN reports bf16 support on any AVX-512 core (Skylake, Cascade Lake) and emulates it there; with
    the compose stack's fp32 pin gone, such a CPU would have run a bf16 bundle emulated."""
    import platform

    monkeypatch.setattr(platform, "machine", lambda: "x86_64")
    for bf16, amx, native in ((False, False, False), (True, False, True), (False, True, True)):
        monkeypatch.setattr(torch.cpu, "_is_avx512_bf16_supported", lambda v=bf16: v)
        monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda v=amx: v)
        assert runtime.native_bf16(torch.device("cpu")) is native


def test_an_int8_build_stopped_or_failing_inside_the_quantizer_leaves_nothing_in_the_bundle(bundle_copy, tiny_mvtec,
                                                                                          monkeypatch):
    """The quantizer writes a shape-inferred copy of its input beside it: the fp32 export sat in
    engines/, so Ctrl-C there left a hidden 55 MB file in the bundle, and on a full disk the copy,
    written cut short without an error, failed to load with a protobuf DecodeError traceback."""
    from google.protobuf.message import DecodeError

    from ustudents.engines import quantize

    def quantizer(fails_with):
        def stand_in(fp32_onnx, out, images):
            # readable by all, as the bundle's files are: a SIGKILL leaves it, and a bundle copied by another
            # user (the GPU image's) must not fail on it
            assert Path(fp32_onnx).parent.stat().st_mode & 0o777 == 0o755
            Path(fp32_onnx).with_name(Path(fp32_onnx).stem + "-inferred.onnx").write_bytes(b"cut sh")
            raise fails_with
        return stand_in

    frames = [read_image(p) for p in sorted((tiny_mvtec / TINY_CATEGORY / "train" / "good").iterdir())[:2]]
    before = sorted(p.name for p in bundle_copy.rglob("*"))
    for error in (KeyboardInterrupt(), DecodeError("Error parsing message with type 'onnx.ModelProto'")):
        monkeypatch.setattr(quantize, "quantize_int8", quantizer(error))
        with pytest.raises(type(error) if isinstance(error, KeyboardInterrupt) else EngineError) as raised:
            build_onnx(load_bundle(bundle_copy), "int8", calibration=frames)
        assert sorted(p.name for p in bundle_copy.rglob("*")) == sorted(set(before) | {"engines"})  # an empty engines/
        assert load_bundle(bundle_copy).manifest.get("engines", []) == []
    assert str(raised.value).startswith(f"{bundle_copy / 'engines'}: the quantizer could not read back the model it "
                                        "wrote there (cut short; ") and "\n" not in str(raised.value)


@pytest.mark.parametrize("field, value, says", [
    ("precision", "FP32", "its engines list a onnx FP32 engine (engines/model-fp32.onnx), which this version of "
                          "ustudents does not know (it builds onnx and tensorrt engines in fp32, fp16, int8); a bundle "
                          "from a newer ustudents needs that version, and an entry edited by hand must be put back or "
                          "removed from 'engines'"),
    ("file", "manifest.json", "the engine file 'manifest.json' is not inside engines/"),
    ("file", "weights.safetensors", "the engine file 'weights.safetensors' is not inside engines/"),
])
def test_a_hand_edited_engine_entry_is_refused_on_load_and_calibrate_deletes_nothing(built_bundle, tmp_path, tiny_mvtec,
                                                                                     field, value, says):
    """An entry naming manifest.json made `calibrate`, which deletes the old engines' files, delete
    the manifest; an unknown precision ended in "tuple.index(x): x not in tuple"."""
    bundle = Path(shutil.copytree(built_bundle, tmp_path / "model"))
    manifest = json.loads((bundle / MANIFEST).read_text())
    manifest["engines"][0][field] = value
    (bundle / MANIFEST).write_text(json.dumps(manifest))
    before = {p: p.read_bytes() for p in bundle.rglob("*") if p.is_file()}
    good = tiny_mvtec / TINY_CATEGORY / "test" / "good"
    for command in (["calibrate", bundle, "--images", good, "--device", "cpu"],
                    ["predict", bundle, next(good.iterdir()), "--out", tmp_path / "out", "--backend", "onnxruntime"]):
        result = invoke(*command)
        assert result.exit_code == 2 and f"{bundle / MANIFEST}: " in result.output and says in result.output, \
            result.output
    assert {p: p.read_bytes() for p in bundle.rglob("*") if p.is_file()} == before


def test_a_built_engine_without_onnx_runtime_installed_says_to_install_it_not_to_build_it(built_bundle, monkeypatch):
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "onnxruntime" else real(name, *a))
    with pytest.raises(EngineError, match=re.escape("onnxruntime not installed here (ONNX engines need them): pip "
                                                    "install 'ustudents[onnx]'")):
        load_engine(built_bundle, backend="auto", device="cpu", precision="fp16")


def test_build_engines_refuses_int8_ranges_from_too_few_images_and_a_bundle_made_read_only(bundle_copy, tiny_mvtec,
                                                                                          tmp_path):
    """One calibration image was taken (its parity checked on that same image), and root, for whom
    os.access passes everywhere, wrote into a bundle folder made read-only with chmod a-w."""
    few = tmp_path / "few"
    few.mkdir()
    for f in sorted((tiny_mvtec / TINY_CATEGORY / "train" / "good").iterdir())[:3]:
        shutil.copy(f, few)
    result = invoke("build-engines", bundle_copy, "--precision", "int8", "--calibration-images", few)
    assert result.exit_code == 2 and f"--calibration-images {few}: 3 image(s); int8 ranges need at least 8 good " \
        "images" in result.output, result.output
    # blank frames or copies: ranges from them, checked on them, passed an engine that called every defect ok
    blank, copies = tmp_path / "blank", tmp_path / "copies"
    blank.mkdir()
    copies.mkdir()
    for i, f in enumerate(sorted((tiny_mvtec / TINY_CATEGORY / "train" / "good").iterdir())[:8]):
        cv2.imwrite(str(blank / f"{i:02d}.png"), np.full((64, 64), 128, np.uint8))
        shutil.copy(f, copies / f"{i:02d}{f.suffix}")
    shutil.copy(copies / "00.png", copies / "08.png")
    before = {p: p.read_bytes() for p in bundle_copy.rglob("*") if p.is_file()}
    for folder, says in ((blank, "8 of the 8 images are one flat colour (blank frames?), e.g. 00.png"),
                         (copies, "00.png and 08.png are the same picture")):
        result = invoke("build-engines", bundle_copy, "--precision", "int8", "--calibration-images", folder)
        assert result.exit_code == 2 and f"--calibration-images {folder}: {says}" in result.output, result.output
    for args, says in ((["--max-batch", "99999999999999999999"], "--max-batch"),
                       (["--max-batch", "0"], "--max-batch")):
        result = invoke("build-engines", bundle_copy, *args)
        assert result.exit_code == 2 and says in result.output and "range" in result.output, result.output
    bundle_copy.chmod(0o555)
    try:
        result = invoke("build-engines", bundle_copy)
    finally:
        bundle_copy.chmod(0o755)
    assert result.exit_code == 2 and f"{bundle_copy}: the bundle folder is not writable here (a read-only mount, or " \
        "chmod a-w?)" in result.output, result.output
    (bundle_copy / "manifest.json").chmod(0o444)  # inside it: root's write passed, and changed its mode
    try:
        result = invoke("build-engines", bundle_copy)
    finally:
        (bundle_copy / "manifest.json").chmod(0o644)
    assert result.exit_code == 2 and f"{bundle_copy / 'manifest.json'}: made read-only (chmod a-w) inside the " \
        "bundle" in result.output, result.output
    assert {p: p.read_bytes() for p in bundle_copy.rglob("*") if p.is_file()} == before


def test_a_failed_parity_check_says_whose_to_fix(bundle_copy, tiny_mvtec, tmp_path, monkeypatch):
    """int8 ranges that do not hold come from the user's calibration images: it said "Report this with the
    bundle and precision" (exit 1), as for a bug, with no way forward. fp32 and fp16 failing it is one."""
    from ustudents.engines import onnx_engine

    real = onnx_engine.parity
    monkeypatch.setattr(onnx_engine, "parity", lambda *a, **k: {**real(*a, **k), "ok": False})
    before = {p: p.read_bytes() for p in bundle_copy.rglob("*") if p.is_file()}
    from ustudents.engines.cli import MIN_CALIBRATION_IMAGES

    good = good_images(tiny_mvtec, tmp_path / "good", MIN_CALIBRATION_IMAGES)  # as few as int8 ranges are built from
    result = invoke("build-engines", bundle_copy, "--precision", "int8", "--calibration-images", good)
    assert result.exit_code == 2 and "not stored; int8 ranges from --calibration-images did not hold: give more, and " \
        "more varied, good images (e.g. all of train/good), or build fp16 or fp32" in result.output, result.output
    result = invoke("build-engines", bundle_copy)
    assert result.exit_code == 1 and "not stored. Report this with the bundle and precision" in result.output
    assert {p: p.read_bytes() for p in bundle_copy.rglob("*") if p.is_file()} == before


def test_build_engines_names_an_engines_folder_it_cannot_write(bundle_copy, tiny_mvtec, monkeypatch):
    from ustudents.engines import cli

    (bundle_copy / "engines").mkdir(exist_ok=True)
    real = os.access
    monkeypatch.setattr(cli.os, "access", lambda path, mode: False if Path(path).name == "engines" else real(path, mode))
    result = invoke("build-engines", bundle_copy)
    assert result.exit_code == 2 and (f"{bundle_copy / 'engines'}: the bundle's engines folder is not writable here; "
                                      f"make it writable (chmod u+w {bundle_copy / 'engines'})") in result.output
    # calibrate writes nothing there: not refused for it
    good = tiny_mvtec / TINY_CATEGORY / "test" / "good"
    assert invoke("calibrate", bundle_copy, "--images", good, "--device", "cpu").exit_code == 0
