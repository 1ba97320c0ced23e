"""Encoder options: resolved from a model set's defaults plus the caller's overrides, and
checked here once.  Everything downstream takes the resolved value as it is.

The defaults themselves are part of the model set (``manifest.json`` → ``defaults``), so a
new model family needs no edit here; the manifest's own validation runs them through
``resolve_encode_options`` too, so one set of checks covers both.
"""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field, fields, replace

from .container import MAX_COLORS, MAX_DENOISE_STEPS, MAX_GROUP_CHANNELS, MODE_PALETTE, MODE_U8, smallest_file_bytes
from .errors import SdcInputError

MODES = {"u8": MODE_U8, "palette": MODE_PALETTE}
ALPHA_CHOICES = ("keep", "drop")
MAX_EFFORT = 9
# The options a quality (or a size target) chooses; naming one of them as well is a conflict.
LATENT_CODING_OPTIONS = ("mode", "colors", "group_channels", "quant_step")
# Options that mean something in palette mode only: naming one for a u8 file is a conflict.
PALETTE_ONLY_OPTIONS = ("colors", "group_channels", "dither")


@dataclass(frozen=True)
class QualityPoint:
    """One anchor of a family's quality scale (1..100): the latent coding that quality gets.

    Between two u8 anchors the quant_step is interpolated geometrically, so the high end is
    continuous; a palette anchor holds up to the next anchor."""

    quality: int
    mode: str
    colors: int = 0
    group_channels: int = 0
    quant_step: float | None = None


def quality_point(table: tuple[QualityPoint, ...], quality: int) -> QualityPoint:
    """The latent coding for ``quality`` on a (checked) quality table."""
    below = max((p for p in table if p.quality <= quality), key=lambda p: p.quality)
    above = min((p for p in table if p.quality >= quality), key=lambda p: p.quality)
    if below is above or below.mode != "u8" or above.mode != "u8":
        return replace(below, quality=quality)
    t = (quality - below.quality) / (above.quality - below.quality)
    step = math.exp((1 - t) * math.log(below.quant_step) + t * math.log(above.quant_step))
    return QualityPoint(quality, "u8", quant_step=float(f"{step:.4g}"))


def check_quality_table(table) -> None:
    """A quality table covers 1..100 with increasing anchors, each a valid latent coding."""
    qualities = [p.quality for p in table]
    if not table or qualities[0] != 1 or qualities[-1] != 100 or qualities != sorted(set(qualities)):
        raise SdcInputError("quality_table needs anchors at increasing qualities from 1 to 100")
    for point in table:
        if point.mode == "u8" and not (_number(point.quant_step) and point.quant_step > 0):
            raise SdcInputError(f"quality {point.quality}: a u8 anchor needs a positive quant_step")
        if point.mode == "palette" and not (_integer(point.colors) and _integer(point.group_channels)):
            raise SdcInputError(f"quality {point.quality}: a palette anchor needs colors and group_channels")


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
    # What the encoder does when the caller names no latent coding, and the scale it maps to.
    quality: int
    effort: int
    quality_table: tuple[QualityPoint, ...]


def option(kind: type, help: str, *, default=None, choices: tuple | None = None, short: str | None = None,
           metavar: str | None = None):
    """A field of EncodeOptions that callers may set: its type as text arrives (a command-line
    flag, a query parameter, a Pillow keyword), its help, and the resolved default where the
    model set does not give one.  Every entry point reads these; none declares an option."""
    metadata = {"kind": kind, "help": help, "choices": choices, "short": short, "metavar": metavar}
    return field(default=default, metadata=metadata)


@dataclass(frozen=True)
class EncodeOptions:
    """Every encoder option, resolved and checked; each field's metadata declares it once
    for the CLI, the service and the Pillow plugin (``option_specs``).

    Palette mode: ``colors`` entries per palette (at most; fewer when the latent has fewer
    distinct cells), one palette per group of ``group_channels`` latent channels, assigned by
    Floyd–Steinberg error diffusion if ``dither``, else by nearest colour.  u8 mode:
    ``quant_step`` (raw latent units, for a channel of average decoder sensitivity) trades
    quality for bytes; None is the finest mapping that fits 8 bits; ``deadzone`` moves each
    level's rounding that far toward the entropy coder's prediction.  ``denoise_steps``,
    ``denoise_stride`` and ``eta`` are stored in the header as the decoder's defaults;
    ``seed`` seeds the palette search and the DDIM noise.  ``alpha`` "keep" stores an alpha
    channel losslessly, "drop" ignores it; ``strip`` drops the ICC profile, EXIF and XMP.

    ``quality`` (1..100) is the point of the model set's quality scale that chose mode, colors,
    group_channels and quant_step (None where the caller named those).  ``target_bytes``: the
    encoder searches the quality scale for the best file not larger.  ``effort`` (0..9): how
    many closed-loop refinement passes the encoder spends; the bitstream is the same.
    """

    quality: int | None = option(
        int, "1..100, higher is larger and better: a point on the model set's quality scale, which chooses "
        "mode, colors, group_channels and quant_step (default: the set's)", short="q", metavar="Q")
    target_bytes: int | None = option(
        int, "the best quality whose file is not larger than N bytes (fails if none is)", metavar="N")
    effort: int = option(
        int, "0..9: closed-loop refinement passes; higher is slower and better at equal bytes, same format "
        "(default: the set's)", default=0, short="e", metavar="E")
    mode: str = option(str, "latent coding (default: the quality's)", default="u8", choices=tuple(MODES))
    colors: int = option(int, "palette mode: palette size, 2..4096 (default: the quality's)", default=0)
    group_channels: int = option(
        int, "palette mode: one palette per group of G latent channels (default: the quality's)", default=0,
        metavar="G")
    dither: bool = option(bool, "palette mode: Floyd-Steinberg dithering of the latent (default: the set's)",
                          default=False)
    quant_step: float | None = option(
        float, "u8 mode (implied): quantization step in raw latent units for a channel of average decoder "
        "sensitivity; larger is smaller and worse (default: the quality's)")
    deadzone: float = option(
        float, "u8 mode: round each latent level up to D levels toward the value the entropy coder predicts"
        " (rate-aware rounding: smaller files, a little more error), 0..0.5 (default 0: nearest; 0.05 gained"
        " 0.6 points of BD-rate on Kodak, BENCHMARKS.md §13)", default=0.0, metavar="D")
    denoise_steps: int = option(int, "UNet denoising steps the decoder runs by default (default: the set's)",
                                default=0)
    denoise_stride: int = option(int, "timesteps between denoising steps (default: the set's)", default=0)
    eta: float = option(float, "DDIM noise of the denoising steps, 0..1 (default: the set's)", default=0.0)
    seed: int = option(int, "seed of the palette search and the DDIM noise (default 0)", default=0)
    alpha: str = option(str, "an alpha channel is stored losslessly (keep, the default) or ignored (drop)",
                        default="keep", choices=ALPHA_CHOICES)
    strip: bool = option(bool, "drop the ICC profile, EXIF and XMP", default=False)


@dataclass(frozen=True)
class OptionSpec:
    """One encoder option as the entry points see it (from EncodeOptions' field metadata)."""

    name: str
    kind: type
    help: str
    choices: tuple | None = None
    short: str | None = None
    metavar: str | None = None

    @property
    def flag(self) -> str:
        return "--" + self.name.replace("_", "-")

    def parse(self, text: str):
        """A value given as text (a query parameter), typed; SdcInputError names the option."""
        if self.kind is bool:
            if text.lower() not in ("true", "false", "1", "0"):
                raise SdcInputError(f"{self.name} must be true or false, not {text!r}")
            return text.lower() in ("true", "1")
        try:
            return self.kind(text)
        except ValueError:
            raise SdcInputError(f"{self.name} must be {self.kind.__name__}, not {text!r}") from None


def option_specs(options_class=None) -> tuple[OptionSpec, ...]:
    """The options callers may set, in declaration order: the fields that carry ``option`` metadata."""
    return tuple(OptionSpec(f.name, **f.metadata) for f in fields(options_class or EncodeOptions)
                 if "kind" in f.metadata)


# Read at call time by every entry point, so one declaration reaches them all.
ENCODE_OPTIONS = option_specs()
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
    chosen = {f.name: getattr(defaults, f.name, f.default) for f in fields(EncodeOptions)}
    chosen["quality"] = None
    chosen.update({name: value for name, value in overrides.items() if value is not None})
    named = [name for name in LATENT_CODING_OPTIONS if overrides.get(name) is not None]
    quality, target_bytes = overrides.get("quality"), chosen["target_bytes"]
    if quality is not None and target_bytes is not None:
        raise SdcInputError("quality and target_bytes both choose the file size: give one of them")
    if named and (quality is not None or target_bytes is not None):
        raise SdcInputError(f"{'quality' if quality is not None else 'target_bytes'} chooses "
                            f"{', '.join(LATENT_CODING_OPTIONS)}: do not also give {', '.join(named)}")
    if target_bytes is not None:
        smallest = smallest_file_bytes(limits.latent_channels)
        if not _integer(target_bytes) or not smallest <= target_bytes < 1 << 40:
            raise SdcInputError(f"target_bytes must be an integer of at least {smallest} (the smallest possible"
                                f" file of this model set), not {target_bytes!r}")
    if named:
        quality = None
        if "mode" not in named:  # the options named imply it: a quant_step is u8's, a palette size a palette's
            if "quant_step" in named:
                chosen["mode"] = "u8"
            elif "colors" in named or "group_channels" in named:
                chosen["mode"] = "palette"
    else:  # the default quality, when nothing chose the coding; a size target's search starts there
        quality = defaults.quality if quality is None else quality
        if not _integer(quality) or not 1 <= quality <= 100:
            raise SdcInputError(f"quality must be an integer in 1..100, not {quality!r}")
        point = quality_point(defaults.quality_table, quality)
        chosen.update(mode=point.mode, quant_step=point.quant_step)
        if point.mode == "palette":
            chosen.update(colors=point.colors, group_channels=point.group_channels)
    if not _integer(chosen["effort"]) or not 0 <= chosen["effort"] <= MAX_EFFORT:
        raise SdcInputError(f"effort must be an integer in 0..{MAX_EFFORT}, not {chosen['effort']!r}")
    mode = chosen["mode"]
    if mode not in MODES:
        raise SdcInputError(f"unknown mode {mode!r}; choose one of {', '.join(MODES)}")
    if mode == "u8" and named:  # a quality's scale may land on palettes, where dither then applies
        ignored = [name for name in PALETTE_ONLY_OPTIONS if overrides.get(name) is not None]
        if ignored:
            raise SdcInputError(f"{', '.join(ignored)} apply to palette mode only, and the mode is u8")
    colors = chosen["colors"]
    if not _integer(colors) or not 2 <= colors <= MAX_COLORS:
        raise SdcInputError(f"colors must be an integer in 2..{MAX_COLORS}, not {colors!r}")
    channels = limits.latent_channels
    group_channels = chosen["group_channels"]
    if "group_channels" not in named and quality is None:
        # The family default may be wider than a set with few channels: then one group of all.
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
    if not _number(chosen["deadzone"]) or not 0.0 <= chosen["deadzone"] <= 0.5:
        raise SdcInputError(f"deadzone must be a number in [0, 0.5], not {chosen['deadzone']!r}")
    if chosen["alpha"] not in ALPHA_CHOICES:
        raise SdcInputError(f"alpha must be one of {', '.join(ALPHA_CHOICES)}, not {chosen['alpha']!r}")
    if not isinstance(chosen["strip"], bool):
        raise SdcInputError(f"strip must be True or False, not {chosen['strip']!r}")
    denoising = resolve_denoising(defaults, limits, denoise_steps=chosen["denoise_steps"],
                                  denoise_stride=chosen["denoise_stride"], eta=chosen["eta"], seed=chosen["seed"])
    return EncodeOptions(mode=mode, colors=colors, group_channels=group_channels if mode == "palette" else 0,
                         dither=chosen["dither"], quant_step=quant_step, deadzone=float(chosen["deadzone"]),
                         **asdict(denoising),
                         alpha=chosen["alpha"], strip=chosen["strip"], quality=quality, effort=chosen["effort"],
                         target_bytes=target_bytes)
