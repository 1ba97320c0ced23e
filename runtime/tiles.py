"""Overlapping tiles for the neural stages, and the weights that blend them.

A large image runs through a graph in overlapping tiles so that memory is bounded by the
tile, not the image.  The tiling depends only on the array's size and the tile size (never
on the provider, the thread count or the data), so a file decodes the same everywhere.
Overlaps are blended with linear ramps: each output sample is the weighted mean of the
tiles that cover it, and a tile's weight falls towards its inner edges, where its graph saw
the least context.
"""
from __future__ import annotations

import math

import numpy as np

# Neighbouring tiles share a quarter of a tile, at most this many pixels: more than the
# receptive field of the tiled graphs' edge effects that matter (measured: BENCHMARKS.md).
MAX_OVERLAP_PIXELS = 128


def spans(length: int, tile: int, align: int = 1, max_overlap: int | None = None,
          min_overlap: int = 0) -> list[tuple[int, int]]:
    """(start, stop) of the tiles along one axis of ``length`` samples: one span if it fits,
    else the fewest tiles of at most ``tile`` samples (the last may be up to ``align`` - 1
    longer), starts multiples of ``align``, spread evenly, neighbours overlapping by at least
    a quarter of a tile or ``max_overlap`` samples, whichever is less, and never by less than
    ``min_overlap`` (tiles then grow to twice that, at least)."""
    tile = max(tile, 2 * min_overlap) if tile > 0 else tile
    if tile <= 0 or length <= tile:
        return [(0, length)]
    tile = max(align, tile - tile % align)
    overlap = tile // 4 if max_overlap is None else min(tile // 4, max_overlap)
    overlap = max(overlap, min_overlap)
    overlap = max(align, -(-overlap // align) * align)
    count = max(2, math.ceil((length - overlap) / (tile - overlap)))
    # The smallest tile that still covers the length in that many tiles: no wasted work.
    needed = -(-(length + (count - 1) * overlap) // count)
    tile = min(tile, -(-needed // align) * align)
    last = length - tile
    starts = [(i * last // (count - 1)) // align * align for i in range(count)]
    return [(start, start + tile) for start in starts[:-1]] + [(starts[-1], length)]


def ramp(span: tuple[int, int], length: int, neighbours: tuple[int, int], scale: int = 1,
         margin: int = 0) -> np.ndarray:
    """Weights along one axis for the samples of ``span`` (in units of ``scale`` samples):
    1 inside, falling linearly over the overlap with each neighbour towards that side, and 0
    within ``margin`` span units of that side, where the tile's graph lacked context (with an
    overlap of more than twice the margin, a neighbour's weight covers those samples).
    ``neighbours`` = (overlap before, overlap after) in span units; 0 at the array's edges."""
    start, stop = span[0] * scale, min(span[1] * scale, length)
    position = np.arange(start, stop, dtype=np.float64)
    weight = np.ones(stop - start)
    before, after, skip = neighbours[0] * scale, neighbours[1] * scale, margin * scale
    if before:
        weight = np.minimum(weight, np.clip((position - start - skip + 1) / (before - 2 * skip + 1), 0, 1))
    if after:
        weight = np.minimum(weight, np.clip((stop - position - skip) / (after - 2 * skip + 1), 0, 1))
    return weight.astype(np.float32)


def overlaps(axis_spans: list[tuple[int, int]]) -> list[tuple[int, int]]:
    """For each span: how far it overlaps the previous and the next one."""
    result = []
    for i, (start, stop) in enumerate(axis_spans):
        before = axis_spans[i - 1][1] - start if i > 0 else 0
        after = stop - axis_spans[i + 1][0] if i + 1 < len(axis_spans) else 0
        result.append((max(before, 0), max(after, 0)))
    return result


def grid(height: int, width: int, tile: int, align: int = 1, max_overlap: int | None = None):
    """Every tile of a ``height`` x ``width`` array in raster order, as
    ((y0, y1), (x0, x1), (overlap above, below), (overlap left, right))."""
    rows, cols = spans(height, tile, align, max_overlap), spans(width, tile, align, max_overlap)
    row_overlaps, col_overlaps = overlaps(rows), overlaps(cols)
    for row, row_overlap in zip(rows, row_overlaps):
        for col, col_overlap in zip(cols, col_overlaps):
            yield row, col, row_overlap, col_overlap


def owned_spans(length: int, tile: int, margin: int) -> list[tuple[tuple[int, int], tuple[int, int]]]:
    """Tiles that own disjoint runs of samples covering ``length``, for graphs whose tiles must
    add up rather than blend (the decoder gradient): (owned (start, stop), run (start, stop)),
    each run its owned samples and ``margin`` more on either side (within the array), at most
    ``tile`` long unless that leaves a tile owning less than two margins (then it owns those:
    the margins would be most of the work); one tile owning everything if it fits."""
    if length <= tile:
        return [((0, length), (0, length))]
    owned = max(tile - 2 * margin, 2 * margin, 1)
    count = -(-length // owned)
    bounds = [i * length // count for i in range(count + 1)]
    return [((a, b), (max(a - margin, 0), min(b + margin, length))) for a, b in zip(bounds, bounds[1:])]
