"""Bulk coding (issue 35): folders in, folders out, failures named, resumable after a kill,
and the same job on a local Ray instance."""
import json
import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
from helpers import make_image, run_cli
from PIL import Image

from sdc_runtime import sdc_info
from sdc_runtime.batch import find_inputs, plan


@pytest.fixture
def photos(tmp_path):
    """12 small images in a tree, a name collision (img0.png, img0.jpg), a corrupt and an empty
    image, and a text file."""
    root = tmp_path / "in"
    (root / "sub").mkdir(parents=True)
    for i in range(7):
        make_image(48 + 8 * i, 40, seed=i).save(root / f"img{i}.png")
    for i in range(4):
        make_image(64, 48, seed=10 + i).convert("RGB").save(root / "sub" / f"p{i}.jpg")
    make_image(56, 40, seed=20).save(root / "img0.jpg")
    (root / "notes.txt").write_text("not an image")
    (root / "empty.png").write_bytes(b"")
    (root / "corrupt.png").write_bytes(b"\x89PNG\r\n\x1a\n" + b"garbage" * 10)
    return root


def _outputs(folder) -> dict[str, bytes]:
    return {os.path.relpath(os.path.join(d, f), folder): open(os.path.join(d, f), "rb").read()
            for d, _, files in os.walk(folder) for f in files}


def test_a_folder_of_12_images_and_2_bad_files_gives_12_outputs_names_both_and_exits_1(photos, model_set, tmp_path):
    out, report = tmp_path / "out", tmp_path / "report.jsonl"
    result = run_cli("sdc-runtime", "encode", str(photos), "--out-dir", str(out), "--models", model_set,
                     "--report", str(report), "--jobs", "2")
    assert result.returncode == 1
    err = result.stderr.decode()
    assert "corrupt.png:" in err and "empty.png:" in err and "notes.txt" not in err and "Traceback" not in err
    outputs = _outputs(out)
    assert sorted(outputs) == sorted(["img0.png.sdc", "img0.jpg.sdc"] + [f"img{i}.sdc" for i in range(1, 7)]
                                     + [f"sub/p{i}.sdc" for i in range(4)])
    for data in outputs.values():
        sdc_info(data)  # every output is a whole, valid file
    lines = [json.loads(line) for line in report.read_text().splitlines()]
    assert len(lines) == 14 and sum("error" in line for line in lines) == 2
    good = next(line for line in lines if line["path"] == os.path.join("sub", "p1.jpg"))
    assert good["output"].endswith(os.path.join("sub", "p1.sdc")) and good["bytes"] > 0 and good["bpp"] > 0
    assert "1 failed" not in err and "12 coded, 0 already complete, 2 failed" in err


def test_resume_rewrites_nothing_finished(photos, model_set, tmp_path):
    out = tmp_path / "out"
    run_cli("sdc-runtime", "encode", str(photos), "--out-dir", str(out), "--models", model_set)
    stamps = {name: os.stat(out / name).st_mtime_ns for name in _outputs(out)}
    os.unlink(out / "img3.sdc")
    result = run_cli("sdc-runtime", "encode", str(photos), "--out-dir", str(out), "--models", model_set, "--resume")
    assert "1 coded, 11 already complete, 2 failed" in result.stderr.decode()
    assert all(os.stat(out / name).st_mtime_ns == stamp for name, stamp in stamps.items() if name != "img3.sdc")
    assert (out / "img3.sdc").exists()


def test_a_killed_batch_completes_on_resume_with_every_output_whole(model_set, tmp_path):
    """SIGKILL mid-batch, then --resume: every output valid, no temporary file left."""
    root = tmp_path / "many"
    root.mkdir()
    for i in range(40):
        make_image(192, 160, seed=i).save(root / f"m{i:02d}.png")
    out = tmp_path / "out"
    command = [sys.executable, "-m", "sdc_runtime.cli", "encode", str(root), "--out-dir", str(out), "--models",
               model_set, "--effort", "2"]
    process = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline and len(os.listdir(out) if out.exists() else []) < 3:
        time.sleep(0.05)
    process.send_signal(signal.SIGKILL)
    process.wait()
    assert 0 < len(os.listdir(out)) < 40 + 1, "the kill came too late to test anything"
    (out / ".sdc-left-by-a-kill.tmp").write_bytes(b"half a file")  # as a kill mid-write leaves one
    result = subprocess.run(command + ["--resume"], capture_output=True, timeout=600)
    assert result.returncode == 0, result.stderr.decode()
    names = sorted(os.listdir(out))
    assert names == [f"m{i:02d}.sdc" for i in range(40)]
    for name in names:
        sdc_info((out / name).read_bytes())


def test_decode_in_batch_mirrors_the_tree(photos, model_set, tmp_path):
    encoded, decoded = tmp_path / "enc", tmp_path / "dec"
    run_cli("sdc-runtime", "encode", str(photos), "--out-dir", str(encoded), "--models", model_set)
    result = run_cli("sdc-runtime", "decode", str(encoded), "--out-dir", str(decoded), "--models", model_set,
                     "--format", "webp")
    assert result.returncode == 0, result.stderr.decode()
    outputs = _outputs(decoded)
    assert "sub/p2.webp" in outputs and "img0.png.webp" in outputs and len(outputs) == 12
    with Image.open(decoded / "img4.webp") as image:
        assert image.size == (80, 40)


def test_inputs_are_files_folders_and_globs_and_names_are_planned_once(photos, tmp_path):
    found, missing = find_inputs([str(photos / "sub"), str(photos / "img*.png"), str(photos / "img0.jpg"),
                                  str(photos / "nothing-here")], decode=False)
    assert [relative for _, relative in found][:4] == ["p0.jpg", "p1.jpg", "p2.jpg", "p3.jpg"]
    assert len(found) == 4 + 7 + 1 and [m.path for m in missing] == [str(photos / "nothing-here")]
    outputs = [os.path.relpath(job.output, tmp_path) for job in plan(found, str(tmp_path), decode=False)]
    assert len(set(outputs)) == len(outputs)
    assert "img0.png.sdc" in outputs and "img0.jpg.sdc" in outputs and "img1.sdc" in outputs


def test_batch_flags_need_out_dir_and_one_input_needs_an_output(model_set, tmp_path):
    from helpers import assert_one_line_error

    result = run_cli("sdc-runtime", "encode", "a.png", "b.sdc", "--models", model_set, "--jobs", "2")
    assert_one_line_error(result, "apply with --out-dir only")
    assert result.returncode == 2
    result = run_cli("sdc-runtime", "encode", "a.png", "b.png", "c.sdc", "--models", model_set)
    assert_one_line_error(result, "many inputs need --out-dir DIR")


def test_the_ray_engine_writes_the_same_files_as_the_local_one(photos, model_set, tmp_path):
    pytest.importorskip("ray", reason="the ray extra")
    env = dict(os.environ, RAY_USAGE_STATS_ENABLED="0")
    local, distributed = tmp_path / "local", tmp_path / "ray"
    run_cli("sdc-runtime", "encode", str(photos), "--out-dir", str(local), "--models", model_set)
    result = subprocess.run([sys.executable, "-m", "sdc_runtime.cli", "encode", str(photos), "--out-dir",
                             str(distributed), "--models", model_set, "--engine", "ray", "--jobs", "2"],
                            capture_output=True, env=env, timeout=300)
    assert result.returncode == 1, result.stderr.decode()[-3000:]  # the two bad files
    assert "corrupt.png:" in result.stderr.decode() and "Traceback" not in result.stderr.decode()
    ours, theirs = _outputs(local), _outputs(distributed)
    assert sorted(ours) == sorted(theirs)
    for name in ours:
        assert abs(len(ours[name]) - len(theirs[name])) <= 0.02 * len(ours[name]), name
        np.testing.assert_array_equal(sdc_info(ours[name])["latent_shape"], sdc_info(theirs[name])["latent_shape"])


def test_encode_dataset_for_ray_pipelines(photos, model_set, tmp_path):
    """The Python API: read_binary_files -> encode_dataset -> SdcDatasink, failures as rows.
    In a subprocess, so that a Ray that stalls fails the test instead of the suite."""
    pytest.importorskip("ray", reason="the ray extra")
    script = f"""
import os, json, ray
from sdc_runtime.ray import SdcDatasink, encode_dataset
ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
ds = ray.data.read_binary_files([{str(photos / "sub")!r}, {str(photos / "corrupt.png")!r}], include_paths=True)
sink = SdcDatasink({str(tmp_path / "out")!r})
encode_dataset(ds, {model_set!r}, quality=10).write_datasink(sink)
print(json.dumps({{os.path.basename(o.path): o.error for o in sink.outcomes}}))
"""
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, timeout=300,
                            env=dict(os.environ, RAY_USAGE_STATS_ENABLED="0"))
    assert result.returncode == 0, result.stderr.decode()[-3000:]
    errors = json.loads(result.stdout.decode().strip().splitlines()[-1])
    assert len(errors) == 5 and errors["corrupt.png"] and not any(errors[f"p{i}.jpg"] for i in range(4))
    from sdc_runtime import SdcCodec

    codec = SdcCodec(model_set)
    with Image.open(photos / "sub" / "p2.jpg") as image:
        assert (tmp_path / "out" / "p2.sdc").read_bytes() == codec.encode(image, quality=10)
