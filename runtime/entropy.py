"""Entropy coding behind an integer-only interface.

A section is a sequence of non-negative integers below an alphabet size.  ``encode``
returns (coder id, bytes); ``decode`` needs the coder id, the symbol count and the alphabet
size, all known from the container header, and never produces more than that count.
"""
from __future__ import annotations

import zlib

import numpy as np

from .errors import SdcFormatError

CODER_DEFLATE = 1  # raw DEFLATE (RFC 1951), level 9: the container already carries a CRC32
CODER_NAMES = {CODER_DEFLATE: "deflate"}


def symbol_dtype(alphabet_size: int) -> np.dtype:
    """Symbols travel as one byte (alphabet <= 256) or two little-endian bytes."""
    if not 1 <= alphabet_size <= 65536:
        raise ValueError(f"alphabet size {alphabet_size} is outside 1..65536")
    return np.dtype(np.uint8) if alphabet_size <= 256 else np.dtype("<u2")


def raw_length(count: int, alphabet_size: int) -> int:
    return count * symbol_dtype(alphabet_size).itemsize


def encode(symbols: np.ndarray, *, alphabet_size: int) -> tuple[int, bytes]:
    flat = np.asarray(symbols).ravel()
    if flat.size and (flat.min() < 0 or flat.max() >= alphabet_size):
        raise ValueError("symbol outside the alphabet")
    raw = flat.astype(symbol_dtype(alphabet_size)).tobytes()
    compressor = zlib.compressobj(9, zlib.DEFLATED, -15, 9)
    return CODER_DEFLATE, compressor.compress(raw) + compressor.flush()


def decode(data: bytes, *, coder: int, count: int, alphabet_size: int) -> np.ndarray:
    if coder != CODER_DEFLATE:
        raise SdcFormatError(f"unknown entropy coder {coder}")
    expected = raw_length(count, alphabet_size)
    inflater = zlib.decompressobj(-15)
    try:
        # max_length bounds the output: a hostile stream cannot make us allocate more.
        raw = inflater.decompress(data, expected)
        if not inflater.eof:  # output full: the end-of-stream marker may still be unread
            raw += inflater.decompress(inflater.unconsumed_tail, 1)
    except zlib.error as exc:
        raise SdcFormatError(f"corrupt DEFLATE stream: {exc}") from None
    if len(raw) != expected or not inflater.eof or inflater.unconsumed_tail or inflater.unused_data:
        raise SdcFormatError("DEFLATE stream does not hold exactly the section's declared length")
    symbols = np.frombuffer(raw, dtype=symbol_dtype(alphabet_size))
    if symbols.size and int(symbols.max()) >= alphabet_size:
        raise SdcFormatError(f"symbol {int(symbols.max())} is outside the alphabet of {alphabet_size}")
    return symbols
