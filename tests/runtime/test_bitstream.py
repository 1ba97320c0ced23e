"""The exact, model-free bitstream layer: golden files (one written byte by byte from
docs/FORMAT.md), property-based round trips, and every rejection the format defines."""
import glob
import os
import struct
import zlib

import numpy as np
import pytest
from helpers import recrc
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from sdc_runtime import (
    Header,
    SdcChecksumError,
    SdcError,
    SdcFormatError,
    SdcInputError,
    SdcLimitError,
    SdcTruncatedError,
    SdcVersionError,
    container,
    entropy,
    sdc_check,
    sdc_decode,
    sdc_decode_all,
    sdc_encode,
    sdc_info,
)

GOLDEN = os.path.join(os.path.dirname(os.path.abspath(__file__)), "golden")
GOLDEN_FILES = sorted(glob.glob(os.path.join(GOLDEN, "*.sdc")))


def _read(path):
    with open(path, "rb") as fh:
        return fh.read()


# --- an independent golden vector: every byte from the spec, none from the writer ---

def _stored_deflate_block(raw: bytes) -> bytes:
    """RFC 1951 §3.2.4: one final stored block: BFINAL=1 BTYPE=00, LEN, NLEN (one's complement)."""
    return bytes([0x01]) + len(raw).to_bytes(2, "little") + (len(raw) ^ 0xFFFF).to_bytes(2, "little") + raw


def _with_crc(body: bytes) -> bytes:
    return body + zlib.crc32(body).to_bytes(4, "little")


HAND_HEADER_COMMON = bytes.fromhex(
    "89 53 44 43 0D 0A 1A 0A"  # magic
    "01 00"                    # version 1
    "00 00"                    # flags 0
    "10 00 00 00"              # width 16
    "08 00 00 00"              # height 8
    "02 00"                    # C = 2 latent channels
    "01 00"                    # latent_height = ceil(8 / 8) = 1
    "02 00"                    # latent_width = ceil(16 / 8) = 2
    "08"                       # downscale 8
)
HAND_HEADER_TAIL = bytes.fromhex(
    "00 00 00 00"              # eta 0.0 (float32)
    "2A 00 00 00"              # seed 42
    "00 01 02 03 04 05 06 07 08 09 0A 0B 0C 0D 0E 0F"  # fingerprint
    "00 00 80 3F  00 00 FF 42"  # channel 0: scale 1.0, zero 127.5 (float32 LE)
    "00 00 00 3F  00 00 00 00"  # channel 1: scale 0.5, zero 0.0
)


def test_hand_written_u8_file_decodes_to_the_stated_latent():
    payload = _stored_deflate_block(bytes([10, 20, 30, 40]))  # C x h x w, planar: ch0 [10 20], ch1 [30 40]
    data = _with_crc(
        HAND_HEADER_COMMON
        + bytes.fromhex("01")      # mode 1 = u8
        + bytes.fromhex("00 00")   # K = 0 in u8 mode
        + bytes.fromhex("00")      # denoise_steps 0
        + bytes.fromhex("00")      # G = 0 in u8 mode
        + bytes.fromhex("00 00")   # stride 0
        + HAND_HEADER_TAIL
        + bytes.fromhex("01")      # one section
        + bytes.fromhex("03 01 04 00 00 00") + len(payload).to_bytes(4, "little")  # latent, DEFLATE, raw 4
        + payload)
    header, levels = sdc_decode(data)
    np.testing.assert_array_equal(levels, np.array([[[10, 20]], [[30, 40]]], np.uint8))
    assert (header.width, header.height, header.seed, header.fingerprint) == (16, 8, 42, bytes(range(16)))
    assert header.quant_scale == (1.0, 0.5) and header.quant_zero == (127.5, 0.0)
    # z = (q - zero) * scale, per FORMAT.md
    z = (levels.astype(np.float64) - np.array(header.quant_zero)[:, None, None]) * np.array(header.quant_scale)[:, None, None]
    np.testing.assert_array_equal(z, [[[-117.5, -107.5]], [[15.0, 20.0]]])
    # The writer produces the same header and table for these levels (its payload may differ).
    rewritten = container.pack(header, container.unpack(data)[1])
    assert rewritten == data


def test_hand_written_palette_file_decodes_to_the_stated_latent():
    # Two groups of G = 1 channel, K = 2: palettes g0 = [5, 200], g1 = [7, 9];
    # indices g0 = [1, 0], g1 = [0, 1]  ->  ch0 = [200, 5], ch1 = [7, 9].
    palette = _stored_deflate_block(bytes([5, 200, 7, 9]))
    indices = _stored_deflate_block(bytes([1, 0, 0, 1]))
    data = _with_crc(
        HAND_HEADER_COMMON
        + bytes.fromhex("02")      # mode 2 = palette
        + bytes.fromhex("02 00")   # K = 2
        + bytes.fromhex("03")      # denoise_steps 3
        + bytes.fromhex("01")      # G = 1
        + bytes.fromhex("0F 00")   # stride 15
        + HAND_HEADER_TAIL
        + bytes.fromhex("02")      # two sections
        + bytes.fromhex("01 01 04 00 00 00") + len(palette).to_bytes(4, "little")  # palette: K*C = 4
        + bytes.fromhex("02 01 04 00 00 00") + len(indices).to_bytes(4, "little")  # indices: groups*cells = 4
        + palette + indices)
    header, levels = sdc_decode(data)
    np.testing.assert_array_equal(levels, np.array([[[200, 5]], [[7, 9]]], np.uint8))
    assert (header.colors, header.group_channels, header.denoise_steps, header.denoise_stride) == (2, 1, 3, 15)
    info = sdc_info(data)
    assert info["mode"] == "palette" and info["colors"] == 2 and info["total_bytes"] == len(data)
    assert info["sections"]["palette"] == {"bytes": 9, "raw_bytes": 4, "coder": "deflate"}


# --- golden files written by the reference encoder of format version 1 ---

def test_golden_files_exist():
    assert len(GOLDEN_FILES) == 5


GOLDEN_METADATA = {"icc_profile": b"golden icc", "exif": b"Exif\0\0golden", "xmp": b"<x:xmpmeta>golden</x:xmpmeta>"}


def test_golden_file_with_alpha_and_metadata():
    path = os.path.join(GOLDEN, "u8_alpha_metadata_13x9.sdc")
    contents = sdc_decode_all(_read(path))
    np.testing.assert_array_equal(contents.alpha, np.load(path.replace(".sdc", ".alpha.npy")))
    assert contents.metadata == GOLDEN_METADATA
    assert set(sdc_info(_read(path))["sections"]) == {"latent", "alpha", "metadata"}


def test_optional_sections_are_checked(u8_file):
    header, sections = container.unpack(_read(os.path.join(GOLDEN, "u8_alpha_metadata_13x9.sdc")))
    by_kind = {s.kind: s for s in sections}
    alpha = by_kind[container.SECTION_ALPHA]
    with pytest.raises(SdcInputError, match="do not match"):  # twice is refused by the writer
        container.pack(header, sections + [alpha])
    body = container.pack(header, sections)
    twice = body[:-4]
    # Hand-build a table with the alpha section twice: the reader refuses it too.
    table_at = 58 + 8 * header.latent_channels
    count = twice[table_at]
    table_end = table_at + 1 + 10 * count
    entry = twice[table_at + 1 + 10 * [s.kind for s in sections].index(container.SECTION_ALPHA):][:10]
    payloads = twice[table_end:]
    forged = twice[:table_at] + bytes([count + 1]) + twice[table_at + 1:table_end] + entry + payloads + alpha.payload
    with pytest.raises(SdcFormatError, match="do not match"):
        sdc_decode(recrc(forged + b"\0\0\0\0"))
    bad_length = _set(body, "<I", table_at + 1 + 10 * [s.kind for s in sections].index(container.SECTION_ALPHA) + 2, 5)
    with pytest.raises(SdcFormatError, match="alpha section declares 5 bytes"):
        sdc_decode(recrc(bad_length))
    with pytest.raises(SdcFormatError, match="metadata tag 9"):
        from sdc_runtime.bitstream import unpack_metadata
        unpack_metadata(b"\x09\x01\x00\x00\x00x")
    with pytest.raises(SdcInputError, match="unknown metadata"):
        sdc_encode(np.zeros((4, 5, 8), np.uint8), sdc_decode(u8_file)[0], metadata={"gps": b"x"})


@pytest.mark.parametrize("path", GOLDEN_FILES, ids=os.path.basename)
def test_golden_files_decode_bit_exactly(path):
    header, levels = sdc_decode(_read(path))
    expected = np.load(path.replace(".sdc", ".levels.npy"))
    assert levels.dtype == np.uint8
    np.testing.assert_array_equal(levels, expected)
    assert header.fingerprint == bytes(range(16))
    assert (header.denoise_steps, header.denoise_stride, header.seed) == (3, 15, 1234)
    assert header.eta == 0.5 and header.quant_zero[0] == 127.5
    assert header.quant_scale[0] == np.float32(0.18215)


@pytest.mark.parametrize("path", GOLDEN_FILES, ids=os.path.basename)
def test_golden_files_repack_to_the_same_bytes(path):
    """Header and section table are written identically (payloads are carried over as-is)."""
    data = _read(path)
    header, sections = container.unpack(data)
    assert container.pack(header, sections) == data


def test_check_and_info():
    data = _read(os.path.join(GOLDEN, "palette200_64x40.sdc"))
    assert sdc_check(data) and not sdc_check(b"\x89PNG\r\n\x1a\n") and not sdc_check(b"")
    details = sdc_info(data)
    assert details["mode"] == "palette" and details["colors"] == 200 and details["group_channels"] == 4
    assert details["latent_shape"] == [4, 5, 8] and (details["width"], details["height"]) == (64, 40)
    assert details["total_bytes"] == len(data)
    assert sum(s["bytes"] for s in details["sections"].values()) < len(data)


# --- sdc_encode: round trips over random shapes, K, G and modes ---

def _header(mode, channels, lh, lw, downscale, colors=0, group_channels=0, width=None, height=None):
    return Header(width=width or lw * downscale, height=height or lh * downscale, latent_channels=channels,
                  latent_height=lh, latent_width=lw, downscale=downscale, mode=mode, colors=colors,
                  group_channels=group_channels, denoise_steps=0, denoise_stride=0, eta=0.0, seed=7,
                  fingerprint=bytes(16), quant_scale=(0.5,) * channels, quant_zero=(127.0,) * channels)


@st.composite
def latents(draw):
    channels = draw(st.sampled_from([1, 2, 3, 4, 6, 8, 16]))
    lh, lw = draw(st.integers(1, 7)), draw(st.integers(1, 7))
    downscale = draw(st.sampled_from([1, 2, 8, 64]))
    width = lw * downscale - draw(st.integers(0, downscale - 1))
    height = lh * downscale - draw(st.integers(0, downscale - 1))
    seed = draw(st.integers(0, 2 ** 32 - 1))
    distinct = draw(st.sampled_from([1, 3, 256]))  # few distinct levels: palettes become exact
    levels = np.random.default_rng(seed).integers(0, distinct, (channels, lh, lw)) * (255 // max(distinct - 1, 1))
    return levels.astype(np.uint8), width, height, downscale


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(latents())
def test_u8_round_trip_is_exact(case):
    levels, width, height, downscale = case
    c, lh, lw = levels.shape
    header = _header(container.MODE_U8, c, lh, lw, downscale, width=width, height=height)
    data = sdc_encode(levels, header)
    decoded_header, decoded = sdc_decode(data, max_pixels=1 << 40)
    np.testing.assert_array_equal(decoded, levels)
    assert decoded_header == header
    alpha = np.random.default_rng(width).integers(0, 256, (height, width)).astype(np.uint8)
    alpha[0, 0] = 0  # never fully opaque
    contents = sdc_decode_all(sdc_encode(levels, header, alpha=alpha, metadata={"exif": b"e" * width}),
                              max_pixels=1 << 40)
    np.testing.assert_array_equal(contents.alpha, alpha)
    assert contents.metadata == {"exif": b"e" * width}


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(latents(), st.integers(2, 600), st.data())
def test_palette_round_trip(case, colors, data_strategy):
    levels, width, height, downscale = case
    c, lh, lw = levels.shape
    group_channels = data_strategy.draw(st.sampled_from([g for g in range(1, c + 1) if c % g == 0]))
    header = _header(container.MODE_PALETTE, c, lh, lw, downscale, colors, group_channels, width, height)
    data = sdc_encode(levels, header, dither=data_strategy.draw(st.booleans()))
    decoded_header, decoded = sdc_decode(data, max_pixels=1 << 40)
    assert decoded.shape == levels.shape and decoded.dtype == np.uint8
    assert 2 <= decoded_header.colors <= max(colors, 2)
    assert (decoded_header.group_channels, decoded_header.width, decoded_header.height) == (group_channels, width, height)
    for g in range(0, c, group_channels):
        cells = lambda a: a[g:g + group_channels].reshape(group_channels, -1).T
        distinct = len(np.unique(cells(levels), axis=0))
        assert len(np.unique(cells(decoded), axis=0)) <= decoded_header.colors
        if distinct <= colors:  # enough colours: the palette is exactly the cells, lossless
            np.testing.assert_array_equal(cells(decoded), cells(levels))


@pytest.mark.parametrize("change,needle", [
    (dict(group_channels=256, latent_channels=256), "group"),
    (dict(colors=5000), "palette size"),
    (dict(seed=2 ** 32), "seed"),
    (dict(width=2 ** 32), "width"),
    (dict(fingerprint=b"short"), "fingerprint"),
    (dict(quant_scale=(0.5,)), "one scale"),
    (dict(eta=2.0), "eta"),
])
def test_encode_rejects_a_bad_header_with_an_input_error(change, needle):
    import dataclasses

    header = dataclasses.replace(_header(container.MODE_PALETTE, 4, 2, 2, 8, 16, 4), **change)
    levels = np.zeros((header.latent_channels, 2, 2), np.uint8)
    with pytest.raises(SdcInputError, match=needle):
        sdc_encode(levels, header)


def test_encode_rejects_levels_that_do_not_fit():
    header = _header(container.MODE_U8, 4, 2, 3, 8)
    with pytest.raises(SdcInputError, match="do not match"):
        sdc_encode(np.zeros((4, 3, 2)), header)
    with pytest.raises(SdcInputError, match=r"\[0, 255\]"):
        sdc_encode(np.full((4, 2, 3), 256.0), header)
    with pytest.raises(SdcInputError, match=r"\[0, 255\]"):
        sdc_encode(np.full((4, 2, 3), np.nan), header)
    with pytest.raises(SdcInputError, match="weights"):
        sdc_encode(np.zeros((4, 2, 3)), header, weights=[1.0, 0.0, 1.0, 1.0])


# --- rejections: each malformed input raises its own error type with a clear message ---

U8_TABLE = 58 + 8 * 4 + 1  # u8_61x37.sdc has C = 4: the section table starts here (FORMAT.md)


@pytest.fixture
def u8_file():
    return _read(os.path.join(GOLDEN, "u8_61x37.sdc"))


def _set(data, fmt, offset, *values):
    data = bytearray(data)
    struct.pack_into(fmt, data, offset, *values)
    return bytes(data)


def test_rejects_wrong_magic(u8_file):
    with pytest.raises(SdcFormatError, match="wrong magic"):
        sdc_decode(b"GIF89a" + u8_file[6:])
    with pytest.raises(SdcFormatError, match="wrong magic"):
        sdc_decode(b"")


def test_rejects_unknown_version(u8_file):
    with pytest.raises(SdcVersionError, match="version 2"):
        sdc_decode(_set(u8_file, "<H", 8, 2))


@pytest.mark.parametrize("keep", [3, 9, 20, 60, -1])
def test_rejects_truncated_data(u8_file, keep):
    with pytest.raises(SdcTruncatedError, match="truncated"):
        sdc_decode(u8_file[:keep] if keep > 0 else u8_file[:-1])


def test_rejects_trailing_data(u8_file):
    with pytest.raises(SdcFormatError, match="trailing"):
        sdc_decode(u8_file + b"\0")


def test_rejects_crc_mismatch(u8_file):
    flipped = bytearray(u8_file)
    flipped[len(flipped) // 2] ^= 0x10
    with pytest.raises(SdcChecksumError, match="CRC32"):
        sdc_decode(bytes(flipped))


@pytest.mark.parametrize("flags,needle", [(4, "unknown header flags 0x4"), (0x8000, "unknown header flags"),
                                          (2, "16-bit flag is set without the grey flag")])
def test_rejects_unknown_or_inconsistent_flags(u8_file, flags, needle):
    with pytest.raises(SdcFormatError, match=needle):
        sdc_decode(recrc(_set(u8_file, "<H", 10, flags)))


@pytest.mark.parametrize("flags", [1, 3])
def test_the_grey_flags_travel_exactly(u8_file, flags):
    """Bit 0: a grey image; bit 1 with it: 16-bit grey (docs/FORMAT.md)."""
    header, levels = sdc_decode(recrc(_set(u8_file, "<H", 10, flags)))
    assert header.flags == flags
    assert sdc_info(recrc(_set(u8_file, "<H", 10, flags)))["grey_bits"] == (16 if flags & 2 else 8)
    assert sdc_encode(levels, header)[10:12] == struct.pack("<H", flags)


def test_rejects_section_length_that_disagrees_with_header(u8_file):
    kind, coder, raw, stored = struct.unpack_from("<BBII", u8_file, U8_TABLE)
    with pytest.raises(SdcFormatError, match="declares 161 bytes, the header implies 160"):
        sdc_decode(recrc(_set(u8_file, "<I", U8_TABLE + 2, raw + 1)))


def test_rejects_sections_of_another_mode(u8_file):
    # Header says palette mode (K=16) but the file carries a u8 latent section.
    data = _set(_set(u8_file, "<BH", 27, container.MODE_PALETTE, 16), "<B", 31, 4)
    with pytest.raises(SdcFormatError, match="do not match the palette coding mode"):
        sdc_decode(recrc(data))


def test_rejects_size_over_pixel_limit_before_allocating(u8_file):
    with pytest.raises(SdcLimitError, match="over the limit of 1000"):
        sdc_decode(u8_file, max_pixels=1000)
    # An absurd size in an otherwise valid header: refused by the default limit.
    huge = recrc(_set(u8_file, "<IIHHH", 12, 60000, 60000, 4, 7500, 7500))
    with pytest.raises(SdcLimitError, match="over the limit"):
        sdc_decode(huge)


def test_rejects_palette_groups_that_do_not_divide_the_channels(u8_file):
    data = _set(_set(u8_file, "<BH", 27, container.MODE_PALETTE, 16), "<B", 31, 3)
    with pytest.raises(SdcFormatError, match="groups of 3 channels do not divide 4"):
        sdc_decode(recrc(data))


def test_rejects_latent_size_inconsistent_with_image(u8_file):
    with pytest.raises(SdcFormatError, match="does not match image size"):
        sdc_decode(recrc(_set(u8_file, "<I", 12, 200)))


def test_rejects_corrupt_deflate_payload(u8_file):
    payload_at = U8_TABLE + 10
    data = bytearray(u8_file)
    data[payload_at: payload_at + 4] = b"\xff\xff\xff\xff"
    with pytest.raises(SdcFormatError, match="stream"):
        sdc_decode(recrc(bytes(data)))


def test_rejects_a_well_formed_file_with_an_index_beyond_the_palette():
    """Valid container, valid compression, valid CRC, but one index equals K."""
    header, sections = container.unpack(_read(os.path.join(GOLDEN, "palette200_64x40.sdc")))
    indices = np.zeros((header.latent_height, header.latent_width), np.uint8)
    indices[3, 5] = header.colors
    by_kind = {s.kind: s for s in sections}
    coder, payload = entropy.encode(indices, alphabet_size=256)  # the encoder would refuse K itself
    by_kind[container.SECTION_INDICES] = container.Section(container.SECTION_INDICES, coder, indices.size, payload)
    data = container.pack(header, list(by_kind.values()))
    with pytest.raises(SdcFormatError, match="symbol 200 is outside the alphabet of 200"):
        sdc_decode(data)


def test_info_validates_like_decode(u8_file):
    for bad in (b"junk", u8_file[:30], recrc(_set(u8_file, "<I", 12, 200))):
        with pytest.raises(SdcError):
            sdc_decode(bad)
        with pytest.raises(SdcError):
            sdc_info(bad)


@pytest.mark.parametrize("path", GOLDEN_FILES, ids=os.path.basename)
def test_mutated_files_are_rejected_or_decoded_never_crash(path):
    """Random byte changes.  Without a fixed-up CRC every mutated file must be *rejected*
    (the CRC covers every byte); with one, parsing, entropy decoding and lookup may accept it
    or raise an SdcError, never anything else."""
    original = _read(path)
    rng = np.random.default_rng(0)
    for trial in range(300):
        data = bytearray(original)
        while data == original:
            for _ in range(rng.integers(1, 4)):
                data[rng.integers(0, len(data))] = rng.integers(0, 256)
        if trial % 2:
            with pytest.raises(SdcError):
                sdc_decode(bytes(data))
        else:
            try:
                header, levels = sdc_decode(recrc(bytes(data)))
                assert levels.shape == (header.latent_channels, header.latent_height, header.latent_width)
            except SdcError:
                pass
