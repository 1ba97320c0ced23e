"""The aimed descent's cost: kodim23 at the default options, encoded by the fp32 set and by an
int8 set that keeps its reference decoder, effort 0 and the default effort, alternating, warm
sessions, 2 threads; median seconds of REPEAT runs each.

    python timing.py FP32_SET INT8_SET IMAGE [REPEAT]
"""
import statistics
import sys
import time

import numpy as np
from PIL import Image

from sdc_runtime import SdcCodec

fp32_set, int8_set, path = sys.argv[1:4]
repeat = int(sys.argv[4]) if len(sys.argv) > 4 else 3
rgb = np.asarray(Image.open(path).convert("RGB"))
codecs = {"fp32 set": SdcCodec(fp32_set, threads=2), "int8 set": SdcCodec(int8_set, threads=2)}
times = {(label, effort): [] for label in codecs for effort in (0, 1)}
for codec in codecs.values():
    codec.encode(rgb, effort=1)  # warm: sessions open, arenas sized
for _ in range(repeat):
    for label, codec in codecs.items():
        for effort in (0, 1):
            start = time.perf_counter()
            codec.encode(rgb, effort=effort)
            times[label, effort].append(time.perf_counter() - start)
for label in codecs:
    e0, e1 = statistics.median(times[label, 0]), statistics.median(times[label, 1])
    print(f"| {label} | {e0:.2f} s | {e1:.2f} s | {e1 / e0:.1f} |")
