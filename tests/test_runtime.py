"""The runtime on the tiny model set: round trips, info, parity with diffusers, errors, no torch."""
import io
import json
import os
import struct
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

from conftest import assert_one_line_error, make_image, recrc, run_cli
from sdc_runtime import (
    SdcCodec, SdcError, SdcInputError, SdcModelError, SdcProviderError, sdc_info, unpack_latent,
)
from sdc_runtime.neural import ddim_step, denoise_timesteps, step_noise


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


def test_u8_mode_holds_the_8bit_latent_exactly(codec):
    from sdc_runtime import latent

    image = make_image(40, 24)
    pixels, _ = __import__("sdc_runtime.image", fromlist=["to_array"]).to_array(image, 8, (-1.0, 1.0))
    raw = codec.stages.encode(pixels)[0]
    _, levels = unpack_latent(codec.encode(image, mode="u8"))
    m = codec.manifest
    np.testing.assert_array_equal(levels, latent.quantize_u8(raw, m.quant_scale, m.quant_zero))


def test_u8_step_on_the_sd_family(codec, tmp_path):
    """A fixed-mapping (SD) set takes a coarser weighted step too: fewer bytes, same geometry,
    and the header's steps follow the manifest's channel weights."""
    image = make_image(96, 64)
    fine, coarse = codec.encode(image, mode="u8"), codec.encode(image, mode="u8", step=1.0)
    assert len(coarse) < len(fine)
    assert codec.decode(coarse).size == (96, 64)
    steps = np.array(sdc_info(coarse)["quant_scale"])
    weights = np.array(codec.manifest.channel_weights)
    assert np.argmin(steps) == np.argmax(weights)
    r = run_cli("sdc-runtime", "encode", "-", "-", "--models", codec.stages.model_dir, "--mode", "u8", "--step", "1",
                stdin=_png(image))
    assert r.returncode == 0 and sdc_info(r.stdout)["quant_scale"] == sdc_info(coarse)["quant_scale"]


def _png(image):
    buffer = io.BytesIO()
    image.save(buffer, "PNG")
    return buffer.getvalue()


def test_palette_mode_respects_colours(codec):
    data = codec.encode(make_image(96, 64), mode="palette", colors=16)
    assert sdc_info(data)["palette_size"] <= 16
    header, levels = unpack_latent(data)
    assert len(np.unique(levels.reshape(4, -1).T, axis=0)) <= 16


def test_decode_is_deterministic_and_steps_override(codec):
    data = codec.encode(make_image(48, 32))
    a, b = np.asarray(codec.decode(data)), np.asarray(codec.decode(data))
    np.testing.assert_array_equal(a, b)
    no_unet = np.asarray(codec.decode(data, steps=0))
    assert not np.array_equal(a, no_unet)


def test_fp16_set_decodes_files_of_the_fp32_set(codec, model_set_fp16):
    data = codec.encode(make_image(64, 48))
    reference = np.asarray(codec.decode(data)).astype(int)
    half = np.asarray(SdcCodec(model_set_fp16).decode(data)).astype(int)
    assert np.abs(half - reference).max() <= 8
    assert np.abs(half - reference).mean() < 1.0


def test_cli_round_trip_and_info_json(model_set, tmp_path):
    src = tmp_path / "in.png"
    make_image(100, 60).save(src)
    sdc, out = tmp_path / "x.sdc", tmp_path / "out.png"
    r = run_cli("sdc-runtime", "encode", str(src), str(sdc), "--models", model_set, "--colors", "64", "--steps", "2")
    assert r.returncode == 0, r.stderr
    r = run_cli("sdc-runtime", "info", str(sdc), "--json")
    assert r.returncode == 0, r.stderr
    details = json.loads(r.stdout)
    assert details["width"] == 100 and details["height"] == 60 and details["mode"] == "palette"
    assert details["palette_size"] <= 64 and details["denoise_steps"] == 2 and details["format_version"] == 1
    assert details["total_bytes"] == os.path.getsize(sdc)
    assert set(details["sections"]) == {"palette", "indices"}
    from sdc_runtime.manifest import load_manifest
    assert details["model_fingerprint"] == load_manifest(model_set).fingerprint[:32]
    r = run_cli("sdc-runtime", "decode", str(sdc), str(out), "--models", model_set)
    assert r.returncode == 0, r.stderr
    assert Image.open(out).size == (100, 60)
    r = run_cli("sdc-runtime", "decode", str(sdc), str(tmp_path / "out.jpg"), "--models", model_set, "--steps", "0")
    assert r.returncode == 0 and Image.open(tmp_path / "out.jpg").format == "JPEG"
    r = run_cli("sdc-runtime", "info", str(sdc))
    assert b"100x60" in r.stdout and b"palette" in r.stdout


def test_cli_verify_checks_the_model_set(model_set, tmp_path):
    import shutil

    r = run_cli("sdc-runtime", "verify", "--models", model_set)
    assert r.returncode == 0 and b"files match the manifest" in r.stdout
    copy = tmp_path / "set"
    shutil.copytree(model_set, copy)
    with open(copy / "unet.onnx", "r+b") as fh:
        fh.seek(100)
        byte = fh.read(1)[0]
        fh.seek(100)
        fh.write(bytes([byte ^ 0xFF]))
    assert_one_line_error(run_cli("sdc-runtime", "verify", "--models", str(copy)), "unet.onnx does not match")
    (copy / "unet.onnx").unlink()
    assert_one_line_error(run_cli("sdc-runtime", "verify", "--models", str(copy)), "file missing: unet.onnx")


def test_cli_stdin_and_stdout(model_set, tmp_path):
    buffer = io.BytesIO()
    make_image(30, 20).save(buffer, "PNG")
    enc = run_cli("sdc-runtime", "encode", "-", "-", "--models", model_set, stdin=buffer.getvalue())
    assert enc.returncode == 0, enc.stderr
    assert enc.stdout[:4] == b"\x89SDC"
    dec = run_cli("sdc-runtime", "decode", "-", "-", "--models", model_set, stdin=enc.stdout)
    assert dec.returncode == 0, dec.stderr
    assert Image.open(io.BytesIO(dec.stdout)).size == (30, 20)


# --- parity with diffusers / PyTorch ---

def test_numpy_ddim_step_equals_diffusers():
    import torch
    from diffusers import DDIMScheduler

    from sdc_export.modelset import scheduler_constants
    from sdc_export.tiny import SD15_SCHEDULER

    rng = np.random.default_rng(0)
    for prediction in ("epsilon", "v_prediction"):
        config = dict(SD15_SCHEDULER, prediction_type=prediction)
        reference = DDIMScheduler.from_config(config)
        reference.set_timesteps(1000 // 15)
        constants = scheduler_constants(config)
        for eta in (0.0, 0.9):
            for t in (30, 15, 0, 975):
                sample = rng.normal(0, 1, (1, 4, 6, 5)).astype(np.float32)
                output = rng.normal(0, 1, (1, 4, 6, 5)).astype(np.float32)
                noise = rng.normal(0, 1, (1, 4, 6, 5)).astype(np.float32)
                expected = reference.step(torch.from_numpy(output), t, torch.from_numpy(sample), eta=eta,
                                          variance_noise=torch.from_numpy(noise)).prev_sample.numpy()
                ours = ddim_step(output, t, t - 15, sample, constants, eta=eta, noise=noise)
                np.testing.assert_allclose(ours, expected, atol=1e-5, rtol=0)


def torch_reference_decode(sd_dir, data, steps=None):
    """The same algorithm in diffusers/PyTorch: dequantize, DDIMScheduler steps with the
    torch UNet and the text encoder's "" embedding, AutoencoderKL.decode."""
    import torch
    import torch.nn.functional as F
    from diffusers import AutoencoderKL, DDIMScheduler, UNet2DConditionModel
    from transformers import CLIPTextModel, CLIPTokenizer

    header, levels = unpack_latent(data)  # the exact bitstream layer is shared
    steps = header.denoise_steps if steps is None else steps
    scale = np.array(header.quant_scale, np.float64)[:, None, None]
    zero = np.array(header.quant_zero, np.float64)[:, None, None]
    raw = torch.from_numpy(((levels - zero) * scale).astype(np.float32))[None]
    vae = AutoencoderKL.from_pretrained(sd_dir, subfolder="vae").eval()
    unet = UNet2DConditionModel.from_pretrained(sd_dir, subfolder="unet").eval()
    tokenizer = CLIPTokenizer.from_pretrained(sd_dir, subfolder="tokenizer")
    text = CLIPTextModel.from_pretrained(sd_dir, subfolder="text_encoder").eval()
    scheduler = DDIMScheduler.from_pretrained(sd_dir, subfolder="scheduler")
    scheduler.set_timesteps(scheduler.config.num_train_timesteps // header.step_stride)
    ids = tokenizer([""], padding="max_length", max_length=tokenizer.model_max_length, return_tensors="pt").input_ids
    with torch.no_grad():
        context = text(ids)[0]
        h, w = raw.shape[2:]
        multiple = 2 ** (len(unet.config.block_out_channels) - 1)
        sample = F.pad(raw, (0, -w % multiple, 0, -h % multiple), mode="replicate") * vae.config.scaling_factor
        noises = step_noise(header.seed, tuple(sample.shape), steps)
        for t, noise in zip(denoise_timesteps(steps, header.step_stride), noises):
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
    ours = np.asarray(codec.decode(data, steps=steps)).astype(int)
    reference = torch_reference_decode(tiny_sd, data, steps).astype(int)
    assert ours.shape == reference.shape
    assert np.abs(ours - reference).max() <= 2
    assert np.abs(ours - reference).mean() < 0.05


# --- errors: the API raises the codec's own types, the CLI prints one line ---

def test_decode_with_the_wrong_model_set(codec, other_model_set, tmp_path):
    data = codec.encode(make_image(32, 32))
    other = SdcCodec(other_model_set)
    with pytest.raises(SdcModelError, match=f"fingerprint {codec.fingerprint.hex()}"):
        other.decode(data)
    path = tmp_path / "x.sdc"
    path.write_bytes(data)
    r = run_cli("sdc-runtime", "decode", str(path), str(tmp_path / "o.png"), "--models", other_model_set)
    assert_one_line_error(r, codec.fingerprint.hex())
    assert not (tmp_path / "o.png").exists()


@pytest.fixture(scope="module")
def good_file(codec, tmp_path_factory):
    data = codec.encode(make_image(40, 30), mode="u8")
    path = tmp_path_factory.mktemp("f") / "good.sdc"
    path.write_bytes(data)
    return data


@pytest.mark.parametrize("case,needle", [
    ("magic", "wrong magic"), ("version", "version 7"), ("truncated", "truncated"),
    ("crc", "CRC32 mismatch"), ("section", "the header implies"), ("pixels", "over the limit of 100"),
    ("empty", "wrong magic"),
])
def test_cli_and_api_reject_bad_files(codec, model_set, good_file, tmp_path, case, needle):
    data = bytearray(good_file)
    args = []
    if case == "magic":
        data[:4] = b"RIFF"
    elif case == "version":
        struct.pack_into("<H", data, 8, 7)
    elif case == "truncated":
        data = data[: len(data) // 2]
    elif case == "crc":
        data[-10] ^= 1
    elif case == "section":
        table = 58 + 4 * 8 + 1
        struct.pack_into("<I", data, table + 2, struct.unpack_from("<I", data, table + 2)[0] - 1)
        data = bytearray(recrc(bytes(data)))
    elif case == "pixels":
        args = ["--max-pixels", "100"]
    elif case == "empty":
        data = b""
    path = tmp_path / "bad.sdc"
    path.write_bytes(bytes(data))
    for command in (["info", str(path)], ["decode", str(path), str(tmp_path / "o.png"), "--models", model_set]):
        assert_one_line_error(run_cli("sdc-runtime", *command, *args), needle)
    assert not (tmp_path / "o.png").exists()
    limited = SdcCodec(model_set, max_pixels=100) if case == "pixels" else codec
    with pytest.raises(SdcError, match=needle.replace("(", "\\(")):
        limited.decode(bytes(data))


def test_cli_rejects_bad_options_and_inputs(model_set, tmp_path):
    src = tmp_path / "in.png"
    make_image(20, 20).save(src)
    assert_one_line_error(run_cli("sdc-runtime", "encode", str(tmp_path / "nope.png"), str(tmp_path / "x.sdc"),
                            "--models", model_set), "cannot read the input image")
    (tmp_path / "text.png").write_text("not an image")
    assert_one_line_error(run_cli("sdc-runtime", "encode", str(tmp_path / "text.png"), str(tmp_path / "x.sdc"),
                            "--models", model_set), "cannot read the input image")
    assert_one_line_error(run_cli("sdc-runtime", "encode", str(src), str(tmp_path / "x.sdc"), "--models",
                            str(tmp_path)), "not a model set")
    assert_one_line_error(run_cli("sdc-runtime", "encode", str(src), str(tmp_path / "x.sdc"), "--models", model_set,
                            "--colors", "1"), "2..4096")
    assert_one_line_error(run_cli("sdc-runtime", "encode", str(src), str(tmp_path / "x.sdc"), "--models", model_set,
                            "--provider", "cuda"), "onnxruntime-gpu")
    assert_one_line_error(run_cli("sdc-runtime", "encode", str(src), str(tmp_path / "x.sdc"), "--models", model_set,
                            "--mode", "jpeg"), "invalid choice")
    good = tmp_path / "g.sdc"
    assert run_cli("sdc-runtime", "encode", str(src), str(good), "--models", model_set).returncode == 0
    assert_one_line_error(run_cli("sdc-runtime", "decode", str(good), str(tmp_path / "o.xyz"), "--models", model_set),
                    "extension")
    assert_one_line_error(run_cli("sdc-runtime", "decode", str(good), str(tmp_path / "no" / "o.png"), "--models",
                            model_set), "cannot write")


def test_oversized_input_image_is_refused_before_decoding(model_set, tmp_path, monkeypatch):
    """The pixel limit is checked on the PNG header: the pixels are never decoded."""
    from sdc_runtime import codec as codec_module

    big = tmp_path / "big.png"
    Image.new("RGB", (3000, 2000)).save(big)
    loads = []
    monkeypatch.setattr(Image.Image, "load", lambda self: loads.append(1))
    with pytest.raises(SdcInputError, match="3000x2000 is over the pixel limit of 1000000"):
        codec_module.load_image(str(big), max_pixels=1_000_000)
    assert loads == []
    monkeypatch.undo()
    assert_one_line_error(run_cli("sdc-runtime", "encode", str(big), str(tmp_path / "x.sdc"), "--models", model_set,
                            "--max-pixels", "1000000"), "over the pixel limit")
    assert not (tmp_path / "x.sdc").exists()


def test_api_rejects_bad_options(codec):
    with pytest.raises(SdcInputError):
        codec.encode(make_image(8, 8), mode="jpeg")
    with pytest.raises(SdcInputError):
        codec.encode(make_image(8, 8), colors=5000)
    with pytest.raises(SdcInputError):
        codec.encode("not an image")
    with pytest.raises(SdcInputError, match="pixel limit"):
        SdcCodec(codec.stages.model_dir, max_pixels=10).encode(make_image(8, 8))
    with pytest.raises(SdcProviderError, match="unknown provider"):
        SdcCodec(codec.stages.model_dir, provider="tpu")


def test_output_is_not_left_half_written(codec, tmp_path):
    """A failing decode leaves an existing output file untouched and no temporary files."""
    target = tmp_path / "o.png"
    target.write_bytes(b"previous")
    with pytest.raises(SdcError):
        codec.decode_file(_write(tmp_path / "bad.sdc", b"\x89SDC\r\n\x1a\nxx"), target)
    assert target.read_bytes() == b"previous"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bad.sdc", "o.png"]


def _write(path, data):
    path.write_bytes(data)
    return path


# --- the runtime never imports torch ---

def test_decode_runs_with_torch_unimportable(model_set, codec, tmp_path):
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


def test_outputs_get_ordinary_permissions(codec, model_set, tmp_path):
    """Files written through a temporary file still get the umask's mode, not mkstemp's 0600."""
    umask = os.umask(0o022)
    try:
        make_image(16, 16).save(tmp_path / "in.png")
        codec.encode_file(tmp_path / "in.png", tmp_path / "x.sdc")
        codec.decode_file(tmp_path / "x.sdc", tmp_path / "o.png")
    finally:
        os.umask(umask)
    assert (tmp_path / "x.sdc").stat().st_mode & 0o777 == 0o644
    assert (tmp_path / "o.png").stat().st_mode & 0o777 == 0o644
    assert os.stat(model_set).st_mode & 0o755 == 0o755
    for name in os.listdir(model_set):
        assert os.stat(os.path.join(model_set, name)).st_mode & 0o644 == 0o644


@pytest.mark.parametrize("tool,blocked,needle", [
    ("sdc_export.cli", "torch", "needs the export extra (missing: torch)"),
    ("sdc_bench.cli", "imagequant", "needs the bench extra (missing: imagequant)"),
])
def test_tools_without_their_extra_fail_in_one_line(tool, blocked, needle):
    script = f"""
import sys
sys.modules[{blocked!r}] = None
from {tool} import main
args = ["rd", "--models", "x", "--images", "y"] if "bench" in {tool!r} else ["--model", "x", "--out", "y"]
sys.exit(main(args))
"""
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, timeout=120)
    assert_one_line_error(result, needle)
