"""Export's int8 parity: each int8 graph against its fp32 graph on a held-out image."""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from sdc_runtime.image import psnr as image_psnr
from sdc_runtime.roles import role_of

from .ops import DEFAULT_WEIGHT_BITS
from .qdq import outputs
from .sweep import snr_db


@dataclass
class Int8Parity:
    """An int8 graph against its fp32 graph on the held-out calibration image."""

    role: str
    snr_db: float  # 10 log10(sum y^2 / sum (y_int8 - y)^2)
    psnr_db: float | None  # image graphs: PSNR of the int8 output against the fp32 one
    tolerance_db: float
    passed: bool

    def line(self) -> str:
        psnr = f", PSNR {self.psnr_db:.2f} dB" if self.psnr_db is not None else ""
        mark = "ok" if self.passed else "FAIL"
        return (f"{self.role:12s} int8: SNR {self.snr_db:.2f} dB vs fp32{psnr}"
                f" (tolerance {self.tolerance_db:.1f} dB) {mark}")


def int8_parity(name: str, fp32: str, int8: str, feeds: list[dict], tolerance_db: float,
                image_range: tuple[float, float], weight_bits: int = DEFAULT_WEIGHT_BITS) -> Int8Parity:
    reference, actual = outputs(fp32, feeds), outputs(int8, feeds, weight_bits)
    snr = snr_db(reference, actual)
    psnr = None
    role = role_of(name)
    if role.outputs_image and not name.endswith("." + role.split_order[0]):  # the part that outputs the image
        flat = [np.concatenate([x.ravel() for x in arrays]) for arrays in (reference, actual)]
        psnr = image_psnr(*flat, peak=image_range[1] - image_range[0])
    finite = all(np.isfinite(a).all() for a in actual)
    return Int8Parity(name, snr, psnr, tolerance_db, finite and snr >= tolerance_db)
