"""int8 graphs: static post-training quantization to QDQ (per-channel int8 weights, uint8
activations) with onnxruntime's quantization tools.

Calibration feeds each graph what the runtime itself feeds it: the set is run, in fp32, on
the calibration images through the codec (encoder, palette and u8 latent coding at several
qualities, the UNet's denoising steps, the decoders, whole and in tiles), and every graph
input is recorded.  A sensitivity sweep then finds the nodes whose quantization costs the
most accuracy, and those stay in float.
"""
from __future__ import annotations

import contextlib
import io
import logging
import math
import os
import tempfile
from collections import defaultdict
from dataclasses import dataclass

import numpy as np

from . import ExportError

# What --int8 quantizes when it names no graphs: the decoders, whose int8 loss measured within
# the targets on Kodak (BENCHMARKS.md §8).
DEFAULT_INT8_ROLES = ("vae_decoder", "tiny_decoder")
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
# each trial is scored on at most SWEEP_FEEDS of the calibration feeds, evenly spaced: the
# sweep costs one quantization and one such run per unit.
SWEPT_OPS = ("Conv", "ConvTranspose", "MatMul", "Gemm")
MAX_SWEEP_UNITS = 24
SWEEP_FEEDS = 6
# Export fails when an int8 graph's output SNR against its fp32 graph, on a held-out image,
# is below this (dB).
# is below this (dB).  The bounds catch a broken quantization, not a small loss: TAEF2's int8
# decoder measured 25-34 dB, the random-weight tiny SD UNet 14 dB.
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
    final_snr_db: float


def calibration_images(folder: str, count: int, side: int = CALIBRATION_SIDE) -> list[np.ndarray]:
    """The first ``count`` images of ``folder`` (sorted by name), centre-cropped to ``side``
    (smaller images, and every image with ``side`` 0, whole) as uint8 RGB."""
    from PIL import Image, UnidentifiedImageError

    if not os.path.isdir(folder):
        raise ExportError(f"--calibration {folder} is not a folder")
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
    if len(images) < 2:
        raise ExportError(f"--calibration {folder}: needs at least 2 images Pillow can read, found {len(images)}")
    return images


def record_graph_inputs(model_dir: str, images: list[np.ndarray]) -> dict[str, list[dict]]:
    """Run the set's codec on ``images`` and record, per graph file, every input feed the
    runtime gives it: the encoder's images, the UNet's latents at the timesteps the runtime
    uses, the decoders' dequantized palette and u8 latents, whole and in tiles."""
    from sdc_runtime import SdcCodec
    from sdc_runtime.neural import NeuralStages

    class Recording(NeuralStages):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            self.feeds: dict[str, list[dict]] = defaultdict(list)

        def _run(self, file, *arrays):
            names = [spec.name for spec in self.session(file).get_inputs()]
            self.feeds[file].append({n: np.array(a, np.float32) for n, a in zip(names, arrays)})
            return super()._run(file, *arrays)

    feeds: dict[str, list[dict]] = defaultdict(list)
    for tile_size, qualities in ((0, CALIBRATION_QUALITIES), (CALIBRATION_TILE, CALIBRATION_TILED_QUALITIES)):
        codec = SdcCodec(model_dir, tile_size=tile_size)
        codec.stages = Recording(model_dir, tile_size=tile_size)
        for rgb in images:
            latent, size = codec.image_to_latent(rgb)
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


def quantize_file(src: str, dst: str, feeds: list[dict], cache: str, exclude=()) -> None:
    """QDQ int8 ``src`` -> ``dst``, calibrated on ``feeds`` once (the ranges are kept in the
    ``cache`` file and reused by later calls with other ``exclude`` lists)."""
    from onnxruntime.quantization import CalibrationMethod, QuantFormat, QuantType, quantize_static

    with _quiet():
        quantize_static(src, dst, None if os.path.exists(cache) else _Feeds(feeds),
                        quant_format=QuantFormat.QDQ, per_channel=True,
                        activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8,
                        calibrate_method=CalibrationMethod.MinMax, nodes_to_exclude=list(exclude),
                        use_external_data_format=os.path.exists(src + ".data"), calibration_cache_path=cache,
                        # Ranges are computed a few feeds at a time and merged: all of a UNet's
                        # saved activations at once would not fit in memory.
                        extra_options={"CalibStridedMinMax": _stride(len(feeds))})


def outputs(path: str, feeds: list[dict]) -> list[np.ndarray]:
    import onnxruntime as ort

    session = ort.InferenceSession(path, providers=["CPUExecutionProvider"])
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


def sweep(role: str, src: str, feeds: list[dict], scratch: str, progress=None) -> SweepResult:
    """Quantize ``src`` with everything int8, then with each unit alone kept in float; keep
    in float the units that gain at least KEEP_GAIN_DB (most first, at most MAX_KEPT), and
    measure the graph with all of them kept."""
    cache = os.path.join(scratch, "ranges.json")
    trial = os.path.join(scratch, "trial.onnx")
    scored = feeds[::max(1, math.ceil(len(feeds) / SWEEP_FEEDS))]
    reference = outputs(src, scored)

    def snr_with(exclude) -> float:
        quantize_file(src, trial, feeds, cache, exclude)  # calibrates on all feeds, once
        return snr_db(reference, outputs(trial, scored))

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
    return SweepResult(role, base, gains, kept, snr_with(kept) if kept else base)


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
                 progress=None):
    """Quantize the graphs of ``roles`` in the fp32 model set ``model_dir`` in place.

    All images but the last calibrate; the last is held out for parity.  Each role's main
    graph is swept (unless not ``sweep_nodes``); its kept nodes stay float in all of the role's
    files (split parts share the main graph's node names).  Returns ({role: {kept node: SNR gain dB}}, [Int8Parity],
    [SweepResult])."""
    from sdc_runtime.manifest import load_manifest

    manifest = load_manifest(model_dir)
    _step(progress, "calibrate")
    calibration = record_graph_inputs(model_dir, images[:-1])
    held_out = record_graph_inputs(model_dir, images[-1:])
    float_nodes, parities, sweeps = {}, [], []
    with tempfile.TemporaryDirectory(prefix=".sdc-int8-", dir=model_dir) as scratch:
        for role in roles:
            graph = manifest.graphs[role]
            kept: tuple[str, ...] = ()
            if sweep_nodes:
                result = sweep(role, os.path.join(model_dir, graph.file), calibration[graph.file],
                               tempfile.mkdtemp(dir=scratch), progress)
                sweeps.append(result)
                kept = result.kept
            float_nodes[role] = {node: round(result.gains_db[_unit_of(node, result)], 3) for node in kept}
            for file in (graph.file, graph.whole, graph.tiled):
                if file is None:
                    continue
                _step(progress, f"int8 {file}")
                src = os.path.join(model_dir, file)
                work = tempfile.mkdtemp(dir=scratch)
                dst = os.path.join(work, file)  # its final name: external data is named after it
                quantize_file(src, dst, calibration[file], os.path.join(work, "ranges.json"), kept)
                parities.append(int8_parity(role if file == graph.file else file.removesuffix(".onnx"), src, dst,
                                            held_out[file], MIN_PARITY_SNR_DB[role], graph.image_range))
                if os.path.exists(src + ".data") and not os.path.exists(dst + ".data"):
                    os.remove(src + ".data")  # the int8 graph fits one file
                for name in os.listdir(work):
                    if name.startswith(file):
                        os.replace(os.path.join(work, name), os.path.join(model_dir, name))
    return float_nodes, parities, sweeps


def _unit_of(node: str, result: SweepResult) -> str:
    return max((u for u in result.gains_db if node == u or node.startswith(u + "/")), key=len)


def int8_parity(name: str, fp32: str, int8: str, feeds: list[dict], tolerance_db: float,
                image_range: tuple[float, float]) -> Int8Parity:
    reference, actual = outputs(fp32, feeds), outputs(int8, feeds)
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
