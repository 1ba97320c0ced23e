"""sdc-export: turn a Stable Diffusion checkpoint into an sdcodec model set (ONNX + manifest).

Its errors are the codec's family (``sdc_runtime.errors``): SdcExportError, exit 1, and
SdcUsageError, exit 2, each one line."""

__version__ = "0.1.0"
DEFAULT_OPSET = 17
