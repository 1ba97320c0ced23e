"""sdc-export on a tiny random diffusers pipeline: files, manifest, graphs vs torch, errors."""
import json
import os

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch

from conftest import assert_one_line_error, run_cli
from sdc_runtime.manifest import load_manifest, sha256_file, verify_files


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
    result = run_cli("sdc-export", "--model", tiny_sd, "--out", str(tmp_path / "out"), "--quiet")
    assert result.returncode == 0, result.stderr
    lines = result.stdout.decode()
    for role in ("vae_encoder", "vae_decoder", "unet"):
        assert f"{role}" in lines and "max abs err" in lines
    assert lines.count(" ok") == 3


# --- bad input: one clear line on stderr, non-zero exit, no traceback ---

def test_rejects_a_folder_that_is_not_a_diffusers_pipeline(tmp_path):
    (tmp_path / "src").mkdir()
    assert_one_line_error(run_cli("sdc-export", "--model", str(tmp_path / "src"), "--out", str(tmp_path / "o"), "--quiet"),
           "not a diffusers Stable Diffusion folder")


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
               "cannot load nobody/no-such-model")
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
