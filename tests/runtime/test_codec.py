"""SdcCodec on the tiny SD set, a random TAESD set and the trained TAEF2 pair: round trips,
options resolved once, the latent-level API, parity with diffusers, errors, no torch."""
import subprocess
import sys

import numpy as np
import pytest
from helpers import kodak, make_image, needs_shared, psnr

from sdc_runtime import (
    SdcCodec,
    SdcError,
    SdcInputError,
    SdcLimitError,
    SdcModelError,
    SdcProviderError,
    sdc_decode,
    sdc_info,
)
from sdc_runtime.latent import dequantize_u8, quantize_u8
from sdc_runtime.neural import denoise_timesteps, step_noise

# --- round trips ---

@pytest.mark.parametrize("size", [(100, 60), (64, 64), (37, 91), (1, 1)])
@pytest.mark.parametrize("mode", ["palette", "u8"])
def test_api_round_trip_keeps_the_size(codec, size, mode):
    data = codec.encode(make_image(*size), mode=mode)
    image = codec.decode(data)
    assert image.size == size and image.mode == "RGB"
    details = sdc_info(data)
    assert (details["width"], details["height"], details["mode"]) == (*size, mode)
    assert details["latent_shape"] == [4, -(-size[1] // 8), -(-size[0] // 8)]


def test_defaults_come_from_the_manifest(codec, tae_set):
    """The SD set's defaults (the 2022 recipe) and the TAE set's reach the file's header."""
    sd = sdc_info(codec.encode(make_image(40, 24)))
    assert (sd["mode"], sd["group_channels"], sd["denoise_steps"], sd["denoise_stride"], sd["eta"]) == \
        ("palette", 4, 3, 15, pytest.approx(0.9))
    tae = SdcCodec(tae_set)
    assert tae.manifest.defaults.dither is False and tae.manifest.defaults.denoise_steps == 0
    details = sdc_info(tae.encode(make_image(40, 24)))
    assert (details["denoise_steps"], details["denoise_stride"], details["eta"]) == (0, 0, 0)


def test_u8_mode_holds_the_8bit_latent_exactly(codec):
    image = make_image(40, 24)
    latent, size = codec.image_to_latent(image)
    assert size == (40, 24) and latent.shape == (4, 3, 5)
    _, levels = sdc_decode(codec.encode(image, mode="u8"))
    m = codec.manifest
    nearest = quantize_u8(latent, m.quant_scale, m.quant_zero)
    np.testing.assert_array_equal(levels, nearest)
    # Rate-aware rounding (--deadzone) moves a level at most one step off the nearest.
    _, levels = sdc_decode(codec.encode(image, mode="u8", deadzone=0.5))
    assert np.abs(levels.astype(int) - nearest).max() <= 1


def test_latent_api_composes_to_encode_and_decode(codec):
    """image_to_latent -> encode_latent is encode; decode_latent -> latent_to_image is decode."""
    image = make_image(56, 40, seed=4)
    latent, size = codec.image_to_latent(image)
    data = codec.encode_latent(latent, size, mode="palette", colors=32, seed=9)
    assert data == codec.encode(image, mode="palette", colors=32, seed=9)
    header, dequantized = codec.decode_latent(data)
    np.testing.assert_array_equal(dequantized, dequantize_u8(sdc_decode(data)[1], header.quant_scale, header.quant_zero))
    by_hand = codec.latent_to_image(dequantized, size, denoise_steps=header.denoise_steps,
                                    denoise_stride=header.denoise_stride, eta=header.eta, seed=header.seed)
    np.testing.assert_array_equal(np.asarray(by_hand), np.asarray(codec.decode(data)))
    with pytest.raises(SdcInputError, match="does not fit"):
        codec.encode_latent(latent, (200, 40))
    with pytest.raises(SdcInputError, match=r"\(4, h, w\)"):
        codec.encode_latent(latent[:3], size)


def test_u8_quant_step_on_the_sd_family(codec):
    """A fixed-mapping (SD) set takes a coarser weighted step too: fewer bytes, same geometry,
    and the header's steps follow the manifest's channel weights."""
    image = make_image(96, 64)
    fine, coarse = codec.encode(image, mode="u8"), codec.encode(image, mode="u8", quant_step=1.0)
    assert len(coarse) < len(fine)
    assert codec.decode(coarse).size == (96, 64)
    steps = np.array(sdc_info(coarse)["quant_scale"])
    weights = np.array(codec.manifest.channel_weights)
    assert np.argmin(steps) == np.argmax(weights)


def test_palette_mode_uses_the_colours_asked_for(codec):
    """96x64 -> 96 latent cells, far more distinct than 16: the palette fills (nearly) all 16
    entries, and fewer colours give fewer bytes."""
    image = make_image(96, 64)
    data = codec.encode(image, mode="palette", colors=16)
    k = sdc_info(data)["colors"]
    assert 12 <= k <= 16
    _, levels = sdc_decode(data)
    assert len(np.unique(levels.reshape(4, -1).T, axis=0)) <= k
    assert len(codec.encode(image, mode="palette", colors=4)) < len(data)


def test_decode_is_deterministic_and_denoise_steps_override(codec):
    data = codec.encode(make_image(48, 32))
    a, b = np.asarray(codec.decode(data)), np.asarray(codec.decode(data))
    np.testing.assert_array_equal(a, b)
    no_unet = np.asarray(codec.decode(data, denoise_steps=0))
    assert not np.array_equal(a, no_unet)


def test_a_file_without_steps_denoises_with_the_sets_stride(codec):
    """Steps asked for at decode time on a file that stored none use the model set's default
    stride and eta, not some other family's."""
    image = make_image(48, 32)
    data = codec.encode(image, denoise_steps=0)
    assert sdc_info(data)["denoise_stride"] == 0
    header, latent = codec.decode_latent(data)
    d = codec.manifest.defaults
    expected = codec.latent_to_image(latent, (48, 32), denoise_steps=2, denoise_stride=d.denoise_stride,
                                     eta=d.eta, seed=header.seed)
    np.testing.assert_array_equal(np.asarray(codec.decode(data, denoise_steps=2)), np.asarray(expected))


def test_fp16_set_decodes_files_of_the_fp32_set(codec, model_set_fp16):
    data = codec.encode(make_image(64, 48))
    reference = np.asarray(codec.decode(data)).astype(int)
    half = np.asarray(SdcCodec(model_set_fp16).decode(data)).astype(int)
    assert np.abs(half - reference).max() <= 8
    assert np.abs(half - reference).mean() < 1.0


# --- options: resolved and checked once, on every entry point ---

@pytest.mark.parametrize("options,needle", [
    (dict(group_channels=256), "group_channels"),
    (dict(group_channels=3), "group_channels"),
    (dict(colors=5000), "colors"),
    (dict(colors=1), "colors"),
    (dict(colors=2.5), "colors"),
    (dict(mode="jpeg"), "unknown mode"),
    (dict(mode="palette", quant_step=0.3), "u8 mode only"),
    (dict(mode="u8", colors=64, group_channels=2, dither=False), "colors, group_channels, dither apply to palette mode only"),
    (dict(quant_step=0.3, colors=64), "apply to palette mode only"),
    (dict(mode="u8", quant_step=-1.0), "positive"),
    (dict(denoise_steps=65), "denoise_steps"),
    (dict(denoise_steps=3, denoise_stride=500), "training timesteps"),
    (dict(eta=1.5), "eta"),
    (dict(seed=-1), "seed"),
    (dict(dither="yes"), "dither"),
    (dict(speed=90), "unknown encoder option"),
    (dict(quality=0), "quality"),
    (dict(quality=101), "quality"),
    (dict(quality=50.5), "quality"),
    (dict(effort=12), "effort"),
    (dict(effort=-1), "effort"),
    (dict(target_bytes=10), "target_bytes"),
    (dict(quality=50, target_bytes=50000), "target_bytes"),
    (dict(quality=50, colors=16), "colors"),
    (dict(target_bytes=50000, mode="u8"), "target_bytes"),
])
def test_every_invalid_option_is_an_input_error_on_every_entry_point(codec, options, needle):
    image = make_image(16, 16)
    latent, size = codec.image_to_latent(image)
    for call in (lambda: codec.encode(image, **options), lambda: codec.encode_latent(latent, size, **options),
                 lambda: codec.options(**options)):
        with pytest.raises(SdcInputError, match=needle):
            call()


def test_a_set_without_unet_refuses_denoising(tae_set):
    codec = SdcCodec(tae_set)
    with pytest.raises(SdcInputError, match="no UNet"):
        codec.encode(make_image(16, 16), denoise_steps=2)
    data = codec.encode(make_image(16, 16))
    with pytest.raises(SdcInputError, match="no UNet"):
        codec.decode(data, denoise_steps=1)


def test_bad_images_and_providers(codec):
    with pytest.raises(SdcInputError):
        codec.encode("not an image")
    with pytest.raises(SdcLimitError, match="pixel limit"):  # as decode raises it (issue 33.7)
        SdcCodec(codec.stages.model_dir, max_pixels=10).encode(make_image(8, 8))
    data = codec.encode(make_image(8, 8))
    with pytest.raises(SdcLimitError, match="over the limit"):
        SdcCodec(codec.stages.model_dir, max_pixels=10).decode(data)
    with pytest.raises(SdcProviderError, match="unknown provider"):
        SdcCodec(codec.stages.model_dir, provider="tpu")
    with pytest.raises(SdcInputError, match="unknown decoder"):
        codec.decode(codec.encode(make_image(8, 8)), decoder="mine")
    with pytest.raises(SdcModelError, match="no tiny decoder"):
        codec.decode(codec.encode(make_image(8, 8)), decoder="tiny_decoder")


def test_decode_with_the_wrong_model_set(codec, other_model_set):
    data = codec.encode(make_image(32, 32))
    with pytest.raises(SdcModelError, match=f"fingerprint {codec.header_fingerprint.hex()}"):
        SdcCodec(other_model_set).decode(data)


def test_every_decode_error_is_an_sdc_error(codec):
    good = codec.encode(make_image(40, 30), mode="u8")
    for bad in (b"", b"junk", good[:40], good[:-1], good + b"x", bytes(good[:-1]) + bytes([good[-1] ^ 1])):
        with pytest.raises(SdcError):
            codec.decode(bad)


# --- parity with diffusers / PyTorch ---

def torch_reference_decode(sd_dir, data, steps=None):
    """The same algorithm in diffusers/PyTorch: dequantize, DDIMScheduler steps with the
    torch UNet and the text encoder's "" embedding, AutoencoderKL.decode."""
    import torch
    import torch.nn.functional as F
    from diffusers import AutoencoderKL, DDIMScheduler, UNet2DConditionModel
    from transformers import CLIPTextModel, CLIPTokenizer

    header, levels = sdc_decode(data)  # the exact bitstream layer is shared
    steps = header.denoise_steps if steps is None else steps
    scale = np.array(header.quant_scale, np.float64)[:, None, None]
    zero = np.array(header.quant_zero, np.float64)[:, None, None]
    raw = torch.from_numpy(((levels - zero) * scale).astype(np.float32))[None]
    vae = AutoencoderKL.from_pretrained(sd_dir, subfolder="vae").eval()
    unet = UNet2DConditionModel.from_pretrained(sd_dir, subfolder="unet").eval()
    tokenizer = CLIPTokenizer.from_pretrained(sd_dir, subfolder="tokenizer")
    text = CLIPTextModel.from_pretrained(sd_dir, subfolder="text_encoder").eval()
    scheduler = DDIMScheduler.from_pretrained(sd_dir, subfolder="scheduler")
    scheduler.set_timesteps(scheduler.config.num_train_timesteps // header.denoise_stride)
    ids = tokenizer([""], padding="max_length", max_length=tokenizer.model_max_length, return_tensors="pt").input_ids
    with torch.no_grad():
        context = text(ids)[0]
        h, w = raw.shape[2:]
        multiple = 2 ** (len(unet.config.block_out_channels) - 1)
        sample = F.pad(raw, (0, -w % multiple, 0, -h % multiple), mode="replicate") * vae.config.scaling_factor
        noises = step_noise(header.seed, tuple(sample.shape), steps)
        for t, noise in zip(denoise_timesteps(steps, header.denoise_stride), noises):
            prediction = unet(sample, t, encoder_hidden_states=context).sample
            sample = scheduler.step(prediction, t, sample, eta=header.eta,
                                    variance_noise=torch.from_numpy(noise)).prev_sample
        image = vae.decode(sample[:, :, :h, :w] / vae.config.scaling_factor).sample
    unit = ((image[0].permute(1, 2, 0).numpy() + 1) / 2)[: header.height, : header.width]
    return np.rint(np.clip(unit, 0, 1) * 255).astype(np.uint8)


@pytest.mark.parametrize("mode,steps", [("palette", None), ("u8", None), ("palette", 0)])
def test_decode_matches_the_diffusers_pipeline(codec, tiny_sd, mode, steps):
    """Tolerance: at most 2 of 255 levels per pixel, mean under 0.05 (float32 ONNX vs torch)."""
    data = codec.encode(make_image(100, 60, seed=3), mode=mode)
    ours = np.asarray(codec.decode(data, denoise_steps=steps)).astype(int)
    reference = torch_reference_decode(tiny_sd, data, steps).astype(int)
    assert ours.shape == reference.shape
    assert np.abs(ours - reference).max() <= 2
    assert np.abs(ours - reference).mean() < 0.05


# --- the runtime never imports torch ---

def test_encode_and_decode_run_with_torch_unimportable(model_set, codec, tmp_path):
    path = tmp_path / "x.sdc"
    path.write_bytes(codec.encode(make_image(24, 16)))
    script = f"""
import sys
for name in ("torch", "diffusers", "transformers"):
    sys.modules[name] = None  # any import of these now raises ImportError
from sdc_runtime import SdcCodec
from sdc_runtime.cli import main
codec = SdcCodec({model_set!r})
image = codec.decode(open({str(path)!r}, "rb").read())
assert image.size == (24, 16)
assert main(["decode", {str(path)!r}, {str(tmp_path / 'o.png')!r}, "--models", {model_set!r}]) == 0
assert main(["encode", {str(tmp_path / 'o.png')!r}, {str(tmp_path / 'y.sdc')!r}, "--models", {model_set!r}]) == 0
print("torch-free ok")
"""
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, timeout=300)
    assert result.returncode == 0, result.stderr.decode()
    assert b"torch-free ok" in result.stdout


# --- real quality: the trained TAEF2 pair on Kodak crops ---

@needs_shared
@pytest.mark.parametrize("name", ["kodim23", "kodim05"])
def test_taef2_u8_mode_is_within_015_db_of_the_autoencoder(taef2_set, name):
    codec = SdcCodec(taef2_set)
    image = kodak(name)
    ceiling = codec.latent_to_image(*codec.image_to_latent(image))
    ours = codec.decode(codec.encode(image, mode="u8"))
    assert psnr(image, ceiling) > 24  # the trained pair really reconstructs the image
    assert psnr(image, ours) >= psnr(image, ceiling) - 0.15


# Floors from measurement on these 384x256 crops (kodim23 20234 bytes 29.98 dB,
# kodim05 19992 bytes 25.49 dB): bytes at most ~5% above, PSNR at most 0.5 dB below.
PALETTE_FLOORS = {"kodim23": (21300, 29.5), "kodim05": (21000, 25.0)}


@needs_shared
@pytest.mark.parametrize("name", sorted(PALETTE_FLOORS))
def test_taef2_palette_mode_bytes_and_psnr_floors(taef2_set, name):
    codec = SdcCodec(taef2_set)
    image = kodak(name)
    data = codec.encode(image, mode="palette", colors=256, group_channels=4, effort=0)
    max_bytes, min_psnr = PALETTE_FLOORS[name]
    got = psnr(image, codec.decode(data))
    print(f"{name}: {len(data)} bytes, {got:.2f} dB")
    assert len(data) <= max_bytes
    assert got >= min_psnr


@needs_shared
def test_taef2_palette_mode_beats_the_original_recipe(taef2_set):
    """On the same 8-bit latent, our default palette mode (decoder-weighted k-means, one
    palette per 4 channels) gives a higher PSNR than libimagequant + zlib in no more bytes."""
    from sdc_bench.recipe2022 import original_recipe

    codec = SdcCodec(taef2_set)
    image = kodak("kodim05")
    latent, size = codec.image_to_latent(image)
    scale, zero = codec.quant_mapping(latent)
    recipe_bytes, recipe_levels = original_recipe(quantize_u8(latent, scale, zero))
    recipe = codec.latent_to_image(dequantize_u8(recipe_levels, scale, zero), size)
    data = codec.encode(image, mode="palette", colors=256, group_channels=4, effort=0)
    assert len(data) <= recipe_bytes + 8 * latent.shape[0]
    assert psnr(image, codec.decode(data)) > psnr(image, recipe) + 0.5


@needs_shared
def test_taef2_quant_step_trades_bytes_for_quality_by_decoder_sensitivity(taef2_set):
    """Coarser weighted steps: fewer bytes, lower (but sane) PSNR, and per-channel steps in the
    header inversely proportional to sqrt(decoder sensitivity) where the range allows.  At
    effort 0, for CI time: the steps are the latent coding's, whatever the encoder loop does."""
    codec = SdcCodec(taef2_set)
    image = kodak("kodim23")
    results = []
    for step in (None, 0.2, 0.6):
        data = codec.encode(image, mode="u8", quant_step=step, effort=0)
        results.append((len(data), psnr(image, codec.decode(data))))
    assert results[0][0] > results[1][0] > results[2][0]
    assert results[0][1] > results[1][1] > results[2][1] > 24
    header_steps = np.array(sdc_info(codec.encode(image, mode="u8", quant_step=0.6, effort=0))["quant_scale"])
    weights = np.array(codec.manifest.channel_weights)
    free = np.isclose(header_steps, 0.6 / np.sqrt(weights), rtol=1e-5)
    assert free.sum() >= 16  # most channels get exactly the weighted step
    assert np.all(header_steps[~free] > 0.6 / np.sqrt(weights[~free]))  # others widened to fit 8 bits


def test_every_stage_reports_its_progress_from_its_start(model_set):
    """Issue 33.9: a stage's first report is (stage, 0, total) before any of its work, then each
    unit done, up to an honest total; a tiled encode and decode at effort 1 with denoising."""
    codec = SdcCodec(model_set, tile_size=64)
    calls = []
    data = codec.encode(make_image(160, 128), effort=1, denoise_steps=2, progress=lambda *call: calls.append(call))
    codec.decode(data, progress=lambda *call: calls.append(call))
    runs = []  # consecutive calls of one stage
    for stage, done, total in calls:
        if not runs or runs[-1][0] != stage or done == 0:
            runs.append((stage, []))
        runs[-1][1].append((done, total))
    stages = {stage for stage, _ in runs}
    assert {"encode", "refine", "score", "decode", "denoise"} <= stages, stages
    for stage, reports in runs:
        assert reports[0][0] == 0, (stage, reports)  # opened at its start, not at its first unit
        assert len({total for _, total in reports}) == 1 and all(0 <= d <= t for d, t in reports), (stage, reports)
        assert [d for d, _ in reports] == sorted(d for d, _ in reports), (stage, reports)
