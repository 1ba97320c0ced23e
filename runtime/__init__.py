"""sdcodec runtime: encode and decode .sdc images with ONNX Runtime.  Never imports torch.

Data flows through one module per stage: ``container`` (the .sdc format) -> ``entropy``
(DEFLATE / LZMA2 behind an integer interface) -> ``latent`` (8-bit mapping, palettes,
dithering) -> ``neural`` (ONNX sessions, DDIM loop) -> ``image`` (PIL conversion).
``codec`` ties them; ``pillow_plugin`` registers the format with Pillow.
"""
from .codec import SdcCodec, info as sdc_info, pack_latent, sdc_check, unpack_latent
from .errors import (
    SdcChecksumError, SdcError, SdcFormatError, SdcInputError, SdcLimitError, SdcModelError,
    SdcProviderError, SdcTruncatedError, SdcVersionError,
)

__version__ = "0.1.0"
__all__ = [
    "SdcCodec", "sdc_check", "sdc_info", "pack_latent", "unpack_latent",
    "SdcError", "SdcFormatError", "SdcTruncatedError", "SdcChecksumError", "SdcVersionError",
    "SdcLimitError", "SdcModelError", "SdcProviderError", "SdcInputError",
]
