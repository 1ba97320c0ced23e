"""sdc-export --model SRC --out DIR [--fp16 [--keep-fp32 GRAPHS] [--fp32-fallback]]
[--int8 [GRAPHS] --calibration DIR [--calibration-count N] [--int8-weight-bits 7|8]]
[--tiny-decoder DIR] [--scaling-factor S [--shift-factor T]] [--latent-space SET] [--opset N] [--force]"""
from __future__ import annotations

import sys
import time

from sdc_runtime.errors import SdcUsageError
from sdc_runtime.extras import require_extra
from sdc_runtime.manifest import load_manifest
from sdc_runtime.progress import StageBars
from sdc_runtime.tools import ToolParser, run_tool

from . import DEFAULT_OPSET, __version__

PROG = "sdc-export"


def build_parser() -> ToolParser:
    from .int8 import calibration_side

    p = ToolParser(prog=PROG, description="Export a Stable Diffusion checkpoint to an sdcodec ONNX model set.")
    p.add_argument("--model", required=True, metavar="SRC",
                   help="a diffusers Stable Diffusion 1.x/2.x or SDXL folder or hub id (honours HF_HUB_OFFLINE);"
                        " a VAE alone: a folder with only vae/ (SD3, FLUX.1, FLUX.2 and other pipelines give their"
                        " VAE) or with config.json at its root (sd-vae-ft-mse, sdxl-vae); or a folder with a"
                        " TAESD-format *_encoder.pth / *_decoder.pth pair")
    p.add_argument("--out", required=True, metavar="DIR", help="model-set folder to write")
    p.add_argument("--fp16", action="store_true", help="fp16 weights and compute (fp32 I/O)")
    p.add_argument("--keep-fp32", default="", metavar="GRAPHS",
                   help="with --fp16: these graphs stay fp32, e.g. vae_decoder for a VAE that overflows fp16")
    p.add_argument("--fp32-fallback", action="store_true",
                   help="with --fp16: also ship each decoder in fp32, which the runtime runs where the fp16 "
                        "decoder's output is not finite")
    p.add_argument("--int8", nargs="?", const="default", default=None, metavar="GRAPHS",
                   help="quantize these graphs to int8 (static, QDQ, per-channel weights), e.g. vae_decoder,unet;"
                        " alone: the decoders, which measured safe (README: choosing a precision)")
    p.add_argument("--calibration", metavar="DIR", default=None,
                   help="with --int8: a folder of images (photos like the ones to compress) to calibrate on")
    p.add_argument("--calibration-count", type=int, default=8, metavar="N",
                   help="with --int8: calibrate on the first N images of DIR (at least 3), the last held out"
                        " for parity (default 8)")
    p.add_argument("--calibration-side", type=calibration_side, default=None, metavar="N",
                   help="with --int8: calibrate on centre crops of N pixels (default 256; 0: whole images, a"
                        " slower export)")
    p.add_argument("--int8-weight-bits", type=int, default=None, metavar="N",
                   help="with --int8: weights in 7 bits (default), which every x86 CPU runs on its fast"
                        " int8 kernels, or 8, a little closer to fp32, which only CPUs with VNNI or AMX run"
                        " fast (the others run slower exact kernels; README: choosing a precision)")
    p.add_argument("--no-sweep", action="store_true",
                   help="with --int8: skip the sensitivity sweep that keeps the costliest nodes in float"
                        " (a faster export: one quantization per graph instead of one per block)")
    p.add_argument("--no-fuse-attention", action="store_true",
                   help="keep attention as plain ONNX ops instead of ONNX Runtime's fused MultiHeadAttention:"
                        " for int8 sets that will run on the OpenVINO EP, whose 1.24 release fails on a fused"
                        " attention among int8 nodes")
    p.add_argument("--opset", type=int, default=DEFAULT_OPSET, help=f"ONNX opset (default {DEFAULT_OPSET})")
    p.add_argument("--tiny-decoder", metavar="DIR", default=None,
                   help="SD, SDXL and VAE sets: also ship this TAESD-format decoder (of the same latent space)"
                        " as a fast alternative decoder")
    p.add_argument("--decoder-gradient", action="store_true",
                   help="also ship the VAE decoder's gradient graph (fp32, about twice the decoder's weights),"
                        " so that efforts from 1 descend on files without UNet steps (TAESD-format pairs always"
                        " ship it)")
    p.add_argument("--scaling-factor", type=float, default=None, metavar="S",
                   help="a VAE alone: its latents' scaling factor, for VAEs whose config has none"
                        " (SD 1.x/2.x 0.18215, SDXL 0.13025, SD3 1.5305, FLUX.1 0.3611)")
    p.add_argument("--shift-factor", type=float, default=None, metavar="T",
                   help="a VAE alone: its latents' shift factor (default: its config's, else 0; SD3 0.0609,"
                        " FLUX.1 0.1159)")
    p.add_argument("--latent-space", metavar="SET", default=None,
                   help="a TAESD-format pair: join the latent space of this VAE-only model set, so that files"
                        " written with either set decode with the other")
    p.add_argument("--revision", default=None, help="hub revision (branch, tag or commit)")
    p.add_argument("--force", action="store_true", help="replace a non-empty DIR")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.add_argument("--version", action="version", version=f"{PROG} {__version__}")
    return p


def run(args, int8_recipe=None) -> int:
    from .inputs import classify_source, prepare_output
    from .plan import SD_ROLES, TAE_ROLES, VAE_ROLES, plan_from_args

    src = classify_source(args.model)
    if src.kind == "tae" and args.tiny_decoder:
        raise SdcUsageError("--tiny-decoder applies to Stable Diffusion and VAE exports, not to a TAESD-format pair")
    if src.kind != "vae" and (args.scaling_factor is not None or args.shift_factor is not None):
        raise SdcUsageError("--scaling-factor and --shift-factor apply to a VAE alone")
    if src.kind != "tae" and args.latent_space:
        raise SdcUsageError("--latent-space applies to a TAESD-format pair")
    if src.kind == "tae" and args.decoder_gradient:
        raise SdcUsageError("--decoder-gradient applies to Stable Diffusion and VAE exports: TAESD-format pairs"
                            " always ship it")
    roles = ({"tae": TAE_ROLES, "vae": VAE_ROLES}.get(src.kind, SD_ROLES) + (("tiny_decoder",) if args.tiny_decoder
                                                                             else ())
             + (("decoder_gradient",) if args.decoder_gradient else ()))
    plan = plan_from_args(args, roles, *([int8_recipe] if int8_recipe is not None else []))
    if args.latent_space:
        load_manifest(args.latent_space)  # a model set, or one line now
    prepare_output(args.out, args.force)  # fail before the slow load
    # Only now the imports of torch and the exporters (seconds): every check above answers at once.
    from .modelset import export_stable_diffusion, export_tae, export_vae
    from .sources import load_stable_diffusion, load_vae

    started = time.perf_counter()
    progress = StageBars(not args.quiet)
    try:
        if src.kind == "tae":
            report = export_tae(args.model, args.out, plan, progress, latent_space=args.latent_space)
        elif src.kind == "vae":
            parts = load_vae(src, revision=args.revision, scaling_factor=args.scaling_factor,
                             shift_factor=args.shift_factor)
            report = export_vae(parts, args.out, plan, progress)
        else:
            parts = load_stable_diffusion(src, revision=args.revision)
            report = export_stable_diffusion(parts, args.out, plan, progress)
    finally:
        progress.close()
    total = time.perf_counter() - started
    for parity in report.parity:
        print(parity.line())
    for sweep in report.sweeps:
        kept = ", ".join(f"{node} (+{gain:.2f} dB)" for node, gain in report.manifest.graphs[sweep.role].float_nodes.items())
        print(f"{sweep.role:12s} int8 sweep: SNR {sweep.all_int8_snr_db:.2f} dB all int8, {sweep.final_snr_db:.2f} dB"
              f" with {len(sweep.kept)} nodes kept in float: {kept or 'none'}{_wide_stage(sweep)}")
    for name, size in sorted(report.sizes.items()):
        print(f"{name:24s} {size / 1e6:10.2f} MB")
    print(f"model set {args.out}: fingerprint {report.manifest.fingerprint[:32]}, {total:.1f} s")
    return 0


def _wide_stage(sweep) -> str:
    """What the sweep found of 16-bit activations in the graph's first stage."""
    if sweep.wide_flop_share is None:
        return ""
    share = f"{sweep.wide_flop_share:.1%} of the FLOPs"
    if sweep.wide_gain_db is None:
        return f"; first stage {share}, too costly for 16-bit activations"
    verdict = "16-bit activations" if sweep.wide else "8-bit activations kept"
    return f"; first stage ({share}) {verdict}: {sweep.wide_gain_db:+.2f} dB in 16 bits"


def main(argv: list[str] | None = None, *, int8_recipe=None) -> int:
    """sdc-export; ``int8_recipe`` (an Int8Recipe) replaces the int8 defaults, for tests and probes."""
    args = build_parser().parse_args(argv)

    def work():
        require_extra("export", PROG)
        return run(args, int8_recipe)
    return run_tool(PROG, work)


if __name__ == "__main__":
    sys.exit(main())
