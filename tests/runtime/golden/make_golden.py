"""Writes the golden .sdc files of this folder.  Run once per format version; never rerun to
"fix" a failing golden test: a failure means the decoder changed what old files mean.

    python tests/runtime/golden/make_golden.py
"""
import os

import numpy as np

from sdc_runtime import bitstream, container, context, entropy
from sdc_runtime.container import Header

HERE = os.path.dirname(os.path.abspath(__file__))
FINGERPRINT = bytes(range(16))


def header(mode, colors, width, height, channels, group_channels=0):
    return Header(width=width, height=height, latent_channels=channels, latent_height=-(-height // 8),
                  latent_width=-(-width // 8), downscale=8, mode=mode, colors=colors,
                  group_channels=group_channels,
                  denoise_steps=3, denoise_stride=15, eta=0.5, seed=1234, fingerprint=FINGERPRINT,
                  quant_scale=(0.18215,) * channels, quant_zero=(127.5,) * channels)


def main():
    rng = np.random.default_rng(20261122)
    # u8 mode, 4 channels, 61x37 image -> 8x5 latent.
    levels = rng.integers(0, 256, (4, 5, 8), dtype=np.uint8)
    h = header(container.MODE_U8, 0, 61, 37, 4)
    write("u8_61x37.sdc", container.pack(h, [bitstream.encode_section(container.SECTION_LATENT, levels, 256)]), levels)
    # palette mode, 4 channels, 200 colours (1-byte indices), 64x40 image -> 8x5 latent.
    palette = rng.integers(0, 256, (200, 4), dtype=np.uint8)
    indices = rng.integers(0, 200, (5, 8)).astype(np.uint16)
    h = header(container.MODE_PALETTE, 200, 64, 40, 4, group_channels=4)
    write("palette200_64x40.sdc", container.pack(h, [bitstream.encode_section(container.SECTION_PALETTE, palette, 256),
                                                    bitstream.encode_section(container.SECTION_INDICES, indices, 200)]),
          palette[indices].transpose(2, 0, 1))
    # palette mode, 8 channels in 2 groups of 4, 300 colours (2-byte indices), 24x16 -> 3x2 latent.
    palettes = rng.integers(0, 256, (2, 300, 4), dtype=np.uint8)
    indices = rng.integers(0, 300, (2, 2, 3)).astype(np.uint16)
    h = header(container.MODE_PALETTE, 300, 24, 16, 8, group_channels=4)
    expected = np.concatenate([palettes[g][indices[g]].transpose(2, 0, 1) for g in range(2)])
    write("palette300_g4x2_24x16.sdc", container.pack(h, [bitstream.encode_section(container.SECTION_PALETTE, palettes, 256),
                                                         bitstream.encode_section(container.SECTION_INDICES, indices, 300)]),
          expected)
    # u8 mode with the optional sections: alpha (13x9, lossless) and metadata (ICC, EXIF, XMP).
    levels = rng.integers(0, 256, (4, 2, 2), dtype=np.uint8)
    alpha = rng.integers(0, 256, (9, 13), dtype=np.uint8)
    h = header(container.MODE_U8, 0, 13, 9, 4)
    write("u8_alpha_metadata_13x9.sdc", bitstream.sdc_encode(levels, h, alpha=alpha, metadata=METADATA), levels)
    np.save(os.path.join(HERE, "u8_alpha_metadata_13x9.alpha.npy"), alpha)
    # u8 mode through the context coder (coder 3): smooth planes, 6 channels, 150x90 -> 19x12
    # latent, so the coarse-to-fine steps meet the planes' edges at every spacing.
    y, x = np.mgrid[0:12, 0:19]
    levels = np.stack([np.clip(128 + 40 * np.sin(x / (3 + c)) + 30 * np.cos(y / (2 + c)) + rng.integers(-3, 4, x.shape),
                               0, 255) for c in range(6)]).astype(np.uint8)
    h = header(container.MODE_U8, 0, 150, 90, 6)
    section = container.Section(container.SECTION_LATENT, entropy.CODER_CONTEXT, levels.size, context.encode(levels))
    write("u8_context_150x90.sdc", container.pack(h, [section]), levels)


# The metadata of the golden file with optional sections (tests/runtime/test_bitstream.py states it too).
METADATA = {"icc_profile": b"golden icc", "exif": b"Exif\0\0golden", "xmp": b"<x:xmpmeta>golden</x:xmpmeta>"}


def write(name, data, expected_levels):
    if os.path.exists(os.path.join(HERE, name)):  # written once per format version: never rewritten
        assert open(os.path.join(HERE, name), "rb").read() == data, f"{name} would change"
        return
    with open(os.path.join(HERE, name), "wb") as fh:
        fh.write(data)
    np.save(os.path.join(HERE, name.replace(".sdc", ".levels.npy")), np.ascontiguousarray(expected_levels))


if __name__ == "__main__":
    main()
