"""The Pillow plugin: open and save .sdc through Pillow, options checked with clear errors."""
import io
import os

import numpy as np
import pytest
from helpers import KODAK, make_image
from PIL import Image

from sdc_runtime import SdcChecksumError, SdcInputError, pillow_plugin


@pytest.fixture
def registered(model_set):
    pillow_plugin.register(model_set)
    return model_set


def test_open_reads_the_header_lazily_and_decodes_like_the_codec(registered, codec, tmp_path):
    data = codec.encode(make_image(60, 36))
    path = tmp_path / "x.sdc"
    path.write_bytes(data)
    with Image.open(path) as image:
        assert image.format == "SDC" and image.size == (60, 36) and image.mode == "RGB"
        assert image.info["sdc"]["mode"] == "palette"
        np.testing.assert_array_equal(np.asarray(image.convert("RGB")), np.asarray(codec.decode(data)))


def test_save_checks_options_and_writes_a_valid_file(registered, codec):
    buffer = io.BytesIO()
    make_image(40, 24).save(buffer, format="SDC", mode="u8")
    data = buffer.getvalue()
    assert data[:4] == b"\x89SDC"
    assert Image.open(io.BytesIO(data)).info["sdc"]["mode"] == "u8"
    with pytest.raises(SdcInputError, match="unknown encoder option"):
        make_image(8, 8).save(io.BytesIO(), format="SDC", speed=90)
    with pytest.raises(SdcInputError, match="quality must be"):
        make_image(8, 8).save(io.BytesIO(), format="SDC", quality=0)
    with pytest.raises(SdcInputError, match="2..4096"):
        make_image(8, 8).save(io.BytesIO(), format="SDC", colors=1)
    with pytest.raises(SdcInputError, match="u8 mode only"):
        make_image(8, 8).save(io.BytesIO(), format="SDC", mode="palette", quant_step=0.5)
    buffer = io.BytesIO()
    make_image(40, 24).save(buffer, format="SDC", mode="palette", colors=8, denoise_steps=1)
    details = Image.open(io.BytesIO(buffer.getvalue())).info["sdc"]
    assert details["colors"] <= 8 and details["denoise_steps"] == 1
    files = []
    for quality in (1, 100):  # Pillow's own option name picks the point on the set's scale
        buffer = io.BytesIO()
        make_image(64, 48).save(buffer, format="SDC", quality=quality)
        files.append(buffer.getvalue())
        assert buffer.getvalue() == codec.encode(make_image(64, 48), quality=quality)
    assert files[0] != files[1]


def test_a_corrupt_file_raises_the_codecs_error(registered, codec):
    """The magic matches, so the reason it cannot be read is the codec's, not "cannot identify"."""
    data = bytearray(codec.encode(make_image(16, 16)))
    data[-1] ^= 0xFF
    with pytest.raises(SdcChecksumError, match="CRC32"):
        Image.open(io.BytesIO(bytes(data)))


@pytest.mark.skipif(not os.path.isdir(KODAK), reason="../shared/data/kodak is not present")
def test_lossy_round_trip_through_pillow_is_similar(taef2_set, tmp_path):
    """Similarity bound for the trained TAEF2 set: PSNR above 27 dB on a Kodak crop."""
    pillow_plugin.register(taef2_set)
    original = Image.open(os.path.join(KODAK, "kodim23.png")).convert("RGB").crop((128, 128, 384, 320))
    path = tmp_path / "k.sdc"
    original.save(path)
    with Image.open(path) as decoded:
        mse = np.mean((np.asarray(decoded.convert("RGB"), float) - np.asarray(original, float)) ** 2)
    assert 10 * np.log10(255 ** 2 / mse) > 27


def test_alpha_and_metadata_come_from_the_header_at_open_and_survive_save(registered, codec, tmp_path):
    """Issue 33.1: the mode is RGBA at open where the file holds alpha, so convert() and save()
    keep it, and the ICC profile and EXIF are in info, so save() writes them."""
    rgba = make_image(48, 32).convert("RGBA")
    alpha = np.zeros((32, 48), np.uint8)
    alpha[:, 24:] = 255
    rgba.putalpha(Image.fromarray(alpha))
    exif = Image.Exif()
    exif[0x010E] = "a description"
    buffer = io.BytesIO()
    rgba.save(buffer, "PNG", icc_profile=b"not really a profile", exif=exif.tobytes())
    data = codec.encode(Image.open(io.BytesIO(buffer.getvalue())))
    with Image.open(io.BytesIO(data)) as image:
        assert image.mode == "RGBA"
        assert image.info["icc_profile"] == b"not really a profile"
        assert image.getexif()[0x010E] == "a description"  # as Pillow's own plugins give it
        out = tmp_path / "out.png"
        image.save(out)  # Pillow's PNG writer keeps the profile from info, as from its own PNGs
    with Image.open(out) as saved:
        assert saved.mode == "RGBA"
        np.testing.assert_array_equal(np.asarray(saved)[..., 3], alpha)
        assert saved.info.get("icc_profile") == b"not really a profile"
    with Image.open(io.BytesIO(data)) as image:
        assert image.convert("RGB").mode == "RGB" and np.asarray(image.convert("RGB")).shape == (32, 48, 3)
