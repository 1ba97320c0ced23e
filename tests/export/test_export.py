"""sdc-export: the tiny random diffusers pipeline and TAESD-format pairs -> model sets: files,
the manifest and its validation, graphs vs torch, errors."""
import json
import os
import re

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from helpers import TAEF2, assert_one_line_error, make_image, needs_shared, run_cli

from sdc_export.tae import DecoderBackward, DecoderGradient, load_tae_pair, make_decoder, make_encoder, tae_splits
from sdc_runtime import SdcCodec, SdcModelError, sdc_info
from sdc_runtime.manifest import Manifest, load_manifest, sha256_file, verify_files


def _session(model_dir, role):
    manifest = load_manifest(model_dir)
    return ort.InferenceSession(os.path.join(model_dir, manifest.graphs[role].file), providers=["CPUExecutionProvider"])


@pytest.mark.parametrize("fixture", ["model_set", "model_set_fp16"])
def test_model_set_is_complete_and_hashes_match(fixture, request):
    model_dir = request.getfixturevalue(fixture)
    manifest = load_manifest(model_dir)
    assert set(manifest.graphs) == {"vae_encoder", "vae_decoder", "unet"}
    assert set(os.listdir(model_dir)) == set(manifest.files) | {"manifest.json"}
    for name, digest in manifest.files.items():
        assert sha256_file(os.path.join(model_dir, name)) == digest
    verify_files(model_dir, manifest)
    assert manifest.latent_channels == 4 and manifest.downscale == 8 and manifest.unet_latent_multiple == 2
    assert manifest.scaling_factor == pytest.approx(0.18215)
    assert manifest.scheduler.prediction_type == "epsilon"
    assert len(manifest.scheduler.alphas_cumprod) == 1000
    precision = "fp16" if fixture.endswith("fp16") else "fp32"
    assert {g.precision for g in manifest.graphs.values()} == {precision}
    assert manifest.source["kind"] == "folder"
    # The family's encoder defaults travel in the manifest: the 2022 recipe for SD.
    defaults = json.loads(open(os.path.join(model_dir, "manifest.json")).read())["defaults"]
    table = defaults.pop("quality_table")
    assert defaults == {"mode": "palette", "colors": 256, "group_channels": 4, "dither": True,
                        "denoise_steps": 3, "denoise_stride": 15, "eta": 0.9, "quality": 40, "effort": 0}
    # ... and its quality scale, with the recipe at the default quality.
    assert [p["quality"] for p in table][0::len(table) - 1] == [1, 100]
    assert {"quality": 40, "mode": "palette", "colors": 256, "group_channels": 4, "quant_step": None} in table


def test_fingerprint_names_the_weights_not_the_precision(model_set, model_set_fp16, other_model_set):
    fp32, fp16, other = (load_manifest(d) for d in (model_set, model_set_fp16, other_model_set))
    assert fp32.fingerprint == fp16.fingerprint
    assert fp32.fingerprint != other.fingerprint


def test_corrupted_model_file_fails_verification(model_set, tmp_path):
    import shutil

    from sdc_runtime import SdcModelError

    copy = tmp_path / "set"
    shutil.copytree(model_set, copy)
    with open(copy / "vae_decoder.onnx", "ab") as fh:
        fh.write(b"\0")
    with pytest.raises(SdcModelError, match="vae_decoder.onnx does not match"):
        verify_files(copy, load_manifest(copy))


def _torch_parts(tiny_sd):
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextModel, CLIPTokenizer

    vae = AutoencoderKL.from_pretrained(tiny_sd, subfolder="vae").eval()
    unet = UNet2DConditionModel.from_pretrained(tiny_sd, subfolder="unet").eval()
    tok = CLIPTokenizer.from_pretrained(tiny_sd, subfolder="tokenizer")
    text = CLIPTextModel.from_pretrained(tiny_sd, subfolder="text_encoder").eval()
    ids = tok([""], padding="max_length", max_length=tok.model_max_length, return_tensors="pt").input_ids
    with torch.no_grad():
        embedding = text(ids)[0]
    return vae, unet, embedding


@pytest.mark.parametrize("fixture,tol", [("model_set", 1e-4), ("model_set_fp16", 3e-2)])
def test_graphs_agree_with_torch_on_a_non_square_size(fixture, tol, request, tiny_sd):
    """48x80 pixels (6x10 latent), batch 2: sizes never seen at export time."""
    model_dir = request.getfixturevalue(fixture)
    vae, unet, embedding = _torch_parts(tiny_sd)
    rng = np.random.default_rng(0)
    image = rng.uniform(-1, 1, (2, 3, 48, 80)).astype(np.float32)
    latent = rng.normal(0, 1, (2, 4, 6, 10)).astype(np.float32)
    steps = np.array([30.0, 0.0], np.float32)
    with torch.no_grad():
        expected = {
            "vae_encoder": vae.encode(torch.from_numpy(image)).latent_dist.mean.numpy(),
            "vae_decoder": vae.decode(torch.from_numpy(latent)).sample.numpy(),
            "unet": unet(torch.from_numpy(latent), torch.from_numpy(steps),
                         encoder_hidden_states=embedding.expand(2, -1, -1)).sample.numpy(),
        }
    feeds = {"vae_encoder": {"image": image}, "vae_decoder": {"latent": latent},
             "unet": {"sample": latent, "timestep": steps}}
    for role, feed in feeds.items():
        actual = _session(model_dir, role).run(None, feed)[0]
        assert actual.shape == expected[role].shape
        scale = np.abs(expected[role]).max()
        assert np.abs(actual - expected[role]).max() <= tol * max(scale, 1.0), role


def test_fp16_graphs_hold_fp16_weights(model_set, model_set_fp16):
    for role in ("vae_encoder", "vae_decoder", "unet"):
        model = onnx.load(os.path.join(model_set_fp16, f"{role}.onnx"))
        by_type = {}
        for t in model.graph.initializer:
            by_type[t.data_type] = by_type.get(t.data_type, 0) + int(np.prod(t.dims))
        fp16 = by_type.get(onnx.TensorProto.FLOAT16, 0)
        assert fp16 > 0.95 * sum(by_type.values()), (role, by_type)
        # The I/O stays fp32 so callers need not care.
        assert all(i.type.tensor_type.elem_type == onnx.TensorProto.FLOAT for i in model.graph.input)
        weight_bytes = lambda m: sum(len(t.raw_data) for t in m.graph.initializer)
        assert weight_bytes(model) < 0.55 * weight_bytes(onnx.load(os.path.join(model_set, f"{role}.onnx")))


def test_export_prints_parity(tiny_sd, tmp_path):
    """One parity line per graph: role, precision, error, tolerance, verdict (not the size table)."""
    import re

    result = run_cli("sdc-export", "--model", tiny_sd, "--out", str(tmp_path / "out"), "--quiet")
    assert result.returncode == 0, result.stderr
    parity = re.findall(r"^(\w+)\s+fp32: max abs err ([\d.e+-]+), rel [\d.e+-]+ \(tolerance ([\d.e+-]+)\) ok$",
                        result.stdout.decode(), flags=re.M)
    assert sorted(role for role, _, _ in parity) == ["unet", "vae_decoder", "vae_encoder"]
    assert all(float(err) <= float(tol) for _, err, tol in parity)


# --- bad input: one clear line on stderr, non-zero exit, no traceback ---

def test_rejects_a_folder_that_is_not_a_diffusers_pipeline(tmp_path):
    (tmp_path / "src").mkdir()
    assert_one_line_error(run_cli("sdc-export", "--model", str(tmp_path / "src"), "--out", str(tmp_path / "o"), "--quiet"),
           "holds no model_index.json, vae/config.json, config.json")


def test_rejects_a_missing_subfolder(tiny_sd, tmp_path):
    import shutil

    src = tmp_path / "src"
    shutil.copytree(tiny_sd, src)
    shutil.rmtree(src / "unet")
    assert_one_line_error(run_cli("sdc-export", "--model", str(src), "--out", str(tmp_path / "o"), "--quiet"), "unet/")


def test_rejects_a_non_empty_out_without_force(tiny_sd, tmp_path):
    out = tmp_path / "o"
    out.mkdir()
    (out / "keep.txt").write_text("precious")
    assert_one_line_error(run_cli("sdc-export", "--model", tiny_sd, "--out", str(out), "--quiet"), "--force")
    assert (out / "keep.txt").read_text() == "precious"


def test_rejects_an_unwritable_out(tiny_sd, tmp_path):
    assert_one_line_error(run_cli("sdc-export", "--model", tiny_sd, "--out", str(tmp_path / "no" / "such" / "dir"), "--quiet"),
           "does not exist")
    if os.geteuid() != 0:  # root writes anywhere
        locked = tmp_path / "locked"
        locked.mkdir(mode=0o500)
        assert_one_line_error(run_cli("sdc-export", "--model", tiny_sd, "--out", str(locked / "o"), "--quiet"), "not writable")


def test_rejects_a_hub_id_offline(tmp_path):
    env_before = os.environ.get("HF_HUB_OFFLINE")
    os.environ["HF_HUB_OFFLINE"] = "1"
    try:
        assert_one_line_error(run_cli("sdc-export", "--model", "nobody/no-such-model", "--out", str(tmp_path / "o"), "--quiet"),
               "nobody/no-such-model is not found locally (offline")
    finally:
        if env_before is None:
            del os.environ["HF_HUB_OFFLINE"]
        else:
            os.environ["HF_HUB_OFFLINE"] = env_before


def test_rejects_nonsense_source(tmp_path):
    assert_one_line_error(run_cli("sdc-export", "--model", "not a model", "--out", str(tmp_path / "o"), "--quiet"),
           "neither a folder nor a hub id")


def test_force_replaces_an_existing_set(tiny_sd, tmp_path):
    out = tmp_path / "o"
    out.mkdir()
    (out / "old.txt").write_text("x")
    assert run_cli("sdc-export", "--model", tiny_sd, "--out", str(out), "--quiet", "--force").returncode == 0
    assert not (out / "old.txt").exists()
    assert json.loads((out / "manifest.json").read_text())["family"] == "sd"


# --- the manifest: one schema, validated on load ---

def _manifest_json(model_set):
    return json.loads(open(os.path.join(model_set, "manifest.json")).read())


@pytest.mark.parametrize("change,needle", [
    (lambda d: d.update(family="gan"), "unknown family"),
    (lambda d: d.update(latent_channels=0), "latent_channels"),
    (lambda d: d.update(downscale=3), "downscale"),
    (lambda d: d.update(quant_scale=[1.0]), "one entry per latent channel"),
    (lambda d: d.update(quant_scale=[1.0, 1.0, -1.0, 1.0]), "positive"),
    (lambda d: d["graphs"].pop("vae_decoder"), "'vae_decoder' missing"),
    (lambda d: d["graphs"].update(upscaler=d["graphs"]["unet"]), "unknown graph role"),
    (lambda d: d["graphs"]["unet"].update(precision="int4"), "unknown precision"),
    (lambda d: d["graphs"]["unet"].update(file="../unet.onnx"), "not listed in files"),
    (lambda d: d.update(scheduler=None), "needs scheduler constants"),
    (lambda d: d["scheduler"].update(alphas_cumprod=[0.5]), "alphas_cumprod"),
    (lambda d: d.update(channel_weights=[1.0, 0.0, 1.0, 1.0]), "channel_weights"),
    (lambda d: d.update(unet_latent_multiple=0), "unet_latent_multiple"),
    (lambda d: d["graphs"]["unet"].update(float_nodes={"/conv_in/Conv": 1.0}), "in int8 graphs only"),
    (lambda d: d["graphs"]["unet"].update(wide_nodes={"/conv_in/Conv": 1.0}), "wide_nodes map node names"),
    (lambda d: d["graphs"]["unet"].update(precision="int8", wide_nodes=["/conv_in/Conv"]), "wide_nodes map"),
    (lambda d: d["graphs"]["unet"].update(weight_bits=7), "weight_bits is 7 or 8, in int8 graphs only"),
    (lambda d: d["graphs"]["unet"].update(precision="int8", weight_bits=4), "weight_bits is 7 or 8"),
    (lambda d: d["defaults"].update(colors=9999), "defaults: colors"),
    (lambda d: d["defaults"].update(group_channels=3), "defaults: group_channels"),
    (lambda d: d["defaults"].update(denoise_stride=999), "defaults: 3 denoising steps at stride 999"),
    (lambda d: d["defaults"].pop("eta"), "eta"),
    (lambda d: d.update(format_version=5), "unsupported manifest format_version 5"),
    (lambda d: d.pop("files"), "files"),
])
def test_manifest_validation_rejects(model_set, change, needle):
    data = _manifest_json(model_set)
    change(data)
    with pytest.raises(SdcModelError, match=re.escape(needle)):
        Manifest.from_json(json.dumps(data))


def test_a_manifest_from_before_defaults_asks_for_a_re_export(model_set, tmp_path):
    import shutil

    copy = tmp_path / "old"
    shutil.copytree(model_set, copy)
    data = _manifest_json(model_set)
    data["format_version"] = 1
    del data["defaults"]
    (copy / "manifest.json").write_text(json.dumps(data))
    with pytest.raises(SdcModelError, match="re-export it with sdc-export"):
        SdcCodec(str(copy))
    make_image(16, 16).save(tmp_path / "in.png")
    r = run_cli("sdc-runtime", "encode", str(tmp_path / "in.png"), str(tmp_path / "x.sdc"), "--models", str(copy))
    assert_one_line_error(r, "re-export")


def test_a_set_without_unet_may_not_default_to_denoising(tae_set):
    data = _manifest_json(tae_set)
    data["defaults"]["denoise_steps"] = 3
    with pytest.raises(SdcModelError, match="defaults: this model set has no UNet"):
        Manifest.from_json(json.dumps(data))


# --- TAESD-format pairs ---

def test_variant_and_channels_come_from_the_state_dict(taesd_random, tmp_path):
    _, _, channels, variant = load_tae_pair(taesd_random)
    assert (channels, variant) == (4, "taesd")
    # The same weights under TAEF2-looking names are still plain TAESD: names do not decide.
    renamed = tmp_path / "named"
    renamed.mkdir()
    for part in ("encoder", "decoder"):
        os.link(os.path.join(taesd_random, f"taesd_{part}.pth"), renamed / f"taef2_{part}.pth")
    assert load_tae_pair(str(renamed))[3] == "taesd"


@needs_shared
def test_taef2_is_detected_and_loads_strictly():
    _, _, channels, variant = load_tae_pair(TAEF2)
    assert (channels, variant) == (32, "taef2")


def test_tae_pair_errors_are_one_line(tmp_path):
    bad = tmp_path / "bad"
    bad.mkdir()
    torch.save({"0.weight": torch.zeros(3)}, bad / "x_encoder.pth")
    torch.save(make_decoder(4, pooled=False).state_dict(), bad / "x_decoder.pth")
    result = run_cli("sdc-export", "--model", str(bad), "--out", str(tmp_path / "o"), "--quiet")
    assert_one_line_error(result, "TAESD encoder layout")
    assert result.returncode == 1
    (bad / "y_decoder.pth").write_bytes(b"junk")
    result = run_cli("sdc-export", "--model", str(bad), "--out", str(tmp_path / "o"), "--quiet")
    assert_one_line_error(result, "exactly one")


def test_tae_export_and_round_trip(tae_set):
    manifest = load_manifest(tae_set)
    assert manifest.family == "tae" and manifest.scaling_factor == 1.0 and "unet" not in manifest.graphs
    assert manifest.graphs["vae_encoder"].image_range == (0.0, 1.0) and manifest.quant_adaptive
    assert manifest.defaults.dither is False and manifest.defaults.denoise_steps == 0
    codec = SdcCodec(tae_set)
    data = codec.encode(make_image(50, 30))
    assert sdc_info(data)["denoise_steps"] == 0
    assert codec.decode(data).size == (50, 30)


def test_sd_export_with_a_tiny_decoder(tiny_sd, taesd_random, tmp_path):
    """--tiny-decoder ships a TAESD decoder fed with raw latents (scaled inside the graph)."""
    from sdc_export.cli import main
    from sdc_export.tae import load_tae_decoder

    out = str(tmp_path / "set")
    assert main(["--model", tiny_sd, "--out", out, "--quiet", "--tiny-decoder", taesd_random]) == 0
    manifest = load_manifest(out)
    assert manifest.graphs["tiny_decoder"].image_range == (0.0, 1.0)
    from sdc_export.plan import SD_ROLES
    assert set(manifest.graphs) == set(SD_ROLES + ("tiny_decoder",))  # what the early role check knows
    decoder, _ = load_tae_decoder(taesd_random)
    latent = np.random.default_rng(0).normal(0, 3, (1, 4, 6, 10)).astype(np.float32)
    session = ort.InferenceSession(os.path.join(out, "tiny_decoder.onnx"), providers=["CPUExecutionProvider"])
    with torch.no_grad():
        expected = decoder(torch.from_numpy(latent) * manifest.scaling_factor).numpy()
    np.testing.assert_allclose(session.run(None, {"latent": latent})[0], expected, atol=1e-4)
    codec = SdcCodec(out)
    data = codec.encode(make_image(40, 24))
    assert codec.decode(data, decoder="tiny_decoder", denoise_steps=0).size == (40, 24)
    result = run_cli("sdc-export", "--model", taesd_random, "--out", str(tmp_path / "x"), "--tiny-decoder",
                     taesd_random, "--quiet")
    assert_one_line_error(result, "not to a TAESD-format pair")
    assert result.returncode == 2


def test_tiny_decoder_folder_needs_no_encoder(taesd_random, tmp_path):
    from sdc_export.tae import load_tae_decoder

    only = tmp_path / "decoder-only"
    only.mkdir()
    os.link(os.path.join(taesd_random, "taesd_decoder.pth"), only / "taesd_decoder.pth")
    assert load_tae_decoder(str(only))[1] == 4


def _autograd(decoder, latent: np.ndarray, image: np.ndarray, weight: np.ndarray | None = None):
    """The reference: torch's own gradient of what DecoderGradient computes, and the error."""
    z = torch.from_numpy(latent).requires_grad_(True)
    weight = torch.ones(()) if weight is None else torch.from_numpy(weight)
    error = (weight * (decoder(z).clamp(0, 1) - torch.from_numpy(image)) ** 2).sum()
    error.backward()
    return z.grad.numpy(), float(error)


@pytest.mark.parametrize("pooled", [False, True])
def test_the_decoder_gradient_is_torchs_autograd(pooled):
    """The backward pass written out layer by layer (TAESD, and TAEF2's pooled blocks with
    their GroupNorm, its weight and bias drawn at random) against torch's autograd, in float64
    so that only a wrong formula, not rounding, can part them; with per-pixel weights, and
    split as the runtime runs it in tiles: the whole part backwards, the local part's gradient."""
    torch.manual_seed(int(pooled))
    decoder = make_decoder(8, pooled).eval().double()
    for module in decoder.modules():
        if isinstance(module, torch.nn.GroupNorm):
            torch.nn.init.uniform_(module.weight, 0.5, 1.5)
            torch.nn.init.normal_(module.bias)
    rng = np.random.default_rng(0)
    latent = rng.normal(0, 2, (1, 8, 5, 7))
    image = rng.uniform(0, 1, (1, 3, 40, 56))
    weight = (rng.uniform(0, 1, (1, 1, 40, 56)) > 0.3).astype(np.float64)
    expected, expected_error = _autograd(decoder, latent, image, weight)
    with torch.no_grad():
        ours, error = DecoderGradient(decoder)(*map(torch.from_numpy, (latent, image, weight)))
    assert np.abs(ours.numpy() - expected).max() <= 1e-9 * np.abs(expected).max()
    assert float(error[0]) == pytest.approx(expected_error, rel=1e-12)
    split = tae_splits(make_encoder(8, pooled), decoder)[1] or 3
    with torch.no_grad():
        features = decoder[:split](torch.from_numpy(latent))
        local, local_error = DecoderGradient(decoder[split:])(features, *map(torch.from_numpy, (image, weight)))
        back, forward = DecoderBackward(decoder[:split])(torch.from_numpy(latent), local)
    assert torch.allclose(forward, features, rtol=0, atol=1e-12) and float(local_error[0]) == pytest.approx(expected_error, rel=1e-12)
    assert np.abs(back.numpy() - expected).max() <= 1e-9 * np.abs(expected).max()


def test_a_tae_set_ships_its_decoder_gradient_in_fp32(tae_set, taesd_random, tmp_path):
    """The graph in the set is the gradient (against autograd, at a size other than the
    parity one), it stays fp32 in an fp16 set, and it is never quantized."""
    decoder = load_tae_pair(taesd_random)[1]
    rng = np.random.default_rng(1)
    latent = rng.normal(0, 2, (1, 4, 6, 9)).astype(np.float32)
    image = rng.uniform(0, 1, (1, 3, 48, 72)).astype(np.float32)
    weight = np.ones((1, 1, 48, 72), np.float32)
    gradient, error = _session(tae_set, "decoder_gradient").run(None, {"latent": latent, "image": image,
                                                                       "weight": weight})
    expected, expected_error = _autograd(decoder, latent, image)
    assert np.abs(gradient - expected).max() <= 1e-3 * np.abs(expected).max()
    assert float(error[0]) == pytest.approx(expected_error, rel=1e-4)
    fp16 = load_manifest(_export_set(taesd_random, tmp_path / "fp16", "--fp16"))
    assert fp16.graphs["decoder_gradient"].precision == "fp32" and fp16.graphs["vae_decoder"].precision == "fp16"
    calibration = tmp_path / "calibration"
    calibration.mkdir()
    for seed in range(3):
        make_image(64, 64, seed).save(calibration / f"{seed}.png")
    result = run_cli("sdc-export", "--model", taesd_random, "--out", str(tmp_path / "x"), "--quiet",
                     "--int8", "decoder_gradient", "--calibration", str(calibration))
    assert_one_line_error(result, "decoder_gradient is always fp32")


@needs_shared
def test_taef2_graphs_agree_with_the_torch_modules(taef2_set):
    encoder, decoder, _, _ = load_tae_pair(TAEF2)
    rng = np.random.default_rng(0)
    image = rng.uniform(0, 1, (1, 3, 48, 80)).astype(np.float32)
    latent = rng.normal(0, 2, (1, 32, 6, 10)).astype(np.float32)
    for role, module, x, name in (("vae_encoder", encoder, image, "image"), ("vae_decoder", decoder, latent, "latent")):
        session = ort.InferenceSession(os.path.join(taef2_set, f"{role}.onnx"), providers=["CPUExecutionProvider"])
        with torch.no_grad():
            expected = module(torch.from_numpy(x)).numpy()
        assert np.abs(session.run(None, {name: x})[0] - expected).max() < 1e-3, role
    image = rng.uniform(0, 1, (1, 3, 48, 80)).astype(np.float32)
    gradient = _session(taef2_set, "decoder_gradient").run(
        None, {"latent": latent, "image": image, "weight": np.ones((1, 1, 48, 80), np.float32)})[0]
    expected, _ = _autograd(decoder, latent, image)
    assert np.abs(gradient - expected).max() <= 1e-3 * np.abs(expected).max()


# --- fp16 safety: a VAE decoder that overflows fp16 never yields a NaN image ---

@pytest.fixture(scope="module")
def overflowing_sd(tmp_path_factory, tiny_sd):
    """The tiny SD pipeline with its decoder's first convolution scaled by 3000: the parity
    inputs (unit normal latents) stay inside fp16, latents 30 times larger overflow it."""
    import shutil

    from diffusers import AutoencoderKL

    folder = tmp_path_factory.mktemp("overflow") / "sd"
    shutil.copytree(tiny_sd, folder)
    vae = AutoencoderKL.from_pretrained(folder / "vae")
    with torch.no_grad():
        vae.decoder.conv_in.weight *= 3000
    vae.save_pretrained(folder / "vae")
    return str(folder)


def _export_set(src, out, *extra):
    from sdc_export.cli import main

    assert main(["--model", src, "--out", str(out), "--quiet", *extra]) == 0
    return str(out)


def test_an_fp16_overflow_fails_clearly_or_falls_back_to_fp32(overflowing_sd, tmp_path):
    reference = SdcCodec(_export_set(overflowing_sd, tmp_path / "fp32"))
    latent = np.random.default_rng(0).normal(0, 30, (4, 6, 10)).astype(np.float32)
    expected = np.asarray(reference.latent_to_image(latent, (80, 48)))
    assert np.isfinite(expected).all()

    plain = SdcCodec(_export_set(overflowing_sd, tmp_path / "fp16", "--fp16"))
    assert plain.manifest.graphs["vae_decoder"].precision == "fp16"
    with pytest.raises(SdcModelError, match="non-finite.*--keep-fp32 vae_decoder"):
        plain.latent_to_image(latent, (80, 48))

    fallback = SdcCodec(_export_set(overflowing_sd, tmp_path / "fallback", "--fp16", "--fp32-fallback"))
    graph = fallback.manifest.graphs["vae_decoder"]
    assert graph.precision == "fp16" and graph.fallback == {"vae_decoder.onnx": "vae_decoder.fp32.onnx"}
    np.testing.assert_array_equal(np.asarray(fallback.latent_to_image(latent, (80, 48))), expected)
    small = latent / 30  # where fp16 does not overflow, the fp16 graph itself runs
    assert np.abs(np.asarray(fallback.latent_to_image(small, (80, 48)), float)
                  - np.asarray(reference.latent_to_image(small, (80, 48)), float)).max() <= 8

    kept = SdcCodec(_export_set(overflowing_sd, tmp_path / "kept", "--fp16", "--keep-fp32", "vae_decoder"))
    precisions = {role: g.precision for role, g in kept.manifest.graphs.items()}
    assert precisions == {"vae_encoder": "fp16", "vae_decoder": "fp32", "unet": "fp16"}
    np.testing.assert_array_equal(np.asarray(kept.latent_to_image(latent, (80, 48))), expected)
    assert kept.manifest.fingerprint == reference.manifest.fingerprint  # files cross between the sets


@pytest.mark.parametrize("extra,needle", [
    (["--keep-fp32", "vae_decoder"], "--fp16 exports only"),
    (["--fp16", "--keep-fp32", "text_encoder"], "no text_encoder graph"),
])
def test_precision_options_are_checked(tiny_sd, tmp_path, extra, needle):
    result = run_cli("sdc-export", "--model", tiny_sd, "--out", str(tmp_path / "x"), "--quiet", *extra)
    assert result.returncode == (2 if "exports only" in needle else 1)  # a usage error, or a graph the set lacks
    assert_one_line_error(result, needle)


def test_the_early_role_check_names_the_graphs_each_export_writes(model_set, tae_set):
    """sdc-export checks the graphs --int8 and --keep-fp32 name before it loads the model,
    against the plan's; the exported sets' manifests hold exactly those graphs."""
    from sdc_export.plan import SD_ROLES, TAE_ROLES
    from sdc_runtime.manifest import load_manifest

    assert set(load_manifest(model_set).graphs) == set(SD_ROLES)
    assert set(load_manifest(tae_set).graphs) == set(TAE_ROLES)
