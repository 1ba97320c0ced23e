"""Shared fixtures: a tiny random SD pipeline exported through the real sdc-export CLI."""
from __future__ import annotations

import os
import subprocess
import sys
import zlib

import numpy as np
import pytest
from PIL import Image

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SHARED = os.path.join(os.path.dirname(REPO), "shared")
KODAK = os.path.join(SHARED, "data", "kodak")
TAEF2 = os.path.join(SHARED, "models", "taef2")


def run_cli(*args: str, stdin: bytes | None = None) -> subprocess.CompletedProcess:
    """Run a console script's module as a user would (a fresh interpreter)."""
    module = {"sdc-runtime": "sdc_runtime.cli", "sdc-export": "sdc_export.cli", "sdc-bench": "sdc_bench.cli"}[args[0]]
    return subprocess.run([sys.executable, "-m", module, *args[1:]], input=stdin, capture_output=True, timeout=600)


def assert_one_line_error(result: subprocess.CompletedProcess, needle: str) -> None:
    """A CLI failure as the project promises it: non-zero exit, one line on stderr naming the
    problem, no traceback."""
    err = result.stderr.decode()
    assert result.returncode != 0
    assert "Traceback" not in err
    assert needle in err, err
    assert len(err.strip().splitlines()) == 1, err


def recrc(data: bytes) -> bytes:
    """Fix up the trailing CRC32 after tampering, so a test reaches the checks behind it."""
    body = data[:-4]
    return body + zlib.crc32(body).to_bytes(4, "little")


def make_image(width: int, height: int, seed: int = 0) -> Image.Image:
    """Smooth colour gradients plus some texture: compressible but not trivial."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:height, 0:width].astype(np.float32)
    base = np.stack([x / max(width - 1, 1), y / max(height - 1, 1), (x + y) / max(width + height - 2, 1)], -1)
    noise = rng.normal(0, 0.05, (height, width, 3))
    return Image.fromarray(np.clip((base + noise) * 255, 0, 255).astype(np.uint8), "RGB")


@pytest.fixture(scope="session")
def tiny_sd(tmp_path_factory) -> str:
    from sdc_export.tiny import make_random_sd

    return make_random_sd(str(tmp_path_factory.mktemp("sd") / "tiny-sd"), preset="tiny", seed=0)


def _export(tmp_path_factory, src: str, name: str, *extra: str) -> str:
    from sdc_export.cli import main

    out = str(tmp_path_factory.mktemp("sets") / name)
    assert main(["--model", src, "--out", out, "--quiet", *extra]) == 0
    return out


@pytest.fixture(scope="session")
def model_set(tmp_path_factory, tiny_sd) -> str:
    return _export(tmp_path_factory, tiny_sd, "tiny-fp32")


@pytest.fixture(scope="session")
def model_set_fp16(tmp_path_factory, tiny_sd) -> str:
    return _export(tmp_path_factory, tiny_sd, "tiny-fp16", "--fp16")


@pytest.fixture(scope="session")
def other_model_set(tmp_path_factory) -> str:
    """A set from differently seeded weights: its fingerprint differs."""
    from sdc_export.tiny import make_random_sd

    src = make_random_sd(str(tmp_path_factory.mktemp("sd2") / "tiny-sd-2"), preset="tiny", seed=1)
    return _export(tmp_path_factory, src, "tiny-other")


@pytest.fixture(scope="session")
def taef2_set(tmp_path_factory):
    """The trained TAEF2 pair from ../shared exported through sdc-export."""
    if not os.path.isdir(TAEF2):
        pytest.skip("../shared/models/taef2 is not present")
    from sdc_export.cli import main

    out = str(tmp_path_factory.mktemp("sets") / "taef2")
    assert main(["--model", TAEF2, "--out", out, "--quiet"]) == 0
    return out


def psnr(a, b) -> float:
    return 10 * np.log10(255 ** 2 / np.mean((np.asarray(a, float) - np.asarray(b, float)) ** 2))


def kodak(name: str, box=(128, 128, 512, 384)) -> Image.Image:
    """A 384x256 crop of a Kodak image (the size the quality floors were measured at)."""
    return Image.open(os.path.join(KODAK, f"{name}.png")).convert("RGB").crop(box)


needs_shared = pytest.mark.skipif(not (os.path.isdir(TAEF2) and os.path.isdir(KODAK)),
                                  reason="../shared/models/taef2 and ../shared/data/kodak are not present")


@pytest.fixture(scope="session")
def taesd_random(tmp_path_factory) -> str:
    """A random SD-compatible (4-channel, plain) TAESD pair in the checkpoint format."""
    import torch

    from sdc_export.tae import make_decoder, make_encoder

    folder = tmp_path_factory.mktemp("taesd")
    torch.manual_seed(0)
    torch.save(make_encoder(4, pooled=False).state_dict(), folder / "taesd_encoder.pth")
    torch.save(make_decoder(4, pooled=False).state_dict(), folder / "taesd_decoder.pth")
    return str(folder)


@pytest.fixture(scope="session")
def tae_set(tmp_path_factory, taesd_random) -> str:
    return _export(tmp_path_factory, taesd_random, "taesd-random")


@pytest.fixture(scope="session")
def codec(model_set):
    from sdc_runtime import SdcCodec

    return SdcCodec(model_set)
