"""Neural stages: ONNX Runtime sessions for the VAE encoder, UNet and decoders, and the
DDIM denoising loop written in numpy from the manifest's scheduler constants.

Options reach this stage already resolved and checked (``options``); it checks only what
the model set itself can refuse (a missing graph, a failing session)."""
from __future__ import annotations

import functools
import math
import os
import threading

import numpy as np

from .errors import SdcInputError, SdcModelError, SdcProviderError
from .extras import PROVIDER_INSTALL_HINTS
from .image import graph_output_to_levels, to_graph_input, to_uint8
from .manifest import Graph, Manifest, Scheduler, load_manifest
from .options import Denoising
from .progress import report
from .roles import role_of
from .tiles import MAX_OVERLAP_PIXELS, grid, overlaps, owned_spans, ramp, spans

# The working-memory budget of the neural stages when the caller names none (--memory-limit).
DEFAULT_MEMORY_LIMIT = 2 << 30

PROVIDERS = {
    "cpu": "CPUExecutionProvider",
    "cuda": "CUDAExecutionProvider",
    "openvino": "OpenVINOExecutionProvider",
}


def provider_chain(provider: str) -> list[str]:
    """The ONNX Runtime provider list for a short provider name, CPU last as the fallback."""
    import onnxruntime as ort

    if provider not in PROVIDERS:
        raise SdcProviderError(f"unknown provider {provider!r}; choose one of {', '.join(PROVIDERS)}")
    name = PROVIDERS[provider]
    available = ort.get_available_providers()
    if name not in available:
        raise SdcProviderError(
            f"provider {provider!r} ({name}) is not available in this onnxruntime; {PROVIDER_INSTALL_HINTS.get(provider, '')}"
            f" (available: {', '.join(available)})")
    return [name] if name == "CPUExecutionProvider" else [name, "CPUExecutionProvider"]


def ddim_step(model_output: np.ndarray, timestep: int, prev_timestep: int, sample: np.ndarray,
              scheduler: Scheduler, *, eta: float = 0.0, noise: np.ndarray | None = None) -> np.ndarray:
    """One DDIM update x_t -> x_{t_prev} (Song et al. 2020, eq. 12), as diffusers' DDIMScheduler.step
    with clip_sample and thresholding off.  ``noise`` is required when eta > 0."""
    alphas = scheduler.alphas_cumprod
    alpha_t = np.float32(alphas[timestep])
    alpha_prev = np.float32(alphas[prev_timestep] if prev_timestep >= 0 else scheduler.final_alpha_cumprod)
    beta_t = np.float32(1) - alpha_t
    if scheduler.prediction_type == "epsilon":
        pred_x0 = (sample - np.sqrt(beta_t) * model_output) / np.sqrt(alpha_t)
        pred_eps = model_output
    elif scheduler.prediction_type == "v_prediction":
        pred_x0 = np.sqrt(alpha_t) * sample - np.sqrt(beta_t) * model_output
        pred_eps = np.sqrt(alpha_t) * model_output + np.sqrt(beta_t) * sample
    else:
        raise SdcModelError(f"unsupported prediction type {scheduler.prediction_type!r}")
    variance = (np.float32(1) - alpha_prev) / beta_t * (np.float32(1) - alpha_t / alpha_prev)
    std = np.float32(eta) * np.sqrt(variance)
    direction = np.sqrt(np.float32(1) - alpha_prev - std ** 2) * pred_eps
    prev = np.sqrt(alpha_prev) * pred_x0 + direction
    if eta > 0:
        if noise is None:
            raise SdcInputError("eta > 0 needs noise")
        prev = prev + std * noise
    return prev.astype(np.float32)


def denoise_timesteps(steps: int, stride: int) -> list[int]:
    """The last ``steps`` timesteps of a schedule with the given stride: ..., 2s, s, 0."""
    return [(steps - 1 - i) * stride for i in range(steps)]


def step_noise(seed: int, shape: tuple[int, ...], steps: int) -> list[np.ndarray]:
    """The DDIM noise for each step: PCG64 standard normals, platform-independent for a seed."""
    rng = np.random.default_rng(seed)
    return [rng.standard_normal(shape, dtype=np.float32) for _ in range(steps)]


# The CPU features whose int8 dot products add u8 x s8 products in 32 bits (VNNI on AVX-512
# or AVX, AMX in tiles): ONNX Runtime's fast kernels are exact on them for any weights.
EXACT_DOT_FLAGS = ("avx512_vnni", "avx_vnni", "amx_int8")


@functools.lru_cache(maxsize=1)
def cpu_flags() -> frozenset[str]:
    """The CPU's feature flags as Linux lists them (/proc/cpuinfo); empty where it cannot be
    read (other systems), which makes int8 sessions take the exact kernels: slower, never wrong."""
    try:
        with open("/proc/cpuinfo") as fh:
            for line in fh:
                if line.startswith("flags"):
                    return frozenset(line.split(":", 1)[1].split())
    except OSError:
        pass
    return frozenset()


def needs_exact_kernels(weight_bits: int | None) -> bool:
    """Whether int8 graphs whose weights span ``weight_bits`` (the manifest's; None for graphs
    of older sets, which are 8) need the exact kernels of ``session_options``.  x86 CPUs
    without VNNI add pairs of u8 x s8 products in saturating 16 bits in their fast kernels:
    with 7-bit weights (|w| <= 64) a pair is at most 2 x 255 x 64 = 32640 and never
    saturates.  CPUs with VNNI or AMX run 8-bit weights exactly on the fast kernels too, which
    are 5.7x faster than the exact ones there (TAEF2's decoder, BENCHMARKS.md §8)."""
    return (weight_bits or 8) > 7 and cpu_flags().isdisjoint(EXACT_DOT_FLAGS)


# ONNX Runtime's severity of errors (0 verbose .. 4 fatal): what is logged at all.
ERROR_SEVERITY = 3


def session_options(threads: int | None = None, *, exact_int8: bool = True):
    """The ONNX Runtime session options of every graph the codec runs; the export's int8
    calibration, correction and parity checks run their graphs with the same.  Not
    ``exact_int8`` only measures what the saturating kernels would cost (sdc-bench session)."""
    import onnxruntime as ort

    # ONNX Runtime's own log lines (coloured warnings, a telemetry notice where HOME is not
    # writable) would break the tools' one line on stderr: errors reach the caller as
    # exceptions, which the codec turns into its own.
    ort.set_default_logger_severity(ERROR_SEVERITY)
    options = ort.SessionOptions()
    options.log_severity_level = ERROR_SEVERITY
    # No memory arena: it grows in powers of two and never shrinks, which would double the
    # working memory that tiles are sized to bound (measured: BENCHMARKS.md); the graphs'
    # large buffers gain nothing from pooling.
    options.enable_cpu_mem_arena = False
    # int8 graphs on x86 CPUs without VNNI (AVX2, AVX-512F alone): ONNX Runtime's u8s8 kernels
    # add pairs of products in saturating 16 bits, which wrecks some graphs (the random-weight
    # SD decoder's int8 parity: 2.7 dB SNR, against 11.1 dB exact; BENCHMARKS.md §8).  This has
    # them run exact u8u8 kernels there (several times slower than the fast kernels, VNNI CPUs
    # included: needs_exact_kernels asks for them only where needed); other providers and fp32
    # graphs ignore it.
    options.add_session_config_entry("session.x64quantprecision", "1" if exact_int8 else "0")
    if threads:
        options.intra_op_num_threads = threads
    return options


# The memory limit covers the working memory of the neural stages, not the graphs' weights
# (tiles cannot shrink those).  From it come: what the process needs anyway (Python, numpy,
# onnxruntime, session buffers), and per image pixel the whole-image buffers the codec keeps
# (uint8 in and out, the padded copy, the latent and its accumulators).
BASE_BYTES = 160 << 20
IMAGE_BYTES_PER_PIXEL = 12
# Tiles are never smaller than this (pixels per side): below it the overlap is most of the work.
MIN_TILE = 128
# The most latent cells of margin a tile of the decoder gradient runs on: the descent needs the
# gradient's direction, not its last digits.  On a 1536x1024 photo in 640-pixel tiles TAEF2's
# full reach (10 cells) cost 1.29x the untiled run and 6 cells 0.89x, at a cosine of 0.99999 to
# the exact gradient (4 cells: 0.9998); BENCHMARKS.md §16.
GRADIENT_MARGIN_CELLS = 6
# The side (latent cells) of the input that measures a local graph's reach (context_cells).
CONTEXT_PROBE = 48
# The autoencoders run on no image side smaller than this (pixels): a latent of a cell or two
# is mostly the convolutions' zero padding (a solid 8x8 colour came back at 14 dB, a 64x64 one
# at 35 dB; BENCHMARKS.md).  Smaller images are edge-replicated up to it for the encoder, and
# their latents for the decoder (docs/FORMAT.md), and the results cropped.
MIN_CODED_SIDE = 64


# The codec's sessions share one arena whose regions are each the size of the request that
# made them, and which gives every free region back after each run (_run_all's run options):
# onnxruntime's default arena grows in powers of two and never shrinks, while without an
# arena every tensor is a malloc of its own, which glibc serves from a heap that freed tensors
# fragment (a 3 MP decoder-gradient whole part peaked at 2.2 GB, against 0.7 GB here) and
# which slows each session's first run (the gradient graph's at 768x512: 4.1 s, against 2.8 s
# here).  Registered once per process; BENCHMARKS.md §16.
_ARENA_LOCK = threading.Lock()
_arena: list = []  # [True] once registered, [False] where this onnxruntime cannot


def _use_shared_arena(options) -> bool:
    """Has ``options`` take the shared arena, registering it first; False where it cannot."""
    import onnxruntime as ort

    with _ARENA_LOCK:
        if not _arena:
            try:
                ort.create_and_register_allocator(
                    ort.OrtMemoryInfo("Cpu", ort.OrtAllocatorType.ORT_ARENA_ALLOCATOR, 0, ort.OrtMemType.DEFAULT),
                    ort.OrtArenaCfg(0, 1, -1, -1))  # no cap, kSameAsRequested, default chunk sizes
                _arena.append(True)
            except Exception:  # an onnxruntime without env allocators: the plain mallocs of session_options
                _arena.append(False)
    if _arena[0]:
        options.enable_cpu_mem_arena = True
        options.add_session_config_entry("session.use_env_allocators", "1")
    return _arena[0]


class NeuralStages:
    """The ONNX sessions of one model set.  Sessions open lazily, once, and are reused.

    Large images run in overlapping tiles (``tiles``) sized so that the graph's working memory
    (the manifest's ``memory_per_pixel``) fits ``memory_limit`` (bytes, besides the weights);
    ``tile_size`` (pixels per side) overrides that, 0 meaning never tiled.
    """

    def __init__(self, model_dir: str | os.PathLike, *, provider: str = "cpu", threads: int | None = None,
                 memory_limit: int = DEFAULT_MEMORY_LIMIT, tile_size: int | None = None):
        self.model_dir = os.fspath(model_dir)
        self.manifest: Manifest = load_manifest(self.model_dir)
        self._providers = provider_chain(provider)
        self._threads = threads
        self.memory_limit = memory_limit
        self.tile_size = tile_size
        self._sessions: dict = {}
        self._run_options = None  # the shared arena's shrinkage after each run
        self._context: dict = {}  # graph file -> context_cells
        # False: a split decoder's tiles without the margins that make them exact, at the tile
        # size asked for (the export's calibration, which must reach the parts on small images).
        self.exact_tiles = True
        self._lock = threading.Lock()
        # Callables (file, {input name: array}) that see every feed a graph is given, before it
        # runs: the export's int8 calibration records them (observe_feeds).
        self._feed_observers: list = []
        # Each graph file's role, for messages, and the fp32 stand-ins of fp16 files.
        self._roles = {f: role for role, g in self.manifest.graphs.items() for f in (g.file, g.whole, g.tiled) if f}
        self._fallbacks = {f: alt for g in self.manifest.graphs.values() for f, alt in (g.fallback or {}).items()}

    def session(self, file: str):
        """The ONNX Runtime session of one graph file of the set, opened once."""
        import onnxruntime as ort

        with self._lock:
            if file not in self._sessions:
                path = os.path.join(self.model_dir, file)
                if not os.path.isfile(path):
                    raise SdcModelError(f"model set file missing: {path}")
                try:
                    graph = self.manifest.graphs.get(self._roles.get(file))
                    exact = needs_exact_kernels(graph.weight_bits if graph is not None else None)
                    options = session_options(self._threads, exact_int8=exact)
                    if _use_shared_arena(options) and self._run_options is None:
                        self._run_options = ort.RunOptions()
                        self._run_options.add_run_config_entry("memory.enable_memory_arena_shrinkage", "cpu:0")
                    self._sessions[file] = ort.InferenceSession(path, options, providers=self._providers)
                except Exception as exc:  # onnxruntime raises its own untyped errors
                    raise SdcModelError(f"cannot load {file}: {str(exc).splitlines()[0]}") from None
            return self._sessions[file]

    def graph(self, role: str) -> Graph:
        graph = self.manifest.graphs.get(role)
        if graph is None:
            raise SdcModelError(f"the model set has no {role.replace('_', ' ')} graph")
        return graph

    def observe_feeds(self, observer) -> None:
        """Call ``observer(file, feeds)`` with every feed ({input name: array}) any graph of the
        set is given from now on, before it runs."""
        self._feed_observers.append(observer)

    def _run(self, file: str, *arrays: np.ndarray) -> np.ndarray:
        """The graph's first output."""
        return self._run_all(file, *arrays)[0]

    def _run_all(self, file: str, *arrays: np.ndarray) -> list[np.ndarray]:
        """Every output of the graph, as float32."""
        session = self.session(file)
        feeds = {}
        for spec, array in zip(session.get_inputs(), arrays, strict=True):
            dtype = np.float16 if spec.type == "tensor(float16)" else np.float32
            feeds[spec.name] = np.ascontiguousarray(array, dtype)
        for observer in self._feed_observers:
            observer(file, feeds)
        try:
            outputs = [output.astype(np.float32) for output in session.run(None, feeds, self._run_options)]
        except Exception as exc:  # onnxruntime's errors are untyped (allocation failures among them)
            raise SdcModelError(f"{file} failed: {str(exc).splitlines()[0][:300]}") from None
        if all(np.isfinite(output).all() for output in outputs):
            return outputs
        # Never an image of NaNs: fp16 graphs of some checkpoints overflow (the SD VAE decoder).
        if file in self._fallbacks:
            return self._run_all(self._fallbacks[file], *arrays)
        role = self._roles.get(file, file)
        raise SdcModelError(f"{file} produced non-finite values (an fp16 overflow?): re-export the set with"
                            f" --keep-fp32 {role} or --fp32-fallback")

    def context_cells(self, file: str) -> int | None:
        """How far (latent cells) one input cell of a local decoder graph (a split decoder's
        tiled part) reaches into its output: measured once per set, on a seeded random input
        with one cell changed; None where it reaches the whole probe (GroupNorm statistics)."""
        with self._lock:
            if file in self._context:
                return self._context[file]
        session = self.session(file)  # not _run: the probe is no feed of the codec's (observe_feeds)
        spec = session.get_inputs()[0]
        channels = spec.shape[1] if isinstance(spec.shape[1], int) else self.manifest.latent_channels
        dtype = np.float16 if spec.type == "tensor(float16)" else np.float32
        probe = np.random.default_rng(0).standard_normal((1, channels, CONTEXT_PROBE, CONTEXT_PROBE)).astype(dtype)
        moved = probe.copy()
        centre = CONTEXT_PROBE // 2
        moved[:, :, centre, centre] += 1
        outputs = [session.run(None, {spec.name: x})[0].astype(np.float32) for x in (moved, probe)]
        change = np.abs(outputs[0] - outputs[1]).max(axis=(0, 1)) > 0
        rows, cols = np.nonzero(change)
        scale = change.shape[0] // CONTEXT_PROBE  # output samples per input cell
        reach = max(np.abs(rows // scale - centre).max(), np.abs(cols // scale - centre).max()) if rows.size else 0
        cells = None if reach >= centre - 1 else int(reach)
        with self._lock:
            self._context[file] = cells
        return cells

    def tile_for(self, role: str, height: int, width: int) -> int:
        """Tile side in image pixels for running ``role`` on a ``height`` x ``width`` image:
        0 when the whole image fits the memory budget (or tiling is off)."""
        if self.tile_size is not None:
            return self.tile_size
        graph = self.graph(role)
        pixels = height * width
        available = self._available(role, pixels)
        if pixels * graph.memory_per_pixel <= available:
            return 0
        side = math.isqrt(max(available, 0) // max(int(graph.memory_per_pixel), 1))
        return max(MIN_TILE, side - side % 64)

    def encode(self, pixels: np.ndarray, *, progress=None) -> np.ndarray:
        """(H, W, 3) uint8 image, sides multiples of the downscale -> (1, C, H/f, W/f) raw latent."""
        m = self.manifest
        graph = self.graph("vae_encoder")
        f, value_range = m.downscale, graph.image_range
        height, width = pixels.shape[:2]
        growth = _growth(height // f, width // f, f)
        if growth:
            (top, bottom), (left, right) = growth
            grown = np.pad(pixels, ((top * f, bottom * f), (left * f, right * f), (0, 0)), mode="edge")
            return self.encode(grown, progress=progress)[:, :, top:top + height // f, left:left + width // f]
        tiles = list(grid(height, width, self.tile_for("vae_encoder", height, width), align=f,
                          max_overlap=MAX_OVERLAP_PIXELS))
        report(progress, "encode", 0, len(tiles))  # every stage reports from its start
        if len(tiles) == 1:
            latent = self._run(graph.file, to_graph_input(pixels, value_range))
            report(progress, "encode", 1, 1)
            return latent
        local = graph.tiled or graph.file
        # The tiles in latent cells: pixel tiles start and end on multiples of the downscale.
        cells = [((y0 // f, y1 // f), (x0 // f, x1 // f), (rows[0] // f, rows[1] // f), (cols[0] // f, cols[1] // f))
                 for (y0, y1), (x0, x1), rows, cols in tiles]
        counter = iter(range(1, len(tiles) + 1))
        features = _blended(cells, height // f, width // f,
                            lambda y0, y1, x0, x1: self._run(
                                local, to_graph_input(pixels[y0 * f:y1 * f, x0 * f:x1 * f], value_range)),
                            lambda: report(progress, "encode", next(counter), len(tiles)))
        return self._run(graph.whole, features) if graph.whole else features

    def _available(self, role: str, pixels: int) -> int:
        """What the memory budget leaves ``role``'s tiles on an image of ``pixels`` (bytes)."""
        graph = self.graph(role)
        whole = role_of(role).whole_memory_per_pixel.get(self.manifest.family, 0) if graph.whole else 0
        return self.memory_limit - BASE_BYTES - (IMAGE_BYTES_PER_PIXEL + whole) * pixels

    def has_gradient(self, height: int, width: int) -> bool:
        """Whether the set has the decoder's gradient and the memory budget holds what it keeps
        whole on a ``height`` x ``width`` image (the whole part and the image's buffers): a
        photo far over the budget gets the closed loop without the descent.  Its tiles, as
        every stage's, are never smaller than MIN_TILE."""
        return "decoder_gradient" in self.manifest.graphs and (
            self.tile_size is not None or self._available("decoder_gradient", height * width) > 0)

    def decoder_gradient(self, latent: np.ndarray, pixels: np.ndarray, counted: tuple[int, int]) -> tuple[np.ndarray, float]:
        """(1, C, h, w) latent and the (h*f, w*f, 3) image it should decode to, in 8-bit levels
        (uint8, or float where the closed loop aims off the image) -> (the
        gradient at the latent of the decoded image's squared error, that error), in the
        graph's units (image range squared, summed over channels and the pixels that count:
        the top-left ``counted`` = (height, width), the image without the padding that made
        its sides multiples of the downscale).

        Where the whole graph does not fit the memory budget it runs in parts: the decoder's
        whole part once, its local part in tiles, each counting only the pixels it owns and
        running on a margin around them (of the local part's reach, the pixels' errors and
        their gradient are then exactly the untiled ones; GRADIENT_MARGIN_CELLS caps it); the
        tiles' gradients are added up and taken back through the whole part."""
        graph = self.graph("decoder_gradient")
        f = self.manifest.downscale
        h, w = latent.shape[2:]

        def weight(y0: int, y1: int, x0: int, x1: int) -> np.ndarray:
            """1 on the counted pixels of rows y0..y1 and columns x0..x1, else 0."""
            box = np.zeros((1, 1, y1 - y0, x1 - x0), np.float32)
            box[:, :, :max(counted[0] - y0, 0), :max(counted[1] - x0, 0)] = 1
            return box

        growth = _growth(h, w, f)
        if growth:
            # As decode grows a small latent (edge cells repeated): the image's own pixels
            # count, and each repeated cell's gradient is added into the cell it repeats.
            (top, bottom), (left, right) = growth
            grown = np.pad(latent, ((0, 0), (0, 0), (top, bottom), (left, right)), mode="edge")
            padding = ((0, 0), (0, 0), (top * f, bottom * f), (left * f, right * f))
            gradient, error = self._run_all(graph.file, grown, np.pad(to_graph_input(pixels, graph.image_range), padding),
                                            np.pad(weight(0, h * f, 0, w * f), padding))
            for axis, before, after in ((2, top, bottom), (3, left, right)):
                inner = np.take(gradient, range(before, gradient.shape[axis] - after), axis=axis).copy()
                first, last = [slice(None)] * 4, [slice(None)] * 4
                first[axis], last[axis] = slice(0, 1), slice(-1, None)
                inner[tuple(first)] += np.take(gradient, range(before), axis=axis).sum(axis, keepdims=True)
                inner[tuple(last)] += np.take(gradient, range(gradient.shape[axis] - after, gradient.shape[axis]),
                                              axis=axis).sum(axis, keepdims=True)
                gradient = inner
            return gradient, float(error[0])
        tile = self.tile_for("decoder_gradient", h * f, w * f) // f
        if not tile:
            gradient, error = self._run_all(graph.file, latent, to_graph_input(pixels, graph.image_range),
                                            weight(0, h * f, 0, w * f))
            return gradient, float(error[0])
        features = latent
        if graph.whole:  # its forward half: a zero gradient at its output gives the tiles' input
            channels = self.session(graph.whole).get_inputs()[1].shape[1]
            features = self._run_all(graph.whole, latent, np.zeros((1, channels, h, w), np.float32))[1]
        decoder = self.graph("vae_decoder")  # the same local layers: the same reach
        # Margins of the local part's reach make the tiles' sum exact; GRADIENT_MARGIN_CELLS
        # and, where the budget cannot hold tiles of four margins, a quarter of the tile cap
        # them, and pixels near the tiles' edges then see some of the local part's zero padding.
        margin = min((self.context_cells(decoder.tiled or decoder.file) or 0) + 1, max(tile // 4, 1),
                     GRADIENT_MARGIN_CELLS)
        features_gradient = np.zeros_like(features)
        total = 0.0
        for (r0, r1), (y0, y1) in owned_spans(h, tile, margin):
            for (c0, c1), (x0, x1) in owned_spans(w, tile, margin):
                owned = np.zeros((1, 1, (y1 - y0) * f, (x1 - x0) * f), np.float32)
                owned[:, :, (r0 - y0) * f:(r1 - y0) * f, (c0 - x0) * f:(c1 - x0) * f] = 1
                part, error = self._run_all(graph.tiled or graph.file, features[:, :, y0:y1, x0:x1],
                                            to_graph_input(pixels[y0 * f:y1 * f, x0 * f:x1 * f], graph.image_range),
                                            owned * weight(y0 * f, y1 * f, x0 * f, x1 * f))
                features_gradient[:, :, y0:y1, x0:x1] += part
                total += float(error[0])
        if graph.whole:
            return self._run(graph.whole, latent, features_gradient), total
        return features_gradient, total

    def decode(self, latent: np.ndarray, *, decoder: str = "vae_decoder", progress=None) -> np.ndarray:
        """(1, C, h, w) raw latent -> (h*f, w*f, 3) uint8 image.

        Tiles are blended in pixel space one row band at a time, straight into the uint8
        output, so no float copy of the whole image is ever held."""
        m = self.manifest
        graph = self.graph(decoder)
        f, value_range = m.downscale, graph.image_range
        h, w = latent.shape[2:]
        growth = _growth(h, w, f)
        if growth:
            (top, bottom), (left, right) = growth
            grown = np.pad(latent, ((0, 0), (0, 0), (top, bottom), (left, right)), mode="edge")
            return self.decode(grown, decoder=decoder, progress=progress)[top * f:(top + h) * f, left * f:(left + w) * f]
        tile, overlap = self.tile_for(decoder, h * f, w * f) // f, MAX_OVERLAP_PIXELS // f
        # A split decoder's local part, tiled with margins that cover its measured reach, gives
        # every pixel it keeps exactly its untiled value: the image does not depend on the tile
        # size (docs/FORMAT.md).  A decoder without one (GroupNorm throughout) blends as it can.
        reach = self.context_cells(graph.tiled) if graph.tiled and tile and self.exact_tiles else None
        margin = 0 if reach is None else reach + 1
        rows, cols = (spans(side, tile, max_overlap=overlap, min_overlap=2 * margin + 2 if margin else 0)
                      for side in (h, w))
        report(progress, "decode", 0, len(rows) * len(cols))
        if len(rows) == len(cols) == 1:
            image = to_uint8(graph_output_to_levels(self._run(graph.file, latent), value_range))
            report(progress, "decode", 1, 1)
            return image
        if graph.whole:
            latent = self._run(graph.whole, latent)
        local = graph.tiled or graph.file
        out = np.empty((h * f, w * f, 3), np.uint8)
        col_ramps = [ramp(col, w * f, gap, f, margin)[None, :] for col, gap in zip(cols, overlaps(cols))]
        band_start = 0  # the first output row not yet final
        levels = np.zeros((0, w * f, 3), np.float32)
        weights = np.zeros((0, w * f), np.float32)
        total, done = len(rows) * len(cols), 0
        for i, (row, row_gap) in enumerate(zip(rows, overlaps(rows))):
            y0, y1 = row[0] * f, row[1] * f
            grow = y1 - band_start - len(levels)  # extend the band down to this row's end
            levels = np.concatenate([levels, np.zeros((grow, w * f, 3), np.float32)])
            weights = np.concatenate([weights, np.zeros((grow, w * f), np.float32)])
            row_ramp = ramp(row, h * f, row_gap, f, margin)[:, None]
            for (x0, x1), col_ramp in zip(cols, col_ramps):
                part = self._run(local, latent[:, :, row[0]:row[1], x0:x1])
                weight = row_ramp * col_ramp
                levels[y0 - band_start:y1 - band_start, x0 * f:x1 * f] += (
                    graph_output_to_levels(part, value_range) * weight[:, :, None])
                weights[y0 - band_start:y1 - band_start, x0 * f:x1 * f] += weight
                done += 1
                report(progress, "decode", done, total)
            final = (rows[i + 1][0] * f if i + 1 < len(rows) else h * f) - band_start
            out[band_start:band_start + final] = to_uint8(levels[:final] / weights[:final, :, None])
            levels, weights, band_start = levels[final:], weights[final:], band_start + final
        return out

    def predict(self, sample: np.ndarray, timestep: np.ndarray) -> np.ndarray:
        """The UNet: (1, C, h, w) scaled latent at a (1,) timestep -> its noise (or v) prediction.
        Latent sides that are not multiples of the manifest's ``unet_latent_multiple`` are
        edge-padded for the graph and cropped back."""
        mult = self.manifest.unet_latent_multiple
        h, w = sample.shape[2:]
        if h % mult or w % mult:
            sample = np.pad(sample, ((0, 0), (0, 0), (0, -h % mult), (0, -w % mult)), mode="edge")
        return self._run(self.graph("unet").file, sample, timestep)[:, :, :h, :w]

    def denoise(self, latent: np.ndarray, denoising: Denoising, *, progress=None) -> np.ndarray:
        """Run the DDIM steps on a (1, C, h, w) raw latent treated as x_t at
        t = (denoise_steps-1) * denoise_stride; in tiles, the UNet's predictions are blended.

        ``progress(stage, done, total)`` is called after each UNet run."""
        m = self.manifest
        steps, stride, eta = denoising.denoise_steps, denoising.denoise_stride, denoising.eta
        if steps == 0:
            return latent
        f, mult = m.downscale, m.unet_latent_multiple
        height, width = latent.shape[2:]
        # The UNet needs sides that are multiples of its down-sampling: edge-pad once, run the
        # whole loop (and draw its noise) at the padded size, crop after, as the format defines.
        sample = np.pad(latent, ((0, 0), (0, 0), (0, -height % mult), (0, -width % mult)),
                        mode="edge") * np.float32(m.scaling_factor)
        h, w = sample.shape[2:]
        tiles = list(grid(h, w, self.tile_for("unet", h * f, w * f) // f, align=mult,
                          max_overlap=MAX_OVERLAP_PIXELS // f))
        timesteps = denoise_timesteps(steps, stride)
        noises = step_noise(denoising.seed, sample.shape, steps) if eta > 0 else [None] * steps
        counter = iter(range(1, steps * len(tiles) + 1))
        report(progress, "denoise", 0, steps * len(tiles))
        for t, noise in zip(timesteps, noises):
            timestep = np.full((1,), t, np.float32)
            # Tiles start on multiples of the UNet's down-sampling and the padded sides are
            # multiples of it too, so every tile goes to the graph as it is.
            prediction = _blended(tiles, h, w,
                                  lambda y0, y1, x0, x1: self.predict(sample[:, :, y0:y1, x0:x1], timestep),
                                  lambda: report(progress, "denoise", next(counter), steps * len(tiles)))
            sample = ddim_step(prediction, t, t - stride, sample, m.scheduler, eta=eta, noise=noise)
        return (sample[:, :, :height, :width] / np.float32(m.scaling_factor)).astype(np.float32)


def _blended(tiles, height: int, width: int, run_tile, report) -> np.ndarray:
    """The (1, C, height, width) blend of per-tile outputs: each ``run_tile(y0, y1, x0, x1)``
    result weighted by its tile's ramps, summed, over the summed weights.  ``tiles`` as
    ``tiles.grid`` gives them, in output units; ``report()`` is called after each tile."""
    out = weight = None
    for (y0, y1), (x0, x1), rows, cols in tiles:
        part = run_tile(y0, y1, x0, x1)
        if out is None:
            out = np.zeros((1, part.shape[1], height, width), np.float32)
            weight = np.zeros((height, width), np.float32)
        tile_weight = ramp((y0, y1), height, rows)[:, None] * ramp((x0, x1), width, cols)[None, :]
        out[:, :, y0:y1, x0:x1] += part * tile_weight
        weight[y0:y1, x0:x1] += tile_weight
        report()
    out /= weight
    return out


def _growth(h: int, w: int, f: int) -> tuple[tuple[int, int], tuple[int, int]] | None:
    """The cells to add (above, below), (left, right) of an h x w latent at downscale f so that
    it spans MIN_CODED_SIDE pixels a side, centred (the extra one after): away from the zero
    padding of the graphs' edges.  None where it spans them already."""
    if min(h, w) * f >= MIN_CODED_SIDE:
        return None
    least = -(-MIN_CODED_SIDE // f)
    return tuple((max(least - n, 0) // 2, max(least - n, 0) - max(least - n, 0) // 2) for n in (h, w))
