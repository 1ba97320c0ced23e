"""Classical codecs at matched bytes: each encoder at the largest output not over a budget."""
from __future__ import annotations

import io

import numpy as np
from PIL import Image


def _pillow(fmt: str, **options):
    def encode(pixels: np.ndarray, quality: int) -> bytes:
        buffer = io.BytesIO()
        Image.fromarray(pixels).save(buffer, format=fmt, quality=quality, **options)
        return buffer.getvalue()
    return encode


def _pillow_decode(data: bytes) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(data)).convert("RGB"))


def _avif_encode(pixels: np.ndarray, quality: int) -> bytes:
    import imagecodecs
    return imagecodecs.avif_encode(pixels, level=quality, speed=6)


def _jxl_encode(pixels: np.ndarray, quality: int) -> bytes:
    import imagecodecs
    return imagecodecs.jpegxl_encode(pixels, level=quality, effort=7)


def _imagecodecs_decode(name: str):
    def decode(data: bytes) -> np.ndarray:
        import imagecodecs
        return np.asarray(getattr(imagecodecs, f"{name}_decode")(data))[..., :3]
    return decode


# name -> (encode(pixels, quality), decode(bytes), lowest quality, highest quality)
CLASSICAL = {
    # libjpeg-turbo through Pillow with optimized Huffman tables and progressive scans, 4:2:0
    # (mozjpeg itself is not in this environment's imagecodecs build).
    "JPEG": (_pillow("JPEG", optimize=True, progressive=True, subsampling=2), _pillow_decode, 1, 95),
    "WebP": (_pillow("WEBP", method=6), _pillow_decode, 0, 100),
    "AVIF": (_avif_encode, _imagecodecs_decode("avif"), 0, 100),
    "JPEG XL": (_jxl_encode, _imagecodecs_decode("jpegxl"), 1, 100),
}


def matched(name: str, pixels: np.ndarray, budget: int) -> tuple[int, np.ndarray] | None:
    """The largest output of codec ``name`` not exceeding ``budget`` bytes (bisection over its
    quality setting), decoded; None if even its lowest quality is larger."""
    encode, decode, lo, hi = CLASSICAL[name]
    best = None
    while lo <= hi:
        quality = (lo + hi) // 2
        data = encode(pixels, quality)
        if len(data) <= budget:
            best = data
            lo = quality + 1
        else:
            hi = quality - 1
    return None if best is None else (len(best), decode(best))
