"""Image stage: reading input images, PIL images <-> padded float arrays in a graph's value
range, and output image formats."""
from __future__ import annotations

import io
import os

import numpy as np
from PIL import Image, UnidentifiedImageError

from .errors import SdcInputError


def check_pixel_limit(width: int, height: int, max_pixels: int | None) -> None:
    if max_pixels is not None and width * height > max_pixels:
        raise SdcInputError(f"image of {width}x{height} is over the pixel limit of {max_pixels}"
                            " (raise it with max_pixels= or --max-pixels)")


def load_image(source, *, max_pixels: int | None = None) -> Image.Image:
    """A path, bytes or file object -> PIL image; unreadable input is an SdcInputError.

    The size is checked against ``max_pixels`` from the header, before the pixels are decoded.
    """
    try:
        if isinstance(source, (bytes, bytearray, memoryview)):
            source = io.BytesIO(source)
        image = Image.open(source)
        check_pixel_limit(image.width, image.height, max_pixels)
        image.load()
        return image
    except (UnidentifiedImageError, OSError, Image.DecompressionBombError) as exc:
        raise SdcInputError(f"cannot read the input image: {exc}") from None


def to_pixels(image, downscale: int, *, max_pixels: int | None = None) -> tuple[np.ndarray, tuple[int, int]]:
    """RGB image -> (H', W', 3) uint8 padded by edge replication to multiples of downscale.

    Returns the array and the true (width, height) to crop back to after decoding.  The size
    is checked against ``max_pixels`` before anything is converted or allocated.
    """
    if isinstance(image, np.ndarray):
        if image.ndim != 3 or image.shape[2] != 3 or image.dtype != np.uint8:
            raise SdcInputError("an array image must be (H, W, 3) uint8")
        check_pixel_limit(image.shape[1], image.shape[0], max_pixels)
        pixels = image
    elif isinstance(image, Image.Image):
        check_pixel_limit(image.width, image.height, max_pixels)
        pixels = np.asarray(image.convert("RGB"))
    else:
        raise SdcInputError(f"expected a PIL image or an (H, W, 3) uint8 array, not {type(image).__name__}")
    height, width = pixels.shape[:2]
    if width < 1 or height < 1:
        raise SdcInputError("the image is empty")
    padded = np.pad(pixels, ((0, -height % downscale), (0, -width % downscale), (0, 0)), mode="edge")
    return np.ascontiguousarray(padded), (width, height)


def to_graph_input(pixels: np.ndarray, value_range: tuple[float, float]) -> np.ndarray:
    """(h, w, 3) uint8 -> (1, 3, h, w) float32 in a graph's value range."""
    lo, hi = value_range
    array = pixels.astype(np.float32) / np.float32(255) * np.float32(hi - lo) + np.float32(lo)
    return np.ascontiguousarray(array.transpose(2, 0, 1)[None])


def graph_output_to_levels(array: np.ndarray, value_range: tuple[float, float]) -> np.ndarray:
    """(1, 3, h, w) graph output -> (h, w, 3) float32 on the 0..255 scale, not yet clipped."""
    lo, hi = value_range
    return (array[0].transpose(1, 2, 0) - np.float32(lo)) * np.float32(255 / (hi - lo))


def to_uint8(levels: np.ndarray) -> np.ndarray:
    return np.rint(np.clip(levels, 0.0, 255.0)).astype(np.uint8)


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
