"""sdc-bench session: the ONNX Runtime session options the runtime sets, each measured on one
graph of a model set, and that graph's speed against the machine's measured FLOP roof.

The roof is the rate of the fastest dense kernel ONNX Runtime has on this machine, measured:
a large MatMul (the GEMM rate) and the decoders' dominant 3x3 convolution, in fp32 and in
int8.  The graph's FLOPs are counted from its Conv, MatMul, Gemm and MultiHeadAttention nodes
after shape inference at the benchmark size.
"""
from __future__ import annotations

import os

import numpy as np

from sdc_export.flops import graph_flops
from sdc_runtime.errors import SdcUsageError

from .timing import machine, median_seconds, report

GEMM_SIDE = 2048
# The decoder's dominant layer: a 3x3 convolution, 512 channels in and out, at 64x64.
CONV_CHANNELS, CONV_SIDE = 512, 64


def add_parser(sub) -> None:
    p = sub.add_parser("session", help="measure ONNX Runtime session options and the FLOP roof")
    p.add_argument("--models", required=True, help="model set")
    p.add_argument("--graph", default="vae_decoder", help="role of the graph to time (default vae_decoder)")
    p.add_argument("--size", type=int, default=512, help="image side in pixels")
    p.add_argument("--repeat", type=int, default=3)
    p.add_argument("--json", default=None, help="write the raw result here")
    p.set_defaults(run=_main)


def _kernel_model(kind: str) -> tuple[bytes, dict[str, np.ndarray], float]:
    """One roof kernel as (ONNX model, feeds, operations per run)."""
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(0)
    n, c, side = GEMM_SIDE, CONV_CHANNELS, CONV_SIDE
    initializers = []
    if kind.startswith("MatMul"):
        int8 = kind == "MatMulInteger"
        a = rng.integers(0, 255, (n, n), dtype=np.uint8) if int8 else rng.standard_normal((n, n), dtype=np.float32)
        b = rng.integers(-127, 127, (n, n), dtype=np.int8) if int8 else rng.standard_normal((n, n), dtype=np.float32)
        node = helper.make_node(kind, ["a", "b"], ["y"])
        inputs = [helper.make_tensor_value_info("a", helper.np_dtype_to_tensor_dtype(a.dtype), [n, n]),
                  helper.make_tensor_value_info("b", helper.np_dtype_to_tensor_dtype(b.dtype), [n, n])]
        output = helper.make_tensor_value_info("y", TensorProto.INT32 if int8 else TensorProto.FLOAT, [n, n])
        feeds, operations = {"a": a, "b": b}, 2.0 * n ** 3
    else:
        x = rng.standard_normal((1, c, side, side), dtype=np.float32)
        w = rng.standard_normal((c, c, 3, 3), dtype=np.float32) * 0.01
        if kind == "QLinearConv":  # uint8 activations, int8 weights: what the int8 graphs run
            names = ["x", "xs", "xz", "w", "ws", "wz", "ys", "yz"]
            initializers = [numpy_helper.from_array(np.float32(0.02), "xs"), numpy_helper.from_array(np.uint8(128), "xz"),
                            numpy_helper.from_array(rng.integers(-127, 127, w.shape, dtype=np.int8), "w"),
                            numpy_helper.from_array(np.float32(0.01), "ws"), numpy_helper.from_array(np.int8(0), "wz"),
                            numpy_helper.from_array(np.float32(0.05), "ys"), numpy_helper.from_array(np.uint8(128), "yz")]
            x = rng.integers(0, 255, x.shape, dtype=np.uint8)
            element = TensorProto.UINT8
        else:
            names = ["x", "w"]
            initializers = [numpy_helper.from_array(w, "w")]
            element = TensorProto.FLOAT
        node = helper.make_node(kind, names, ["y"], pads=[1, 1, 1, 1])
        inputs = [helper.make_tensor_value_info("x", element, list(x.shape))]
        output = helper.make_tensor_value_info("y", element, list(x.shape))
        feeds, operations = {"x": x}, 2.0 * c * c * 9 * side * side
    graph = helper.make_graph([node], "roof", inputs, [output], initializer=initializers)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]).SerializeToString(), feeds, operations


def roof(int8: bool, repeat: int) -> dict[str, float]:
    """G(FL)OP/s of the machine's fastest dense kernels in ONNX Runtime, each measured: one
    GEMM_SIDE^3 MatMul and the decoder's 3x3 convolution (fp32, or the int8 kernels).  MLAS's
    GEMM is slower than its convolution kernels on AVX-512 machines, so a GEMM alone is no
    roof; the roof is the fastest of them."""
    import onnxruntime as ort

    from sdc_runtime.neural import needs_exact_kernels, session_options

    rates = {}
    for kind in (("MatMulInteger", "QLinearConv") if int8 else ("MatMul", "Conv")):
        model, feeds, operations = _kernel_model(kind)
        # The kernels the runtime runs for these 8-bit weights (the exact ones on CPUs without
        # VNNI or AMX).
        options = session_options(exact_int8=needs_exact_kernels(8))
        session = ort.InferenceSession(model, options, providers=["CPUExecutionProvider"])
        rates[kind] = operations / median_seconds(lambda: session.run(None, feeds), max(repeat, 5)) / 1e9
    return rates


def run(args) -> dict:
    import onnxruntime as ort

    from sdc_runtime.manifest import load_manifest
    from sdc_runtime.neural import needs_exact_kernels, session_options

    manifest = load_manifest(args.models)
    graph = manifest.graphs.get(args.graph)
    if graph is None:
        raise SdcUsageError(f"the set has no {args.graph} graph")
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
    exact = needs_exact_kernels(graph.weight_bits)  # what the runtime opens this graph with
    # The runtime's own settings first (session_options), then one change at a time.
    variants = {
        f"runtime: ORT_ENABLE_ALL, no arena, default threads, {'exact' if exact else 'fast'} int8 kernels": dict(),
        "memory arena on": dict(arena=True),
        "graph optimization: basic": dict(level=level.ORT_ENABLE_BASIC),
        "graph optimization: extended": dict(level=level.ORT_ENABLE_EXTENDED),
        "1 intra-op thread": dict(threads=1),
        "no spinning threads": dict(spin=False),
    }
    if graph.precision == "int8":  # the option changes only int8 kernels
        variants["exact int8 kernels off (x64quantprecision 0: saturating u8s8 for 8-bit weights)" if exact else
                 "exact int8 kernels on (x64quantprecision 1)"] = dict(exact_int8=not exact)
    rows = {}
    for name, change in variants.items():
        options = session_options(change.get("threads"), exact_int8=change.get("exact_int8", exact))
        options.graph_optimization_level = change.get("level", level.ORT_ENABLE_ALL)
        options.enable_cpu_mem_arena = change.get("arena", False)
        if change.get("spin") is False:
            options.add_session_config_entry("session.intra_op.allow_spinning", "0")
        session = ort.InferenceSession(path, options, providers=["CPUExecutionProvider"])
        names = [i.name for i in session.get_inputs()]
        feeds = dict(zip(names, inputs.values()))
        rows[name] = median_seconds(lambda: session.run(None, feeds), args.repeat)
    flops = graph_flops(path, {n: a.shape for n, a in zip(names, inputs.values())})
    return {"machine": machine(), "models": os.path.abspath(args.models), "graph": args.graph,
            "precision": graph.precision, "size": args.size, "repeat": args.repeat, "seconds": rows,
            "graph_gflop": flops / 1e9, "roof_fp32": roof(False, args.repeat), "roof_int8": roof(True, args.repeat)}


def markdown(r: dict) -> str:
    base = next(iter(r["seconds"].values()))
    fp32_roof = max(r["roof_fp32"].values())
    kernels = ", ".join(f"{k} {v:.0f}" for k, v in {**r["roof_fp32"], **r["roof_int8"]}.items())
    lines = [f"Machine: {r['machine']}. Graph {r['graph']} ({r['precision']}) at {r['size']}x{r['size']},"
             f" {r['graph_gflop']:.1f} GFLOP; medians of {r['repeat']}. Kernel rates in ONNX Runtime, G(FL)OP/s"
             f" ({GEMM_SIDE}^3 MatMul; 3x3 Conv, {CONV_CHANNELS} channels at {CONV_SIDE}x{CONV_SIDE}): {kernels};"
             f" fp32 roof {fp32_roof:.0f} GFLOP/s.", "",
             "| session options | seconds | vs the runtime's | GFLOP/s | share of the fp32 roof |",
             "| --- | --- | --- | --- | --- |"]
    for name, seconds in r["seconds"].items():
        rate = r["graph_gflop"] / seconds
        lines.append(f"| {name} | {seconds:.3f} | {base / seconds:.2f}x | {rate:.0f} |"
                     f" {rate / fp32_roof:.2f} |")
    return "\n".join(lines)


def _main(args) -> int:
    result = run(args)
    return report(result, markdown(result), args.json)
