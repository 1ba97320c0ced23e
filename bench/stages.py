"""sdc-bench stages: time every stage of the codec at one image size, medians over repeats.

With --torch-src (a diffusers folder of the same weights) the same neural stages are timed in
PyTorch in the same run, and the table gives ONNX Runtime's time as a ratio to PyTorch's.
"""
from __future__ import annotations

import os

import numpy as np

from sdc_runtime.errors import SdcUsageError

from .timing import machine, median_seconds, report


def _image(path: str | None, size: int):
    from PIL import Image

    if path:
        image = Image.open(path).convert("RGB")
        side = min(image.size)
        return image.crop((0, 0, side, side)).resize((size, size), Image.LANCZOS)
    y, x = np.mgrid[0:size, 0:size]
    return Image.fromarray(np.stack([x % 256, y % 256, (x + y) // 2 % 256], -1).astype(np.uint8))


def run(args) -> dict:
    from tqdm import tqdm

    from sdc_runtime import SdcCodec, sdc_decode, sdc_info
    from sdc_runtime.image import pad_to, to_graph_input, to_picture
    from sdc_runtime.latent import build_palette, lookup, nearest, to_level_space
    from sdc_runtime.neural import denoise_timesteps

    codec = SdcCodec(args.models, provider=args.provider, threads=args.threads)
    m = codec.manifest
    image = _image(args.image, args.size)
    rgb = to_picture(image).rgb
    pixels, size = pad_to(rgb, m.downscale), (rgb.shape[1], rgb.shape[0])
    rows: dict[str, dict] = {}
    # The UNet timesteps a default decode of this model set runs.
    timesteps = denoise_timesteps(m.defaults.denoise_steps, m.defaults.denoise_stride) if "unet" in m.graphs else []
    tasks = ["vae_encoder", "latent coding (palette)", "latent coding (u8)", "latent decoding (palette)",
             "palette lookup", "vae_decoder"] + (["tiny_decoder"] if "tiny_decoder" in m.graphs else []) \
        + [f"unet step t={t}" for t in timesteps]
    bar = tqdm(total=len(tasks) + (2 + len(timesteps) if args.torch_src else 0), desc="stages", unit="stage")

    def record(name, seconds, torch_seconds=None):
        rows.setdefault(name, {})["onnx_s"] = seconds
        if torch_seconds is not None:
            rows[name]["torch_s"] = torch_seconds
        bar.update(1)

    raw = codec.stages.encode(pixels)
    record("vae_encoder", median_seconds(lambda: codec.stages.encode(pixels), args.repeat))
    latent = raw[0]
    palette_options, u8_options = dict(mode="palette", colors=256, denoise_steps=0), dict(mode="u8", denoise_steps=0)
    palette_file = codec.encode_latent(latent, size, **palette_options)
    u8_file = codec.encode_latent(latent, size, **u8_options)
    fast = max(args.repeat, 20)  # the latent stages take milliseconds: more samples are cheap
    record("latent coding (palette)", median_seconds(
        lambda: codec.encode_latent(latent, size, **palette_options), fast))
    record("latent coding (u8)", median_seconds(lambda: codec.encode_latent(latent, size, **u8_options), fast))
    record("latent decoding (palette)", median_seconds(lambda: sdc_decode(palette_file), fast))
    # The decode-side lookup alone, for one palette group (SD: the whole latent).
    group = np.ascontiguousarray(to_level_space(latent, *codec.quant_mapping(latent))[:, :, :4])
    palette = build_palette(group.reshape(-1, group.shape[2]), 256)
    indices = nearest(group, palette)
    record("palette lookup", median_seconds(lambda: lookup(indices, palette), 200))
    record("vae_decoder", median_seconds(lambda: codec.stages.decode(raw), args.repeat))
    if "tiny_decoder" in m.graphs:
        record("tiny_decoder", median_seconds(lambda: codec.stages.decode(raw, decoder="tiny_decoder"), args.repeat))
    scaled = raw * np.float32(m.scaling_factor)
    for t in timesteps:
        step = np.array([t], np.float32)
        record(f"unet step t={t}", median_seconds(lambda step=step: codec.stages.predict(scaled, step), args.repeat))
    if args.int8:
        _time_int8(args, codec, pixels, raw, scaled, timesteps, rows)
    if args.torch_src:
        _time_torch(args, to_graph_input(pixels, m.graphs["vae_encoder"].image_range), raw, m, rows, bar, timesteps)
    bar.close()
    return {
        "machine": machine(), "provider": args.provider, "size": args.size, "models": os.path.abspath(args.models),
        "precision": sorted({g.precision for g in m.graphs.values()}), "repeat": args.repeat,
        "bytes": {"palette": len(palette_file), "u8": len(u8_file)},
        "sections": {"palette": sdc_info(palette_file)["sections"], "u8": sdc_info(u8_file)["sections"]},
        "stages": rows,
    }


def _time_int8(args, codec, pixels, raw, scaled, timesteps, rows):
    """The same neural stages with the int8 graphs of ``args.int8``, a set of the same
    checkpoint (same fingerprint), where it has them; and each graph file's size ratio."""
    from sdc_runtime import SdcCodec

    int8 = SdcCodec(args.int8, provider=args.provider, threads=args.threads)
    if int8.manifest.fingerprint != codec.manifest.fingerprint:
        raise SdcUsageError("--int8 must be a set of the same checkpoint as --models")
    graphs = int8.manifest.graphs
    stages = {"vae_encoder": lambda: int8.stages.encode(pixels),
              "vae_decoder": lambda: int8.stages.decode(raw),
              "tiny_decoder": lambda: int8.stages.decode(raw, decoder="tiny_decoder")}
    for role, fn in stages.items():
        if role in graphs and graphs[role].precision == "int8":
            rows[role]["int8_s"] = median_seconds(fn, args.repeat)
    if "unet" in graphs and graphs["unet"].precision == "int8":
        for t in timesteps:
            step = np.array([t], np.float32)
            rows[f"unet step t={t}"]["int8_s"] = median_seconds(
                lambda step=step: int8.stages.predict(scaled, step), args.repeat)
    for role, graph in graphs.items():
        if graph.precision == "int8" and role in codec.manifest.graphs:
            def size(folder, file):
                path = os.path.join(folder, file)
                return os.path.getsize(path) + (os.path.getsize(path + ".data") if os.path.exists(path + ".data") else 0)
            ratio = size(args.int8, graph.file) / size(args.models, codec.manifest.graphs[role].file)
            for name in rows:
                if name == role or (role == "unet" and name.startswith("unet step")):
                    rows[name]["int8_size_ratio"] = ratio


def _time_torch(args, pixels, latent, manifest, rows, bar, timesteps):
    """The same neural stages in PyTorch: the modules the set's graphs were exported from."""
    import torch

    if args.threads:
        torch.set_num_threads(args.threads)
    from sdc_export.modelset import source_modules

    # The export's own modules: the UNet conditioned on the same "" the model set baked in.
    modules = source_modules(args.torch_src)
    encode, decode, unet = modules["vae_encoder"], modules["vae_decoder"], modules.get("unet")
    image_t, latent_t = torch.from_numpy(pixels), torch.from_numpy(latent)
    with torch.inference_mode():
        rows["vae_encoder"]["torch_s"] = median_seconds(lambda: encode(image_t), args.repeat)
        bar.update(1)
        rows["vae_decoder"]["torch_s"] = median_seconds(lambda: decode(latent_t), args.repeat)
        bar.update(1)
        if timesteps and unet is not None:
            scaled = latent_t * manifest.scaling_factor
            for t in timesteps:
                rows[f"unet step t={t}"]["torch_s"] = median_seconds(
                    lambda t=t: unet(scaled, torch.tensor([float(t)])), args.repeat)
                bar.update(1)


def markdown(result: dict) -> str:
    lines = [f"Machine: {result['machine']}; provider {result['provider']}; {result['size']}x{result['size']};"
             f" precision {', '.join(result['precision'])}; medians of {result['repeat']} runs"
             " (latent stages: at least 20).", "",
             "| stage | ONNX Runtime | PyTorch | ratio (ORT / PyTorch) | ORT int8 | int8 speed-up over ORT"
             " | int8 file / fp32 file |", "| --- | --- | --- | --- | --- | --- | --- |"]

    def seconds(value):
        return "–" if value is None else f"{value * 1e3:.2f} ms" if value < 1 else f"{value:.2f} s"

    for name, row in result["stages"].items():
        onnx_s, torch_s, int8_s = row["onnx_s"], row.get("torch_s"), row.get("int8_s")
        vs_torch = f"{onnx_s / torch_s:.2f}" if torch_s else "–"
        speed_up = f"{onnx_s / int8_s:.2f}x" if int8_s else "–"
        size = f"{row['int8_size_ratio']:.2f}" if "int8_size_ratio" in row else "–"
        lines.append(f"| {name} | {seconds(onnx_s)} | {seconds(torch_s)} | {vs_torch} | {seconds(int8_s)} |"
                     f" {speed_up} | {size} |")
    lines += ["", "| mode | file bytes | sections |", "| --- | --- | --- |"]
    for mode, size in result["bytes"].items():
        sections = ", ".join(f"{k} {v['bytes']}" for k, v in result["sections"][mode].items())
        lines.append(f"| {mode} | {size} | {sections} |")
    return "\n".join(lines)


def add_parser(sub):
    from .int8 import add_weight_bits_option

    p = sub.add_parser("stages", help="time each codec stage (medians)")
    p.add_argument("--models", required=True, help="model set")
    p.add_argument("--image", default=None, help="image to crop/resize to SIZE (default: synthetic)")
    p.add_argument("--size", type=int, default=512)
    p.add_argument("--repeat", type=int, default=3)
    p.add_argument("--provider", default="cpu")
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--torch-src", default=None,
                   help="the export's source (diffusers folder or TAESD-format pair): time PyTorch too")
    p.add_argument("--int8", default=None, metavar="DIR",
                   help="an int8 set of the same checkpoint (sdc-export --int8): time its int8 graphs too")
    p.add_argument("--quantize", default=None, metavar="GRAPHS",
                   help="instead of --int8: quantize these graphs of --models into a scratch copy (the export's"
                        " code, without its parity gate: speed does not depend on the weights) and time that")
    p.add_argument("--calibration", default=None, metavar="DIR", help="with --quantize: calibration images")
    p.add_argument("--keep", default=None, metavar="DIR", help="with --quantize: keep the int8 set here")
    add_weight_bits_option(p)
    p.add_argument("--json", default=None, help="write the raw result here")
    p.set_defaults(run=_main)


def _quantized_copy(args) -> str:
    import shutil

    from sdc_export.int8 import calibration_images, quantize_model_set

    if not args.calibration or not args.keep:
        raise SdcUsageError("--quantize needs --calibration DIR and --keep DIR")
    roles = tuple(r for r in args.quantize.split(",") if r)
    shutil.copytree(args.models, args.keep)
    # Neither the sweep nor the correction: the correction changes weights, scales and biases
    # only, and on a full-size UNet it is slow (second moments of up to 4608 inputs a layer).
    parity, _ = quantize_model_set(args.keep, roles, calibration_images(args.calibration, 3), sweep_nodes=False,
                                correct=False, weight_bits=args.int8_weight_bits)
    for p in parity:
        print(p.line(), "(uncorrected graph, timed for speed; the export's parity is after the correction)")
    return args.keep


def _main(args) -> int:
    if args.quantize:
        args.int8 = _quantized_copy(args)
    result = run(args)
    return report(result, markdown(result), args.json)
