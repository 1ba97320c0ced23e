"""Coder 3, the context-modelled coder of 8-bit planes (runtime/context.py, docs/FORMAT.md
"Coder 3"): its coding order, predictions, contexts and symbols against a vector worked out by
hand from the spec; exact round trips; rejection of bad payloads; rate-aware rounding."""
import os

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from sdc_runtime import SdcFormatError, context, entropy, sdc_decode

GOLDEN = os.path.join(os.path.dirname(os.path.abspath(__file__)), "golden")

# One 3x3 plane, and what FORMAT.md's steps make of it, worked out by hand:
# (cell, prediction, context, symbol) in coding order.
PLANE = np.array([[[10, 12, 14], [11, 13, 15], [20, 22, 30]]], np.uint8)
BY_HAND = [
    ((0, 0), 128, 0, 235),  # base grid: p = 128, r = -118, z = 2*118 - 1
    ((2, 2), 10, 1, 40),    # s = 4 centre: one neighbour (0,0); spread 0; r = 20
    ((0, 2), 20, 10, 11),   # s = 4 midpoints: (0,0), (2,2): p = (40+1)//2; spread 20 -> 9 edges; r = -6
    ((2, 0), 20, 10, 0),
    ((1, 1), 19, 10, 11),   # s = 2 centre: (10+14+20+30 + 2)//4 = 19; spread 20; r = -6
    ((0, 1), 12, 5, 0),     # s = 2 midpoints, rows y = 0, 2 first: (13+10+14 + 1)//3; spread 4
    ((2, 1), 21, 9, 2),     # (13+20+30 + 1)//3; spread 17 -> 8 edges; r = 1
    ((1, 0), 14, 7, 5),     # (10+20+13 + 1)//3; spread 10 -> 6 edges; r = -3
    ((1, 2), 19, 9, 7),     # (14+30+13 + 1)//3; spread 17; r = -4
]


def _sequence(levels):
    out = []
    for ys, xs, offsets in context.coding_steps(*levels.shape[1:]):
        prediction, bucket = context.predict(levels, ys, xs, offsets)
        symbols = context.to_symbols(levels[:, ys, xs], prediction)
        out += [((int(y), int(x)), int(p), int(k), int(z))
                for y, x, p, k, z in zip(ys, xs, prediction[0], bucket[0], symbols[0])]
    return out


def test_the_coding_order_predictions_contexts_and_symbols_are_the_specs():
    assert _sequence(PLANE) == BY_HAND
    for (y, x), p, _, z in BY_HAND:  # and the decoder's inverse
        assert context.from_symbols(np.array([z]), np.array([p]))[0] == PLANE[0, y, x]


def test_the_prior_is_the_specs_integer_recurrence():
    prior = context.prior()
    assert prior.dtype == np.int64 and prior.shape == (context.CONTEXTS, 256)
    # f = 1024, 1024*35//256 = 140, 140*35//256 = 19, 19*35//256 = 2, each + 1
    assert list(prior[1, :4]) == [1025, 141, 20, 3]
    assert prior.min() == 1


def test_every_cell_is_coded_once():
    for h, w in ((1, 1), (1, 9), (7, 1), (64, 64), (65, 130), (13, 200)):
        seen = np.zeros((h, w), int)
        for ys, xs, _ in context.coding_steps(h, w):
            np.add.at(seen, (ys, xs), 1)
        assert (seen == 1).all(), (h, w)


@settings(max_examples=40, deadline=None)
@given(st.integers(1, 6), st.integers(1, 70), st.integers(1, 70), st.integers(0, 2 ** 32 - 1),
       st.sampled_from(["noise", "smooth", "flat"]))
def test_round_trips_are_exact(channels, height, width, seed, kind):
    rng = np.random.default_rng(seed)
    if kind == "noise":
        levels = rng.integers(0, 256, (channels, height, width))
    elif kind == "smooth":
        y, x = np.mgrid[0:height, 0:width]
        levels = 128 + 100 * np.sin(x / 5 + y / 7)[None] + rng.integers(-2, 3, (channels, height, width))
    else:
        levels = np.full((channels, height, width), rng.integers(0, 256))
    levels = np.clip(levels, 0, 255).astype(np.uint8)
    data = context.encode(levels)
    assert len(data) % 4 == 0
    np.testing.assert_array_equal(context.decode(data, levels.shape), levels)


def test_the_golden_context_file_decodes_exactly_and_is_what_the_encoder_writes():
    data = open(os.path.join(GOLDEN, "u8_context_150x90.sdc"), "rb").read()
    header, levels = sdc_decode(data)
    np.testing.assert_array_equal(levels, np.load(os.path.join(GOLDEN, "u8_context_150x90.levels.npy")))
    from sdc_runtime import container

    _, sections = container.unpack(data)
    assert sections[0].coder == entropy.CODER_CONTEXT
    assert context.encode(levels) == sections[0].payload  # the encoder is deterministic too


def test_smooth_planes_code_smaller_than_deflate_and_lzma2():
    y, x = np.mgrid[0:48, 0:64]
    rng = np.random.default_rng(1)
    levels = np.clip(np.stack([128 + 60 * np.sin(x / (4 + c) + y / 9) + rng.normal(0, 2, x.shape)
                               for c in range(8)]), 0, 255).astype(np.uint8)
    coder, payload = entropy.encode(levels.ravel(), alphabet_size=256, planes=levels.shape)
    others = [len(entropy.encode(levels.ravel(), alphabet_size=256)[1])]
    assert coder == entropy.CODER_CONTEXT and len(payload) < 0.9 * min(others)


@pytest.mark.parametrize("damage,needle", [
    (lambda d: b"", "empty"),
    (lambda d: d[:-1], "whole number"),
    (lambda d: d[:len(d) // 8 * 4], "does not end"),
    (lambda d: bytes(np.random.default_rng(0).integers(0, 256, len(d), dtype=np.uint8)), "context-coded"),
])
def test_bad_payloads_are_format_errors(damage, needle):
    levels = np.load(os.path.join(GOLDEN, "u8_context_150x90.levels.npy"))
    with pytest.raises(SdcFormatError, match=needle):
        context.decode(damage(context.encode(levels)), levels.shape)


def test_only_plane_sections_may_use_the_context_coder():
    data = context.encode(PLANE)
    with pytest.raises(SdcFormatError, match="latent, alpha and palette index sections only"):
        entropy.decode(data, coder=entropy.CODER_CONTEXT, count=9, alphabet_size=256)
    with pytest.raises(SdcFormatError, match="latent, alpha and palette index sections only"):
        entropy.decode(data, coder=entropy.CODER_CONTEXT, count=9, alphabet_size=300, planes=(1, 3, 3))


def test_rate_aware_rounding_moves_toward_the_prediction_by_at_most_the_deadzone():
    rng = np.random.default_rng(3)
    values = np.clip(128 + np.cumsum(rng.normal(0, 1.5, (4, 40, 56)), axis=2), 0, 255)
    nearest = context.round_levels(values, 0.0)
    np.testing.assert_array_equal(nearest, np.rint(values))
    rounded = context.round_levels(values, 0.3)
    assert np.abs(rounded - values).max() <= 0.5 + 0.3 + 1e-9
    assert (rounded != nearest).any()
    # Each level lies between its value and the prediction the coder makes from those before it.
    for ys, xs, offsets in context.coding_steps(40, 56):
        prediction, _ = context.predict(rounded, ys, xs, offsets)
        value, level = values[:, ys, xs], rounded[:, ys, xs].astype(float)
        moved = level != np.rint(value)
        assert (np.abs(level - prediction)[moved] <= np.abs(np.rint(value) - prediction)[moved]).all()
    assert len(context.encode(rounded)) < len(context.encode(nearest))


def test_a_flat_plane_costs_at_least_the_bound_and_a_short_stream_for_a_large_claim_is_refused():
    """Counts are held to their limits, so even a flat plane costs more than 1/512 bit a
    level, and a decoder refuses a stream too short for the levels its header claims, before
    decoding any (else 4 bytes could claim a 100-megapixel latent's worth of work)."""
    flat = np.full((1, 700, 900), 7, np.uint8)
    data = context.encode(flat)
    assert flat.size <= context.MAX_LEVELS_PER_BIT * 8 * len(data)
    np.testing.assert_array_equal(context.decode(data, flat.shape), flat)
    with pytest.raises(SdcFormatError, match="cannot hold"):
        context.decode(data[:8], (256, 1250, 1250))
