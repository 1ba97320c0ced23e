"""The int8 correction: each int8 convolution and MatMul, and each convolution kept in float,
fitted again, layer by layer in graph order, to the fp32 graph's output on the calibration
feeds (``correct_layers``)."""
from __future__ import annotations

import functools
import os
from collections import Counter
from dataclasses import dataclass

import numpy as np

from .calibrate import drawn_feeds
from .linalg import (
    _conv_geometry,
    _int32,
    conv_rows,
    fit_gain_offset,
    fit_weights,
    layer_moments,
    least_squares,
    matmul_rows,
    output_moments,
)
from .ops import DEFAULT_WEIGHT_BITS
from .recipe import DEFAULT_RECIPE, Int8Recipe
from .stepper import GraphStepper


def with_conv_biases(src: str, folder: str) -> str:
    """``src``, or where some of its convolutions have no bias, a copy in ``folder`` where they
    have a zero one: the int8 graph then holds a bias for ``correct_layers`` to set."""
    import onnx
    from onnx import numpy_helper
    from onnx.external_data_helper import load_external_data_for_model

    model = onnx.load(src, load_external_data=False)
    if all(len(n.input) > 2 for n in model.graph.node if n.op_type == "Conv"):
        return src
    load_external_data_for_model(model, os.path.dirname(src))
    shapes = {t.name: t.dims for t in model.graph.initializer}
    for node in model.graph.node:
        if node.op_type == "Conv" and len(node.input) == 2:
            bias = numpy_helper.from_array(np.zeros(shapes[node.input[1]][0], np.float32), f"{node.name}.zero_bias")
            model.graph.initializer.append(bias)
            node.input.append(bias.name)
    path = os.path.join(folder, "biased-" + os.path.basename(src))
    onnx.save(model, path, save_as_external_data=os.path.exists(src + ".data"),
              location=os.path.basename(path) + ".data")
    return path


def correct_layers(fp32: str, int8: str, feeds: list[dict], checks: list[dict], *,
                   weight_bits: int = DEFAULT_WEIGHT_BITS, recipe: Int8Recipe = DEFAULT_RECIPE) -> int:
    """Correct the int8 graph file ``int8`` in place, one layer (convolution or MatMul with int8
    weights, or convolution kept in float) at a time in graph order, each fitted, by least
    squares on the calibration ``feeds``, to the fp32 graph's output given what the int8 layers
    before it (already corrected) feed it.  The graph keeps its nodes, shapes and kernels: only
    int8 weights, their scales, the int32 biases and the float layers' weights and biases
    change.  Returns how many layers were corrected.

    Each layer's candidates and the choice between them are ``fit_layer``'s, judged on
    ``checks``, the feeds of a calibration image the fits did not see.  Both graphs are run
    once over the feeds, a stretch between two layers at a time (``GraphStepper``), not once
    per layer.

    Why: int8 activations and weights shift and shrink each channel's output systematically,
    and the errors add up over the layers; fitting each layer to undo what the ones before it
    did takes most of that out (BENCHMARKS.md §8).
    """
    import onnx
    from onnx import numpy_helper
    from onnx.external_data_helper import load_external_data_for_model

    from sdc_runtime.neural import needs_exact_kernels, session_options

    used, checked = drawn_feeds(feeds, recipe.correction_feeds), drawn_feeds(checks, recipe.check_feeds)
    model = onnx.load(int8, load_external_data=False)
    stored_apart = {entry.value for t in model.graph.initializer for entry in t.external_data if entry.key == "location"}
    load_external_data_for_model(model, os.path.dirname(int8))
    initializers = {t.name: t for t in model.graph.initializer}
    producer = {out: n for n in model.graph.node for out in n.output}
    readers = Counter(name for node in model.graph.node for name in node.input)

    def dequantized_initializer(name: str, dtype) -> tuple[str, str] | None:
        """(integer initializer, scale initializer) of a DequantizeLinear output, if that is what it is."""
        dq = producer.get(name)
        if dq is None or dq.op_type != "DequantizeLinear" or dq.input[0] not in initializers:
            return None
        if initializers[dq.input[0]].data_type != dtype or dq.input[1] not in initializers \
                or readers[dq.input[0]] != 1 or readers[dq.input[1]] != 1:
            return None
        return dq.input[0], dq.input[1]

    def float_initializer(name: str) -> bool:
        return name in initializers and initializers[name].data_type == onnx.TensorProto.FLOAT and readers[name] == 1

    layers = []  # (node, (weight, weight scale), (bias, bias scale) or None); a float layer's scales None
    for node in model.graph.node:
        if node.op_type == "Conv" and len(node.input) > 2 and all(map(float_initializer, node.input[1:3])):
            # A convolution the sweep kept in float still reads what the int8 layers before it
            # write: fitted like theirs, it takes out part of their error.
            layers.append((node, (node.input[1], None), (node.input[2], None)))
            continue
        weight = dequantized_initializer(node.input[1], onnx.TensorProto.INT8) if len(node.input) > 1 else None
        if weight is None or numpy_helper.to_array(initializers[weight[1]]).ndim != 1:
            continue  # per-tensor weights: nothing to fit per channel
        if node.op_type == "Conv" and len(node.input) > 2:
            bias = dequantized_initializer(node.input[2], onnx.TensorProto.INT32)
            if bias:
                layers.append((node, weight, bias))
        elif node.op_type == "MatMul" and len(initializers[weight[0]].dims) == 2 \
                and initializers[weight[0]].dims[0] <= recipe.max_refit_columns \
                and initializers[weight[0]].dims[1] == numpy_helper.to_array(initializers[weight[1]]).size:
            layers.append((node, weight, None))  # one scale per output column
    if not layers:
        return 0
    # The runtime's options: the correction fits the kernels the set will run on.
    options = session_options(exact_int8=needs_exact_kernels(weight_bits))
    options.log_severity_level = 3
    reference = onnx.load(fp32)
    # The quantizer renames a node's output where it was a graph output; names of nodes stay.
    fp32_output = {n.name: n.output[0] for n in reference.graph.node if n.op_type in ("Conv", "MatMul")}
    int8_steps = GraphStepper(model, used + checked, options)
    fp32_steps = GraphStepper(reference, used + checked, options,
                              keep=[fp32_output[node.name] for node, _, _ in layers])
    for node, weight_names, bias_names in layers:
        names = weight_names + (bias_names or (None, None))
        inputs = int8_steps.fetch(node.input[0])
        targets = fp32_steps.fetch(fp32_output[node.name])
        layer = Layer(node, *(numpy_helper.to_array(initializers[name]) if name else None for name in names),
                      recipe=recipe)
        if layer.rows_of is None:  # a wide convolution: fitted on its int8 outputs, not its rows
            inputs = int8_steps.run_node(node, inputs[:len(used)])
        fitted = fit_layer(layer, list(zip(inputs, targets)), len(used), weight_bits)
        for name, value in zip(names, fitted):
            if name and value is not None:
                initializers[name].CopyFrom(numpy_helper.from_array(value, name))
    onnx.save(model, int8)  # one file: int8 weights are a quarter of fp32's, within protobuf's 2 GB
    for location in stored_apart:
        os.remove(os.path.join(os.path.dirname(int8), location))
    return len(layers)


@dataclass
class Layer:
    """An int8 convolution (with its int32 bias) or MatMul (without one) of a QDQ graph, as
    stored: integers and their per-output-channel scales; or a convolution kept in float, its
    float32 weights and bias without scales."""

    node: object  # its onnx NodeProto
    weight: np.ndarray  # int8: a Conv's (O, C, kh, kw), a MatMul's (K, O); float32 in a float layer
    weight_scale: np.ndarray | None  # (O,); None in a float layer
    bias: np.ndarray | None  # int32 (O,); float32 in a float layer
    bias_scale: np.ndarray | None  # (O,): the input's scale times the weight's; None in a float layer
    recipe: Int8Recipe = DEFAULT_RECIPE

    @functools.cached_property
    def rows_of(self):
        """The function that draws a fit's rows from its (input, output) pairs; None for a
        convolution the refit does not handle (too wide, grouped, or not 2-D)."""
        if self.bias is None:
            return functools.partial(matmul_rows, recipe=self.recipe)
        geometry = _conv_geometry(self.node, self.weight.shape)
        if geometry is None or np.prod(self.weight.shape[1:]) > self.recipe.max_refit_columns:
            return None
        return functools.partial(conv_rows, geometry=geometry, recipe=self.recipe)

    def dequantized(self) -> tuple[np.ndarray, np.ndarray]:
        """(weights (O, K) as the fits see them, bias (O,)), float64."""
        if self.weight_scale is None:
            return self.weight.reshape(len(self.weight), -1).astype(np.float64), self.bias.astype(np.float64)
        scale = self.weight_scale.astype(np.float64)
        if self.bias is None:
            return (self.weight * scale[None, :]).T, np.zeros(len(scale))
        return (self.weight.reshape(len(self.weight), -1) * scale[:, None],
                self.bias * self.bias_scale.astype(np.float64))


def fit_layer(layer: Layer, pairs: list, fitted: int, weight_bits: int) -> tuple:
    """New values for ``layer``'s (weight, weight scale[, bias, bias scale]), None where one
    stays, fitted on the first ``fitted`` of ``pairs`` and chosen on the rest.  The pairs are
    (its int8 input, its fp32 output) per feed; for a convolution ``rows_of`` does not handle,
    (its int8 output, its fp32 output).

    A layer ``rows_of`` handles has two candidate fits: its weights and bias refitted whole,
    rounded to ``weight_bits`` by GPTQ (``fit_weights``), or a gain and offset per output
    channel on the quantizer's weights (``fit_gain_offset``; a MatMul, without a bias, keeps
    its weights).  It keeps the one whose output is closer to fp32's on the later pairs, which
    the fits did not see: the refit has ~K times the parameters and can learn the fitted images
    instead of the layer (measured on the random tiny SD encoder: 22 dB SNR gained-and-offset,
    16 dB refitted).  The other convolutions (a full-size UNet's, whose second moments would not
    fit memory) get the gain and offset.  A convolution kept in float chooses the same way,
    between a gain and offset and a refit that stays in float (``least_squares``)."""
    quantized, bias = layer.dequantized()
    rows_of, recipe = layer.rows_of, layer.recipe
    if rows_of is None:
        gain, offset = fit_gain_offset(output_moments(pairs[:fitted], bias), recipe)
        return _gain_offset_values(layer, gain, offset)
    fit, check = (layer_moments(group, rows_of, quantized.shape[1], len(quantized), recipe)
                  for group in (pairs[:fitted], pairs[fitted:]))
    has_bias = layer.bias is not None
    in_float = layer.weight_scale is None
    if in_float:
        refit_weights = least_squares(fit, quantized, intercept=True, recipe=recipe)[0]
        refit = (refit_weights, fit.bias_for(refit_weights))
    else:
        rounded, scale, refit_bias = fit_weights(fit, quantized, weight_bits, intercept=has_bias, recipe=recipe)
        refit = (rounded * scale[:, None], refit_bias if has_bias else bias)
    if has_bias:
        gain, offset = fit_gain_offset(fit.of_layer(quantized), recipe)
        kept = (quantized * gain[:, None], offset)
    else:
        kept = (quantized, bias)
    if check.error(*kept) <= check.error(*refit):
        return _gain_offset_values(layer, gain, offset) if has_bias else (None, None)
    if in_float:
        return refit[0].reshape(layer.weight.shape).astype(np.float32), None, refit[1].astype(np.float32), None
    if not has_bias:
        return rounded.T.astype(np.int8), scale.astype(np.float32)
    # The bias's scale is the input's times the weight's: keep that with the new scale.
    bias_scale = layer.bias_scale * scale / np.where(layer.weight_scale > 0, layer.weight_scale, 1.0)
    return (rounded.astype(np.int8).reshape(layer.weight.shape), scale.astype(np.float32),
            _int32(refit_bias / bias_scale), bias_scale.astype(np.float32))


def _gain_offset_values(layer: Layer, gain, offset):
    """(weight, weight scales, bias, bias scales) of a convolution given a gain and offset, None
    where one stays: the gain scales its weight scale (and so its bias's), the offset replaces
    its int32 bias; in a float layer the gain scales the weights themselves."""
    if layer.weight_scale is None:
        shape = (-1,) + (1,) * (layer.weight.ndim - 1)
        return (layer.weight * gain.reshape(shape)).astype(np.float32), None, offset.astype(np.float32), None
    bias_scale = layer.bias_scale * gain
    return (None, (layer.weight_scale * gain).astype(np.float32), _int32(offset / bias_scale),
            bias_scale.astype(np.float32))
