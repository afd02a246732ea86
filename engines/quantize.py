"""INT8 engines: explicit quantize/dequantize (Q/DQ) nodes in the ONNX, calibrated on good images.

The fp32 export is quantized by ONNX Runtime's static quantizer into QDQ form, the one form both
runtimes take: ONNX Runtime fuses each DequantizeLinear -> Conv -> QuantizeLinear into an integer
convolution, and TensorRT builds the same file as a strongly typed network with explicit
quantization (it has no INT8 builder flag in version 11).

Choices, and why (measured while developing this module, with one-off scripts on a model trained
on the shipped magnetic_tile sample at 64 px and on the test suite's synthetic bundle):
- Only the convolutions are quantized (all of the FLOPs). The FDFE slices and maxima, the
  standardization, e, v and the scale fusion are computed in float32: they are cheap, and e is a
  squared difference of two descriptors, which 8-bit arithmetic would swamp. Their inputs, the last
  convolutions' descriptors (teacher's and students'), are 8-bit values all the same, as every
  convolution's output goes through a QuantizeLinear: rounding the teacher's alone added 0.58 to e
  on a pixel on average (an audit: the shipped p = 17 teacher, 6 demo images at 64 px). The
  measured effect on AU-PRO is in the README (Engines, INT8).
- Signed 8-bit, symmetric (zero point 0) for weights and activations: TensorRT accepts nothing
  else. Weights per output channel: the fused networks put teacher and students side by side
  along that axis, so one scale per tensor would let the widest network set everyone's step.
- Biases stay float32: TensorRT's ONNX parser rejects DequantizeLinear on int32 (the quantizer's
  default for biases; onnx/onnx-tensorrt#850), and ONNX Runtime quantizes them itself when it
  fuses the convolution.
- Weights in 7 bits (`reduce_range`): x86 CPUs without VNNI multiply 8-bit pairs into saturating
  16-bit sums, which on a trained bundle (64 px magnetic_tile sample) tripled the map error
  against an exact simulation of the same quantization (99th percentile 2.2 vs 0.8 standard
  deviations); with 7-bit weights the CPU result equals the simulation. TensorRT runs the same
  file unchanged.
- Activation ranges: twice the maximum over good images (the images the model was calibrated
  for). The maximum alone saturates on defects, whose activations exceed anything seen on good
  images: on the magnetic_tile sample the map error on defect images reached 2.5 standard
  deviations (on synthetic scratches 12.5, deep inside the defect); with the 2x headroom, at the
  price of one bit of resolution, the largest error is 0.42 (synthetic: 0.53). A percentile range
  (99.999th) clipped more and did worse still (99th-percentile error 0.81 vs 0.26).
"""
from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import torch

from .export import INPUT

# Activation ranges are this multiple of the largest value seen on good images (see above).
HEADROOM = 2.0


def quantize_int8(fp32_onnx: Path, out: Path, images: torch.Tensor) -> Path:
    """Write the QDQ int8 form of `fp32_onnx` to `out`, its activation ranges measured on `images`
    (N, 3, S, S) float32 in [0, 1], one image per calibration step."""
    from onnxruntime.quantization import (CalibrationDataReader, CalibrationMethod, QuantFormat, QuantType,
                                          quantize_static)

    class GoodImages(CalibrationDataReader):
        def __init__(self):
            self.batches = iter(images[i:i + 1].numpy() for i in range(len(images)))

        def get_next(self):
            batch = next(self.batches, None)
            return None if batch is None else {INPUT: batch}

    # The quantizer's advice to run its shape-inference pre-pass goes to the root logger: our graph
    # has static shapes already, so keep it off the user's console.
    root = logging.getLogger()
    level = root.level
    root.setLevel(logging.ERROR)
    try:
        quantize_static(str(fp32_onnx), str(out), GoodImages(), quant_format=QuantFormat.QDQ,
                        op_types_to_quantize=["Conv"], per_channel=True, reduce_range=True,
                        activation_type=QuantType.QInt8, weight_type=QuantType.QInt8,
                        calibrate_method=CalibrationMethod.MinMax,
                        extra_options={"ActivationSymmetric": True, "WeightSymmetric": True,
                                       "QuantizeBias": False})
    finally:
        root.setLevel(level)
    widen_activation_ranges(Path(out), HEADROOM)
    return Path(out)


def widen_activation_ranges(path: Path, factor: float) -> None:
    """Multiply every activation's quantization scale by `factor`, in place. Activation scales are
    those of the QuantizeLinear nodes (weights are stored quantized and only dequantized); each is
    shared with the DequantizeLinear that follows, so the pair stays consistent."""
    import onnx
    from onnx import numpy_helper

    model = onnx.load(str(path))
    names = {node.input[1] for node in model.graph.node if node.op_type == "QuantizeLinear"}
    for init in model.graph.initializer:
        if init.name in names:
            init.CopyFrom(numpy_helper.from_array(numpy_helper.to_array(init) * np.float32(factor), init.name))
    onnx.save(model, str(path))
