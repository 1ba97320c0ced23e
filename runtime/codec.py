"""The codec: ties the stages for one model set.

    encode:  image -> image_to_latent -> encode_latent (8-bit mapping, latent coding, bitstream)
    decode:  bitstream -> decode_latent (levels, dequantized) -> latent_to_image (DDIM, decoder)

Each arrow is a public method, so benchmarks and tools drive the same path a user does.
Options are resolved and checked once, on entry (``options``), and passed down unchanged.
"""
from __future__ import annotations

import functools
import math
import os
from dataclasses import dataclass

import numpy as np
from PIL import Image

from . import container, refine
from . import latent as latent_coding
from .bitstream import SdcContents, sdc_decode_all, sdc_encode, sdc_quantize
from .container import DEFAULT_MAX_PIXELS, Header
from .errors import SdcInputError, SdcModelError, SdcTargetError
from .image import check_pixel_limit, pad_to, psnr, shown_as_coded, to_picture
from .neural import DEFAULT_MEMORY_LIMIT, NeuralStages
from .options import (
    ENCODE_OPTION_NAMES,
    LATENT_CODING_OPTIONS,
    MODES,
    EncodeOptions,
    resolve_denoising,
    resolve_encode_options,
)
from .progress import report
from .roles import DECODERS

# Qualities at which a size search descends, from the one it found down: a descent grows the
# file a little (about 1%, BENCHMARKS.md §15), so where the plain file fills the budget no step
# of it fits, and a quality lower leaves it room.
SIZE_SEARCH_DESCENTS = 2
# Quality 1 itself, then a bisection of qualities 1..100, then the descents: the most files a
# size search writes.
SIZE_SEARCH_ENCODES = 1 + math.ceil(math.log2(100)) + SIZE_SEARCH_DESCENTS
# A size search tries qualities with the caller's other options as they are: all but those
# the quality chooses.
ENCODE_KEPT_IN_SEARCH = tuple(name for name in ENCODE_OPTION_NAMES
                              if name not in LATENT_CODING_OPTIONS + ("quality", "target_bytes"))


@dataclass(frozen=True)
class SizedEncode:
    """The result of a size search: the file, the quality it was written at, and how many
    files the search wrote to find it."""

    data: bytes
    quality: int
    encodes: int


class SdcCodec:
    """Encoder and decoder for one model set; build once, call many times (thread-safe sessions).

    ``max_pixels`` bounds the images it reads and writes; ``memory_limit`` (bytes) is the
    budget the neural stages size their tiles for, and ``tile_size`` (pixels per side; 0:
    never tile) overrides it.  Tiles depend only on the image and tile sizes.
    """

    def __init__(self, models: str | os.PathLike, /, *, provider: str = "cpu",
                 max_pixels: int = DEFAULT_MAX_PIXELS, threads: int | None = None,
                 memory_limit: int = DEFAULT_MEMORY_LIMIT, tile_size: int | None = None):
        if not isinstance(max_pixels, int) or max_pixels < 1:
            raise SdcInputError(f"max_pixels must be a positive integer, not {max_pixels!r}")
        if threads is not None and (not isinstance(threads, int) or threads < 1):
            raise SdcInputError(f"threads must be a positive integer, not {threads!r}")
        if not isinstance(memory_limit, int) or memory_limit < 1 << 20:
            raise SdcInputError(f"memory_limit must be at least 1 MiB, not {memory_limit!r}")
        if tile_size is not None and (not isinstance(tile_size, int) or not (tile_size == 0 or tile_size >= 64)):
            raise SdcInputError(f"tile_size must be 0 (untiled) or at least 64 pixels, not {tile_size!r}")
        self.stages = NeuralStages(models, provider=provider, threads=threads, memory_limit=memory_limit,
                                   tile_size=tile_size)
        self.manifest = self.stages.manifest
        self.max_pixels = max_pixels

    @property
    def header_fingerprint(self) -> bytes:
        """What the files this set writes carry of its fingerprint (``manifest.fingerprint``,
        hex): its first FINGERPRINT_BYTES bytes."""
        return bytes.fromhex(self.manifest.fingerprint)[: container.FINGERPRINT_BYTES]

    def options(self, **overrides) -> EncodeOptions:
        """The model set's encoder defaults with these overrides, checked (SdcInputError)."""
        return resolve_encode_options(self.manifest.defaults, self.manifest.limits, **overrides)

    # --- encode ---

    def encode(self, image, /, options: EncodeOptions | None = None, *, progress=None, **overrides) -> bytes:
        """PIL image (any mode; EXIF orientation applied) or (H, W, 3) uint8 array -> .sdc bytes.
        ``overrides``: the fields of ``EncodeOptions`` (quality, target_bytes, effort, mode,
        colors, group_channels, dither, quant_step, denoise_steps, denoise_stride, eta, seed,
        alpha, strip); what is not given comes from the model set's defaults.  Or ``options``:
        the result of ``self.options()``, already checked, taken as it is.  Alpha and metadata
        travel losslessly.  With ``target_bytes`` the file is never larger (SdcTargetError
        where even quality 1 is)."""
        return self.encode_to_size(image, options, progress=progress, **overrides).data

    def encode_to_size(self, image, /, options: EncodeOptions | None = None, *, progress=None,
                       **overrides) -> SizedEncode:
        """``encode``, telling which quality the file got and how many files the size search
        (``target_bytes``) wrote: a bisection of the quality scale, whose sizes rise with
        quality, so about log2(100) + 1 files rather than 100."""
        if options is None:
            resolved = self.options(**overrides)  # before any neural work
        elif overrides:
            raise SdcInputError("pass either resolved options or option overrides, not both")
        else:
            resolved = options
        picture = to_picture(image, max_pixels=self.max_pixels)
        latent, size = self._latent_of(picture.rgb, progress)
        loop = self._loop(picture.rgb, resolved, latent) if resolved.effort else None
        candidates = refine.settle(latent, resolved.effort, loop, progress) if loop else None
        alpha = picture.alpha if resolved.alpha == "keep" else None
        metadata = {} if resolved.strip else picture.metadata
        flags = container.grey_flags(picture.grey_bits)

        def file_at(options: EncodeOptions, descend: bool = True, budget: int | None = None) -> bytes:
            def code(candidate):
                return self._code_latent(candidate, size, options, alpha=alpha, metadata=metadata, flags=flags)

            def held(candidate):
                return self._held_latent(candidate, size, options)
            if loop is None:
                return code(latent)
            return refine.best_file(latent, candidates, options.effort, code, held, loop, progress, descend=descend,
                                    budget=budget)

        if resolved.target_bytes is None:
            return SizedEncode(file_at(resolved), resolved.quality, 1)
        def score(data: bytes) -> float:  # the PSNR the closed loop scores files by
            return psnr(picture.rgb, loop.decode_file(data))

        return self._search_size(file_at, resolved, refine.descends(resolved.effort, loop), score, progress)

    def _search_size(self, file_at, options: EncodeOptions, descends: bool, score, progress) -> SizedEncode:
        """Bisects the quality scale on files written without the descent (it costs several
        decodes per step, and would cost them at every quality tried), then descends within
        the target at the quality found and at the one below it: of the files the descents
        write (each step's), the one of highest PSNR that fits wins, the plain one at worst."""
        target = options.target_bytes
        kept = {name: getattr(options, name) for name in ENCODE_KEPT_IN_SEARCH}
        files: dict[int, bytes] = {}

        def fits(quality: int) -> bool:
            files[quality] = file_at(self.options(quality=quality, **kept), descend=False)
            report(progress, "size search", len(files), SIZE_SEARCH_ENCODES)
            return len(files[quality]) <= target

        report(progress, "size search", 0, SIZE_SEARCH_ENCODES)

        if not fits(1):
            smallest = len(files[1])
            raise SdcTargetError(f"the smallest file this model set can write for the image is {smallest} bytes,"
                                 f" over the target of {target}", smallest)
        fitting, too_large = 1, 101  # the best quality known to fit; the lowest known not to
        while too_large - fitting > 1:
            middle = (fitting + too_large) // 2
            if fits(middle):
                fitting = middle
            else:
                too_large = middle
        if not descends:
            return SizedEncode(files[fitting], fitting, len(files))
        best, best_quality, best_score = files[fitting], fitting, score(files[fitting])
        qualities = range(fitting, max(fitting - SIZE_SEARCH_DESCENTS, 0), -1)
        for quality in qualities:
            # b"": none of the descent's files fit (not even its start, where the plain search
            # kept a free pass's file).
            descended = file_at(self.options(quality=quality, **kept), budget=target)
            if descended and descended != best:
                descended_score = score(descended)
                if descended_score > best_score:
                    best, best_quality, best_score = descended, quality, descended_score
        return SizedEncode(best, best_quality, len(files) + len(qualities))

    def _loop(self, rgb: np.ndarray, options: EncodeOptions, latent: np.ndarray) -> refine.Loop:
        """The closed loop's stages for the image ``rgb``, whose latent is ``latent`` (E(x));
        the file's UNet steps in the loop from DENOISE_IN_LOOP_EFFORT, because a decoder of the
        file runs them."""
        height, width = rgb.shape[:2]
        with_steps = options.effort >= refine.DENOISE_IN_LOOP_EFFORT and options.denoise_steps > 0
        padded = pad_to(rgb, self.manifest.downscale)
        # The gradient graph decodes without the UNet steps: it serves sets without a UNet.
        descent = self.stages.has_gradient(*padded.shape[:2]) and not options.denoise_steps
        aim = padded
        if descent and "reference_decoder" in self.manifest.graphs:
            # The gradient is the fp32 decoder's, the set's decoder int8: the descent aims at
            # the image less part of the int8 decoder's offset from fp32 at E(x).  In float16
            # (6 bytes a pixel, beside a photo's other buffers), exact for halves of 8-bit levels.
            offset = (self.stages.decode(latent[None]).astype(np.int16)
                      - self.stages.decode(latent[None], decoder="reference_decoder")).astype(np.float16)
            offset *= np.float16(refine.INT8_AIM)
            aim = np.clip(padded - offset, 0, 255, dtype=np.float16)

        def encode(rgb):
            return self.stages.encode(pad_to(rgb, self.manifest.downscale))[0]

        def decode(latent):
            return self.stages.decode(latent[None])[:height, :width]

        # The last file decoded is kept: a size search scores the file a descent has just
        # decoded to choose it.
        @functools.lru_cache(maxsize=1)
        def decode_file(data):  # as a decoder of the file shows it, in RGB (without any alpha)
            return np.asarray(self._decoded(data, None if with_steps else 0, "vae_decoder", None)[0])[..., :3]

        def gradient(latent):
            gradient, error = self.stages.decoder_gradient(latent[None], aim, (height, width))
            low, high = self.stages.graph("decoder_gradient").image_range
            return gradient[0], error * (255 / (high - low)) ** 2 / rgb.size
        return refine.Loop(rgb, encode, decode, decode_file, gradient if descent else None)

    def image_to_latent(self, image, /, *, progress=None) -> tuple[np.ndarray, tuple[int, int]]:
        """PIL image or (H, W, 3) uint8 array -> ((C, h, w) float32 raw latent, (width, height))."""
        return self._latent_of(to_picture(image, max_pixels=self.max_pixels).rgb, progress)

    def _latent_of(self, rgb: np.ndarray, progress) -> tuple[np.ndarray, tuple[int, int]]:
        pixels = pad_to(rgb, self.manifest.downscale)
        return self.stages.encode(pixels, progress=progress)[0], (rgb.shape[1], rgb.shape[0])

    def quant_mapping(self, latent: np.ndarray, /, quant_step: float | None = None):
        """(scale, zero) per channel: the 8-bit mapping this set's encoder uses for ``latent``."""
        m = self.manifest
        return latent_coding.fit_quant_mapping(latent, m.quant_scale, m.quant_zero, adaptive=m.quant_adaptive,
                                               channel_weights=m.channel_weights, quant_step=quant_step)

    def encode_latent(self, latent: np.ndarray, /, size: tuple[int, int], **options) -> bytes:
        """(C, h, w) raw latent of an image of ``size`` = (width, height) -> .sdc bytes: the
        latent-coding stage alone, with the same options as ``encode``."""
        latent = np.asarray(latent)
        m = self.manifest
        if latent.ndim != 3 or latent.shape[0] != m.latent_channels:
            raise SdcInputError(f"a latent must be ({m.latent_channels}, h, w), not {latent.shape}")
        width, height = size
        if latent.shape[1:] != (-(-height // m.downscale), -(-width // m.downscale)):
            raise SdcInputError(f"a {latent.shape[1]}x{latent.shape[2]} latent does not fit a {width}x{height} image")
        if options.get("effort") or options.get("target_bytes") is not None:
            raise SdcInputError("effort and target_bytes need the image: use encode")
        return self._code_latent(latent, size, self.options(**{**options, "effort": 0}))

    def _code_latent(self, latent: np.ndarray, size: tuple[int, int], options: EncodeOptions, *,
                     alpha=None, metadata=None, flags: int = 0) -> bytes:
        header, levels, weights = self._coding(latent, size, options, flags)
        return sdc_encode(levels, header, dither=options.dither, weights=weights, alpha=alpha, metadata=metadata,
                          deadzone=options.deadzone)

    def _held_latent(self, latent: np.ndarray, size: tuple[int, int], options: EncodeOptions) -> np.ndarray:
        """The (C, h, w) latent the file ``_code_latent`` writes holds, as its decoder
        dequantizes it, without the entropy coding."""
        header, levels, weights = self._coding(latent, size, options, 0)
        quantized = sdc_quantize(levels, header, dither=options.dither, weights=weights, deadzone=options.deadzone)
        return latent_coding.dequantize_u8(quantized, header.quant_scale, header.quant_zero)

    def _coding(self, latent: np.ndarray, size: tuple[int, int], options: EncodeOptions, flags: int):
        """(header, levels, per-channel weights) of the file of ``latent``."""
        m = self.manifest
        scale, zero = self.quant_mapping(latent, options.quant_step)
        header = Header(
            width=size[0], height=size[1], latent_channels=latent.shape[0], latent_height=latent.shape[1],
            latent_width=latent.shape[2], downscale=m.downscale, mode=MODES[options.mode],
            colors=options.colors if options.mode == "palette" else 0, group_channels=options.group_channels,
            denoise_steps=options.denoise_steps, denoise_stride=options.denoise_stride,
            eta=float(np.float32(options.eta)), seed=options.seed, fingerprint=self.header_fingerprint,
            quant_scale=scale, quant_zero=zero, flags=flags)
        levels = np.moveaxis(latent_coding.to_level_space(latent, scale, zero), -1, 0)
        # Weight level-space errors back to raw units (step^2) times the decoder's sensitivity.
        weights = np.square(np.asarray(scale, np.float64))
        if m.channel_weights is not None:
            weights = weights * np.asarray(m.channel_weights, np.float64)
        return header, levels, weights / weights.mean()

    # --- decode ---

    def decode_latent(self, data, /) -> tuple[Header, np.ndarray]:
        """.sdc bytes -> (header, (C, h, w) dequantized raw latent), after the model-set checks."""
        contents = self._contents(data, extras=False)
        return contents.header, latent_coding.dequantize_u8(contents.levels, contents.header.quant_scale,
                                                             contents.header.quant_zero)

    def _contents(self, data, *, extras: bool) -> SdcContents:
        contents = sdc_decode_all(data, max_pixels=self.max_pixels, extras=extras)
        header, m = contents.header, self.manifest
        if header.fingerprint != self.header_fingerprint:
            raise SdcModelError(
                f"the file needs the model set with fingerprint {header.fingerprint.hex()}, "
                f"but {self.stages.model_dir} has {self.header_fingerprint.hex()}")
        if header.latent_channels != m.latent_channels or header.downscale != m.downscale:
            raise SdcModelError("the file's latent shape does not fit this model set")
        return contents

    def latent_to_image(self, latent: np.ndarray, /, size: tuple[int, int], *, denoise_steps: int = 0,
                        denoise_stride: int | None = None, eta: float | None = None, seed: int = 0,
                        decoder: str = "vae_decoder", progress=None) -> Image.Image:
        """(C, h, w) raw latent -> RGB PIL image of ``size`` = (width, height): the DDIM steps
        (none by default; stride and eta default to the model set's), then the decoder.
        ``progress(stage, done, total)`` is called after each step and tile."""
        m = self.manifest
        denoising = resolve_denoising(m.defaults, m.limits, denoise_steps=denoise_steps,
                                      denoise_stride=denoise_stride, eta=eta, seed=seed)
        if decoder not in DECODERS:
            raise SdcInputError(f"unknown decoder {decoder!r}; choose one of {', '.join(DECODERS)}")
        if decoder not in m.graphs:
            raise SdcModelError(f"the model set has no {decoder.replace('_', ' ')} graph")
        width, height = size
        check_pixel_limit(width, height, self.max_pixels)  # the output buffer is the one allocation that scales
        latent = self.stages.denoise(np.asarray(latent, np.float32)[None], denoising, progress=progress)
        pixels = self.stages.decode(latent, decoder=decoder, progress=progress)
        return Image.fromarray(np.ascontiguousarray(pixels[:height, :width]), "RGB")

    def decode(self, data, /, *, denoise_steps: int | None = None, decoder: str = "vae_decoder",
               progress=None) -> Image.Image:
        """.sdc bytes -> PIL image of the original size: RGB, or RGBA where the file holds
        alpha (L, LA or I;16 where it says the image was grey); its metadata (icc_profile,
        exif, xmp) in ``image.info``.  ``denoise_steps``
        overrides the file's; the stride, eta and seed are the file's (stride and eta the model
        set's defaults where the file stored no steps)."""
        image, header = self._decoded(data, denoise_steps, decoder, progress)
        return shown_as_coded(image, container.grey_bits(header))

    def _decoded(self, data, denoise_steps: int | None, decoder: str, progress) -> tuple[Image.Image, Header]:
        """``decode``'s RGB(A) image, before a grey file is shown as grey, and the file's header."""
        contents = self._contents(data, extras=True)
        header = contents.header
        latent = latent_coding.dequantize_u8(contents.levels, header.quant_scale, header.quant_zero)
        stored = header.denoise_steps > 0
        image = self.latent_to_image(
            latent, (header.width, header.height),
            denoise_steps=header.denoise_steps if denoise_steps is None else denoise_steps,
            denoise_stride=header.denoise_stride if stored else None, eta=header.eta if stored else None,
            seed=header.seed, decoder=decoder, progress=progress)
        if contents.alpha is not None:
            image.putalpha(Image.fromarray(contents.alpha, "L"))
        image.info.update(contents.metadata)
        return image, header
