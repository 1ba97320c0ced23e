"""The .sdc container, format version 1 (specified in docs/FORMAT.md).

This layer is exact: it turns a header plus section payloads into bytes and back, checks
every length, limit and checksum before anything is allocated, and knows nothing about
neural networks.  All integers and floats are little-endian.
"""
from __future__ import annotations

import struct
import zlib
from dataclasses import dataclass, field

import numpy as np

from .errors import SdcChecksumError, SdcFormatError, SdcInputError, SdcLimitError, SdcTruncatedError, SdcVersionError

MAGIC = b"\x89SDC\r\n\x1a\n"
VERSION = 1

# Header flags (docs/FORMAT.md): what the image was, for a decoder to show it so.
FLAG_GREY = 1  # a grey image: shown as one channel, the luma of the decoded RGB
FLAG_DEEP = 2  # with FLAG_GREY: a 16-bit grey image, shown in 16 bits
KNOWN_FLAGS = FLAG_GREY | FLAG_DEEP

MODE_U8 = 1
MODE_PALETTE = 2
MODE_NAMES = {MODE_U8: "u8", MODE_PALETTE: "palette"}

SECTION_PALETTE = 1  # per channel group, K x G uint8 entries
SECTION_INDICES = 2  # per channel group, latent_h x latent_w indices, 1 byte (K <= 256) or 2 bytes LE
SECTION_LATENT = 3  # C x latent_h x latent_w uint8 latent, planar
# Optional, in either mode, each at most once:
SECTION_ALPHA = 4  # height x width uint8 alpha, row-major, lossless; absent when fully opaque
SECTION_METADATA = 5  # ICC profile, EXIF, XMP: (tag u8, length u32 LE, bytes) entries, tags ascending
SECTION_NAMES = {SECTION_PALETTE: "palette", SECTION_INDICES: "indices", SECTION_LATENT: "latent",
                 SECTION_ALPHA: "alpha", SECTION_METADATA: "metadata"}
OPTIONAL_SECTIONS = (SECTION_ALPHA, SECTION_METADATA)
MAX_METADATA_BYTES = 4 << 20

# 100 megapixels: the neural stages run in tiles, so this guards only the decoded image
# itself (300 MB of RGB), the one buffer that grows with the size a file claims.
DEFAULT_MAX_PIXELS = 100_000_000
MAX_CHANNELS = 256
MAX_COLORS = 4096
MAX_GROUP_CHANNELS = 255  # G is one byte
MAX_DENOISE_STEPS = 64
FINGERPRINT_BYTES = 16

_FIXED = struct.Struct("<8sHHIIHHHBBHBBHfI16s")  # the 58-byte fixed header of FORMAT.md
_QUANT = struct.Struct("<ff")
_SECTION = struct.Struct("<BBII")
_CRC = struct.Struct("<I")


@dataclass
class Header:
    width: int
    height: int
    latent_channels: int
    latent_height: int
    latent_width: int
    downscale: int
    mode: int
    colors: int  # K, the palette size: 0 in u8 mode
    group_channels: int  # G: palette mode codes C/G groups of G channels, one palette each; 0 in u8 mode
    denoise_steps: int
    denoise_stride: int
    eta: float
    seed: int
    fingerprint: bytes  # first FINGERPRINT_BYTES of the model set's fingerprint
    quant_scale: tuple[float, ...]
    quant_zero: tuple[float, ...]
    flags: int = 0  # FLAG_GREY, FLAG_DEEP


def grey_bits(header: Header) -> int:
    """0 for a colour image; 8 or 16 for a grey one of that depth (the header's flags)."""
    if not header.flags & FLAG_GREY:
        return 0
    return 16 if header.flags & FLAG_DEEP else 8


def grey_flags(bits: int) -> int:
    """The header flags of an image of ``grey_bits``."""
    return (FLAG_GREY if bits else 0) | (FLAG_DEEP if bits == 16 else 0)


@dataclass
class Section:
    kind: int
    coder: int
    raw_length: int
    payload: bytes = field(repr=False)


def check(data: bytes) -> bool:
    """True if ``data`` starts with the .sdc magic."""
    return bytes(data[: len(MAGIC)]) == MAGIC


def check_optional_raw_length(header: Header, kind: int, raw_length: int) -> None:
    if kind == SECTION_ALPHA and raw_length != header.width * header.height:
        raise SdcFormatError(f"alpha section declares {raw_length} bytes, the image has {header.width * header.height} pixels")
    if kind == SECTION_METADATA and not 0 < raw_length <= MAX_METADATA_BYTES:
        raise SdcFormatError(f"metadata section of {raw_length} bytes is outside 1..{MAX_METADATA_BYTES}")


def check_section_kinds(header: Header, kinds: list[int], error=SdcFormatError) -> None:
    """The mode's sections exactly, plus optional sections at most once each."""
    required = sorted(k for k in kinds if k not in OPTIONAL_SECTIONS)
    optional = [k for k in kinds if k in OPTIONAL_SECTIONS]
    if required != sorted(expected_raw_lengths(header)) or len(optional) != len(set(optional)):
        names = ", ".join(SECTION_NAMES.get(k, f"#{k}") for k in kinds) or "none"
        raise error(f"sections ({names}) do not match the {MODE_NAMES[header.mode]} coding mode")


def expected_raw_lengths(header: Header) -> dict[int, int]:
    """The decoded length of every section a header's mode requires."""
    cells = header.latent_height * header.latent_width
    if header.mode == MODE_U8:
        return {SECTION_LATENT: cells * header.latent_channels}
    index_bytes = 1 if header.colors <= 256 else 2
    groups = header.latent_channels // header.group_channels
    return {SECTION_PALETTE: header.colors * header.latent_channels, SECTION_INDICES: groups * cells * index_bytes}


def _validate_header(h: Header, max_pixels: int | None) -> None:
    if h.flags & ~KNOWN_FLAGS:
        raise SdcFormatError(f"unknown header flags 0x{h.flags & ~KNOWN_FLAGS:x}")
    if h.flags & FLAG_DEEP and not h.flags & FLAG_GREY:
        raise SdcFormatError("the 16-bit flag is set without the grey flag")
    if h.width < 1 or h.height < 1:
        raise SdcFormatError("image size must be at least 1x1")
    if max_pixels is not None and h.width * h.height > max_pixels:
        raise SdcLimitError(f"image is {h.width}x{h.height} = {h.width * h.height} pixels, over the limit of "
                            f"{max_pixels} (raise it with max_pixels= or --max-pixels)")
    if h.downscale not in (1, 2, 4, 8, 16, 32, 64):
        raise SdcFormatError(f"latent downscale {h.downscale} is not a power of two up to 64")
    if not 1 <= h.latent_channels <= MAX_CHANNELS:
        raise SdcLimitError(f"latent channel count {h.latent_channels} is outside 1..{MAX_CHANNELS}")
    for side, latent_side in ((h.width, h.latent_width), (h.height, h.latent_height)):
        if latent_side != -(-side // h.downscale):
            raise SdcFormatError(
                f"latent size {h.latent_width}x{h.latent_height} does not match image size "
                f"{h.width}x{h.height} at downscale {h.downscale}")
    if h.mode not in MODE_NAMES:
        raise SdcFormatError(f"unknown coding mode {h.mode}")
    if h.mode == MODE_U8 and (h.colors or h.group_channels):
        raise SdcFormatError("u8 mode must have palette size and group channels 0")
    if h.mode == MODE_PALETTE:
        if not 2 <= h.colors <= MAX_COLORS:
            raise SdcFormatError(f"palette size {h.colors} is outside 2..{MAX_COLORS}")
        if (not 1 <= h.group_channels <= min(h.latent_channels, MAX_GROUP_CHANNELS)
                or h.latent_channels % h.group_channels):
            raise SdcFormatError(f"palette groups of {h.group_channels} channels do not divide {h.latent_channels} channels")
    if h.denoise_steps > MAX_DENOISE_STEPS:
        raise SdcLimitError(f"{h.denoise_steps} denoising steps is over the limit of {MAX_DENOISE_STEPS}")
    if h.denoise_steps and h.denoise_stride < 1:
        raise SdcFormatError("denoising needs a step stride of at least 1")
    if not (0.0 <= h.eta <= 1.0):
        raise SdcFormatError(f"eta {h.eta} is outside [0, 1]")
    for scale in h.quant_scale:
        if not (scale > 0 and scale < float("inf")):
            raise SdcFormatError("quantization scales must be finite and positive")
    for zero in h.quant_zero:
        if not abs(zero) < float("inf"):
            raise SdcFormatError("quantization zero points must be finite")


def check_writable(header: Header) -> None:
    """The checks the parser makes, for a header about to be written: what fails is the
    caller's input, not a file, so the error is SdcInputError."""
    for name, bits in (("width", 32), ("height", 32), ("latent_channels", 16), ("latent_height", 16),
                       ("latent_width", 16), ("downscale", 8), ("mode", 8), ("colors", 16), ("denoise_steps", 8),
                       ("group_channels", 8), ("denoise_stride", 16), ("seed", 32), ("flags", 16)):
        value = getattr(header, name)
        if not isinstance(value, (int, np.integer)) or not 0 <= value < 1 << bits:
            raise SdcInputError(f"header field {name} must be an integer in 0..{(1 << bits) - 1}, not {value!r}")
    try:
        _validate_header(header, max_pixels=None)
    except (SdcFormatError, SdcLimitError) as exc:
        raise SdcInputError(f"cannot write this header: {exc}") from None
    if len(header.fingerprint) != FINGERPRINT_BYTES:
        raise SdcInputError(f"fingerprint must be {FINGERPRINT_BYTES} bytes")
    if len(header.quant_scale) != header.latent_channels or len(header.quant_zero) != header.latent_channels:
        raise SdcInputError("the quantization mapping needs one scale and one zero point per latent channel")


def smallest_file_bytes(latent_channels: int) -> int:
    """No .sdc file with this many latent channels is smaller: header, mapping, section count, CRC."""
    return _FIXED.size + _QUANT.size * latent_channels + 1 + _CRC.size


def pack(header: Header, sections: list[Section]) -> bytes:
    """Serialize a header and its sections (SdcInputError for what the parser would reject)."""
    check_writable(header)
    expected = expected_raw_lengths(header)
    check_section_kinds(header, [s.kind for s in sections], SdcInputError)
    parts = [_FIXED.pack(
        MAGIC, VERSION, header.flags, header.width, header.height, header.latent_channels,
        header.latent_height, header.latent_width, header.downscale, header.mode,
        header.colors, header.denoise_steps, header.group_channels, header.denoise_stride, header.eta,
        header.seed, header.fingerprint)]
    parts += [_QUANT.pack(s, z) for s, z in zip(header.quant_scale, header.quant_zero, strict=True)]
    parts.append(struct.pack("<B", len(sections)))
    for section in sections:
        if section.kind in OPTIONAL_SECTIONS:
            try:
                check_optional_raw_length(header, section.kind, section.raw_length)
            except SdcFormatError as exc:
                raise SdcInputError(str(exc)) from None
        elif section.raw_length != expected[section.kind]:
            raise SdcInputError(f"{SECTION_NAMES[section.kind]} section has the wrong length")
        parts.append(_SECTION.pack(section.kind, section.coder, section.raw_length, len(section.payload)))
    parts += [s.payload for s in sections]
    body = b"".join(parts)
    return body + _CRC.pack(zlib.crc32(body))


def unpack(data: bytes, *, max_pixels: int | None = DEFAULT_MAX_PIXELS) -> tuple[Header, list[Section]]:
    """Parse and check a .sdc bitstream (None: no pixel limit; parsing allocates nothing that
    grows with the image).  Raises an SdcFormatError subclass or SdcLimitError."""
    data = memoryview(data).cast("B")
    n = len(data)
    if n < len(MAGIC):
        if MAGIC.startswith(bytes(data)) and n:
            raise SdcTruncatedError(f"truncated .sdc data: {n} bytes, shorter than the magic")
        raise SdcFormatError("not an .sdc file (wrong magic)")
    if bytes(data[: len(MAGIC)]) != MAGIC:
        raise SdcFormatError("not an .sdc file (wrong magic)")
    if n < len(MAGIC) + 2:
        raise SdcTruncatedError(f"truncated .sdc data: {n} bytes")
    (version,) = struct.unpack_from("<H", data, len(MAGIC))
    if version != VERSION:
        raise SdcVersionError(f"unsupported .sdc format version {version} (this decoder reads version {VERSION})")
    if n < _FIXED.size:
        raise SdcTruncatedError(f"truncated .sdc header: {n} of {_FIXED.size} bytes")
    (_, _, flags, width, height, channels, lat_h, lat_w, downscale, mode, colors,
     steps, group_channels, stride, eta, seed, fingerprint) = _FIXED.unpack_from(data, 0)
    if not 1 <= channels <= MAX_CHANNELS:
        raise SdcLimitError(f"latent channel count {channels} is outside 1..{MAX_CHANNELS}")
    offset = _FIXED.size
    table_end = offset + channels * _QUANT.size + 1
    if n < table_end:
        raise SdcTruncatedError("truncated .sdc header (quantization table)")
    quant = [_QUANT.unpack_from(data, offset + i * _QUANT.size) for i in range(channels)]
    offset += channels * _QUANT.size
    count = data[offset]
    offset += 1
    if n < offset + count * _SECTION.size:
        raise SdcTruncatedError("truncated .sdc header (section table)")
    table = [_SECTION.unpack_from(data, offset + i * _SECTION.size) for i in range(count)]
    offset += count * _SECTION.size
    total = offset + sum(t[3] for t in table) + _CRC.size
    if n < total:
        raise SdcTruncatedError(f"truncated .sdc data: {n} of {total} bytes")
    if n > total:
        raise SdcFormatError(f"{n - total} bytes of trailing data after the .sdc stream")
    (stored_crc,) = _CRC.unpack_from(data, total - _CRC.size)
    if zlib.crc32(data[: total - _CRC.size]) != stored_crc:
        raise SdcChecksumError("CRC32 mismatch: the .sdc data is corrupt")
    header = Header(width, height, channels, lat_h, lat_w, downscale, mode, colors, group_channels, steps,
                    stride, eta, seed, bytes(fingerprint),
                    tuple(q[0] for q in quant), tuple(q[1] for q in quant), flags)
    _validate_header(header, max_pixels)
    expected = expected_raw_lengths(header)
    check_section_kinds(header, [t[0] for t in table])
    sections = []
    for kind, coder, raw_length, stored_length in table:
        if kind in OPTIONAL_SECTIONS:
            check_optional_raw_length(header, kind, raw_length)
        elif raw_length != expected[kind]:
            raise SdcFormatError(
                f"{SECTION_NAMES[kind]} section declares {raw_length} bytes, the header implies {expected[kind]}")
        sections.append(Section(kind, coder, raw_length, bytes(data[offset: offset + stored_length])))
        offset += stored_length
    return header, sections
