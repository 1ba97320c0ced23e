"""The benchmark tools: metrics against scikit-image, and sdc-bench rd end to end."""
import json
import os
import shutil

import numpy as np
import pytest
from helpers import KODAK, TAEF2, assert_one_line_error, make_image, run_cli

from sdc_bench.metrics import has_st_lpips, ms_ssim, psnr, ssim
from sdc_bench.sweep import BD_METRICS


def test_psnr_and_ssim_against_scikit_image():
    from skimage.metrics import peak_signal_noise_ratio, structural_similarity

    reference = np.asarray(make_image(96, 80))
    noisy = np.clip(reference + np.random.default_rng(0).normal(0, 12, reference.shape), 0, 255).astype(np.uint8)
    assert psnr(reference, noisy) == pytest.approx(peak_signal_noise_ratio(reference, noisy), abs=1e-9)
    expected = structural_similarity(reference, noisy, channel_axis=2, data_range=255, gaussian_weights=True,
                                     sigma=1.5, use_sample_covariance=False)
    assert ssim(reference, noisy) == pytest.approx(expected, abs=2e-3)


def test_ms_ssim_properties():
    reference = np.asarray(make_image(128, 128))
    assert ms_ssim(reference, reference) == pytest.approx(1.0)
    rng = np.random.default_rng(1)
    scores = [ms_ssim(reference, np.clip(reference + rng.normal(0, s, reference.shape), 0, 255).astype(np.uint8))
              for s in (2, 8, 32)]
    assert 1 > scores[0] > scores[1] > scores[2] > 0


@pytest.mark.skipif(not (os.path.isdir(TAEF2) and os.path.isdir(KODAK)), reason="../shared is not present")
def test_sdc_bench_rd_end_to_end(tmp_path, request):
    taef2_set = request.getfixturevalue("taef2_set")
    images = tmp_path / "images"
    images.mkdir()
    from PIL import Image
    Image.open(os.path.join(KODAK, "kodim23.png")).crop((0, 0, 256, 192)).save(images / "kodim23.png")
    from sdc_bench.cli import main

    out = tmp_path / "out"
    assert main(["rd", "--models", taef2_set, "--images", str(images), "--points", "u8,palette:64:4,palette:256:4",
                 "--peers", "JPEG,AVIF", "--crop-point", "palette K=64 G=4", "--out", str(out)]) == 0
    result = json.loads((out / "rd.json").read_text())
    means = result["summary"]["means"]
    assert {"sdc u8", "sdc palette K=64 G=4", "original recipe (libimagequant 256 + zlib)"} <= set(means)
    # Peers never exceed our bytes at the point they were matched to.
    for row in result["rows"]:
        if " @ " in row["codec"]:
            ours = next(r for r in result["rows"] if r["codec"] == "sdc " + row["codec"].split(" @ ")[1])
            assert row["bytes"] <= ours["bytes"]
    assert means["sdc u8"]["bytes"] > means["sdc palette K=256 G=4"]["bytes"] > means["sdc palette K=64 G=4"]["bytes"]
    # Coarser points score worse on the perceptual metrics too.
    assert means["sdc u8"]["ssimulacra2"] > means["sdc palette K=64 G=4"]["ssimulacra2"]
    if shutil.which("butteraugli_main"):
        assert means["sdc u8"]["butteraugli_3norm"] < means["sdc palette K=64 G=4"]["butteraugli_3norm"]
    for name in ("rd.png", "crops.png", "rd.csv", "summary.md"):
        assert (out / name).stat().st_size > 0


@pytest.mark.skipif(not (os.path.isdir(TAEF2) and os.path.isdir(KODAK)), reason="../shared is not present")
def test_sdc_bench_rd_quality_and_effort_sweep(tmp_path, request):
    taef2_set = request.getfixturevalue("taef2_set")
    images = tmp_path / "images"
    images.mkdir()
    from PIL import Image
    for name in ("kodim23", "kodim05"):
        # 192x128 crops, for CI time (the full sweep is BENCHMARKS.md §7).
        Image.open(os.path.join(KODAK, f"{name}.png")).crop((128, 128, 320, 256)).save(images / f"{name}.png")
    from sdc_bench.cli import main

    out = tmp_path / "out"
    assert main(["rd", "--models", taef2_set, "--images", str(images), "--qualities", "10,30,60,90",
                 "--efforts", "0,1", "--crop-image", "kodim23", "--out", str(out)]) == 0
    result = json.loads((out / "rd.json").read_text())
    rows = result["sweep_rows"]
    assert {r["codec"] for r in rows} == {"sdc effort 0", "sdc effort 1", "autoencoder ceiling", "original recipe",
                                          "JPEG", "WebP", "AVIF", "JPEG XL"}
    perceptual = (["ssimulacra2"] + (["butteraugli", "butteraugli_3norm"] if shutil.which("butteraugli_main") else [])
                  + (["st_lpips"] if has_st_lpips() else []))
    assert result["sweep"]["metrics"] == ["psnr", "ssim", "ms_ssim", *perceptual]
    for r in rows:  # every codec at every point is scored on every metric
        assert all(np.isfinite(r[m]) for m in ("psnr", *perceptual))
    for image in ("kodim23", "kodim05"):  # sizes rise with quality, and peers never exceed ours
        ours = {r["quality"]: r["bytes"] for r in rows if r["image"] == image and r["codec"] == "sdc effort 1"}
        assert [ours[q] for q in (10, 30, 60, 90)] == sorted(ours.values())
        for r in rows:
            if r["image"] == image and r["codec"] in ("JPEG", "WebP", "AVIF", "JPEG XL"):
                assert r["bytes"] <= ours[r["quality"]]
    deltas = {(d["test"], d["anchor"]): d["by_metric"] for d in result["sweep"]["bd"]}
    assert set(deltas) == {("sdc effort 1", anchor) for anchor in
                           ("sdc effort 0", "original recipe", "JPEG", "WebP", "AVIF", "JPEG XL")}
    effort = deltas[("sdc effort 1", "sdc effort 0")]
    assert set(effort) == {m for m in BD_METRICS if m in ("psnr", *perceptual)}
    assert effort["psnr"]["images"] == 2 and effort["psnr"]["bd_quality"] > 0 and effort["psnr"]["bd_rate_percent"] < 0
    assert deltas[("sdc effort 1", "AVIF")]["psnr"]["bd_quality"] < 0  # said plainly: AVIF is ahead in PSNR
    summary = (out / "summary.md").read_text()
    assert "BD-rate SSIMULACRA2" in summary and "autoencoder ceiling | unquantized" in summary
    for name in ("rd-quality.png", "crops.png", "sweep.csv", "summary.md"):
        assert (out / name).stat().st_size > 0


@pytest.mark.parametrize("points", ["u8:fine", "palette:16", "jpeg", "palette:a:4"])
def test_a_bad_operating_point_is_a_one_line_usage_error(model_set, points):
    result = run_cli("sdc-bench", "rd", "--models", model_set, "--images", ".", "--points", points)
    assert_one_line_error(result, "bad operating point")
    assert result.returncode == 2


@pytest.mark.skipif(not (os.path.isdir(TAEF2) and os.path.isdir(KODAK)), reason="../shared is not present")
def test_sdc_bench_tiles_measures_seams(tmp_path, request):
    """Reduced: one mosaic of four 192x128 Kodak crops in 128-pixel tiles."""
    taef2_set = request.getfixturevalue("taef2_set")
    from PIL import Image

    from sdc_bench.cli import main

    images = tmp_path / "images"
    images.mkdir()
    for name in ("kodim01", "kodim05", "kodim13", "kodim23"):
        Image.open(os.path.join(KODAK, f"{name}.png")).crop((200, 150, 392, 278)).save(images / f"{name}.png")
    out = tmp_path / "out"
    assert main(["tiles", "--models", taef2_set, "--images", str(images), "--tile-size", "128", "--out", str(out)]) == 0
    row = json.loads((out / "tiles.json").read_text())["rows"][0]
    assert row["psnr_between"] > 35 and abs(row["psnr_tiled"] - row["psnr_untiled"]) < 0.1
    assert row["border_gradient_ratio_tiled"] <= 1.05 * row["border_gradient_ratio_untiled"]
    assert (out / "corner.png").stat().st_size > 0


@pytest.mark.parametrize("args", [["--qualities", "0,50"], ["--qualities", "fine"], ["--qualities", "50", "--efforts", "12"]])
def test_bad_sweep_values_are_one_line_usage_errors(model_set, args):
    result = run_cli("sdc-bench", "rd", "--models", model_set, "--images", ".", *args)
    assert result.returncode == 2
    assert_one_line_error(result, "--")


def test_a_bad_int8_effort_is_a_one_line_usage_error(model_set, tmp_path):
    result = run_cli("sdc-bench", "int8", "--models", model_set, "--images", ".", "--out", str(tmp_path), "--effort", "12")
    assert result.returncode == 2
    assert_one_line_error(result, "--effort")


def test_a_missing_image_is_a_one_line_error(model_set, tmp_path):
    result = run_cli("sdc-bench", "stages", "--models", model_set, "--size", "64", "--repeat", "1",
                     "--image", str(tmp_path / "kodim23"))
    assert_one_line_error(result, "kodim23")
    assert result.returncode == 1


def test_sdc_bench_session_times_each_option_and_the_roof(model_set, tmp_path):
    from sdc_bench.cli import main

    out = tmp_path / "session.json"
    assert main(["session", "--models", model_set, "--graph", "vae_decoder", "--size", "64", "--repeat", "1",
                 "--json", str(out)]) == 0
    result = json.loads(out.read_text())
    assert len(result["seconds"]) == 6 and all(s > 0 for s in result["seconds"].values())
    assert result["graph_gflop"] > 0
    assert set(result["roof_fp32"]) == {"MatMul", "Conv"} and set(result["roof_int8"]) == {"MatMulInteger", "QLinearConv"}
    assert all(rate > 1 for rate in [*result["roof_fp32"].values(), *result["roof_int8"].values()])


def test_graph_flops_counts_a_convolution_by_hand(tmp_path):
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    from sdc_export.flops import graph_flops

    weight = numpy_helper.from_array(np.zeros((8, 3, 3, 3), np.float32), "w")
    graph = helper.make_graph([helper.make_node("Conv", ["x", "w"], ["y"], pads=[1, 1, 1, 1], strides=[2, 2])], "g",
                              [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["b", 3, "h", "w"])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)], initializer=[weight])
    path = str(tmp_path / "conv.onnx")
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), path)
    # Output 2 x 8 x 10 x 16; each output value takes 3 x 3 x 3 multiply-adds.
    assert graph_flops(path, {"x": (2, 3, 20, 32)}) == 2 * (2 * 8 * 10 * 16) * 27
    # The same convolution in an int8 graph: its weight comes through a DequantizeLinear.
    int8 = [numpy_helper.from_array(np.zeros((8, 3, 3, 3), np.int8), "w_q"),
            numpy_helper.from_array(np.ones(8, np.float32), "w_scale")]
    nodes = [helper.make_node("DequantizeLinear", ["w_q", "w_scale"], ["w"], axis=0),
             helper.make_node("Conv", ["x", "w"], ["y"], pads=[1, 1, 1, 1], strides=[2, 2])]
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["b", 3, "h", "w"])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)], initializer=int8)
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), path)
    assert graph_flops(path, {"x": (2, 3, 20, 32)}) == 2 * (2 * 8 * 10 * 16) * 27


def test_sdc_bench_stages_times_each_stage_against_torch(model_set, tiny_sd, tmp_path):
    """Every stage in ONNX Runtime, and the neural ones in PyTorch from the same checkpoint;
    u8 coding runs with its own options (before: the palette's colours went to u8 too)."""
    from sdc_bench.cli import main

    out = tmp_path / "stages.json"
    assert main(["stages", "--models", model_set, "--torch-src", tiny_sd, "--size", "64", "--repeat", "1",
                 "--json", str(out)]) == 0
    stages = json.loads(out.read_text())["stages"]
    assert {"vae_encoder", "vae_decoder", "latent coding (u8)", "latent coding (palette)"} <= set(stages)
    assert all(stages[role]["onnx_s"] > 0 and stages[role]["torch_s"] > 0 for role in ("vae_encoder", "vae_decoder"))
    assert any(name.startswith("unet step") and row["torch_s"] > 0 for name, row in stages.items())


def test_sdc_bench_coder_compares_the_context_coder_with_todays_on_the_same_levels(tae_set, tmp_path):
    """The 'today' file is the context-coded one with its latent re-coded by DEFLATE/LZMA2:
    the same levels (so the same PSNR), and never smaller, as the encoder keeps the smallest."""
    from sdc_bench.cli import main
    from sdc_bench.coder import todays_coders
    from sdc_runtime import SdcCodec, sdc_decode, sdc_info

    images = tmp_path / "images"
    images.mkdir()
    for seed in (1, 2):
        make_image(96, 64, seed=seed).save(images / f"im{seed}.png")
    assert main(["coder", "--models", tae_set, "--images", str(images), "--qualities", "20,50,80", "--out",
                 str(tmp_path / "out")]) == 0
    result = json.loads((tmp_path / "out" / "coder.json").read_text())
    assert len(result["rows"]) == 6 and set(result["bd_rate"]) == {"context", "deadzone"}
    assert all(r["context_bytes"] <= r["today_bytes"] for r in result["rows"])
    data = SdcCodec(tae_set).encode(make_image(96, 64), quality=80, deadzone=0)
    today = todays_coders(data)
    assert sdc_info(today)["sections"]["latent"]["coder"] in ("deflate", "lzma2")
    np.testing.assert_array_equal(sdc_decode(today)[1], sdc_decode(data)[1])
