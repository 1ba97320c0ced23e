"""The checkpoint families sdc-export takes, each a tiny random folder written by diffusers' own
classes and loaded back through the real loaders: SD 2.x (v-prediction), SDXL, VAEs alone (an
SD3-style 16-channel VAE with a shift, a standalone VAE folder, FLUX.2's), tiny decoders paired
with their VAE, shared latent spaces, and the folders it refuses."""
import json
import os

import numpy as np
import onnxruntime as ort
import pytest
import torch
from helpers import assert_one_line_error, make_image, run_cli

from sdc_runtime import SdcCodec, SdcInputError
from sdc_runtime.bitstream import sdc_decode
from sdc_runtime.manifest import load_manifest
from sdc_runtime.neural import denoise_timesteps, step_noise

pytest.importorskip("diffusers", reason="builds checkpoints with diffusers (the export extra)")


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    from sdc_export.tiny import make_random_sd, make_random_sdxl, make_random_vae

    root = tmp_path_factory.mktemp("families")
    return {
        "sdxl": make_random_sdxl(str(root / "sdxl")),
        "sd2-v": make_random_sd(str(root / "sd2-v"), prediction_type="v_prediction", seed=3),
        "vae16": make_random_vae(str(root / "vae16"), channels=16, scaling_factor=1.5305, shift_factor=0.0609),
        "standalone": make_random_vae(str(root / "standalone"), channels=4, scaling_factor=0.13025,
                                      shift_factor=None, layout="root"),
        "flux2": make_random_vae(str(root / "flux2"), channels=32, flux2=True),
    }


def _export_cli(*args: str):
    """sdc-export in this process, its imports warm: the exit code and stderr as a process
    would give them (one process in this file checks the real thing)."""
    import contextlib
    import io
    import subprocess

    from sdc_export.cli import main

    err = io.StringIO()
    with contextlib.redirect_stderr(err):
        code = main(list(args))
    return subprocess.CompletedProcess(["sdc-export", *args], code, b"", err.getvalue().encode())


def _export(src: str, out: str, *extra: str) -> str:
    from sdc_export.cli import main

    assert main(["--model", src, "--out", out, "--quiet", *extra]) == 0
    return out


@pytest.fixture(scope="module")
def sets(folders, tmp_path_factory):
    root = tmp_path_factory.mktemp("family-sets")
    return {name: _export(src, str(root / name)) for name, src in folders.items()}


@pytest.fixture(scope="module")
def tae32(tmp_path_factory) -> str:
    """A random 32-channel TAESD-format pair: FLUX.2's latent space, as TAEF2's."""
    from sdc_export.tae import make_decoder, make_encoder

    folder = tmp_path_factory.mktemp("tae32")
    torch.manual_seed(0)
    torch.save(make_encoder(32, pooled=False).state_dict(), folder / "taef2_encoder.pth")
    torch.save(make_decoder(32, pooled=False).state_dict(), folder / "taef2_decoder.pth")
    return str(folder)


EXPECTED = {  # architecture, channels, denoiser, autoencoder class, scaling, shift
    "sdxl": ("sdxl", 4, "unet (epsilon)", "AutoencoderKL", 0.13025, 0.0),
    "sd2-v": ("sd", 4, "unet (v_prediction)", "AutoencoderKL", 0.18215, 0.0),
    "vae16": ("vae", 16, "none", "AutoencoderKL", 1.5305, 0.0609),
    "standalone": ("vae", 4, "none", "AutoencoderKL", 0.13025, 0.0),
    "flux2": ("vae", 32, "none", "AutoencoderKLFlux2", 1.0, 0.0),
}


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_each_family_exports_encodes_and_decodes_from_the_cli(name, sets, tmp_path, capsys):
    from sdc_runtime.cli import main

    architecture, channels, denoiser, vae_class, scaling, shift = EXPECTED[name]
    model_dir = sets[name]
    manifest = load_manifest(model_dir)
    assert (manifest.architecture, manifest.latent_channels, manifest.denoiser) == (architecture, channels, denoiser)
    assert main(["info", model_dir, "--json"]) == 0
    details = json.loads(capsys.readouterr().out)
    assert (details["architecture"], details["autoencoder"], details["denoiser"]) == (architecture, vae_class, denoiser)
    assert details["scaling_factor"] == pytest.approx(scaling) and details["shift_factor"] == pytest.approx(shift)
    assert main(["info", model_dir]) == 0
    text = capsys.readouterr().out
    assert f"{channels} latent channels" in text and f"denoiser {denoiser}" in text
    make_image(72, 48).save(tmp_path / "in.png")
    for args in (("encode", str(tmp_path / "in.png"), str(tmp_path / "x.sdc")),
                 ("decode", str(tmp_path / "x.sdc"), str(tmp_path / "out.png"))):
        result = run_cli("sdc-runtime", *args, "--models", model_dir)
        assert result.returncode == 0 and b"Traceback" not in result.stderr, result.stderr.decode()
    from PIL import Image

    assert Image.open(tmp_path / "out.png").size == (72, 48)


# --- SDXL and SD 2.x: the UNet's conditioning and prediction type, against diffusers ---

def _sdxl_pipe(src):
    from diffusers import StableDiffusionXLPipeline

    return StableDiffusionXLPipeline.from_pretrained(src).to(torch.float32)


def test_the_sdxl_unet_graph_is_the_pipelines_conditioning_at_any_size(folders, sets):
    """The baked "" conditioning and the size conditioning read off the latent, at a size the
    export never saw, against the UNet called as StableDiffusionXLPipeline calls it."""
    pipe = _sdxl_pipe(folders["sdxl"])
    embeds, _, pooled, _ = pipe.encode_prompt("", device="cpu", do_classifier_free_guidance=False)
    session = ort.InferenceSession(os.path.join(sets["sdxl"], "unet.onnx"), providers=["CPUExecutionProvider"])
    for h, w in ((8, 12), (16, 6)):
        sample = torch.randn(1, 4, h, w, generator=torch.Generator().manual_seed(h))
        time_ids = pipe._get_add_time_ids((h * 8, w * 8), (0, 0), (h * 8, w * 8), torch.float32,
                                          text_encoder_projection_dim=pipe.text_encoder_2.config.projection_dim)
        with torch.no_grad():
            expected = pipe.unet(sample, torch.tensor([15.0]), encoder_hidden_states=embeds,
                                 added_cond_kwargs={"text_embeds": pooled, "time_ids": time_ids}).sample.numpy()
        actual = session.run(None, {"sample": sample.numpy(), "timestep": np.array([15.0], np.float32)})[0]
        np.testing.assert_allclose(actual, expected, atol=1e-4, rtol=1e-3)
    # The size matters: another size's conditioning gives another prediction.
    other = pipe._get_add_time_ids((512, 512), (0, 0), (512, 512), torch.float32,
                                   text_encoder_projection_dim=pipe.text_encoder_2.config.projection_dim)
    with torch.no_grad():
        elsewhere = pipe.unet(sample, torch.tensor([15.0]), encoder_hidden_states=embeds,
                              added_cond_kwargs={"text_embeds": pooled, "time_ids": other}).sample.numpy()
    assert np.abs(elsewhere - expected).max() > 1e-3


def _reference_decode(src: str, data: bytes, sdxl: bool) -> np.ndarray:
    """The codec's decode in diffusers/PyTorch: dequantize, DDIMScheduler steps (the folder's
    own prediction type) with the UNet conditioned as the pipeline conditions it, VAE decode."""
    from diffusers import AutoencoderKL, DDIMScheduler, StableDiffusionPipeline

    header, levels = sdc_decode(data)
    scale = np.array(header.quant_scale, np.float64)[:, None, None]
    zero = np.array(header.quant_zero, np.float64)[:, None, None]
    raw = torch.from_numpy(((levels - zero) * scale).astype(np.float32))[None]
    pipe = _sdxl_pipe(src) if sdxl else StableDiffusionPipeline.from_pretrained(src, safety_checker=None)
    vae: AutoencoderKL = pipe.vae
    scheduler = DDIMScheduler.from_pretrained(src, subfolder="scheduler")
    scheduler.set_timesteps(scheduler.config.num_train_timesteps // header.denoise_stride)
    with torch.no_grad():
        h, w = raw.shape[2:]
        sample = raw * vae.config.scaling_factor
        if sdxl:
            embeds, _, pooled, _ = pipe.encode_prompt("", device="cpu", do_classifier_free_guidance=False)
            time_ids = pipe._get_add_time_ids((h * 8, w * 8), (0, 0), (h * 8, w * 8), torch.float32,
                                              text_encoder_projection_dim=pipe.text_encoder_2.config.projection_dim)
            extra = {"added_cond_kwargs": {"text_embeds": pooled, "time_ids": time_ids}}
        else:
            embeds = pipe.encode_prompt("", "cpu", 1, False)[0]
            extra = {}
        noises = step_noise(header.seed, tuple(sample.shape), header.denoise_steps)
        for t, noise in zip(denoise_timesteps(header.denoise_steps, header.denoise_stride), noises):
            prediction = pipe.unet(sample, t, encoder_hidden_states=embeds, **extra).sample
            sample = scheduler.step(prediction, t, sample, eta=header.eta,
                                    variance_noise=torch.from_numpy(noise)).prev_sample
        image = vae.decode(sample / vae.config.scaling_factor).sample
    unit = ((image[0].permute(1, 2, 0).numpy() + 1) / 2)[: header.height, : header.width]
    return np.rint(np.clip(unit, 0, 1) * 255).astype(int)


@pytest.mark.parametrize("name", ["sdxl", "sd2-v"])
def test_denoising_decodes_as_the_diffusers_pipeline_does(name, folders, sets):
    """SDXL (text_time conditioning) and SD 2.x (v-prediction): the runtime's numpy DDIM loop
    against diffusers' DDIMScheduler and UNet; and the UNet steps change the image."""
    codec = SdcCodec(sets[name])
    data = codec.encode(make_image(96, 80, seed=2), mode="u8", denoise_steps=2, denoise_stride=20)
    ours = np.asarray(codec.decode(data)).astype(int)
    reference = _reference_decode(folders[name], data, sdxl=name == "sdxl")
    assert ours.shape == reference.shape
    assert np.abs(ours - reference).max() <= 2 and np.abs(ours - reference).mean() < 0.05
    without = np.asarray(codec.decode(data, denoise_steps=0)).astype(int)
    assert np.abs(ours - without).mean() > 1.0


# --- VAEs alone ---

def test_a_vae_set_holds_latents_in_the_diffusion_models_units(folders, sets):
    """Encoder: (mean - shift) * scaling; decoder: the inverse, then the VAE's decode."""
    from diffusers import AutoencoderKL

    vae = AutoencoderKL.from_pretrained(folders["vae16"], subfolder="vae").eval()
    rng = np.random.default_rng(0)
    image = rng.uniform(-1, 1, (1, 3, 48, 80)).astype(np.float32)
    latent = rng.normal(0, 1, (1, 16, 5, 7)).astype(np.float32)
    with torch.no_grad():
        expected_latent = ((vae.encode(torch.from_numpy(image)).latent_dist.mean - 0.0609) * 1.5305).numpy()
        expected_image = vae.decode(torch.from_numpy(latent) / 1.5305 + 0.0609).sample.numpy()
    run = {role: ort.InferenceSession(os.path.join(sets["vae16"], f"{role}.onnx"), providers=["CPUExecutionProvider"])
           for role in ("vae_encoder", "vae_decoder")}
    np.testing.assert_allclose(run["vae_encoder"].run(None, {"image": image})[0], expected_latent, atol=1e-4)
    np.testing.assert_allclose(run["vae_decoder"].run(None, {"latent": latent})[0], expected_image, atol=1e-4)
    manifest = load_manifest(sets["vae16"])
    assert "unet" not in manifest.graphs and manifest.scheduler is None and manifest.defaults.denoise_steps == 0
    assert manifest.source["shift_factor"] == pytest.approx(0.0609) and manifest.scaling_factor == 1.0


def test_a_vae_set_ships_the_decoder_gradient_on_request_and_descends_with_it(folders, tmp_path):
    """--decoder-gradient: the graph is torch's autograd of the set's decoder (in the set's
    units, at a size the export never saw), and efforts from 1 descend with it."""
    from diffusers import AutoencoderKL

    from sdc_export.graphs import VaeDecoder
    from sdc_runtime.image import psnr

    model_dir = _export(folders["vae16"], str(tmp_path / "set"), "--decoder-gradient")
    assert "decoder_gradient" in load_manifest(model_dir).graphs
    vae = AutoencoderKL.from_pretrained(folders["vae16"], subfolder="vae").eval()
    rng = np.random.default_rng(0)
    latent = rng.normal(0, 1, (1, 16, 5, 7)).astype(np.float32)
    image = rng.uniform(-1, 1, (1, 3, 40, 56)).astype(np.float32)
    weight = np.ones((1, 1, 40, 56), np.float32)
    z = torch.from_numpy(latent).requires_grad_()
    error = ((VaeDecoder(vae, 1.5305, 0.0609)(z).clamp(-1, 1) - torch.from_numpy(image)) ** 2).sum()
    error.backward()
    session = ort.InferenceSession(os.path.join(model_dir, "decoder_gradient.onnx"), providers=["CPUExecutionProvider"])
    gradient, graph_error = session.run(None, {"latent": latent, "image": image, "weight": weight})
    assert float(graph_error[0]) == pytest.approx(float(error), rel=1e-4)
    assert np.abs(gradient - z.grad.numpy()).max() <= 1e-3 * np.abs(z.grad.numpy()).max()
    codec = SdcCodec(model_dir)
    picture = make_image(64, 48, seed=4)
    assert codec.stages.has_gradient(48, 64)
    plain, descended = (codec.encode(picture, effort=effort) for effort in (0, 2))
    assert descended != plain
    assert psnr(np.asarray(picture), np.asarray(codec.decode(descended))) >= psnr(np.asarray(picture),
                                                                                np.asarray(codec.decode(plain)))


def test_a_vae_set_refuses_denoising_steps(sets, tmp_path):
    codec = SdcCodec(sets["vae16"])
    with pytest.raises(SdcInputError, match="no UNet"):
        codec.encode(make_image(32, 32), denoise_steps=2)
    make_image(32, 32).save(tmp_path / "in.png")
    result = run_cli("sdc-runtime", "encode", str(tmp_path / "in.png"), str(tmp_path / "x.sdc"), "--models",
                     sets["vae16"], "--denoise-steps", "2")
    assert_one_line_error(result, "no UNet")
    assert result.returncode == 2


def test_a_vae_config_without_a_scaling_factor_asks_for_one(tmp_path):
    from sdc_export.tiny import make_random_vae

    src = make_random_vae(str(tmp_path / "old-vae"), channels=4, scaling_factor=None, shift_factor=None, layout="root")
    result = _export_cli("--model", src, "--out", str(tmp_path / "o"), "--quiet")
    assert_one_line_error(result, "--scaling-factor")
    assert not os.path.exists(tmp_path / "o")
    _export(src, str(tmp_path / "o"), "--scaling-factor", "0.18215")
    assert load_manifest(str(tmp_path / "o")).source["scaling_factor"] == pytest.approx(0.18215)


# --- tiny decoders and shared latent spaces ---

def test_a_tiny_decoder_of_the_same_latent_space_ships_with_its_agreement(folders, tae32, tmp_path, capsys):
    out = _export(folders["flux2"], str(tmp_path / "flux2-tiny"), "--tiny-decoder", tae32)
    printed = capsys.readouterr().out
    assert "tiny_decoder agrees with vae_decoder to" in printed and "dB PSNR" in printed
    manifest = load_manifest(out)
    assert manifest.graphs["tiny_decoder"].image_range == (0.0, 1.0)
    codec = SdcCodec(out)
    data = codec.encode(make_image(48, 40))
    assert codec.decode(data, decoder="tiny_decoder").size == (48, 40)


def test_a_tiny_decoder_of_another_latent_space_is_refused(folders, taesd_random, tmp_path):
    result = _export_cli("--model", folders["vae16"], "--out", str(tmp_path / "o"), "--tiny-decoder",
                         taesd_random, "--quiet")
    assert_one_line_error(result, "takes 4 latent channels; this VAE's latent space has 16")


def test_a_tae_pair_joins_a_vae_sets_latent_space(sets, tae32, taesd_random, tmp_path, capsys):
    """Files of either set decode with the other: they carry the same fingerprint."""
    joined = _export(tae32, str(tmp_path / "tae-joined"), "--latent-space", sets["flux2"])
    assert "agrees with" in capsys.readouterr().out
    own = _export(tae32, str(tmp_path / "tae-own"))
    vae_set, tae_set = SdcCodec(sets["flux2"]), SdcCodec(joined)
    assert load_manifest(joined).fingerprint == load_manifest(sets["flux2"]).fingerprint
    assert load_manifest(own).fingerprint != load_manifest(sets["flux2"]).fingerprint
    image = make_image(40, 32)
    for writer, reader in ((vae_set, tae_set), (tae_set, vae_set)):
        assert reader.decode(writer.encode(image, effort=0)).size == (40, 32)
    from sdc_runtime import SdcModelError

    with pytest.raises(SdcModelError, match="fingerprint"):
        SdcCodec(own).decode(vae_set.encode(image, effort=0))
    for other, needle in ((sets["vae16"], "16 latent channels"), (sets["sdxl"], "takes a VAE-only set")):
        assert_one_line_error(_export_cli("--model", tae32, "--out", str(tmp_path / "x"), "--latent-space", other,
                                          "--quiet"), needle)


# --- what it refuses: one line naming what was found and what is supported ---

def _write(path, text):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "w") as fh:
        fh.write(text)


@pytest.mark.parametrize("layout,needle", [
    ({"config.json": '{"_class_name": "AutoencoderDC"}'}, "describes AutoencoderDC; supported autoencoders"),
    ({"vae/config.json": '{"_class_name": "AutoencoderKLWan"}'}, "describes AutoencoderKLWan"),
    ({"model_index.json": '{"_class_name": "FluxPipeline"}', "transformer/config.json": "{}"},
     "FluxPipeline folder without vae/; supported"),
    ({"transformer/config.json": '{"_class_name": "FluxTransformer2DModel"}'}, "holds no model_index.json"),
    ({"config.json": '{"_class_name": "AutoencoderKL",'}, "cannot read"),
    ({"model_index.json": '["not", "an", "object"]'}, "is not a JSON object"),
])
def test_unsupported_folders_get_one_line(layout, needle, tmp_path):
    src = tmp_path / "src"
    for name, text in layout.items():
        _write(str(src / name), text)
    args = ("--model", str(src), "--out", str(tmp_path / "o"), "--quiet")
    # One as a real process, the rest in this one.
    result = run_cli("sdc-export", *args) if "AutoencoderDC" in needle else _export_cli(*args)
    assert_one_line_error(result, needle)


def test_a_broken_vae_checkpoint_is_one_line(folders, tmp_path):
    import shutil

    src = tmp_path / "broken"
    shutil.copytree(folders["vae16"], src)
    for name in os.listdir(src / "vae"):
        if name.endswith(".safetensors"):
            (src / "vae" / name).write_bytes(b"not weights")
    assert_one_line_error(_export_cli("--model", str(src), "--out", str(tmp_path / "o"), "--quiet"), "cannot load")


def test_source_flags_are_checked_against_the_kind(folders, tae32, tmp_path):
    for model, extra, needle in ((folders["sdxl"], ("--scaling-factor", "0.1"), "apply to a VAE alone"),
                                 (folders["vae16"], ("--latent-space", tae32), "applies to a TAESD-format pair")):
        result = _export_cli("--model", model, "--out", str(tmp_path / "o"), "--quiet", *extra)
        assert_one_line_error(result, needle)
        assert result.returncode == 2
