"""sdc-bench int8: the PSNR an int8 model set loses against its fp32 set, on images disjoint
from its calibration images.

The images are split in two halves: the set is quantized (as ``sdc-export --int8`` does,
from the fp32 set's own graphs) calibrating on the first half and measured on the second,
then the other way round.  Each measured image is coded at a palette and a u8 quality; the
loss is the fp32 set's PSNR minus that of (a) the int8 decoder reading the fp32 set's file,
(b) the int8 set's own file (its int8 encoder, if quantized, and the descent aimed between
its two decoders where it keeps a reference decoder) on the int8 decoder.  Of the int8 set's
own file it also reports the loss on the int8 decoder against the fp32 one (c), and what it
costs on the fp32 decoder against the fp32 set's file (d).
"""
from __future__ import annotations

import csv
import json
import os
import shutil
import tempfile

import numpy as np

from sdc_runtime.errors import SdcUsageError

from .metrics import psnr
from .timing import machine

# A palette and a u8 point of the TAE quality scale (BENCHMARKS.md §7).
QUALITIES = {"palette": 10, "u8": 60}


def add_parser(sub) -> None:
    from sdc_export.int8 import CALIBRATION_SIDE, calibration_side
    from sdc_runtime.options import MAX_EFFORT

    p = sub.add_parser("int8", help="PSNR lost by int8 graphs, calibrated on disjoint images")
    p.add_argument("--models", required=True, help="an fp32 model set")
    p.add_argument("--images", required=True, help="folder of images (at least 6)")
    p.add_argument("--limit", type=int, default=0, help="use the first N images only")
    p.add_argument("--int8", default="vae_decoder,vae_encoder", metavar="GRAPHS", help="graphs to quantize")
    p.add_argument("--calibration-side", type=calibration_side, default=CALIBRATION_SIDE, metavar="N",
                   help="calibrate on centre crops of N pixels (default: the export's, 256; 0: whole images)")
    p.add_argument("--no-sweep", action="store_true", help="quantize without the sensitivity sweep")
    add_weight_bits_option(p)
    p.add_argument("--effort", type=int, default=None, metavar="N", choices=range(MAX_EFFORT + 1),
                   help=f"the encoder effort the files are coded at, 0..{MAX_EFFORT} (default: the set's own)")
    p.add_argument("--out", required=True, help="folder for int8.json, int8.csv and int8-loss.png")
    p.set_defaults(run=run)


def run(args) -> int:
    from PIL import Image
    from tqdm import tqdm

    from sdc_export.int8 import calibration_images, quantize_model_set
    from sdc_runtime import SdcCodec
    from sdc_runtime.manifest import load_manifest

    roles = tuple(r for r in args.int8.split(",") if r)
    manifest = load_manifest(args.models)
    if any(g.precision != "fp32" for g in manifest.graphs.values()):
        raise SdcUsageError("--models must be an fp32 model set")
    names = sorted(n for n in os.listdir(args.images) if n.lower().endswith((".png", ".jpg", ".jpeg")))
    names = names[:args.limit] if args.limit else names
    if len(names) < 6:  # two halves of at least 3, the export's minimum calibration
        raise SdcUsageError("--images needs at least 6 images")
    half = len(names) // 2
    folds = [(names[:half], names[half:]), (names[half:], names[:half])]
    os.makedirs(args.out, exist_ok=True)
    reference = SdcCodec(args.models)
    effort = reference.options().effort if args.effort is None else args.effort  # argparse checked the range
    rows = []
    bar = tqdm(total=len(names) * len(QUALITIES), desc="int8", unit="code")
    for calibrate, measure in folds:
        with tempfile.TemporaryDirectory(prefix=".sdc-int8-bench-", dir=args.out) as scratch:
            images = os.path.join(scratch, "calibration")
            os.mkdir(images)
            for name in calibrate:
                os.symlink(os.path.abspath(os.path.join(args.images, name)), os.path.join(images, name))
            quantized = os.path.join(scratch, "set")
            shutil.copytree(args.models, quantized)
            bar.set_description_str(f"quantize on {calibrate[0]}..{calibrate[-1]}")
            parity, sweeps = quantize_model_set(
                quantized, roles, calibration_images(images, len(calibrate), args.calibration_side),
                sweep_nodes=not args.no_sweep, weight_bits=args.int8_weight_bits,
                # The quantization takes minutes: its stages show in the bar as they run.
                progress=lambda stage, done, total: bar.set_description_str(f"{stage} {done}/{total}"))
            int8 = SdcCodec(quantized)
            for name in measure:
                with Image.open(os.path.join(args.images, name)) as im:
                    rgb = np.asarray(im.convert("RGB"))
                for mode, quality in QUALITIES.items():
                    bar.set_description_str(f"{name} {mode}")
                    data = reference.encode(rgb, quality=quality, effort=effort)
                    own = int8.encode(rgb, quality=quality, effort=effort)
                    base = psnr(rgb, np.asarray(reference.decode(data)))
                    own_on_fp32 = psnr(rgb, np.asarray(reference.decode(own)))
                    own_on_int8 = psnr(rgb, np.asarray(int8.decode(own)))
                    rows.append({
                        "image": name, "mode": mode, "quality": quality, "effort": effort,
                        "calibrated_on": f"{calibrate[0]}..{calibrate[-1]}", "fp32_psnr": base,
                        "int8_decoder_loss": base - psnr(rgb, np.asarray(int8.decode(data))),
                        "int8_both_loss": base - own_on_int8,
                        "own_file_int8_loss": own_on_fp32 - own_on_int8, "own_file_fp32_cost": base - own_on_fp32,
                        "bytes_fp32": len(data), "bytes_int8_set": len(own)})
                    bar.update(1)
    bar.close()
    summary = summarize(rows)
    with open(os.path.join(args.out, "int8.csv"), "w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    with open(os.path.join(args.out, "int8.json"), "w") as fh:
        json.dump({"machine": machine(), "roles": roles, "summary": summary, "rows": rows}, fh, indent=1)
    plot(rows, os.path.join(args.out, "int8-loss.png"))
    print(markdown(summary))
    return 0


def add_weight_bits_option(p) -> None:
    from sdc_export.int8 import DEFAULT_WEIGHT_BITS
    from sdc_runtime.manifest import WEIGHT_BITS

    p.add_argument("--int8-weight-bits", type=int, default=DEFAULT_WEIGHT_BITS, choices=WEIGHT_BITS,
                   help=f"the bits of the int8 weights (default: the export's, {DEFAULT_WEIGHT_BITS})")


def summarize(rows: list[dict]) -> list[dict]:
    out = []
    for mode in QUALITIES:
        for key, label in (("int8_decoder_loss", "(a) int8 decoder, fp32 set's file"),
                           ("int8_both_loss", "(b) int8 set's file on its decoder"),
                           ("own_file_int8_loss", "(c) int8 set's file, int8 vs fp32 decoder"),
                           ("own_file_fp32_cost", "(d) int8 set's file on the fp32 decoder, vs the fp32 set's")):
            losses = [r[key] for r in rows if r["mode"] == mode]
            worst = max(rows, key=lambda r: r[key] if r["mode"] == mode else -np.inf)
            out.append({"mode": mode, "graphs": label, "images": len(losses), "mean_loss_db": float(np.mean(losses)),
                        "median_loss_db": float(np.median(losses)), "worst_loss_db": float(max(losses)),
                        "worst_image": worst["image"]})
    return out


def markdown(summary: list[dict]) -> str:
    lines = ["| mode | int8 graphs | images | mean loss dB | median | worst (image) |", "|---|---|---|---|---|---|"]
    for s in summary:
        lines.append(f"| {s['mode']} | {s['graphs']} | {s['images']} | {s['mean_loss_db']:.3f} | "
                     f"{s['median_loss_db']:.3f} | {s['worst_loss_db']:.3f} ({s['worst_image']}) |")
    return "\n".join(lines)


def plot(rows: list[dict], path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    images = sorted({r["image"] for r in rows})
    fig, axes = plt.subplots(1, len(QUALITIES), figsize=(12, 4), sharey=True)
    for ax, mode in zip(axes, QUALITIES):
        by = {r["image"]: r for r in rows if r["mode"] == mode}
        x = np.arange(len(images))
        ax.bar(x - 0.2, [by[i]["int8_decoder_loss"] for i in images], 0.4, label="fp32 set's file")
        ax.bar(x + 0.2, [by[i]["own_file_int8_loss"] for i in images], 0.4, label="int8 set's own file")
        ax.axhline(0.3, color="k", ls="--", lw=0.8, label="mean target 0.3 dB")
        ax.axhline(0.6, color="r", ls=":", lw=0.8, label="worst target 0.6 dB")
        ax.set_xticks(x, [i.split(".")[0].replace("kodim", "") for i in images], fontsize=7)
        ax.set_title(f"{mode} (Q{QUALITIES[mode]})")
        ax.set_xlabel("Kodak image")
    axes[0].set_ylabel("PSNR on the int8 decoder less on fp32 (dB)")
    axes[0].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
