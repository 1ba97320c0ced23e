"""sdc-bench gpu: the CUDA execution provider against PyTorch on the same GPU, in one run.

For each model set (fp32 and fp16 exports of one checkpoint): each graph's parity under the
provider against the PyTorch module it was exported from (same input, the module in fp32 and,
where the set is fp16, in fp16), per-stage medians at each --sizes (tiled where the set's
memory budget says so), and the peak GPU memory of each (PyTorch's allocator; ONNX Runtime's
through NVML).  Then, as a user runs it, `sdc-runtime decode --provider` of a 12 MP file and
the default encode of a 768x512 image.  Rehearse it on the CPU (`--provider cpu --device cpu`);
bench/gpu_run.sh is the whole device run.
"""
from __future__ import annotations

import os
import subprocess
import sys
import tempfile
import time

import numpy as np

from .timing import machine, median_seconds, report


def add_parser(sub) -> None:
    p = sub.add_parser("gpu", help="the CUDA provider against PyTorch CUDA: parity, stage medians, memory")
    p.add_argument("--models", required=True, nargs="+", help="model sets of one checkpoint (fp32, fp16)")
    p.add_argument("--torch-src", required=True, help="the checkpoint the sets were exported from")
    p.add_argument("--provider", default="cuda", help="ONNX Runtime provider (cpu to rehearse)")
    p.add_argument("--device", default="cuda", help="PyTorch device (cpu to rehearse)")
    p.add_argument("--sizes", default="512,2048", help="image sides of the stage medians")
    p.add_argument("--repeat", type=int, default=5)
    p.add_argument("--photo", default=None, help="a 12 MP image for the end-to-end decode (default: none)")
    p.add_argument("--json", default=None, help="write the raw result here")
    p.set_defaults(run=_main)


class _Device:
    """Synchronised timing and memory peaks of one PyTorch device (CUDA or the CPU)."""

    def __init__(self, name: str):
        import torch

        self.torch, self.name = torch, name
        self.cuda = name.startswith("cuda")

    def sync(self) -> None:
        if self.cuda:
            self.torch.cuda.synchronize()

    def reset_peak(self) -> None:
        if self.cuda:
            self.torch.cuda.reset_peak_memory_stats()

    def peak_mb(self) -> float | None:
        return round(self.torch.cuda.max_memory_allocated() / 2 ** 20) if self.cuda else None

    def describe(self) -> str:
        if not self.cuda:
            return "cpu"
        props = self.torch.cuda.get_device_properties(0)
        driver = _nvidia_smi("driver_version")
        return f"{props.name}, {props.total_memory >> 20} MiB, driver {driver}"


def _nvidia_smi(field: str) -> str | None:
    try:
        out = subprocess.run(["nvidia-smi", f"--query-gpu={field}", "--format=csv,noheader,nounits"],
                             capture_output=True, text=True, timeout=20)
        return out.stdout.strip().splitlines()[0] if out.returncode == 0 and out.stdout.strip() else None
    except (OSError, subprocess.TimeoutExpired):
        return None


def _gpu_used_mb() -> float | None:
    used = _nvidia_smi("memory.used")
    return float(used) if used else None


def _inputs(role: str, manifest, side: int, rng) -> list[np.ndarray]:
    f, c = manifest.downscale, manifest.latent_channels
    image = (rng.random((1, 3, side, side)) * 2 - 1).astype(np.float32)
    latent = rng.standard_normal((1, c, side // f, side // f)).astype(np.float32)
    return {"vae_encoder": [image], "vae_decoder": [latent], "tiny_decoder": [latent],
            "decoder_gradient": [latent, image.clip(0, 1), np.ones((1, 1, side, side), np.float32)],
            "unet": [latent, np.array([15.0], np.float32)]}[role]


def _parity(codec, modules, device: _Device, side: int, rng) -> dict:
    """Each graph under the provider against its module (fp32, and fp16 for an fp16 graph)."""
    from sdc_export.int8.sweep import snr_db

    torch = device.torch
    rows = {}
    for role, graph in codec.manifest.graphs.items():
        if role not in modules:
            continue
        feeds = _inputs(role, codec.manifest, side, rng)
        ours = codec.stages._run(graph.file, *feeds)
        module = modules[role].to(device.name).eval()
        dtype = torch.float16 if graph.precision == "fp16" and device.cuda else torch.float32
        with torch.no_grad():
            theirs = module.to(dtype)(*[torch.from_numpy(x).to(device.name, dtype) for x in feeds])
        if isinstance(theirs, tuple):  # the decoder gradient's error rides along: its gradient is compared
            theirs = theirs[0]
        theirs = theirs.float().cpu().numpy()
        module.float()
        scale = float(np.abs(theirs).max()) or 1.0
        error = float(np.abs(ours - theirs).max())
        rows[role] = {"precision": graph.precision, "torch_dtype": str(dtype).split(".")[-1],
                      "max_abs_error": error, "max_rel_error": error / scale, "snr_db": snr_db([theirs], [ours])}
    return rows


def _stages(codec, modules, device: _Device, side: int, repeat: int, rng) -> dict:
    """Medians of the neural stages at ``side``: ONNX Runtime through the codec's stages (tiled
    as the set's budget says), PyTorch fp32 and, on a GPU, fp16; and the peaks of each."""
    torch = device.torch
    m = codec.manifest
    pixels = (rng.random((side, side, 3)) * 255).astype(np.uint8)
    latent = codec.stages.encode(pixels)
    scaled = latent * np.float32(m.scaling_factor)
    ort = {"vae_encoder": lambda: codec.stages.encode(pixels), "vae_decoder": lambda: codec.stages.decode(latent)}
    if "unet" in m.graphs:
        ort["unet step"] = lambda: codec.stages.predict(scaled, np.array([15.0], np.float32))
    rows = {}
    for name, run in ort.items():
        before = _gpu_used_mb() if device.cuda else None
        rows[name] = {"onnx_s": median_seconds(run, repeat)}
        after = _gpu_used_mb() if device.cuda else None
        if before is not None and after is not None:
            rows[name]["onnx_gpu_mb_held"] = after - before
    feeds = {"vae_encoder": _inputs("vae_encoder", m, side, rng), "vae_decoder": [latent],
             "unet step": [scaled, np.array([15.0], np.float32)]}
    dtypes = [torch.float32] + ([torch.float16] if device.cuda else [])
    for name in rows:
        module = modules[name.replace(" step", "")].to(device.name).eval()
        for dtype in dtypes:
            tensors = [torch.from_numpy(x).to(device.name, dtype) for x in feeds[name]]
            module.to(dtype)
            device.reset_peak()

            def run():
                with torch.no_grad():
                    module(*tensors)
                device.sync()
            try:
                seconds = median_seconds(run, repeat)
            except RuntimeError as exc:  # out of memory: PyTorch has no tiles
                seconds = f"failed: {str(exc).splitlines()[0][:80]}"
            key = "torch_fp16" if dtype == torch.float16 else "torch_fp32"
            rows[name][f"{key}_s"] = seconds
            rows[name][f"{key}_peak_mb"] = device.peak_mb()
        module.float().cpu()
        if device.cuda:
            torch.cuda.empty_cache()
    return rows


def _end_to_end(models: str, provider: str, photo: str | None) -> dict:
    """As a user runs it: the default encode of a 768x512 image, and a 12 MP decode."""
    from PIL import Image

    rows = {}
    scratch = tempfile.mkdtemp(prefix="sdc-gpu-bench-")
    image = os.path.join(scratch, "768x512.png")
    y, x = np.mgrid[0:512, 0:768]
    Image.fromarray(np.stack([x % 256, y % 256, (x + y) // 3 % 256], -1).astype(np.uint8)).save(image)
    runs = [("encode 768x512 (default options)", ["encode", image, os.path.join(scratch, "a.sdc")])]
    if photo:
        runs += [("encode 12 MP (effort 0)", ["encode", photo, os.path.join(scratch, "p.sdc"), "--effort", "0"]),
                 ("decode 12 MP", ["decode", os.path.join(scratch, "p.sdc"), os.path.join(scratch, "p.png")])]
    for name, args in runs:
        started = time.perf_counter()
        result = subprocess.run([sys.executable, "-m", "sdc_runtime.cli", *args, "--models", models,
                                 "--provider", provider], capture_output=True, text=True)
        rows[name] = {"seconds": round(time.perf_counter() - started, 2), "exit": result.returncode,
                      "stderr": result.stderr.strip()[-300:]}
    return rows


def _main(args) -> int:
    from sdc_runtime import SdcCodec

    device = _Device(args.device)
    sizes = [int(s) for s in args.sizes.split(",")]
    rng = np.random.default_rng(0)
    from sdc_export.modelset import source_modules

    modules = source_modules(args.torch_src)
    result = {"machine": machine(), "device": device.describe(), "provider": args.provider, "sets": {}}
    for models in args.models:
        codec = SdcCodec(models, provider=args.provider)
        precision = sorted({g.precision for g in codec.manifest.graphs.values()})
        entry = {"precision": precision, "parity": _parity(codec, modules, device, 256, rng), "stages": {}}
        for side in sizes:
            entry["stages"][side] = _stages(codec, modules, device, side, args.repeat, rng)
        result["sets"][models] = entry
    result["end_to_end"] = _end_to_end(args.models[0], args.provider, args.photo)
    return report(result, markdown(result), args.json)


def markdown(result: dict) -> str:
    def seconds(value):
        return value if isinstance(value, str) else "–" if value is None else f"{value * 1e3:.1f} ms"

    lines = [f"Machine: {result['machine']}; device: {result['device']}; provider {result['provider']}", ""]
    for models, entry in result["sets"].items():
        lines += [f"Set {os.path.basename(models.rstrip('/'))} ({', '.join(entry['precision'])}):", "",
                  "| graph | precision | vs PyTorch | max rel error | SNR dB |", "| --- | --- | --- | --- | --- |"]
        for role, row in entry["parity"].items():
            lines.append(f"| {role} | {row['precision']} | {row['torch_dtype']} | {row['max_rel_error']:.2e} |"
                         f" {row['snr_db']:.1f} |")
        lines += ["", "| side | stage | ORT | PyTorch fp32 | PyTorch fp16 | ORT / PyTorch fp16 |",
                  "| --- | --- | --- | --- | --- | --- |"]
        for side, rows in entry["stages"].items():
            for name, row in rows.items():
                fp16 = row.get("torch_fp16_s")
                ratio = f"{row['onnx_s'] / fp16:.2f}" if isinstance(fp16, float) else "–"
                lines.append(f"| {side} | {name} | {seconds(row['onnx_s'])} | {seconds(row.get('torch_fp32_s'))} |"
                             f" {seconds(fp16)} | {ratio} |")
        lines.append("")
    lines += ["| end to end | s | exit |", "| --- | --- | --- |"]
    lines += [f"| {name} | {row['seconds']} | {row['exit']} |" for name, row in result["end_to_end"].items()]
    return "\n".join(lines)


if __name__ == "__main__":  # for a device without the console scripts installed
    from .cli import main

    sys.exit(main(["gpu", *sys.argv[1:]]))
