"""Latent quantization: the 8-bit mapping, the latent palette, dithering and lookup.

Shapes: a latent is (C, H, W) float32 as the neural stages use it; the palette stage works on
"latent pixels", the (H, W, C) view, where each latent cell is a C-channel colour.
"""
from __future__ import annotations

import numpy as np

from . import _kernels
from .errors import SdcFormatError

KMEANS_ITERATIONS = 12


# The 2022 mapping's step in the diffusion model's units: 0.18215 raw units of SD 1.x's VAE, whose
# latents that model scales by 0.18215; 255 steps span about +-4.2 of its unit-variance latents.
SD_MODEL_STEP = 0.18215 ** 2


def sd_quant_mapping(scaling_factor: float, channels: int) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """The original experiment's mapping, for raw latents that the diffusion model scales by
    ``scaling_factor``: the same span of the model's latents for every VAE, centred at 127.5.

    For SD 1.x (0.18215), ``q = round(clamp(z / (255 * s) + 0.5, 0, 1) * 255)``, which is
    ``round(clamp(z / s + 127.5, 0, 255))``.
    """
    return (SD_MODEL_STEP / float(scaling_factor),) * channels, (127.5,) * channels


def fit_quant_mapping(latent: np.ndarray, base_scale, base_zero, *, adaptive: bool, channel_weights=None,
                      quant_step: float | None = None) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """The 8-bit mapping for a (C, h, w) latent, float32-exact as the header stores it.

    ``base_scale``/``base_zero`` is the model set's mapping.  Without ``quant_step``: that
    mapping, or where ``adaptive`` each channel's own range within it.  With ``quant_step``: a
    coarser mapping for u8 mode, quant_step / sqrt(w_c) raw units for channel c (w: the
    decoder's sensitivity, ``channel_weights``), so the channels the decoder notices most are
    quantized most finely, never so finely that the image's range would not fit 256 levels.
    """
    if quant_step is None and not adaptive:
        return tuple(base_scale), tuple(base_zero)
    scale = np.array(base_scale, np.float64)
    zero = np.array(base_zero, np.float64)
    flat = latent.reshape(latent.shape[0], -1).astype(np.float64)
    lo, hi = flat.min(axis=1), flat.max(axis=1)
    if adaptive:  # never beyond the range the model set's mapping covers
        lo_limit, hi_limit = -zero * scale, (255 - zero) * scale
        lo, hi = np.clip(lo, lo_limit, hi_limit), np.clip(hi, lo_limit, hi_limit)
    if quant_step is None:
        levels_step = np.maximum((hi - lo) / 255, scale / 255)
        levels_step = levels_step.astype(np.float32).astype(np.float64)
        offset = (-lo / levels_step).astype(np.float32).astype(np.float64)
        return tuple(levels_step.tolist()), tuple(offset.tolist())
    weights = np.ones_like(scale) if channel_weights is None else np.asarray(channel_weights, np.float64)
    levels_step = np.maximum(quant_step / np.sqrt(weights), (hi - lo) / 254)
    levels_step = levels_step.astype(np.float32).astype(np.float64)
    # An integer zero point: a latent value of 0 is exactly representable.
    offset = np.clip(np.round(-lo / levels_step), 0, 255).astype(np.float32).astype(np.float64)
    return tuple(levels_step.tolist()), tuple(offset.tolist())


def to_level_space(latent: np.ndarray, scale, zero) -> np.ndarray:
    """(C, H, W) raw latent -> (H, W, C) float64 levels in [0, 255] (not yet rounded)."""
    scale = np.asarray(scale, np.float64)[:, None, None]
    zero = np.asarray(zero, np.float64)[:, None, None]
    levels = np.clip(latent.astype(np.float64) / scale + zero, 0.0, 255.0)
    return np.ascontiguousarray(levels.transpose(1, 2, 0))


def quantize_u8(latent: np.ndarray, scale, zero) -> np.ndarray:
    """(C, H, W) raw latent -> (C, H, W) uint8 levels (round half to even)."""
    return np.ascontiguousarray(np.rint(to_level_space(latent, scale, zero)).astype(np.uint8).transpose(2, 0, 1))


def dequantize_u8(levels: np.ndarray, scale, zero) -> np.ndarray:
    """(C, H, W) uint8 levels -> (C, H, W) float32 raw latent: z = (q - zero) * scale."""
    scale = np.asarray(scale, np.float64)[:, None, None]
    zero = np.asarray(zero, np.float64)[:, None, None]
    return ((levels.astype(np.float64) - zero) * scale).astype(np.float32)


def _weighted(array: np.ndarray, weights) -> np.ndarray:
    """Scale the channel axis by sqrt(weights): squared distances become weighted ones."""
    array = np.ascontiguousarray(array, np.float64)
    return array if weights is None else np.ascontiguousarray(array * np.sqrt(np.asarray(weights, np.float64)))


def build_palette(pixels: np.ndarray, colors: int, *, seed: int = 0, weights=None,
                  iterations: int = KMEANS_ITERATIONS) -> np.ndarray:
    """K-means palette of (N, C) float64 level-space pixels -> (K', C) uint8, K' <= colors.

    k-means++ seeding and the assignment step of the Lloyd iterations run in the Cython kernels;
    the seeding draws its uniforms from numpy's PCG64, so a seed gives the same palette
    everywhere.  Centroids are rounded to 8 bits at the end, merging any duplicates.
    ``weights`` (one per channel) make the clustering minimize a weighted squared error.
    The entries are ordered along their principal axis, so that alike entries get near
    indices: coder 3 predicts an index from its neighbours' (docs/FORMAT.md).
    """
    unique = np.unique(np.rint(pixels).astype(np.uint8), axis=0)
    if len(unique) <= colors:  # few distinct cells: the palette is exactly those cells
        return _ordered(unique, weights)
    pixels = _weighted(pixels, weights)
    n = pixels.shape[0]
    colors = min(colors, n)
    picks = np.empty(colors, np.intp)
    _kernels.kmeans_plus_plus(pixels, np.random.default_rng(seed).random(colors), picks)
    centers = pixels[picks].copy()
    labels = np.empty(n, np.uint16)
    distances = np.empty(n, np.float64)
    for _ in range(iterations):
        _kernels.nearest_assign(pixels, centers, labels, distances)
        counts = np.bincount(labels, minlength=colors)
        sums = np.stack([np.bincount(labels, weights=pixels[:, c], minlength=colors)
                         for c in range(pixels.shape[1])], axis=1)
        filled = counts > 0
        centers[filled] = sums[filled] / counts[filled, None]
        # An empty cluster moves to the worst-served pixel.
        for k in np.flatnonzero(~filled):
            worst = int(np.argmax(distances))
            centers[k] = pixels[worst]
            distances[worst] = 0.0
    if weights is not None:
        centers = centers / np.sqrt(np.asarray(weights, np.float64))
    return _ordered(np.unique(np.clip(np.rint(centers), 0, 255).astype(np.uint8), axis=0), weights)


def _ordered(palette: np.ndarray, weights) -> np.ndarray:
    """The (K, C) palette's entries sorted by their projection on its first principal axis
    (weighted as the clustering is); the axis's sign makes the first channel's weight positive
    (ties in the projection keep the lexicographic order np.unique gave)."""
    if len(palette) < 3:
        return palette
    entries = _weighted(palette.astype(np.float64), weights)
    centred = entries - entries.mean(axis=0)
    axis = np.linalg.svd(centred, full_matrices=False)[2][0]
    axis = axis if axis[np.argmax(np.abs(axis))] > 0 else -axis
    return palette[np.argsort(centred @ axis, kind="stable")]


def dither(levels: np.ndarray, palette: np.ndarray, weights=None) -> np.ndarray:
    """Floyd-Steinberg error diffusion of (H, W, C) levels against a uint8 palette -> (H, W) uint16."""
    indices = np.empty(levels.shape[:2], np.uint16)
    _kernels.dither_floyd_steinberg(_weighted(levels, weights), _weighted(palette, weights), indices)
    return indices


def nearest(levels: np.ndarray, palette: np.ndarray, weights=None) -> np.ndarray:
    """Plain nearest-colour mapping (no dithering) of (H, W, C) levels -> (H, W) uint16."""
    h, w, c = levels.shape
    labels = np.empty(h * w, np.uint16)
    distances = np.empty(h * w, np.float64)
    _kernels.nearest_assign(_weighted(levels.reshape(h * w, c), weights), _weighted(palette, weights),
                            labels, distances)
    return labels.reshape(h, w)


def lookup(indices: np.ndarray, palette: np.ndarray) -> np.ndarray:
    """(H, W) palette indices -> (C, H, W) uint8 levels.  An out-of-range index is a format error."""
    indices = np.ascontiguousarray(indices)
    if indices.dtype not in (np.uint8, np.uint16):
        indices = indices.astype(np.uint16)
    out = np.empty(indices.shape + (palette.shape[1],), np.uint8)
    try:
        _kernels.palette_lookup(indices, np.ascontiguousarray(palette, np.uint8), out)
    except IndexError as exc:
        raise SdcFormatError(str(exc)) from None
    return np.ascontiguousarray(out.transpose(2, 0, 1))
