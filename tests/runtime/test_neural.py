"""Neural stages: the numpy DDIM step against diffusers, the schedule and noise, providers,
and the UNet loop against diffusers' scheduler driving the same graph."""
import numpy as np
import pytest

from sdc_runtime import SdcModelError, SdcProviderError
from sdc_runtime.neural import (
    EXACT_DOT_FLAGS,
    NeuralStages,
    cpu_flags,
    ddim_step,
    denoise_timesteps,
    provider_chain,
    step_noise,
)
from sdc_runtime.options import Denoising


def test_numpy_ddim_step_equals_diffusers():
    torch = pytest.importorskip("torch", reason="the reference is diffusers' scheduler (the export extra)")
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


def test_schedule_and_noise_are_fixed_by_the_header():
    assert denoise_timesteps(3, 15) == [30, 15, 0]
    assert denoise_timesteps(1, 40) == [0]
    a, b = step_noise(7, (1, 4, 3, 2), 3), step_noise(7, (1, 4, 3, 2), 3)
    assert all(np.array_equal(x, y) for x, y in zip(a, b))
    assert not np.array_equal(a[0], a[1])


def test_denoise_pads_to_the_unet_multiple_and_crops_back(model_set):
    stages = NeuralStages(model_set)
    latent = np.random.default_rng(0).normal(0, 1, (1, 4, 5, 7)).astype(np.float32)  # odd sides, multiple 2
    out = stages.denoise(latent, Denoising(2, 15, 0.5, 3))
    assert out.shape == latent.shape and out.dtype == np.float32 and np.all(np.isfinite(out))
    np.testing.assert_array_equal(out, stages.denoise(latent, Denoising(2, 15, 0.5, 3)))
    assert stages.denoise(latent, Denoising(0, 0, 0.0, 0)) is latent


def test_providers():
    assert provider_chain("cpu") == ["CPUExecutionProvider"]
    with pytest.raises(SdcProviderError, match="unknown provider"):
        provider_chain("tpu")
    with pytest.raises(SdcProviderError, match="onnxruntime-gpu"):
        provider_chain("cuda")


def test_a_missing_graph_is_a_model_error(tae_set):
    with pytest.raises(SdcModelError, match="no unet graph"):
        NeuralStages(tae_set).predict(np.zeros((1, 4, 2, 2), np.float32), np.zeros(1, np.float32))


def _saturating_int8_conv(channels: int, weight: int = 127) -> bytes:
    """A QDQ graph that ONNX Runtime runs as one int8 convolution (uint8 activations, int8
    weights, 1x1 kernel): every input 255, every weight ``weight``, the output step one 255th
    of the exact sum, so the output level is exact only if no partial sum was clipped."""
    from onnx import TensorProto, helper, numpy_helper

    exact = channels * 255 * weight
    initializers = [numpy_helper.from_array(np.float32(1), "unit"), numpy_helper.from_array(np.uint8(0), "zero"),
                    numpy_helper.from_array(np.full((channels, channels, 1, 1), weight, np.int8), "w"),
                    numpy_helper.from_array(np.ones(channels, np.float32), "w_scale"),
                    numpy_helper.from_array(np.zeros(channels, np.int8), "w_zero"),
                    numpy_helper.from_array(np.float32(exact / 255), "y_scale")]
    nodes = [helper.make_node("QuantizeLinear", ["x", "unit", "zero"], ["x_q"]),
             helper.make_node("DequantizeLinear", ["x_q", "unit", "zero"], ["x_dq"]),
             helper.make_node("DequantizeLinear", ["w", "w_scale", "w_zero"], ["w_dq"], axis=0),
             helper.make_node("Conv", ["x_dq", "w_dq"], ["y"]),
             helper.make_node("QuantizeLinear", ["y", "y_scale", "zero"], ["y_q"]),
             helper.make_node("DequantizeLinear", ["y_q", "y_scale", "zero"], ["out"])]
    shape = [1, channels, 4, 4]
    graph = helper.make_graph(nodes, "saturating", [helper.make_tensor_value_info("x", TensorProto.FLOAT, shape)],
                              [helper.make_tensor_value_info("out", TensorProto.FLOAT, shape)], initializer=initializers)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]).SerializeToString()


def test_int8_convolutions_are_exact_on_every_cpu(tae_set, monkeypatch):
    """The runtime's sessions run int8 convolutions exactly, against the integer sum computed
    here.  On x86 CPUs without VNNI (AVX2, where this project's CI runs) ONNX Runtime's default
    u8s8 kernel clips each pair of products to 16 bits and returns about half the sum
    (1048512 for 2072640), which is what broke int8 sets there; with VNNI both are exact."""
    import onnxruntime as ort

    from sdc_runtime import neural
    from sdc_runtime.neural import session_options

    channels = 64
    session = ort.InferenceSession(_saturating_int8_conv(channels), session_options(),
                                   providers=["CPUExecutionProvider"])
    out = session.run(None, {"x": np.full((1, channels, 4, 4), 255, np.float32)})[0]
    np.testing.assert_array_equal(out, np.float32(channels * 255 * 127))
    # and on such a CPU every session of a model set is opened with those options
    monkeypatch.setattr(neural, "cpu_flags", lambda: frozenset({"avx2", "fma"}))
    stages = NeuralStages(tae_set)
    options = stages.session(stages.manifest.graphs["vae_decoder"].file).get_session_options()
    assert options.get_session_config_entry("session.x64quantprecision") == "1"
    # and the shared arena that gives its free regions back after each run (neural._use_shared_arena)
    assert options.get_session_config_entry("session.use_env_allocators") == "1"


def test_seven_bit_int8_graphs_run_exact_on_the_fast_kernels(tae_set, tmp_path, monkeypatch):
    """Weights within [-64, 64] keep a pair of u8 x s8 products (at most 2 x 255 x 64) within
    16 bits, so the CPUs' fast kernels are exact for them: on a CPU without VNNI the runtime
    opens graphs whose manifest says ``weight_bits`` 7 without the exact kernels, and 8-bit
    ones (and sets that do not say) with them."""
    import json
    import shutil

    import onnxruntime as ort

    from sdc_runtime import neural
    from sdc_runtime.neural import session_options

    monkeypatch.setattr(neural, "cpu_flags", lambda: frozenset({"avx2", "fma", "avx512f"}))

    channels = 64
    fast = ort.InferenceSession(_saturating_int8_conv(channels, 64), session_options(exact_int8=False),
                                providers=["CPUExecutionProvider"])
    out = fast.run(None, {"x": np.full((1, channels, 4, 4), 255, np.float32)})[0]
    np.testing.assert_array_equal(out, np.float32(channels * 255 * 64))

    folder = tmp_path / "set"
    shutil.copytree(tae_set, folder)
    manifest = json.loads((folder / "manifest.json").read_text())
    for role, bits in (("vae_decoder", 7), ("vae_encoder", 8)):  # the manifest is all the runtime reads here
        manifest["graphs"][role].update(precision="int8", weight_bits=bits)
    (folder / "manifest.json").write_text(json.dumps(manifest))
    stages = NeuralStages(folder)
    entries = {role: stages.session(stages.manifest.graphs[role].file).get_session_options()
               .get_session_config_entry("session.x64quantprecision") for role in ("vae_decoder", "vae_encoder")}
    assert entries == {"vae_decoder": "0", "vae_encoder": "1"}


def test_cpus_with_vnni_or_amx_run_eight_bit_weights_on_the_fast_kernels(monkeypatch):
    """VNNI and AMX add u8 x s8 products in 32 bits, so the fast kernels are exact for 8-bit
    weights too: the runtime asks for the exact ones only on CPUs without either."""
    from sdc_runtime import neural

    for flags, exact_for_8_bits in (({"avx2", "fma"}, True), ({"avx2", "avx512f", "avx512_vnni"}, False),
                                    ({"avx2", "avx_vnni"}, False), ({"avx512f", "amx_tile", "amx_int8"}, False),
                                    (set(), True)):
        monkeypatch.setattr(neural, "cpu_flags", lambda flags=flags: frozenset(flags))
        assert neural.needs_exact_kernels(8) is exact_for_8_bits
        assert neural.needs_exact_kernels(None) is exact_for_8_bits
        assert neural.needs_exact_kernels(7) is False


@pytest.mark.skipif(cpu_flags().isdisjoint(EXACT_DOT_FLAGS), reason="the CPU has neither VNNI nor AMX")
def test_the_fast_kernels_are_exact_for_eight_bit_weights_where_the_cpu_has_vnni():
    """The premise of needs_exact_kernels on this CPU: the convolution whose sum the fast
    kernels of CPUs without VNNI clip (weights 127) comes out exact without the exact kernels."""
    import onnxruntime as ort

    from sdc_runtime.neural import session_options

    channels = 64
    fast = ort.InferenceSession(_saturating_int8_conv(channels), session_options(exact_int8=False),
                                providers=["CPUExecutionProvider"])
    out = fast.run(None, {"x": np.full((1, channels, 4, 4), 255, np.float32)})[0]
    np.testing.assert_array_equal(out, np.float32(channels * 255 * 127))


def test_onnx_runtime_s_own_log_lines_never_reach_stderr(tmp_path):
    """Issue 33.12: a graph ONNX Runtime warns about (an initializer no node reads) opens through
    the runtime's session options without a line on stderr, as the tools' contract needs."""
    import subprocess
    import sys

    import onnx
    from onnx import TensorProto, helper, numpy_helper

    unused = numpy_helper.from_array(np.ones(4, np.float32), "unused")
    graph = helper.make_graph([helper.make_node("Identity", ["x"], ["y"])], "g",
                              [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1])], [unused])
    path = tmp_path / "warns.onnx"
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), path)
    script = ("import onnxruntime as ort, sys; from sdc_runtime.neural import session_options; "
              f"ort.InferenceSession({str(path)!r}, session_options(), providers=['CPUExecutionProvider'])")
    quiet = subprocess.run([sys.executable, "-c", script], capture_output=True, timeout=120)
    assert quiet.returncode == 0 and quiet.stderr == b"", quiet.stderr
    loud = subprocess.run([sys.executable, "-c", f"import onnxruntime as ort; ort.InferenceSession({str(path)!r})"],
                          capture_output=True, timeout=120)
    assert b"unused" in loud.stderr  # the warning the runtime silences is real
