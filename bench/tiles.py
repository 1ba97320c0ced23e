"""sdc-bench tiles: seams of the tiled neural stages, measured on images that also fit untiled.

Kodak images are put side by side in 2x2 mosaics (1536x1024); each is encoded and decoded
untiled and in tiles of --tile-size pixels.  Reported per mosaic: PSNR of both against the
original, PSNR between them, and the mean gradient across tile borders against the
interior's, for both decodes.  A crop across a tile corner (untiled | tiled | difference x8)
is written as a picture.
"""
from __future__ import annotations

import glob
import os

import numpy as np

from .figures import image_row
from .metrics import psnr
from .timing import add_run_options, machine, save_summary


def _mosaics(folder: str, count: int):
    from PIL import Image

    paths = sorted(glob.glob(os.path.join(folder, "*.png")))
    images = []
    for path in paths:
        image = Image.open(path).convert("RGB")
        images.append(np.asarray(image if image.width > image.height else image.rotate(90, expand=True)))
    for i in range(min(count, len(images) // 4)):
        a, b, c, d = images[4 * i: 4 * i + 4]
        yield f"mosaic {4 * i + 1}-{4 * i + 4}", np.concatenate([np.concatenate([a, b], 1), np.concatenate([c, d], 1)], 0)


def border_lines(length: int, tile: int, downscale: int) -> list[int]:
    """Pixel positions of every tile edge of the decoder along one axis."""
    from sdc_runtime.neural import MAX_OVERLAP_PIXELS
    from sdc_runtime.tiles import spans

    edges = {e * downscale for span in spans(length // downscale, tile // downscale,
                                              max_overlap=MAX_OVERLAP_PIXELS // downscale) for e in span}
    return sorted(edges - {0, length})


def gradient_ratio(image: np.ndarray, tile: int, downscale: int) -> float:
    """Mean |difference| across tile-border lines over that across all other lines (both axes)."""
    ratios = []
    for axis in (0, 1):
        steps = np.abs(np.diff(image.astype(np.float64), axis=axis)).mean(axis=(1 - axis, 2))
        borders = [e - 1 for e in border_lines(image.shape[axis], tile, downscale)]
        interior = np.delete(steps, borders)
        ratios.append(steps[borders].mean() / interior.mean())
    return float(np.mean(ratios))


def run(args) -> dict:
    from tqdm import tqdm

    from sdc_runtime import SdcCodec

    whole = SdcCodec(args.models, tile_size=0, threads=args.threads)
    tiled = SdcCodec(args.models, tile_size=args.tile_size, threads=args.threads)
    f = whole.manifest.downscale
    rows, crop = [], None
    for name, original in tqdm(list(_mosaics(args.images, args.limit)), desc="mosaics", unit="mosaic"):
        # Effort 0 for both: seams are the tiled neural stages' matter, and the closed loop's
        # descent runs on untiled images only (its gradient graph has no tiled form).
        a = np.asarray(whole.decode(whole.encode(original, mode=args.mode, effort=0)))
        b = np.asarray(tiled.decode(tiled.encode(original, mode=args.mode, effort=0)))
        rows.append({"image": name, "psnr_untiled": psnr(original, a), "psnr_tiled": psnr(original, b),
                     "psnr_between": psnr(a, b), "border_gradient_ratio_tiled": gradient_ratio(b, args.tile_size, f),
                     "border_gradient_ratio_untiled": gradient_ratio(a, args.tile_size, f)})
        if crop is None:
            y = border_lines(original.shape[0], args.tile_size, f)[0]
            x = border_lines(original.shape[1], args.tile_size, f)[0]
            half = min(96, y, x, original.shape[0] - y, original.shape[1] - x)
            window = (slice(y - half, y + half), slice(x - half, x + half))
            difference = np.clip(np.abs(a[window].astype(int) - b[window].astype(int)) * 8, 0, 255).astype(np.uint8)
            crop = (a[window], b[window], difference, (x, y), half)
    return {"machine": machine(), "models": os.path.abspath(args.models), "tile_size": args.tile_size,
            "mode": args.mode, "rows": rows, "crop": crop}


def markdown(result: dict) -> str:
    lines = [f"Tile size {result['tile_size']} px, mode {result['mode']}; machine: {result['machine']}.", "",
             "| image | PSNR untiled | PSNR tiled | Δ dB | PSNR between | border/interior gradient, tiled |"
             " same, untiled |", "| --- | --- | --- | --- | --- | --- | --- |"]
    for r in result["rows"]:
        lines.append(f"| {r['image']} | {r['psnr_untiled']:.3f} | {r['psnr_tiled']:.3f} |"
                     f" {r['psnr_tiled'] - r['psnr_untiled']:+.3f} | {r['psnr_between']:.2f} |"
                     f" {r['border_gradient_ratio_tiled']:.3f} | {r['border_gradient_ratio_untiled']:.3f} |")
    return "\n".join(lines)


def picture(crop, path: str) -> None:
    """The untiled and tiled decodes around a tile corner, and their difference."""
    untiled, tiled, difference, (x, y), half = crop
    image_row([(f"untiled (corner at x={x}, y={y} at centre)", untiled), ("tiled", tiled),
               ("|difference| x 8", difference)], path, cross=half)


def add_parser(sub):
    p = sub.add_parser("tiles", help="seams of tiled decoding against untiled, on Kodak mosaics")
    p.add_argument("--models", required=True, help="model set")
    p.add_argument("--images", required=True, help="folder of PNG images (e.g. Kodak); four per mosaic")
    p.add_argument("--tile-size", type=int, default=512)
    p.add_argument("--mode", default="u8", choices=["u8", "palette"])
    p.add_argument("--limit", type=int, default=6, help="at most this many mosaics")
    add_run_options(p, "bench-out/tiles", _main)


def _main(args) -> int:
    result = run(args)
    crop = result.pop("crop")
    status = save_summary(result, markdown(result), args.out, "tiles.json")  # makes the folder too
    if crop is not None:
        picture(crop, os.path.join(args.out, "corner.png"))
    return status
