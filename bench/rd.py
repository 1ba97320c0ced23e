"""sdc-bench rd: rate-distortion sweep of the codec against classical codecs and the original
2022 recipe, over an image folder.  Writes per-image CSV/JSON, a markdown summary, an RD plot
and a side-by-side crop grid into --out.
"""
from __future__ import annotations

import argparse
import csv
import glob
import os

import numpy as np

from sdc_peers import CLASSICAL, matched
from sdc_runtime.errors import SdcUsageError

from . import sweep
from .figures import image_row
from .metrics import QUALITY_METRICS, scores
from .recipe2022 import original_recipe
from .timing import add_run_options, machine, save_json

METRICS = ("bytes", "bpp", *QUALITY_METRICS)
DEFAULT_POINTS = ("u8,u8:0.2,u8:0.3,u8:0.45,u8:0.6,palette:16:4,palette:64:4,palette:128:4,palette:256:4,"
                  "palette:16:2,palette:64:2,palette:256:8")


def parse_points(text: str) -> list[dict]:
    """'u8,u8:0.3,palette:16:4' -> operating points: u8 mode (optionally with a coarser weighted
    quantization step) and palette mode (K colours per group of G channels).  A bad item is an
    argparse.ArgumentTypeError, so the command line reports it in one line."""
    points = []
    for item in text.split(","):
        fields = item.strip().split(":")
        try:
            if fields[0] == "u8" and len(fields) == 1:
                points.append({"name": "u8", "mode": "u8"})
            elif fields[0] == "u8" and len(fields) == 2:
                step = float(fields[1])
                points.append({"name": f"u8 step={step:g}", "mode": "u8", "quant_step": step})
            elif fields[0] == "palette" and len(fields) == 3:
                k, g = int(fields[1]), int(fields[2])
                points.append({"name": f"palette K={k} G={g}", "mode": "palette", "colors": k, "group_channels": g})
            else:
                raise ValueError
        except ValueError:
            raise argparse.ArgumentTypeError(
                f"bad operating point {item.strip()!r}: use u8, u8:STEP or palette:K:G") from None
    return points


def pareto(points: list[tuple[float, float]]) -> list[tuple[float, float]]:
    """(bytes, quality) points a user would pick: each better than every smaller one."""
    frontier = []
    for size, quality in sorted(points):
        if not frontier or quality > frontier[-1][1]:
            frontier.append((size, quality))
    return frontier


def _interpolate(x, xs, ys):
    """Linear interpolation of y at x over points sorted by xs (log-bytes axis); None outside."""
    order = np.argsort(xs)
    xs, ys = np.asarray(xs)[order], np.asarray(ys)[order]
    if x < xs[0] or x > xs[-1]:
        return None
    return float(np.interp(x, xs, ys))


def run(args) -> dict:
    from PIL import Image
    from tqdm import tqdm

    from sdc_runtime import SdcCodec
    from sdc_runtime.latent import dequantize_u8, quantize_u8

    codec = SdcCodec(args.models, threads=args.threads)
    paths = sorted(glob.glob(os.path.join(args.images, "*.png")))[: args.limit or None]
    if not paths:
        raise SdcUsageError(f"no PNG images in {args.images}")
    points = [] if args.qualities and args.points is None else (args.points or parse_points(DEFAULT_POINTS))
    peers = [p for p in args.peers.split(",") if p] if args.peers else []
    for peer in peers:
        if peer not in CLASSICAL:
            raise SdcUsageError(f"unknown peer {peer!r}; choose from {', '.join(CLASSICAL)}")
    rows = []
    swept = []
    crops = {}
    for path in tqdm(paths, desc="images", unit="image"):
        name = os.path.splitext(os.path.basename(path))[0]
        original = np.asarray(Image.open(path).convert("RGB"))
        if args.qualities:
            swept += sweep.sweep_image(codec, name, original, args.qualities, args.efforts, peers,
                                       crops if name == args.crop_image else None)
        if not points:
            continue
        raw, size = codec.image_to_latent(original)

        def decode_latent(latent, size=size):  # the decoder alone: no denoising steps
            return np.asarray(codec.latent_to_image(latent, size))

        ceiling = decode_latent(raw)
        rows.append({"image": name, "codec": "autoencoder ceiling (unquantized)", **scores(original, ceiling, 0)})
        scale, zero = codec.quant_mapping(raw)
        header_bytes = 8 * raw.shape[0]  # the recipe needs the same per-channel mapping
        recipe_bytes, recipe_levels = original_recipe(quantize_u8(raw, scale, zero))
        recipe = decode_latent(dequantize_u8(recipe_levels, scale, zero))
        rows.append({"image": name, "codec": "original recipe (libimagequant 256 + zlib)",
                     **scores(original, recipe, recipe_bytes + header_bytes)})
        for point in points:
            options = {k: point[k] for k in ("colors", "group_channels", "quant_step") if k in point}
            data = codec.encode_latent(raw, size, mode=point["mode"], denoise_steps=0, **options)
            ours = decode_latent(codec.decode_latent(data)[1])
            rows.append({"image": name, "codec": f"sdc {point['name']}", **scores(original, ours, len(data))})
            if name == args.crop_image and point["name"] == args.crop_point:
                crops["original"], crops[f"sdc {point['name']} ({len(data)} B)"] = original, ours
            for peer in peers:
                result = matched(peer, original, len(data))
                if result is None:
                    continue
                rows.append({"image": name, "codec": f"{peer} @ {point['name']}", **scores(original, result[1], result[0])})
                if name == args.crop_image and point["name"] == args.crop_point and peer in ("AVIF", "JPEG XL"):
                    crops[f"{peer} ({result[0]} B)"] = result[1]
    result = {"machine": machine(), "models": os.path.abspath(args.models), "images": len(paths),
              "points": points, "peers": peers, "rows": rows, "crops": crops}
    if points:
        result["summary"] = summarize(rows, points, peers)
    if args.qualities:
        result.update(qualities=args.qualities, efforts=args.efforts, sweep_rows=swept,
                      sweep=sweep.summarize(swept, args.efforts, peers))
    return result


def summarize(rows: list[dict], points: list[dict], peers: list[str]) -> dict:
    by_codec: dict[str, list[dict]] = {}
    for row in rows:
        by_codec.setdefault(row["codec"], []).append(row)
    measured = ("bytes", "bpp", *sweep.measured_metrics(rows))
    means = {codec: {"n": len(r), **{k: float(np.mean([x[k] for x in r])) for k in measured}}
             for codec, r in by_codec.items()}
    # Per image: our palette curve interpolated at the recipe's bytes (PSNR), and at its PSNR (bytes).
    images = sorted({r["image"] for r in rows})
    gains, savings = [], []
    for image in images:
        recipe = next(r for r in rows if r["image"] == image and r["codec"].startswith("original recipe"))
        ours = pareto([(r["bytes"], r["psnr"]) for r in rows if r["image"] == image and r["codec"].startswith("sdc palette")])
        if len(ours) < 2:
            continue
        at_bytes = _interpolate(np.log(recipe["bytes"]), [np.log(b) for b, _ in ours], [q for _, q in ours])
        at_psnr = _interpolate(recipe["psnr"], [q for _, q in ours], [np.log(b) for b, _ in ours])
        if at_bytes is not None:
            gains.append(at_bytes - recipe["psnr"])
        if at_psnr is not None:
            savings.append(1 - np.exp(at_psnr) / recipe["bytes"])
    versus = {"psnr_gain_at_recipe_bytes_db": float(np.mean(gains)) if gains else None, "images_psnr": len(gains),
              "byte_saving_at_recipe_psnr": float(np.mean(savings)) if savings else None, "images_bytes": len(savings)}
    u8 = by_codec.get("sdc u8")
    ceiling = by_codec.get("autoencoder ceiling (unquantized)")
    u8_gap = float(np.mean([c["psnr"] - u["psnr"] for c, u in zip(ceiling, u8)])) if u8 and ceiling else None
    return {"means": means, "versus_recipe": versus, "u8_gap_to_ceiling_db": u8_gap}


def markdown(result: dict) -> str:
    lines = [f"{result['images']} images; machine: {result['machine']}."]
    if "summary" in result:
        lines += points_markdown(result["summary"])
    if "sweep" in result:
        lines += sweep.markdown(result["sweep"], result["efforts"])
    return "\n".join(lines)


def points_markdown(s: dict) -> list[str]:
    metrics = [m for m in QUALITY_METRICS if m in next(iter(s["means"].values()))]
    lines = ["", "| codec / operating point | images | bytes | bpp | "
             + " | ".join(QUALITY_METRICS[m].label for m in metrics) + " |", "| --- " * (len(metrics) + 4) + "|"]
    for codec, mean in s["means"].items():
        values = " | ".join(f"{mean[m]:.{QUALITY_METRICS[m].digits}f}" for m in metrics)
        lines.append(f"| {codec} | {mean['n']} | {mean['bytes']:.0f} | {mean['bpp']:.4f} | {values} |")
    v = s["versus_recipe"]
    lines.append("")
    if v["psnr_gain_at_recipe_bytes_db"] is not None:
        lines.append(f"Palette mode vs the original recipe at the recipe's bytes (per image, interpolated on the"
                     f" Pareto frontier of our operating points, {v['images_psnr']} images):"
                     f" {v['psnr_gain_at_recipe_bytes_db']:+.2f} dB PSNR.")
    if v["byte_saving_at_recipe_psnr"] is not None:
        lines.append(f"Bytes our palette mode needs for the recipe's PSNR ({v['images_bytes']} images):"
                     f" {100 * v['byte_saving_at_recipe_psnr']:.1f}% fewer.")
    if s["u8_gap_to_ceiling_db"] is not None:
        lines.append(f"u8 mode vs the unquantized autoencoder round trip: {s['u8_gap_to_ceiling_db']:.3f} dB below.")
    return lines


def plot(result: dict, path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    means = result["summary"]["means"]
    metrics = [m for m in sweep.BD_METRICS if m in next(iter(means.values()))]
    fig, axes = plt.subplots(1, len(metrics), figsize=(6.5 * len(metrics), 5), squeeze=False)
    axes = axes[0]
    for ax, metric in zip(axes, metrics):
        better = "higher" if QUALITY_METRICS[metric].higher_is_better else "lower"
        label = f"{QUALITY_METRICS[metric].label} ({better} is better)"
        ours = [(v["bpp"], v[metric]) for k, v in means.items() if k.startswith("sdc palette")]
        if ours:
            sign = 1 if QUALITY_METRICS[metric].higher_is_better else -1  # pareto() wants higher-is-better
            best = [(bpp, sign * q) for bpp, q in pareto([(bpp, sign * q) for bpp, q in ours])]
            ax.plot(*zip(*best), "-", color="C3", linewidth=2, label="sdc palette mode (best points)")
            ax.plot(*zip(*ours), "o", color="C3", label="sdc palette operating points")
        scalar = sorted([(v["bpp"], v[metric]) for k, v in means.items() if k.startswith("sdc u8")])
        if scalar:
            ax.plot(*zip(*scalar), "s:", color="C4", label="sdc u8 mode (finest, and coarser weighted steps)")
        recipe = next(v for k, v in means.items() if k.startswith("original recipe"))
        ax.plot(recipe["bpp"], recipe[metric], "*", markersize=14, color="k", label="original recipe")
        ceiling = means.get("autoencoder ceiling (unquantized)")
        if ceiling:
            ax.axhline(ceiling[metric], color="gray", linestyle="--", label="autoencoder ceiling")
        for i, peer in enumerate(result["peers"]):
            curve = sorted([(v["bpp"], v[metric]) for k, v in means.items() if k.startswith(f"{peer} @")])
            if curve:
                ax.plot(*zip(*curve), "^--", color=f"C{i}", label=peer)
        ax.set_xscale("log")
        ax.set_xlabel("bits per pixel (mean over images)")
        ax.set_ylabel(label)
        ax.grid(True, which="both", alpha=0.3)
    axes[0].legend(fontsize=8)
    fig.suptitle(f"Rate-distortion over {result['images']} Kodak images ({os.path.basename(result['models'])})")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def crop_grid(crops: dict, path: str, side: int = 256) -> None:
    """The same centred square (up to side x side pixels) of each image, side by side, unscaled."""
    def centre(pixels):
        h, w = pixels.shape[:2]
        size = min(side, h, w)
        y0, x0 = (h - size) // 2, (w - size) // 2
        return pixels[y0:y0 + size, x0:x0 + size]
    image_row([(title, centre(pixels)) for title, pixels in crops.items()], path)


def add_parser(sub):
    p = sub.add_parser("rd", help="rate-distortion sweep against classical codecs and the original recipe")
    p.add_argument("--models", required=True, help="model set")
    p.add_argument("--images", required=True, help="folder of PNG images (e.g. Kodak)")
    p.add_argument("--limit", type=int, default=0, help="first N images only")
    p.add_argument("--points", type=parse_points, default=None,
                   help="operating points: u8, u8:STEP (coarser weighted steps) and palette:K:G "
                        f"(K colours per group of G channels); default {DEFAULT_POINTS}, none with --qualities")
    p.add_argument("--peers", default="JPEG,WebP,AVIF,JPEG XL", help="classical codecs at matched bytes")
    p.add_argument("--qualities", type=sweep.parse_integers(1, 100), default=None, metavar="Q,Q,...",
                   help="quality sweep through the codec's --quality (with --efforts); the --peers at "
                        "matched bytes and the original recipe at 16..256 colours come with it")
    p.add_argument("--efforts", type=sweep.parse_integers(0, 9), default=[0], metavar="E,E,...",
                   help="effort sweep: each quality at each effort; Bjontegaard deltas against the lowest")
    p.add_argument("--crop-image", default="kodim23", help="image for the side-by-side crops")
    p.add_argument("--crop-point", default="palette K=256 G=4", help="operating point for the crops")
    add_run_options(p, "bench-out/rd", _main)


def _main(args) -> int:
    result = run(args)
    crops = result.pop("crops")
    save_json(result, args.out, "rd.json")
    with open(os.path.join(args.out, "rd.csv"), "w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=["image", "codec", *METRICS])
        writer.writeheader()
        writer.writerows(result["rows"])
    if "sweep" in result:
        with open(os.path.join(args.out, "sweep.csv"), "w", newline="") as fh:
            writer = csv.DictWriter(fh, fieldnames=["image", "codec", "quality", "encode_s", *METRICS])
            writer.writeheader()
            writer.writerows(result["sweep_rows"])
    text = markdown(result)
    with open(os.path.join(args.out, "summary.md"), "w") as fh:
        fh.write(text + "\n")
    if "summary" in result:
        plot(result, os.path.join(args.out, "rd.png"))
    if "sweep" in result:
        sweep.plot(result["sweep"], os.path.join(args.out, "rd-quality.png"),
                   f"Quality sweep over {result['images']} images ({os.path.basename(result['models'])})")
    if len(crops) > 1:
        crop_grid(crops, os.path.join(args.out, "crops.png"))
    print(text)
    return 0
