"""sdc-runtime as a user runs it: round trips, stdin/stdout, info, verify, one-line errors,
outputs never half written, ordinary permissions."""
import io
import json
import os
import shutil
import struct

import numpy as np
import pytest
from helpers import assert_one_line_error, make_image, recrc, run_cli
from PIL import Image

from sdc_runtime import SdcLimitError, sdc_info


def _png(image):
    buffer = io.BytesIO()
    image.save(buffer, "PNG")
    return buffer.getvalue()


def test_round_trip_and_info_json(model_set, tmp_path):
    src = tmp_path / "in.png"
    make_image(100, 60).save(src)
    sdc, out = tmp_path / "x.sdc", tmp_path / "out.png"
    r = run_cli("sdc-runtime", "encode", str(src), str(sdc), "--models", model_set, "--colors", "64",
                "--denoise-steps", "2")
    assert r.returncode == 0, r.stderr
    r = run_cli("sdc-runtime", "info", str(sdc), "--json")
    assert r.returncode == 0, r.stderr
    details = json.loads(r.stdout)
    assert details["width"] == 100 and details["height"] == 60 and details["mode"] == "palette"
    assert 32 < details["colors"] <= 64 and details["denoise_steps"] == 2 and details["format_version"] == 1
    assert details["total_bytes"] == os.path.getsize(sdc)
    assert set(details["sections"]) == {"palette", "indices"}
    from sdc_runtime.manifest import load_manifest
    assert details["model_fingerprint"] == load_manifest(model_set).fingerprint[:32]
    r = run_cli("sdc-runtime", "decode", str(sdc), str(out), "--models", model_set)
    assert r.returncode == 0, r.stderr
    assert Image.open(out).size == (100, 60)
    r = run_cli("sdc-runtime", "decode", str(sdc), str(tmp_path / "out.jpg"), "--models", model_set,
                "--denoise-steps", "0")
    assert r.returncode == 0 and Image.open(tmp_path / "out.jpg").format == "JPEG"
    r = run_cli("sdc-runtime", "info", str(sdc))
    assert b"100x60" in r.stdout and b"palette" in r.stdout


def test_quant_step_and_models_from_the_environment(codec, model_set, tmp_path, monkeypatch):
    image = make_image(96, 64)
    monkeypatch.setenv("SDC_MODELS", model_set)
    r = run_cli("sdc-runtime", "encode", "-", "-", "--mode", "u8", "--quant-step", "1", stdin=_png(image))
    assert r.returncode == 0, r.stderr
    assert sdc_info(r.stdout)["quant_scale"] == sdc_info(codec.encode(image, mode="u8", quant_step=1.0))["quant_scale"]


def test_verify_takes_the_model_set_from_sdc_models(model_set):
    """Issue 33.11: SDC_MODELS replaces --models for verify too."""
    import subprocess
    import sys

    env = dict(os.environ, SDC_MODELS=model_set)
    result = subprocess.run([sys.executable, "-m", "sdc_runtime.cli", "verify"], capture_output=True, env=env,
                            timeout=120)
    assert result.returncode == 0, result.stderr
    assert result.stdout.decode().startswith(f"{model_set}: ")
    env.pop("SDC_MODELS")
    result = subprocess.run([sys.executable, "-m", "sdc_runtime.cli", "verify"], capture_output=True, env=env,
                            timeout=120)
    assert_one_line_error(result, "pass --models DIR or set SDC_MODELS")
    assert result.returncode == 2


def test_verify_checks_the_model_set(model_set, tmp_path):
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


def test_not_an_image_on_stdin_is_named_without_a_python_repr(model_set):
    """Issue 33.8: the message says what was read, not '<_io.BytesIO object at 0x...>'."""
    result = run_cli("sdc-runtime", "encode", "-", "-", "--models", model_set, stdin=b"plain text, no image")
    assert_one_line_error(result, "cannot read the input: not an image format Pillow reads")
    assert b"object at 0x" not in result.stderr


def test_stdin_and_stdout(model_set):
    enc = run_cli("sdc-runtime", "encode", "-", "-", "--models", model_set, stdin=_png(make_image(30, 20)))
    assert enc.returncode == 0, enc.stderr
    assert enc.stdout[:4] == b"\x89SDC"
    dec = run_cli("sdc-runtime", "decode", "-", "-", "--models", model_set, stdin=enc.stdout)
    assert dec.returncode == 0, dec.stderr
    assert Image.open(io.BytesIO(dec.stdout)).size == (30, 20)


def test_decode_with_the_wrong_model_set(codec, other_model_set, tmp_path):
    path = tmp_path / "x.sdc"
    path.write_bytes(codec.encode(make_image(32, 32)))
    r = run_cli("sdc-runtime", "decode", str(path), str(tmp_path / "o.png"), "--models", other_model_set)
    assert_one_line_error(r, codec.header_fingerprint.hex())
    assert not (tmp_path / "o.png").exists()


@pytest.fixture(scope="module")
def good_file(codec):
    return codec.encode(make_image(40, 30), mode="u8")


@pytest.mark.parametrize("case,needle", [
    ("magic", "wrong magic"), ("version", "version 7"), ("truncated", "truncated"),
    ("crc", "CRC32 mismatch"), ("section", "the header implies"), ("pixels", "over the limit of 100"),
    ("empty", "wrong magic"),
])
def test_bad_files_are_one_line_errors_and_write_nothing(model_set, good_file, tmp_path, case, needle):
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
        table = 58 + 4 * 8 + 1  # FORMAT.md: the section table follows C = 4 quantization entries
        struct.pack_into("<I", data, table + 2, struct.unpack_from("<I", data, table + 2)[0] - 1)
        data = bytearray(recrc(bytes(data)))
    elif case == "pixels":
        args = ["--max-pixels", "100"]
    elif case == "empty":
        data = b""
    path = tmp_path / "bad.sdc"
    path.write_bytes(bytes(data))
    if case == "pixels":  # a well-formed file: info allocates nothing and never refuses it for its size
        assert run_cli("sdc-runtime", "info", str(path)).returncode == 0
    else:
        assert_one_line_error(run_cli("sdc-runtime", "info", str(path)), needle)
    decode = run_cli("sdc-runtime", "decode", str(path), str(tmp_path / "o.png"), "--models", model_set, *args)
    assert_one_line_error(decode, needle)
    if case == "pixels":
        assert "--max-pixels" in decode.stderr.decode()  # says how to raise it
    assert not (tmp_path / "o.png").exists()


@pytest.mark.parametrize("extra,needle", [
    (["--colors", "1"], "2..4096"),
    (["--colors", "5000"], "2..4096"),
    (["--memory-limit", "12"], "memory_limit"),
    (["--memory-limit", "lots"], "not a size"),
    (["--tile-size", "3"], "tile_size"),
    (["--max-pixels", "-5"], "max_pixels"),
    (["--threads", "0"], "threads"),
    (["--group-channels", "256"], "group_channels"),
    (["--mode", "palette", "--quant-step", "0.3"], "u8 mode only"),
    (["--denoise-steps", "99"], "0..64"),
    (["--provider", "cuda"], "onnxruntime-gpu"),
    (["--mode", "jpeg"], "invalid choice"),
])
def test_bad_options_are_one_line_errors(model_set, tmp_path, extra, needle):
    src = tmp_path / "in.png"
    make_image(20, 20).save(src)
    result = run_cli("sdc-runtime", "encode", str(src), str(tmp_path / "x.sdc"), "--models", model_set, *extra)
    assert_one_line_error(result, needle)
    assert result.returncode == (1 if "cuda" in extra else 2)  # usage errors exit 2; a missing provider 1
    assert not (tmp_path / "x.sdc").exists()


def test_bad_inputs_and_outputs_are_one_line_errors(model_set, tmp_path, monkeypatch):
    src = tmp_path / "in.png"
    make_image(20, 20).save(src)
    out = str(tmp_path / "x.sdc")
    assert_one_line_error(run_cli("sdc-runtime", "encode", str(tmp_path / "nope.png"), out, "--models", model_set),
                          "cannot read the input image")
    (tmp_path / "text.png").write_text("not an image")
    assert_one_line_error(run_cli("sdc-runtime", "encode", str(tmp_path / "text.png"), out, "--models", model_set),
                          f"cannot read {tmp_path / 'text.png'}: not an image format Pillow reads")
    assert_one_line_error(run_cli("sdc-runtime", "encode", str(src), out, "--models", str(tmp_path)), "not a model set")
    # A mistyped path says so, not that the folder lacks a manifest.
    assert_one_line_error(run_cli("sdc-runtime", "encode", str(src), out, "--models", str(tmp_path / "modles")),
                          "does not exist")
    monkeypatch.delenv("SDC_MODELS", raising=False)
    assert_one_line_error(run_cli("sdc-runtime", "encode", str(src), out), "no model set")
    good = tmp_path / "g.sdc"
    assert run_cli("sdc-runtime", "encode", str(src), str(good), "--models", model_set).returncode == 0
    assert_one_line_error(run_cli("sdc-runtime", "decode", str(good), str(tmp_path / "o.xyz"), "--models", model_set),
                          "extension")
    assert_one_line_error(run_cli("sdc-runtime", "decode", str(good), str(tmp_path / "no" / "o.png"), "--models",
                                  model_set), "cannot write")
    assert_one_line_error(run_cli("sdc-runtime", "decode", str(good), str(tmp_path / "o.png"), "--models", model_set,
                                  "--decoder", "tiny_decoder"), "no tiny decoder graph")


def test_oversized_input_image_is_refused_before_decoding(model_set, tmp_path, monkeypatch):
    """The pixel limit is checked on the PNG header: the pixels are never decoded."""
    from sdc_runtime.image import load_image

    big = tmp_path / "big.png"
    Image.new("RGB", (3000, 2000)).save(big)
    loads = []
    monkeypatch.setattr(Image.Image, "load", lambda self: loads.append(1))
    with pytest.raises(SdcLimitError, match="3000x2000 is over the pixel limit of 1000000"):
        load_image(str(big), max_pixels=1_000_000)
    assert loads == []
    monkeypatch.undo()
    assert_one_line_error(run_cli("sdc-runtime", "encode", str(big), str(tmp_path / "x.sdc"), "--models", model_set,
                                  "--max-pixels", "1000000"), "over the pixel limit")
    assert not (tmp_path / "x.sdc").exists()


def test_a_failing_decode_leaves_the_output_untouched(model_set, tmp_path):
    """An existing output file survives a failed decode, and no temporary file is left."""
    target = tmp_path / "o.png"
    target.write_bytes(b"previous")
    (tmp_path / "bad.sdc").write_bytes(b"\x89SDC\r\n\x1a\nxx")
    assert_one_line_error(run_cli("sdc-runtime", "decode", str(tmp_path / "bad.sdc"), str(target), "--models",
                                  model_set), "version 30840")
    assert target.read_bytes() == b"previous"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bad.sdc", "o.png"]


def test_outputs_get_ordinary_permissions(model_set, tmp_path):
    """Files written through a temporary file still get the umask's mode, not mkstemp's 0600."""
    from sdc_runtime.cli import main

    make_image(16, 16).save(tmp_path / "in.png")
    umask = os.umask(0o022)
    try:
        assert main(["encode", str(tmp_path / "in.png"), str(tmp_path / "x.sdc"), "--models", model_set]) == 0
        assert main(["decode", str(tmp_path / "x.sdc"), str(tmp_path / "o.png"), "--models", model_set]) == 0
    finally:
        os.umask(umask)
    assert (tmp_path / "x.sdc").stat().st_mode & 0o777 == 0o644
    assert (tmp_path / "o.png").stat().st_mode & 0o777 == 0o644
    assert os.stat(model_set).st_mode & 0o755 == 0o755
    for name in os.listdir(model_set):
        assert os.stat(os.path.join(model_set, name)).st_mode & 0o644 == 0o644


@pytest.mark.parametrize("tool,blocked,args,needle", [
    ("sdc_export.cli", "torch", ["--model", "x", "--out", "y"], "needs the export extra (missing: torch"),
    ("sdc_bench.cli", "imagequant", ["rd", "--models", "x", "--images", "y"],
     "needs the bench extra (missing: imagequant)"),
    ("sdc_runtime.cli", "uvicorn", ["serve", "--models", "x"], "serve needs the serve extra (missing: uvicorn)"),
])
def test_tools_without_their_extra_fail_in_one_line_with_exit_1(tool, blocked, args, needle):
    """A missing extra is a failure of the install, not of the command line: exit 1 in every tool."""
    import subprocess
    import sys

    script = f"""
import sys
sys.modules[{blocked!r}] = None
from {tool} import main
sys.exit(main({args!r}))
"""
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, timeout=120)
    assert_one_line_error(result, needle)
    assert result.returncode == 1


def test_the_input_is_never_overwritten(model_set, tmp_path):
    src = tmp_path / "a.png"
    make_image(20, 20).save(src)
    before = src.read_bytes()
    os.link(src, tmp_path / "link.png")
    for output in (src, tmp_path / "link.png"):  # the same file, by name or by another link
        result = run_cli("sdc-runtime", "encode", str(src), str(output), "--models", model_set)
        assert_one_line_error(result, "refusing to overwrite the input")
        assert result.returncode == 2
    assert src.read_bytes() == before


def test_the_output_is_checked_before_any_model_work(tmp_path):
    """A bad output is reported even with a model set that does not exist: it came first."""
    src = tmp_path / "a.png"
    make_image(20, 20).save(src)
    (tmp_path / "out").mkdir()
    for output, needle in ((tmp_path / "no" / "x.sdc", "does not exist"), (tmp_path / "out", "is a directory")):
        result = run_cli("sdc-runtime", "encode", str(src), str(output), "--models", str(tmp_path / "nowhere"))
        assert_one_line_error(result, needle)
        assert result.returncode == 2


def test_no_binary_on_a_terminal(model_set, tmp_path):
    import pty
    import subprocess
    import sys

    src = tmp_path / "a.png"
    make_image(20, 20).save(src)
    leader, follower = pty.openpty()
    try:
        result = subprocess.run([sys.executable, "-m", "sdc_runtime.cli", "encode", str(src), "-", "--models",
                                 model_set], stdout=follower, stderr=subprocess.PIPE, timeout=120)
    finally:
        os.close(follower)
        os.close(leader)
    assert result.returncode == 2 and b"terminal" in result.stderr


def test_format_and_output_quality_on_stdout(model_set, tmp_path):
    sdc = tmp_path / "x.sdc"
    make_image(64, 48).save(tmp_path / "a.png")
    assert run_cli("sdc-runtime", "encode", str(tmp_path / "a.png"), str(sdc), "--models", model_set).returncode == 0
    sizes = []
    for quality in ("20", "95"):
        result = run_cli("sdc-runtime", "decode", str(sdc), "-", "--models", model_set, "--format", "jpeg",
                         "--output-quality", quality)
        assert result.returncode == 0, result.stderr
        assert Image.open(io.BytesIO(result.stdout)).format == "JPEG"
        sizes.append(len(result.stdout))
    assert sizes[0] < sizes[1]
    result = run_cli("sdc-runtime", "decode", str(sdc), "-", "--models", model_set, "--format", "nope")
    assert_one_line_error(result, "extension")
    assert result.returncode == 2


def test_alpha_metadata_and_warnings_through_the_cli(model_set, tmp_path):
    rgba = Image.fromarray(np.dstack([np.asarray(make_image(32, 24)), np.full((24, 32), 100, np.uint8)]), "RGBA")
    rgba.save(tmp_path / "a.png")
    assert run_cli("sdc-runtime", "encode", str(tmp_path / "a.png"), str(tmp_path / "a.sdc"), "--models",
                   model_set).returncode == 0
    assert "alpha" in sdc_info((tmp_path / "a.sdc").read_bytes())["sections"]
    assert run_cli("sdc-runtime", "decode", str(tmp_path / "a.sdc"), str(tmp_path / "o.png"), "--models",
                   model_set).returncode == 0
    assert Image.open(tmp_path / "o.png").mode == "RGBA"
    assert run_cli("sdc-runtime", "encode", str(tmp_path / "a.png"), str(tmp_path / "b.sdc"), "--models",
                   model_set, "--alpha", "drop").returncode == 0
    assert "alpha" not in sdc_info((tmp_path / "b.sdc").read_bytes())["sections"]
    frames = [Image.new("RGB", (16, 16), c) for c in ((255, 0, 0), (0, 0, 255))]
    frames[0].save(tmp_path / "m.gif", save_all=True, append_images=frames[1:])
    result = run_cli("sdc-runtime", "encode", str(tmp_path / "m.gif"), str(tmp_path / "m.sdc"), "--models", model_set)
    assert result.returncode == 0
    assert result.stderr.decode().strip() == "sdc-runtime: warning: the input has 2 frames; only the first is encoded"


def test_a_checkpoint_folder_is_not_a_model_set(taesd_random, tmp_path):
    make_image(16, 16).save(tmp_path / "a.png")
    result = run_cli("sdc-runtime", "encode", str(tmp_path / "a.png"), str(tmp_path / "a.sdc"), "--models", taesd_random)
    assert_one_line_error(result, "run sdc-export")


def test_a_reader_that_goes_away_is_no_traceback(codec, tmp_path):
    """stdout is a pipe whose reader has already gone (as with `| head`): no traceback."""
    import subprocess
    import sys

    path = tmp_path / "x.sdc"
    path.write_bytes(codec.encode(make_image(32, 24)))
    reader, writer = os.pipe()
    os.close(reader)
    try:
        result = subprocess.run([sys.executable, "-m", "sdc_runtime.cli", "info", str(path), "--json"],
                                stdout=writer, stderr=subprocess.PIPE, timeout=120)
    finally:
        os.close(writer)
    assert result.returncode == 1 and b"Traceback" not in result.stderr, result.stderr


def test_stage_bars_show_each_stage_from_its_start_with_its_own_total(capsys):
    """Issue 33.9: one bar per stage, opened at the stage's start (0 done) with the total the
    stage reports, not a fixed one (the export's bar had 12 steps for every export)."""
    pytest.importorskip("tqdm")
    from sdc_runtime.progress import StageBars

    bars = StageBars(True)
    bars("calibrate", 0, 3)
    assert bars.bar.total == 3 and bars.bar.n == 0
    bars("calibrate", 2, 3)
    assert bars.bar.n == 2
    bars("export vae_decoder", 0, 1)
    assert bars.stage == "export vae_decoder" and bars.bar.total == 1
    bars.close()
    assert "calibrate" in capsys.readouterr().err
