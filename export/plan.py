"""What one export writes, checked once: ``ExportPlan``.  The CLI builds it from its flags
(``plan_from_args``) and every exporter takes it as it is."""
from __future__ import annotations

import os
from dataclasses import dataclass, field

import numpy as np

from sdc_runtime.errors import SdcExportError, SdcUsageError
from sdc_runtime.manifest import WEIGHT_BITS
from sdc_runtime.roles import DECODERS, FP32_ONLY_ROLES

from . import DEFAULT_OPSET
from .int8 import (
    CALIBRATION_SIDE,
    DEFAULT_RECIPE,
    DEFAULT_WEIGHT_BITS,
    MIN_CALIBRATION_IMAGES,
    Int8Recipe,
    calibration_images,
)

# ONNX opsets the exporters and the runtime's ONNX Runtime agree on.
OPSETS = range(14, 22)
# The graphs each kind of export writes (modelset's specs; a test holds the two together), so
# that the graphs --int8 and --keep-fp32 name are checked before the model loads.
SD_ROLES = ("vae_encoder", "vae_decoder", "unet")
VAE_ROLES = ("vae_encoder", "vae_decoder")
TAE_ROLES = ("vae_encoder", "vae_decoder", "decoder_gradient")


@dataclass(frozen=True)
class ExportPlan:
    """``roles``: the graphs the export writes.  With ``fp16`` they are fp16, except those in
    ``keep_fp32`` (and the fp32-only roles); with ``fp32_fallback`` every fp16 decoder also ships
    in fp32.  The ``int8`` roles are quantized, calibrated on ``calibration`` images (uint8 RGB),
    swept unless not ``sweep_nodes``, their weights in ``weight_bits``, as ``int8_recipe`` says.
    ``tiny_decoder``: a TAESD-format decoder folder shipped beside an SD or VAE set's own.
    ``fuse_attention``: attention as ONNX Runtime's MultiHeadAttention."""

    roles: tuple[str, ...]
    opset: int = DEFAULT_OPSET
    force: bool = False
    fp16: bool = False
    keep_fp32: tuple[str, ...] = ()
    fp32_fallback: bool = False
    fuse_attention: bool = True
    tiny_decoder: str | None = None
    int8: tuple[str, ...] = ()
    calibration: list[np.ndarray] = field(default_factory=list)
    sweep_nodes: bool = True
    weight_bits: int = DEFAULT_WEIGHT_BITS
    int8_recipe: Int8Recipe = DEFAULT_RECIPE

    def __post_init__(self):
        if self.opset not in OPSETS:
            raise SdcExportError(f"opset {self.opset} is not supported ({OPSETS[0]}..{OPSETS[-1]})")
        if (self.keep_fp32 or self.fp32_fallback) and not self.fp16:
            raise SdcUsageError("--keep-fp32 and --fp32-fallback apply to --fp16 exports only")
        for flag, named in (("--keep-fp32", self.keep_fp32), ("--int8", self.int8)):
            unknown = sorted(set(named) - set(self.roles))
            if unknown:
                raise SdcExportError(f"{flag}: this export has no {', '.join(unknown)} graph"
                                     f" (it has {', '.join(self.roles)})")
        if set(self.int8) & set(FP32_ONLY_ROLES):
            raise SdcExportError(f"--int8: {', '.join(sorted(set(self.int8) & set(FP32_ONLY_ROLES)))} is always fp32")
        if set(self.int8) & set(self.keep_fp32):
            raise SdcExportError(f"{', '.join(sorted(set(self.int8) & set(self.keep_fp32)))}: both --int8 and"
                                 " --keep-fp32")
        if self.int8 and len(self.calibration) < MIN_CALIBRATION_IMAGES:
            raise SdcExportError(f"int8 calibration needs at least {MIN_CALIBRATION_IMAGES} images,"
                                 f" not {len(self.calibration)}")
        if self.weight_bits not in WEIGHT_BITS:
            raise SdcUsageError(f"--int8-weight-bits must be {' or '.join(map(str, WEIGHT_BITS))},"
                                f" not {self.weight_bits}")

    def precision_of(self, role: str) -> str:
        if role in self.int8:
            return "int8"
        return "fp16" if self.fp16 and role not in self.keep_fp32 + FP32_ONLY_ROLES else "fp32"


def plan_from_args(args, roles: tuple[str, ...], int8_recipe: Int8Recipe = DEFAULT_RECIPE) -> ExportPlan:
    """sdc-export's flags as a plan for an export of ``roles``; usage errors before any image is read."""
    int8_flags = (args.calibration is not None or args.no_sweep or args.calibration_side is not None
                  or args.int8_weight_bits is not None)
    if args.int8 is None and int8_flags:
        raise SdcUsageError("--calibration, --calibration-side, --int8-weight-bits and --no-sweep apply to --int8"
                            " exports only")
    if args.tiny_decoder and not os.path.isdir(args.tiny_decoder):
        raise SdcExportError(f"--tiny-decoder {args.tiny_decoder} is not a folder")
    int8, calibration = (), []
    if args.int8 is not None:
        if args.calibration is None:
            raise SdcUsageError("--int8 needs --calibration DIR, a folder of images to calibrate on")
        if args.calibration_count < MIN_CALIBRATION_IMAGES:
            raise SdcUsageError(f"--calibration-count must be at least {MIN_CALIBRATION_IMAGES}, not"
                                f" {args.calibration_count}")
        # Alone, --int8 names the decoders this export has.
        int8 = (tuple(r for r in DECODERS if r in roles) if args.int8 == "default"
                else tuple(r for r in args.int8.split(",") if r))
        if args.int8_weight_bits is not None and args.int8_weight_bits not in WEIGHT_BITS:
            raise SdcUsageError(f"--int8-weight-bits must be {' or '.join(map(str, WEIGHT_BITS))},"
                                f" not {args.int8_weight_bits}")
        side = CALIBRATION_SIDE if args.calibration_side is None else args.calibration_side
        calibration = calibration_images(args.calibration, args.calibration_count, side)
    return ExportPlan(roles=roles, opset=args.opset, force=args.force, fp16=args.fp16,
                      keep_fp32=tuple(r for r in args.keep_fp32.split(",") if r), fp32_fallback=args.fp32_fallback,
                      fuse_attention=not args.no_fuse_attention, tiny_decoder=args.tiny_decoder, int8=int8,
                      calibration=calibration, sweep_nodes=not args.no_sweep, int8_recipe=int8_recipe,
                      weight_bits=DEFAULT_WEIGHT_BITS if args.int8_weight_bits is None else args.int8_weight_bits)
