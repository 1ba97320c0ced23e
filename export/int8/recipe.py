"""The int8 recipe: every tuning choice of the calibration, the sweep and the correction, in
one value that the export (and a test) passes in.  The comments cite the measurements that
chose each default."""
from __future__ import annotations

from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Mapping

from sdc_runtime.roles import ROLES


@dataclass(frozen=True)
class Int8Recipe:
    """How int8 graphs are calibrated, swept and corrected (``quantize_set``)."""

    # The qualities each image is coded at, so that decoders and the UNet calibrate on the
    # dequantized latents the scale's qualities make (SD: palettes at the low end, u8 above; TAE:
    # u8 throughout), as the runtime feeds them.
    calibration_qualities: tuple = (1, 10, 30, 60, 90)
    # A second run in tiles of this side, at a low and a middle quality, records the inputs of
    # split graphs' whole and tiled parts (9 tiles an image: all qualities would triple the time).
    calibration_tile: int = 128
    calibration_tiled_qualities: tuple = (10, 60)
    # Images no larger than a tile run whole in the tiled pass too, which would leave the parts of
    # split graphs (whole and tiled) without feeds: in sets with such graphs they are tiled in
    # halves, down to the codec's smallest tile_size.
    min_calibration_tile: int = 64
    # The sweep keeps in float the units whose float gains at least keep_gain_db of output SNR
    # on the calibration set, most costly first, at most max_kept of them, and only while the
    # float weights stay within float_weight_share of the graph's: an int8 file is then at most
    # ~0.3x its fp32 file (TAEF2's decoder all int8: 0.27x, weights, scales and QDQ nodes).
    # Measured on TAEF2's decoder (BENCHMARKS.md §8): no single unit holds most of the loss (the largest gain 0.2 dB); six kept blocks
    # bought 0.3 dB of SNR for twice the file size.
    keep_gain_db: float = 0.03
    max_kept: int = 6
    float_weight_share: float = 0.03
    # Graphs with more sweep candidates (SWEPT_OPS) than max_sweep_units are swept per block
    # (grouped by module path), and each trial is scored on at most sweep_feeds of the
    # calibration feeds (drawn_feeds): the sweep costs one quantization and one such run per unit.
    max_sweep_units: int = 24
    sweep_feeds: int = 6
    # A decoder's lowest-resolution stage (every node before its first upsampling op) holds a
    # small share of its FLOPs but feeds every later layer its error: there, activations in 16
    # bits (weights stay int8) cost little time.  The sweep tries the stage with them and keeps
    # them when that gains at least keep_gain_db and the stage holds at most wide_flop_share of
    # the graph's FLOPs (16-bit activations run through float kernels).  Measured on TAEF2's
    # decoder (its stage 2.6% of the FLOPs; BENCHMARKS.md §8): the u8 loss on Kodak-24 fell from
    # 0.328 to 0.238 dB mean, the int8 decoder ran 7% slower.  The SD decoder's stage (its mid
    # block and first up block, 9.4% of the FLOPs at 512x512) is over the share.
    wide_flop_share: float = 0.05
    # The per-channel correction of the int8 convolutions: fitted on this many calibration feeds,
    # one from each run of the list (drawn_feeds), and never moving a channel's gain by more
    # than max_gain_change (measured gains moved by at most 0.06).  It costs one run of the fp32
    # and of the int8 graph per feed, and holds every feed's activations at a layer boundary.
    # Measured on TAEF2's decoder, both Kodak folds (BENCHMARKS.md §8): ten of 160 feeds left the
    # fit to chance (three draws spread over 0.12 dB of mean u8 loss); 40 took 0.02 dB off the
    # mean and 0.08 dB off the worst image of the shipped draw, at 4.7 GB of peak memory; all
    # 160 took 0.04 dB off the mean but needed 15 GB.  The whole two-fold bench then confirmed
    # 40: 0.04 dB less mean u8 decoder loss and 0.13 dB less on the worst image than 10.
    correction_feeds: int = 40
    max_gain_change: float = 0.1
    # The feeds of the check image that choose each layer's fit (correct_layers): a choice between
    # two candidates needs fewer than a fit.
    check_feeds: int = 4
    # The refit of a layer's weights (correct_layers): layers with at most max_refit_columns
    # weights per output channel (the SD VAE's 512 channels x 3x3), fitted on
    # refit_rows output positions drawn from the correction feeds, gathered refit_chunk_rows at a
    # time; ridge and gptq_damping are fractions of the input's mean variance (measured on TAEF2,
    # BENCHMARKS.md §8).
    max_refit_columns: int = 512 * 9
    refit_rows: int = 200_000
    refit_chunk_rows: int = 4096
    ridge: float = 1e-3
    gptq_damping: float = 0.01
    # Export fails when an int8 graph's output SNR against its fp32 graph, on a held-out image,
    # is below this (dB): each role's own (sdc_runtime.roles), unless a probe asks for another.
    min_parity_snr_db: Mapping[str, float] = field(default_factory=lambda: MappingProxyType(
        {name: role.int8_min_snr_db for name, role in ROLES.items() if role.int8_min_snr_db is not None}))


DEFAULT_RECIPE = Int8Recipe()
