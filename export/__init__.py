"""sdc-export: turn a Stable Diffusion checkpoint into an sdcodec model set (ONNX + manifest)."""

__version__ = "0.1.0"
DEFAULT_OPSET = 17


class ExportError(Exception):
    """An export failed for a reason the user can act on; the CLI prints it as one line."""


class UsageError(ExportError):
    """Options that do not go together: the CLI exits 2, as for its parser's errors."""
