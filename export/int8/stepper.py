"""An ONNX graph run a stretch of nodes at a time over many feeds (the correction's runs)."""
from __future__ import annotations

import numpy as np

from sdc_runtime.errors import SdcExportError


class GraphStepper:
    """An ONNX graph run over a list of feeds a stretch of nodes at a time, in graph order,
    keeping for each feed only the tensors that later nodes read (and ``keep``, until fetched).

    Each stretch runs as a graph of its own, built when it runs from the initializers as they
    are then: a layer corrected after its input was fetched runs corrected.  Nodes that read
    only initializers (the weights' DequantizeLinear) run within every stretch that reads
    them, never ahead of it, for the same reason."""

    def __init__(self, model, feeds: list[dict], options, keep=()):
        from onnx import AttributeProto

        self.model, self.options = model, options
        self.values = [dict(feed) for feed in feeds]
        self.keep = set(keep)
        self.initializers = {t.name: t for t in model.graph.initializer}
        self.constant = {}  # output name -> its node, of the nodes that read only initializers
        self.nodes = []  # the others, in graph order
        self.position = {}  # output name -> index in self.nodes of the node that writes it
        self.last_read = {}  # name -> index in self.nodes of the last node that reads it
        for node in model.graph.node:
            if any(a.type in (AttributeProto.GRAPH, AttributeProto.GRAPHS) for a in node.attribute):
                raise SdcExportError(f"node {node.name} holds a subgraph ({node.op_type}): the int8 correction"
                                  " cannot run its graph in stretches")
            if all(not name or name in self.initializers or name in self.constant for name in node.input):
                self.constant.update((name, node) for name in node.output)
                continue
            self.position.update((name, len(self.nodes)) for name in node.output)
            self.last_read.update((name, len(self.nodes)) for name in node.input)
            self.nodes.append(node)
        self.last_read.update((o.name, len(self.nodes)) for o in model.graph.output)
        self.order = {id(node): i for i, node in enumerate(model.graph.node)}
        self.done = 0  # self.nodes[:done] have run

    def fetch(self, name: str) -> list[np.ndarray]:
        """The tensor ``name`` for each feed, running the nodes up to the one that writes it."""
        stop = self.position.get(name, -1) + 1
        if stop > self.done:
            stretch = self.nodes[self.done:stop]
            written = [out for node in stretch for out in node.output if out]
            wanted = [out for out in written if self.last_read.get(out, -1) >= stop or out in self.keep or out == name]
            self._run(stretch, wanted)
            self.done = stop
            for values in self.values:
                for dead in [n for n in values if self.last_read.get(n, -1) < stop and n not in self.keep and n != name]:
                    del values[dead]
        self.keep.discard(name)
        return [values[name] for values in self.values]

    def run_node(self, node, inputs: list[np.ndarray]) -> list[np.ndarray]:
        """``node``'s first output for each of ``inputs`` (its first input; the others initializers)."""
        session, names = self._session([node], [node.output[0]], {node.input[0]: inputs[0].dtype})
        return [session.run(None, {names[0]: x})[0] for x in inputs]

    def _run(self, stretch: list, wanted: list[str]) -> None:
        if not wanted:
            return
        session, names = self._session(stretch, wanted, {name: v.dtype for name, v in self.values[0].items()})
        for values in self.values:
            values.update(zip(wanted, session.run(wanted, {name: values[name] for name in names})))

    def _session(self, stretch: list, wanted: list[str], dtypes: dict):
        """(a session of the graph of ``stretch`` and the constant nodes it reads, with outputs
        ``wanted``, the names of its inputs); ``dtypes`` maps the inputs' names to their numpy types."""
        import onnx
        import onnxruntime as ort
        from onnx import helper

        constants, pending = {}, [name for node in stretch for name in node.input if name in self.constant]
        while pending:
            node = self.constant[pending.pop()]
            if id(node) not in constants:
                constants[id(node)] = node
                pending.extend(name for name in node.input if name in self.constant)
        nodes = sorted(constants.values(), key=lambda n: self.order[id(n)]) + list(stretch)
        written = {out for node in stretch for out in node.output}
        names = sorted({name for node in stretch for name in node.input
                        if name and name not in written and name not in self.initializers and name not in self.constant})
        read = sorted({name for node in nodes for name in node.input if name in self.initializers})
        graph = helper.make_graph(
            nodes, "stretch",
            [helper.make_tensor_value_info(name, helper.np_dtype_to_tensor_dtype(dtypes[name]), None)
             for name in names],
            [onnx.ValueInfoProto(name=name) for name in wanted],  # types as the nodes write them
            [self.initializers[name] for name in read])
        model = helper.make_model(graph, opset_imports=self.model.opset_import, ir_version=self.model.ir_version)
        model.functions.extend(self.model.functions)
        return ort.InferenceSession(model.SerializeToString(), self.options, providers=["CPUExecutionProvider"]), names
