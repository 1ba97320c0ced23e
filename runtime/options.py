"""Encoder options: resolved from a model set's defaults plus the caller's overrides, and
checked here once.  Everything downstream takes the resolved value as it is.

The defaults themselves are part of the model set (``manifest.json`` → ``defaults``), so a
new model family needs no edit here; the manifest's own validation runs them through
``resolve_encode_options`` too, so one set of checks covers both.
"""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass, fields

from .container import MAX_COLORS, MAX_DENOISE_STEPS, MAX_GROUP_CHANNELS, MODE_PALETTE, MODE_U8
from .errors import SdcInputError

MODES = {"u8": MODE_U8, "palette": MODE_PALETTE}
ALPHA_CHOICES = ("keep", "drop")


@dataclass(frozen=True)
class EncoderDefaults:
    """A model family's encoder defaults, as ``sdc-export`` writes them into the manifest."""

    mode: str
    colors: int
    group_channels: int
    dither: bool
    denoise_steps: int
    denoise_stride: int
    eta: float


@dataclass(frozen=True)
class EncodeOptions:
    """Every encoder option, resolved and checked.

    Palette mode: ``colors`` entries per palette (at most; fewer when the latent has fewer
    distinct cells), one palette per group of ``group_channels`` latent channels, assigned by
    Floyd–Steinberg error diffusion if ``dither``, else by nearest colour.  u8 mode:
    ``quant_step`` (raw latent units, for a channel of average decoder sensitivity) trades
    quality for bytes; None is the finest mapping that fits 8 bits.  ``denoise_steps``,
    ``denoise_stride`` and ``eta`` are stored in the header as the decoder's defaults;
    ``seed`` seeds the palette search and the DDIM noise.  ``alpha`` "keep" stores an alpha
    channel losslessly, "drop" ignores it; ``strip`` drops the ICC profile, EXIF and XMP.
    """

    mode: str
    colors: int
    group_channels: int
    dither: bool
    quant_step: float | None
    denoise_steps: int
    denoise_stride: int
    eta: float
    seed: int
    alpha: str = "keep"
    strip: bool = False


ENCODE_OPTION_NAMES = tuple(f.name for f in fields(EncodeOptions))


@dataclass(frozen=True)
class ModelLimits:
    """What a model set allows, as far as options are concerned."""

    latent_channels: int
    # 0 where the set has no UNet: then no denoising steps can be stored.
    train_timesteps: int


def _integer(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


@dataclass(frozen=True)
class Denoising:
    """The DDIM steps a decode runs: at t = (denoise_steps-1)·denoise_stride, …, denoise_stride, 0."""

    denoise_steps: int
    denoise_stride: int
    eta: float
    seed: int


def resolve_denoising(defaults: EncoderDefaults, limits: ModelLimits, *, denoise_steps, denoise_stride=None,
                      eta=None, seed=0) -> Denoising:
    """Denoising parameters, checked; a stride or eta of None takes the model set's default.
    Without steps, stride and eta are 0: they would mean nothing."""
    if not _integer(denoise_steps) or not 0 <= denoise_steps <= MAX_DENOISE_STEPS:
        raise SdcInputError(f"denoise_steps must be an integer in 0..{MAX_DENOISE_STEPS}, not {denoise_steps!r}")
    if not _integer(seed) or not 0 <= seed < 2 ** 32:
        raise SdcInputError(f"seed must be an integer in 0..2**32-1, not {seed!r}")
    eta = defaults.eta if eta is None else eta
    if not _number(eta) or not 0.0 <= eta <= 1.0:
        raise SdcInputError(f"eta must be a number in [0, 1], not {eta!r}")
    if not denoise_steps:
        return Denoising(0, 0, 0.0, seed)
    if not limits.train_timesteps:
        raise SdcInputError("this model set has no UNet: denoise_steps must be 0")
    stride = defaults.denoise_stride if denoise_stride is None else denoise_stride
    if (not _integer(stride) or not 1 <= stride < 1 << 16
            or (denoise_steps - 1) * stride >= limits.train_timesteps):
        raise SdcInputError(
            f"{denoise_steps} denoising steps at stride {stride!r} need an integer stride of at least 1 with "
            f"(steps-1)*stride below the {limits.train_timesteps} training timesteps")
    return Denoising(denoise_steps, stride, float(eta), seed)


def resolve_encode_options(defaults: EncoderDefaults, limits: ModelLimits, **overrides) -> EncodeOptions:
    """The defaults with the caller's overrides (None means "the default"), checked.

    Every invalid value raises SdcInputError naming the option.
    """
    unknown = sorted(set(overrides) - set(ENCODE_OPTION_NAMES))
    if unknown:
        raise SdcInputError(f"unknown encoder option(s) {', '.join(unknown)}; known: {', '.join(ENCODE_OPTION_NAMES)}")
    chosen = {**asdict(defaults), "quant_step": None, "seed": 0, "alpha": "keep", "strip": False}
    chosen.update({name: value for name, value in overrides.items() if value is not None})
    mode = chosen["mode"]
    if mode not in MODES:
        raise SdcInputError(f"unknown mode {mode!r}; choose one of {', '.join(MODES)}")
    colors = chosen["colors"]
    if not _integer(colors) or not 2 <= colors <= MAX_COLORS:
        raise SdcInputError(f"colors must be an integer in 2..{MAX_COLORS}, not {colors!r}")
    channels = limits.latent_channels
    # The family default may be wider than a set with few channels: then one group of all.
    group_channels = overrides.get("group_channels")
    if group_channels is None:
        group_channels = min(defaults.group_channels, channels)
    if (not _integer(group_channels) or not 1 <= group_channels <= min(channels, MAX_GROUP_CHANNELS)
            or channels % group_channels):
        raise SdcInputError(
            f"group_channels must divide the {channels} latent channels (at most {MAX_GROUP_CHANNELS}),"
            f" not {group_channels!r}")
    if not isinstance(chosen["dither"], bool):
        raise SdcInputError(f"dither must be True or False, not {chosen['dither']!r}")
    quant_step = chosen["quant_step"]
    if quant_step is not None:
        if mode != "u8":
            raise SdcInputError("quant_step applies to u8 mode only")
        if not _number(quant_step) or not 0 < quant_step < 1e6:
            raise SdcInputError(f"quant_step must be a positive number, not {quant_step!r}")
        quant_step = float(quant_step)
    if chosen["alpha"] not in ALPHA_CHOICES:
        raise SdcInputError(f"alpha must be one of {', '.join(ALPHA_CHOICES)}, not {chosen['alpha']!r}")
    if not isinstance(chosen["strip"], bool):
        raise SdcInputError(f"strip must be True or False, not {chosen['strip']!r}")
    denoising = resolve_denoising(defaults, limits, denoise_steps=chosen["denoise_steps"],
                                  denoise_stride=chosen["denoise_stride"], eta=chosen["eta"], seed=chosen["seed"])
    return EncodeOptions(mode=mode, colors=colors, group_channels=group_channels if mode == "palette" else 0,
                         dither=chosen["dither"], quant_step=quant_step, **asdict(denoising),
                         alpha=chosen["alpha"], strip=chosen["strip"])
