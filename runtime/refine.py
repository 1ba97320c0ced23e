"""Closed-loop encoding (the ``effort`` option): the encoder runs the decoder a file will meet
and moves the latent so that the decoded image comes closer to the input.

The encoder's output E(x) is not the latent the decoder D turns back into the closest image.
The update ``z <- z + step * (E(x) - E(D(z)))`` uses the encoder as an approximate inverse of
the decoder, so it needs forward passes of the set's own graphs only: no gradients, no torch.
Each latent stays in E(x)'s per-channel range, so the 8-bit mapping (and with it the file
size) does not grow.

Two phases:
- *free* passes refine the unquantized latent.  They do not depend on the latent coding, so
  a size search runs them once for all the qualities it tries.  Each pass raises the PSNR of
  the unquantized latent but also its bytes once quantized, and at coarse quantization (the
  palettes) it loses more than it gains; so E(x) and every free pass are *candidates*, each
  coded and decoded as a file, and the best at equal bytes wins (BENCHMARKS.md §7).
- *quantized* passes start from that winner and run the decoder on the latent as the file
  will hold it (palette, steps, and the UNet steps where the file asks for them), so the
  update also corrects the quantization error.  The quantizer moves with the latent, so this
  loop need not converge: each pass's file is scored the same way, which makes a quantized
  pass never worse than stopping before it.

The bitstream is the same at every effort: the decoder cannot tell.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

# effort -> (free passes, quantized passes).  A free pass costs one decode and one encode, and
# scoring each candidate one more decode; a quantized pass costs two decodes and an encode.
# On Kodak (BENCHMARKS.md §7) gains flatten after three free passes; the quantized ones add
# little on average, but each file they pick is never worse at equal bytes.
PASSES = {0: (0, 0), 1: (1, 0), 2: (2, 0), 3: (3, 0), 4: (3, 1), 5: (4, 1), 6: (4, 2), 7: (5, 3), 8: (5, 4),
          9: (6, 6)}
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


def settle(latent: np.ndarray, effort: int, loop: Loop, progress=None) -> list[np.ndarray]:
    """E(x) = ``latent`` and the latent after each free pass of ``effort``: the candidates."""
    passes = PASSES[effort][0]
    lo, hi = _bounds(latent)
    candidates = [latent]
    for done in range(passes):
        refined = candidates[-1] + FREE_STEP * (latent - loop.encode(loop.decode(candidates[-1])))
        candidates.append(np.clip(refined, lo, hi).astype(np.float32))
        _report(progress, "refine", done + 1, passes)
    return candidates


def best_file(rgb: np.ndarray, latent: np.ndarray, candidates: list[np.ndarray], effort: int, code, loop: Loop,
              progress=None) -> bytes:
    """``code(z)`` writes a file for latent z.  Scores the file of each candidate and of each
    quantized pass of ``effort`` (which starts from the best candidate) by PSNR at equal bytes
    and returns the best."""
    best, best_score, best_latent, best_shown = b"", -math.inf, None, None

    def consider(candidate: np.ndarray) -> np.ndarray:
        """Writes and scores the candidate's file; returns the image it decodes to."""
        nonlocal best, best_score, best_latent, best_shown
        data = code(candidate)
        shown = loop.decode_file(data)
        score = psnr(rgb, shown) - DB_PER_DOUBLING * math.log2(len(data))
        if score > best_score:
            best, best_score, best_latent, best_shown = data, score, candidate, shown
        return shown

    passes = PASSES[effort][1]
    files = len(candidates) + passes
    for done, candidate in enumerate(candidates, 1):
        consider(candidate)
        _report(progress, "score", done, files)
    refined, shown = best_latent, best_shown
    lo, hi = _bounds(latent)
    for done in range(len(candidates) + 1, files + 1):
        refined = np.clip(refined + QUANTIZED_STEP * (latent - loop.encode(shown)), lo, hi).astype(np.float32)
        shown = consider(refined)
        _report(progress, "score", done, files)
    return best


def _report(progress, stage: str, done: int, total: int) -> None:
    if progress is not None:
        progress(stage, done, total)
