"""BD figures of ladder.csv (BENCHMARKS.md §16), or of another CSV of ladder.py's beside it
(§17: ladder23.csv), optionally on some of its images only: each effort against effort 0,
and against §14's AVIF and JPEG XL files of the same images (docs/bench/perceptual/sweep.csv),
on PSNR; median encode seconds per effort.  Writes summary.md and ladder.png beside this
script (for another CSV or images, STEM-summary.md and STEM.png, STEM the CSV's name with
"-some" where images are given).

    python docs/bench/effort-ladder-24/summary.py [CSV [IMAGES]]
"""
import csv
import os
import statistics
import sys

from sdc_bench.sweep import bd

here = os.path.dirname(os.path.abspath(__file__))


def rows(path, codecs=None):
    out = []
    for r in csv.DictReader(open(path)):
        if codecs is None or r["codec"] in codecs:
            out.append({"image": r["image"], "codec": r["codec"], "bytes": int(r["bytes"]), "psnr": float(r["psnr"]),
                        "encode_s": float(r["encode_s"] or "nan"), "quality": int(r["quality"] or 0)})
    return out


name = sys.argv[1] if len(sys.argv) > 1 else "ladder.csv"
chosen = set(sys.argv[2].split(",")) if len(sys.argv) > 2 else None
stem = os.path.splitext(name)[0] + ("-some" if chosen else "")
summary_name, picture_name = ("summary.md", "ladder.png") if stem == "ladder" else (f"{stem}-summary.md", f"{stem}.png")
ladder = [r for r in rows(os.path.join(here, name)) if chosen is None or r["image"] in chosen]
counts = {}
for r in ladder:
    counts[r["image"]] = counts.get(r["image"], 0) + 1
complete = {i for i, n in counts.items() if n == max(counts.values())}
ladder = [r for r in ladder if r["image"] in complete]
peers = [r for r in rows(os.path.join(here, "..", "perceptual", "sweep.csv"), {"AVIF", "JPEG XL"})
         if r["image"] in complete]
efforts = sorted({r["codec"] for r in ladder})
lines = [f"{len(complete)} images, qualities {sorted({r['quality'] for r in ladder})}", "",
         "| codec | encode (median) | x effort 0 | BD-PSNR vs effort 0 | BD-rate vs effort 0 | BD-rate vs AVIF | BD-rate vs JPEG XL |",
         "| --- | --- | --- | --- | --- | --- | --- |"]
base = statistics.median(r["encode_s"] for r in ladder if r["codec"] == "sdc effort 0")
for codec in efforts:
    seconds = statistics.median(r["encode_s"] for r in ladder if r["codec"] == codec)
    own = bd(ladder, "sdc effort 0", codec)
    vs = {peer: bd(peers + ladder, peer, codec) for peer in ("AVIF", "JPEG XL")}
    fmt = lambda v, unit: "–" if v is None else f"{v:+.2f}{unit}"
    lines.append(f"| {codec} | {seconds:.2f} s | {seconds / base:.1f} | {fmt(own['bd_quality'], ' dB')} |"
                 f" {fmt(own['bd_rate_percent'], '%')} | {fmt(vs['AVIF']['bd_rate_percent'], '%')} |"
                 f" {fmt(vs['JPEG XL']['bd_rate_percent'], '%')} |")
text = "\n".join(lines) + "\n"
open(os.path.join(here, summary_name), "w").write(text)
print(text)

# The curves as a picture: mean bits per pixel against mean PSNR, per codec and quality.
import matplotlib  # noqa: E402

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

figure, axes = plt.subplots(figsize=(6, 4.5))
for codec in efforts + ["AVIF", "JPEG XL"]:
    points = [r for r in ladder + peers if r["codec"] == codec]
    qualities = sorted({r["quality"] for r in points})
    xs = [statistics.mean(r["bytes"] * 8 / (768 * 512) for r in points if r["quality"] == q) for q in qualities]
    ys = [statistics.mean(r["psnr"] for r in points if r["quality"] == q) for q in qualities]
    axes.plot(xs, ys, "o-", label=codec)
axes.set_xlabel("bits per pixel (mean over the images)")
axes.set_ylabel("PSNR, dB (mean)")
axes.set_title(f"Kodak ({len(complete)} images): the efforts against effort 0 and the peers")
axes.grid(alpha=0.3)
axes.legend()
figure.tight_layout()
figure.savefig(os.path.join(here, picture_name), dpi=110)
