"""Median timing helpers shared by the benchmarks, and the way a timing bench reports."""
from __future__ import annotations

import json
import os
import statistics
import time


def median_seconds(fn, repeat: int, warmup: int = 1) -> float:
    for _ in range(warmup):
        fn()
    samples = []
    for _ in range(repeat):
        started = time.perf_counter()
        fn()
        samples.append(time.perf_counter() - started)
    return statistics.median(samples)


def machine() -> str:
    import os
    import platform

    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as fh:
            names = [line.split(":", 1)[1].strip() for line in fh if line.startswith("model name")]
        cpu = names[0] if names else cpu
    except OSError:
        pass
    flags = speed_flags()
    return (f"{cpu}, {os.cpu_count()} cores, {platform.system()} {platform.release()},"
            f" flags {' '.join(flags) if flags else 'none of ' + ' '.join(SPEED_FLAGS)}")


# The CPU features that decide int8 and fp32 speed in ONNX Runtime's kernels: VNNI (AVX-512 or
# AVX) does int8 dot products in one instruction, AMX in tiles.
SPEED_FLAGS = ("avx2", "fma", "avx512f", "avx512_vnni", "avx_vnni", "avx512_bf16", "amx_tile", "amx_int8")


def speed_flags() -> list[str]:
    """Which of SPEED_FLAGS this CPU has."""
    from sdc_runtime.neural import cpu_flags

    return [f for f in SPEED_FLAGS if f in cpu_flags()]


def report(result: dict, table: str, json_path: str | None) -> int:
    """Write ``result`` as JSON where asked, print its markdown ``table``: the end of a timing bench."""
    if json_path:
        with open(json_path, "w") as fh:
            json.dump(result, fh, indent=1)
    print(table)
    return 0


def add_run_options(parser, out: str, main) -> None:
    """What every folder-writing bench's parser ends with: ONNX Runtime's threads, the output
    folder, and the function that runs it."""
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--out", default=out, help=f"output folder (default {out})")
    parser.set_defaults(run=main)


def save_json(result: dict, folder: str, name: str) -> None:
    """``result`` as ``folder/name``, the folder made where it is missing."""
    os.makedirs(folder, exist_ok=True)
    with open(os.path.join(folder, name), "w") as fh:
        json.dump(result, fh, indent=1)


def save_summary(result: dict, text: str, folder: str, json_name: str, markdown_name: str = "summary.md") -> int:
    """The end of a folder-writing bench: ``result`` as JSON and its markdown ``text`` in
    ``folder``, and the text printed."""
    save_json(result, folder, json_name)
    with open(os.path.join(folder, markdown_name), "w") as fh:
        fh.write(text + "\n")
    print(text)
    return 0
