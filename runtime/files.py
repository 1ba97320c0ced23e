"""File output that never leaves a half-written file: write a temporary file, then rename."""
from __future__ import annotations

import io
import os
import tempfile

from PIL import Image

from .errors import SdcInputError


def missing_modules(*names: str) -> list[str]:
    """Which of these modules cannot be imported (for the tools' one-line "install the extra")."""
    import importlib.util

    missing = []
    for name in names:
        try:
            found = importlib.util.find_spec(name) is not None
        except (ImportError, ValueError):  # ValueError: blocked with sys.modules[name] = None
            found = False
        if not found:
            missing.append(name)
    return missing


def default_mode(mode: int = 0o666) -> int:
    """``mode`` under the process umask: what open() would give a new file (mkstemp gives 0600)."""
    umask = os.umask(0)
    os.umask(umask)
    return mode & ~umask


def write_atomic(path: str | os.PathLike, data: bytes) -> None:
    path = os.fspath(path)
    directory = os.path.dirname(os.path.abspath(path))
    fd, tmp = tempfile.mkstemp(prefix=".sdc-", suffix=".tmp", dir=directory)
    try:
        with os.fdopen(fd, "wb") as fh:
            fh.write(data)
        os.chmod(tmp, default_mode())
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except FileNotFoundError:
            pass
        raise


def image_format_for(path: str) -> str:
    """Pillow format name for an output path's extension (PNG for '-' / stdout)."""
    if path == "-":
        return "PNG"
    ext = os.path.splitext(path)[1].lower()
    fmt = Image.registered_extensions().get(ext)
    if fmt is None or fmt not in Image.SAVE:
        raise SdcInputError(f"cannot tell an image format from the extension {ext or '(none)'!r} of {path}")
    return fmt


def image_bytes(image: Image.Image, fmt: str) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format=fmt)
    return buffer.getvalue()
