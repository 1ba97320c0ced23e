"""Probe (BENCHMARKS.md §18): the TAEF2 set's decoder gradient graph quantized statically by
ONNX Runtime's own tool (QDQ, int8 per-channel weights, uint8 activations, MinMax ranges, the
convolutions only), calibrated on 256-pixel centre crops of six Kodak images at E(x).  Not
part of the export: the probe asks whether an int8 gradient buys the closed loop its steps.

    python docs/bench/int8-gradient/quantize.py models/taef2 ../shared/data/kodak OUT.onnx [--backward-only]
"""
import os
import sys
import tempfile

import numpy as np
import onnx
import onnxruntime as ort
from onnxruntime.quantization import CalibrationDataReader, CalibrationMethod, QuantFormat, QuantType, quantize_static
from onnxruntime.quantization.shape_inference import quant_pre_process
from PIL import Image

CALIBRATION = ["kodim01", "kodim02", "kodim04", "kodim06", "kodim07", "kodim09"]


def feeds(models: str, folder: str, names: list[str], crop: int | None) -> list[dict]:
    """The gradient graph's feeds at E(x): (latent, image in [0, 1], weight 1) per image."""
    encoder = ort.InferenceSession(os.path.join(models, "vae_encoder.onnx"), providers=["CPUExecutionProvider"])
    out = []
    for name in names:
        image = np.asarray(Image.open(os.path.join(folder, name + ".png")).convert("RGB"), np.float32) / 255
        if crop:
            h, w = image.shape[:2]
            image = image[(h - crop) // 2:(h + crop) // 2, (w - crop) // 2:(w + crop) // 2]
        image = image.transpose(2, 0, 1)[None].copy()
        latent = encoder.run(None, {encoder.get_inputs()[0].name: image})[0]
        out.append({"latent": latent, "image": image, "weight": np.ones((1, 1) + image.shape[2:], np.float32)})
    return out


def backward_convs(model) -> list[str]:
    """The convolutions the squared error (the ``error`` output) does not depend on."""
    producer = {output: node for node in model.graph.node for output in node.output}
    forward, stack = set(), ["error"]
    while stack:
        node = producer.get(stack.pop())
        if node is not None and node.name not in forward:
            forward.add(node.name)
            stack.extend(node.input)
    return [n.name for n in model.graph.node if n.op_type == "Conv" and n.name not in forward]


class Reader(CalibrationDataReader):
    def __init__(self, items):
        self.items = iter(items)

    def get_next(self):
        return next(self.items, None)


if __name__ == "__main__":
    models, folder, out = sys.argv[1:4]
    with tempfile.TemporaryDirectory() as scratch:
        prepared = os.path.join(scratch, "prepared.onnx")
        quant_pre_process(os.path.join(models, "decoder_gradient.onnx"), prepared, skip_symbolic_shape=True)
        nodes = backward_convs(onnx.load(prepared)) if "--backward-only" in sys.argv else None
        quantize_static(prepared, out, Reader(feeds(models, folder, CALIBRATION, 256)), quant_format=QuantFormat.QDQ,
                        per_channel=True, activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8,
                        op_types_to_quantize=["Conv"], nodes_to_quantize=nodes, calibrate_method=CalibrationMethod.MinMax,
                        extra_options={"CalibMovingAverage": False})
