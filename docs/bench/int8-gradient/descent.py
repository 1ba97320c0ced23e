"""Probe (BENCHMARKS.md §18): the default effort's descent with an int8 gradient graph.  Each
image and quality is encoded at effort 0, at the default effort's two steps with the fp32
graph, and with the int8 graph at 2, 3 and 4 steps, and at 2 and 3 steps whose first step
is the fp32 graph's ("hybrid").  The int8 graph runs with its ``weight`` input times
SCALE (and its outputs divided by it), which puts the backward pass in the range the
calibration saw.  Every file is decoded by the fp32 decoder.  Prints one row per image and
quality: PSNR, bytes and encode seconds of each.

    python docs/bench/int8-gradient/descent.py models/taef2 ../shared/data/kodak INT8.onnx 2 kodim05,kodim23,kodim15,kodim03
"""
import json
import os
import shutil
import sys
import tempfile
import time

import numpy as np
from PIL import Image

from sdc_runtime import SdcCodec, neural, refine
from sdc_runtime.image import psnr
from sdc_runtime.manifest import sha256_file

models, folder, quantized, scale, names = sys.argv[1], sys.argv[2], sys.argv[3], float(sys.argv[4]), sys.argv[5]
scratch = tempfile.mkdtemp()
int8_set = os.path.join(scratch, "int8-gradient")
shutil.copytree(models, int8_set)
shutil.copy(os.path.join(models, "decoder_gradient.onnx"), os.path.join(int8_set, "decoder_gradient.fp32.onnx"))
shutil.copy(quantized, os.path.join(int8_set, "decoder_gradient.onnx"))
manifest = json.load(open(os.path.join(int8_set, "manifest.json")))
manifest["files"]["decoder_gradient.onnx"] = sha256_file(os.path.join(int8_set, "decoder_gradient.onnx"))
json.dump(manifest, open(os.path.join(int8_set, "manifest.json"), "w"))

state = {"calls": 0, "hybrid": False}
run_all = neural.NeuralStages._run_all


def probed_run_all(self, file, *arrays):
    """The int8 set's gradient runs: the first through the fp32 graph where hybrid, the others scaled."""
    if self.model_dir != int8_set or file != "decoder_gradient.onnx":
        return run_all(self, file, *arrays)
    state["calls"] += 1
    if state["hybrid"] and state["calls"] == 1:
        return run_all(self, "decoder_gradient.fp32.onnx", *arrays)
    gradient, error = run_all(self, file, arrays[0], arrays[1], arrays[2] * scale)
    return [gradient / scale, error / scale]


neural.NeuralStages._run_all = probed_run_all
fp32 = SdcCodec(models, threads=2)
int8 = SdcCodec(int8_set, threads=2)
runs = [("effort 0", fp32, 0, False), ("fp32, 2 steps", fp32, 2, False), ("int8, 2 steps", int8, 2, False),
        ("int8, 3 steps", int8, 3, False), ("int8, 4 steps", int8, 4, False), ("hybrid, 2 steps", int8, 2, True),
        ("hybrid, 3 steps", int8, 3, True)]
print("image quality " + " ".join(f"[{label}: PSNR bytes seconds]" for label, *_ in runs))
for name in names.split(","):
    image = np.asarray(Image.open(os.path.join(folder, name + ".png")).convert("RGB"))
    for quality in (30, 70):
        row = [name, quality]
        for _, codec, steps, hybrid in runs:
            state.update(calls=0, hybrid=hybrid)
            refine.DESCENT[1] = (0, steps)
            started = time.perf_counter()
            data = codec.encode(image, quality=quality, effort=1 if steps else 0)
            seconds = time.perf_counter() - started
            row += [f"{psnr(image, np.asarray(fp32.decode(data))):.3f}", len(data), f"{seconds:.1f}"]
        print(*row, flush=True)
shutil.rmtree(scratch)
