"""The graph roles a model set may hold, each declared once with what the runtime and the
export must know of it.  Everything that depends on a role reads it here, never from its name."""
from __future__ import annotations

from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Mapping

SD_RANGE = (-1.0, 1.0)  # SD VAEs' images
TAE_RANGE = (0.0, 1.0)  # TAESD-format autoencoders' images


@dataclass(frozen=True)
class Role:
    name: str
    # Every set has it (the encoder and the decoder).
    required: bool = False
    # It turns a latent into the image: a decode may pick it (--decoder), an fp16 set may ship
    # an fp32 stand-in for it (--fp32-fallback), and a plain --int8 quantizes it (its int8
    # loss on Kodak is the smallest: BENCHMARKS.md §8).
    decoder: bool = False
    # Never converted to fp16 or int8: the encoder's closed loop needs its exact gradient.
    fp32_only: bool = False
    # Its output is an image (the int8 parity reports a PSNR).
    outputs_image: bool = False
    # The value range of images on its pixel side, by family (the manifest's image_range; a
    # UNet's, which has none, is its family's).
    image_range: Mapping[str, tuple[float, float]] = field(default_factory=dict)
    # Working memory per image pixel on the CPU EP (bytes), by family: the slope of peak RSS
    # between two image sizes (/usr/bin/time -v, BENCHMARKS.md "Tiled neural stages"), rounded
    # up.  The runtime sizes its tiles from it (the manifest carries it per graph).
    memory_per_pixel: Mapping[str, int] = field(default_factory=dict)
    # The same, per image pixel, of the part of a split graph that runs whole (the GroupNorm
    # stages at latent resolution), which tiles do not shrink: the runtime leaves it out of
    # what the tiles may use.  Measured like memory_per_pixel, between 3 and 12 MP.
    whole_memory_per_pixel: Mapping[str, int] = field(default_factory=dict)
    # The export fails when its int8 graph's output SNR against fp32, on a held-out image, is
    # below this (dB): a broken quantization, not a small loss (TAEF2's int8 decoder measured
    # 25-36 dB, the random-weight tiny SD UNet 14 dB).
    int8_min_snr_db: float | None = None
    # A graph split in two runs these parts in this order (encoders are local up to the latent
    # resolution, decoders from it).
    split_order: tuple[str, str] = ("whole", "tiled")


def _by_family(**values):
    return MappingProxyType(values)


ROLES: Mapping[str, Role] = MappingProxyType({role.name: role for role in (
    Role("vae_encoder", required=True, image_range=_by_family(sd=SD_RANGE, tae=TAE_RANGE),
         memory_per_pixel=_by_family(sd=2100, tae=1100), int8_min_snr_db=15.0, split_order=("tiled", "whole")),
    Role("vae_decoder", required=True, decoder=True, outputs_image=True,
         image_range=_by_family(sd=SD_RANGE, tae=TAE_RANGE), memory_per_pixel=_by_family(sd=4200, tae=1100),
         int8_min_snr_db=15.0),
    Role("unet", image_range=_by_family(sd=SD_RANGE), memory_per_pixel=_by_family(sd=5400), int8_min_snr_db=10.0),  # per image pixel: latent cell / 64
    # A TAESD-format decoder shipped beside an SD set's own: TAE's range in any family.
    Role("tiny_decoder", decoder=True, outputs_image=True, image_range=_by_family(sd=TAE_RANGE, tae=TAE_RANGE),
         memory_per_pixel=_by_family(sd=1100), int8_min_snr_db=15.0),
    # (latent, image) -> the squared error's gradient at the latent, for the encoder's closed
    # loop; it keeps every activation of its forward pass for the backward one.
    # An int8 set's decoder as it was in fp32, which the export keeps where the set descends: the
    # closed loop measures the int8 decoder's offset from it and aims the descent between the
    # two decoders (refine.INT8_AIM), so the files suit both.  It decodes no file itself.
    Role("reference_decoder", fp32_only=True, outputs_image=True, image_range=_by_family(sd=SD_RANGE, tae=TAE_RANGE),
         memory_per_pixel=_by_family(sd=4200, tae=1100)),
    Role("decoder_gradient", fp32_only=True, image_range=_by_family(sd=SD_RANGE, tae=TAE_RANGE),
         memory_per_pixel=_by_family(sd=25000, tae=2400), whole_memory_per_pixel=_by_family(tae=100)),
)})

GRAPH_ROLES = tuple(ROLES)
DECODERS = tuple(name for name, role in ROLES.items() if role.decoder)
FP32_ONLY_ROLES = tuple(name for name, role in ROLES.items() if role.fp32_only)
REQUIRED_ROLES = tuple(name for name, role in ROLES.items() if role.required)


def role_of(name: str) -> Role:
    """The role of a graph or of a part of one ('vae_decoder.whole')."""
    return ROLES[name.split(".", 1)[0]]
