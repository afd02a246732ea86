"""ONNX export of the whole multi-scale model: networks and scoring head in one graph.

Static spatial size (the bundle's image size), dynamic batch. Exported with PyTorch's TorchScript
exporter (`dynamo=False`): it needs no extra packages and maps our FDFE ops one to one onto ONNX
Conv (with dilations), Slice, Max, Pad (reflect) and reductions, all of which TensorRT imports.
"""
from __future__ import annotations

import copy
import warnings
from pathlib import Path

import torch

from .model import AnomalyModel

INPUT = "images"  # float32 (B, 3, S, S) in [0, 1]
OUTPUTS = ("anomaly_map", "scale_maps")  # (B, S, S) and (B, n_scales, S, S)
OPSET = 17


def export_onnx(model: AnomalyModel, image_size: int, path: Path, channels_last: bool | None = None) -> Path:
    """Export `model` as it is: in the dtypes it holds (onnx_engine.model_for_export makes the fp16 form),
    traced on the device it is on. `channels_last` (default: for a half model on a CPU) traces it in
    that memory layout: PyTorch's CPU fp16 convolution is naive in NCHW (69-362 times fp32,
    benchmarks/results/cpu_fp16_conv_epyc.json) and oneDNN's in channels-last is not, and a layout is
    no part of an ONNX graph: the file is the same, byte for byte (tests/test_onnx_export.py)."""
    model = model.eval()
    param = next(model.parameters())
    example = torch.rand(1, 3, image_size, image_size, device=param.device)
    if channels_last is None:
        channels_last = param.device.type == "cpu" and any(t.dtype == torch.float16 for t in model.parameters())
    if channels_last:
        model = copy.deepcopy(model).to(memory_format=torch.channels_last)  # the caller's model left as it was
        example = example.contiguous(memory_format=torch.channels_last)
    dynamic = {name: {0: "batch"} for name in (INPUT, *OUTPUTS)}
    with warnings.catch_warnings():  # the legacy exporter's deprecation and constant-folding notes
        warnings.simplefilter("ignore")
        torch.onnx.export(model, (example,), str(path), input_names=[INPUT], output_names=list(OUTPUTS),
                          dynamic_axes=dynamic, opset_version=OPSET, dynamo=False)
    return Path(path)
