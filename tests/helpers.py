"""What the tests share: paths, the CLI runner, the one-line error check, test images, PSNR."""
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


def psnr(a, b) -> float:
    from sdc_runtime.image import psnr as image_psnr

    return image_psnr(np.asarray(a), np.asarray(b))


def kodak(name: str, box=(128, 128, 512, 384)) -> Image.Image:
    """A 384x256 crop of a Kodak image (the size the quality floors were measured at)."""
    return Image.open(os.path.join(KODAK, f"{name}.png")).convert("RGB").crop(box)


needs_shared = pytest.mark.skipif(not (os.path.isdir(TAEF2) and os.path.isdir(KODAK)),
                                  reason="../shared/models/taef2 and ../shared/data/kodak are not present")
