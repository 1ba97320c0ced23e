"""Slow pure-Python/numpy references of the Cython kernels in ext/_kernels.pyx.

They follow the kernels' documented arithmetic order exactly (float64, distances summed over
channels from channel 0, first minimum wins, error weights 7/16, 3/16, 5/16, 1/16), so the
extension must reproduce their indices bit for bit.
"""
import numpy as np


def nearest_ref(value: np.ndarray, palette: np.ndarray) -> tuple[int, float]:
    distances = np.zeros(len(palette))
    for c in range(palette.shape[1]):
        diff = value[c] - palette[:, c]
        distances = distances + diff * diff
    k = int(np.argmin(distances))
    return k, float(distances[k])


def nearest_assign_ref(points: np.ndarray, palette: np.ndarray) -> np.ndarray:
    return np.array([nearest_ref(p, palette)[0] for p in points], np.uint16)


def dither_ref(image: np.ndarray, palette: np.ndarray) -> np.ndarray:
    h, w, channels = image.shape
    error = np.zeros((h + 1, w + 2, channels))  # one guard column each side, one guard row below
    indices = np.zeros((h, w), np.uint16)
    for y in range(h):
        for x in range(w):
            value = image[y, x] + error[y, x + 1]
            k, _ = nearest_ref(value, palette)
            indices[y, x] = k
            err = value - palette[k]
            error[y, x + 2] += err * 0.4375
            error[y + 1, x] += err * 0.1875
            error[y + 1, x + 1] += err * 0.3125
            error[y + 1, x + 2] += err * 0.0625
    return indices


def lookup_ref(indices: np.ndarray, palette: np.ndarray) -> np.ndarray:
    if indices.size and int(indices.max()) >= len(palette):
        raise IndexError("palette index out of range")
    return palette[indices.astype(np.int64)]


def kmeans_plus_plus_ref(points: np.ndarray, uniforms: np.ndarray) -> np.ndarray:
    n = len(points)

    def squared(pick):
        distances = np.zeros(n)
        for c in range(points.shape[1]):
            diff = points[:, c] - points[pick, c]
            distances = distances + diff * diff
        return distances

    picks = [min(int(uniforms[0] * n), n - 1)]
    nearest = squared(picks[0])
    for u in uniforms[1:]:
        running = np.cumsum(nearest)  # sequential, like the kernel's running sum
        if running[-1] > 0:
            pick = min(int(np.searchsorted(running, u * running[-1], side="right")), n - 1)
        else:
            pick = min(int(u * n), n - 1)
        picks.append(pick)
        nearest = np.minimum(nearest, squared(pick))
    return np.array(picks)
