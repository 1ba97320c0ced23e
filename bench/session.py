"""sdc-bench session: the ONNX Runtime session options the runtime sets, each measured on one
graph of a model set, and that graph's speed against the machine's measured GEMM roof.

The roof is the rate of one large MatMul in ONNX Runtime on this machine (fp32, and int8
through MatMulInteger): the best a convolution network made of GEMMs can hope for.  The
graph's FLOPs are counted from its Conv, MatMul and Gemm nodes after shape inference at the
benchmark size.
"""
from __future__ import annotations

import json
import os

import numpy as np

from .timing import machine, median_seconds

GEMM_SIDE = 2048


def add_parser(sub) -> None:
    p = sub.add_parser("session", help="measure ONNX Runtime session options and the FLOP roof")
    p.add_argument("--models", required=True, help="model set")
    p.add_argument("--graph", default="vae_decoder", help="role of the graph to time (default vae_decoder)")
    p.add_argument("--size", type=int, default=512, help="image side in pixels")
    p.add_argument("--repeat", type=int, default=3)
    p.add_argument("--json", default=None, help="write the raw result here")
    p.set_defaults(run=_main)


def _gemm_model(int8: bool):
    from onnx import TensorProto, helper

    n = GEMM_SIDE
    if int8:
        node = helper.make_node("MatMulInteger", ["a", "b"], ["y"])
        types = (TensorProto.UINT8, TensorProto.INT8, TensorProto.INT32)
    else:
        node = helper.make_node("MatMul", ["a", "b"], ["y"])
        types = (TensorProto.FLOAT,) * 3
    graph = helper.make_graph([node], "gemm", [helper.make_tensor_value_info("a", types[0], [n, n]),
                                               helper.make_tensor_value_info("b", types[1], [n, n])],
                              [helper.make_tensor_value_info("y", types[2], [n, n])])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]).SerializeToString()


def gemm_roof(int8: bool, repeat: int) -> float:
    """GFLOP/s (int8: GOP/s) of one GEMM_SIDE^3 MatMul in ONNX Runtime on the CPU."""
    import onnxruntime as ort

    session = ort.InferenceSession(_gemm_model(int8), providers=["CPUExecutionProvider"])
    rng = np.random.default_rng(0)
    if int8:
        feeds = {"a": rng.integers(0, 255, (GEMM_SIDE,) * 2, dtype=np.uint8),
                 "b": rng.integers(-127, 127, (GEMM_SIDE,) * 2, dtype=np.int8)}
    else:
        feeds = {"a": rng.standard_normal((GEMM_SIDE,) * 2, dtype=np.float32),
                 "b": rng.standard_normal((GEMM_SIDE,) * 2, dtype=np.float32)}
    seconds = median_seconds(lambda: session.run(None, feeds), max(repeat, 5))
    return 2 * GEMM_SIDE ** 3 / seconds / 1e9


def graph_flops(path: str, shapes: dict[str, tuple[int, ...]]) -> float:
    """Multiply-adds x 2 of the Conv, MatMul, Gemm and MultiHeadAttention nodes of an ONNX
    graph at these input shapes (shape inference; nodes whose shapes stay unknown are not counted)."""
    import onnx
    from onnxruntime.tools.symbolic_shape_infer import SymbolicShapeInference

    # Weights stay on disk: only their dims are read.  ONNX Runtime's symbolic inference
    # follows shapes computed in the graph (batch from Shape, Expand) where onnx's does not.
    model = onnx.load(path, load_external_data=False)
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
    total = 0.0
    for node in model.graph.node:
        out = dims.get(node.output[0])
        if not out or None in out:
            continue
        if node.op_type == "Conv" and node.input[1] in weights:
            _, per_output, *kernel = weights[node.input[1]]  # (Cout, Cin/groups, kh, kw)
            total += 2 * float(np.prod(out)) * per_output * float(np.prod(kernel))
        elif node.op_type in ("MatMul", "Gemm"):
            a = dims.get(node.input[0]) or weights.get(node.input[0])
            if a and None not in a:
                inner = a[-2] if node.op_type == "Gemm" and any(
                    at.name == "transA" and at.i for at in node.attribute) else a[-1]
                total += 2 * float(np.prod(out)) * inner
        elif node.op_type == "MultiHeadAttention":  # Q·Kᵀ and ·V: 2 x 2 x B x S x S' x hidden
            keys = dims.get(node.input[1])
            if keys and None not in keys:
                total += 4 * float(np.prod(out)) * keys[1]
    return total


def run(args) -> dict:
    import onnxruntime as ort

    from sdc_runtime.manifest import load_manifest

    manifest = load_manifest(args.models)
    graph = manifest.graphs.get(args.graph)
    if graph is None:
        raise SystemExit(f"sdc-bench: error: the set has no {args.graph} graph")
    path = os.path.join(args.models, graph.file)
    side = args.size // manifest.downscale
    if args.graph == "vae_encoder":
        inputs = {"image": np.random.default_rng(0).random((1, 3, args.size, args.size), dtype=np.float32)}
    else:
        inputs = {"latent" if args.graph != "unet" else "sample":
                  np.random.default_rng(0).standard_normal((1, manifest.latent_channels, side, side), dtype=np.float32)}
        if args.graph == "unet":
            inputs["timestep"] = np.array([15.0], np.float32)
    level = ort.GraphOptimizationLevel
    # The runtime's own settings first (NeuralStages.session), then one change at a time.
    variants = {
        "runtime: ORT_ENABLE_ALL, no arena, default threads": dict(),
        "memory arena on": dict(arena=True),
        "graph optimization: basic": dict(level=level.ORT_ENABLE_BASIC),
        "graph optimization: extended": dict(level=level.ORT_ENABLE_EXTENDED),
        "1 intra-op thread": dict(threads=1),
        "no spinning threads": dict(spin=False),
    }
    rows = {}
    for name, change in variants.items():
        options = ort.SessionOptions()
        options.graph_optimization_level = change.get("level", level.ORT_ENABLE_ALL)
        options.enable_cpu_mem_arena = change.get("arena", False)
        if "threads" in change:
            options.intra_op_num_threads = change["threads"]
        if change.get("spin") is False:
            options.add_session_config_entry("session.intra_op.allow_spinning", "0")
        session = ort.InferenceSession(path, options, providers=["CPUExecutionProvider"])
        names = [i.name for i in session.get_inputs()]
        feeds = dict(zip(names, inputs.values()))
        rows[name] = median_seconds(lambda: session.run(None, feeds), args.repeat)
    flops = graph_flops(path, {n: a.shape for n, a in zip(names, inputs.values())})
    return {"machine": machine(), "models": os.path.abspath(args.models), "graph": args.graph,
            "precision": graph.precision, "size": args.size, "repeat": args.repeat, "seconds": rows,
            "graph_gflop": flops / 1e9, "roof_fp32_gflops": gemm_roof(False, args.repeat),
            "roof_int8_gops": gemm_roof(True, args.repeat)}


def markdown(r: dict) -> str:
    base = next(iter(r["seconds"].values()))
    lines = [f"Machine: {r['machine']}. Graph {r['graph']} ({r['precision']}) at {r['size']}x{r['size']},"
             f" {r['graph_gflop']:.1f} GFLOP; medians of {r['repeat']}. Roof (one {GEMM_SIDE}^3 MatMul in ONNX"
             f" Runtime): fp32 {r['roof_fp32_gflops']:.0f} GFLOP/s, int8 {r['roof_int8_gops']:.0f} GOP/s.", "",
             "| session options | seconds | vs the runtime's | GFLOP/s | share of the fp32 roof |",
             "| --- | --- | --- | --- | --- |"]
    for name, seconds in r["seconds"].items():
        rate = r["graph_gflop"] / seconds
        lines.append(f"| {name} | {seconds:.3f} | {base / seconds:.2f}x | {rate:.0f} |"
                     f" {rate / r['roof_fp32_gflops']:.2f} |")
    return "\n".join(lines)


def _main(args) -> int:
    result = run(args)
    if args.json:
        with open(args.json, "w") as fh:
            json.dump(result, fh, indent=1)
    print(markdown(result))
    return 0
