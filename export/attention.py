"""Fuse the exporter's decomposed attention into ONNX Runtime's ``MultiHeadAttention``.

The TorchScript exporter writes ``scaled_dot_product_attention`` as reshapes, transposes, two
MatMuls and a Softmax.  At 512² the UNet's self-attention runs over 4096 tokens: the
4096×4096 score matrix per head is written, soft-maxed and read again, 44% of an fp32 UNet
step on the CPU (BENCHMARKS.md §8), and int8 cannot speed it up.  The fused operator (CPU:
a flash-attention kernel that never holds the whole score matrix; CUDA: its fused kernels)
computes the same function.  Export's torch parity check runs on the fused graph, so a
pattern matched wrongly fails the export rather than shipping.

Matched, per Softmax (names from the TorchScript export of diffusers' attention)::

    q: Reshape(q_proj, [B, S, heads, d]) -> Transpose(0,2,1,3) -> Mul(sqrt scale)
    k: Reshape(k_proj, [B, S', heads, d]) -> Transpose(0,2,3,1) -> Mul(sqrt scale)
    v: Reshape(v_proj, [B, S', heads, d]) -> Transpose(0,2,1,3)
    Softmax(MatMul(q, k)) -> MatMul(., v) -> Transpose(0,2,1,3) -> Reshape([B, S, heads*d])

becomes ``MultiHeadAttention(q_proj, k_proj, v_proj, num_heads=heads)``, whose default scale
1/sqrt(d) is the one scaled_dot_product_attention uses.
"""
from __future__ import annotations

import onnx
from onnx import helper, numpy_helper

MS_DOMAIN = "com.microsoft"


class _Graph:
    def __init__(self, graph):
        self.graph = graph
        self.producer = {out: node for node in graph.node for out in node.output}
        self.consumers: dict[str, list] = {}
        for node in graph.node:
            for name in node.input:
                self.consumers.setdefault(name, []).append(node)

    def made_by(self, name: str, op: str):
        node = self.producer.get(name)
        return node if node is not None and node.op_type == op else None

    def only_consumer(self, name: str, op: str):
        users = self.consumers.get(name, [])
        return users[0] if len(users) == 1 and users[0].op_type == op else None

    def constant(self, name: str):
        node = self.producer.get(name)
        if node is not None and node.op_type == "Constant":
            return numpy_helper.to_array(node.attribute[0].t)
        for tensor in self.graph.initializer:
            if tensor.name == name:
                return numpy_helper.to_array(tensor)
        return None


def _perm(node) -> list[int] | None:
    for attribute in node.attribute:
        if attribute.name == "perm":
            return list(attribute.ints)
    return None


def _split_heads(g: _Graph, name: str, perm: list[int], scaled: bool):
    """The projection that ``name`` splits into heads, the heads, and the nodes doing it."""
    nodes = []
    if scaled:
        mul = g.made_by(name, "Mul")
        if mul is None:
            return None
        nodes.append(mul)
        name = mul.input[0]
    transpose = g.made_by(name, "Transpose")
    if transpose is None or _perm(transpose) != perm:
        return None
    reshape = g.made_by(transpose.input[0], "Reshape")
    if reshape is None:
        return None
    shape = g.made_by(reshape.input[1], "Concat")
    heads = g.constant(shape.input[2]) if shape is not None and len(shape.input) == 4 else None
    if heads is None or heads.size != 1:
        return None
    return reshape.input[0], int(heads.reshape(-1)[0]), nodes + [transpose, reshape]


def _match(g: _Graph, softmax):
    scores = g.made_by(softmax.input[0], "MatMul")
    weighted = g.only_consumer(softmax.output[0], "MatMul")
    if scores is None or weighted is None or weighted.input[0] != softmax.output[0]:
        return None
    merge = g.only_consumer(weighted.output[0], "Transpose")
    if merge is None or _perm(merge) != [0, 2, 1, 3]:
        return None
    out = g.only_consumer(merge.output[0], "Reshape")
    q = _split_heads(g, scores.input[0], [0, 2, 1, 3], scaled=True)
    k = _split_heads(g, scores.input[1], [0, 2, 3, 1], scaled=True)
    v = _split_heads(g, weighted.input[1], [0, 2, 1, 3], scaled=False)
    if out is None or None in (q, k, v) or len({q[1], k[1], v[1]}) != 1:
        return None
    fused = helper.make_node("MultiHeadAttention", [q[0], k[0], v[0]], [out.output[0]],
                             name=softmax.name.rsplit("/", 1)[0] + "/MultiHeadAttention",
                             domain=MS_DOMAIN, num_heads=q[1])
    return fused, [scores, softmax, weighted, merge, out] + q[2] + k[2] + v[2]


def _drop_dead(graph) -> None:
    """Remove nodes whose outputs nothing reads (the shape arithmetic of the fused heads)."""
    outputs = {value.name for value in graph.output}
    while True:
        read = outputs | {name for node in graph.node for name in node.input}
        dead = [node for node in graph.node if not any(out in read for out in node.output)]
        if not dead:
            return
        for node in dead:
            graph.node.remove(node)


def fuse_attention(model: onnx.ModelProto) -> int:
    """Fuse every matched attention of ``model`` in place; returns how many were fused."""
    g = _Graph(model.graph)
    matches = [m for m in (_match(g, node) for node in model.graph.node if node.op_type == "Softmax") if m]
    if not matches:
        return 0
    position = {id(node): index for index, node in enumerate(model.graph.node)}
    replaced = {}
    removed = set()
    for fused, nodes in matches:
        # The fused node takes the place of the last node it replaces: its inputs are all made
        # before the first of them, so the graph stays in topological order.
        replaced[max(position[id(n)] for n in nodes)] = fused
        removed.update(id(n) for n in nodes)
    kept = []
    for index, node in enumerate(model.graph.node):
        if index in replaced:
            kept.append(replaced[index])
        elif id(node) not in removed:
            kept.append(node)
    del model.graph.node[:]
    model.graph.node.extend(kept)
    _drop_dead(model.graph)
    if not any(opset.domain == MS_DOMAIN for opset in model.opset_import):
        model.opset_import.append(helper.make_opsetid(MS_DOMAIN, 1))
    return len(matches)
