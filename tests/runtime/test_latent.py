"""Latent coding: the Cython kernels against their slow references (identical indices, bounds
checked), palettes, and the 8-bit mapping."""
import numpy as np
import pytest
from reference_kernels import dither_ref, kmeans_plus_plus_ref, lookup_ref, nearest_assign_ref

from sdc_runtime import _kernels, latent


def _random_case(seed, h, w, channels, colors):
    rng = np.random.default_rng(seed)
    image = rng.uniform(0, 255, (h, w, channels))
    palette = rng.integers(0, 256, (colors, channels)).astype(np.float64)
    return image, palette


@pytest.mark.parametrize("channels,colors", [(4, 256), (3, 16), (32, 64), (1, 2)])
def test_nearest_assign_matches_reference(channels, colors):
    image, palette = _random_case(channels, 9, 11, channels, colors)
    points = image.reshape(-1, channels)
    labels = np.empty(len(points), np.uint16)
    distances = np.empty(len(points))
    _kernels.nearest_assign(points, palette, labels, distances)
    np.testing.assert_array_equal(labels, nearest_assign_ref(points, palette))
    np.testing.assert_allclose(distances, ((points - palette[labels]) ** 2).sum(1), rtol=1e-12)


@pytest.mark.parametrize("channels,k", [(4, 256), (32, 17), (3, 1)])
def test_kmeans_plus_plus_matches_reference(channels, k):
    rng = np.random.default_rng(channels)
    points = rng.uniform(0, 255, (600, channels))
    points[100:300] = points[100]  # many duplicates: zero distances must be handled the same way
    uniforms = rng.random(k)
    picks = np.empty(k, np.intp)
    _kernels.kmeans_plus_plus(points, uniforms, picks)
    np.testing.assert_array_equal(picks, kmeans_plus_plus_ref(points, uniforms))
    assert len(set(picks.tolist())) == k  # a point already chosen has distance 0: never drawn again


def test_nearest_assign_ties_take_the_first_entry():
    palette = np.array([[10.0, 10.0], [0.0, 0.0], [10.0, 10.0]])
    labels = np.empty(1, np.uint16)
    _kernels.nearest_assign(np.array([[9.0, 9.0]]), palette, labels, np.empty(1))
    assert labels[0] == 0


@pytest.mark.parametrize("channels,colors,h,w", [(4, 256, 16, 24), (4, 7, 5, 3), (32, 40, 6, 9), (2, 4096, 4, 4)])
def test_dither_matches_reference_exactly(channels, colors, h, w):
    image, palette = _random_case(100 + channels, h, w, channels, colors)
    fast = latent.dither(image, palette.astype(np.uint8))
    np.testing.assert_array_equal(fast, dither_ref(image, palette.astype(np.uint8).astype(np.float64)))


def test_dither_on_a_real_palette_matches_reference():
    """The palette the encoder builds (k-means) on a smooth latent, as in production."""
    y, x = np.mgrid[0:20, 0:28]
    levels = np.stack([x * 9.1, y * 12.7, (x + y) * 5.3, 128 + 40 * np.sin(x / 3.0)], -1).clip(0, 255)
    palette = latent.build_palette(levels.reshape(-1, 4), 32, seed=3)
    np.testing.assert_array_equal(latent.dither(levels, palette), dither_ref(levels, palette.astype(np.float64)))


def test_dithering_preserves_low_frequencies_better_than_nearest_colour():
    """Error diffusion keeps local averages: the 8x8 block means of a smooth latent are closer
    to the original's after dithering than after plain nearest-colour mapping."""
    y, x = np.mgrid[0:64, 0:64]
    levels = np.stack([x * 3.9, y * 3.9, (x + y) * 1.95, np.full_like(x, 100.0)], -1).astype(np.float64)
    palette = latent.build_palette(levels.reshape(-1, 4), 16, seed=0)

    def block_error(indices):
        recon = palette[indices].astype(np.float64)
        blocks = lambda a: a.reshape(8, 8, 8, 8, 4).mean((1, 3))
        return np.sqrt(((blocks(recon) - blocks(levels)) ** 2).mean())

    dithered = block_error(latent.dither(levels, palette))
    plain = block_error(latent.nearest(levels, palette))
    assert dithered < 0.85 * plain, (dithered, plain)


@pytest.mark.parametrize("dtype", [np.uint8, np.uint16])
def test_lookup_matches_reference(dtype):
    rng = np.random.default_rng(7)
    palette = rng.integers(0, 256, (200, 4), dtype=np.uint8)
    indices = rng.integers(0, 200, (13, 17)).astype(dtype)
    out = latent.lookup(indices, palette)
    np.testing.assert_array_equal(out, lookup_ref(indices, palette).transpose(2, 0, 1))


def test_lookup_rejects_out_of_range_index():
    from sdc_runtime import SdcFormatError

    palette = np.zeros((10, 4), np.uint8)
    indices = np.zeros((3, 3), np.uint16)
    indices[2, 1] = 10
    with pytest.raises(SdcFormatError, match="index 10 at \\(2, 1\\)"):
        latent.lookup(indices, palette)
    raw = np.empty((3, 3, 4), np.uint8)
    with pytest.raises(IndexError):
        _kernels.palette_lookup(indices, palette, raw)


def test_kernels_reject_mismatched_shapes():
    with pytest.raises(ValueError):
        _kernels.nearest_assign(np.zeros((3, 4)), np.zeros((5, 3)), np.empty(3, np.uint16), np.empty(3))
    with pytest.raises(ValueError):
        _kernels.dither_floyd_steinberg(np.zeros((2, 2, 4)), np.zeros((0, 4)), np.empty((2, 2), np.uint16))


def test_build_palette_is_deterministic_and_fits_the_points():
    rng = np.random.default_rng(0)
    points = np.concatenate([rng.normal(c, 2.0, (200, 4)) for c in (30, 90, 160, 220)]).clip(0, 255)
    a = latent.build_palette(points, 4, seed=5)
    b = latent.build_palette(points, 4, seed=5)
    np.testing.assert_array_equal(a, b)
    assert sorted(a[:, 0].astype(int).tolist()) == pytest.approx([30, 90, 160, 220], abs=2)


def test_quantization_is_the_original_mapping():
    """q = round(clamp(z / (255 * 0.18215) + 0.5, 0, 1) * 255), and its inverse."""
    scale, zero = latent.sd_quant_mapping(0.18215, 4)
    z = np.random.default_rng(1).normal(0, 10, (4, 5, 6)).astype(np.float32)
    q = latent.quantize_u8(z, scale, zero)
    original = np.round(np.clip(z.astype(np.float64) / (255 * 0.18215) + 0.5, 0, 1) * 255)
    assert np.abs(q.astype(int) - original).max() <= 1  # only exact .5 ties may round differently
    assert (q.astype(int) == original).mean() > 0.99
    back = latent.dequantize_u8(q, scale, zero)
    inside = np.abs(z) < 23.0
    assert np.abs(back - z)[inside].max() <= 0.18215 / 2 + 1e-5


def test_fit_quant_mapping_fixed_adaptive_and_stepped():
    rng = np.random.default_rng(2)
    z = rng.normal(0, 1, (3, 6, 7)) * np.array([1.0, 2.0, 0.5])[:, None, None]
    base_scale, base_zero = (12 / 255,) * 3, (127.5,) * 3
    assert latent.fit_quant_mapping(z, base_scale, base_zero, adaptive=False) == (base_scale, base_zero)
    scale, zero = latent.fit_quant_mapping(z, base_scale, base_zero, adaptive=True)
    levels = latent.to_level_space(z, scale, zero)
    assert levels.min() >= 0 and levels.max() <= 255 + 1e-3  # each channel's own range fills 8 bits
    assert np.all(np.ptp(levels.reshape(-1, 3), axis=0) > 254)
    weights = (4.0, 1.0, 0.25)
    scale, zero = latent.fit_quant_mapping(z * 0.01, base_scale, base_zero, adaptive=True, channel_weights=weights,
                                           quant_step=0.2)
    np.testing.assert_allclose(scale, 0.2 / np.sqrt(weights), rtol=1e-6)  # finer where the decoder is sensitive
    assert all(float(v).is_integer() for v in zero)  # integer zero points: 0 is exact
