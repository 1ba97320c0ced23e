"""int8 graphs: static post-training quantization to QDQ (per-channel int8 weights, uint8
activations) with onnxruntime's quantization tools.

Calibration feeds each graph what the runtime itself feeds it: the set is run, in fp32, on
the calibration images through the codec (encoder, palette and u8 latent coding at several
qualities, the UNet's denoising steps, the decoders, whole and in tiles), and every graph
input is recorded.  A sensitivity sweep then finds the nodes whose quantization costs the
most accuracy, and those stay in float, and tries 16-bit activations in a decoder's cheap
lowest-resolution stage (WIDE_FLOP_SHARE).  Last, each int8 convolution and MatMul, and each
convolution kept in float, is fitted again, layer by layer, to the fp32 graph's output on the
calibration feeds: its weights (int8 ones rounded by GPTQ) and its bias (``correct_layers``).
"""
from __future__ import annotations

import contextlib
import functools
import hashlib
import io
import logging
import math
import os
import tempfile
from collections import Counter, defaultdict
from dataclasses import dataclass

import numpy as np

from sdc_runtime.errors import SdcExportError
from .flops import node_flops

# What --int8 quantizes when it names no graphs: the decoders, whose int8 loss on Kodak is the
# smallest (within the targets at palette qualities, not at u8 ones: BENCHMARKS.md §8).
DEFAULT_INT8_ROLES = ("vae_decoder", "tiny_decoder")
# The bits of int8 weights when the export names none (Graph.weight_bits): 7 runs exact on the
# fast kernels of every x86 CPU, 8 needs slower exact kernels where there is no VNNI or AMX.
DEFAULT_WEIGHT_BITS = 7
# The largest magnitude of int8 weights of each span: onnxruntime's quantizer's symmetric
# ranges (reduce_range for 7 bits), which the refit keeps.
WEIGHT_LIMIT = {7: 64, 8: 127}
# Calibration needs images to fit on, one to check the fits on, and one held out for parity.
MIN_CALIBRATION_IMAGES = 3
# Calibration images are centre crops of this side: photos' statistics at their own
# resolution (a downscale would change them), at a size whose saved activations fit memory.
CALIBRATION_SIDE = 256
# The qualities each image is coded at, so that decoders and the UNet calibrate on dequantized
# palette latents (the low qualities) and u8 latents (the high ones), as the runtime feeds them.
CALIBRATION_QUALITIES = (1, 10, 30, 60, 90)
# A second run in tiles of this side, at one palette and one u8 quality, records the inputs of
# split graphs' whole and tiled parts (9 tiles an image: all qualities would triple the time).
CALIBRATION_TILE = 128
CALIBRATION_TILED_QUALITIES = (10, 60)
# Images no larger than a tile run whole in the tiled pass too, which would leave the parts of
# split graphs (whole and tiled) without feeds: in sets with such graphs they are tiled in
# halves, down to the codec's smallest tile_size.
MIN_CALIBRATION_TILE = 64
# The sweep keeps in float the units whose float gains at least KEEP_GAIN_DB of output SNR
# on the calibration set, most costly first, at most MAX_KEPT of them, and only while the
# float weights stay within FLOAT_WEIGHT_SHARE of the graph's: an int8 file is then at most
# ~0.3x its fp32 file (TAEF2's decoder all int8: 0.27x, weights, scales and QDQ nodes).  Measured on TAEF2's decoder (BENCHMARKS.md
# §8): no single unit holds most of the loss (the largest gain 0.2 dB); six kept blocks
# bought 0.3 dB of SNR for twice the file size.
KEEP_GAIN_DB = 0.03
MAX_KEPT = 6
FLOAT_WEIGHT_SHARE = 0.03
# The sweep's candidates: the ops that carry the int8 weights and most of the work.  Graphs
# with more of them than MAX_SWEEP_UNITS are swept per block (grouped by module path), and
# each trial is scored on at most SWEEP_FEEDS of the calibration feeds (drawn_feeds): the
# sweep costs one quantization and one such run per unit.
SWEPT_OPS = ("Conv", "ConvTranspose", "MatMul", "Gemm")
MAX_SWEEP_UNITS = 24
SWEEP_FEEDS = 6
# A decoder's lowest-resolution stage (every node before its first upsampling op) holds a
# small share of its FLOPs but feeds every later layer its error: there, activations in 16
# bits (weights stay int8) cost little time.  The sweep tries the stage with them and keeps
# them when that gains at least KEEP_GAIN_DB and the stage holds at most WIDE_FLOP_SHARE of
# the graph's FLOPs (16-bit activations run through float kernels).  Measured on TAEF2's
# decoder (its stage 2.6% of the FLOPs; BENCHMARKS.md §8): the u8 loss on Kodak-24 fell from
# 0.328 to 0.238 dB mean, the int8 decoder ran 7% slower.  The SD decoder's stage (its mid
# block and first up block, 9.4% of the FLOPs at 512x512) is over the share.
UPSAMPLING_OPS = ("Resize", "Upsample", "ConvTranspose", "DepthToSpace")
WIDE_FLOP_SHARE = 0.05
# Nodes that compute no activations: constants and shape arithmetic.
CONSTANT_OPS = ("Constant", "Shape")
# The per-channel correction of the int8 convolutions: fitted on this many calibration feeds,
# one from each run of the list (drawn_feeds), and never moving a channel's gain by more
# than MAX_GAIN_CHANGE (measured gains moved by at most 0.06).  It costs one run of the fp32
# and of the int8 graph per feed, and holds every feed's activations at a layer boundary.
# Measured on TAEF2's decoder, both Kodak folds (BENCHMARKS.md §8): ten of 160 feeds left the
# fit to chance (three draws spread over 0.12 dB of mean u8 loss); 40 took 0.02 dB off the
# mean and 0.08 dB off the worst image of the shipped draw, at 4.7 GB of peak memory; all
# 160 took 0.04 dB off the mean but needed 15 GB.  The whole two-fold bench then confirmed
# 40: 0.04 dB less mean u8 decoder loss and 0.13 dB less on the worst image than 10.
CORRECTION_FEEDS = 40
MAX_GAIN_CHANGE = 0.1
# The feeds of the check image that choose each layer's fit (correct_layers): a choice between
# two candidates needs fewer than a fit.
CHECK_FEEDS = 4
# The refit of a layer's weights (correct_layers): layers with at most MAX_REFIT_COLUMNS
# weights per output channel (the SD VAE's 512 channels x 3x3), fitted on
# REFIT_ROWS output positions drawn from the correction feeds, gathered REFIT_CHUNK_ROWS at a
# time; RIDGE and GPTQ_DAMPING are fractions of the input's mean variance (measured on TAEF2,
# BENCHMARKS.md §8).
MAX_REFIT_COLUMNS = 512 * 9
REFIT_ROWS = 200_000
REFIT_CHUNK_ROWS = 4096
RIDGE = 1e-3
GPTQ_DAMPING = 0.01
# Export fails when an int8 graph's output SNR against its fp32 graph, on a held-out image,
# is below this (dB).  The bounds catch a broken quantization, not a small loss: TAEF2's int8
# decoder measured 25-36 dB, the random-weight tiny SD UNet 14 dB.
MIN_PARITY_SNR_DB = {"vae_encoder": 15.0, "vae_decoder": 15.0, "tiny_decoder": 15.0, "unet": 10.0}


@dataclass
class Int8Parity:
    """An int8 graph against its fp32 graph on the held-out calibration image."""

    role: str
    snr_db: float  # 10 log10(sum y^2 / sum (y_int8 - y)^2)
    psnr_db: float | None  # image graphs: PSNR of the int8 output against the fp32 one
    tolerance_db: float
    passed: bool

    def line(self) -> str:
        psnr = f", PSNR {self.psnr_db:.2f} dB" if self.psnr_db is not None else ""
        mark = "ok" if self.passed else "FAIL"
        return (f"{self.role:12s} int8: SNR {self.snr_db:.2f} dB vs fp32{psnr}"
                f" (tolerance {self.tolerance_db:.1f} dB) {mark}")


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


def calibration_side(text: str) -> int:
    """The argparse type of --calibration-side, for sdc-export and sdc-bench alike: 0 (whole
    images) or a crop's side in pixels."""
    import argparse

    try:
        side = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be a whole number of pixels, not {text!r}") from None
    if side < 0:
        raise argparse.ArgumentTypeError(f"must be 0 (whole images) or a side in pixels, not {side}")
    return side


def calibration_images(folder: str, count: int, side: int = CALIBRATION_SIDE) -> list[np.ndarray]:
    """The first ``count`` images of ``folder`` (sorted by name), centre-cropped to ``side``
    (smaller images, and every image with ``side`` 0, whole) as uint8 RGB."""
    from PIL import Image, UnidentifiedImageError

    if not os.path.isdir(folder):
        raise SdcExportError(f"--calibration {folder} is not a folder")
    images = []
    for name in sorted(os.listdir(folder)):
        path = os.path.join(folder, name)
        if not os.path.isfile(path) or name.startswith("."):
            continue
        try:
            with Image.open(path) as im:
                im = im.convert("RGB")
                w, h = im.size
                side_w, side_h = (w, h) if side == 0 else (min(w, side), min(h, side))
                left, top = (w - side_w) // 2, (h - side_h) // 2
                images.append(np.asarray(im.crop((left, top, left + side_w, top + side_h))))
        except (UnidentifiedImageError, OSError):
            continue  # not an image: calibration folders hold other files too
        if len(images) == count:
            break
    if len(images) < MIN_CALIBRATION_IMAGES:
        raise SdcExportError(f"--calibration {folder}: needs at least {MIN_CALIBRATION_IMAGES} images Pillow can read,"
                          f" found {len(images)}")
    return images


def record_graph_inputs(model_dir: str, images: list[np.ndarray], progress=None) -> dict[str, list[dict]]:
    """Run the set's codec on ``images`` and record, per graph file, every input feed the
    runtime gives it: the encoder's images, the UNet's latents at the timesteps the runtime
    uses, the decoders' dequantized palette and u8 latents, whole and in tiles, as the set's
    default encoder effort writes them."""
    from sdc_runtime import SdcCodec
    from sdc_runtime.manifest import load_manifest
    from sdc_runtime.neural import NeuralStages

    # Each feed once: the encoder loop decodes the same unquantized latent at every quality,
    # the decode of a finished file repeats the loop's decode of its candidate, and an image
    # no larger than a tile runs whole in the tiled pass too; a repeated feed would only
    # crowd out others in the fits' picks.
    seen: set[bytes] = set()

    class Recording(NeuralStages):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            self.feeds: dict[str, list[dict]] = defaultdict(list)

        def _run(self, file, *arrays):
            digest = hashlib.blake2b(file.encode())
            for a in arrays:
                digest.update(repr(a.shape).encode())
                digest.update(np.ascontiguousarray(a, np.float32).tobytes())
            key = digest.digest()
            if key not in seen:
                seen.add(key)
                names = [spec.name for spec in self.session(file).get_inputs()]
                self.feeds[file].append({n: np.array(a, np.float32) for n, a in zip(names, arrays)})
            return super()._run(file, *arrays)

    feeds: dict[str, list[dict]] = defaultdict(list)
    tile = CALIBRATION_TILE
    if any(graph.tiled for graph in load_manifest(model_dir).graphs.values()):
        tile = max(MIN_CALIBRATION_TILE, min(tile, max(max(rgb.shape[:2]) for rgb in images) // 2))
    for tile_size, qualities in ((0, CALIBRATION_QUALITIES), (tile, CALIBRATION_TILED_QUALITIES)):
        codec = SdcCodec(model_dir, tile_size=tile_size)
        codec.stages = Recording(model_dir, tile_size=tile_size)
        effort = codec.options().effort
        for done, rgb in enumerate(images, 1):
            _step(progress, f"calibrate {'tiled ' if tile_size else ''}{done}/{len(images)}")
            if effort:
                # The files of the set's default effort: its encoder loop decodes candidates,
                # and the decoders then read latents descended for the fp32 decoder, which
                # reach ranges the plain latents do not (BENCHMARKS.md §8).
                for quality in qualities:
                    codec.decode(codec.encode(rgb, quality=quality))
            else:
                latent, size = codec.image_to_latent(rgb)  # one encoder run serves every quality
                for quality in qualities:
                    codec.decode(codec.encode_latent(latent, size, quality=quality))
        for file, recorded in codec.stages.feeds.items():
            feeds[file].extend(recorded)
    return dict(feeds)


class _Feeds:
    """onnxruntime's CalibrationDataReader protocol over recorded feeds, in ranges."""

    def __init__(self, feeds: list[dict]):
        self._feeds = feeds
        self._next, self._end = 0, len(feeds)

    def __len__(self) -> int:
        return len(self._feeds)

    def set_range(self, start_index: int, end_index: int) -> None:
        self._next, self._end = start_index, end_index

    def get_next(self):
        if self._next >= self._end:
            return None
        self._next += 1
        return self._feeds[self._next - 1]


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
        quantize_static(src, dst, None if os.path.exists(cache) else _Feeds(feeds),
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


def outputs(path: str, feeds: list[dict], weight_bits: int | None = None) -> list[np.ndarray]:
    """The graph file's first output for each feed, float64; ``weight_bits`` of an int8 graph
    (None for a float one) picks the kernels of its sessions."""
    import onnxruntime as ort
    from sdc_runtime.neural import needs_exact_kernels, session_options

    # The runtime's options for a graph of these weights: the int8 kernels its users get.
    session = ort.InferenceSession(path, session_options(exact_int8=needs_exact_kernels(weight_bits)),
                                   providers=["CPUExecutionProvider"])
    return [session.run(None, feed)[0].astype(np.float64) for feed in feeds]


def snr_db(reference: list[np.ndarray], actual: list[np.ndarray]) -> float:
    signal = sum(float(np.square(r).sum()) for r in reference)
    noise = sum(float(np.square(a - r).sum()) for r, a in zip(reference, actual))
    return math.inf if noise == 0 else 10 * math.log10(signal / noise)


def quantized_nodes(path: str) -> list[str]:
    """Names of the SWEPT_OPS nodes of a QDQ graph that compute on dequantized int8 values,
    in graph order."""
    import onnx

    model = onnx.load(path, load_external_data=False)
    dequantized = {out for n in model.graph.node if n.op_type == "DequantizeLinear" for out in n.output}
    return [n.name for n in model.graph.node if n.op_type in SWEPT_OPS and dequantized.intersection(n.input)]


def sweep_units(nodes: list[str]) -> dict[str, list[str]]:
    """The sweep's units: each node, or for graphs with more than MAX_SWEEP_UNITS candidates,
    blocks of nodes sharing their module path (node names from the torch exporter are
    '/module/path/Op'), shortened until the blocks are few enough."""
    depth = max(n.count("/") for n in nodes)
    while True:
        units: dict[str, list[str]] = defaultdict(list)
        for node in nodes:
            units["/".join(node.split("/")[:depth + 1]) if node.count("/") > depth else node].append(node)
        if len(units) <= MAX_SWEEP_UNITS or depth <= 1:
            return dict(units)
        depth -= 1


def sweep(role: str, src: str, feeds: list[dict], scratch: str, progress=None, *,
          weight_bits: int = DEFAULT_WEIGHT_BITS) -> SweepResult:
    """Quantize ``src`` with everything int8, then with each unit alone kept in float; keep
    in float the units that gain at least KEEP_GAIN_DB (most first, at most MAX_KEPT), and
    measure the graph with all of them kept."""
    cache = os.path.join(scratch, "ranges.json")
    trial = os.path.join(scratch, "trial.onnx")
    scored = drawn_feeds(feeds, SWEEP_FEEDS)
    reference = outputs(src, scored)

    def snr_with(exclude, wide=()) -> float:
        quantize_file(src, trial, feeds, cache, exclude, wide, weight_bits=weight_bits)  # calibrates on all feeds, once
        return snr_db(reference, outputs(trial, scored, weight_bits))

    base = snr_with(())
    units = sweep_units(quantized_nodes(trial))
    if not units or math.isinf(base):  # nothing quantized, or nothing lost
        return SweepResult(role, base, {}, (), base)
    gains = {}
    for i, (unit, nodes) in enumerate(units.items()):
        gains[unit] = snr_with(nodes) - base
        if progress is not None:
            progress(f"sweep {role} {i + 1}/{len(units)}")
    weights = _weight_bytes(src)
    budget, chosen = FLOAT_WEIGHT_SHARE * sum(weights.values()), []
    for unit in sorted(gains, key=gains.get, reverse=True):
        cost = sum(weights.get(node, 0) for node in units[unit])
        if gains[unit] >= KEEP_GAIN_DB and len(chosen) < MAX_KEPT and cost <= budget:
            chosen.append(unit)
            budget -= cost
    kept = tuple(node for unit in chosen for node in units[unit])
    final = snr_with(kept) if kept else base
    stage = first_stage(src)
    if not stage:
        return SweepResult(role, base, gains, kept, final)
    flops = node_flops(src, {name: value.shape for name, value in feeds[0].items()})
    share = sum(flops.get(node, 0.0) for node in stage) / max(sum(flops.values()), 1.0)
    if share > WIDE_FLOP_SHARE:
        return SweepResult(role, base, gains, kept, final, wide_flop_share=share)
    widened = snr_with(kept, stage)
    if widened - final < KEEP_GAIN_DB:
        return SweepResult(role, base, gains, kept, final, (), widened - final, share)
    if progress is not None:
        progress(f"sweep {role}: 16-bit activations in its first stage")
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


def quantize_set(model_dir: str, roles: tuple[str, ...], images: list[np.ndarray], *, sweep_nodes: bool = True,
                 correct: bool = True, weight_bits: int = DEFAULT_WEIGHT_BITS, progress=None):
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
    fitted = record_graph_inputs(model_dir, images[:-2], progress)
    checks = record_graph_inputs(model_dir, images[-2:-1])
    calibration = {file: fitted[file] + checks[file] for file in fitted}
    held_out = record_graph_inputs(model_dir, images[-1:])
    for role in roles:
        graph = manifest.graphs[role]
        for file in (graph.file, graph.whole, graph.tiled):
            if file is not None and not (fitted.get(file) and checks.get(file) and held_out.get(file)):
                raise SdcExportError(f"int8 calibration never ran {file}: {role} runs it in tiles, so the calibration"
                                  f" images need a side over {MIN_CALIBRATION_TILE} pixels")
    graph_fields, parities, sweeps = {}, [], []
    with tempfile.TemporaryDirectory(prefix=".sdc-int8-", dir=model_dir) as scratch:
        for role in roles:
            graph = manifest.graphs[role]
            kept: tuple[str, ...] = ()
            wide: tuple[str, ...] = ()
            if sweep_nodes:
                result = sweep(role, os.path.join(model_dir, graph.file), calibration[graph.file],
                               tempfile.mkdtemp(dir=scratch), progress, weight_bits=weight_bits)
                sweeps.append(result)
                kept, wide = result.kept, result.wide
            graph_fields[role] = {
                "float_nodes": {node: round(result.gains_db[_unit_of(node, result)], 3) for node in kept},
                "wide_nodes": {node: round(result.wide_gain_db, 3) for node in wide}}
            for file in (graph.file, graph.whole, graph.tiled):
                if file is None:
                    continue
                _step(progress, f"int8 {file}")
                src = os.path.join(model_dir, file)
                work = tempfile.mkdtemp(dir=scratch)
                dst = os.path.join(work, file)  # its final name: external data is named after it
                biased = with_conv_biases(src, work)
                quantize_file(biased, dst, calibration[file], os.path.join(work, "ranges.json"), kept, wide,
                              weight_bits=weight_bits)
                if correct:
                    _step(progress, f"correct {file}")
                    correct_layers(biased, dst, fitted[file], checks[file], weight_bits=weight_bits)
                parities.append(int8_parity(role if file == graph.file else file.removesuffix(".onnx"), src, dst,
                                            held_out[file], MIN_PARITY_SNR_DB[role], graph.image_range,
                                            weight_bits))
                if os.path.exists(src + ".data") and not os.path.exists(dst + ".data"):
                    os.remove(src + ".data")  # the int8 graph fits one file
                for name in os.listdir(work):
                    if name.startswith(file):
                        os.replace(os.path.join(work, name), os.path.join(model_dir, name))
    return graph_fields, parities, sweeps


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
                   weight_bits: int = DEFAULT_WEIGHT_BITS) -> int:
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

    used, checked = drawn_feeds(feeds, CORRECTION_FEEDS), drawn_feeds(checks, CHECK_FEEDS)
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
                and initializers[weight[0]].dims[0] <= MAX_REFIT_COLUMNS \
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
        layer = Layer(node, *(numpy_helper.to_array(initializers[name]) if name else None for name in names))
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

    @functools.cached_property
    def rows_of(self):
        """The function that draws a fit's rows from its (input, output) pairs; None for a
        convolution the refit does not handle (too wide, grouped, or not 2-D)."""
        if self.bias is None:
            return matmul_rows
        geometry = _conv_geometry(self.node, self.weight.shape)
        if geometry is None or np.prod(self.weight.shape[1:]) > MAX_REFIT_COLUMNS:
            return None
        return functools.partial(conv_rows, geometry=geometry)

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
    rows_of = layer.rows_of
    if rows_of is None:
        gain, offset = fit_gain_offset(output_moments(pairs[:fitted], bias))
        return _gain_offset_values(layer, gain, offset)
    fit, check = (layer_moments(group, rows_of, quantized.shape[1], len(quantized))
                  for group in (pairs[:fitted], pairs[fitted:]))
    has_bias = layer.bias is not None
    in_float = layer.weight_scale is None
    if in_float:
        refit_weights = least_squares(fit, quantized, intercept=True)[0]
        refit = (refit_weights, fit.bias_for(refit_weights))
    else:
        rounded, scale, refit_bias = fit_weights(fit, quantized, weight_bits, intercept=has_bias)
        refit = (rounded * scale[:, None], refit_bias if has_bias else bias)
    if has_bias:
        gain, offset = fit_gain_offset(fit.of_layer(quantized))
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


@dataclass(frozen=True)
class ConvGeometry:
    kernel: tuple[int, int]
    strides: tuple[int, int]
    dilations: tuple[int, int]
    pads: tuple[int, int, int, int]  # top, left, bottom, right


def _conv_geometry(node, weight_shape) -> ConvGeometry | None:
    """A 2-D, ungrouped, explicitly padded convolution's geometry; None for the others, which
    the refit does not handle (they get the gain and offset)."""
    attributes = {a.name: (list(a.ints) if a.ints else (a.s.decode() if a.s else a.i)) for a in node.attribute}
    if len(weight_shape) != 4 or attributes.get("group", 1) != 1 or attributes.get("auto_pad", "NOTSET") != "NOTSET":
        return None
    pads = attributes.get("pads", [0, 0, 0, 0])
    return ConvGeometry(tuple(weight_shape[2:]), tuple(attributes.get("strides", [1, 1])),
                        tuple(attributes.get("dilations", [1, 1])), (pads[0], pads[1], pads[2], pads[3]))


def conv_rows(x: np.ndarray, y: np.ndarray, count: int, rng, *, geometry: ConvGeometry):
    """``count`` (or all, if fewer) output positions of a convolution, drawn by ``rng``, as
    chunks of (input patches (rows, C*kh*kw) in the weights' layout, outputs (rows, O)),
    float64.  ``x`` is its input, ``y`` its output, NCHW."""
    n, _, out_h, out_w = y.shape
    positions = n * out_h * out_w
    chosen = np.sort(rng.choice(positions, count, replace=False)) if count < positions else np.arange(positions)
    top, left, bottom, right = geometry.pads
    padded = np.pad(x, ((0, 0), (0, 0), (top, bottom), (left, right)))
    (kh, kw), (dy, dx) = geometry.kernel, geometry.dilations
    # Every window as a view (N, C, H', W', kh, kw): a chunk's patches are then one gather on
    # three small index arrays, not on four of the patches' own size.
    windows = np.lib.stride_tricks.sliding_window_view(
        padded, ((kh - 1) * dy + 1, (kw - 1) * dx + 1), axis=(2, 3))[..., ::dy, ::dx]
    for chunk in np.array_split(chosen, max(1, len(chosen) // REFIT_CHUNK_ROWS)):
        b, rest = np.divmod(chunk, out_h * out_w)
        oy, ox = np.divmod(rest, out_w)
        patches = windows[b, :, oy * geometry.strides[0], ox * geometry.strides[1]]  # (rows, C, kh, kw)
        yield patches.reshape(len(chunk), -1).astype(np.float64), y[b, :, oy, ox].astype(np.float64)


def matmul_rows(x: np.ndarray, y: np.ndarray, count: int, rng):
    """``count`` (or all, if fewer) rows of a MatMul's input (..., K) and output (..., N),
    drawn by ``rng``, as chunks like ``conv_rows``'."""
    rows_x, rows_y = x.reshape(-1, x.shape[-1]), y.reshape(-1, y.shape[-1])
    chosen = np.sort(rng.choice(len(rows_x), count, replace=False)) if count < len(rows_x) else np.arange(len(rows_x))
    for chunk in np.array_split(chosen, max(1, len(chosen) // REFIT_CHUNK_ROWS)):
        yield rows_x[chunk].astype(np.float64), rows_y[chunk].astype(np.float64)


class Moments:
    """Sums over rows of a layer's inputs x (K) and outputs y (O): enough for a least-squares
    fit of y = W x + b, and for the squared error of any such W, b, without keeping the rows."""

    def __init__(self, inputs: int, outputs: int):
        self.count = 0
        self.sum_x, self.sum_y, self.yy = np.zeros(inputs), np.zeros(outputs), np.zeros(outputs)
        self.xx, self.xy = np.zeros((inputs, inputs)), np.zeros((inputs, outputs))

    def add(self, rows_x: np.ndarray, rows_y: np.ndarray) -> None:
        self.count += len(rows_x)
        self.sum_x += rows_x.sum(0)
        self.sum_y += rows_y.sum(0)
        self.yy += np.square(rows_y).sum(0)
        self.xx += rows_x.T @ rows_x
        self.xy += rows_x.T @ rows_y

    def bias_for(self, weights: np.ndarray) -> np.ndarray:
        """The least-squares bias of y = W x + b given W."""
        return self.sum_y / self.count - weights @ (self.sum_x / self.count)

    def error(self, weights: np.ndarray, bias: np.ndarray) -> float:
        """Mean over the rows of |y - (W x + b)|^2."""
        n = self.count
        per_channel = (self.yy / n - 2 * np.sum(weights * self.xy.T, 1) / n - 2 * bias * self.sum_y / n
                       + np.sum((weights @ self.xx) * weights, 1) / n + 2 * bias * (weights @ self.sum_x) / n
                       + bias ** 2)
        return float(per_channel.sum())

    def of_layer(self, weights: np.ndarray) -> ChannelStats:
        """The per-channel statistics of p = W x against y."""
        mean_x, mean_y = self.sum_x / self.count, self.sum_y / self.count
        covariance = self.xx / self.count - np.outer(mean_x, mean_x)
        cross = self.xy / self.count - np.outer(mean_x, mean_y)
        return ChannelStats(weights @ mean_x, np.sum((weights @ covariance) * weights, 1),
                            np.sum(weights * cross.T, 1), mean_y)


@dataclass
class ChannelStats:
    """Per output channel: mean and variance of a layer's output p (less its bias), its
    covariance with the fp32 output f, and the mean of f."""

    mean_p: np.ndarray
    var_p: np.ndarray
    cov_pf: np.ndarray
    mean_f: np.ndarray


def layer_moments(pairs, rows_of, inputs: int, outputs: int) -> Moments:
    """The Moments of REFIT_ROWS rows drawn evenly from (input, fp32 output) pairs."""
    rng = np.random.default_rng(0)
    pairs = list(pairs)
    moments = Moments(inputs, outputs)
    for x, y in pairs:
        for rows_x, rows_y in rows_of(x, y, max(1, REFIT_ROWS // len(pairs)), rng):
            moments.add(rows_x, rows_y)
    return moments


def output_moments(pairs, bias: np.ndarray) -> ChannelStats:
    """ChannelStats of a layer from (int8 output, fp32 output) pairs, NC..., its ``bias`` taken out."""
    sums = np.zeros((5, bias.size))  # count, sum p, sum f, sum p^2, sum p*f per channel
    for q, f in pairs:
        p = channels_first(q) - bias[:, None]
        f = channels_first(f)
        sums += [np.full(bias.size, p.shape[1]), p.sum(1), f.sum(1), (p * p).sum(1), (p * f).sum(1)]
    count, mean_p, mean_f = sums[0], sums[1] / sums[0], sums[2] / sums[0]
    return ChannelStats(mean_p, sums[3] / count - mean_p ** 2, sums[4] / count - mean_p * mean_f, mean_f)


def fit_gain_offset(stats: ChannelStats) -> tuple[np.ndarray, np.ndarray]:
    """Each output channel's gain g (within MAX_GAIN_CHANGE of 1) and offset b of f = g p + b,
    by least squares."""
    gain = np.ones_like(stats.mean_p)
    live = stats.var_p > 1e-12 * np.maximum(stats.mean_p ** 2, 1e-30)
    gain[live] = stats.cov_pf[live] / stats.var_p[live]
    gain = np.clip(gain, 1 - MAX_GAIN_CHANGE, 1 + MAX_GAIN_CHANGE)
    return gain, stats.mean_f - gain * stats.mean_p


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


def _int32(values: np.ndarray) -> np.ndarray:
    return np.clip(np.rint(values), -2 ** 31, 2 ** 31 - 1).astype(np.int32)


def least_squares(moments: Moments, prior: np.ndarray, *, intercept: bool):
    """(W (O, K), the inputs' second moment (K, K), its mean diagonal) of the layer y = W x (+ b)
    that best maps the int8 graph's inputs to the fp32 graph's outputs: ridge least squares,
    shrinking towards ``prior``, so that input directions the calibration never excites keep
    its weights.  With a bias the fit and the moment are of deviations from the means."""
    mean_x, mean_y = moments.sum_x / moments.count, moments.sum_y / moments.count
    second = moments.xx / moments.count - (np.outer(mean_x, mean_x) if intercept else 0)
    cross = moments.xy / moments.count - (np.outer(mean_x, mean_y) if intercept else 0)
    level = max(float(np.mean(np.diag(second))), 1e-30)
    ridge = RIDGE * level * np.eye(prior.shape[1])
    return np.linalg.solve(second + ridge, cross + ridge @ prior.T).T, second, level


def fit_weights(moments: Moments, prior: np.ndarray, weight_bits: int, *, intercept: bool):
    """(integers (O, K), per-row scales (O), bias (O) or None) of ``least_squares``' layer,
    rounded to ``weight_bits`` by GPTQ (Frantar et al. 2022: one input column at a time, the
    rounding error spread over the columns not yet rounded through the inverse input second
    moment), and the bias fitted again to the rounded weights.  A constant input leaves the
    prior's weights, rounded."""
    fitted, second, level = least_squares(moments, prior, intercept=intercept)
    top = WEIGHT_LIMIT[weight_bits]
    scale = np.abs(fitted).max(1) / top
    scale[scale == 0] = 1.0
    rounded = gptq_round(fitted, scale, top, second + GPTQ_DAMPING * level * np.eye(prior.shape[1]))
    return rounded, scale, moments.bias_for(rounded * scale[:, None]) if intercept else None


def gptq_round(weights: np.ndarray, scale: np.ndarray, top: int, hessian: np.ndarray,
               block: int = 128) -> np.ndarray:
    """Integers in [-top, top] for ``weights`` (O, K) at per-row ``scale``, rounded one column
    at a time, each column's error compensated on the later columns through the upper
    Cholesky factor of ``hessian``'s inverse (GPTQ, with its lazy block updates)."""
    work = weights / scale[:, None]  # in units of the step: the error terms are then integers' errors
    factor = np.linalg.cholesky(np.linalg.inv(hessian)).T  # upper: inverse = factor.T @ factor
    rounded = np.zeros_like(work)
    for start in range(0, work.shape[1], block):
        end = min(start + block, work.shape[1])
        errors = np.zeros((work.shape[0], end - start))
        for i in range(start, end):
            rounded[:, i] = np.clip(np.rint(work[:, i]), -top, top)
            errors[:, i - start] = (work[:, i] - rounded[:, i]) / factor[i, i]
            work[:, i + 1:end] -= np.outer(errors[:, i - start], factor[i, i + 1:end])
        work[:, end:] -= errors @ factor[start:end, end:]
    return rounded


def drawn_feeds(feeds: list[dict], count: int) -> list[dict]:
    """``count`` of ``feeds``, or all if fewer: one drawn at random (seeded) from each of
    ``count`` equal runs of the list, in order.

    Why not a stride: the calibration records each image's feeds in one repeating order (per
    quality, the encoder loop's decode of the unquantized latent, then the coded candidates),
    and a stride that is a multiple of that period picks one kind of feed only.  The stride this
    replaced fitted TAEF2's decoder on the unquantized latents alone (BENCHMARKS.md §8)."""
    if len(feeds) <= count:
        return list(feeds)
    starts = np.arange(count) * len(feeds) / count
    picks = np.floor(starts + np.random.default_rng(0).random(count) * len(feeds) / count).astype(int)
    return [feeds[i] for i in picks]


def channels_first(output: np.ndarray) -> np.ndarray:
    """(N, C, ...) -> (C, N*...) float64."""
    return np.moveaxis(output, 1, 0).reshape(output.shape[1], -1).astype(np.float64)


def _unit_of(node: str, result: SweepResult) -> str:
    return max((u for u in result.gains_db if node == u or node.startswith(u + "/")), key=len)


def int8_parity(name: str, fp32: str, int8: str, feeds: list[dict], tolerance_db: float,
                image_range: tuple[float, float], weight_bits: int = DEFAULT_WEIGHT_BITS) -> Int8Parity:
    reference, actual = outputs(fp32, feeds), outputs(int8, feeds, weight_bits)
    snr = snr_db(reference, actual)
    psnr = None
    if not name.startswith(("unet", "vae_encoder")) and ".whole" not in name:  # outputs an image
        span = image_range[1] - image_range[0]
        mse = np.mean([np.mean(np.square((a - r) / span)) for r, a in zip(reference, actual)])
        psnr = math.inf if mse == 0 else float(-10 * np.log10(mse))
    finite = all(np.isfinite(a).all() for a in actual)
    return Int8Parity(name, snr, psnr, tolerance_db, finite and snr >= tolerance_db)


def _step(progress, text: str) -> None:
    if progress is not None:
        progress(text)
