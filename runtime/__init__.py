"""sdcodec runtime: encode and decode .sdc images with ONNX Runtime.  Never imports torch.

Data flows through one module per stage: ``container`` (the .sdc format) -> ``entropy``
(DEFLATE behind an integer interface) -> ``latent`` (8-bit mapping, palette, dithering) ->
``neural`` (ONNX sessions, DDIM loop) -> ``image`` (PIL conversion).  ``codec`` ties them.
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
