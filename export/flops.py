"""FLOPs of ONNX graphs, counted from their shapes: the int8 export weighs what a stage
costs with them, and sdc-bench session sets a graph's speed against the FLOP roof."""
from __future__ import annotations

import os

import numpy as np


def node_flops(path: str, shapes: dict[str, tuple[int, ...]]) -> dict[str, float]:
    """Multiply-adds x 2 of each Conv, MatMul, Gemm and MultiHeadAttention node of an ONNX
    graph, by node name, at these input shapes (shape inference; nodes whose shapes stay
    unknown are not counted)."""
    import onnx
    from onnx import external_data_helper
    from onnxruntime.tools.symbolic_shape_infer import SymbolicShapeInference

    # Weights stay on disk: only their dims are read.  ONNX Runtime's symbolic inference
    # follows shapes computed in the graph (batch from Shape, Expand) where onnx's does not.
    model = onnx.load(path, load_external_data=False)
    for tensor in model.graph.initializer:  # small constants may feed shape arithmetic
        if external_data_helper.uses_external_data(tensor) and np.prod(tensor.dims) <= 1 << 16:
            external_data_helper.load_external_data_for_tensor(tensor, os.path.dirname(os.path.abspath(path)))
            tensor.data_location = onnx.TensorProto.DEFAULT
    for value in model.graph.input:
        if value.name in shapes:
            for dim, size in zip(value.type.tensor_type.shape.dim, shapes[value.name]):
                dim.ClearField("dim_param")
                dim.dim_value = size
    model = SymbolicShapeInference.infer_shapes(model, auto_merge=True)
    dims = {}
    for value in list(model.graph.value_info) + list(model.graph.input) + list(model.graph.output):
        shape = [d.dim_value if d.HasField("dim_value") else None for d in value.type.tensor_type.shape.dim]
        dims[value.name] = shape
    weights = {t.name: list(t.dims) for t in model.graph.initializer}
    # int8 graphs: a weight reaches its Conv or MatMul through a DequantizeLinear of the initializer.
    for node in model.graph.node:
        if node.op_type == "DequantizeLinear" and node.input[0] in weights:
            weights[node.output[0]] = weights[node.input[0]]
    flops = {}
    for node in model.graph.node:
        out = dims.get(node.output[0])
        if not out or None in out:
            continue
        if node.op_type == "Conv" and node.input[1] in weights:
            _, per_output, *kernel = weights[node.input[1]]  # (Cout, Cin/groups, kh, kw)
            flops[node.name] = 2 * float(np.prod(out)) * per_output * float(np.prod(kernel))
        elif node.op_type in ("MatMul", "Gemm"):
            a = dims.get(node.input[0]) or weights.get(node.input[0])
            if a and None not in a:
                inner = a[-2] if node.op_type == "Gemm" and any(
                    at.name == "transA" and at.i for at in node.attribute) else a[-1]
                flops[node.name] = 2 * float(np.prod(out)) * inner
        elif node.op_type == "MultiHeadAttention":  # Q·Kᵀ and ·V: 2 x 2 x B x S x S' x hidden
            keys = dims.get(node.input[1])
            if keys and None not in keys:
                flops[node.name] = 4 * float(np.prod(out)) * keys[1]
    return flops


def graph_flops(path: str, shapes: dict[str, tuple[int, ...]]) -> float:
    """Multiply-adds x 2 of an ONNX graph at these input shapes (``node_flops``'s sum)."""
    return sum(node_flops(path, shapes).values())
