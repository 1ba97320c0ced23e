"""The exact bitstream layer: golden files, round trips, and every rejection the format defines."""
import glob
import os
import struct

import numpy as np
import pytest

from conftest import recrc
from sdc_runtime import (
    SdcChecksumError, SdcError, SdcFormatError, SdcLimitError, SdcTruncatedError, SdcVersionError,
    container, entropy, sdc_check, sdc_info, unpack_latent,
)

GOLDEN = os.path.join(os.path.dirname(os.path.abspath(__file__)), "golden")
GOLDEN_FILES = sorted(glob.glob(os.path.join(GOLDEN, "*.sdc")))


def _read(path):
    with open(path, "rb") as fh:
        return fh.read()


def test_golden_files_exist():
    assert len(GOLDEN_FILES) == 3


@pytest.mark.parametrize("path", GOLDEN_FILES, ids=os.path.basename)
def test_golden_files_decode_bit_exactly(path):
    header, levels = unpack_latent(_read(path))
    expected = np.load(path.replace(".sdc", ".levels.npy"))
    assert levels.dtype == np.uint8
    np.testing.assert_array_equal(levels, expected)
    assert header.fingerprint == bytes(range(16))
    assert (header.denoise_steps, header.step_stride, header.seed) == (3, 15, 1234)
    assert header.eta == 0.5 and header.quant_zero[0] == 127.5
    assert header.quant_scale[0] == np.float32(0.18215)


@pytest.mark.parametrize("path", GOLDEN_FILES, ids=os.path.basename)
def test_golden_files_repack_to_the_same_bytes(path):
    """Header and section table are written identically (payloads are carried over as-is)."""
    data = _read(path)
    header, sections = container.unpack(data)
    assert container.pack(header, sections) == data


def test_golden_header_layout_is_little_endian():
    data = _read(os.path.join(GOLDEN, "u8_61x37.sdc"))
    assert data[:8] == b"\x89SDC\r\n\x1a\n"
    assert struct.unpack_from("<HHII", data, 8) == (1, 0, 61, 37)


def test_check_and_info():
    data = _read(os.path.join(GOLDEN, "palette200_64x40.sdc"))
    assert sdc_check(data) and not sdc_check(b"\x89PNG\r\n\x1a\n")
    details = sdc_info(data)
    assert details["mode"] == "palette" and details["palette_size"] == 200
    assert details["latent_shape"] == [4, 5, 8] and (details["width"], details["height"]) == (64, 40)
    assert details["total_bytes"] == len(data)
    assert sum(s["bytes"] for s in details["sections"].values()) < len(data)


def test_entropy_round_trip_and_bounded_output():
    rng = np.random.default_rng(0)
    for alphabet in (2, 256, 257, 4096):
        symbols = rng.integers(0, alphabet, 1000)
        coder, payload = entropy.encode(symbols, alphabet_size=alphabet)
        np.testing.assert_array_equal(entropy.decode(payload, coder=coder, count=1000, alphabet_size=alphabet), symbols)
        with pytest.raises(SdcFormatError):  # a stream longer than declared is rejected, not inflated
            entropy.decode(payload, coder=coder, count=999, alphabet_size=alphabet)
    with pytest.raises(SdcFormatError, match="unknown entropy coder"):
        entropy.decode(b"", coder=9, count=1, alphabet_size=2)
    with pytest.raises(SdcFormatError, match="outside the alphabet"):
        coder, payload = entropy.encode(np.array([0, 5]), alphabet_size=256)
        entropy.decode(payload, coder=coder, count=2, alphabet_size=5)


def test_decompression_bomb_is_bounded():
    """A tiny stream that inflates to 100 MB is stopped at the declared length."""
    import zlib

    bomb = zlib.compressobj(9, zlib.DEFLATED, -15)
    payload = bomb.compress(bytes(100_000_000)) + bomb.flush()
    assert len(payload) < 200_000
    with pytest.raises(SdcFormatError):
        entropy.decode(payload, coder=entropy.CODER_DEFLATE, count=1000, alphabet_size=256)


# --- rejections: each malformed input raises its own error type with a clear message ---

@pytest.fixture
def u8_file():
    return _read(os.path.join(GOLDEN, "u8_61x37.sdc"))


def _set(data, fmt, offset, *values):
    data = bytearray(data)
    struct.pack_into(fmt, data, offset, *values)
    return bytes(data)


def test_rejects_wrong_magic(u8_file):
    with pytest.raises(SdcFormatError, match="wrong magic"):
        unpack_latent(b"GIF89a" + u8_file[6:])
    with pytest.raises(SdcFormatError, match="wrong magic"):
        unpack_latent(b"")


def test_rejects_unknown_version(u8_file):
    with pytest.raises(SdcVersionError, match="version 2"):
        unpack_latent(_set(u8_file, "<H", 8, 2))


@pytest.mark.parametrize("keep", [3, 9, 20, 60, -1])
def test_rejects_truncated_data(u8_file, keep):
    with pytest.raises(SdcTruncatedError, match="truncated"):
        unpack_latent(u8_file[:keep] if keep > 0 else u8_file[:-1])


def test_rejects_trailing_data(u8_file):
    with pytest.raises(SdcFormatError, match="trailing"):
        unpack_latent(u8_file + b"\0")


def test_rejects_crc_mismatch(u8_file):
    flipped = bytearray(u8_file)
    flipped[len(flipped) // 2] ^= 0x10
    with pytest.raises(SdcChecksumError, match="CRC32"):
        unpack_latent(bytes(flipped))


def test_rejects_section_length_that_disagrees_with_header(u8_file):
    table = container._FIXED.size + 4 * container._QUANT.size + 1
    kind, coder, raw, stored = container._SECTION.unpack_from(u8_file, table)
    with pytest.raises(SdcFormatError, match="declares 161 bytes, the header implies 160"):
        unpack_latent(recrc(_set(u8_file, "<I", table + 2, raw + 1)))


def test_rejects_sections_of_another_mode(u8_file):
    # Header says palette mode (K=16) but the file carries a u8 latent section.
    data = _set(_set(u8_file, "<BH", 27, container.MODE_PALETTE, 16), "<B", 31, 4)
    with pytest.raises(SdcFormatError, match="do not match the palette coding mode"):
        unpack_latent(recrc(data))


def test_rejects_size_over_pixel_limit_before_allocating(u8_file):
    with pytest.raises(SdcLimitError, match="over the limit of 1000"):
        unpack_latent(u8_file, max_pixels=1000)
    # An absurd size in an otherwise valid header: refused by the default limit.
    huge = recrc(_set(u8_file, "<IIHHH", 12, 60000, 60000, 4, 7500, 7500))
    with pytest.raises(SdcLimitError, match="over the limit"):
        unpack_latent(huge)


def test_rejects_palette_groups_that_do_not_divide_the_channels(u8_file):
    data = _set(_set(u8_file, "<BH", 27, container.MODE_PALETTE, 16), "<B", 31, 3)
    with pytest.raises(SdcFormatError, match="groups of 3 channels do not divide 4"):
        unpack_latent(recrc(data))


def test_rejects_latent_size_inconsistent_with_image(u8_file):
    with pytest.raises(SdcFormatError, match="does not match image size"):
        unpack_latent(recrc(_set(u8_file, "<I", 12, 200)))


def test_rejects_corrupt_deflate_payload(u8_file):
    table = container._FIXED.size + 4 * container._QUANT.size + 1
    payload_at = table + container._SECTION.size
    data = bytearray(u8_file)
    data[payload_at: payload_at + 4] = b"\xff\xff\xff\xff"
    with pytest.raises(SdcFormatError, match="stream"):
        unpack_latent(recrc(bytes(data)))


def test_rejects_a_well_formed_file_with_an_index_beyond_the_palette():
    """Valid container, valid compression, valid CRC, but one index equals K."""
    header, sections = container.unpack(_read(os.path.join(GOLDEN, "palette200_64x40.sdc")))
    indices = np.zeros((header.latent_height, header.latent_width), np.uint8)
    indices[3, 5] = header.palette_size
    by_kind = {s.kind: s for s in sections}
    coder, payload = entropy.encode(indices, alphabet_size=256)  # the encoder would refuse K itself
    by_kind[container.SECTION_INDICES] = container.Section(container.SECTION_INDICES, coder, indices.size, payload)
    data = container.pack(header, list(by_kind.values()))
    with pytest.raises(SdcFormatError, match="symbol 200 is outside the alphabet of 200"):
        unpack_latent(data)


def test_every_error_is_an_sdc_error(u8_file):
    for bad in (b"junk", u8_file[:30], recrc(_set(u8_file, "<I", 12, 200))):
        with pytest.raises(SdcError):
            unpack_latent(bad)


@pytest.mark.parametrize("path", GOLDEN_FILES, ids=os.path.basename)
def test_fuzzed_bytes_never_crash(path):
    """Random byte flips, with and without a fixed-up CRC, through parsing, entropy decoding and
    palette lookup: only SdcError, never anything else."""
    original = _read(path)
    rng = np.random.default_rng(0)
    for trial in range(300):
        data = bytearray(original)
        for _ in range(rng.integers(1, 4)):
            data[rng.integers(0, len(data))] = rng.integers(0, 256)
        data = bytes(data) if trial % 2 else recrc(bytes(data))
        try:
            unpack_latent(data)
        except SdcError:
            pass
