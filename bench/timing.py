"""Median timing helpers shared by the benchmarks, and the way a timing bench reports."""
from __future__ import annotations

import json
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
    flags = cpu_flags()
    return (f"{cpu}, {os.cpu_count()} cores, {platform.system()} {platform.release()},"
            f" flags {' '.join(flags) if flags else 'none of ' + ' '.join(SPEED_FLAGS)}")


# The CPU features that decide int8 and fp32 speed in ONNX Runtime's kernels: VNNI (AVX-512 or
# AVX) does int8 dot products in one instruction, AMX in tiles.
SPEED_FLAGS = ("avx2", "fma", "avx512f", "avx512_vnni", "avx_vnni", "avx512_bf16", "amx_tile", "amx_int8")


def cpu_flags() -> list[str]:
    from sdc_runtime.neural import cpu_flags as all_flags

    return [f for f in SPEED_FLAGS if f in all_flags()]


def report(result: dict, table: str, json_path: str | None) -> int:
    """Write ``result`` as JSON where asked, print its markdown ``table``: the end of a timing bench."""
    if json_path:
        with open(json_path, "w") as fh:
            json.dump(result, fh, indent=1)
    print(table)
    return 0
