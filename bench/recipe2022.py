"""The original 2022 recipe (libimagequant, 256 colours, dithering, zlib 9) on an 8-bit latent:
the rate-distortion benchmark's reference for the latent coding."""
from __future__ import annotations

import zlib

import numpy as np


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
