"""The main job end to end:

1. tiny random SD pipeline -> sdc-export (parity checked) -> encode/decode of a Kodak image (or
   a synthetic one where ../shared is absent).  The decoded image is noise because the weights
   are random; the sizes and the pipeline are real.
2. where ../shared/models/taef2 exists: the trained TAEF2 pair -> sdc-export -> encode/decode
   of the same image, with PSNR: real quality.

    python -m sdc_export.demo [--out models/demo]
"""
from __future__ import annotations

import os
import time

import numpy as np
from PIL import Image

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
KODAK_IMAGE = os.path.join(os.path.dirname(REPO), "shared", "data", "kodak", "kodim23.png")
TAEF2 = os.path.join(os.path.dirname(REPO), "shared", "models", "taef2")


def main(argv=None) -> int:
    from sdc_runtime import SdcCodec
    from sdc_runtime.tools import ToolParser

    from .cli import main as export_main
    from .tiny import make_random_sd

    parser = ToolParser(prog="python -m sdc_export.demo", description=__doc__.splitlines()[0])
    # Its own folder: the README's next commands write models/taef2 and must find it free.
    parser.add_argument("--out", default=os.path.join(REPO, "models", "demo"),
                        help="where to write (default models/demo/)")
    args = parser.parse_args(argv)
    os.makedirs(args.out, exist_ok=True)
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
    print(f"2. encode/decode {name} ({image.width}x{image.height}) with {model_set}")
    _round_trip(SdcCodec(model_set), image, name, args.out, "tiny-random")
    print("   The weights are random, so these decoded pictures are noise: quality needs a real checkpoint"
          " (sdc-export --model /path/to/sd-v1-5).")
    if os.path.isdir(TAEF2):
        taef2_set = os.path.join(args.out, "taef2")
        print(f"3. the trained TAEF2 autoencoder pair from {TAEF2}")
        if export_main(["--model", TAEF2, "--out", taef2_set, "--force"]) != 0:
            return 1
        _round_trip(SdcCodec(taef2_set), image, name, args.out, "taef2")
    return 0


def _round_trip(codec, image, name: str, out: str, label: str) -> None:
    from sdc_runtime import sdc_info
    from sdc_runtime.image import psnr

    original = np.asarray(image)
    for mode in ("palette", "u8"):
        started = time.perf_counter()
        data = codec.encode(image, mode=mode)
        encode_s = time.perf_counter() - started
        path = os.path.join(out, f"demo-{label}-{name}-{mode}.sdc")
        with open(path, "wb") as fh:
            fh.write(data)
        started = time.perf_counter()
        decoded = codec.decode(data)
        decode_s = time.perf_counter() - started
        decoded.save(path.replace(".sdc", ".png"))
        print(f"   {mode:8s} {len(data):7d} bytes  {sdc_info(data)['bpp']:.4f} bpp"
              f"  PSNR {psnr(original, np.asarray(decoded)):5.2f} dB"
              f"  encode {encode_s:.2f} s  decode {decode_s:.2f} s  -> {path}")


if __name__ == "__main__":
    raise SystemExit(main())
