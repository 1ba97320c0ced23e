"""sdc-bench coder: the latent coder's bytes at equal quality, against today's coders.

For every image and quality of the scale, three files of the same model set: today's coders
alone (DEFLATE or LZMA2, the levels rounded to nearest), the context coder on those same
levels (coder 3: same PSNR, fewer bytes), and the context coder with rate-aware rounding
(``--deadzone``, the encoder's default).  BD-rate (Bjøntegaard, Akima) of the latter two
against the first, per image and mean; PSNR at each quality; with ``--photo``, the entropy
stage's decode time on that photo's latent (sdc_decode: container, coder, levels).
"""
from __future__ import annotations

import os

import numpy as np

from .timing import add_run_options, machine, median_seconds, save_summary

QUALITIES = (20, 30, 40, 50, 60, 70, 80)


def todays_coders(data: bytes) -> bytes:
    """The same file with its latent section coded as before coder 3: the smaller of DEFLATE
    and LZMA2 (the levels, and so the image, unchanged)."""
    from sdc_runtime import container, entropy
    from sdc_runtime.bitstream import sdc_decode

    header, sections = container.unpack(data)
    _, levels = sdc_decode(data)
    kept = []
    for section in sections:
        if section.kind == container.SECTION_LATENT:
            coder, payload = entropy.encode(levels.ravel(), alphabet_size=256)
            section = container.Section(section.kind, coder, section.raw_length, payload)
        kept.append(section)
    return container.pack(header, kept)


def run(args) -> dict:
    import bjontegaard
    from PIL import Image
    from tqdm import tqdm

    from sdc_runtime import SdcCodec, container, sdc_info
    from sdc_runtime.image import psnr

    codec = SdcCodec(args.models, threads=args.threads)
    names = sorted(n for n in os.listdir(args.images) if n.lower().endswith((".png", ".jpg", ".ppm")))[:args.count]
    rows, curves = [], {}
    bar = tqdm(total=len(names) * len(args.qualities), desc="coder", unit="file")
    for name in names:
        image = Image.open(os.path.join(args.images, name)).convert("RGB")
        pixels = np.asarray(image)
        curve = {"today": [], "context": [], "deadzone": []}
        for quality in args.qualities:
            nearest = codec.encode(image, quality=quality, effort=args.effort, deadzone=0)
            default = codec.encode(image, quality=quality, effort=args.effort, deadzone=args.deadzone)
            same = psnr(pixels, np.asarray(codec.decode(nearest)))
            files = {"today": (todays_coders(nearest), same), "context": (nearest, same),
                     "deadzone": (default, psnr(pixels, np.asarray(codec.decode(default))))}
            for kind, (data, quality_db) in files.items():
                curve[kind].append((len(data), quality_db))
            coders = {s["coder"] for s in sdc_info(nearest)["sections"].values()}
            rows.append({"image": name, "quality": quality, **{f"{k}_bytes": len(d) for k, (d, _) in files.items()},
                         "psnr": same, "deadzone_psnr": files["deadzone"][1], "coders": sorted(coders)})
            bar.update(1)
        curves[name] = curve
    bar.close()
    bd = {}
    for kind in ("context", "deadzone"):
        per_image = {}
        for name, curve in curves.items():
            (r0, p0), (r1, p1) = zip(*curve["today"]), zip(*curve[kind])
            try:
                per_image[name] = float(bjontegaard.bd_rate(list(r0), list(p0), list(r1), list(p1), method="akima",
                                                            min_overlap=0))
            except ValueError:  # a curve whose PSNR does not rise with the bytes (random weights) has none
                per_image[name] = None
        measured = [v for v in per_image.values() if v is not None]
        bd[kind] = {"per_image": per_image, "mean": float(np.mean(measured)) if measured else None}
    result = {"machine": machine(), "models": os.path.abspath(args.models), "effort": args.effort,
              "qualities": list(args.qualities), "rows": rows, "bd_rate": bd}
    if args.photo:
        data = codec.encode(Image.open(args.photo).convert("RGB"), quality=args.photo_quality, effort=0)
        header, sections = container.unpack(data)
        from sdc_runtime import sdc_decode

        result["photo"] = {"path": os.path.abspath(args.photo), "bytes": len(data), "quality": args.photo_quality,
                           "latent": [header.latent_channels, header.latent_height, header.latent_width],
                           "coder": sdc_info(data)["sections"]["latent"]["coder"],
                           "entropy_decode_s": median_seconds(lambda: sdc_decode(data), 3)}
    return result


def markdown(result: dict) -> str:
    lines = [f"Machine: {result['machine']}; effort {result['effort']}; qualities {result['qualities']}.", "",
             "| image | coder 3 alone: BD-rate | coder 3 + rate-aware rounding: BD-rate |", "| --- | --- | --- |"]
    bd = result["bd_rate"]

    def percent(value):
        return "–" if value is None else f"{value:+.2f}%"

    for name in bd["context"]["per_image"]:
        lines.append(f"| {name} | {percent(bd['context']['per_image'][name])} |"
                     f" {percent(bd['deadzone']['per_image'][name])} |")
    lines.append(f"| **mean** | **{percent(bd['context']['mean'])}** | **{percent(bd['deadzone']['mean'])}** |")
    lines += ["", "| quality | mean bytes, today's coders | coder 3 | coder 3 + rounding | PSNR (nearest) |"
              " PSNR (rate-aware) |", "| --- | --- | --- | --- | --- | --- |"]
    for quality in result["qualities"]:
        at = [r for r in result["rows"] if r["quality"] == quality]
        mean = {key: np.mean([r[key] for r in at]) for key in ("today_bytes", "context_bytes", "deadzone_bytes",
                                                                "psnr", "deadzone_psnr")}
        lines.append(f"| Q{quality} | {mean['today_bytes']:.0f} | {mean['context_bytes']:.0f}"
                     f" ({mean['context_bytes'] / mean['today_bytes'] - 1:+.1%}) | {mean['deadzone_bytes']:.0f}"
                     f" ({mean['deadzone_bytes'] / mean['today_bytes'] - 1:+.1%}) | {mean['psnr']:.2f} dB |"
                     f" {mean['deadzone_psnr']:.2f} dB |")
    if "photo" in result:
        p = result["photo"]
        lines += ["", f"Photo {os.path.basename(p['path'])}: latent {'x'.join(map(str, p['latent']))}, {p['bytes']}"
                      f" bytes at Q{p['quality']} ({p['coder']}); entropy stage decode (sdc_decode) median"
                      f" {p['entropy_decode_s']:.2f} s."]
    return "\n".join(lines)


def _main(args) -> int:
    result = run(args)
    return save_summary(result, markdown(result), args.out, "coder.json", "coder.md")


def add_parser(sub):
    p = sub.add_parser("coder", help="the latent coder's BD-rate against today's coders (bytes at equal PSNR)")
    p.add_argument("--models", required=True, help="model set")
    p.add_argument("--images", required=True, help="folder of images (e.g. ../shared/data/kodak)")
    p.add_argument("--count", type=int, default=24, help="the first N images (default 24)")
    p.add_argument("--qualities", type=lambda s: tuple(int(q) for q in s.split(",")), default=QUALITIES,
                   help="comma-separated qualities (default 20..80 by 10)")
    p.add_argument("--effort", type=int, default=0)
    p.add_argument("--deadzone", type=float, default=0.05, help="the rate-aware rounding measured (default 0.05)")
    p.add_argument("--photo", default=None, help="also time the entropy stage's decode on this photo's latent")
    p.add_argument("--photo-quality", type=int, default=60)
    add_run_options(p, "bench-out/coder", _main)
