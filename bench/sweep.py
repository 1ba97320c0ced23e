"""The quality and effort sweeps of ``sdc-bench rd``: files written through the codec's own
``quality`` and ``effort`` options, with Bjøntegaard deltas against effort 0, the original
2022 recipe (at 16..256 colours) and the classical codecs at matched bytes.

Bjøntegaard deltas (the ``bjontegaard`` package, Akima interpolation over log-rate) are
computed per image where two curves overlap, then averaged: BD-PSNR is the mean PSNR gain at
equal bytes, BD-rate the mean byte change at equal PSNR (negative: fewer bytes).
"""
from __future__ import annotations

import argparse
import math
import time
import warnings

import numpy as np

RECIPE_COLORS = (16, 32, 64, 128, 256)
SWEEP_PEERS = ("AVIF", "JPEG XL")


def parse_integers(low: int, high: int):
    def parse(text: str) -> list[int]:
        try:
            values = sorted({int(v) for v in text.split(",")})
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected integers separated by commas, not {text!r}") from None
        if not values or values[0] < low or values[-1] > high:
            raise argparse.ArgumentTypeError(f"values must lie in {low}..{high}, not {text!r}")
        return values
    return parse


def sweep_image(codec, name: str, original: np.ndarray, qualities, efforts, scores, crops=None) -> list[dict]:
    """Rows for one image: each (effort, quality), the recipe curve and the peers matched at the
    bytes of the highest effort swept.  ``crops``: a dict to fill with the decoded images at the
    model set's default quality, to look at side by side."""
    from sdc_peers import matched
    from sdc_runtime.latent import dequantize_u8, quantize_u8

    from .recipe2022 import original_recipe

    rows = []
    top = {}
    for effort in efforts:
        for quality in qualities:
            started = time.perf_counter()
            data = codec.encode(original, quality=quality, effort=effort)
            seconds = time.perf_counter() - started
            decoded = np.asarray(codec.decode(data))
            rows.append({"image": name, "codec": f"sdc effort {effort}", "quality": quality, "encode_s": seconds,
                         **scores(original, decoded, len(data))})
            if effort == efforts[-1]:
                top[quality] = (len(data), decoded)
            if crops is not None and quality == codec.manifest.defaults.quality:
                crops["original"] = original
                crops[f"sdc Q{quality} effort {effort} ({len(data)} B)"] = decoded
    raw, size = codec.image_to_latent(original)
    scale, zero = codec.quant_mapping(raw)
    for colors in RECIPE_COLORS:
        payload, levels = original_recipe(quantize_u8(raw, scale, zero), colors)
        decoded = np.asarray(codec.latent_to_image(dequantize_u8(levels, scale, zero), size))
        rows.append({"image": name, "codec": "original recipe", "quality": colors,
                     **scores(original, decoded, payload + 8 * raw.shape[0])})
    for peer in SWEEP_PEERS:
        for quality, (budget, _) in top.items():
            result = matched(peer, original, budget)
            if result is not None:
                rows.append({"image": name, "codec": peer, "quality": quality,
                             **scores(original, result[1], result[0])})
                if crops is not None and quality == codec.manifest.defaults.quality:
                    crops[f"{peer} ({result[0]} B)"] = result[1]
    return rows


def _curve(rows, image, codec):
    points = sorted((r["bytes"], r["psnr"]) for r in rows if r["image"] == image and r["codec"] == codec)
    # Bjøntegaard needs rates and PSNRs that both rise: keep the points on the image's frontier.
    frontier = []
    for size, quality in points:
        if not frontier or (size > frontier[-1][0] and quality > frontier[-1][1]):
            frontier.append((size, quality))
    return frontier


def bd(rows: list[dict], anchor: str, test: str) -> dict:
    """Mean BD-rate (%) and BD-PSNR (dB) of ``test`` against ``anchor`` over the images where
    both curves have four or more points."""
    import bjontegaard

    rates, gains = [], []
    for image in sorted({r["image"] for r in rows}):
        a, t = _curve(rows, image, anchor), _curve(rows, image, test)
        if len(a) < 4 or len(t) < 4:
            continue
        with warnings.catch_warnings():  # a partial overlap is reported, not an error
            warnings.simplefilter("ignore")
            try:
                rate = bjontegaard.bd_rate(*zip(*a), *zip(*t), method="akima", require_matching_points=False)
                gain = bjontegaard.bd_psnr(*zip(*a), *zip(*t), method="akima", require_matching_points=False)
            except ValueError:  # no overlap at all
                continue
        # BD-rate compares bytes at equal PSNR: undefined (nan) where the PSNR ranges do not meet.
        if math.isfinite(rate):
            rates.append(rate)
        if math.isfinite(gain):
            gains.append(gain)
    return {"anchor": anchor, "test": test, "images": len(gains),
            "bd_rate_percent": float(np.mean(rates)) if rates else None, "bd_rate_images": len(rates),
            "bd_psnr_db": float(np.mean(gains)) if gains else None}


def summarize(rows: list[dict], efforts: list[int]) -> dict:
    codecs = sorted({r["codec"] for r in rows})
    means = {}
    for codec in codecs:
        for quality in sorted({r["quality"] for r in rows if r["codec"] == codec}):
            chosen = [r for r in rows if r["codec"] == codec and r["quality"] == quality]
            means[f"{codec} @ {quality}"] = {
                "codec": codec, "quality": quality, "n": len(chosen),
                **{k: float(np.mean([r[k] for r in chosen])) for k in ("bytes", "bpp", "psnr", "ssim", "ms_ssim")},
                **({"encode_s": float(np.median([r["encode_s"] for r in chosen]))} if "encode_s" in chosen[0] else {})}
    base = f"sdc effort {efforts[0]}"
    deltas = [bd(rows, base, f"sdc effort {e}") for e in efforts[1:]]
    best = f"sdc effort {efforts[-1]}"
    deltas += [bd(rows, anchor, best) for anchor in ("original recipe", *SWEEP_PEERS) if anchor in codecs]
    return {"means": means, "bd": deltas}


def markdown(summary: dict, efforts: list[int]) -> list[str]:
    lines = ["", "Quality and effort sweep (means over images; encode seconds are medians):", "",
             "| codec | quality | bytes | bpp | PSNR dB | MS-SSIM | encode s |", "| --- | --- | --- | --- | --- | --- | --- |"]
    for mean in summary["means"].values():
        seconds = f"{mean['encode_s']:.2f}" if "encode_s" in mean else ""
        label = "colours" if mean["codec"] == "original recipe" else "Q"
        lines.append(f"| {mean['codec']} | {label} {mean['quality']} | {mean['bytes']:.0f} | {mean['bpp']:.4f} |"
                     f" {mean['psnr']:.2f} | {mean['ms_ssim']:.4f} | {seconds} |")
    lines += ["", "Bjøntegaard deltas (per image, then the mean; negative BD-rate: fewer bytes for the same PSNR):",
              "", "| test | anchor | images | BD-rate | BD-PSNR |", "| --- | --- | --- | --- | --- |"]
    for d in summary["bd"]:
        rate = ("n/a (the PSNR ranges do not meet)" if d["bd_rate_percent"] is None
                else f"{d['bd_rate_percent']:+.1f}% ({d['bd_rate_images']} images)")
        gain = "n/a" if d["bd_psnr_db"] is None else f"{d['bd_psnr_db']:+.2f} dB"
        lines.append(f"| {d['test']} | {d['anchor']} | {d['images']} | {rate} | {gain} |")
    return lines


def plot(summary: dict, path: str, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 5.5))
    codecs = sorted({m["codec"] for m in summary["means"].values()})
    for i, codec in enumerate(codecs):
        curve = sorted((m["bpp"], m["psnr"]) for m in summary["means"].values() if m["codec"] == codec)
        style = "o-" if codec.startswith("sdc") else ("*-" if codec == "original recipe" else "^--")
        ax.plot(*zip(*curve), style, color=f"C{i}", label=codec)
    ax.set_xscale("log")
    ax.set_xlabel("bits per pixel (mean over images)")
    ax.set_ylabel("PSNR (dB)")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=9)
    ax.set_title(title)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
