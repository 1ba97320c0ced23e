"""sdc-bench photo: one photo through the codec as `sdc-runtime` runs it, timed stage by stage.

Each stage's time is read from the codec's own progress reports (from a stage's start to the
next stage's), so the record says which stage costs what; wall and CPU seconds and the peak
memory (VmHWM: run one configuration per process, as the CLI does) come with it.
"""
from __future__ import annotations

import os
import resource
import time
from collections import defaultdict

from .timing import machine, report


def add_parser(sub) -> None:
    p = sub.add_parser("photo", help="one photo's encode or decode, per stage, with peak memory")
    p.add_argument("--models", required=True, help="model set")
    p.add_argument("--image", required=True, help="the photo (any format Pillow reads), or a .sdc file with --decode")
    p.add_argument("--effort", type=int, default=None, help="encoder effort (default: the set's)")
    p.add_argument("--decode", action="store_true", help="time the decode of IMAGE, a .sdc file")
    p.add_argument("--memory-limit", type=int, default=None, metavar="BYTES", help="the codec's memory limit")
    p.add_argument("--save", default=None, metavar="FILE", help="write the encoded file here")
    p.add_argument("--json", default=None, help="write the raw result here")
    p.set_defaults(run=_main)


def _main(args) -> int:
    from sdc_runtime import SdcCodec
    from sdc_runtime.image import load_image

    codec = SdcCodec(args.models, **({} if args.memory_limit is None else {"memory_limit": args.memory_limit}))
    stages: dict[str, float] = defaultdict(float)
    clock = {"stage": "start", "at": time.perf_counter()}

    def progress(stage: str, done: int, total: int) -> None:
        now = time.perf_counter()
        stages[clock["stage"]] += now - clock["at"]
        clock.update(stage=stage, at=now)

    started, cpu = time.perf_counter(), os.times()
    if args.decode:
        with open(args.image, "rb") as fh:
            codec.decode(fh.read(), progress=progress)
        pixels = None
    else:
        image = load_image(args.image, max_pixels=codec.max_pixels)
        pixels = image.width * image.height
        data = codec.encode(image, progress=progress, **({} if args.effort is None else {"effort": args.effort}))
        if args.save:
            with open(args.save, "wb") as fh:
                fh.write(data)
    progress("end", 0, 0)
    wall, after = time.perf_counter() - started, os.times()
    result = {"machine": machine(), "models": args.models, "image": args.image, "decode": args.decode,
              "effort": args.effort, "pixels": pixels, "wall_s": round(wall, 1),
              "cpu_s": round(after.user + after.system - cpu.user - cpu.system, 1),
              "peak_rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024),
              "stages_s": {name: round(seconds, 1) for name, seconds in stages.items() if name != "start"}}
    lines = [f"| {name} | {seconds:.1f} |" for name, seconds in result["stages_s"].items()]
    table = (f"{'decode' if args.decode else 'encode'} {args.image}: {result['wall_s']} s wall,"
             f" {result['cpu_s']} s CPU, peak {result['peak_rss_mb']} MB\n\n| stage | s |\n| --- | --- |\n"
             + "\n".join(lines))
    return report(result, table, args.json)
