"""int8 graphs: static post-training quantization to QDQ (per-channel int8 weights, uint8
activations) with onnxruntime's quantization tools, shaped like them:

    calibrate  the images, and the feeds the runtime gives each graph (the set run in fp32)
    qdq        onnxruntime's quantize_static, and what is read of its graphs
    sweep      which blocks stay float, and 16-bit activations in a decoder's first stage
    correct    each int8 layer fitted again to the fp32 graph's output (with linalg, stepper)
    parity     each int8 graph against its fp32 graph on a held-out image
    recipe     every tuning choice, in one Int8Recipe that the export (or a test) passes in

Calibration feeds each graph what the runtime itself feeds it: the set is run, in fp32, on
the calibration images through the codec (encoder, palette and u8 latent coding at several
qualities, the UNet's denoising steps, the decoders, whole and in tiles), and every graph
input is recorded.  A sensitivity sweep then finds the nodes whose quantization costs the
most accuracy, and those stay in float, and tries 16-bit activations in a decoder's cheap
lowest-resolution stage.  Last, each int8 convolution and MatMul, and each convolution kept
in float, is fitted again, layer by layer, to the fp32 graph's output on the calibration
feeds: its weights (int8 ones rounded by GPTQ) and its bias (``correct_layers``).
"""
from __future__ import annotations

import os
import shutil
import tempfile

import numpy as np

from sdc_runtime.errors import SdcExportError
from sdc_runtime.progress import report

from .calibrate import calibration_images, calibration_side, record_graph_inputs
from .correct import correct_layers, with_conv_biases
from .ops import CALIBRATION_SIDE, DEFAULT_WEIGHT_BITS, MIN_CALIBRATION_IMAGES
from .parity import Int8Parity, int8_parity
from .qdq import quantize_file
from .recipe import DEFAULT_RECIPE, Int8Recipe
from .sweep import SweepResult, sweep, unit_of

__all__ = ["CALIBRATION_SIDE", "DEFAULT_RECIPE", "DEFAULT_WEIGHT_BITS", "Int8Parity",
           "Int8Recipe", "MIN_CALIBRATION_IMAGES", "SweepResult", "calibration_images", "calibration_side",
           "keep_reference_decoder", "needs_reference_decoder", "quantize_model_set", "quantize_set"]


def quantize_set(model_dir: str, roles: tuple[str, ...], images: list[np.ndarray], *, sweep_nodes: bool = True,
                 correct: bool = True, weight_bits: int = DEFAULT_WEIGHT_BITS, progress=None,
                 recipe: Int8Recipe = DEFAULT_RECIPE):
    """Quantize the graphs of ``roles`` in the fp32 model set ``model_dir`` in place.

    All images but the last calibrate the ranges; the last is held out for parity.  Each
    role's main graph is swept (unless not ``sweep_nodes``); its kept nodes stay float in all
    of the role's files (split parts share the main graph's node names).  The layer correction
    fits on all the calibration images but the last, which checks its fits (``correct_layers``).
    Without ``correct`` the layers are not corrected: the graphs have the same nodes, kernels
    and speed, for a speed bench that cannot afford the correction's runs (a full-size UNet's
    take hours).  Returns ({role: the graph's manifest fields float_nodes and wide_nodes,
    each {node: SNR gain dB}}, [Int8Parity], [SweepResult])."""
    from sdc_runtime.manifest import load_manifest

    if len(images) < MIN_CALIBRATION_IMAGES:
        raise SdcExportError(f"int8 calibration needs at least {MIN_CALIBRATION_IMAGES} images, not {len(images)}")
    manifest = load_manifest(model_dir)
    fitted = record_graph_inputs(model_dir, images[:-2], progress, recipe=recipe)
    checks = record_graph_inputs(model_dir, images[-2:-1], recipe=recipe)
    calibration = {file: fitted[file] + checks[file] for file in fitted}
    held_out = record_graph_inputs(model_dir, images[-1:], recipe=recipe)
    for role in roles:
        graph = manifest.graphs[role]
        for file in (graph.file, graph.whole, graph.tiled):
            if file is not None and not (fitted.get(file) and checks.get(file) and held_out.get(file)):
                raise SdcExportError(f"int8 calibration never ran {file}: {role} runs it in tiles, so the calibration"
                                  f" images need a side over {recipe.min_calibration_tile} pixels")
    graph_fields, parities, sweeps = {}, [], []
    with tempfile.TemporaryDirectory(prefix=".sdc-int8-", dir=model_dir) as scratch:
        for role in roles:
            graph = manifest.graphs[role]
            kept: tuple[str, ...] = ()
            wide: tuple[str, ...] = ()
            if sweep_nodes:
                result = sweep(role, os.path.join(model_dir, graph.file), calibration[graph.file],
                               tempfile.mkdtemp(dir=scratch), progress, weight_bits=weight_bits, recipe=recipe)
                sweeps.append(result)
                kept, wide = result.kept, result.wide
            graph_fields[role] = {
                "float_nodes": {node: round(result.gains_db[unit_of(node, result)], 3) for node in kept},
                "wide_nodes": {node: round(result.wide_gain_db, 3) for node in wide}}
            for file in (graph.file, graph.whole, graph.tiled):
                if file is None:
                    continue
                report(progress, f"quantize {file}", 0, 1)
                src = os.path.join(model_dir, file)
                work = tempfile.mkdtemp(dir=scratch)
                dst = os.path.join(work, file)  # its final name: external data is named after it
                biased = with_conv_biases(src, work)
                quantize_file(biased, dst, calibration[file], os.path.join(work, "ranges.json"), kept, wide,
                              weight_bits=weight_bits)
                report(progress, f"quantize {file}", 1, 1)
                if correct:
                    report(progress, f"correct {file}", 0, 1)
                    correct_layers(biased, dst, fitted[file], checks[file], weight_bits=weight_bits, recipe=recipe)
                parities.append(int8_parity(role if file == graph.file else file.removesuffix(".onnx"), src, dst,
                                            held_out[file], recipe.min_parity_snr_db[role], graph.image_range,
                                            weight_bits))
                if os.path.exists(src + ".data") and not os.path.exists(dst + ".data"):
                    os.remove(src + ".data")  # the int8 graph fits one file
                for name in os.listdir(work):
                    if name.startswith(file):
                        os.replace(os.path.join(work, name), os.path.join(model_dir, name))
    return graph_fields, parities, sweeps


def needs_reference_decoder(quantized: tuple[str, ...], roles) -> bool:
    """Whether a set of ``roles`` whose ``quantized`` ones become int8 keeps its fp32 decoder
    as the reference decoder: where its decoder turns int8 and it descends (the descent's
    gradient graph is the fp32 decoder's, and the loop aims between the two decoders)."""
    return "vae_decoder" in quantized and "decoder_gradient" in roles


def keep_reference_decoder(folder: str, files: dict[str, str | None]) -> dict[str, str | None]:
    """Copies the fp32 decoder's files in ``folder`` (``files``: its manifest entry's file,
    whole and tiled, None where it has none) to the reference decoder's, before the
    quantization rewrites them in place; returns the copies' names, keyed the same way."""
    copies = {}
    for kind, name in files.items():
        copies[kind] = None if name is None else name.replace("vae_decoder", "reference_decoder", 1)
        if name is not None:
            shutil.copyfile(os.path.join(folder, name), os.path.join(folder, copies[kind]))
    return copies


def quantize_model_set(model_dir: str, roles: tuple[str, ...], images: list[np.ndarray], *,
                       weight_bits: int = DEFAULT_WEIGHT_BITS, **options) -> tuple[list, list]:
    """``quantize_set`` on a finished fp32 set, in place, and its manifest rewritten through
    ``Manifest``: those graphs int8, with their weight bits, float and 16-bit nodes, and every
    file's hash afresh.  Returns ([Int8Parity], [SweepResult])."""
    from dataclasses import replace

    from sdc_runtime.manifest import load_manifest, write_manifest

    manifest = load_manifest(model_dir)
    reference = {}
    if needs_reference_decoder(roles, manifest.graphs):
        decoder = manifest.graphs["vae_decoder"]
        copies = keep_reference_decoder(model_dir, {"file": decoder.file, "whole": decoder.whole, "tiled": decoder.tiled})
        reference["reference_decoder"] = replace(decoder, **copies)
    graph_fields, parities, sweeps = quantize_set(model_dir, roles, images, weight_bits=weight_bits, **options)
    graphs = {role: replace(graph, precision="int8", weight_bits=weight_bits, **graph_fields[role])
              if role in graph_fields else graph for role, graph in manifest.graphs.items()} | reference
    write_manifest(model_dir, replace(manifest, graphs=graphs))
    return parities, sweeps
