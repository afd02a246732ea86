"""The dense networks and scoring head export to ONNX with TensorRT-friendly operators only, and
ONNX Runtime computes the same anomaly maps as PyTorch."""
import numpy as np
import pytest
import torch

from ustudents.engines.export import INPUT, export_onnx
from ustudents.engines.model import AnomalyModel

onnx = pytest.importorskip("onnx", reason="onnx not installed (pip install 'ustudents[onnx]')")
ort = pytest.importorskip("onnxruntime", reason="onnxruntime not installed (pip install 'ustudents[onnx]')")

# Operators TensorRT's ONNX parser supports natively; the FDFE form must not need anything else.
TENSORRT_FRIENDLY = {"Add", "Cast", "Concat", "Constant", "ConstantOfShape", "Conv", "Div", "Gather", "Identity",
                     "LeakyRelu", "Max", "Mul", "Pad", "ReduceMean", "ReduceSum", "Reshape", "Shape", "Slice",
                     "Split", "Squeeze", "Sub", "Transpose", "Unsqueeze", "Pow", "Sqrt"}


def test_onnx_matches_pytorch_with_dynamic_batch(tmp_path):
    torch.manual_seed(0)
    model = AnomalyModel([17, 65], students=2).eval()
    for ens in model.ensembles:  # non-trivial statistics so the scoring head is exercised
        ens.desc_mean.uniform_(-0.1, 0.1)
        ens.desc_std.uniform_(0.5, 2.0)
        ens.score_stats.copy_(torch.tensor([3.0, 2.0, 0.5, 0.25]))
    path = export_onnx(model, 64, tmp_path / "model.onnx")
    ops = {n.op_type for n in onnx.load(str(path)).graph.node}
    assert ops <= TENSORRT_FRIENDLY, ops - TENSORRT_FRIENDLY
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    images = torch.rand(3, 3, 64, 64)  # batch 3, exported with batch 1
    fused, scales = session.run(None, {INPUT: images.numpy()})
    with torch.no_grad():
        ref_fused, ref_scales = model(images)
    assert fused.shape == (3, 64, 64) and scales.shape == (3, 2, 64, 64)
    np.testing.assert_allclose(fused, ref_fused.numpy(), atol=1e-4, rtol=1e-4)
    np.testing.assert_allclose(scales, ref_scales.numpy(), atol=1e-4, rtol=1e-4)
