"""Files of the default effort on the int8 TAEF2 decoder, written by the fp32 set and by the
int8 set (with its reference decoder, which aims the descent between the two decoders).

    python aim.py FP32_SET INT8_SET IMAGES_DIR FIRST..LAST OUT.csv

INT8_SET: the fp32 set quantized by ``sdc_export.int8.quantize_model_set(set, ("vae_decoder",),
calibration)`` on the other fold's images (as ``sdc-bench int8`` does), which keeps the fp32
decoder as its reference decoder; FIRST..LAST: the measured images (the fold it was not
calibrated on).  Columns: each file's PSNR on the fp32 decoder and its loss on the int8 one.
"""
import csv
import os
import sys
import time

import numpy as np
from PIL import Image

from sdc_runtime import SdcCodec
from sdc_runtime.image import psnr

fp32_set, int8_set, folder, span, out = sys.argv[1:6]
first, last = span.split("..")
fp32, int8 = SdcCodec(fp32_set), SdcCodec(int8_set)
assert "reference_decoder" in int8.manifest.graphs
names = sorted(n for n in os.listdir(folder) if first <= n <= last)
with open(out, "w", newline="") as fh:
    writer = None
    for name in names:
        with Image.open(os.path.join(folder, name)) as im:
            rgb = np.asarray(im.convert("RGB"))
        for mode, quality in (("palette", 10), ("u8", 60)):
            row = {"image": name, "mode": mode, "quality": quality}
            for label, codec in (("fp32_set", fp32), ("int8_set", int8)):
                start = time.perf_counter()
                data = codec.encode(rgb, quality=quality)  # the set's default effort
                row[f"{label}_seconds"] = round(time.perf_counter() - start, 2)
                on_fp32 = psnr(rgb, np.asarray(fp32.decode(data)))
                row[f"{label}_fp32_psnr"] = round(on_fp32, 4)
                row[f"{label}_int8_loss"] = round(on_fp32 - psnr(rgb, np.asarray(int8.decode(data))), 4)
                row[f"{label}_bytes"] = len(data)
            print(row, flush=True)
            if writer is None:
                writer = csv.DictWriter(fh, fieldnames=list(row))
                writer.writeheader()
            writer.writerow(row)
