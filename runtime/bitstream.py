"""The exact, model-free layer: ``.sdc`` bytes <-> 8-bit latent levels, in imagecodecs' style.

    sdc_check(data)                          -> bool: starts with the .sdc magic
    sdc_info(data)                           -> dict: what the file holds (validates it all)
    sdc_decode(data)                         -> (Header, (C, h, w) uint8 levels)
    sdc_decode_all(data)                     -> SdcContents: the levels, alpha and metadata
    sdc_encode(levels, header, dither=..., alpha=..., metadata=...) -> bytes
    sdc_quantize(levels, header, dither=...)  -> (C, h, w) uint8 levels that file would hold

It ties the container (header, sections, CRC), the entropy coders and the latent coding
(palettes, indices, lookup); no model set is involved, and decoding is bit-exact everywhere
(docs/FORMAT.md).  Every error is an SdcError: SdcFormatError and its subclasses for bad
bytes, SdcLimitError when ``sdc_decode`` meets an image over ``max_pixels``, SdcInputError
for bad arguments.
"""
from __future__ import annotations

import dataclasses
import os
import struct
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

import numpy as np

from . import container, context, entropy
from . import latent as latent_coding
from .container import DEFAULT_MAX_PIXELS, MODE_U8, Header, Section
from .errors import SdcFormatError, SdcInputError

# Metadata entries by tag, in the order they are written (FORMAT.md).
METADATA_TAGS = {1: "icc_profile", 2: "exif", 3: "xmp"}
_ENTRY = struct.Struct("<BI")


@dataclass
class SdcContents:
    """Everything a .sdc file holds, decoded exactly: the header, the (C, h, w) uint8 latent
    levels, the (height, width) uint8 alpha (None: opaque) and the metadata by name."""

    header: Header
    levels: np.ndarray
    alpha: np.ndarray | None = None
    metadata: dict[str, bytes] = field(default_factory=dict)


def pack_metadata(metadata: dict[str, bytes]) -> bytes:
    names = {name: tag for tag, name in METADATA_TAGS.items()}
    unknown = sorted(set(metadata) - set(names))
    if unknown:
        raise SdcInputError(f"unknown metadata {', '.join(unknown)}; known: {', '.join(names)}")
    return b"".join(_ENTRY.pack(names[name], len(value)) + bytes(value)
                    for name, value in sorted(metadata.items(), key=lambda item: names[item[0]]) if value)


def unpack_metadata(raw: bytes) -> dict[str, bytes]:
    metadata, offset, last = {}, 0, 0
    while offset < len(raw):
        if offset + _ENTRY.size > len(raw):
            raise SdcFormatError("truncated metadata entry")
        tag, length = _ENTRY.unpack_from(raw, offset)
        offset += _ENTRY.size
        if tag not in METADATA_TAGS or tag <= last:
            raise SdcFormatError(f"metadata tag {tag} is unknown or out of order")
        if offset + length > len(raw):
            raise SdcFormatError("metadata entry longer than its section")
        metadata[METADATA_TAGS[tag]] = bytes(raw[offset:offset + length])
        offset, last = offset + length, tag
    return metadata


def encode_section(kind: int, symbols, alphabet_size: int = 256,
                   planes: tuple[int, int, int] | None = None) -> Section:
    """Integer symbols below ``alphabet_size`` -> a container section, by the smaller coder
    (``planes``: the (C, h, w) shape of 8-bit planes, which the context coder may take)."""
    symbols = np.asarray(symbols)
    coder, payload = entropy.encode(symbols, alphabet_size=alphabet_size, planes=planes)
    return Section(kind, coder, entropy.raw_length(symbols.size, alphabet_size), payload)


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
        # 0: a colour image; 8 or 16: a grey image of that depth, shown as one channel.
        "grey_bits": container.grey_bits(header),
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


def sdc_metadata(data, /) -> dict[str, bytes]:
    """The metadata a .sdc file carries (icc_profile, exif, xmp), decoding nothing else."""
    header, sections = container.unpack(data, max_pixels=None)
    for s in sections:
        if s.kind == container.SECTION_METADATA:
            raw = entropy.decode(s.payload, coder=s.coder, count=s.raw_length, alphabet_size=256)
            return unpack_metadata(raw.tobytes())
    return {}


def sdc_decode(data, /, *, max_pixels: int = DEFAULT_MAX_PIXELS) -> tuple[Header, np.ndarray]:
    """Parse a .sdc bitstream into its header and the (C, h, w) uint8 latent levels.  Exact."""
    contents = sdc_decode_all(data, max_pixels=max_pixels, extras=False)
    return contents.header, contents.levels


def sdc_decode_all(data, /, *, max_pixels: int = DEFAULT_MAX_PIXELS, extras: bool = True) -> SdcContents:
    """Parse a .sdc bitstream into everything it holds (``extras``: the alpha and metadata too)."""
    header, sections = container.unpack(data, max_pixels=max_pixels)
    by_kind = {s.kind: s for s in sections}

    def symbols(kind: int, count: int, alphabet_size: int = 256, planes=None) -> np.ndarray:
        s = by_kind[kind]
        return entropy.decode(s.payload, coder=s.coder, count=count, alphabet_size=alphabet_size, planes=planes)

    lh, lw, c = header.latent_height, header.latent_width, header.latent_channels
    if header.mode == MODE_U8:
        levels = symbols(container.SECTION_LATENT, c * lh * lw, planes=(c, lh, lw)).reshape(c, lh, lw)
    else:
        k, size = header.colors, header.group_channels
        groups = c // size
        palettes = symbols(container.SECTION_PALETTE, k * c).reshape(groups, k, size)
        indices = symbols(container.SECTION_INDICES, groups * lh * lw, k, planes=(groups, lh, lw)).reshape(groups, lh, lw)
        levels = np.concatenate([latent_coding.lookup(i, p) for i, p in zip(indices, palettes)], axis=0)
    contents = SdcContents(header, levels)
    if extras and container.SECTION_ALPHA in by_kind:
        contents.alpha = symbols(container.SECTION_ALPHA, header.width * header.height,
                                 planes=(1, header.height, header.width)).reshape(header.height, header.width)
    if extras and container.SECTION_METADATA in by_kind:
        raw_length = by_kind[container.SECTION_METADATA].raw_length
        contents.metadata = unpack_metadata(symbols(container.SECTION_METADATA, raw_length).tobytes())
    return contents


def sdc_encode(levels, header: Header, /, *, dither: bool = False, weights=None, alpha=None,
               metadata: dict[str, bytes] | None = None, deadzone: float = 0.0) -> bytes:
    """Code (C, h, w) latent levels (floats or integers in [0, 255]) into a .sdc bitstream.

    ``header`` gives the geometry and every stored parameter; its mode picks the coding.  In
    palette mode ``header.colors`` is the most palette entries to use (the file records how
    many were used) and ``header.group_channels`` splits the channels into groups with a
    palette each; ``weights`` (per channel) weight the squared error the palette search
    minimizes, and ``dither`` picks Floyd–Steinberg error diffusion over nearest colour.
    Unrounded levels let the palette search see the latent's real values.  ``alpha``
    ((height, width) uint8) is stored losslessly unless fully opaque; ``metadata`` maps
    icc_profile / exif / xmp to bytes.  In u8 mode ``deadzone`` (levels, 0..0.5) rounds each
    level toward the context coder's prediction (``context.round_levels``): rate-aware rounding.
    """
    extras = []
    if alpha is not None:
        alpha = np.asarray(alpha)
        if alpha.shape != (header.height, header.width) or alpha.dtype != np.uint8:
            raise SdcInputError(f"alpha must be ({header.height}, {header.width}) uint8")
        if alpha.size and alpha.min() < 255:  # a fully opaque alpha costs nothing
            extras.append(encode_section(container.SECTION_ALPHA, alpha, planes=(1,) + alpha.shape))
    if metadata:
        raw = pack_metadata(metadata)
        if len(raw) > container.MAX_METADATA_BYTES:
            raise SdcInputError(f"metadata of {len(raw)} bytes is over the limit of {container.MAX_METADATA_BYTES}")
        if raw:
            extras.append(encode_section(container.SECTION_METADATA, np.frombuffer(raw, np.uint8)))
    header, quantized = _quantized(levels, header, dither, weights, deadzone)
    if header.mode == MODE_U8:
        return container.pack(header, [encode_section(container.SECTION_LATENT, quantized, planes=quantized.shape)]
                              + extras)
    palettes, indices = quantized
    return container.pack(header, [
        encode_section(container.SECTION_PALETTE, palettes),
        encode_section(container.SECTION_INDICES, indices, header.colors, planes=indices.shape),
    ] + extras)


def sdc_quantize(levels, header: Header, /, *, dither: bool = False, weights=None, deadzone: float = 0.0) -> np.ndarray:
    """The (C, h, w) uint8 levels the file ``sdc_encode`` writes with these arguments holds
    (what ``sdc_decode`` returns of it), without the entropy coding: the closed-loop encoder
    takes each descent step's gradient there."""
    header, quantized = _quantized(levels, header, dither, weights, deadzone)
    if header.mode == MODE_U8:
        return quantized
    palettes, indices = quantized
    return np.concatenate([latent_coding.lookup(i, p) for i, p in zip(indices, palettes)], axis=0)


def _quantized(levels, header: Header, dither: bool, weights, deadzone: float):
    """(header as written, what the latent sections hold): in u8 mode the (C, h, w) uint8
    levels, in palette mode (palettes (groups, K, group_channels), indices (groups, h, w))."""
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
        return header, context.round_levels(levels, deadzone) if deadzone else np.rint(levels).astype(np.uint8)
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
    return dataclasses.replace(header, colors=k), (palettes, indices)
