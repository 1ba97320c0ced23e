"""SSIMULACRA 2 (Jon Sneyers, Cloudinary, 2022-2023) in numpy, following libjxl's
tools/ssimulacra2.cc, from which the 108 weights and the final mapping are taken (BSD-3-Clause,
the JPEG XL Project Authors).

Why our own: the PyPI ``ssimulacra2`` port reads 52.6 where the C++ tool reads 57.2 on a JPEG
q20 test image.  This one is checked against scores of the C++ tool (tests/bench and
BENCHMARKS.md, "SSIMULACRA2 validation").

The steps, each as in the C++ tool:
- 8-bit sRGB to linear RGB, then up to six scales, each a 2x2 box downsampling of the last
  (edge pixels repeated), while the scale before it is at least 8 pixels on each side;
- per scale, XYB (libjxl's opsin absorbance, cube root), shifted positive;
- a Gaussian blur of sigma 1.5 with zeros outside the image: libjxl's recursive filter
  (Charalampidis 2016, truncated cosines), whose impulse response is finite, so it is applied
  here as that response, computed once by running the recursion on a unit impulse;
- per channel, the SSIM error map (no luminance masking: 1 - (mu1 - mu2)^2 in its place) and
  the two edge maps (artifacts, lost detail), each pooled as a mean and as a 4-norm;
- a weighted sum of the 108 pooled values, then the fitted mapping to the 0..100 scale.
"""
from __future__ import annotations

import functools
import math

import numpy as np
from scipy.ndimage import correlate1d

__all__ = ["ssimulacra2"]

SIGMA = 1.5
SCALES = 6
C2 = 0.0009
# libjxl's opsin absorbance matrix and bias (lib/jxl/cms/opsin_params.h).
OPSIN = np.array([[0.30, 0.622, 0.078],
                  [0.23, 0.692, 0.078],
                  [0.24342268924547819, 0.20476744424496821, 0.55180986650955360]])
OPSIN_BIAS = 0.0037930732552754493
# Per channel (X, Y, B), per scale, per pooling (mean, 4-norm): SSIM, artifact, detail loss.
WEIGHTS = np.array([
    0.0, 0.0007376606707406586, 0.0, 0.0, 0.0007793481682867309, 0.0,
    0.0, 0.0004371155730107379, 0.0, 1.1041726426657346, 0.00066284834129271, 0.00015231632783718752,
    0.0, 0.0016406437456599754, 0.0, 1.8422455520539298, 11.441172603757666, 0.0,
    0.0007989109436015163, 0.000176816438078653, 0.0, 1.8787594979546387, 10.94906990605142, 0.0,
    0.0007289346991508072, 0.9677937080626833, 0.0, 0.00014003424285435884, 0.9981766977854967,
    0.00031949755934435053,
    0.0004550992113792063, 0.0, 0.0, 0.0013648766163243398, 0.0, 0.0,
    0.0, 0.0, 0.0, 7.466890328078848, 0.0, 17.445833984131262,
    0.0006235601634041466, 0.0, 0.0, 6.683678146179332, 0.00037724407979611296, 1.027889937768264,
    225.20515300849274, 0.0, 0.0, 19.213238186143016, 0.0011401524586618361, 0.001237755635509985,
    176.39317598450694, 0.0, 0.0, 24.43300999870476, 0.28520802612117757, 0.0004485436923833408,
    0.0, 0.0, 0.0, 34.77906344483772, 44.835625328877896, 0.0,
    0.0, 0.0, 0.0, 0.0, 0.0, 0.0,
    0.0, 0.0, 0.0008680556573291698, 0.0, 0.0, 0.0,
    0.0, 0.0, 0.0005313191874358747, 0.0, 0.00016533814161379112, 0.0,
    0.0, 0.0, 0.0, 0.0, 0.0004179171803251336, 0.0017290828234722833,
    0.0, 0.0020827005846636437, 0.0, 0.0, 8.826982764996862, 23.19243343998926,
    0.0, 95.1080498811086, 0.9863978034400682, 0.9834382792465353, 0.0012286405048278493,
    171.2667255897307,
    0.9807858872435379, 0.0, 0.0, 0.0, 0.0005130064588990679, 0.0,
    0.00010854057858411537,
])


@functools.lru_cache(maxsize=None)
def _blur_kernel(sigma: float = SIGMA) -> np.ndarray:
    """The impulse response of libjxl's recursive Gaussian (three second-order sections whose
    weights solve the paper's equations (52)-(56)), as an FIR kernel centred on its middle tap."""
    radius = round(3.2795 * sigma + 0.2546)
    omega = np.array([1.0, 3.0, 5.0]) * math.pi / (2.0 * radius)
    p = np.array([1.0, -1.0, 1.0]) / np.tan(0.5 * omega)
    r = np.array([1.0, -1.0, 1.0]) * p * p / np.sin(omega)
    rho = np.exp(-0.5 * sigma * sigma * omega * omega) / radius
    d13 = p[0] * r[1] - r[0] * p[1]
    zeta15 = (p[1] * r[2] - r[1] * p[2]) / d13
    zeta35 = (p[2] * r[0] - r[2] * p[0]) / d13
    system = np.array([p, r, [zeta15, zeta35, 1.0]])
    gamma = np.array([1.0, radius * radius - sigma * sigma, zeta15 * rho[0] + zeta35 * rho[1] + rho[2]])
    beta = np.linalg.solve(system, gamma)
    feed = -beta * np.cos(omega * (radius + 1.0))
    feedback = -2.0 * np.cos(omega)
    # Run the recursion on an impulse: out[n] sums the sections, each fed in[n-N-1] + in[n+N-1].
    length = 4 * radius + 3
    impulse = np.zeros(length)
    impulse[length // 2] = 1.0
    response = np.zeros(length)
    prev, prev2 = np.zeros(3), np.zeros(3)
    for n in range(-radius + 1, length):
        left, right = n - radius - 1, n + radius - 1
        total = (impulse[left] if left >= 0 else 0.0) + (impulse[right] if right < length else 0.0)
        out = total * feed - feedback * prev - prev2
        prev2, prev = prev, out
        if n >= 0:
            response[n] = out.sum()
    nonzero = np.flatnonzero(np.abs(response) > 1e-12)
    half = max(length // 2 - nonzero[0], nonzero[-1] - length // 2)
    return response[length // 2 - half: length // 2 + half + 1][::-1].copy()


def _blur(plane: np.ndarray) -> np.ndarray:
    kernel = _blur_kernel()
    once = correlate1d(plane, kernel, axis=1, mode="constant", cval=0.0)
    return correlate1d(once, kernel, axis=0, mode="constant", cval=0.0)


def _srgb_to_linear(pixels: np.ndarray) -> np.ndarray:
    v = pixels.astype(np.float64) / np.iinfo(pixels.dtype).max
    return np.where(v <= 0.04045, v / 12.92, ((v + 0.055) / 1.055) ** 2.4)


def _downsample(linear: np.ndarray) -> np.ndarray:
    """2x2 box average; an odd last row or column is averaged with itself, as libjxl does."""
    h, w = linear.shape[:2]
    padded = np.pad(linear, ((0, h % 2), (0, w % 2), (0, 0)), mode="edge")
    return padded.reshape((h + 1) // 2, 2, (w + 1) // 2, 2, 3).mean(axis=(1, 3))


def _positive_xyb(linear: np.ndarray) -> np.ndarray:
    """Planes X, Y, B (channel first), shifted and scaled into positive ranges as libjxl does."""
    mixed = np.maximum(linear @ OPSIN.T + OPSIN_BIAS, 0.0)
    mixed = np.cbrt(mixed) - np.cbrt(OPSIN_BIAS)
    x, y, b = 0.5 * (mixed[..., 0] - mixed[..., 1]), 0.5 * (mixed[..., 0] + mixed[..., 1]), mixed[..., 2]
    return np.stack([x * 14.0 + 0.42, y + 0.01, (b - y) + 0.55])


def _pooled(values: np.ndarray) -> tuple[float, float]:
    return float(values.mean()), float(np.mean(values ** 4) ** 0.25)


def _scale_features(reference: np.ndarray, test: np.ndarray) -> list[tuple[float, ...]]:
    """Per channel: (ssim mean, ssim 4-norm, artifact mean, artifact 4-norm, detail mean, detail 4-norm)."""
    features = []
    for x, y in zip(_positive_xyb(reference), _positive_xyb(test)):
        mu_x, mu_y = _blur(x), _blur(y)
        var_x, var_y, cov = _blur(x * x) - mu_x * mu_x, _blur(y * y) - mu_y * mu_y, _blur(x * y) - mu_x * mu_y
        structure = (2.0 * cov + C2) / (var_x + var_y + C2)
        ssim_error = np.maximum(1.0 - (1.0 - (mu_x - mu_y) ** 2) * structure, 0.0)
        edge = (1.0 + np.abs(y - mu_y)) / (1.0 + np.abs(x - mu_x)) - 1.0
        features.append((*_pooled(ssim_error), *_pooled(np.maximum(edge, 0.0)), *_pooled(np.maximum(-edge, 0.0))))
    return features


def ssimulacra2(reference: np.ndarray, test: np.ndarray) -> float:
    """SSIMULACRA 2 score of 8-bit sRGB ``test`` against ``reference`` (H x W x 3): 100 is
    identical, 90 visually lossless, 70 high, 50 medium, 30 low quality, below 0 very poor."""
    if reference.shape != test.shape or reference.ndim != 3 or reference.shape[2] != 3:
        raise ValueError(f"need two H x W x 3 images of one size, not {reference.shape} and {test.shape}")
    if min(reference.shape[:2]) < 8:
        raise ValueError(f"SSIMULACRA 2 needs at least 8 x 8 pixels, not {reference.shape[1]} x {reference.shape[0]}")
    a, b = _srgb_to_linear(reference), _srgb_to_linear(test)
    scales = []
    for scale in range(SCALES):
        # As in the C++ tool, the size is checked before downsampling: the last scale can be 4 px.
        if min(a.shape[:2]) < 8:
            break
        if scale:
            a, b = _downsample(a), _downsample(b)
        scales.append(_scale_features(a, b))
    # The weights are read in the C++ tool's order (channel, scale, pooling, map), one after
    # another: with fewer than six scales, later weights shift onto earlier scales, as there.
    ordered = [value for channel in range(3) for features in scales
               for pool in range(2) for value in (features[channel][pool], features[channel][2 + pool],
                                                  features[channel][4 + pool])]
    score = float(np.dot(WEIGHTS[:len(ordered)], np.abs(ordered))) * 0.9562382616834844
    score = 2.326765642916932 * score - 0.020884521182843837 * score ** 2 + 6.248496625763138e-05 * score ** 3
    return 100.0 - 10.0 * score ** 0.6276336467831387 if score > 0 else 100.0
