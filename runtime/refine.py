"""Closed-loop encoding (the ``effort`` option): the encoder runs the decoder a file will meet
and moves the latent so that the decoded image comes closer to the input.

The encoder's output E(x) is not the latent the decoder D turns back into the closest image.
The update ``z <- z + step * (E(x) - E(D(z)))`` uses the encoder as an approximate inverse of
the decoder, so it needs forward passes of the set's own graphs only.  The descent below runs
a gradient graph that the export writes; neither needs torch.  Each latent stays in E(x)'s
per-channel range, so the 8-bit mapping (and with it the file size) does not grow.

Two phases:
- *free* passes refine the unquantized latent.  They do not depend on the latent coding, so
  a size search runs them once for all the qualities it tries.  Each pass raises the PSNR of
  the unquantized latent but also its bytes once quantized, and at coarse quantization (the
  palettes) it loses more than it gains; so E(x) and every free pass are *candidates*, each
  coded and decoded as a file, and the best at equal bytes wins (BENCHMARKS.md §7).
- then, from that winner, the latent is refined as the file will hold it (palette or steps),
  so that the refinement also corrects the quantization error, in one of two ways:
  - *descent* steps, where the set ships the decoder's gradient graph (TAE sets; at any
    image size, since the graph runs in tiles where the image does not fit the memory budget
    whole): Adam on the squared error of the decoded image, with the gradient taken at the
    latent the file holds and applied to the unquantized one (the straight-through
    estimator).  The true gradient knows which latent values the decoder's output depends on
    most; the encoder-as-inverse update above cannot, so at coarse steps it cannot choose
    roundings (BENCHMARKS.md §7: several dB at middle qualities).  The graph returns the
    squared error with the gradient, which scores each step's file without a decode; where
    E(x) is the only candidate (no free passes), the first step scores it too.  The steps
    quantize the latent as its file would without entropy-coding it (``held``).
  - otherwise *quantized* passes: the update above, run on the file's latent (and through
    the UNet steps where the file asks for them).
  The quantizer moves with the latent, so neither need converge: the last file is scored
  like the candidates, which makes refining never worse than stopping before it (the
  descent's last file is taken unscored where every step scored above the one before:
  ``run_descent``).

The bitstream is the same at every effort: the decoder cannot tell.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from .image import psnr
from .progress import report

# Sets without the decoder's gradient: effort -> (free passes, quantized passes).  A free pass
# costs one decode and one encode, and scoring each candidate one more decode; a quantized
# pass costs two decodes and an encode.
PASSES = {0: (0, 0), 1: (1, 0), 2: (2, 0), 3: (3, 0), 4: (3, 1), 5: (4, 1), 6: (4, 2), 7: (5, 3), 8: (5, 4), 9: (6, 6)}
# Sets that descend: effort -> (free passes, descent steps).  A step costs one run of the
# gradient graph (about two decodes) and a coding of the latent; the free passes, which the
# descent makes up for, come in only at high efforts (BENCHMARKS.md §15).
DESCENT = {0: (0, 0), 1: (0, 2), 2: (0, 4), 3: (0, 8), 4: (1, 12), 5: (1, 16), 6: (1, 20), 7: (2, 24), 8: (2, 32),
           9: (2, 48)}
# From this effort the quantized passes decode through the UNet steps the file asks for.
DENOISE_IN_LOOP_EFFORT = 8
# Step sizes: 0.5 converges for the free passes (the probe in issue 10); the quantized passes
# take a smaller one because the quantizer adds its own error to every update.
FREE_STEP = 0.5
QUANTIZED_STEP = 0.3
# Adam's step for the descent, in raw latent units (TAE latents span about +-3): its first
# steps move each value by about the rate (Adam's first step is the gradient's sign), so they
# start large and shrink by DESCENT_DECAY a step down to DESCENT_RATE_FLOOR, where a long
# descent settles (BENCHMARKS.md §15); the usual moment decays.
DESCENT_RATE = 0.05
DESCENT_DECAY = 0.9
DESCENT_RATE_FLOOR = 0.015
ADAM_BETAS = (0.9, 0.999)
# The narrowest range (raw latent units) a channel may move in, in the latent of an image
# under 64x64 pixels (SMALL_LATENT_CELLS cells): a tiny image's latent spans almost nothing
# (one cell: nothing), which would pin the refinement to E(x) (a solid 8x8 colour stayed at
# 23 dB, and reached 40 with room to move).  Larger latents keep E(x)'s own range.
MIN_SPAN = 1.0
SMALL_LATENT_CELLS = 64
# Images under SMALL_IMAGE_PIXELS run on a canvas of that size anyway (neural.MIN_CODED_SIDE),
# where a descent step costs little; they take up to MAX_SMALL_IMAGE_FACTOR times the steps,
# because their few latent cells must cross whole quantization steps to move at all.  Measured
# on TAEF2, five solid colours at 8x8: 20-44 dB with the effort's 4 steps, 30.5-48 dB with 32.
SMALL_IMAGE_PIXELS = 64 * 64
MAX_SMALL_IMAGE_FACTOR = 8
# Where the set's decoder is int8 (and the gradient graph, always fp32, ships with the fp32
# decoder as its reference_decoder), the descent aims at the image less this fraction of the
# int8 decoder's offset from fp32 at E(x): tuned to the fp32 decoder's exact response, the
# descent's files lost up to 0.74 dB on the int8 decoder; aimed halfway, the two decoders'
# errors share the offset (BENCHMARKS.md section 17).
INT8_AIM = 0.5
# The mean squared error (8-bit levels) that rounding the decoder's output to 8 bits adds,
# for an error uniform over a level: the gradient graph's error does not include it, the
# decoded files the loop also scores do.
ROUNDING_SQUARED_ERROR = 1 / 12
# How the loop trades bytes for PSNR when choosing the best file: the slope of the
# Kodak rate-distortion curve, about 2 dB per doubling of bytes (BENCHMARKS.md §3).
DB_PER_DOUBLING = 2.0


@dataclass(frozen=True)
class Loop:
    """The neural stages the loop runs, on images of the input's size.

    ``target``: the (H, W, 3) uint8 image the files should show.  ``encode``: (H, W, 3) uint8
    -> (C, h, w) latent.  ``decode``: latent -> (H, W, 3) uint8, the decoder alone.
    ``decode_file``: .sdc bytes -> (H, W, 3) uint8 as a decoder of the file shows it (with the
    file's UNet steps at high effort).  ``gradient``: latent -> (the gradient of the decoded
    image's squared error against the target, the mean squared error in 8-bit levels; in a
    set with an int8 decoder, against the target less INT8_AIM of that decoder's offset), or
    None where the set has no gradient graph (or the file's UNet steps would be skipped by
    it)."""

    target: np.ndarray
    encode: object
    decode: object
    decode_file: object
    gradient: object


def _bounds(latent: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Each channel's range in E(x); in a small image's latent at least MIN_SPAN wide (around
    its middle)."""
    flat = latent.reshape(latent.shape[0], -1)
    lo, hi = flat.min(axis=1), flat.max(axis=1)
    grow = np.maximum(MIN_SPAN - (hi - lo), 0) / 2 if flat.shape[1] < SMALL_LATENT_CELLS else 0.0
    return (lo - grow)[:, None, None], (hi + grow)[:, None, None]


def settle(latent: np.ndarray, effort: int, loop: Loop, progress=None) -> list[np.ndarray]:
    """E(x) = ``latent`` and the latent after each free pass of ``effort``: the candidates."""
    passes = plan(effort, loop)[0]
    lo, hi = _bounds(latent)
    candidates = [latent]
    report(progress, "refine", 0, passes)
    for done in range(passes):
        refined = candidates[-1] + FREE_STEP * (latent - loop.encode(loop.decode(candidates[-1])))
        candidates.append(np.clip(refined, lo, hi).astype(np.float32))
        report(progress, "refine", done + 1, passes)
    return candidates


def best_file(latent: np.ndarray, candidates: list[np.ndarray], effort: int, code, held, loop: Loop,
              progress=None, *, descend: bool = True, budget: int | None = None) -> bytes:
    """``code(z)`` writes a file for latent z; ``held(z)`` is the latent that file holds, as its
    decoder dequantizes it (without the entropy coding).  Scores the file of each candidate and
    of the refinement of ``effort`` (quantized passes or the descent, which start from the best
    candidate; no descent unless ``descend``) by PSNR at equal bytes and returns the best; with
    a byte ``budget``, the file of highest PSNR among those within it (E(x)'s must be)."""
    best = _Best(budget)
    _, passes, steps = plan(effort, loop)
    steps *= min(MAX_SMALL_IMAGE_FACTOR, max(1, SMALL_IMAGE_PIXELS // (loop.target.shape[0] * loop.target.shape[1])))
    if not descend:
        steps = 0
    if len(candidates) == 1 and not passes and not steps and budget is None:
        return code(candidates[0])  # nothing to choose between, so no decode to score it
    lo, hi = _bounds(latent)
    if steps and len(candidates) == 1:
        # The descent's first step scores the only candidate, E(x), from its gradient graph.
        run_descent(latent, steps, code, held, loop, lo, hi, best, progress)
        return best.data
    files = len(candidates) + passes + (steps > 0)
    report(progress, "score", 0, files)
    for done, candidate in enumerate(candidates, 1):
        best.consider(candidate, code, loop)
        report(progress, "score", done, files)
    refined, shown = best.latent, best.shown
    for done in range(len(candidates) + 1, len(candidates) + passes + 1):
        refined = np.clip(refined + QUANTIZED_STEP * (latent - loop.encode(shown)), lo, hi).astype(np.float32)
        shown = best.consider(refined, code, loop)
        report(progress, "score", done, files)
    if steps:
        run_descent(best.latent, steps, code, held, loop, lo, hi, best, progress)
        report(progress, "score", files, files)
    return best.data


class _Best:
    """The best file seen: by PSNR less DB_PER_DOUBLING per doubling of its bytes, or with a
    byte budget by PSNR among the files within it (a size target: every step of the descent
    whose file still fits may win, not only its last)."""

    def __init__(self, budget: int | None = None):
        self.budget = budget
        self.data, self.score, self.latent, self.shown = b"", -math.inf, None, None

    def offer(self, data: bytes, quality_db: float, latent: np.ndarray | None = None, shown=None) -> None:
        if self.budget is None:
            score = quality_db - DB_PER_DOUBLING * math.log2(len(data))
        elif len(data) <= self.budget:
            score = quality_db
        else:
            return
        if score > self.score:
            self.data, self.score, self.latent, self.shown = data, score, latent, shown

    def consider(self, candidate: np.ndarray, code, loop: Loop) -> np.ndarray:
        """Writes, decodes and scores the candidate's file; returns the image it decodes to."""
        data = code(candidate)
        shown = loop.decode_file(data)
        self.offer(data, psnr(loop.target, shown), candidate, shown)
        return shown


def plan(effort: int, loop: Loop) -> tuple[int, int, int]:
    """(free passes, quantized passes, descent steps) of ``effort`` with this loop: the descent
    where the set has the decoder's gradient, the quantized passes where it has not."""
    if loop.gradient is not None:
        free, steps = DESCENT[effort]
        return free, 0, steps
    free, quantized = PASSES[effort]
    return free, quantized, 0


def descends(effort: int, loop: Loop | None) -> bool:
    """Whether ``effort`` runs descent steps with this loop (None: no loop at all)."""
    return loop is not None and plan(effort, loop)[2] > 0


def run_descent(start: np.ndarray, steps: int, code, held, loop: Loop, lo: np.ndarray, hi: np.ndarray, best: _Best,
                progress=None) -> None:
    """``steps`` Adam steps from ``start`` on the decoded image's squared error, each gradient
    taken at the latent the file of the current latent holds (``held``: straight through the
    quantizer, whatever the mode); the latent stays within [lo, hi] per channel.  The files
    are offered to ``best``, scored by the error the gradient graph returns (plus the rounding
    to 8 bits, which the graph does not do).

    Without a byte budget the steps' files differ in bytes by about 1% (0.03 dB on the
    trade-off), so only the step of highest PSNR is coded.  The last latent has no gradient
    to score it: where every step scored above the one before, it is taken on trust, at the
    PSNR of the step before it (on Kodak its file was 0.5-1.3 dB above that step at effort 1,
    BENCHMARKS.md §16); otherwise, and with a budget, its file is decoded and scored."""
    refined = start.astype(np.float64)
    first = np.zeros_like(refined)
    second = np.zeros_like(refined)
    beta1, beta2 = ADAM_BETAS
    top_quality, top_latent, rising = -math.inf, None, True
    report(progress, "descend", 0, steps)
    for step in range(1, steps + 1):
        current = refined.astype(np.float32)
        gradient, squared_error = loop.gradient(held(current))
        quality = 10 * math.log10(255 ** 2 / (squared_error + ROUNDING_SQUARED_ERROR))
        if best.budget is not None:
            best.offer(code(current), quality)
        rising = rising and quality > top_quality
        if quality > top_quality:
            top_quality, top_latent = quality, current
        gradient = gradient.astype(np.float64)
        first = beta1 * first + (1 - beta1) * gradient
        second = beta2 * second + (1 - beta2) * gradient * gradient
        unbiased = first / (1 - beta1 ** step)
        scale = np.sqrt(second / (1 - beta2 ** step)) + 1e-12
        rate = max(DESCENT_RATE * DESCENT_DECAY ** (step - 1), DESCENT_RATE_FLOOR)
        refined = np.clip(refined - rate * unbiased / scale, lo, hi)
        report(progress, "descend", step, steps)
    last = refined.astype(np.float32)
    if rising and best.budget is None:
        best.offer(code(last), top_quality, last)
        return
    if best.budget is None:
        best.offer(code(top_latent), top_quality, top_latent)
    best.consider(last, code, loop)
