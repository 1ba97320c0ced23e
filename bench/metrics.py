"""Image quality metrics that need no downloaded weights: PSNR, SSIM, MS-SSIM (8-bit RGB)."""
from __future__ import annotations

import numpy as np
from scipy.ndimage import gaussian_filter

from sdc_runtime.image import psnr  # the one the encoder's closed loop scores its files by

__all__ = ["psnr", "ssim", "ms_ssim"]

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
