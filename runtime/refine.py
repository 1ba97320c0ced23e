"""Closed-loop encoding (the ``effort`` option): the encoder runs the decoder a file will meet
and moves the latent so that the decoded image comes closer to the input.

The encoder's output E(x) is not the latent the decoder D turns back into the closest image.
The update ``z <- z + step * (E(x) - E(D(z)))`` uses the encoder as an approximate inverse of
the decoder, so it needs forward passes of the set's own graphs only: no gradients, no torch.
Each latent stays in E(x)'s per-channel range, so the 8-bit mapping (and with it the file
size) does not grow.

Two phases:
- *free* passes refine the unquantized latent.  They do not depend on the latent coding, so
  a size search runs them once for all the qualities it tries.
- *quantized* passes run the decoder on the latent as the file will hold it (palette, steps,
  and the UNet steps where the file asks for them), so the update also corrects the
  quantization error.  The quantizer moves with the latent, so this loop need not converge:
  each pass scores its file by PSNR at equal bytes and the best file wins, which makes a
  quantized pass never worse than stopping before it.

The bitstream is the same at every effort: the decoder cannot tell.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

# effort -> (free passes, quantized passes).  A pass costs one decode and one encode.  On Kodak
# (BENCHMARKS.md §7) one free pass gained the most per second; more passes and the quantized
# ones add little on average, but each file they pick is never worse at equal bytes.
PASSES = {0: (0, 0), 1: (1, 0), 2: (2, 0), 3: (2, 1), 4: (2, 2), 5: (3, 2), 6: (3, 3), 7: (4, 4), 8: (4, 6),
          9: (6, 8)}
# From this effort the quantized passes decode through the UNet steps the file asks for.
DENOISE_IN_LOOP_EFFORT = 8
# Step sizes: 0.5 converges for the free passes (the probe in issue 10); the quantized passes
# take a smaller one because the quantizer adds its own error to every update.
FREE_STEP = 0.5
QUANTIZED_STEP = 0.3
# How the quantized passes trade bytes for PSNR when choosing the best file: the slope of the
# Kodak rate-distortion curve, about 2 dB per doubling of bytes (BENCHMARKS.md §3).
DB_PER_DOUBLING = 2.0


@dataclass(frozen=True)
class Loop:
    """The neural stages the loop runs, on images of the input's size.

    ``encode``: (H, W, 3) uint8 -> (C, h, w) latent.  ``decode``: latent -> (H, W, 3) uint8,
    the decoder alone.  ``decode_file``: .sdc bytes -> (H, W, 3) uint8 as a decoder of the file
    shows it (with the file's UNet steps at high effort)."""

    encode: object
    decode: object
    decode_file: object


def psnr(reference: np.ndarray, test: np.ndarray) -> float:
    error = np.mean(np.square(reference.astype(np.float64) - test.astype(np.float64)))
    return math.inf if error == 0 else 10 * math.log10(255.0 ** 2 / error)


def _bounds(latent: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    flat = latent.reshape(latent.shape[0], -1)
    return flat.min(axis=1)[:, None, None], flat.max(axis=1)[:, None, None]


def settle(latent: np.ndarray, effort: int, loop: Loop, progress=None) -> np.ndarray:
    """The free passes of ``effort`` from E(x) = ``latent``: the refined unquantized latent."""
    passes = PASSES[effort][0]
    lo, hi = _bounds(latent)
    refined = latent
    for done in range(passes):
        refined = np.clip(refined + FREE_STEP * (latent - loop.encode(loop.decode(refined))), lo, hi)
        _report(progress, done + 1, passes)
    return refined.astype(np.float32)


def best_file(rgb: np.ndarray, latent: np.ndarray, settled: np.ndarray, effort: int, code, loop: Loop,
              progress=None) -> bytes:
    """The quantized passes of ``effort``: ``code(z)`` writes a file for latent z; returns the
    best file at equal bytes among the settled latent's and each pass's."""
    passes = PASSES[effort][1]
    data = code(settled)
    if not passes:
        return data
    lo, hi = _bounds(latent)
    refined, best, best_score = settled, data, -math.inf
    for done in range(passes + 1):
        shown = loop.decode_file(data)
        score = psnr(rgb, shown) - DB_PER_DOUBLING * math.log2(len(data))
        if score > best_score:
            best, best_score = data, score
        if done == passes:
            break
        refined = np.clip(refined + QUANTIZED_STEP * (latent - loop.encode(shown)), lo, hi).astype(np.float32)
        data = code(refined)
        _report(progress, done + 1, passes)
    return best


def _report(progress, done: int, total: int) -> None:
    if progress is not None:
        progress("refine", done, total)
