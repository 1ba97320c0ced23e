"""The sensitivity sweep: which blocks stay in float, and whether a decoder's first stage
gets 16-bit activations."""
from __future__ import annotations

import math
import os
from collections import defaultdict
from dataclasses import dataclass

import numpy as np

from sdc_runtime.progress import report

from ..flops import node_flops
from .calibrate import drawn_feeds
from .ops import DEFAULT_WEIGHT_BITS
from .qdq import first_stage, outputs, quantize_file, quantized_nodes
from .recipe import DEFAULT_RECIPE, Int8Recipe


@dataclass
class SweepResult:
    role: str
    all_int8_snr_db: float  # every candidate quantized
    gains_db: dict[str, float]  # unit -> SNR gain when that unit alone stays float
    kept: tuple[str, ...]  # node names kept in float
    final_snr_db: float  # with the kept nodes in float and the wide stage, if kept
    wide: tuple[str, ...] = ()  # node names whose activations are 16-bit: the wide stage, if kept
    wide_gain_db: float | None = None  # the SNR the wide stage gained; None: not tried
    wide_flop_share: float | None = None  # the stage's share of the graph's FLOPs; None: no stage


def snr_db(reference: list[np.ndarray], actual: list[np.ndarray]) -> float:
    signal = sum(float(np.square(r).sum()) for r in reference)
    noise = sum(float(np.square(a - r).sum()) for r, a in zip(reference, actual))
    return math.inf if noise == 0 else 10 * math.log10(signal / noise)


def sweep_units(nodes: list[str], recipe: Int8Recipe = DEFAULT_RECIPE) -> dict[str, list[str]]:
    """The sweep's units: each node, or for graphs with more than recipe.max_sweep_units candidates,
    blocks of nodes sharing their module path (node names from the torch exporter are
    '/module/path/Op'), shortened until the blocks are few enough."""
    depth = max(n.count("/") for n in nodes)
    while True:
        units: dict[str, list[str]] = defaultdict(list)
        for node in nodes:
            units["/".join(node.split("/")[:depth + 1]) if node.count("/") > depth else node].append(node)
        if len(units) <= recipe.max_sweep_units or depth <= 1:
            return dict(units)
        depth -= 1


def sweep(role: str, src: str, feeds: list[dict], scratch: str, progress=None, *,
          weight_bits: int = DEFAULT_WEIGHT_BITS, recipe: Int8Recipe = DEFAULT_RECIPE) -> SweepResult:
    """Quantize ``src`` with everything int8, then with each unit alone kept in float; keep
    in float the units that gain at least recipe.keep_gain_db (most first, at most recipe.max_kept), and
    measure the graph with all of them kept."""
    cache = os.path.join(scratch, "ranges.json")
    trial = os.path.join(scratch, "trial.onnx")
    scored = drawn_feeds(feeds, recipe.sweep_feeds)
    reference = outputs(src, scored)

    def snr_with(exclude, wide=()) -> float:
        quantize_file(src, trial, feeds, cache, exclude, wide, weight_bits=weight_bits)  # calibrates on all feeds, once
        return snr_db(reference, outputs(trial, scored, weight_bits))

    base = snr_with(())
    units = sweep_units(quantized_nodes(trial), recipe)
    if not units or math.isinf(base):  # nothing quantized, or nothing lost
        return SweepResult(role, base, {}, (), base)
    gains = {}
    report(progress, f"sweep {role}", 0, len(units))
    for i, (unit, nodes) in enumerate(units.items()):
        gains[unit] = snr_with(nodes) - base
        report(progress, f"sweep {role}", i + 1, len(units))
    weights = _weight_bytes(src)
    budget, chosen = recipe.float_weight_share * sum(weights.values()), []
    for unit in sorted(gains, key=gains.get, reverse=True):
        cost = sum(weights.get(node, 0) for node in units[unit])
        if gains[unit] >= recipe.keep_gain_db and len(chosen) < recipe.max_kept and cost <= budget:
            chosen.append(unit)
            budget -= cost
    kept = tuple(node for unit in chosen for node in units[unit])
    final = snr_with(kept) if kept else base
    stage = first_stage(src)
    if not stage:
        return SweepResult(role, base, gains, kept, final)
    flops = node_flops(src, {name: value.shape for name, value in feeds[0].items()})
    share = sum(flops.get(node, 0.0) for node in stage) / max(sum(flops.values()), 1.0)
    if share > recipe.wide_flop_share:
        return SweepResult(role, base, gains, kept, final, wide_flop_share=share)
    widened = snr_with(kept, stage)
    if widened - final < recipe.keep_gain_db:
        return SweepResult(role, base, gains, kept, final, (), widened - final, share)
    return SweepResult(role, base, gains, kept, widened, tuple(stage), widened - final, share)


def _weight_bytes(path: str) -> dict[str, int]:
    """Bytes of the initializers each node of an ONNX graph reads (its weights)."""
    import onnx

    model = onnx.load(path, load_external_data=False)
    sizes = {}
    for t in model.graph.initializer:
        count = int(np.prod(t.dims)) if t.dims else 1
        sizes[t.name] = count * (2 if t.data_type == onnx.TensorProto.FLOAT16 else 4)
    return {n.name: sum(sizes.get(i, 0) for i in n.input) for n in model.graph.node}


def unit_of(node: str, result: SweepResult) -> str:
    return max((u for u in result.gains_db if node == u or node.startswith(u + "/")), key=len)
