"""The peers of the rate-distortion benchmark: classical codecs at matched bytes, and the
original 2022 recipe (libimagequant, 256 colours, dithering, zlib 9) on the same 8-bit latent."""
from __future__ import annotations

import io
import zlib

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


def original_recipe(levels: np.ndarray, colors: int = 256) -> tuple[int, np.ndarray]:
    """2022 recipe on a (C, H, W) uint8 latent: each group of 4 channels as an RGBA image,
    libimagequant to ``colors`` colours with Floyd-Steinberg dithering, palettes + indices
    through zlib level 9.  Returns (payload bytes, reconstructed levels)."""
    import imagequant

    channels = levels.shape[0]
    padded = np.concatenate([levels, np.zeros((-channels % 4,) + levels.shape[1:], np.uint8)])
    parts, recon = [], np.empty_like(padded)
    for start in range(0, padded.shape[0], 4):
        rgba = np.ascontiguousarray(padded[start:start + 4].transpose(1, 2, 0))
        index_bytes, flat_palette = imagequant.quantize_raw_rgba_bytes(
            rgba.tobytes(), rgba.shape[1], rgba.shape[0], dithering_level=1.0, max_colors=colors)
        indices = np.frombuffer(index_bytes, np.uint8).reshape(rgba.shape[:2])
        palette = np.array(flat_palette, np.uint8).reshape(-1, 4)[: int(indices.max()) + 1]
        parts += [palette.tobytes(), indices.tobytes()]
        recon[start:start + 4] = palette[indices].transpose(2, 0, 1)
    return len(zlib.compress(b"".join(parts), 9)), recon[:channels]
