"""Optional installs: which extra provides what, and a check the tools use to name a missing
one in a one-line error instead of a traceback."""
from __future__ import annotations

import importlib.util

from .errors import SdcExtraError

PROVIDER_INSTALL_HINTS = {
    "cuda": "install onnxruntime-gpu in place of onnxruntime (pip install 'sdcodec[gpu]')",
    "openvino": "install onnxruntime-openvino (pip install 'sdcodec[openvino]')",
}


def missing_modules(*names: str) -> list[str]:
    """Which of these modules cannot be imported."""
    missing = []
    for name in names:
        try:
            found = importlib.util.find_spec(name) is not None
        except (ImportError, ValueError):  # ValueError: blocked with sys.modules[name] = None
            found = False
        if not found:
            missing.append(name)
    return missing


# What each extra must bring for the work that needs it.
EXTRA_MODULES = {
    "export": ("torch", "diffusers", "transformers", "onnx", "tqdm"),
    "bench": ("tqdm", "matplotlib", "scipy", "imagecodecs", "imagequant"),
    "serve": ("starlette", "uvicorn", "prometheus_client", "imagecodecs"),
    "ray": ("ray", "pyarrow"),
}


def require_extra(extra: str, what: str) -> None:
    """Raise SdcExtraError (exit 1 in every tool) naming the extra when one of its modules is missing."""
    missing = missing_modules(*EXTRA_MODULES[extra])
    if missing:
        raise SdcExtraError(f"{what} needs the {extra} extra (missing: {', '.join(missing)}):"
                            f" pip install 'sdcodec[{extra}]'")
