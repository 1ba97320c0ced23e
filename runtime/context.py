"""Coder 3: planar 8-bit latent levels through a context model and a range coder.

The levels of every channel are coded coarse to fine: first a sparse grid (every
``BASE_SPACING``-th cell), then, halving the spacing each time, the centres of the grid's
squares (predicted from their four corners) and the midpoints of its edges (from their four
axial neighbours).  Each cell's prediction is the rounded mean of its neighbours that lie inside
the latent; its context is the channel and a bucket of the neighbours' spread (max − min).  The
residual, wrapped to a signed byte and zigzagged, is coded with adaptive integer counts: the
channel's own counts for the context plus the counts all channels share for it, which start from
a fixed geometric prior.  Counts change only between steps, so each step is a few vectorized
passes; the arithmetic coding itself is constriction's range coder.

Exactness: every count is an integer and every update integer arithmetic.  constriction
receives a step's counts as float64 (exact: they stay below 2**53) and turns them into its
fixed-point model with IEEE basic arithmetic only (``Categorical(perfect=False)``), so every
machine derives the same model and decodes the same levels (docs/FORMAT.md, "Coder 3").
"""
from __future__ import annotations

import numpy as np

from .errors import SdcFormatError

BASE_SPACING = 64
# A cell's context bucket: 0 for the base grid, else 1 + the number of these edges its
# neighbours' spread reaches (so 1: spread 0, ..., 13: spread >= 64).
SPREAD_EDGES = np.array([1, 2, 3, 4, 6, 8, 11, 15, 20, 28, 40, 64])
CONTEXTS = 2 + len(SPREAD_EDGES)
# The shared counts' prior for each context: PRIOR_PEAK at zigzag symbol 0, each next symbol
# the previous times PRIOR_DECAY[k] / 256 (rounded down), plus 1; fitted to the mean residual
# of each context on Kodak latents.
PRIOR_PEAK = 1024
PRIOR_DECAY = (254, 35, 106, 142, 168, 190, 208, 218, 228, 235, 241, 244, 246, 247)
# What a coded symbol adds to its counts, and the totals past which counts are halved.
INCREMENT = 64
SHARED_LIMIT = 1 << 16
CHANNEL_LIMIT = 1 << 17
# The shared counts enter a channel's model scaled to this total.
SHARED_WEIGHT = 8192
ALPHABET = 256
# With counts held to those limits no symbol is likelier than 1 - 255 / (2**17 + 8192 + 2*256),
# so each costs at least 1/379 bit: a payload claiming more levels per bit than this is refused
# before any is decoded (a hostile header's size cannot buy a long decode with a short stream).
MAX_LEVELS_PER_BIT = 512


def prior() -> np.ndarray:
    counts = np.zeros((CONTEXTS, ALPHABET), np.int64)
    for k, decay in enumerate(PRIOR_DECAY):
        value = PRIOR_PEAK
        for z in range(ALPHABET):
            counts[k, z] = value + 1
            value = value * decay // 256
    return counts


def coding_steps(height: int, width: int):
    """(rows, columns, neighbour offsets) of each step, in coding order; offsets None for the
    base grid.  Cells are in row-major order within a step (the midpoints: the rows' first)."""
    s = BASE_SPACING
    ys, xs = np.mgrid[0:height:s, 0:width:s]
    yield ys.ravel(), xs.ravel(), None
    while s > 1:
        h = s // 2
        ys, xs = np.mgrid[h:height:s, h:width:s]
        yield ys.ravel(), xs.ravel(), ((-h, -h), (-h, h), (h, -h), (h, h))
        rows = np.mgrid[0:height:s, h:width:s].reshape(2, -1)
        columns = np.mgrid[h:height:s, 0:width:s].reshape(2, -1)
        both = np.concatenate([rows, columns], axis=1)
        yield both[0], both[1], ((-h, 0), (h, 0), (0, -h), (0, h))
        s = h


def predict(levels: np.ndarray, ys, xs, offsets) -> tuple[np.ndarray, np.ndarray]:
    """(C, n) predictions and context buckets of the cells (ys, xs), from the coded levels."""
    channels, height, width = levels.shape
    if offsets is None:
        shape = (channels, ys.size)
        return np.full(shape, 128, np.int32), np.zeros(shape, np.int32)
    total = np.zeros((channels, ys.size), np.int32)
    count = np.zeros(ys.size, np.int32)
    high = np.full((channels, ys.size), -1, np.int32)
    low = np.full((channels, ys.size), ALPHABET, np.int32)
    for dy, dx in offsets:
        yy, xx = ys + dy, xs + dx
        inside = (yy >= 0) & (yy < height) & (xx >= 0) & (xx < width)
        values = levels[:, yy[inside], xx[inside]].astype(np.int32)
        total[:, inside] += values
        count[inside] += 1
        high[:, inside] = np.maximum(high[:, inside], values)
        low[:, inside] = np.minimum(low[:, inside], values)
    prediction = (total + count // 2) // count
    bucket = 1 + np.searchsorted(SPREAD_EDGES, high - low, side="right").astype(np.int32)
    return prediction, bucket


def round_levels(values: np.ndarray, deadzone: float) -> np.ndarray:
    """(C, h, w) unrounded levels -> uint8 levels, each rounded after moving it ``deadzone``
    levels toward its prediction (not past it), in coding order: the prediction is the one the
    coder will make from the levels already rounded.  Residuals shrink, and with them the bits;
    0 is plain rounding."""
    values = np.clip(np.asarray(values, np.float64), 0, 255)
    levels = np.zeros(values.shape, np.uint8)
    for ys, xs, offsets in coding_steps(*values.shape[1:]):
        prediction, _ = predict(levels, ys, xs, offsets)
        difference = values[:, ys, xs] - prediction
        shrunk = np.sign(difference) * np.maximum(np.abs(difference) - deadzone, 0)
        levels[:, ys, xs] = np.clip(np.rint(prediction + shrunk), 0, 255)
    return levels


def to_symbols(values: np.ndarray, prediction: np.ndarray) -> np.ndarray:
    signed = (values.astype(np.int32) - prediction + 128) % 256 - 128
    return np.where(signed >= 0, 2 * signed, -2 * signed - 1)


def from_symbols(symbols: np.ndarray, prediction: np.ndarray) -> np.ndarray:
    signed = np.where(symbols % 2 == 0, symbols // 2, -(symbols + 1) // 2)
    return ((prediction + signed) % 256).astype(np.uint8)


class Counts:
    """The adaptive model: shared counts per context, each channel's own per context."""

    def __init__(self, channels: int):
        self.shared = prior()
        self.own = np.zeros((channels, CONTEXTS, ALPHABET), np.int64)

    def tables(self) -> np.ndarray:
        """(C, CONTEXTS, ALPHABET) integer frequencies of this step's models, all positive."""
        shared = self.shared * SHARED_WEIGHT // self.shared.sum(axis=1, keepdims=True) + 1
        return self.own + shared[None]

    def update(self, models: np.ndarray, symbols: np.ndarray) -> None:
        """Add the step's symbols (``models``: channel * CONTEXTS + context of each)."""
        channels = self.own.shape[0]
        flat = np.bincount(models * ALPHABET + symbols, minlength=channels * CONTEXTS * ALPHABET)
        added = flat.reshape(channels, CONTEXTS, ALPHABET) * INCREMENT
        self.own += added
        self.shared += added.sum(axis=0)
        for counts, limit in ((self.own, CHANNEL_LIMIT), (self.shared, SHARED_LIMIT)):
            while (full := counts.sum(axis=-1) > limit).any():
                counts[full] = (counts[full] + 1) // 2


def _step_models(bucket: np.ndarray) -> np.ndarray:
    """Model index (channel * CONTEXTS + context) of each of a step's (C, n) cells."""
    return np.arange(bucket.shape[0], dtype=np.int32)[:, None] * CONTEXTS + bucket


def _step_groups(levels: np.ndarray, counts: Counts, ys, xs, offsets):
    """What encoder and decoder derive alike for a step: the (C, n) predictions, each cell's
    model (flat, C-major), and the groups the symbols are coded in: (model's table, the flat
    cell indices of its symbols in step order), in model order."""
    prediction, bucket = predict(levels, ys, xs, offsets)
    models = _step_models(bucket).ravel()
    order = np.argsort(models, kind="stable")
    tables = counts.tables().reshape(-1, ALPHABET)
    used, starts, sizes = np.unique(models[order], return_index=True, return_counts=True)
    groups = [(tables[model], order[start:start + size]) for model, start, size in zip(used, starts, sizes)]
    return prediction, models, groups


def _categorical(frequencies: np.ndarray):
    import constriction

    return constriction.stream.model.Categorical(frequencies.astype(np.float64), perfect=False)


def encode(levels: np.ndarray) -> bytes:
    """(C, h, w) uint8 levels -> the coder's bytes (little-endian 32-bit words)."""
    import constriction

    levels = np.ascontiguousarray(levels, np.uint8)
    channels, height, width = levels.shape
    counts = Counts(channels)
    encoder = constriction.stream.queue.RangeEncoder()
    for ys, xs, offsets in coding_steps(height, width):
        prediction, models, groups = _step_groups(levels, counts, ys, xs, offsets)
        symbols = to_symbols(levels[:, ys, xs], prediction).ravel()
        for table, cells in groups:
            encoder.encode(symbols[cells].astype(np.int32), _categorical(table))
        counts.update(models, symbols)
    return encoder.get_compressed().astype("<u4").tobytes()


def decode(data: bytes, shape: tuple[int, int, int]) -> np.ndarray:
    """The coder's bytes -> (C, h, w) uint8 levels.  SdcFormatError for a payload that is
    empty or not whole words, that the range decoder rejects, or that it shows unfinished after
    the last level (constriction cannot see every trailing word: the file's CRC32 covers
    integrity; a hostile stream decodes to at most the section's levels)."""
    import constriction

    if len(data) % 4 or not data:
        raise SdcFormatError("context-coded stream is empty or not a whole number of 32-bit words")
    channels, height, width = shape
    if channels * height * width > MAX_LEVELS_PER_BIT * 8 * len(data):
        raise SdcFormatError(f"a context-coded stream of {len(data)} bytes cannot hold"
                             f" {channels * height * width} levels")
    levels = np.zeros(shape, np.uint8)
    counts = Counts(channels)
    try:
        decoder = constriction.stream.queue.RangeDecoder(np.frombuffer(data, "<u4").astype(np.uint32))
        for ys, xs, offsets in coding_steps(height, width):
            prediction, models, groups = _step_groups(levels, counts, ys, xs, offsets)
            symbols = np.empty(models.size, np.int32)
            for table, cells in groups:
                symbols[cells] = decoder.decode(_categorical(table), cells.size)
            levels[:, ys, xs] = from_symbols(symbols.reshape(prediction.shape), prediction)
            counts.update(models, symbols)
        exhausted = decoder.maybe_exhausted()
    except (ValueError, RuntimeError, AssertionError) as exc:
        raise SdcFormatError(f"corrupt context-coded stream: {exc}") from None
    if not exhausted:
        raise SdcFormatError("context-coded stream does not end where the section's levels do")
    return levels
