"""The exact, model-free layer: ``.sdc`` bytes <-> 8-bit latent levels, in imagecodecs' style.

    sdc_check(data)                          -> bool: starts with the .sdc magic
    sdc_info(data)                           -> dict: what the file holds (validates it all)
    sdc_decode(data)                         -> (Header, (C, h, w) uint8 levels)
    sdc_encode(levels, header, dither=...)   -> bytes

It ties the container (header, sections, CRC), the entropy coders and the latent coding
(palettes, indices, lookup); no model set is involved, and decoding is bit-exact everywhere
(docs/FORMAT.md).  Every error is an SdcError: SdcFormatError and its subclasses for bad
bytes, SdcLimitError when ``sdc_decode`` meets an image over ``max_pixels``, SdcInputError
for bad arguments.
"""
from __future__ import annotations

import dataclasses
import os
from concurrent.futures import ThreadPoolExecutor

import numpy as np

from . import container, entropy, latent as latent_coding
from .container import DEFAULT_MAX_PIXELS, MODE_U8, Header, Section
from .errors import SdcInputError


def sdc_check(data, /) -> bool:
    """True if the bytes start with the .sdc magic."""
    return container.check(data)


def sdc_info(data, /) -> dict:
    """What a .sdc file holds, without a model set.  The whole container is checked; nothing
    is decoded or allocated, so a well-formed file is never refused for its size."""
    header, sections = container.unpack(data, max_pixels=None)
    return {
        "format_version": container.VERSION,
        "width": header.width,
        "height": header.height,
        "mode": container.MODE_NAMES[header.mode],
        "latent_shape": [header.latent_channels, header.latent_height, header.latent_width],
        "downscale": header.downscale,
        "colors": header.colors,
        "group_channels": header.group_channels,
        "denoise_steps": header.denoise_steps,
        "denoise_stride": header.denoise_stride,
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


def sdc_decode(data, /, *, max_pixels: int = DEFAULT_MAX_PIXELS) -> tuple[Header, np.ndarray]:
    """Parse a .sdc bitstream into its header and the (C, h, w) uint8 latent levels.  Exact."""
    header, sections = container.unpack(data, max_pixels=max_pixels)
    by_kind = {s.kind: s for s in sections}
    lh, lw, c = header.latent_height, header.latent_width, header.latent_channels
    if header.mode == MODE_U8:
        s = by_kind[container.SECTION_LATENT]
        levels = entropy.decode(s.payload, coder=s.coder, count=c * lh * lw, alphabet_size=256)
        return header, levels.reshape(c, lh, lw)
    k, size = header.colors, header.group_channels
    groups = c // size
    s = by_kind[container.SECTION_PALETTE]
    palettes = entropy.decode(s.payload, coder=s.coder, count=k * c, alphabet_size=256).reshape(groups, k, size)
    s = by_kind[container.SECTION_INDICES]
    indices = entropy.decode(s.payload, coder=s.coder, count=groups * lh * lw, alphabet_size=k).reshape(groups, lh, lw)
    return header, np.concatenate([latent_coding.lookup(i, p) for i, p in zip(indices, palettes)], axis=0)


def sdc_encode(levels, header: Header, /, *, dither: bool = False, weights=None) -> bytes:
    """Code (C, h, w) latent levels (floats or integers in [0, 255]) into a .sdc bitstream.

    ``header`` gives the geometry and every stored parameter; its mode picks the coding.  In
    palette mode ``header.colors`` is the most palette entries to use (the file records how
    many were used) and ``header.group_channels`` splits the channels into groups with a
    palette each; ``weights`` (per channel) weight the squared error the palette search
    minimizes, and ``dither`` picks Floyd–Steinberg error diffusion over nearest colour.
    Unrounded levels let the palette search see the latent's real values.
    """
    container.check_writable(header)
    levels = np.asarray(levels)
    expected = (header.latent_channels, header.latent_height, header.latent_width)
    if levels.shape != expected:
        raise SdcInputError(f"levels of shape {levels.shape} do not match the header's latent {expected}")
    if levels.dtype.kind not in "uif" or (levels.size and not (np.all(np.isfinite(levels))
                                                               and levels.min() >= 0 and levels.max() <= 255)):
        raise SdcInputError("levels must be finite numbers in [0, 255]")
    if weights is not None:
        weights = np.asarray(weights, np.float64)
        if weights.shape != (header.latent_channels,) or not np.all(np.isfinite(weights) & (weights > 0)):
            raise SdcInputError("weights must be one positive number per latent channel")
    if header.mode == MODE_U8:
        symbols = np.rint(levels).astype(np.uint8)
        coder, payload = entropy.encode(symbols, alphabet_size=256)
        return container.pack(header, [Section(container.SECTION_LATENT, coder, symbols.size, payload)])
    cells = np.ascontiguousarray(np.moveaxis(levels.astype(np.float64), 0, -1))  # (h, w, C) latent "pixels"
    size = header.group_channels
    assign = latent_coding.dither if dither else latent_coding.nearest

    def code_group(start: int) -> tuple[np.ndarray, np.ndarray]:
        group = np.ascontiguousarray(cells[:, :, start:start + size])
        group_weights = None if weights is None else weights[start:start + size]
        palette = latent_coding.build_palette(group.reshape(-1, size), header.colors, seed=header.seed,
                                              weights=group_weights)
        return palette, assign(group, palette, group_weights)

    starts = range(0, header.latent_channels, size)
    if len(starts) == 1:
        coded = [code_group(0)]
    else:  # groups are independent and the kernels release the GIL: one thread per core
        with ThreadPoolExecutor(max_workers=min(len(starts), os.cpu_count() or 1)) as pool:
            coded = list(pool.map(code_group, starts))
    # One K for all groups: shorter palettes are padded by repeating their last entry.
    k = max(2, max(len(palette) for palette, _ in coded))
    palettes = np.stack([np.vstack([p, np.repeat(p[-1:], k - len(p), axis=0)]) for p, _ in coded])
    indices = np.stack([group_indices for _, group_indices in coded])
    coder_p, payload_p = entropy.encode(palettes, alphabet_size=256)
    coder_i, payload_i = entropy.encode(indices, alphabet_size=k)
    return container.pack(dataclasses.replace(header, colors=k), [
        Section(container.SECTION_PALETTE, coder_p, palettes.size, payload_p),
        Section(container.SECTION_INDICES, coder_i, entropy.raw_length(indices.size, k), payload_i),
    ])
