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
        raise SdcInputError(f"image of {width}x{height} is over the pixel limit of {max_pixels}")


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


def to_array(image, downscale: int, value_range: tuple[float, float], *,
             max_pixels: int | None = None) -> tuple[np.ndarray, tuple[int, int]]:
    """RGB image -> (1, 3, H', W') float32 padded by edge replication to multiples of downscale.

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
    lo, hi = value_range
    array = padded.astype(np.float32) / np.float32(255) * np.float32(hi - lo) + np.float32(lo)
    return np.ascontiguousarray(array.transpose(2, 0, 1)[None]), (width, height)


def from_array(array: np.ndarray, value_range: tuple[float, float], size: tuple[int, int]) -> Image.Image:
    """(1, 3, H', W') decoder output -> RGB PIL image cropped to size = (width, height)."""
    lo, hi = value_range
    width, height = size
    unit = (array[0, :, :height, :width].transpose(1, 2, 0) - np.float32(lo)) / np.float32(hi - lo)
    return Image.fromarray(np.rint(np.clip(unit, 0.0, 1.0) * 255).astype(np.uint8), "RGB")


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
