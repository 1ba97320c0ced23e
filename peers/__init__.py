"""Classical codecs at matched bytes (JPEG, WebP, AVIF, JPEG XL through Pillow and imagecodecs):
the peers that the comparison page and the benchmarks both put beside sdcodec."""
from .classical import CLASSICAL, matched

__all__ = ["CLASSICAL", "matched"]
