"""Effort ladder on Kodak-24 (BENCHMARKS.md §16): each image at Q10-90 and each effort, warm
sessions, 2 threads; PSNR and bytes per file, encode seconds.  Writes ladder.csv beside this
script; BD figures come from summary.py, against §14's peers (docs/bench/perceptual/sweep.csv).

    python docs/bench/effort-ladder-24/ladder.py models/taef2 ../shared/data/kodak 0,1 [IMAGES [QUALITIES [CSV]]]
"""
import csv
import os
import sys
import time

import numpy as np
from PIL import Image

from sdc_runtime import SdcCodec
from sdc_runtime.image import psnr

models, folder, efforts = sys.argv[1], sys.argv[2], [int(e) for e in sys.argv[3].split(",")]
names = sys.argv[4].split(",") if len(sys.argv) > 4 else sorted(n[:-4] for n in os.listdir(folder) if n.endswith(".png"))
qualities = [int(q) for q in sys.argv[5].split(",")] if len(sys.argv) > 5 else [10, 30, 50, 70, 90]
out = os.path.join(os.path.dirname(os.path.abspath(__file__)), sys.argv[6] if len(sys.argv) > 6 else "ladder.csv")
codec = SdcCodec(models, threads=2)
new = not os.path.exists(out)
with open(out, "a", newline="") as fh:
    writer = csv.writer(fh)
    if new:
        writer.writerow(["image", "codec", "quality", "encode_s", "bytes", "psnr"])
    for name in names:
        image = np.asarray(Image.open(os.path.join(folder, name + ".png")).convert("RGB"))
        for quality in qualities:
            for effort in efforts:
                started = time.perf_counter()
                data = codec.encode(image, quality=quality, effort=effort)
                seconds = time.perf_counter() - started
                writer.writerow([name, f"sdc effort {effort}", quality, f"{seconds:.3f}", len(data),
                                 f"{psnr(image, np.asarray(codec.decode(data))):.4f}"])
                fh.flush()
        print(name, flush=True)
