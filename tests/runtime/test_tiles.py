"""Tiled neural stages: the tiling itself, exactness against untiled runs on the trained
TAEF2 pair (seams measured), the tiny SD set's encoder, UNet and decoder in tiles, and tile
sizes from the memory budget.  Photo-size runs are in BENCHMARKS.md; these are reduced."""
import numpy as np
import pytest
from helpers import kodak, make_image, needs_shared, psnr

from sdc_runtime import SdcCodec, SdcInputError
from sdc_runtime.neural import NeuralStages
from sdc_runtime.tiles import grid, overlaps, owned_spans, ramp, spans


@pytest.mark.parametrize("length,tile,align", [(100, 30, 1), (1000, 256, 8), (97, 32, 4), (64, 64, 1), (65, 64, 2)])
def test_spans_cover_everything_aligned_with_enough_overlap(length, tile, align):
    result = spans(length, tile, align)
    assert result[0][0] == 0 and result[-1][1] == length
    covered = np.zeros(length, int)
    for start, stop in result:
        assert start % align == 0 and 0 < stop - start < tile + align
        covered[start:stop] += 1
    assert covered.min() >= 1
    for (_, stop), (next_start, _) in zip(result, result[1:]):
        assert stop - next_start >= min(tile // 4, align)  # neighbours overlap
    assert spans(length, tile, align) == result  # a function of the sizes alone


def test_a_length_that_fits_is_one_span():
    assert spans(64, 64) == [(0, 64)] and spans(10, 0) == [(0, 10)]


@pytest.mark.parametrize("length,tile,margin", [(100, 30, 5), (39, 16, 10), (64, 64, 3), (1000, 88, 10)])
def test_owned_spans_split_the_samples_and_run_with_their_margins(length, tile, margin):
    result = owned_spans(length, tile, margin)
    owned = np.zeros(length, int)
    for (a, b), (start, stop) in result:
        owned[a:b] += 1
        assert (start, stop) == (max(a - margin, 0), min(b + margin, length))
        assert stop - start <= max(tile, 4 * margin + 1) or len(result) == 1
    assert (owned == 1).all()  # each sample owned by exactly one tile


def test_ramps_sum_to_positive_weights_and_fall_towards_inner_edges():
    axis = spans(300, 100)
    total = np.zeros(300)
    for span, gap in zip(axis, overlaps(axis)):
        weight = ramp(span, 300, gap)
        assert weight.min() > 0 and weight.max() == 1
        total[span[0]:span[1]] += weight
    assert total.min() > 0.5
    first = ramp(axis[0], 300, overlaps(axis)[0])
    assert first[0] == 1 and first[-1] < 0.1  # the image edge keeps full weight, the inner edge fades
    assert len(list(grid(300, 200, 100))) == len(axis) * len(spans(200, 100))


@pytest.mark.parametrize("margin", [1, 3, 6])
def test_ramps_with_a_margin_leave_the_tile_edges_to_the_neighbours(margin):
    """Within ``margin`` of an inner edge a tile's weight is 0, and with overlaps over twice the
    margin the neighbours' weights still cover every sample."""
    axis = spans(300, 60, min_overlap=2 * margin + 2)
    total = np.zeros(300)
    for span, gap in zip(axis, overlaps(axis)):
        assert min(g for g in gap if g) >= 2 * margin + 2
        weight = ramp(span, 300, gap, margin=margin)
        if gap[0]:
            assert not weight[:margin].any() and weight[margin] > 0
        if gap[1]:
            assert not weight[-margin:].any() and weight[-margin - 1] > 0
        total[span[0]:span[1]] += weight
    assert total.min() > 0
    assert spans(300, 10, min_overlap=2 * margin + 2)[0][1] >= 2 * (2 * margin + 2)  # tiles grow to fit


@needs_shared
def test_taef2_decodes_the_same_at_every_tile_size_and_memory_limit(taef2_set):
    """Issue 33.2: the decoder's local part is tiled with margins that cover its measured reach,
    so the picture does not depend on the memory setting (before: 34.82 dB untiled, 32.50 at
    --tile-size 64 on kodim23)."""
    image = kodak("kodim23", box=(0, 0, 512, 384))
    untiled = SdcCodec(taef2_set, tile_size=0)
    data = untiled.encode(image, mode="u8", quant_step=0.45, effort=0)
    reference = np.asarray(untiled.decode(data))
    graph = untiled.manifest.graphs["vae_decoder"]
    reach = untiled.stages.context_cells(graph.tiled)
    assert reach is not None and 1 <= reach < 24  # measured: 9 latent cells for TAEF2
    for settings in (dict(tile_size=64), dict(tile_size=128), dict(tile_size=256), dict(memory_limit=200 << 20)):
        decoded = np.asarray(SdcCodec(taef2_set, **settings).decode(data))
        assert np.abs(decoded.astype(int) - reference).max() <= 1, settings


@needs_shared
def test_taef2_tiled_matches_untiled(taef2_set):
    """A 768x512 Kodak image in 256-pixel tiles (3x2 tiles and more): against the untiled round
    trip at least 35 dB, within 0.1 dB of its PSNR to the original, and no seam: the mean
    gradient across tile borders at most 5% above the interior's."""
    image = kodak("kodim23", box=(0, 0, 768, 512))
    whole, tiled = SdcCodec(taef2_set, tile_size=0), SdcCodec(taef2_set, tile_size=256)
    # Effort 0: the closed loop's descent runs untiled only, so it would part the two files.
    a = np.asarray(whole.decode(whole.encode(image, mode="u8", effort=0)))
    b = np.asarray(tiled.decode(tiled.encode(image, mode="u8", effort=0)))
    assert psnr(a, b) >= 35
    assert abs(psnr(image, a) - psnr(image, b)) <= 0.1
    # Every tile edge of the decoder, in pixels: the gradient across it in the tiled decode may
    # be at most 5% above the untiled decode's at the same place (a seam would raise it).
    for axis, length in ((0, 512), (1, 768)):
        edges = sorted({e * 8 for span in spans(length // 8, 256 // 8) for e in span} - {0, length})
        across = lambda img: np.abs(np.diff(img.astype(float), axis=axis)).take([e - 1 for e in edges], axis=axis).mean()
        assert across(b) <= 1.05 * across(a), axis


@needs_shared
@pytest.mark.parametrize("which", ["tae_set", "taef2_set"])
def test_the_decoder_gradient_in_tiles_is_the_untiled_one(which, request, monkeypatch):
    """Tiles that own disjoint pixels and run with the local part's reach around them add up
    to the untiled gradient and error: TAESD (local throughout) and TAEF2 (its GroupNorm part
    whole, run backwards once), on an image whose sides are not multiples of the downscale.
    The runtime's margins (GRADIENT_MARGIN_CELLS, below the reach) give a gradient that is
    close, and smaller tiles one that is still close."""
    from sdc_runtime import neural

    model_dir = request.getfixturevalue(which)
    capped = NeuralStages(model_dir, tile_size=256)
    monkeypatch.setattr(neural, "GRADIENT_MARGIN_CELLS", 1 << 20)
    pixels = np.pad(np.asarray(kodak("kodim05", (0, 100, 700, 298))), ((0, 2), (0, 4), (0, 0)), mode="edge")
    whole = NeuralStages(model_dir, tile_size=0)
    decoder = whole.graph("vae_decoder")
    reach = whole.context_cells(decoder.tiled or decoder.file)  # latent cells: TAESD 19, TAEF2 9
    tiled = NeuralStages(model_dir, tile_size=4 * (reach + 1) * 8)  # room for four margins: exact
    latent = whole.encode(pixels) + np.random.default_rng(0).normal(0, 0.5, (1, 1, 25, 88)).astype(np.float32)
    expected, expected_error = whole.decoder_gradient(latent, pixels, (198, 700))
    gradient, error = tiled.decoder_gradient(latent, pixels, (198, 700))
    assert np.abs(gradient - expected).max() <= 1e-5 * np.abs(expected).max()
    assert error == pytest.approx(expected_error, rel=1e-4)  # float32 sums over other orders
    # Only the image's own pixels count: a target that differs in the padding changes nothing.
    other = pixels.copy()
    other[198:] = 0
    assert whole.decoder_gradient(latent, other, (198, 700))[1] == pytest.approx(expected_error, rel=1e-6)
    # Tiles too small for four margins (memory first): the margins shrink and the gradient is
    # close, not exact.
    small, small_error = NeuralStages(model_dir, tile_size=128).decoder_gradient(latent, pixels, (198, 700))
    cosine = float((small * expected).sum() / np.linalg.norm(small) / np.linalg.norm(expected))
    print(f"128-pixel tiles: cosine {cosine:.5f}, error {small_error / expected_error - 1:+.2%}")
    assert cosine > 0.98 and small_error == pytest.approx(expected_error, rel=0.02)
    monkeypatch.undo()
    near, near_error = capped.decoder_gradient(latent, pixels, (198, 700))
    cosine = float((near * expected).sum() / np.linalg.norm(near) / np.linalg.norm(expected))
    print(f"256-pixel tiles, margins of {neural.GRADIENT_MARGIN_CELLS} cells: cosine {cosine:.6f}")
    assert neural.GRADIENT_MARGIN_CELLS < reach + 1  # the cap is in force: not the exact case again
    assert cosine > 0.999 and near_error == pytest.approx(expected_error, rel=0.005)


def test_the_sd_family_runs_every_stage_in_tiles(model_set):
    """Encoder, UNet and decoder in 64-pixel tiles on the tiny SD set: the same size back,
    progress per stage, deterministic.  Its weights are random and its VAE normalizes over
    whatever it sees, so tiled output is not compared for quality here (TAEF2's test is)."""
    image = make_image(200, 136, seed=2)
    whole, tiled = SdcCodec(model_set, tile_size=0), SdcCodec(model_set, tile_size=64)
    steps = []
    data = tiled.encode(image, progress=lambda stage, done, total: steps.append((stage, done, total)))
    assert {stage for stage, _, _ in steps} == {"encode"} and steps[-1][1] == steps[-1][2] > 1
    steps.clear()
    out = tiled.decode(data, progress=lambda stage, done, total: steps.append((stage, done, total)))
    assert out.size == (200, 136)
    assert [s for s in ("denoise", "decode") if any(stage == s for stage, _, _ in steps)] == ["denoise", "decode"]
    np.testing.assert_array_equal(np.asarray(out), np.asarray(tiled.decode(data)))
    covering = SdcCodec(model_set, tile_size=256)  # one tile covers it all: exactly the untiled run
    np.testing.assert_array_equal(np.asarray(covering.decode(data)), np.asarray(whole.decode(data)))


def test_tiles_come_from_the_memory_budget(model_set):
    codec = SdcCodec(model_set)
    stages = codec.stages
    assert stages.tile_for("vae_decoder", 512, 512) == 0  # fits: untiled
    tile = stages.tile_for("vae_decoder", 8000, 6000)
    assert 128 <= tile < 8000 and tile % 64 == 0
    small = SdcCodec(model_set, memory_limit=256 << 20).stages.tile_for("vae_decoder", 8000, 6000)
    assert small < tile
    assert SdcCodec(model_set, tile_size=0).stages.tile_for("vae_decoder", 8000, 6000) == 0
    for bad in (dict(memory_limit=10), dict(tile_size=5), dict(tile_size=-1)):
        with pytest.raises(SdcInputError):
            SdcCodec(model_set, **bad)


def test_peak_memory_follows_the_budget(tae_set, tmp_path):
    """Reduced photo-size run: 1024x768 through the TAE architecture (untiled it needs about
    0.9 GB of working memory) with a 300 MB budget, at the default effort (the encoder loop's
    decodes included), in a fresh process: its peak RSS stays far below the untiled need, and
    the image comes back whole."""
    import subprocess
    import sys

    script = f"""
import numpy as np
from sdc_runtime import SdcCodec
codec = SdcCodec({tae_set!r}, memory_limit=300 << 20)
y, x = np.mgrid[0:768, 0:1024]
image = np.stack([x % 256, y % 256, (x + y) % 256], -1).astype(np.uint8)
assert codec.stages.tile_for("vae_decoder", 768, 1024) > 0
out = codec.decode(codec.encode(image, mode="u8"))
assert out.size == (1024, 768)
# VmHWM: this process's own peak (ru_maxrss would include the parent's, kept across exec).
print(next(line.split()[1] for line in open("/proc/self/status") if line.startswith("VmHWM")))
"""
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, timeout=600)
    assert result.returncode == 0, result.stderr.decode()[-2000:]
    peak_mb = int(result.stdout.split()[-1]) / 1024
    print(f"peak RSS {peak_mb:.0f} MB")
    assert peak_mb < 500, peak_mb
