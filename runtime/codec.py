"""The codec: image -> VAE encoder -> 8-bit latent -> palette / u8 coding -> container, and back.

``SdcCodec`` holds one model set's ONNX sessions for reuse.  The functions ``pack_latent`` and
``unpack_latent`` are the exact bitstream layer (no model needed) under it.
"""
from __future__ import annotations

import io
import os
from concurrent.futures import ThreadPoolExecutor

import numpy as np
from PIL import Image, UnidentifiedImageError

from . import container, entropy, latent as latent_coding
from .container import DEFAULT_MAX_PIXELS, MODE_PALETTE, MODE_U8, Header, Section
from .errors import SdcInputError, SdcModelError
from .files import image_bytes, image_format_for, write_atomic
from .image import check_pixel_limit, from_array, to_array
from .neural import NeuralStages

MODES = {"u8": MODE_U8, "palette": MODE_PALETTE}
# The original experiment: 256 colours; 3 DDIM steps at stride 15 (t = 30, 15, 0), eta 0.9.
SD_DEFAULTS = {"mode": "palette", "colors": 256, "group_channels": 4, "dither": True,
               "steps": 3, "stride": 15, "eta": 0.9}
# TAE: measured on Kodak (BENCHMARKS.md), nearest-colour mapping beats dithering by ~0.5 dB.
TAE_DEFAULTS = {"mode": "palette", "colors": 256, "group_channels": 4, "dither": False,
                "steps": 0, "stride": 0, "eta": 0.0}


def pack_latent(levels: np.ndarray, header: Header, *, colors: int = 256, seed: int = 0,
                weights=None, dither: bool = True) -> bytes:
    """Code (H, W, C) float level-space latent cells (in [0, 255]) into a .sdc bitstream.

    The header gives the geometry and parameters; its mode picks the coding, and in palette
    mode ``header.group_channels`` splits the channels into groups with a palette each.
    ``weights`` (per channel) weight the squared error the palette search minimizes;
    ``dither`` picks Floyd-Steinberg error diffusion over plain nearest-colour mapping.
    """
    if header.mode == MODE_U8:
        symbols = np.rint(levels).astype(np.uint8).transpose(2, 0, 1)
        coder, payload = entropy.encode(symbols, alphabet_size=256)
        header.palette_size = header.group_channels = 0
        return container.pack(header, [Section(container.SECTION_LATENT, coder, symbols.size, payload)])
    size = header.group_channels
    assign = latent_coding.dither if dither else latent_coding.nearest

    def code_group(start: int) -> tuple[np.ndarray, np.ndarray]:
        group = np.ascontiguousarray(levels[:, :, start:start + size])
        group_weights = None if weights is None else weights[start:start + size]
        palette = latent_coding.build_palette(group.reshape(-1, size), colors, seed=seed, weights=group_weights)
        return palette, assign(group, palette, group_weights)

    starts = range(0, levels.shape[2], size)
    if len(starts) == 1:
        coded = [code_group(0)]
    else:  # groups are independent and the kernels release the GIL: one thread per core
        with ThreadPoolExecutor(max_workers=min(len(starts), os.cpu_count() or 1)) as pool:
            coded = list(pool.map(code_group, starts))
    palettes = [palette for palette, _ in coded]
    index_planes = [indices for _, indices in coded]
    # One K for all groups: shorter palettes are padded by repeating their last entry.
    k = max(2, max(len(p) for p in palettes))
    palettes = np.stack([np.vstack([p, np.repeat(p[-1:], k - len(p), axis=0)]) for p in palettes])
    indices = np.stack(index_planes)
    header.palette_size = k
    coder_p, payload_p = entropy.encode(palettes, alphabet_size=256)
    coder_i, payload_i = entropy.encode(indices, alphabet_size=k)
    return container.pack(header, [
        Section(container.SECTION_PALETTE, coder_p, palettes.size, payload_p),
        Section(container.SECTION_INDICES, coder_i, entropy.raw_length(indices.size, k), payload_i),
    ])


def unpack_latent(data: bytes, *, max_pixels: int = DEFAULT_MAX_PIXELS) -> tuple[Header, np.ndarray]:
    """Parse a .sdc bitstream into its header and the (C, H, W) uint8 latent levels. Exact."""
    header, sections = container.unpack(data, max_pixels=max_pixels)
    by_kind = {s.kind: s for s in sections}
    lh, lw, c = header.latent_height, header.latent_width, header.latent_channels
    if header.mode == MODE_U8:
        s = by_kind[container.SECTION_LATENT]
        return header, entropy.decode(s.payload, coder=s.coder, count=c * lh * lw, alphabet_size=256).reshape(c, lh, lw)
    k, size = header.palette_size, header.group_channels
    groups = c // size
    s = by_kind[container.SECTION_PALETTE]
    palettes = entropy.decode(s.payload, coder=s.coder, count=k * c, alphabet_size=256).reshape(groups, k, size)
    s = by_kind[container.SECTION_INDICES]
    indices = entropy.decode(s.payload, coder=s.coder, count=groups * lh * lw, alphabet_size=k).reshape(groups, lh, lw)
    return header, np.concatenate([latent_coding.lookup(i, p) for i, p in zip(indices, palettes)], axis=0)


def info(data: bytes, *, max_pixels: int = DEFAULT_MAX_PIXELS) -> dict:
    """What a .sdc file holds, without a model set."""
    header, sections = container.unpack(data, max_pixels=max_pixels)
    return {
        "format_version": container.VERSION,
        "width": header.width,
        "height": header.height,
        "mode": container.MODE_NAMES[header.mode],
        "latent_shape": [header.latent_channels, header.latent_height, header.latent_width],
        "downscale": header.downscale,
        "palette_size": header.palette_size,
        "group_channels": header.group_channels,
        "denoise_steps": header.denoise_steps,
        "step_stride": header.step_stride,
        "eta": round(header.eta, 6),
        "seed": header.seed,
        "model_fingerprint": header.fingerprint.hex(),
        "quant_scale": [round(v, 7) for v in header.quant_scale],
        "quant_zero": [round(v, 7) for v in header.quant_zero],
        "sections": {
            container.SECTION_NAMES[s.kind]: {"bytes": len(s.payload), "raw_bytes": s.raw_length,
                                              "coder": entropy.CODER_NAMES.get(s.coder, str(s.coder))}
            for s in sections
        },
        "total_bytes": len(data),
        "bpp": round(8 * len(data) / (header.width * header.height), 5),
    }


def load_image(source, *, max_pixels: int | None = None) -> Image.Image:
    """A path, bytes or file object -> PIL image; unreadable input is an SdcInputError.

    The size is checked against ``max_pixels`` from the header, before the pixels are decoded.
    """
    try:
        if isinstance(source, (bytes, bytearray, memoryview)):
            source = io.BytesIO(source)
        image = Image.open(source)
        check_pixel_limit(image.width, image.height, max_pixels)
        image.load()
        return image
    except (UnidentifiedImageError, OSError, Image.DecompressionBombError) as exc:
        raise SdcInputError(f"cannot read the input image: {exc}") from None


class SdcCodec:
    """Encoder and decoder for one model set; build once, call many times (thread-safe sessions)."""

    def __init__(self, models: str | os.PathLike, /, *, provider: str = "cpu",
                 max_pixels: int = DEFAULT_MAX_PIXELS, threads: int | None = None):
        self.stages = NeuralStages(models, provider=provider, threads=threads)
        self.manifest = self.stages.manifest
        self.max_pixels = max_pixels
        self.defaults = SD_DEFAULTS if self.manifest.family == "sd" else TAE_DEFAULTS

    @property
    def fingerprint(self) -> bytes:
        return bytes.fromhex(self.manifest.fingerprint)[: container.FINGERPRINT_BYTES]

    def encode(self, image, /, *, mode: str | None = None, colors: int | None = None,
               group_channels: int | None = None, dither: bool | None = None, step: float | None = None,
               steps: int | None = None, stride: int | None = None, eta: float | None = None,
               seed: int = 0) -> bytes:
        """PIL image or (H, W, 3) uint8 array -> .sdc bytes.

        Palette mode: ``colors`` entries per palette, one palette per group of
        ``group_channels`` latent channels, with or without ``dither``ing.  u8 mode: ``step``
        (raw latent units, for a channel of average decoder sensitivity) trades quality for
        bytes; by default the finest mapping that fits 8 bits.  steps/stride/eta are stored as
        the decoder's defaults.
        """
        m, d = self.manifest, self.defaults
        mode = d["mode"] if mode is None else mode
        if mode not in MODES:
            raise SdcInputError(f"unknown mode {mode!r}; choose one of {', '.join(MODES)}")
        colors = latent_coding.check_colors(d["colors"] if colors is None else colors)
        if step is not None:
            if mode != "u8":
                raise SdcInputError("step applies to u8 mode only")
            if not isinstance(step, (int, float)) or not 0 < step < 1e6:
                raise SdcInputError(f"step must be a positive number, not {step!r}")
        group_channels = min(d["group_channels"], m.latent_channels) if group_channels is None else group_channels
        if (not isinstance(group_channels, int) or not 1 <= group_channels <= min(m.latent_channels, 255)
                or m.latent_channels % group_channels):
            raise SdcInputError(f"group_channels must divide the {m.latent_channels} latent channels")
        steps = d["steps"] if steps is None else steps
        stride = d["stride"] if stride is None else stride
        eta = d["eta"] if eta is None else eta
        if not isinstance(steps, int) or not 0 <= steps <= container.MAX_STEPS:
            raise SdcInputError(f"steps must be an integer in 0..{container.MAX_STEPS}")
        if steps and "unet" not in m.graphs:
            raise SdcInputError("this model set has no UNet: steps must be 0")
        if steps and (not isinstance(stride, int) or stride < 1 or (steps - 1) * stride >= m.scheduler.num_train_timesteps):
            raise SdcInputError("stride must be a positive integer with (steps-1)*stride below the training timesteps")
        if not 0.0 <= eta <= 1.0:
            raise SdcInputError("eta must be in [0, 1]")
        if not isinstance(seed, int) or not 0 <= seed < 2 ** 32:
            raise SdcInputError("seed must be an integer in 0..2**32-1")
        pixels, (width, height) = to_array(image, m.downscale, m.graphs["vae_encoder"].image_range,
                                           max_pixels=self.max_pixels)
        raw = self.stages.encode(pixels)[0]
        return self.encode_latent(raw, (width, height), mode=mode, colors=colors, group_channels=group_channels,
                                  dither=dither, step=step, steps=steps, stride=stride if steps else 0,
                                  eta=eta if steps else 0.0, seed=seed)

    def quant_mapping(self, raw: np.ndarray, step: float | None = None) -> tuple[tuple[float, ...], tuple[float, ...]]:
        """The 8-bit mapping for a (C, h, w) latent, float32-exact as the header stores it.

        Without ``step``: the manifest's mapping, or for adaptive sets each channel's own range
        within the manifest's.  With ``step``: a coarser mapping for u8 mode, step / sqrt(w_c)
        raw units for channel c (w: the decoder sensitivity), so the channels the decoder
        notices most are quantized most finely, never so finely that the image's range would
        not fit 256 levels.
        """
        m = self.manifest
        if step is None and not m.quant_adaptive:
            return m.quant_scale, m.quant_zero
        scale = np.array(m.quant_scale, np.float64)
        zero = np.array(m.quant_zero, np.float64)
        flat = raw.reshape(raw.shape[0], -1).astype(np.float64)
        lo, hi = flat.min(axis=1), flat.max(axis=1)
        if m.quant_adaptive:  # never beyond the range the model set's mapping covers
            lo_limit, hi_limit = -zero * scale, (255 - zero) * scale
            lo, hi = np.clip(lo, lo_limit, hi_limit), np.clip(hi, lo_limit, hi_limit)
        if step is None:
            levels_step = np.maximum((hi - lo) / 255, scale / 255)
            levels_step = levels_step.astype(np.float32).astype(np.float64)
            offset = (-lo / levels_step).astype(np.float32).astype(np.float64)
            return tuple(levels_step.tolist()), tuple(offset.tolist())
        weights = np.ones_like(scale) if m.channel_weights is None else np.asarray(m.channel_weights, np.float64)
        levels_step = np.maximum(step / np.sqrt(weights), (hi - lo) / 254)
        levels_step = levels_step.astype(np.float32).astype(np.float64)
        # An integer zero point: a latent value of 0 is exactly representable.
        offset = np.clip(np.round(-lo / levels_step), 0, 255).astype(np.float32).astype(np.float64)
        return tuple(levels_step.tolist()), tuple(offset.tolist())

    def encode_latent(self, raw: np.ndarray, size: tuple[int, int], *, mode: str, colors: int = 256,
                      group_channels: int | None = None, dither: bool | None = None, step: float | None = None,
                      steps: int = 0, stride: int = 0, eta: float = 0.0, seed: int = 0) -> bytes:
        """(C, h, w) raw latent of an image of ``size`` -> .sdc bytes (the latent-coding stage)."""
        m = self.manifest
        scale, zero = self.quant_mapping(raw, step)
        header = Header(
            width=size[0], height=size[1], latent_channels=raw.shape[0], latent_height=raw.shape[1],
            latent_width=raw.shape[2], downscale=m.downscale, mode=MODES[mode], palette_size=0,
            group_channels=(min(self.defaults["group_channels"], raw.shape[0]) if group_channels is None
                            else group_channels) if mode == "palette" else 0,
            denoise_steps=steps, step_stride=stride, eta=float(np.float32(eta)), seed=seed,
            fingerprint=self.fingerprint, quant_scale=scale, quant_zero=zero)
        levels = latent_coding.to_level_space(raw, scale, zero)
        # Weight level-space errors back to raw units (step^2) times the decoder's sensitivity.
        weights = np.square(np.asarray(scale, np.float64))
        if m.channel_weights is not None:
            weights = weights * np.asarray(m.channel_weights, np.float64)
        dither = self.defaults["dither"] if dither is None else bool(dither)
        return pack_latent(levels, header, colors=colors, seed=seed, weights=weights / weights.mean(), dither=dither)

    def decode_latent(self, data: bytes, /) -> tuple[Header, np.ndarray]:
        """.sdc bytes -> (header, (C, h, w) dequantized raw latent), after the model-set checks."""
        header, levels = unpack_latent(data, max_pixels=self.max_pixels)
        m = self.manifest
        if header.fingerprint != self.fingerprint:
            raise SdcModelError(
                f"the file needs the model set with fingerprint {header.fingerprint.hex()}, "
                f"but {self.stages.model_dir} has {self.fingerprint.hex()}")
        if header.latent_channels != m.latent_channels or header.downscale != m.downscale:
            raise SdcModelError("the file's latent shape does not fit this model set")
        return header, latent_coding.dequantize_u8(levels, header.quant_scale, header.quant_zero)

    def decode(self, data: bytes, /, *, steps: int | None = None, decoder: str = "vae_decoder",
               progress=None) -> Image.Image:
        """.sdc bytes -> RGB PIL image of the original size.  ``steps`` overrides the file's."""
        header, raw = self.decode_latent(data)
        steps = header.denoise_steps if steps is None else steps
        if not isinstance(steps, int) or not 0 <= steps <= container.MAX_STEPS:
            raise SdcInputError(f"steps must be an integer in 0..{container.MAX_STEPS}")
        stride = header.step_stride or SD_DEFAULTS["stride"]
        raw = self.stages.denoise(raw[None], steps=steps, stride=stride, eta=header.eta,
                                  seed=header.seed, progress=progress)
        pixels = self.stages.decode(raw, decoder=decoder)
        return from_array(pixels, self.manifest.graphs[decoder].image_range, (header.width, header.height))

    def encode_file(self, src, dst, /, **options) -> int:
        data = self.encode(load_image(src, max_pixels=self.max_pixels), **options)
        write_atomic(dst, data)
        return len(data)

    def decode_file(self, src, dst, /, **options) -> None:
        fmt = image_format_for(os.fspath(dst))
        with open(src, "rb") as fh:
            data = fh.read()
        write_atomic(dst, image_bytes(self.decode(data, **options), fmt))


def sdc_check(data: bytes, /) -> bool:
    """True if the bytes start with the .sdc magic (imagecodecs-style check)."""
    return container.check(data)
