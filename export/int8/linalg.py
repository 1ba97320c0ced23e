"""The least-squares side of the int8 correction: a layer's rows (input patches and outputs),
their moments, per-channel gains and offsets, ridge refits and GPTQ rounding.  numpy only."""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from .ops import WEIGHT_LIMIT
from .recipe import DEFAULT_RECIPE, Int8Recipe


@dataclass(frozen=True)
class ConvGeometry:
    kernel: tuple[int, int]
    strides: tuple[int, int]
    dilations: tuple[int, int]
    pads: tuple[int, int, int, int]  # top, left, bottom, right


def _conv_geometry(node, weight_shape) -> ConvGeometry | None:
    """A 2-D, ungrouped, explicitly padded convolution's geometry; None for the others, which
    the refit does not handle (they get the gain and offset)."""
    attributes = {a.name: (list(a.ints) if a.ints else (a.s.decode() if a.s else a.i)) for a in node.attribute}
    if len(weight_shape) != 4 or attributes.get("group", 1) != 1 or attributes.get("auto_pad", "NOTSET") != "NOTSET":
        return None
    pads = attributes.get("pads", [0, 0, 0, 0])
    return ConvGeometry(tuple(weight_shape[2:]), tuple(attributes.get("strides", [1, 1])),
                        tuple(attributes.get("dilations", [1, 1])), (pads[0], pads[1], pads[2], pads[3]))


def conv_rows(x: np.ndarray, y: np.ndarray, count: int, rng, *, geometry: ConvGeometry,
              recipe: Int8Recipe = DEFAULT_RECIPE):
    """``count`` (or all, if fewer) output positions of a convolution, drawn by ``rng``, as
    chunks of (input patches (rows, C*kh*kw) in the weights' layout, outputs (rows, O)),
    float64.  ``x`` is its input, ``y`` its output, NCHW."""
    n, _, out_h, out_w = y.shape
    positions = n * out_h * out_w
    chosen = np.sort(rng.choice(positions, count, replace=False)) if count < positions else np.arange(positions)
    top, left, bottom, right = geometry.pads
    padded = np.pad(x, ((0, 0), (0, 0), (top, bottom), (left, right)))
    (kh, kw), (dy, dx) = geometry.kernel, geometry.dilations
    # Every window as a view (N, C, H', W', kh, kw): a chunk's patches are then one gather on
    # three small index arrays, not on four of the patches' own size.
    windows = np.lib.stride_tricks.sliding_window_view(
        padded, ((kh - 1) * dy + 1, (kw - 1) * dx + 1), axis=(2, 3))[..., ::dy, ::dx]
    for chunk in np.array_split(chosen, max(1, len(chosen) // recipe.refit_chunk_rows)):
        b, rest = np.divmod(chunk, out_h * out_w)
        oy, ox = np.divmod(rest, out_w)
        patches = windows[b, :, oy * geometry.strides[0], ox * geometry.strides[1]]  # (rows, C, kh, kw)
        yield patches.reshape(len(chunk), -1).astype(np.float64), y[b, :, oy, ox].astype(np.float64)


def matmul_rows(x: np.ndarray, y: np.ndarray, count: int, rng, *, recipe: Int8Recipe = DEFAULT_RECIPE):
    """``count`` (or all, if fewer) rows of a MatMul's input (..., K) and output (..., N),
    drawn by ``rng``, as chunks like ``conv_rows``'."""
    rows_x, rows_y = x.reshape(-1, x.shape[-1]), y.reshape(-1, y.shape[-1])
    chosen = np.sort(rng.choice(len(rows_x), count, replace=False)) if count < len(rows_x) else np.arange(len(rows_x))
    for chunk in np.array_split(chosen, max(1, len(chosen) // recipe.refit_chunk_rows)):
        yield rows_x[chunk].astype(np.float64), rows_y[chunk].astype(np.float64)


class Moments:
    """Sums over rows of a layer's inputs x (K) and outputs y (O): enough for a least-squares
    fit of y = W x + b, and for the squared error of any such W, b, without keeping the rows."""

    def __init__(self, inputs: int, outputs: int):
        self.count = 0
        self.sum_x, self.sum_y, self.yy = np.zeros(inputs), np.zeros(outputs), np.zeros(outputs)
        self.xx, self.xy = np.zeros((inputs, inputs)), np.zeros((inputs, outputs))

    def add(self, rows_x: np.ndarray, rows_y: np.ndarray) -> None:
        self.count += len(rows_x)
        self.sum_x += rows_x.sum(0)
        self.sum_y += rows_y.sum(0)
        self.yy += np.square(rows_y).sum(0)
        self.xx += rows_x.T @ rows_x
        self.xy += rows_x.T @ rows_y

    def bias_for(self, weights: np.ndarray) -> np.ndarray:
        """The least-squares bias of y = W x + b given W."""
        return self.sum_y / self.count - weights @ (self.sum_x / self.count)

    def error(self, weights: np.ndarray, bias: np.ndarray) -> float:
        """Mean over the rows of |y - (W x + b)|^2."""
        n = self.count
        per_channel = (self.yy / n - 2 * np.sum(weights * self.xy.T, 1) / n - 2 * bias * self.sum_y / n
                       + np.sum((weights @ self.xx) * weights, 1) / n + 2 * bias * (weights @ self.sum_x) / n
                       + bias ** 2)
        return float(per_channel.sum())

    def of_layer(self, weights: np.ndarray) -> ChannelStats:
        """The per-channel statistics of p = W x against y."""
        mean_x, mean_y = self.sum_x / self.count, self.sum_y / self.count
        covariance = self.xx / self.count - np.outer(mean_x, mean_x)
        cross = self.xy / self.count - np.outer(mean_x, mean_y)
        return ChannelStats(weights @ mean_x, np.sum((weights @ covariance) * weights, 1),
                            np.sum(weights * cross.T, 1), mean_y)


@dataclass
class ChannelStats:
    """Per output channel: mean and variance of a layer's output p (less its bias), its
    covariance with the fp32 output f, and the mean of f."""

    mean_p: np.ndarray
    var_p: np.ndarray
    cov_pf: np.ndarray
    mean_f: np.ndarray


def layer_moments(pairs, rows_of, inputs: int, outputs: int, recipe: Int8Recipe = DEFAULT_RECIPE) -> Moments:
    """The Moments of recipe.refit_rows rows drawn evenly from (input, fp32 output) pairs."""
    rng = np.random.default_rng(0)
    pairs = list(pairs)
    moments = Moments(inputs, outputs)
    for x, y in pairs:
        for rows_x, rows_y in rows_of(x, y, max(1, recipe.refit_rows // len(pairs)), rng):
            moments.add(rows_x, rows_y)
    return moments


def output_moments(pairs, bias: np.ndarray) -> ChannelStats:
    """ChannelStats of a layer from (int8 output, fp32 output) pairs, NC..., its ``bias`` taken out."""
    sums = np.zeros((5, bias.size))  # count, sum p, sum f, sum p^2, sum p*f per channel
    for q, f in pairs:
        p = channels_first(q) - bias[:, None]
        f = channels_first(f)
        sums += [np.full(bias.size, p.shape[1]), p.sum(1), f.sum(1), (p * p).sum(1), (p * f).sum(1)]
    count, mean_p, mean_f = sums[0], sums[1] / sums[0], sums[2] / sums[0]
    return ChannelStats(mean_p, sums[3] / count - mean_p ** 2, sums[4] / count - mean_p * mean_f, mean_f)


def fit_gain_offset(stats: ChannelStats, recipe: Int8Recipe = DEFAULT_RECIPE) -> tuple[np.ndarray, np.ndarray]:
    """Each output channel's gain g (within recipe.max_gain_change of 1) and offset b of f = g p + b,
    by least squares."""
    gain = np.ones_like(stats.mean_p)
    live = stats.var_p > 1e-12 * np.maximum(stats.mean_p ** 2, 1e-30)
    gain[live] = stats.cov_pf[live] / stats.var_p[live]
    gain = np.clip(gain, 1 - recipe.max_gain_change, 1 + recipe.max_gain_change)
    return gain, stats.mean_f - gain * stats.mean_p


def _int32(values: np.ndarray) -> np.ndarray:
    return np.clip(np.rint(values), -2 ** 31, 2 ** 31 - 1).astype(np.int32)


def least_squares(moments: Moments, prior: np.ndarray, *, intercept: bool, recipe: Int8Recipe = DEFAULT_RECIPE):
    """(W (O, K), the inputs' second moment (K, K), its mean diagonal) of the layer y = W x (+ b)
    that best maps the int8 graph's inputs to the fp32 graph's outputs: ridge least squares,
    shrinking towards ``prior``, so that input directions the calibration never excites keep
    its weights.  With a bias the fit and the moment are of deviations from the means."""
    mean_x, mean_y = moments.sum_x / moments.count, moments.sum_y / moments.count
    second = moments.xx / moments.count - (np.outer(mean_x, mean_x) if intercept else 0)
    cross = moments.xy / moments.count - (np.outer(mean_x, mean_y) if intercept else 0)
    level = max(float(np.mean(np.diag(second))), 1e-30)
    ridge = recipe.ridge * level * np.eye(prior.shape[1])
    return np.linalg.solve(second + ridge, cross + ridge @ prior.T).T, second, level


def fit_weights(moments: Moments, prior: np.ndarray, weight_bits: int, *, intercept: bool,
                recipe: Int8Recipe = DEFAULT_RECIPE):
    """(integers (O, K), per-row scales (O), bias (O) or None) of ``least_squares``' layer,
    rounded to ``weight_bits`` by GPTQ (Frantar et al. 2022: one input column at a time, the
    rounding error spread over the columns not yet rounded through the inverse input second
    moment), and the bias fitted again to the rounded weights.  A constant input leaves the
    prior's weights, rounded."""
    fitted, second, level = least_squares(moments, prior, intercept=intercept, recipe=recipe)
    top = WEIGHT_LIMIT[weight_bits]
    scale = np.abs(fitted).max(1) / top
    scale[scale == 0] = 1.0
    rounded = gptq_round(fitted, scale, top, second + recipe.gptq_damping * level * np.eye(prior.shape[1]))
    return rounded, scale, moments.bias_for(rounded * scale[:, None]) if intercept else None


def gptq_round(weights: np.ndarray, scale: np.ndarray, top: int, hessian: np.ndarray,
               block: int = 128) -> np.ndarray:
    """Integers in [-top, top] for ``weights`` (O, K) at per-row ``scale``, rounded one column
    at a time, each column's error compensated on the later columns through the upper
    Cholesky factor of ``hessian``'s inverse (GPTQ, with its lazy block updates)."""
    work = weights / scale[:, None]  # in units of the step: the error terms are then integers' errors
    factor = np.linalg.cholesky(np.linalg.inv(hessian)).T  # upper: inverse = factor.T @ factor
    rounded = np.zeros_like(work)
    for start in range(0, work.shape[1], block):
        end = min(start + block, work.shape[1])
        errors = np.zeros((work.shape[0], end - start))
        for i in range(start, end):
            rounded[:, i] = np.clip(np.rint(work[:, i]), -top, top)
            errors[:, i - start] = (work[:, i] - rounded[:, i]) / factor[i, i]
            work[:, i + 1:end] -= np.outer(errors[:, i - start], factor[i, i + 1:end])
        work[:, end:] -= errors @ factor[start:end, end:]
    return rounded


def channels_first(output: np.ndarray) -> np.ndarray:
    """(N, C, ...) -> (C, N*...) float64."""
    return np.moveaxis(output, 1, 0).reshape(output.shape[1], -1).astype(np.float64)
