"""The main job end to end, without real weights:

tiny random SD pipeline -> sdc-export (parity checked) -> sdc-runtime encode/decode of a Kodak
image (or a synthetic one where ../shared is absent).  The decoded image is noise because the
weights are random; the sizes and the pipeline are real.

    python -m sdc_export.demo [--out models]
"""
from __future__ import annotations

import argparse
import os
import time

import numpy as np
from PIL import Image

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
KODAK_IMAGE = os.path.join(os.path.dirname(REPO), "shared", "data", "kodak", "kodim23.png")


def main(argv=None) -> int:
    from sdc_runtime import SdcCodec, sdc_info

    from .cli import main as export_main
    from .tiny import make_random_sd

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default=os.path.join(REPO, "models"), help="where to write (default models/)")
    args = parser.parse_args(argv)
    source = make_random_sd(os.path.join(args.out, "tiny-random-diffusers"), preset="tiny")
    model_set = os.path.join(args.out, "tiny-random")
    print(f"1. random tiny SD pipeline written to {source}")
    if export_main(["--model", source, "--out", model_set, "--force"]) != 0:
        return 1
    if os.path.isfile(KODAK_IMAGE):
        image, name = Image.open(KODAK_IMAGE).convert("RGB"), "kodim23"
    else:
        y, x = np.mgrid[0:512, 0:768]
        image = Image.fromarray(np.stack([x / 3 % 256, y / 2 % 256, (x + y) / 5 % 256], -1).astype(np.uint8))
        name = "synthetic"
    codec = SdcCodec(model_set)
    print(f"2. encode/decode {name} ({image.width}x{image.height}) with {model_set}")
    for mode in ("palette", "u8"):
        started = time.perf_counter()
        data = codec.encode(image, mode=mode)
        encoded = time.perf_counter() - started
        path = os.path.join(args.out, f"demo-{name}-{mode}.sdc")
        with open(path, "wb") as fh:
            fh.write(data)
        started = time.perf_counter()
        decoded = codec.decode(data)
        decode_s = time.perf_counter() - started
        decoded.save(path.replace(".sdc", ".png"))
        bpp = sdc_info(data)["bpp"]
        print(f"   {mode:8s} {len(data):7d} bytes  {bpp:.4f} bpp  encode {encoded:.2f} s  decode {decode_s:.2f} s"
              f"  -> {path}")
    print("The weights are random, so the decoded pictures are noise: quality needs a real checkpoint"
          " (sdc-export --model /path/to/sd-v1-5).")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
