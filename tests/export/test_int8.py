"""int8 model sets (issue 9): sdc-export --int8, calibrated on images, swept for sensitive
nodes, checked against the fp32 graphs; the sets cross-decode with their fp32 twins."""
from __future__ import annotations

import json
import os

import numpy as np
import onnx
import pytest
from helpers import KODAK, TAEF2, assert_one_line_error, kodak, make_image, needs_shared, psnr, run_cli
from PIL import Image


@pytest.fixture(scope="session")
def calibration_dir(tmp_path_factory) -> str:
    folder = tmp_path_factory.mktemp("calibration")
    for seed in range(3):
        make_image(96, 80, seed=10 + seed).save(folder / f"photo{seed}.png")
    (folder / "notes.txt").write_text("not an image: skipped")
    return str(folder)


@pytest.fixture(scope="session")
def int8_sd(tmp_path_factory, tiny_sd, calibration_dir):
    from sdc_export.cli import main

    out = str(tmp_path_factory.mktemp("sets") / "tiny-int8")
    assert main(["--model", tiny_sd, "--out", out, "--quiet", "--int8", "vae_encoder,vae_decoder,unet",
                 "--calibration", calibration_dir, "--calibration-count", "3", "--no-sweep"]) == 0
    return out


def _manifest(folder):
    with open(os.path.join(folder, "manifest.json")) as fh:
        return json.load(fh)


def _int8_weights(path) -> tuple[set, set]:
    """(names of the Conv/MatMul/Gemm nodes whose second input is int8 weights, names of
    those whose second input is not: float weights, or an activation) of a graph file."""
    model = onnx.load(path)
    floats = {t.name for t in model.graph.initializer if t.data_type == onnx.TensorProto.FLOAT}
    dequantized = {n.output[0]: n.input[0] for n in model.graph.node if n.op_type == "DequantizeLinear"}
    int8 = {t.name for t in model.graph.initializer if t.data_type == onnx.TensorProto.INT8}
    assert int8, f"{path} holds no int8 weights"
    heavy = [n for n in model.graph.node if n.op_type in ("Conv", "MatMul", "Gemm") and len(n.input) > 1]
    return ({n.name for n in heavy if dequantized.get(n.input[1]) in int8},
            {n.name for n in heavy if n.input[1] in floats or n.input[1] not in dequantized
             or dequantized[n.input[1]] not in int8})


def _tensor_per_feed(model, name: str, feeds: list[dict]) -> list[np.ndarray]:
    """The tensor ``name`` of a run of the whole graph ``model`` (a ModelProto, left as it is)
    on each feed, that tensor made an output: the slow reference of the correction's stepper."""
    import onnxruntime as ort

    from sdc_runtime.neural import session_options

    probe = onnx.ModelProto()
    probe.CopyFrom(model)
    probe.graph.output.append(onnx.helper.make_tensor_value_info(name, onnx.TensorProto.FLOAT, None))
    session = ort.InferenceSession(probe.SerializeToString(), session_options(), providers=["CPUExecutionProvider"])
    return [session.run([name], feed)[0] for feed in feeds]


def test_the_manifest_records_precision(int8_sd, model_set):
    data = _manifest(int8_sd)
    assert {role: g["precision"] for role, g in data["graphs"].items()} == \
        {"vae_encoder": "int8", "vae_decoder": "int8", "unet": "int8"}
    assert data["fingerprint"] == _manifest(model_set)["fingerprint"]  # one checkpoint, one latent space
    for role, graph in data["graphs"].items():
        quantized, _ = _int8_weights(os.path.join(int8_sd, graph["file"]))
        assert graph["float_nodes"] == {}  # --no-sweep: nothing kept in float
        assert len(quantized) > 3, role
        # The export's default weight span, 7 bits, which the runtime runs on the fast kernels.
        assert graph["weight_bits"] == 7, role
        model = onnx.load(os.path.join(int8_sd, graph["file"]))
        int8 = [onnx.numpy_helper.to_array(t) for t in model.graph.initializer if t.data_type == onnx.TensorProto.INT8]
        assert max(int(np.abs(w.astype(np.int16)).max()) for w in int8) == 64, role


def test_layer_norms_stay_float(int8_sd):
    """FLOAT_OPS: no LayerNormalization of the int8 UNet reads an int8 scale or bias (its scale
    made int8 broke the exact-kernel sessions on CPUs without VNNI, BENCHMARKS.md §8), and the
    UNet opens with the runtime's options."""
    import onnxruntime as ort

    from sdc_runtime.neural import session_options

    path = os.path.join(int8_sd, "unet.onnx")
    model = onnx.load(path)
    dequantized = {out for n in model.graph.node if n.op_type == "DequantizeLinear" for out in n.output}
    norms = [n for n in model.graph.node if n.op_type == "LayerNormalization"]
    assert norms and not any(dequantized.intersection(n.input[1:]) for n in norms)
    ort.InferenceSession(path, session_options(), providers=["CPUExecutionProvider"])


def test_int8_files_are_smaller(int8_sd, model_set):
    # The tiny graphs' weights are so small that per-channel scales weigh in; the TAEF2 test
    # below holds a real decoder to 0.3x.
    file = "unet.onnx"
    assert os.path.getsize(os.path.join(int8_sd, file)) < 0.6 * os.path.getsize(os.path.join(model_set, file))


def test_int8_and_fp32_sets_cross_decode(int8_sd, model_set):
    from sdc_runtime import SdcCodec

    fp32, int8 = SdcCodec(model_set), SdcCodec(int8_sd)
    image = make_image(96, 64, seed=3)
    from_fp32, from_int8 = fp32.encode(image), int8.encode(image)
    reference = np.asarray(fp32.decode(from_fp32))
    # Files cross both ways (one fingerprint).  The random-weight tiny set decodes any file to
    # much the same noise, so agreement is checked without the UNet steps (the int8 UNet
    # measured 14 dB SNR there), on the VAE alone; quality is the TAEF2 test's, on real weights.
    for data in (from_fp32, from_int8):
        assert np.asarray(int8.decode(data)).shape == reference.shape
        assert np.asarray(fp32.decode(data)).shape == reference.shape
    for data in (from_fp32, from_int8):
        assert psnr(int8.decode(data, denoise_steps=0), fp32.decode(data, denoise_steps=0)) > 24


def test_export_prints_int8_parity_and_sweep(tiny_sd, calibration_dir, tmp_path, capsys):
    from sdc_export.cli import main
    from sdc_export.int8 import Int8Recipe

    # For CI time, in-process, with gains and offsets only (the refit has its own tests) and
    # the sweep over at most 8 blocks: what is checked here is the sweep, the parity lines and
    # the manifest.
    recipe = Int8Recipe(max_refit_columns=0, max_sweep_units=8)
    assert main(["--model", tiny_sd, "--out", str(tmp_path / "x"), "--quiet",
                 "--int8", "--calibration", calibration_dir, "--calibration-count", "3"], int8_recipe=recipe) == 0
    out = capsys.readouterr().out
    assert "vae_decoder  int8: SNR" in out and "ok" in out
    assert "vae_decoder  int8 sweep:" in out
    data = _manifest(tmp_path / "x")
    # The default quantizes the decoders only.
    assert {role: g["precision"] for role, g in data["graphs"].items()} == \
        {"vae_encoder": "fp32", "vae_decoder": "int8", "unet": "fp32"}
    graph = data["graphs"]["vae_decoder"]
    quantized, in_float = _int8_weights(os.path.join(tmp_path / "x", graph["file"]))
    assert graph["float_nodes"], "the sweep kept no node on the random tiny decoder"
    assert quantized
    for node, gain in graph["float_nodes"].items():
        assert node in in_float and node not in quantized, node  # kept nodes really are float
        assert gain >= 0.03
        assert f"{node} (+{gain:.2f} dB)" in out


def test_int8_combines_with_fp16(tiny_sd, calibration_dir, tmp_path):
    from sdc_export.cli import main
    from sdc_export.int8 import Int8Recipe

    recipe = Int8Recipe(max_refit_columns=0)  # for CI time: the precisions are what is checked
    out = tmp_path / "mixed"
    assert main(["--model", tiny_sd, "--out", str(out), "--quiet", "--fp16", "--int8", "unet",
                 "--calibration", calibration_dir, "--calibration-count", "3", "--no-sweep"], int8_recipe=recipe) == 0
    assert {role: g["precision"] for role, g in _manifest(out)["graphs"].items()} == \
        {"vae_encoder": "fp16", "vae_decoder": "fp16", "unet": "int8"}


def test_a_failing_int8_parity_fails_the_export(tiny_sd, calibration_dir, tmp_path):
    from sdc_export.cli import main
    from sdc_export.int8 import DEFAULT_RECIPE, Int8Recipe

    # Gains and offsets only, for CI time: it fails either way.
    recipe = Int8Recipe(max_refit_columns=0,
                        min_parity_snr_db={**DEFAULT_RECIPE.min_parity_snr_db, "vae_decoder": 200.0})
    assert main(["--model", tiny_sd, "--out", str(tmp_path / "y"), "--quiet", "--int8", "vae_decoder",
                 "--calibration", calibration_dir, "--calibration-count", "3", "--no-sweep"], int8_recipe=recipe) == 1
    assert not os.path.exists(tmp_path / "y")  # nothing half-written


@pytest.mark.parametrize("refit", [True, False], ids=["refit", "gain-offset"])
def test_the_correction_fits_each_int8_convolution_to_fp32(model_set, calibration_dir, tmp_path, refit):
    """correct_layers on the tiny decoder, refitting every layer's weights or (as it does for
    convolutions wider than MAX_REFIT_COLUMNS) fitting gains and offsets: every int8
    convolution (and, refitting, MatMul) is corrected, the graph keeps its nodes, the first convolution's channels
    (whose input no earlier correction moves) come out with the fp32 means and a smaller
    squared error, and the whole graph does no worse.  Mutation-checked: it fails if the
    offset or the gain is applied with the wrong sign."""
    import shutil

    from sdc_export.int8 import DEFAULT_RECIPE, Int8Recipe, calibration_images, record_graph_inputs
    from sdc_export.int8.calibrate import drawn_feeds
    from sdc_export.int8.correct import correct_layers, with_conv_biases
    from sdc_export.int8.linalg import channels_first
    from sdc_export.int8.qdq import outputs, quantize_file
    from sdc_export.int8.sweep import snr_db

    recipe = DEFAULT_RECIPE if refit else Int8Recipe(max_refit_columns=0)
    images = calibration_images(calibration_dir, 3)
    fitted, checks = (record_graph_inputs(model_set, group)["vae_decoder.onnx"] for group in (images[:2], images[2:]))
    feeds = fitted + checks
    fp32 = with_conv_biases(os.path.join(model_set, "vae_decoder.onnx"), str(tmp_path))
    plain, corrected = str(tmp_path / "plain.onnx"), str(tmp_path / "corrected.onnx")
    quantize_file(fp32, plain, feeds, str(tmp_path / "ranges.json"))
    shutil.copy(plain, corrected)
    quantized, _ = _int8_weights(plain)
    fitted_ops = ("Conv", "MatMul") if refit else ("Conv",)
    assert correct_layers(fp32, corrected, fitted, checks, recipe=recipe) == sum(
        1 for n in onnx.load(plain).graph.node if n.op_type in fitted_ops and n.name in quantized) > 3
    before, after = onnx.load(plain).graph.node, onnx.load(corrected).graph.node
    assert [(n.op_type, list(n.input)) for n in before] == [(n.op_type, list(n.input)) for n in after]

    first = next(n for n in after if n.op_type == "Conv")
    seen = drawn_feeds(fitted, recipe.correction_feeds)  # the feeds the fit saw
    values = {name: np.concatenate([channels_first(v) for v in _tensor_per_feed(onnx.load(path), first.output[0], seen)],
                                   axis=1)
              for name, path in (("fp32", fp32), ("plain", plain), ("corrected", corrected))}
    means = {name: v.mean(axis=1) for name, v in values.items()}
    plain_error = np.abs(means["plain"] - means["fp32"]).max()
    corrected_error = np.abs(means["corrected"] - means["fp32"]).max()
    # (9x to 20x closer on the random-weight draws seen; a wrong sign makes it worse)
    assert corrected_error < plain_error / 5, (plain_error, corrected_error)
    # Either fit is least squares of that output to fp32's: its squared error on those feeds
    # falls (the refit's rounding of its weights is what could undo that).
    squared = {name: float(np.square(values[name] - values["fp32"]).sum()) for name in ("plain", "corrected")}
    assert squared["corrected"] < squared["plain"], squared

    # Over the whole random-weight graph the 8-bit output's own step dominates what is left
    # (17.1 dB SNR either way): the real-weight gain is the quality test's below.  Here the
    # correction only has to do no harm.
    reference = outputs(fp32, feeds)
    assert snr_db(reference, outputs(corrected, feeds)) > snr_db(reference, outputs(plain, feeds)) - 0.2


def test_the_correction_fits_a_convolution_kept_in_float(model_set, calibration_dir, tmp_path):
    """A convolution the sweep keeps in float reads the int8 layers' output: correct_layers
    fits it too (its weights and bias stay float32), and on the feeds it was fitted on its
    output comes closer to fp32's than the untouched float layer's.  Fails if float layers
    are skipped, or if their fit is written with the wrong bias."""
    import shutil

    from onnx import numpy_helper

    from sdc_export.int8 import DEFAULT_RECIPE, calibration_images, record_graph_inputs
    from sdc_export.int8.calibrate import drawn_feeds
    from sdc_export.int8.correct import correct_layers, with_conv_biases
    from sdc_export.int8.linalg import channels_first
    from sdc_export.int8.qdq import quantize_file

    images = calibration_images(calibration_dir, 3)
    fitted, checks = (record_graph_inputs(model_set, group)["vae_decoder.onnx"] for group in (images[:2], images[2:]))
    fp32 = with_conv_biases(os.path.join(model_set, "vae_decoder.onnx"), str(tmp_path))
    last = [n for n in onnx.load(fp32).graph.node if n.op_type == "Conv"][-1]
    plain, corrected = str(tmp_path / "plain.onnx"), str(tmp_path / "corrected.onnx")
    quantize_file(fp32, plain, fitted + checks, str(tmp_path / "ranges.json"), (last.name,))
    shutil.copy(plain, corrected)
    assert last.name in _int8_weights(plain)[1]  # kept in float
    correct_layers(fp32, corrected, fitted, checks)

    def float_params(path):
        model = onnx.load(path)
        node = next(n for n in model.graph.node if n.name == last.name)
        tensors = {t.name: t for t in model.graph.initializer}
        assert all(tensors[name].data_type == onnx.TensorProto.FLOAT for name in node.input[1:3])
        return [numpy_helper.to_array(tensors[name]) for name in node.input[1:3]], node.output[0]

    (plain_weight, plain_bias), output = float_params(plain)
    (weight, bias), _ = float_params(corrected)
    assert not (np.array_equal(weight, plain_weight) and np.array_equal(bias, plain_bias))
    seen = drawn_feeds(fitted, DEFAULT_RECIPE.correction_feeds)
    values = {name: np.concatenate([channels_first(v) for v in _tensor_per_feed(onnx.load(path), tensor, seen)], axis=1)
              for name, path, tensor in (("fp32", fp32, last.output[0]), ("plain", plain, output),
                                         ("corrected", corrected, output))}
    squared = {name: float(np.square(values[name] - values["fp32"]).sum()) for name in ("plain", "corrected")}
    assert squared["corrected"] < squared["plain"], squared


def test_the_speed_bench_quantizes_the_same_graph_without_the_correction(model_set, calibration_dir, tmp_path):
    """quantize_set(correct=False), which sdc-bench stages --quantize times, writes the graph
    the export writes, node for node and tensor for tensor (names, types, shapes), with the
    correction's weights, scales and biases left out: its speed is the shipped graph's.  It
    fails if the switch corrects anyway, or skips more."""
    import shutil

    from onnx import numpy_helper

    from sdc_export.int8 import calibration_images, quantize_set

    images = calibration_images(calibration_dir, 3)
    graphs = {}
    for correct in (True, False):
        folder = str(tmp_path / f"correct-{correct}")
        shutil.copytree(model_set, folder)
        quantize_set(folder, ("vae_decoder",), images, sweep_nodes=False, correct=correct)
        graphs[correct] = onnx.load(os.path.join(folder, "vae_decoder.onnx")).graph
    assert [(n.op_type, list(n.input)) for n in graphs[True].node] == \
        [(n.op_type, list(n.input)) for n in graphs[False].node]
    values = {c: {t.name: numpy_helper.to_array(t) for t in g.initializer} for c, g in graphs.items()}
    int32 = [name for name, v in values[True].items() if v.dtype == np.int32]  # the convolutions' biases
    assert int32 and any(not np.array_equal(values[True][n], values[False][n]) for n in int32)
    assert {n: (v.dtype, v.shape) for n, v in values[True].items()} == \
        {n: (v.dtype, v.shape) for n, v in values[False].items()}


def test_calibration_records_the_latents_of_the_default_effort(tae_set, calibration_dir, tmp_path):
    """A set whose default effort descends calibrates its decoder on the descended latents its
    files hold, not only on the encoder's plain latents (issue 9: the decoders calibrate on
    what the runtime feeds them).  Fails if the recording codes at effort 0."""
    import shutil

    from sdc_export.int8 import DEFAULT_RECIPE, calibration_images, record_graph_inputs
    from sdc_runtime import SdcCodec

    # The random TAESD decoder's gradient barely moves a latent, and effort 1 is descent steps
    # only: this copy defaults to effort 4, whose free pass does move some latents.
    model_dir = str(tmp_path / "effort4")
    shutil.copytree(tae_set, model_dir)
    manifest = json.loads((tmp_path / "effort4" / "manifest.json").read_text())
    manifest["defaults"]["effort"] = 4
    (tmp_path / "effort4" / "manifest.json").write_text(json.dumps(manifest))
    codec = SdcCodec(model_dir)
    assert codec.options().effort == 4
    rgb = calibration_images(calibration_dir, 3)[0]
    steps = []
    recorded = record_graph_inputs(model_dir, [rgb], lambda *step: steps.append(step))["vae_decoder.onnx"]
    fed = [next(iter(feed.values()))[0] for feed in recorded]
    # The export's progress, image by image, from each stage's start.
    assert steps == [("calibrate", 0, 1), ("calibrate", 1, 1), ("calibrate in tiles", 0, 1),
                     ("calibrate in tiles", 1, 1)]
    # Each feed once (the loop decodes the unquantized latent at every quality).
    assert len({f.tobytes() for f in fed}) == len(fed)
    moved = 0
    for quality in DEFAULT_RECIPE.calibration_qualities:
        descended = codec.decode_latent(codec.encode(rgb, quality=quality))[1]
        plain = codec.decode_latent(codec.encode(rgb, quality=quality, effort=0))[1]
        moved += not np.array_equal(descended, plain)  # the encoder keeps the plain file where it scores best
        h, w = descended.shape[1:]
        assert any(f.shape[0] == descended.shape[0] and np.array_equal(f[:, :h, :w], descended) for f in fed), quality
    # With random weights the refinement beats the plain file at some qualities only: at least
    # one is recorded.
    assert moved >= 1


@pytest.mark.parametrize("extra,code,needle", [
    (["--int8"], 2, "--int8 needs --calibration DIR"),
    (["--calibration", "."], 2, "apply to --int8 exports only"),
    (["--no-sweep"], 2, "apply to --int8 exports only"),
    (["--calibration-side", "0"], 2, "apply to --int8 exports only"),
    (["--int8", "--calibration", "CAL", "--calibration-side", "-1"], 2, "argument --calibration-side: must be 0"),
    (["--int8", "--calibration", ".", "--calibration-count", "2"], 2, "--calibration-count must be at least 3"),
    (["--int8-weight-bits", "8"], 2, "apply to --int8 exports only"),
    (["--int8", "--calibration", ".", "--int8-weight-bits", "4"], 2, "--int8-weight-bits must be 7 or 8"),
    (["--int8", "text_encoder", "--calibration", "CAL"], 1, "no text_encoder graph"),
    (["--int8", "unet", "--fp16", "--keep-fp32", "unet", "--calibration", "CAL"], 1, "both --int8 and --keep-fp32"),
    (["--int8", "--calibration", "/nonexistent"], 1, "is not a folder"),
    (["--int8", "--calibration", "EMPTY"], 1, "needs at least 3 images"),
])
def test_int8_options_are_checked(tiny_sd, calibration_dir, tmp_path, extra, code, needle):
    (tmp_path / "empty").mkdir()
    extra = [{"CAL": calibration_dir, "EMPTY": str(tmp_path / "empty")}.get(a, a) for a in extra]
    result = run_cli("sdc-export", "--model", tiny_sd, "--out", str(tmp_path / "x"), "--quiet", *extra)
    assert result.returncode == code
    assert_one_line_error(result, needle)


@pytest.fixture(scope="module")
def taef2_int8(taef2_set, tmp_path_factory) -> str:
    """The trained TAEF2 pair exported with --int8 (its decoder), calibrated on Kodak 13-15
    (fitted on 13, checked on 14, 15 held out for parity), at a reduced calibration for CI
    time: 4 feeds for the fit and 2 for the check, 25k rows per layer, the two qualities the
    tests measure, and no sweep (the export's 40 and 4 feeds, 200k rows, five qualities and
    sweep are what BENCHMARKS.md measures; the tiny SD export tests the sweep).  BENCHMARKS.md
    §8 gives the losses at the reduced and the full settings."""
    from sdc_export.cli import main
    from sdc_export.int8 import Int8Recipe

    recipe = Int8Recipe(correction_feeds=4, check_feeds=2, refit_rows=25_000, calibration_qualities=(10, 60))
    calibration = tmp_path_factory.mktemp("kodak-calibration")
    for i in (13, 14, 15):
        os.symlink(os.path.join(KODAK, f"kodim{i}.png"), calibration / f"kodim{i}.png")
    out = tmp_path_factory.mktemp("sets") / "taef2-int8"
    assert main(["--model", TAEF2, "--out", str(out), "--quiet", "--int8", "--calibration", str(calibration),
                 "--calibration-count", "3", "--no-sweep"], int8_recipe=recipe) == 0
    return str(out)


@needs_shared
def test_taef2_int8_decoder_keeps_quality_on_kodak(taef2_set, taef2_int8):
    """The quality floor on real weights: the export's default (7-bit weights, layers refitted
    or gained and offset by the check image), measured on kodim01 and kodim07 (disjoint from
    the calibration), on effort-0 files.  With the earlier gain-and-offset correction alone
    these measured -0.09 to 0.00 dB at Q10 and Q60, and without any correction 0.03 to
    0.32 dB, so the floor fails if the correction is lost (BENCHMARKS.md §8)."""
    from sdc_runtime import SdcCodec

    fp32, int8 = SdcCodec(taef2_set), SdcCodec(taef2_int8)
    assert os.path.getsize(os.path.join(taef2_int8, "vae_decoder.onnx")) <= 0.3 * os.path.getsize(
        os.path.join(taef2_set, "vae_decoder.onnx"))
    for name in ("kodim01", "kodim07"):
        image = kodak(name)
        for quality in (10, 60):  # a palette and a u8 point
            data = fp32.encode(image, quality=quality, effort=0)
            loss = psnr(image, fp32.decode(data)) - psnr(image, int8.decode(data))
            print(f"{name} Q{quality}: int8 decoder loss {loss:.3f} dB")
            assert loss < 0.2, (name, quality, loss)


@needs_shared
def test_an_int8_set_that_descends_aims_between_its_two_decoders(taef2_set, taef2_int8):
    """A set whose decoder turns int8 and that ships the (fp32) decoder gradient keeps the fp32
    decoder, file for file, as its reference decoder; its closed loop descends towards the
    image less INT8_AIM of the int8 decoder's offset from the reference at E(x), not towards
    the image itself (BENCHMARKS.md section 17: the files' worst int8 loss on Kodak fell from
    0.74 dB to under 0.6)."""
    from sdc_runtime import SdcCodec
    from sdc_runtime.refine import INT8_AIM

    ours, fp32 = _manifest(taef2_int8), _manifest(taef2_set)
    reference, decoder = ours["graphs"]["reference_decoder"], fp32["graphs"]["vae_decoder"]
    assert reference["precision"] == "fp32" and ours["graphs"]["vae_decoder"]["precision"] == "int8"
    for kind in ("file", "whole", "tiled"):
        assert ours["files"][reference[kind]] == fp32["files"][decoder[kind]], kind
    codec = SdcCodec(taef2_int8)
    image = np.asarray(kodak("kodim23"))[:128, :192]  # sides of whole latent cells: no padding
    latent, _ = codec.image_to_latent(image)
    offset = codec.stages.decode(latent[None]).astype(np.float32) - SdcCodec(taef2_set).stages.decode(latent[None])
    assert np.abs(offset).mean() > 0.1  # the int8 decoder differs: the aim is not the image
    aim = np.clip(image - np.float32(INT8_AIM) * offset, 0, 255)
    gradient, _ = codec._loop(image, codec.options(), latent).gradient(latent)
    aimed = codec.stages.decoder_gradient(latent[None], aim, image.shape[:2])[0][0]
    plain = codec.stages.decoder_gradient(latent[None], image, image.shape[:2])[0][0]
    np.testing.assert_allclose(gradient, aimed, rtol=0, atol=1e-5 * np.abs(aimed).max())
    assert np.abs(gradient - plain).max() > 1e-2 * np.abs(plain).max()


def test_the_bench_s_int8_sets_keep_the_reference_decoder(tae_set, calibration_dir, tmp_path):
    """quantize_model_set (sdc-bench int8) keeps a descending set's fp32 decoder as its
    reference decoder, as the export does; a set that quantizes another graph, or that does
    not descend, keeps none."""
    import shutil

    from sdc_export.int8 import Int8Recipe, calibration_images, needs_reference_decoder, quantize_model_set
    from sdc_runtime import SdcCodec

    recipe = Int8Recipe(correction_feeds=2, check_feeds=1, refit_rows=5_000, calibration_qualities=(60,))
    model_dir = str(tmp_path / "int8")
    shutil.copytree(tae_set, model_dir)
    quantize_model_set(model_dir, ("vae_decoder",), calibration_images(calibration_dir, 3), sweep_nodes=False,
                       recipe=recipe)
    ours, fp32 = _manifest(model_dir), _manifest(tae_set)
    reference = ours["graphs"]["reference_decoder"]
    assert reference["precision"] == "fp32"
    assert ours["files"][reference["file"]] == fp32["files"][fp32["graphs"]["vae_decoder"]["file"]]
    assert SdcCodec(model_dir).manifest.graphs.keys() == ours["graphs"].keys()  # it loads, as written
    graphs = fp32["graphs"]
    assert not needs_reference_decoder(("vae_encoder",), graphs)
    assert not needs_reference_decoder(("vae_decoder",), {k: v for k, v in graphs.items() if k != "decoder_gradient"})


@pytest.mark.parametrize("period", [5, 7, 25])
def test_the_fits_draw_feeds_of_every_kind_across_the_calibration(period):
    """drawn_feeds on feeds recorded in a repeating order (as the calibration records them:
    per image and quality, the loop's unquantized decode, then coded candidates): the picks are
    distinct, in order, one from each tenth of the list, and not all of one kind.  A stride
    (what it replaced) fails with a period of 5 or 25: it picked the unquantized decodes only."""
    from sdc_export.int8.calibrate import drawn_feeds

    feeds = [{"index": i, "kind": i % period} for i in range(250)]
    picks = drawn_feeds(feeds, 10)
    indices = [f["index"] for f in picks]
    assert indices == sorted(set(indices)) and len(indices) == 10
    assert [i // 25 for i in indices] == list(range(10))
    assert len({f["kind"] for f in picks}) > 2
    assert drawn_feeds(feeds[:7], 10) == feeds[:7]


def test_calibration_images_are_crops_or_whole(tmp_path):
    from sdc_export.int8 import calibration_images

    for i, size in enumerate([(300, 200), (100, 120), (160, 90)]):
        make_image(*size, seed=i).save(tmp_path / f"{i}.png")
    (tmp_path / "notes.txt").write_text("not an image")
    assert [im.shape for im in calibration_images(str(tmp_path), 8, 150)] == [(150, 150, 3), (120, 100, 3),
                                                                              (90, 150, 3)]
    assert [im.shape for im in calibration_images(str(tmp_path), 8, 0)] == [(200, 300, 3), (120, 100, 3),
                                                                            (90, 160, 3)]
    whole = np.asarray(Image.open(tmp_path / "0.png").convert("RGB"))
    assert np.array_equal(calibration_images(str(tmp_path), 8, 0)[0], whole)


def _reference_gptq(weights, scale, top, hessian):
    """GPTQ as its optimal-brain-quantizer derivation states it, slowly: round one column, then
    move the columns not yet rounded by the rounding error times the row of the inverse
    Hessian *of those columns and this one*, recomputed at each step (no Cholesky factor, no
    lazy blocks)."""
    work = weights / scale[:, None]
    rounded = np.zeros_like(work)
    for i in range(work.shape[1]):
        inverse = np.linalg.inv(hessian[i:, i:])
        rounded[:, i] = np.clip(np.rint(work[:, i]), -top, top)
        error = work[:, i] - rounded[:, i]
        work[:, i + 1:] -= np.outer(error / inverse[0, 0], inverse[0, 1:])
    return rounded


def test_gptq_rounding_matches_its_slow_reference():
    from sdc_export.int8.linalg import gptq_round

    rng = np.random.default_rng(1)
    inputs = rng.standard_normal((400, 12)) @ rng.standard_normal((12, 12))  # correlated columns
    hessian = inputs.T @ inputs / len(inputs) + 0.01 * np.eye(12)
    weights = rng.standard_normal((5, 12))
    scale = np.abs(weights).max(1) / 63
    expected = _reference_gptq(weights, scale, 63, hessian)
    for block in (128, 5):  # one block, and lazy updates across blocks
        np.testing.assert_array_equal(gptq_round(weights, scale, 63, hessian, block=block), expected)
    assert np.abs(expected).max() <= 63
    # It rounds for the output, not the weights: a smaller output error than rounding to nearest.
    nearest = np.rint(weights / scale[:, None])

    def output_error(q):
        return float(np.square(inputs @ (q * scale[:, None] - weights).T).sum())
    assert output_error(expected) < output_error(nearest)


@pytest.mark.parametrize("strides,pads,dilations", [((1, 1), (1, 1, 1, 1), (1, 1)), ((2, 2), (0, 1, 1, 0), (1, 1)),
                                                    ((1, 2), (2, 2, 2, 2), (2, 2))])
def test_conv_rows_are_the_convolution_s_patches(strides, pads, dilations):
    """Each row of patches times the weights gives the convolution's output at that position
    (torch's conv2d is the reference), for strides, asymmetric padding and dilation."""
    import torch

    from sdc_export.int8.linalg import ConvGeometry, conv_rows

    rng = np.random.default_rng(2)
    x = rng.standard_normal((2, 3, 9, 10)).astype(np.float32)
    weight = rng.standard_normal((4, 3, 3, 3)).astype(np.float32)
    top, left, bottom, right = pads
    padded = torch.nn.functional.pad(torch.from_numpy(x), (left, right, top, bottom))
    y = torch.nn.functional.conv2d(padded, torch.from_numpy(weight), stride=strides, dilation=dilations).numpy()
    geometry = ConvGeometry((3, 3), strides, dilations, pads)
    for count in (7, 10 ** 6):  # a sample, and every position
        chunks = list(conv_rows(x, y, count, np.random.default_rng(0), geometry=geometry))
        rows_x = np.concatenate([c[0] for c in chunks])
        rows_y = np.concatenate([c[1] for c in chunks])
        assert len(rows_x) == min(count, y.shape[0] * y.shape[2] * y.shape[3])
        np.testing.assert_allclose(rows_x @ weight.reshape(4, -1).T.astype(np.float64), rows_y, atol=1e-4)


def test_the_refit_recovers_a_convolution_from_its_inputs_and_outputs():
    """Given inputs and the outputs of a known convolution, fit_weights returns integer
    weights (within [-64, 64] for 7 bits) and a bias whose output is closer to those outputs
    than the known weights rounded to nearest at the same bits; the Moments it fits from
    give each candidate's squared error as the rows themselves do."""
    import torch

    from sdc_export.int8.linalg import ConvGeometry, Moments, conv_rows, fit_gain_offset, fit_weights

    rng = np.random.default_rng(3)
    true_weight = rng.standard_normal((6, 4, 3, 3)) * 0.1
    true_bias = rng.standard_normal(6)
    x = (rng.standard_normal((3, 4, 16, 16)) + 3).astype(np.float32)  # a mean for the bias to carry
    y = (torch.nn.functional.conv2d(torch.from_numpy(x).double(), torch.from_numpy(true_weight), padding=1).numpy()
         + true_bias[None, :, None, None])
    step = np.abs(true_weight).reshape(6, -1).max(1) / 64
    nearest = np.rint(true_weight.reshape(6, -1) / step[:, None]) * step[:, None]
    rows_x, rows_y = map(np.concatenate, zip(*conv_rows(x, y, 10 ** 6, np.random.default_rng(0),
                                                          geometry=ConvGeometry((3, 3), (1, 1), (1, 1), (1, 1, 1, 1)))))
    moments = Moments(36, 6)
    moments.add(rows_x, rows_y)
    rounded, scale, bias = fit_weights(moments, nearest, 7, intercept=True)
    assert np.abs(rounded).max() == 64 and np.array_equal(rounded, np.rint(rounded))

    def error(weights, offset):
        return float(np.mean(np.sum(np.square(rows_y - rows_x @ weights.T - offset), 1)))
    refitted = rounded * scale[:, None]
    assert error(refitted, bias) < error(nearest, true_bias)
    for candidate in ((refitted, bias), (nearest, true_bias)):
        np.testing.assert_allclose(moments.error(*candidate), error(*candidate), rtol=1e-6)
    # The other candidate, a least-squares gain and offset on the rounded weights: no worse than
    # the true bias, and both candidates' errors as the Moments compute them.
    gain, offset = fit_gain_offset(moments.of_layer(nearest))
    assert error(nearest * gain[:, None], offset) <= error(nearest, true_bias)
    np.testing.assert_allclose(moments.error(nearest * gain[:, None], offset), error(nearest * gain[:, None], offset),
                               rtol=1e-6)


def test_the_graph_stepper_matches_whole_graph_runs(model_set, calibration_dir, tmp_path):
    """GraphStepper, which runs the correction's graphs a stretch at a time, gives each tensor
    as a run of the whole graph with that tensor made an output would (its slow reference),
    and a weight changed after a layer's input was fetched is the weight later stretches run
    with.  Fails if a stretch runs the weights' DequantizeLinear ahead of its layer (stale
    weights), or drops a tensor a later node reads."""
    from onnx import numpy_helper

    from sdc_export.int8 import calibration_images, record_graph_inputs
    from sdc_export.int8.qdq import quantize_file
    from sdc_export.int8.stepper import GraphStepper
    from sdc_runtime.neural import session_options

    images = calibration_images(calibration_dir, 3)
    feeds = record_graph_inputs(model_set, images[:1])["vae_decoder.onnx"][:3]
    int8 = str(tmp_path / "int8.onnx")
    quantize_file(os.path.join(model_set, "vae_decoder.onnx"), int8, feeds, str(tmp_path / "ranges.json"))
    model = onnx.load(int8)
    initializers = {t.name: t for t in model.graph.initializer}
    producer = {out: n for n in model.graph.node for out in n.output}
    convs = [n for n in model.graph.node if n.op_type == "Conv" and producer[n.input[1]].op_type == "DequantizeLinear"]
    changed, later = convs[1], convs[-1]
    scale_name = producer[changed.input[1]].input[1]

    def whole(name):
        return _tensor_per_feed(model, name, feeds)

    def same(got, expected):
        # Within float rounding; a stretch runs a convolution in float on its dequantized input
        # where the whole graph may run it in int8, so a rare value can round to the next step.
        return got.shape == expected.shape and np.mean(np.abs(got - expected) > 1e-4) < 1e-3

    stepper = GraphStepper(model, feeds, session_options(exact_int8=True))
    for name in (convs[0].input[0], changed.input[0]):
        assert all(same(got, expected) for got, expected in zip(stepper.fetch(name), whole(name))), name
    # Double the changed layer's weight scale, as a correction would after fitting it.
    scale = numpy_helper.to_array(initializers[scale_name])
    initializers[scale_name].CopyFrom(numpy_helper.from_array((scale * 2).astype(np.float32), scale_name))
    with_change = whole(later.input[0])  # the model now holds the new scale, and so does this run
    assert all(same(got, expected) for got, expected in zip(stepper.fetch(later.input[0]), with_change))
    # And the change mattered: with the old scale that tensor differs.
    initializers[scale_name].CopyFrom(numpy_helper.from_array(scale, scale_name))
    assert not any(same(a, b) for a, b in zip(whole(later.input[0]), with_change))


def test_the_first_stage_is_every_node_before_the_first_upsampling(tmp_path):
    from onnx import TensorProto, helper, numpy_helper

    from sdc_export.int8.qdq import activations_of, first_stage

    weight = numpy_helper.from_array(np.ones((2, 2, 1, 1), np.float32), "w")
    scales = numpy_helper.from_array(np.array([1, 1, 2, 2], np.float32), "scales")
    nodes = [helper.make_node("Conv", ["x", "w"], ["a"], name="/in/Conv"),
             helper.make_node("Relu", ["a"], ["b"], name="/in/Relu"),
             helper.make_node("Constant", [], ["roi"], name="/up/Constant", value_floats=[0.0]),
             helper.make_node("Resize", ["b", "roi", "scales"], ["c"], name="/up/Resize", mode="nearest"),
             helper.make_node("Conv", ["c", "w"], ["y"], name="/out/Conv")]
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 2, 4, 4])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)], initializer=[weight, scales])
    path = str(tmp_path / "up.onnx")
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), path)
    assert first_stage(path) == ["/in/Conv", "/in/Relu"]
    # the activations those nodes read and write, not their weights
    assert activations_of(path, first_stage(path)) == ["x", "a", "b"]
    assert activations_of(path, ["/out/Conv", "/not/in/this/part"]) == ["c", "y"]
    # a graph that never upsamples (an encoder) has no such stage
    del graph.node[2:4]
    graph.node[1].output[0] = "c"
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), path)
    assert first_stage(path) == []


def _activation_bits(path: str) -> dict[str, int]:
    """The bits of each tensor a QDQ graph quantizes, from its QuantizeLinear zero points."""
    model = onnx.load(path)
    zeros = {t.name: onnx.numpy_helper.to_array(t) for t in model.graph.initializer}
    return {n.input[0]: zeros[n.input[2]].dtype.itemsize * 8 for n in model.graph.node if n.op_type == "QuantizeLinear"}


def test_the_sweep_widens_the_decoder_s_first_stage_to_16_bits(tae_set, calibration_dir, tmp_path):
    """The sweep tries 16-bit activations in the decoder's lowest-resolution stage and keeps
    them when they gain at least keep_gain_db and the stage is cheap (wide_flop_share)."""
    from sdc_export import int8
    from sdc_export.int8 import DEFAULT_RECIPE, Int8Recipe, qdq
    from sdc_export.int8.sweep import snr_db, sweep

    decoder = os.path.join(tae_set, "vae_decoder.onnx")
    stage = qdq.first_stage(decoder)
    images = int8.calibration_images(calibration_dir, 3)
    feeds = int8.record_graph_inputs(tae_set, images)["vae_decoder.onnx"]
    # A costly stage is not tried.
    result = sweep("vae_decoder", decoder, feeds, str(tmp_path),
                         recipe=Int8Recipe(max_sweep_units=3, wide_flop_share=0.001))
    assert result.wide == () and result.wide_gain_db is None
    assert 0.001 < result.wide_flop_share < 0.05  # TAESD's 64 channels at 1x of 1x, 2x, 4x, 8x
    # The export's share: tried, and kept as its gain says.
    result = sweep("vae_decoder", decoder, feeds, str(tmp_path), recipe=Int8Recipe(max_sweep_units=3))
    assert result.wide_gain_db is not None
    assert result.wide == (tuple(stage) if result.wide_gain_db >= DEFAULT_RECIPE.keep_gain_db else ())
    # 16 bits where asked, 8 elsewhere, and closer to fp32.
    plain, widened = str(tmp_path / "plain.onnx"), str(tmp_path / "wide.onnx")
    qdq.quantize_file(decoder, plain, feeds, str(tmp_path / "ranges.json"))
    qdq.quantize_file(decoder, widened, feeds, str(tmp_path / "ranges.json"), (), stage)
    bits = _activation_bits(widened)
    wide = set(qdq.activations_of(decoder, stage))
    sixteen = {t for t, b in bits.items() if b == 16}
    # The quantizer carries the stage's last activation's bits through the upsampling (a
    # Resize keeps its input's quantization): its output is the one 16-bit tensor past it.
    model = onnx.load(decoder)
    upsampled = {out for n in model.graph.node if n.op_type in qdq.UPSAMPLING_OPS for out in n.output}
    assert wide & set(bits) and wide & set(bits) <= sixteen and len(sixteen - wide) <= 1 and sixteen - wide <= upsampled
    assert set(_activation_bits(plain).values()) == {8}
    reference = qdq.outputs(decoder, feeds)
    assert snr_db(reference, qdq.outputs(widened, feeds, 7)) > \
        snr_db(reference, qdq.outputs(plain, feeds, 7))


@needs_shared
def test_the_export_writes_the_wide_stage_into_the_part_that_runs_it(taef2_set, calibration_dir, tmp_path,
                                                                     capsys):
    """TAEF2's decoder runs its first stage whole and the rest in tiles: the 16-bit activations
    the sweep chose go into the whole part, not the tiled one, and the manifest names them."""
    from sdc_export.cli import main
    from sdc_export.int8 import DEFAULT_RECIPE, Int8Recipe
    from sdc_export.int8.qdq import first_stage
    from sdc_runtime import SdcCodec

    # For CI time: the sweep over 3 blocks, none of them kept, gains and offsets on 4 feeds.
    recipe = Int8Recipe(max_sweep_units=3, max_kept=0, max_refit_columns=0, correction_feeds=4)
    out = tmp_path / "set"
    assert main(["--model", TAEF2, "--out", str(out), "--quiet", "--int8", "--calibration", calibration_dir,
                 "--calibration-count", "3"], int8_recipe=recipe) == 0
    printed = capsys.readouterr().out
    graph = _manifest(out)["graphs"]["vae_decoder"]
    stage = first_stage(os.path.join(taef2_set, graph["file"]))
    # On real weights the stage gains more than KEEP_GAIN_DB (BENCHMARKS.md §8: 0.77 dB SNR).
    assert set(graph["wide_nodes"]) == set(stage), printed
    assert all(gain >= DEFAULT_RECIPE.keep_gain_db for gain in graph["wide_nodes"].values())
    assert "16-bit activations" in printed
    for file, bits in ((graph["file"], {8, 16}), (graph["whole"], {8, 16}), (graph["tiled"], {8})):
        assert set(_activation_bits(str(out / file)).values()) == bits, file
    image = kodak("kodim05")
    fp32 = SdcCodec(taef2_set)
    data = fp32.encode(image)
    for tile_size in (0, 128):  # the whole graph, and its parts in tiles
        assert psnr(SdcCodec(str(out), tile_size=tile_size).decode(data), fp32.decode(data)) > 30


@needs_shared
def test_calibration_images_too_small_to_tile_are_a_clear_error(tmp_path):
    """TAEF2's decoders run in parts, one of them in tiles: calibration images no larger than
    the smallest tile never run those parts, and the export says so in one line."""
    folder = tmp_path / "small"
    folder.mkdir()
    for seed in range(3):
        make_image(64, 48, seed=seed).save(folder / f"small{seed}.png")
    result = run_cli("sdc-export", "--model", TAEF2, "--out", str(tmp_path / "x"), "--quiet", "--int8",
                     "--calibration", str(folder), "--no-sweep")
    assert result.returncode == 1
    assert_one_line_error(result, "need a side over 64 pixels")
