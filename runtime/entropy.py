"""Entropy coding behind an integer-only interface.

A section is a sequence of non-negative integers below an alphabet size.  ``encode``
returns (coder id, bytes); ``decode`` needs the coder id, the symbol count and the alphabet
size, all known from the container header, and never produces more than that count.  Sections
of planes of symbols below 256 (the latent levels, the alpha, palette indices) also give their
``planes`` shape (C, h, w): for them the context-modelled coder (``context.py``) competes too.
"""
from __future__ import annotations

import lzma
import zlib

import numpy as np

from . import context
from .errors import SdcFormatError, SdcInputError

CODER_DEFLATE = 1  # raw DEFLATE (RFC 1951), level 9: the container already carries a CRC32
CODER_LZMA2 = 2  # raw LZMA2 (no .xz container), dictionary 1 MiB
CODER_CONTEXT = 3  # 8-bit planes: coarse-to-fine prediction, adaptive counts, range coder
CODER_NAMES = {CODER_DEFLATE: "deflate", CODER_LZMA2: "lzma2", CODER_CONTEXT: "context"}
_LZMA2_DICT = 1 << 20


def symbol_dtype(alphabet_size: int) -> np.dtype:
    """Symbols travel as one byte (alphabet <= 256) or two little-endian bytes."""
    if not 1 <= alphabet_size <= 65536:
        raise SdcInputError(f"alphabet size {alphabet_size} is outside 1..65536")
    return np.dtype(np.uint8) if alphabet_size <= 256 else np.dtype("<u2")


def raw_length(count: int, alphabet_size: int) -> int:
    return count * symbol_dtype(alphabet_size).itemsize


def _lzma2_filters(preset: int | None = None) -> list[dict]:
    spec = {"id": lzma.FILTER_LZMA2, "dict_size": _LZMA2_DICT}
    if preset is not None:
        spec["preset"] = preset
    return [spec]


def encode(symbols: np.ndarray, *, alphabet_size: int,
           planes: tuple[int, int, int] | None = None) -> tuple[int, bytes]:
    """Symbols -> (coder, bytes) with whichever coder gives the smaller stream (the context
    coder too where ``planes`` gives the (C, h, w) shape of symbols below 256)."""
    flat = np.asarray(symbols).ravel()
    if flat.size and (flat.min() < 0 or flat.max() >= alphabet_size):
        raise SdcInputError("symbol outside the alphabet")
    raw = flat.astype(symbol_dtype(alphabet_size)).tobytes()
    deflater = zlib.compressobj(9, zlib.DEFLATED, -15, 9)
    candidates = [(CODER_DEFLATE, deflater.compress(raw) + deflater.flush()),
                  (CODER_LZMA2, lzma.compress(raw, format=lzma.FORMAT_RAW,
                                              filters=_lzma2_filters(9 | lzma.PRESET_EXTREME)))]
    if planes is not None and alphabet_size <= 256 and flat.size:
        candidates.append((CODER_CONTEXT, context.encode(flat.reshape(planes))))
    return min(candidates, key=lambda c: (len(c[1]), c[0]))


def decode(data: bytes, *, coder: int, count: int, alphabet_size: int,
           planes: tuple[int, int, int] | None = None) -> np.ndarray:
    expected = raw_length(count, alphabet_size)
    if coder == CODER_CONTEXT:
        # Only sections of planes may use it: the shape their header gives bounds the output.
        if planes is None or alphabet_size > 256 or int(np.prod(planes)) != count:
            raise SdcFormatError("the context coder codes the latent, alpha and palette index sections only")
        symbols = context.decode(data, planes).ravel()
        if int(symbols.max()) >= alphabet_size:  # coder 3 spans 0..255, a palette fewer
            raise SdcFormatError(f"symbol {int(symbols.max())} is outside the alphabet of {alphabet_size}")
        return symbols
    # max_length bounds every output: a hostile stream cannot make us allocate more.
    if coder == CODER_DEFLATE:
        inflater = zlib.decompressobj(-15)
        try:
            raw = inflater.decompress(data, expected)
            if not inflater.eof:  # output full: the end-of-stream marker may still be unread
                raw += inflater.decompress(inflater.unconsumed_tail, 1)
        except zlib.error as exc:
            raise SdcFormatError(f"corrupt DEFLATE stream: {exc}") from None
        exact = inflater.eof and not inflater.unconsumed_tail and not inflater.unused_data
    elif coder == CODER_LZMA2:
        decompressor = lzma.LZMADecompressor(format=lzma.FORMAT_RAW, filters=_lzma2_filters())
        try:
            raw = decompressor.decompress(data, expected)
            if not decompressor.eof:
                raw += decompressor.decompress(b"", 1)
        except lzma.LZMAError as exc:
            raise SdcFormatError(f"corrupt LZMA2 stream: {exc}") from None
        exact = decompressor.eof and not decompressor.unused_data
    else:
        raise SdcFormatError(f"unknown entropy coder {coder}")
    if len(raw) != expected or not exact:
        raise SdcFormatError(f"{CODER_NAMES[coder]} stream does not hold exactly the section's declared length")
    symbols = np.frombuffer(raw, dtype=symbol_dtype(alphabet_size))
    if symbols.size and int(symbols.max()) >= alphabet_size:
        raise SdcFormatError(f"symbol {int(symbols.max())} is outside the alphabet of {alphabet_size}")
    return symbols
