"""Probe (BENCHMARKS.md §18): how the int8 gradient graph's gradient at E(x) agrees with the fp32
graph's on whole Kodak images, with the ``weight`` input (the error's scale, which sets the
backward pass's range) multiplied by 1, 2, 4 and 8.

    python docs/bench/int8-gradient/agreement.py models/taef2 ../shared/data/kodak INT8.onnx kodim23,kodim05
"""
import os
import sys
import time

import numpy as np
import onnxruntime as ort
from quantize import feeds

from sdc_runtime.neural import needs_exact_kernels, session_options

models, folder, quantized, names = sys.argv[1:5]
fp32 = ort.InferenceSession(os.path.join(models, "decoder_gradient.onnx"), session_options(2),
                            providers=["CPUExecutionProvider"])
int8 = ort.InferenceSession(quantized, session_options(2, exact_int8=needs_exact_kernels(8)), providers=["CPUExecutionProvider"])
print("image | MSE at E(x), fp32 (int8 graph) | weight scale | cosine | sign agreement on the larger half")
for name, feed in zip(names.split(","), feeds(models, folder, names.split(","), None)):
    exact, error = fp32.run(None, feed)
    levels = 255 ** 2 / feed["image"].size
    for scale in (1, 2, 4, 8):
        approx, approx_error = int8.run(None, dict(feed, weight=feed["weight"] * scale))
        cosine = (exact * approx).sum() / np.linalg.norm(exact) / np.linalg.norm(approx)
        large = np.abs(exact) > np.median(np.abs(exact))
        signs = (np.sign(exact[large]) == np.sign(approx[large])).mean()
        print(f"{name} | {error.item() * levels:.1f} ({approx_error.item() * levels / scale:.1f}) | {scale} | "
              f"{cosine:.3f} | {signs:.3f}", flush=True)
# The two graphs' time on the last image, alternating, 2 threads: median of three runs each.
seconds = {"fp32": [], "int8": []}
for _ in range(3):
    for label, session in (("fp32", fp32), ("int8", int8)):
        started = time.perf_counter()
        session.run(None, feed)
        seconds[label].append(time.perf_counter() - started)
fp32_s, int8_s = np.median(seconds["fp32"]), np.median(seconds["int8"])
print(f"{name}, one run of the graph: fp32 {fp32_s:.2f} s, int8 {int8_s:.2f} s, {fp32_s / int8_s:.2f}x")
