"""sdc-bench metrics-check: our SSIMULACRA 2 against scores of the C++ tool.

Two kinds of reference, both published with the Rust port (imazen/ssimulacra2), whose author
ran the C++ binary on them (captured 2026-01-04):
- synthetic pairs, rebuilt here from the port's recipe (examples/capture_cpp_reference.rs)
  and checked against the SHA-256 it publishes for their pixels (src/reference_data.rs), so
  they need no files;
- image files: the tank pair and a 256x256 crop at four JPEG qualities (test_data/), read
  from a checkout of that repository with ``--test-data``.  The JPEG scores also depend on the
  JPEG decoder, which is not the metric's: we decode with libjpeg-turbo (Pillow).
"""
from __future__ import annotations

import hashlib
import os

import numpy as np

from .ssimulacra2 import ssimulacra2
from .timing import add_run_options, machine, save_summary


def _gray(values: np.ndarray) -> np.ndarray:
    return np.repeat(np.asarray(values).astype(np.uint8)[..., None], 3, axis=2)


def uniform(size: int, value: int) -> np.ndarray:
    return np.full((size, size, 3), value, np.uint8)


def gradient(size: int) -> np.ndarray:
    return _gray(np.broadcast_to(np.arange(size) * 255 // (size - 1), (size, size)))


def diagonal(size: int) -> np.ndarray:
    y, x = np.mgrid[:size, :size]
    return _gray((x + y) * 255 // (2 * size - 2))


def noise(size: int, seed: int) -> np.ndarray:
    """The recipe's 64-bit LCG: bits 33..40 of each state, R, G, B per pixel."""
    state, values = seed, []
    for _ in range(size * size * 3):
        state = (state * 6364136223846793005 + 1442695040888963407) % 2 ** 64
        values.append((state >> 33) & 0xFF)
    return np.array(values, np.uint8).reshape(size, size, 3)


def edge(size: int) -> np.ndarray:
    return _gray(np.where(np.arange(size) < size // 2, 0, 255)[None, :].repeat(size, 0))


def box_blur(pixels: np.ndarray) -> np.ndarray:
    """8x8 mean over offsets -4..3, edges repeated, truncating division."""
    h, w = pixels.shape[:2]
    padded = np.pad(pixels.astype(np.uint32), ((4, 3), (4, 3), (0, 0)), mode="edge")
    return (sum(padded[dy:dy + h, dx:dx + w] for dy in range(8) for dx in range(8)) // 64).astype(np.uint8)


def sharpen(pixels: np.ndarray) -> np.ndarray:
    p = np.pad(pixels.astype(np.int32), ((1, 1), (1, 1), (0, 0)), mode="edge")
    return np.clip(5 * p[1:-1, 1:-1] - p[:-2, 1:-1] - p[2:, 1:-1] - p[1:-1, :-2] - p[1:-1, 2:], 0, 255).astype(np.uint8)


def yuv_round_trip(pixels: np.ndarray) -> np.ndarray:
    """BT.601 RGB -> YUV -> RGB in float32, truncated to 8 bits."""
    r, g, b = (pixels[..., c].astype(np.float32) for c in range(3))
    f = np.float32
    y = f(0.299) * r + f(0.587) * g + f(0.114) * b
    u = f(-0.14713) * r - f(0.28886) * g + f(0.436) * b + f(128)
    v = f(0.615) * r - f(0.51499) * g - f(0.10001) * b + f(128)
    out = (y + f(1.13983) * (v - 128), y - f(0.39465) * (u - 128) - f(0.58060) * (v - 128), y + f(2.03211) * (u - 128))
    return np.stack([np.clip(c, 0, 255).astype(np.uint8) for c in out], axis=-1)


# name -> (source, distorted, SHA-256 prefixes of their pixels, the C++ tool's score).
# The pairs of identical images (all scored 100) are left out: any port gets those.
# Flat grey 128 against 128 + shift, per image size: (size, shift, SHA-256 prefixes, C++ score).
_SHIFTS = (
    (32, 1, "753412db29fc", "9bfd6cf255ab", 97.74921430), (32, 5, "753412db29fc", "51b9f0ae4323", 98.80827382),
    (32, 10, "753412db29fc", "264e5cfb60a6", 96.53114090), (32, 20, "753412db29fc", "2fcac1467f36", 93.79823220),
    (32, 50, "753412db29fc", "1cfe56369e04", 85.01409588), (64, 1, "2203a98fd84a", "ba72ca16b1a2", 97.98672126),
    (64, 5, "2203a98fd84a", "5b0e43ac49bd", 91.52357693), (64, 10, "2203a98fd84a", "e802fe3a49ac", 80.24289393),
    (64, 20, "2203a98fd84a", "fe8a663ebc8c", 56.05855584), (64, 50, "2203a98fd84a", "e67286008fa1", -8.75942256),
    (128, 1, "2af5ead05032", "43ebfa035c41", 96.78920738), (128, 5, "2af5ead05032", "bc6f35e8fbe5", 88.54070876),
    (128, 10, "2af5ead05032", "8a688a547f7b", 77.84296299), (128, 20, "2af5ead05032", "22a45cbe1683", 54.27883917),
    (128, 50, "2af5ead05032", "768e019eb1e7", -9.82383315), (256, 1, "83ab53863cf7", "1c0cfab02575", 96.15027098),
    (256, 5, "83ab53863cf7", "90526676d384", 89.73209436), (256, 10, "83ab53863cf7", "2019b05026c8", 80.29149136),
    (256, 20, "83ab53863cf7", "2aebb5647caa", 59.77892918), (256, 50, "83ab53863cf7", "ebf9afb21c24", -0.39085784),
)
# name -> (source, distorted, SHA-256 prefixes of their pixels, the C++ tool's score).
# The pairs of identical images (all scored 100) are left out: any port gets those.
SYNTHETIC = {
    **{f"uniform_shift_{shift}_{size}": (lambda size=size: uniform(size, 128),
                                         lambda size=size, shift=shift: uniform(size, 128 + shift),
                                         source, distorted, score)
       for size, shift, source, distorted, score in _SHIFTS},
    "gradient_vs_uniform_64": (lambda: gradient(64), lambda: uniform(64, 128), "bfcfaa0618d2", "2203a98fd84a",
                               -64.56872148),
    "noise_vs_uniform_64": (lambda: noise(64, 42), lambda: uniform(64, 128), "7f6be7f433cc", "2203a98fd84a",
                            -47.33572558),
    "gradient_vs_boxblur8x8_64": (lambda: gradient(64), lambda: box_blur(gradient(64)), "bfcfaa0618d2",
                                  "cceefcd9fb78", 94.34090315),
    "noise_vs_sharpen_64": (lambda: noise(64, 999), lambda: sharpen(noise(64, 999)), "53f592ab5678", "4ad3cfe3e5b8",
                            -5.81017556),
    "gradient_vs_yuv_roundtrip_64": (lambda: diagonal(64), lambda: yuv_round_trip(diagonal(64)), "e7644fe3f111",
                                     "08f6523635ec", 97.26010964),
    "edge_vs_boxblur8x8_64": (lambda: edge(64), lambda: box_blur(edge(64)), "f0d003b6007c", "cbe40f4a1c43",
                              24.27333552),
}
# (source, distorted) under the port's test_data/, and the C++ tool's score.
FILES = {
    "tank (JPEG XL pair)": ("tank_source.jxl", "tank_distorted.jxl", 17.398505),
    **{f"256x256 crop, JPEG q{q}": ("jpeg_quality/source.png", f"jpeg_quality/q{q}.jpg", score)
       for q, score in ((20, 57.14559032), (45, 68.62747595), (70, 79.38805044), (90, 90.85152474))},
}


def same_pixels(pixels: np.ndarray, prefix: str) -> bool:
    return hashlib.sha256(np.ascontiguousarray(pixels).tobytes()).hexdigest().startswith(prefix)


def _read(path: str) -> np.ndarray:
    if path.endswith(".jxl"):
        import imagecodecs

        with open(path, "rb") as fh:
            return np.asarray(imagecodecs.jpegxl_decode(fh.read()))[..., :3]
    from PIL import Image

    return np.asarray(Image.open(path).convert("RGB"))


def run(args) -> dict:
    rows = []
    for name, (make_source, make_distorted, source_hash, distorted_hash, expected) in SYNTHETIC.items():
        source, distorted = make_source(), make_distorted()
        if not (same_pixels(source, source_hash) and same_pixels(distorted, distorted_hash)):
            raise RuntimeError(f"{name}: the rebuilt pair's pixels differ from the published ones")
        rows.append({"pair": name, "kind": "synthetic", "cpp": expected, "ours": ssimulacra2(source, distorted)})
    if args.test_data:
        for name, (source, distorted, expected) in FILES.items():
            a, b = (_read(os.path.join(args.test_data, path)) for path in (source, distorted))
            rows.append({"pair": name, "kind": "file", "cpp": expected, "ours": ssimulacra2(a, b)})
    for row in rows:
        row["difference"] = row["ours"] - row["cpp"]
    return {"machine": machine(), "rows": rows}


def markdown(result: dict) -> str:
    lines = ["| pair | C++ tool | ours | difference |", "| --- | --- | --- | --- |"]
    lines += [f"| {r['pair']} | {r['cpp']:.4f} | {r['ours']:.4f} | {r['difference']:+.4f} |" for r in result["rows"]]
    for label, chosen in (("below 90", [r for r in result["rows"] if r["kind"] == "synthetic" and r["cpp"] < 90]),
                          ("90 and above", [r for r in result["rows"] if r["kind"] == "synthetic" and r["cpp"] >= 90])):
        gaps = [abs(r["difference"]) for r in chosen]
        if gaps:
            lines.append(f"\nSynthetic pairs scored {label} by the C++ tool ({len(gaps)}): median |difference|"
                         f" {np.median(gaps):.4f}, max {max(gaps):.4f}.")
    return "\n".join(lines)


def add_parser(sub):
    p = sub.add_parser("metrics-check", help="our SSIMULACRA 2 against the C++ tool's published scores")
    p.add_argument("--test-data", default=None, metavar="DIR",
                   help="the test_data folder of a checkout of imazen/ssimulacra2 (the image-file pairs)")
    add_run_options(p, "bench-out/metrics-check", _main)


def _main(args) -> int:
    result = run(args)
    return save_summary(result, markdown(result), args.out, "metrics-check.json")
