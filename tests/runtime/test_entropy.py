"""Entropy coding behind the integer interface: round trips, exact lengths, bounded output."""
import zlib

import numpy as np
import pytest

from sdc_runtime import SdcFormatError, entropy


@pytest.mark.parametrize("alphabet", [2, 256, 257, 4096])
def test_round_trip_and_exact_length(alphabet):
    symbols = np.random.default_rng(alphabet).integers(0, alphabet, 1000)
    coder, payload = entropy.encode(symbols, alphabet_size=alphabet)
    assert coder in entropy.CODER_NAMES
    np.testing.assert_array_equal(entropy.decode(payload, coder=coder, count=1000, alphabet_size=alphabet), symbols)
    with pytest.raises(SdcFormatError):  # a stream longer than declared is rejected, not inflated
        entropy.decode(payload, coder=coder, count=999, alphabet_size=alphabet)
    with pytest.raises(SdcFormatError):  # and a shorter one too
        entropy.decode(payload, coder=coder, count=1001, alphabet_size=alphabet)


def test_the_smaller_coder_wins():
    runs = np.repeat(np.arange(50) % 7, 400)  # long runs: both coders shrink it a lot
    coder, payload = entropy.encode(runs, alphabet_size=256)
    raw = runs.astype(np.uint8).tobytes()
    deflate = zlib.compressobj(9, zlib.DEFLATED, -15, 9)
    assert len(payload) <= len(deflate.compress(raw) + deflate.flush())


def test_rejections():
    with pytest.raises(SdcFormatError, match="unknown entropy coder"):
        entropy.decode(b"", coder=9, count=1, alphabet_size=2)
    coder, payload = entropy.encode(np.array([0, 5]), alphabet_size=256)
    with pytest.raises(SdcFormatError, match="outside the alphabet"):
        entropy.decode(payload, coder=coder, count=2, alphabet_size=5)
    with pytest.raises(ValueError, match="outside the alphabet"):  # the encoder refuses, too
        entropy.encode(np.array([0, 5]), alphabet_size=5)


def test_the_context_coder_takes_planes_of_a_smaller_alphabet_and_checks_it():
    """Palette index planes (alphabet <= 256) may use coder 3; what it decodes must stay below
    the section's alphabet, since the coder itself spans 0..255."""
    rng = np.random.default_rng(0)
    field = rng.normal(size=(2, 48, 64))
    for _ in range(6):  # smooth it, as a palette ordered along its principal axis makes indices
        field = (field + sum(np.roll(field, shift, axis) for shift in (1, -1) for axis in (1, 2))) / 5
    ramp = ((field - field.min()) / (field.max() - field.min()) * 16).astype(int)
    planes = np.clip(ramp + rng.integers(-1, 2, field.shape), 0, 15).astype(np.uint16)
    coder, payload = entropy.encode(planes, alphabet_size=16, planes=planes.shape)
    assert coder == entropy.CODER_CONTEXT
    np.testing.assert_array_equal(
        entropy.decode(payload, coder=coder, count=planes.size, alphabet_size=16, planes=planes.shape), planes.ravel())
    with pytest.raises(SdcFormatError, match="outside the alphabet of 12"):
        entropy.decode(payload, coder=coder, count=planes.size, alphabet_size=12, planes=planes.shape)
    with pytest.raises(SdcFormatError, match="palette index sections only"):
        entropy.decode(payload, coder=coder, count=planes.size, alphabet_size=16)


@pytest.mark.parametrize("coder", [entropy.CODER_DEFLATE, entropy.CODER_LZMA2])
def test_decompression_bomb_is_bounded(coder):
    """A tiny stream that inflates to 100 MB is stopped at the declared length."""
    import lzma

    if coder == entropy.CODER_DEFLATE:
        bomb = zlib.compressobj(9, zlib.DEFLATED, -15)
        payload = bomb.compress(bytes(100_000_000)) + bomb.flush()
    else:
        payload = lzma.compress(bytes(100_000_000), format=lzma.FORMAT_RAW,
                                filters=[{"id": lzma.FILTER_LZMA2, "dict_size": 1 << 20}])
    assert len(payload) < 200_000
    with pytest.raises(SdcFormatError):
        entropy.decode(payload, coder=coder, count=1000, alphabet_size=256)
