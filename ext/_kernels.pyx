# cython: language_level=3, boundscheck=False, wraparound=False, cdivision=True, initializedcheck=False
"""Latent palette kernels: nearest-colour assignment, Floyd-Steinberg dithering, palette lookup.

Exactness contract: every kernel uses float64 arithmetic in a fixed order (distances summed
over channels from channel 0 upwards, first minimum wins), and the module is compiled with
``-ffp-contract=off`` so no fused multiply-add changes a rounding.  The pure-Python
references in ``tests/reference_kernels.py`` follow the same order and must give identical
indices on every platform.
"""
from libc.stdlib cimport malloc, free
from libc.string cimport memset

ctypedef fused index_t:
    unsigned char
    unsigned short


cdef inline Py_ssize_t _nearest(const double* value, const double[:, ::1] palette,
                                Py_ssize_t channels, double* best_out) noexcept nogil:
    cdef Py_ssize_t k, c, best = 0
    cdef double dist, diff, best_dist = 1e308
    for k in range(palette.shape[0]):
        dist = 0.0
        for c in range(channels):
            diff = value[c] - palette[k, c]
            dist = dist + diff * diff
        if dist < best_dist:
            best_dist = dist
            best = k
    best_out[0] = best_dist
    return best


cdef void _check_palette(const double[:, ::1] palette, Py_ssize_t channels) except *:
    """A palette the kernels can index with 16-bit labels, one column per channel."""
    if palette.shape[1] != channels or palette.shape[0] == 0:
        raise ValueError("palette must be a non-empty (K, C) array matching the data's channels")
    if palette.shape[0] > 65536:
        raise ValueError("palette has more than 65536 entries")


def nearest_assign(const double[:, ::1] points, const double[:, ::1] palette,
                   unsigned short[::1] labels, double[::1] distances):
    """labels[i] = index of the palette row nearest to points[i] (squared L2, first minimum)."""
    cdef Py_ssize_t i, n = points.shape[0], channels = points.shape[1]
    _check_palette(palette, channels)
    if labels.shape[0] != n or distances.shape[0] != n:
        raise ValueError("labels and distances must have one entry per point")
    with nogil:
        for i in range(n):
            labels[i] = <unsigned short>_nearest(&points[i, 0], palette, channels, &distances[i])


def dither_floyd_steinberg(const double[:, :, ::1] image, const double[:, ::1] palette,
                           unsigned short[:, ::1] indices):
    """Floyd-Steinberg error diffusion of an (H, W, C) float image against a (K, C) palette.

    Raster order, left to right; the quantization error goes 7/16 right, 3/16 down-left,
    5/16 down, 1/16 down-right (weights that are exact in binary).
    """
    cdef Py_ssize_t h = image.shape[0], w = image.shape[1], channels = image.shape[2]
    cdef Py_ssize_t y, x, c, k
    cdef double err, dist
    cdef double* row_err
    cdef double* next_err
    cdef double* value
    cdef double* swap
    _check_palette(palette, channels)
    if indices.shape[0] != h or indices.shape[1] != w:
        raise ValueError("indices must have the image's height and width")
    # Two error rows with one guard cell on each side, so the diffusion needs no edge tests.
    row_err = <double*>malloc((w + 2) * channels * sizeof(double))
    next_err = <double*>malloc((w + 2) * channels * sizeof(double))
    value = <double*>malloc(channels * sizeof(double))
    if row_err == NULL or next_err == NULL or value == NULL:
        free(row_err); free(next_err); free(value)
        raise MemoryError()
    with nogil:
        memset(row_err, 0, (w + 2) * channels * sizeof(double))
        for y in range(h):
            memset(next_err, 0, (w + 2) * channels * sizeof(double))
            for x in range(w):
                for c in range(channels):
                    value[c] = image[y, x, c] + row_err[(x + 1) * channels + c]
                k = _nearest(value, palette, channels, &dist)
                indices[y, x] = <unsigned short>k
                for c in range(channels):
                    err = value[c] - palette[k, c]
                    row_err[(x + 2) * channels + c] += err * 0.4375
                    next_err[x * channels + c] += err * 0.1875
                    next_err[(x + 1) * channels + c] += err * 0.3125
                    next_err[(x + 2) * channels + c] += err * 0.0625
            swap = row_err
            row_err = next_err
            next_err = swap
    free(row_err); free(next_err); free(value)


def palette_lookup(const index_t[:, ::1] indices, const unsigned char[:, ::1] palette,
                   unsigned char[:, :, ::1] out):
    """out[y, x, :] = palette[indices[y, x], :].  Raises IndexError on an index >= K."""
    cdef Py_ssize_t h = indices.shape[0], w = indices.shape[1], channels = palette.shape[1]
    cdef Py_ssize_t y, x, c, k, size = palette.shape[0]
    cdef Py_ssize_t bad_y = -1, bad_x = -1
    if out.shape[0] != h or out.shape[1] != w or out.shape[2] != channels:
        raise ValueError("out must have shape (H, W, C)")
    with nogil:
        for y in range(h):
            for x in range(w):
                k = indices[y, x]
                if k >= size:
                    bad_y = y
                    bad_x = x
                    break
                for c in range(channels):
                    out[y, x, c] = palette[k, c]
            if bad_y >= 0:
                break
    if bad_y >= 0:
        raise IndexError(f"palette index {indices[bad_y, bad_x]} at ({bad_y}, {bad_x}) "
                         f"is out of range for a palette of {size} colours")


def kmeans_plus_plus(const double[:, ::1] points, const double[::1] uniforms, Py_ssize_t[::1] picks):
    """k-means++ seeding: picks[j] = the point chosen as centre j, for j < len(uniforms).

    Centre 0 is point floor(u[0] * N); centre j is drawn with probability proportional to the
    squared distance to the nearest centre so far: the first i whose running sum of those
    distances (summed from point 0) exceeds u[j] * total.  The uniforms come from the caller's
    seeded generator, so the choice is reproducible everywhere.
    """
    cdef Py_ssize_t n = points.shape[0], channels = points.shape[1], k = uniforms.shape[0]
    cdef Py_ssize_t i, j, c, pick
    cdef double total, target, running, dist, diff
    cdef double* nearest
    if n == 0 or k == 0 or k > n:
        raise ValueError("need 1 <= len(uniforms) <= number of points")
    if picks.shape[0] != k:
        raise ValueError("picks must have one entry per uniform")
    nearest = <double*>malloc(n * sizeof(double))
    if nearest == NULL:
        raise MemoryError()
    with nogil:
        for j in range(k):
            if j == 0:
                pick = <Py_ssize_t>(uniforms[0] * n)
            else:
                total = 0.0
                for i in range(n):
                    total = total + nearest[i]
                if total > 0:
                    target = uniforms[j] * total
                    running = 0.0
                    pick = n - 1
                    for i in range(n):
                        running = running + nearest[i]
                        if running > target:
                            pick = i
                            break
                else:
                    pick = <Py_ssize_t>(uniforms[j] * n)
            if pick > n - 1:
                pick = n - 1
            picks[j] = pick
            for i in range(n):
                dist = 0.0
                for c in range(channels):
                    diff = points[i, c] - points[pick, c]
                    dist = dist + diff * diff
                if j == 0 or dist < nearest[i]:
                    nearest[i] = dist
    free(nearest)
