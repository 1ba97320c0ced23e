"""sdcodec runtime: encode and decode .sdc images with ONNX Runtime.  Never imports torch.

Data flows through one module per stage: ``container`` (the .sdc format) -> ``entropy``
(DEFLATE / LZMA2 behind an integer interface) -> ``latent`` (8-bit mapping, palettes,
dithering, lookup) -> ``neural`` (ONNX sessions, DDIM loop) -> ``image`` (PIL conversion).
``bitstream`` is the exact, model-free layer over the first three (``sdc_check``,
``sdc_info``, ``sdc_decode``, ``sdc_encode``); ``options`` resolves and checks encoder
options once; ``codec`` (``SdcCodec``) ties everything for one model set;
``pillow_plugin`` registers the format with Pillow; ``cli`` is ``sdc-runtime``.
"""
from .bitstream import SdcContents, sdc_check, sdc_decode, sdc_decode_all, sdc_encode, sdc_info
from .codec import SdcCodec
from .container import Header
from .errors import (
    SdcChecksumError,
    SdcError,
    SdcFormatError,
    SdcInputError,
    SdcLimitError,
    SdcModelError,
    SdcProviderError,
    SdcTargetError,
    SdcTruncatedError,
    SdcVersionError,
)
from .image import SdcWarning
from .options import EncodeOptions

__version__ = "0.1.0"
__all__ = [
    "SdcCodec", "EncodeOptions", "Header", "SdcContents", "SdcWarning",
    "sdc_check", "sdc_info", "sdc_decode", "sdc_decode_all", "sdc_encode",
    "SdcError", "SdcFormatError", "SdcTruncatedError", "SdcChecksumError", "SdcVersionError",
    "SdcLimitError", "SdcModelError", "SdcProviderError", "SdcInputError", "SdcTargetError",
]
