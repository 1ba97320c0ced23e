"""The quality and effort sweeps of ``sdc-bench rd``: files written through the codec's own
``quality`` and ``effort`` options, with Bjøntegaard deltas against effort 0, the original
2022 recipe (at 16..256 colours) and the classical codecs at matched bytes.

Bjøntegaard deltas (the ``bjontegaard`` package, Akima interpolation over log-rate) are
computed per image where two curves overlap, then averaged, on PSNR, SSIMULACRA 2,
Butteraugli's 3-norm and ST-LPIPS: BD-rate is the mean byte change at equal quality (negative: fewer
bytes), BD-PSNR the mean PSNR gain at equal bytes.
"""
from __future__ import annotations

import argparse
import math
import time
import warnings

import numpy as np

from .metrics import QUALITY_METRICS, scores

RECIPE_COLORS = (16, 32, 64, 128, 256)
CEILING = "autoencoder ceiling"
# The metrics Bjøntegaard deltas are taken on: PSNR, the two perceptual ones the JPEG XL and
# AVIF people use, and the learned one generative codecs report (each where it is installed).
BD_METRICS = ("psnr", "ssimulacra2", "butteraugli_3norm", "st_lpips")


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


def sweep_image(codec, name: str, original: np.ndarray, qualities, efforts, peers, crops=None) -> list[dict]:
    """Rows for one image: each (effort, quality), the autoencoder's ceiling (its unquantized
    round trip), the recipe curve and each peer matched at the bytes of the highest effort
    swept.  ``crops``: a dict to fill with the decoded images at the model set's default
    quality, to look at side by side."""
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
    rows.append({"image": name, "codec": CEILING, "quality": 0,
                 **scores(original, np.asarray(codec.latent_to_image(raw, size)), 0)})
    scale, zero = codec.quant_mapping(raw)
    for colors in RECIPE_COLORS:
        payload, levels = original_recipe(quantize_u8(raw, scale, zero), colors)
        decoded = np.asarray(codec.latent_to_image(dequantize_u8(levels, scale, zero), size))
        rows.append({"image": name, "codec": "original recipe", "quality": colors,
                     **scores(original, decoded, payload + 8 * raw.shape[0])})
    for peer in peers:
        for quality, (budget, _) in top.items():
            result = matched(peer, original, budget)
            if result is not None:
                rows.append({"image": name, "codec": peer, "quality": quality,
                             **scores(original, result[1], result[0])})
                if crops is not None and quality == codec.manifest.defaults.quality and peer in ("AVIF", "JPEG XL"):
                    crops[f"{peer} ({result[0]} B)"] = result[1]
    return rows


def _oriented(metric: str, value: float) -> float:
    """Lower-is-better metrics (Butteraugli) negated, so every curve rises with bytes."""
    return value if QUALITY_METRICS[metric].higher_is_better else -value


def _curve(rows, image, codec, metric):
    points = sorted((r["bytes"], _oriented(metric, r[metric])) for r in rows
                    if r["image"] == image and r["codec"] == codec and metric in r)
    # Bjøntegaard needs rates and qualities that both rise: keep the points on the image's frontier.
    frontier = []
    for size, quality in points:
        if not frontier or (size > frontier[-1][0] and quality > frontier[-1][1]):
            frontier.append((size, quality))
    return frontier


def bd(rows: list[dict], anchor: str, test: str, metric: str = "psnr") -> dict:
    """Mean BD-rate (%) and BD-quality (in the metric's units; positive: better) of ``test``
    against ``anchor`` on ``metric``, over the images where both curves have four or more points."""
    import bjontegaard

    rates, gains = [], []
    for image in sorted({r["image"] for r in rows}):
        a, t = _curve(rows, image, anchor, metric), _curve(rows, image, test, metric)
        if len(a) < 4 or len(t) < 4:
            continue
        with warnings.catch_warnings():  # a partial overlap is reported, not an error
            warnings.simplefilter("ignore")
            try:
                rate = bjontegaard.bd_rate(*zip(*a), *zip(*t), method="akima", require_matching_points=False)
                gain = bjontegaard.bd_psnr(*zip(*a), *zip(*t), method="akima", require_matching_points=False)
            except ValueError:  # no overlap at all
                continue
        # BD-rate compares bytes at equal quality: undefined (nan) where the quality ranges do not meet.
        if math.isfinite(rate):
            rates.append(rate)
        if math.isfinite(gain):
            gains.append(gain)
    return {"anchor": anchor, "test": test, "metric": metric, "images": len(gains),
            "bd_rate_percent": float(np.mean(rates)) if rates else None, "bd_rate_images": len(rates),
            "bd_quality": float(np.mean(gains)) if gains else None}


def measured_metrics(rows: list[dict]) -> list[str]:
    """The quality metrics every row has (Butteraugli only where its tool is installed)."""
    return [m for m in QUALITY_METRICS if rows and all(m in r for r in rows)]


def summarize(rows: list[dict], efforts: list[int], peers) -> dict:
    metrics = measured_metrics(rows)
    codecs = sorted({r["codec"] for r in rows})
    means = {}
    for codec in codecs:
        for quality in sorted({r["quality"] for r in rows if r["codec"] == codec}):
            chosen = [r for r in rows if r["codec"] == codec and r["quality"] == quality]
            means[f"{codec} @ {quality}"] = {
                "codec": codec, "quality": quality, "n": len(chosen),
                **{k: float(np.mean([r[k] for r in chosen])) for k in ("bytes", "bpp", *metrics)},
                **({"encode_s": float(np.median([r["encode_s"] for r in chosen]))} if "encode_s" in chosen[0] else {})}
    base = f"sdc effort {efforts[0]}"
    pairs = [(base, f"sdc effort {e}") for e in efforts[1:]]
    best = f"sdc effort {efforts[-1]}"
    pairs += [(anchor, best) for anchor in ("original recipe", *peers) if anchor in codecs]
    deltas = [{"anchor": anchor, "test": test, "by_metric": {m: bd(rows, anchor, test, m) for m in BD_METRICS
                                                              if m in metrics}}
              for anchor, test in pairs]
    return {"metrics": metrics, "means": means, "bd": deltas}


def _label(mean: dict) -> str:
    if mean["codec"] == CEILING:
        return "unquantized"
    return f"{'colours' if mean['codec'] == 'original recipe' else 'Q'} {mean['quality']}"


def markdown(summary: dict, efforts: list[int]) -> list[str]:
    metrics = [m for m in summary["metrics"] if m != "ssim"]
    header = " | ".join(QUALITY_METRICS[m].label for m in metrics)
    lines = ["", "Quality and effort sweep (means over images; encode seconds are medians):", "",
             f"| codec | quality | bytes | bpp | {header} | encode s |", "| --- " * (len(metrics) + 5) + "|"]
    for mean in summary["means"].values():
        seconds = f"{mean['encode_s']:.2f}" if "encode_s" in mean else ""
        values = " | ".join(f"{mean[m]:.{QUALITY_METRICS[m].digits}f}" for m in metrics)
        lines.append(f"| {mean['codec']} | {_label(mean)} | {mean['bytes']:.0f} | {mean['bpp']:.4f} | {values} |"
                     f" {seconds} |")
    measured = [m for m in BD_METRICS if summary["bd"] and m in summary["bd"][0]["by_metric"]]
    lines += ["", "Bjøntegaard deltas (per image, then the mean).  BD-rate: the byte change at equal quality on"
              " each metric (negative: fewer bytes); n/a where the quality ranges do not meet.  BD-PSNR: the"
              " PSNR change at equal bytes.", "",
              "| test | anchor | images | " + " | ".join(f"BD-rate {QUALITY_METRICS[m].label}" for m in measured)
              + " | BD-PSNR |", "| --- " * (len(measured) + 4) + "|"]
    for pair in summary["bd"]:
        by = pair["by_metric"]
        rates = " | ".join("n/a" if by[m]["bd_rate_percent"] is None else
                           f"{by[m]['bd_rate_percent']:+.1f}% ({by[m]['bd_rate_images']})" for m in measured)
        gain = by["psnr"]["bd_quality"]
        lines.append(f"| {pair['test']} | {pair['anchor']} | {by['psnr']['images']} | {rates} |"
                     f" {'n/a' if gain is None else f'{gain:+.2f} dB'} |")
    return lines


def plot(summary: dict, path: str, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    metrics = [m for m in BD_METRICS if m in summary["metrics"]]
    fig, axes = plt.subplots(1, len(metrics), figsize=(7 * len(metrics), 5.5), squeeze=False)
    codecs = sorted({m["codec"] for m in summary["means"].values()} - {CEILING})
    ceiling = next((m for m in summary["means"].values() if m["codec"] == CEILING), None)
    for ax, metric in zip(axes[0], metrics):
        for i, codec in enumerate(codecs):
            curve = sorted((m["bpp"], m[metric]) for m in summary["means"].values() if m["codec"] == codec)
            style = "o-" if codec.startswith("sdc") else ("*-" if codec == "original recipe" else "^--")
            ax.plot(*zip(*curve), style, color=f"C{i}", label=codec)
        if ceiling is not None:
            ax.axhline(ceiling[metric], color="gray", linestyle=":", label="autoencoder ceiling (unquantized)")
        ax.set_xscale("log")
        ax.set_xlabel("bits per pixel (mean over images)")
        better = "higher" if QUALITY_METRICS[metric].higher_is_better else "lower"
        ax.set_ylabel(f"{QUALITY_METRICS[metric].label} ({better} is better)")
        ax.grid(True, which="both", alpha=0.3)
    axes[0][0].legend(fontsize=8)
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
