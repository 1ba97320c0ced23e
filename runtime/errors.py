"""The codec's exception types.  Every error the codec raises derives from SdcError."""


class SdcError(Exception):
    """Base class of every sdcodec error: catch this to catch them all."""


class SdcFormatError(SdcError, ValueError):
    """The bytes are not a valid .sdc bitstream."""


class SdcTruncatedError(SdcFormatError):
    """The bitstream ends before the data its header announces."""


class SdcChecksumError(SdcFormatError):
    """The CRC32 stored in the file does not match its contents."""


class SdcVersionError(SdcFormatError):
    """The file was written in a format version this decoder does not know."""


class SdcLimitError(SdcError, ValueError):
    """The input asks for more than the configured limits allow (pixels, channels, ...)."""


class SdcModelError(SdcError):
    """The model set is missing, malformed, or not the one a file was encoded with."""


class SdcProviderError(SdcError):
    """The requested ONNX Runtime execution provider is unknown or not installed."""


class SdcInputError(SdcError, ValueError):
    """An image or an option given to the codec is not acceptable."""


class SdcUsageError(SdcInputError):
    """A command line or a combination of options that cannot work: the tools exit 2."""


class SdcExportError(SdcError):
    """An export failed for a reason the user can act on (sdc-export prints it as one line)."""


class SdcExtraError(SdcError):
    """An optional install (an extra of the sdcodec package) that this work needs is missing."""


class SdcTargetError(SdcError):
    """A size target cannot be met: even the smallest file the model set can write is larger."""

    def __init__(self, message: str, smallest: int):
        super().__init__(message)
        self.smallest = smallest
