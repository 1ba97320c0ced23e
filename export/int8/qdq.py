"""onnxruntime's static quantizer (QDQ, per-channel int8 weights, uint8 or 16-bit
activations), and what the sweep reads of its graphs."""
from __future__ import annotations

import contextlib
import io
import logging
import os

import numpy as np

from .calibrate import CalibrationFeeds
from .ops import CONSTANT_OPS, DEFAULT_WEIGHT_BITS, SWEPT_OPS, UPSAMPLING_OPS

# Ops never quantized.  LayerNormalization has no int8 kernel on the CPU EP (it runs in float
# between a DequantizeLinear and a QuantizeLinear anyway), and its scale would become an int8
# weight: where the torch exporter shares one scale between layers (a UNet's norms, all ones
# at initialisation), ONNX Runtime then fails to open the graph with the exact int8 kernels
# of session_options ("Attempt to replace the existing tensor").
FLOAT_OPS = ("LayerNormalization",)


# Feeds per calibration pass (onnxruntime's strided MinMax needs a divisor of their number).
MAX_FEEDS_PER_PASS = 8


def _stride(count: int) -> int:
    return max(d for d in range(1, min(count, MAX_FEEDS_PER_PASS) + 1) if count % d == 0)


@contextlib.contextmanager
def _quiet():
    """onnxruntime.quantization logs advice through the root logger; an export shows its own."""
    root = logging.getLogger()
    level = root.level
    root.setLevel(logging.ERROR)
    try:
        with contextlib.redirect_stdout(io.StringIO()):  # the histogram calibrators print
            yield
    finally:
        root.setLevel(level)


def quantize_file(src: str, dst: str, feeds: list[dict], cache: str, exclude=(), wide=(), *,
                  weight_bits: int = DEFAULT_WEIGHT_BITS) -> None:
    """QDQ int8 ``src`` -> ``dst``, calibrated on ``feeds`` once (the ranges are kept in the
    ``cache`` file and reused by later calls with other ``exclude`` and ``wide`` lists); the
    ``exclude`` nodes stay float, the activations the ``wide`` nodes read and write are 16-bit;
    weights in ``weight_bits`` (8, or 7: within [-64, 64])."""
    from onnxruntime.quantization import CalibrationMethod, QuantFormat, QuantType, quantize_static
    from onnxruntime.quantization.registry import QDQRegistry, QLinearOpsRegistry

    # quantize_static's own default (every op it can quantize), less FLOAT_OPS.
    op_types = sorted((set(QLinearOpsRegistry) | set(QDQRegistry)) - set(FLOAT_OPS))
    extra = {}
    wide_tensors = activations_of(src, wide)
    if wide_tensors:  # 16-bit QDQ needs onnxruntime's own Q/DQ ops before opset 21
        extra = {"UseQDQContribOps": True,
                 "TensorQuantOverrides": {t: [{"quant_type": QuantType.QUInt16}] for t in wide_tensors}}
    with _quiet():
        quantize_static(src, dst, None if os.path.exists(cache) else CalibrationFeeds(feeds),
                        quant_format=QuantFormat.QDQ, per_channel=True, op_types_to_quantize=op_types,
                        activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8,
                        calibrate_method=CalibrationMethod.MinMax, nodes_to_exclude=list(exclude),
                        use_external_data_format=os.path.exists(src + ".data"), calibration_cache_path=cache,
                        reduce_range=weight_bits == 7,
                        # Ranges are computed a few feeds at a time and merged: all of a UNet's
                        # saved activations at once would not fit in memory.
                        extra_options={"CalibStridedMinMax": _stride(len(feeds)), **extra})


def activations_of(path: str, nodes) -> list[str]:
    """The activation tensors (neither weights nor constants) that the named nodes of an ONNX
    graph read or write, in graph order; nodes the graph lacks are skipped (a split part holds
    some of its graph's nodes)."""
    import onnx

    wanted = set(nodes)
    if not wanted:
        return []
    model = onnx.load(path, load_external_data=False)
    constants = {t.name for t in model.graph.initializer}
    constants.update(out for n in model.graph.node if n.op_type in CONSTANT_OPS for out in n.output)
    tensors: dict[str, None] = {}
    for node in model.graph.node:
        if node.name in wanted:
            tensors.update((t, None) for t in [*node.input, *node.output] if t and t not in constants)
    return list(tensors)


def first_stage(path: str) -> list[str]:
    """The node names of a graph's lowest-resolution stage, if it upsamples: every node
    before its first UPSAMPLING_OPS node (the graph's nodes are in topological order), less
    CONSTANT_OPS."""
    import onnx

    model = onnx.load(path, load_external_data=False)
    stage = []
    for node in model.graph.node:
        if node.op_type in UPSAMPLING_OPS:
            return stage
        if node.op_type not in CONSTANT_OPS:
            stage.append(node.name)
    return []  # no upsampling: no low-resolution stage to widen


def quantized_nodes(path: str) -> list[str]:
    """Names of the SWEPT_OPS nodes of a QDQ graph that compute on dequantized int8 values,
    in graph order."""
    import onnx

    model = onnx.load(path, load_external_data=False)
    dequantized = {out for n in model.graph.node if n.op_type == "DequantizeLinear" for out in n.output}
    return [n.name for n in model.graph.node if n.op_type in SWEPT_OPS and dequantized.intersection(n.input)]


def outputs(path: str, feeds: list[dict], weight_bits: int | None = None) -> list[np.ndarray]:
    """The graph file's first output for each feed, float64; ``weight_bits`` of an int8 graph
    (None for a float one) picks the kernels of its sessions."""
    import onnxruntime as ort

    from sdc_runtime.neural import needs_exact_kernels, session_options

    # The runtime's options for a graph of these weights: the int8 kernels its users get.
    session = ort.InferenceSession(path, session_options(exact_int8=needs_exact_kernels(weight_bits)),
                                   providers=["CPUExecutionProvider"])
    return [session.run(None, feed)[0].astype(np.float64) for feed in feeds]
