"""Optional installs: which extra provides what, and a check the tools use to name a missing
one in a one-line error instead of a traceback."""
from __future__ import annotations

import importlib.util

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
