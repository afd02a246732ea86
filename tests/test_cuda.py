"""The PyTorch CUDA engine: networks in the engine's precision, each scale in its fastest dense form,
replayed as CUDA graphs; the same maps and masks as the CPU fp32 reference within each precision's
tolerance. These need a CUDA GPU and skip without one (CI has none: they ran on a lent H200, README:
What ran where)."""
from __future__ import annotations

import shutil

import numpy as np
import pytest
import torch

from conftest import TINY_CATEGORY
from ustudents.engines.cuda_graphs import GraphedRunner
from ustudents.engines.images import read_image
from ustudents.engines.model import AnomalyModel
from ustudents.engines.onnx_engine import TOLERANCE
from ustudents.engines.runtime import load_engine, torch_runner

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA GPU here: the CUDA engine is not run")

CUDA = torch.device("cuda")
# Random networks and statistics against the CPU fp32 model: maps compared relative to their largest
# value, at 8 units of the precision's roundoff (2**-11 fp16, 2**-8 bf16). On an H200 the errors were
# 2.3e-3 (fp16) and 1.4e-2 (bf16) of the maximum; a wrong form, graph or scoring is off by far more.
# Calibrated bundles are compared by the ONNX engines' tolerances (score units).
RELATIVE = {"fp32": 1e-4, "fp16": 8 * 2.0 ** -11, "bf16": 8 * 2.0 ** -8}


def random_model(scales=(17, 33, 65)) -> AnomalyModel:
    torch.manual_seed(0)
    model = AnomalyModel(list(scales), students=2).eval()
    for ens in model.ensembles:
        ens.score_stats.copy_(torch.tensor([2.0, 3.0, 0.5, 0.25]))
    return model


def test_graph_replays_equal_the_eager_model_at_every_batch_size_and_outputs_stay_the_callers():
    model = random_model().to(CUDA)
    graphed = GraphedRunner(model)
    with torch.no_grad():
        batches = [torch.rand(b, 3, 48, 48, device=CUDA) for b in (2, 1, 2, 3)]
        want = [model(x) for x in batches]
        got = [graphed(x) for x in batches]
    assert sorted(graphed.graphs) == [(1, 3, 48, 48), (2, 3, 48, 48), (3, 3, 48, 48)]  # one graph per size
    for (wf, ws), (gf, gs) in zip(want, got):  # the first result survives the later replays of its graph
        assert torch.allclose(gf, wf, atol=1e-4, rtol=1e-4) and torch.allclose(gs, ws, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("precision", ["fp32", "fp16", "bf16"])
def test_cuda_runner_matches_the_cpu_fp32_model_with_every_scale_in_a_chosen_form(precision):
    images = torch.rand(2, 3, 64, 64)
    with torch.no_grad():
        want_fused, want_scales = random_model()(images)
        model = random_model()
        got_fused, got_scales = torch_runner(model, CUDA, precision)(images.to(CUDA))
    assert got_fused.dtype == torch.float32
    assert all(ens.net.form is not None and len(ens.net.forms) == 1 for ens in model.ensembles)
    for got, want in ((got_fused, want_fused), (got_scales, want_scales)):
        assert float((got.cpu() - want).abs().max()) <= RELATIVE[precision] * float(want.abs().max())


@pytest.mark.slow
@pytest.mark.parametrize("precision", ["fp32", "fp16"])
def test_cuda_engine_gives_the_cpu_engines_maps_and_masks_on_real_images(tiny_bundle, tiny_mvtec, tmp_path, precision):
    bundle = shutil.copytree(tiny_bundle, tmp_path / "model")
    # 5 frames at max_batch 4: two graph sizes
    frames = [read_image(p) for p in sorted((tiny_mvtec / TINY_CATEGORY / "test").rglob("*.*"))[:5]]
    ref = load_engine(bundle, backend="torch", device="cpu", precision="fp32")
    gpu = load_engine(bundle, backend="torch", device="cuda", precision=precision, max_batch=4)
    tol = TOLERANCE[precision]
    ref_maps, _ = ref.maps(frames)
    maps, _ = gpu.maps(frames)
    assert float((maps.cpu() - ref_maps).abs().max()) <= tol
    for p, r in zip(gpu.predict(frames), ref.predict(frames)):
        assert p.mask.shape == r.mask.shape == r.anomaly_map.shape
        decided = np.abs(r.mask_level - ref.mask_threshold) > tol
        assert np.array_equal(p.mask[decided], r.mask[decided])
        if abs(r.score - ref.image_threshold) > tol:
            assert p.anomalous == r.anomalous


def test_warm_up_captures_a_graph_for_every_batch_size_a_worker_may_form(tiny_bundle):
    engine = load_engine(tiny_bundle, backend="torch", device="cuda", max_batch=3)
    assert engine.precision == "fp16"  # the GPU default for a bundle calibrated in fp32
    engine.warm_up()
    assert sorted(shape[0] for shape in engine.runner.graphs) == [1, 2, 3]


def test_an_fp16_export_traced_on_the_gpu_is_the_graph_the_cpu_traces(tmp_path):
    """An fp16 export traced on the CPU ran the half networks there, 100-300 times slower than fp32:
    build-engines traces fp16 on the GPU where there is one, and the graph must not depend on where."""
    import onnx

    from ustudents.engines.export import export_onnx
    from ustudents.engines.onnx_engine import model_for_export, trace_device

    assert trace_device("fp16").type == "cuda" and trace_device("fp32").type == "cpu"
    half = model_for_export(random_model(scales=(17,)), "fp16")
    graphs = {}
    for device in ("cpu", "cuda"):
        export_onnx(half.to(device), 32, tmp_path / f"{device}.onnx")
        graphs[device] = onnx.load(str(tmp_path / f"{device}.onnx")).graph
    assert [n.op_type for n in graphs["cpu"].node] == [n.op_type for n in graphs["cuda"].node]
    for a, b in zip(graphs["cpu"].initializer, graphs["cuda"].initializer):
        assert (a.name, a.data_type, list(a.dims), a.raw_data) == (b.name, b.data_type, list(b.dims), b.raw_data)
