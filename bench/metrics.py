"""Image quality metrics of 8-bit RGB images, none needing downloaded weights: PSNR, SSIM and
MS-SSIM here, SSIMULACRA 2 (our numpy port, checked against the C++ tool), Butteraugli
(libjxl's ``butteraugli_main``, from Debian's libjxl-devtools) and ST-LPIPS (the
``stlpips-pytorch`` package, which ships its weights; the ``perceptual`` extra, with torch).
"""
from __future__ import annotations

import functools
import importlib.util
import os
import re
import shutil
import subprocess
import sys
import tempfile
import types
from typing import NamedTuple

import numpy as np
from scipy.ndimage import gaussian_filter

from sdc_runtime.image import psnr  # the one the encoder's closed loop scores its files by

from .ssimulacra2 import ssimulacra2

__all__ = ["psnr", "ssim", "ms_ssim", "ssimulacra2", "butteraugli", "st_lpips", "QUALITY_METRICS", "scores"]



class Metric(NamedTuple):
    label: str
    higher_is_better: bool
    digits: int  # decimals shown in tables


# The Butteraugli ones are measured where butteraugli_main is installed.
QUALITY_METRICS = {
    "psnr": Metric("PSNR dB", True, 2),
    "ssim": Metric("SSIM", True, 4),
    "ms_ssim": Metric("MS-SSIM", True, 4),
    "ssimulacra2": Metric("SSIMULACRA2", True, 2),
    "butteraugli": Metric("Butteraugli max", False, 3),
    "butteraugli_3norm": Metric("Butteraugli 3-norm", False, 3),
    "st_lpips": Metric("ST-LPIPS", False, 4),  # where the perceptual extra is installed
}
BUTTERAUGLI = "butteraugli_main"
# The display brightness Butteraugli assumes, in nits.  butteraugli_main defaults to 80; 255 is
# libjxl's default intensity target for SDR images, the one cjxl's --distance refers to.
BUTTERAUGLI_INTENSITY_TARGET = 255

MS_SSIM_WEIGHTS = (0.0448, 0.2856, 0.3001, 0.2363, 0.1333)  # Wang, Simoncelli, Bovik 2003
_C1, _C2 = (0.01 * 255) ** 2, (0.03 * 255) ** 2


def _ssim_terms(x: np.ndarray, y: np.ndarray) -> tuple[float, float]:
    """Mean SSIM and mean contrast-structure term of one channel (Gaussian window, sigma 1.5)."""
    blur = lambda a: gaussian_filter(a, 1.5, truncate=3.5)
    mx, my = blur(x), blur(y)
    vx, vy, cov = blur(x * x) - mx * mx, blur(y * y) - my * my, blur(x * y) - mx * my
    cs = (2 * cov + _C2) / (vx + vy + _C2)
    luminance = (2 * mx * my + _C1) / (mx * mx + my * my + _C1)
    return float(np.mean(luminance * cs)), float(np.mean(cs))


def ssim(reference: np.ndarray, test: np.ndarray) -> float:
    """Mean over RGB channels of single-scale SSIM."""
    return float(np.mean([_ssim_terms(reference[..., c].astype(np.float64), test[..., c].astype(np.float64))[0]
                          for c in range(reference.shape[2])]))


def ms_ssim(reference: np.ndarray, test: np.ndarray) -> float:
    """Mean over RGB channels of 5-scale MS-SSIM (2x2 average pooling between scales)."""
    values = []
    for c in range(reference.shape[2]):
        x, y = reference[..., c].astype(np.float64), test[..., c].astype(np.float64)
        product = 1.0
        for scale, weight in enumerate(MS_SSIM_WEIGHTS):
            full, cs = _ssim_terms(x, y)
            last = scale == len(MS_SSIM_WEIGHTS) - 1
            product *= max(full if last else cs, 1e-12) ** weight
            if not last:
                h, w = (x.shape[0] // 2) * 2, (x.shape[1] // 2) * 2
                x = x[:h, :w].reshape(h // 2, 2, w // 2, 2).mean((1, 3))
                y = y[:h, :w].reshape(h // 2, 2, w // 2, 2).mean((1, 3))
        values.append(product)
    return float(np.mean(values))


def butteraugli(reference: np.ndarray, test: np.ndarray) -> tuple[float, float]:
    """(max, 3-norm) Butteraugli distances of ``test`` from ``reference``, by libjxl's
    butteraugli_main on PNG copies: 0 is identical, about 1 the threshold of a visible
    difference.  RuntimeError where the tool is not installed or fails."""
    from PIL import Image

    tool = shutil.which(BUTTERAUGLI)
    if tool is None:
        raise RuntimeError(f"{BUTTERAUGLI} is not installed (Debian: apt-get install libjxl-devtools)")
    with tempfile.TemporaryDirectory(prefix="sdc-butteraugli-") as folder:
        paths = [os.path.join(folder, f"{name}.png") for name in ("reference", "test")]
        for path, pixels in zip(paths, (reference, test)):
            Image.fromarray(pixels).save(path)
        done = subprocess.run([tool, *paths, "--intensity_target", str(BUTTERAUGLI_INTENSITY_TARGET)],
                              capture_output=True, text=True, timeout=600)
    found = re.fullmatch(r"\s*([0-9.eE+-]+)\s*\n3-norm:\s*([0-9.eE+-]+)\s*", done.stdout)
    if done.returncode != 0 or found is None:
        raise RuntimeError(f"{BUTTERAUGLI} failed: {(done.stderr or done.stdout).strip()[-300:]}")
    return float(found.group(1)), float(found.group(2))


def has_st_lpips() -> bool:
    return all(importlib.util.find_spec(name) is not None for name in ("torch", "stlpips_pytorch"))


@functools.lru_cache(maxsize=1)
def _st_lpips_model():
    """The shift-tolerant AlexNet ST-LPIPS (its authors' recommended variant), weights from the
    package.  The package imports torchvision and IPython at module level for networks the
    shift-tolerant AlexNet does not use (it is built from the package's own layers); where
    they cannot be imported (PyPI's torchvision needs CUDA torch, this project pins the CPU
    build), empty stand-ins serve that import and are removed after it."""
    stand_ins = []
    for name in ("torchvision", "IPython"):
        try:
            importlib.import_module(name)
        except Exception:
            module = types.ModuleType(name)
            module.models = module.embed = None
            sys.modules[name] = module
            stand_ins.append(name)
    try:
        from stlpips_pytorch import stlpips
    finally:
        for name in stand_ins:
            del sys.modules[name]
    return stlpips.LPIPS(net="alex", variant="shift_tolerant", verbose=False).eval()


def st_lpips(reference: np.ndarray, test: np.ndarray) -> float:
    """ST-LPIPS distance (0: identical; larger: more different), shift-tolerant AlexNet."""
    import torch

    def tensor(pixels):
        return torch.tensor(pixels).permute(2, 0, 1)[None].float() / 127.5 - 1

    with torch.no_grad():
        return float(_st_lpips_model()(tensor(reference), tensor(test)))


def scores(reference: np.ndarray, test: np.ndarray, size: int) -> dict:
    """Bytes, bits per pixel and every quality metric this machine can measure."""
    row = {"bytes": size, "bpp": 8 * size / (reference.shape[0] * reference.shape[1]),
           "psnr": psnr(reference, test), "ssim": ssim(reference, test), "ms_ssim": ms_ssim(reference, test),
           "ssimulacra2": ssimulacra2(reference, test)}
    if shutil.which(BUTTERAUGLI):
        row["butteraugli"], row["butteraugli_3norm"] = butteraugli(reference, test)
    if has_st_lpips():
        row["st_lpips"] = st_lpips(reference, test)
    return row
