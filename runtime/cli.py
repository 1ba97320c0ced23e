"""sdc-runtime: encode, decode and inspect .sdc files.

Errors are one line on stderr; exit 2 for usage errors (bad options or option values, an
output that cannot be written), 1 for failures, 0 for success.  Warnings are one line too.
"""
from __future__ import annotations

import argparse
import functools
import json
import os
import sys
from importlib.metadata import entry_points

from PIL import Image

from . import __version__, batch
from . import options as encode_options
from .batch import Work
from .bitstream import sdc_info
from .codec import SdcCodec
from .container import DEFAULT_MAX_PIXELS
from .errors import SdcInputError, SdcUsageError
from .files import parent_problem, write_atomic
from .image import image_bytes, image_format_for, load_image
from .neural import DEFAULT_MEMORY_LIMIT, PROVIDERS
from .progress import StageBars
from .roles import DECODERS
from .tools import ToolParser, run_tool

PROG = "sdc-runtime"


# Other packages add subcommands here (sdc_serve: serve), so the runtime imports none of them.
COMMANDS_GROUP = "sdc_runtime.commands"


def _check_output(output: str, source: str) -> None:
    """Before any work: the output can be written, and it is not the input."""
    if output == "-":
        if sys.stdout.isatty():
            raise SdcUsageError("refusing to write binary data to a terminal: redirect stdout or name an output file")
        return
    if os.path.isdir(output):
        raise SdcUsageError(f"cannot write {output}: it is a directory")
    problem = parent_problem(output)
    if problem:
        raise SdcUsageError(f"cannot write {output}: {problem}")
    if source != "-" and os.path.exists(output) and os.path.exists(source) and os.path.samefile(source, output):
        raise SdcUsageError(f"refusing to overwrite the input {source} with the output")


def _read(path: str) -> bytes:
    if path == "-":
        return sys.stdin.buffer.read()
    try:
        with open(path, "rb") as fh:
            return fh.read()
    except OSError as exc:
        raise SdcInputError(f"cannot read {path}: {exc.strerror}") from None


def _write(path: str, data: bytes) -> None:
    if path == "-":
        sys.stdout.buffer.write(data)
        sys.stdout.buffer.flush()
        return
    try:
        write_atomic(path, data)
    except OSError as exc:
        raise SdcInputError(f"cannot write {path}: {exc.strerror}") from None  # e.g. the disk filled up


def _models(args) -> str:
    """The model set --models names, else $SDC_MODELS."""
    models = args.models or os.environ.get("SDC_MODELS")
    if not models:
        raise SdcUsageError("no model set: pass --models DIR or set SDC_MODELS")
    return models


def codec_from_args(args) -> SdcCodec:
    """The codec the common options name (also for the commands other packages add)."""
    models = _models(args)
    try:
        return SdcCodec(models, provider=args.provider, max_pixels=args.max_pixels, threads=args.threads,
                        memory_limit=args.memory_limit, tile_size=args.tile_size)
    except SdcInputError as exc:  # the limits given on the command line
        raise SdcUsageError(str(exc)) from None


def _one_or_many(args) -> bool:
    """Whether the command codes a batch (--out-dir); else its two paths are INPUT OUTPUT."""
    if args.out_dir is not None:
        return True
    if args.jobs != 1 or args.report or args.resume or args.engine != "local":
        raise SdcUsageError("--jobs, --report, --resume and --engine apply with --out-dir only")
    if len(args.paths) != 2:
        raise SdcUsageError(f"expected INPUT OUTPUT, got {len(args.paths)} paths (many inputs need --out-dir DIR)")
    args.input, args.output = args.paths
    return False


def _cmd_encode(args) -> int:
    many = _one_or_many(args)
    if not many:
        _check_output(args.output, args.input)
    codec = codec_from_args(args)
    try:
        options = codec.options(**{spec.name: getattr(args, spec.name) for spec in encode_options.ENCODE_OPTIONS})
    except SdcInputError as exc:
        raise SdcUsageError(str(exc)) from None
    if many:
        return _batch(args, codec, Work(codec.stages.model_dir, {}, decode=False, encode_options=options))
    image = load_image(sys.stdin.buffer.read() if args.input == "-" else args.input, max_pixels=args.max_pixels)
    bar = StageBars(sys.stderr.isatty() or args.verbose)
    try:
        result = codec.encode_to_size(image, options, progress=bar)
    finally:
        bar.close()
    _write(args.output, result.data)
    if args.verbose:
        found = f", quality {result.quality} after {result.encodes} encodes" if options.target_bytes else ""
        print(f"{args.output}: {len(result.data)} bytes, {8 * len(result.data) / (image.width * image.height):.4f} bpp"
              f"{found}", file=sys.stderr)


def _cmd_decode(args) -> int:
    many = _one_or_many(args)
    if not many:
        _check_output(args.output, args.input)
    try:
        fmt = image_format_for(f"output.{args.format or 'png'}" if many or args.format else args.output)
    except SdcInputError as exc:
        raise SdcUsageError(str(exc)) from None
    if args.output_quality is not None and not 1 <= args.output_quality <= 100:
        raise SdcUsageError(f"--output-quality must be in 1..100, not {args.output_quality}")
    codec = codec_from_args(args)
    if many:
        if args.denoise_steps is not None:
            try:
                codec.options(denoise_steps=args.denoise_steps)
            except SdcInputError as exc:
                raise SdcUsageError(str(exc)) from None
        return _batch(args, codec, Work(codec.stages.model_dir, {}, decode=True, image_format=fmt,
                                        decode_options={"denoise_steps": args.denoise_steps, "decoder": args.decoder},
                                        output_quality=args.output_quality), extension=(args.format or "png").lower())
    data = _read(args.input)
    bar = StageBars(sys.stderr.isatty() or args.verbose)
    try:
        image = codec.decode(data, denoise_steps=args.denoise_steps, decoder=args.decoder, progress=bar)
    except SdcInputError as exc:
        # From the file alone this is a failure; with --denoise-steps given, that option is the
        # only input of the caller's the decode checks: a usage error.
        if args.denoise_steps is not None:
            raise SdcUsageError(str(exc)) from None
        raise
    finally:
        bar.close()
    _write(args.output, image_bytes(image, fmt, quality=args.output_quality))


def _batch(args, codec: SdcCodec, work: Work, extension: str = "png") -> int:
    """--out-dir: every input coded into the folder; 1 if any failed (each named on stderr)."""
    import dataclasses
    import time

    if os.path.exists(args.out_dir) and not os.path.isdir(args.out_dir):
        raise SdcUsageError(f"--out-dir {args.out_dir} is not a folder")
    found, missing = batch.find_inputs(args.paths, decode=work.decode)
    jobs = batch.plan(found, args.out_dir, decode=work.decode, extension=extension)
    codec_options = dict(provider=args.provider, max_pixels=args.max_pixels, threads=args.threads,
                         memory_limit=args.memory_limit, tile_size=args.tile_size)
    work = dataclasses.replace(work, codec_options=batch.per_worker(codec_options, args.jobs))
    os.makedirs(args.out_dir, exist_ok=True)
    started = time.perf_counter()

    def failed(outcome) -> None:
        sys.stderr.write(f"{PROG}: error: {outcome.path}: {outcome.error}\n")

    if args.engine == "ray":
        from .ray import run_ray

        engine = functools.partial(run_ray, address=args.ray_address)
    else:
        engine = batch.run_local
    outcomes = batch.run_batch(work, jobs, missing, engine, workers=args.jobs, resume=args.resume,
                               report_path=args.report, show_progress=sys.stderr.isatty() or args.verbose,
                               on_failure=failed)
    sys.stderr.write(f"{PROG}: {batch.summary(outcomes, time.perf_counter() - started)}\n")
    return 1 if any(o.error for o in outcomes) else 0


def _cmd_info(args) -> None:
    if os.path.isdir(args.input):
        return _set_info(args)
    details = sdc_info(_read(args.input))
    if args.json:
        print(json.dumps(details, indent=1))
        return
    print(f"sdc v{details['format_version']}  {details['width']}x{details['height']}  mode {details['mode']}"
          + (f" ({details['colors']} colours per group of {details['group_channels']} channels)"
             if details["colors"] else ""))
    c, h, w = details["latent_shape"]
    print(f"latent {c}x{h}x{w} (downscale {details['downscale']})  denoise {details['denoise_steps']} steps"
          f" stride {details['denoise_stride']} eta {details['eta']:g}")
    for name, s in details["sections"].items():
        print(f"  {name:8s} {s['bytes']:8d} bytes ({s['raw_bytes']} raw, {s['coder']})")
    print(f"total {details['total_bytes']} bytes, {details['bpp']:.4f} bpp; model {details['model_fingerprint']}")


def _set_info(args) -> None:
    from .manifest import load_manifest, model_set_info

    details = model_set_info(load_manifest(args.input))
    if args.json:
        print(json.dumps(details, indent=1))
        return
    print(f"model set {args.input}: {details['architecture']} ({details['autoencoder']}), {details['latent_channels']}"
          f" latent channels at 1/{details['downscale']}, scaling {details['scaling_factor']:g}"
          f" shift {details['shift_factor']:g}, denoiser {details['denoiser']}")
    print("graphs: " + ", ".join(f"{role} {precision}" for role, precision in details["graphs"].items()))
    d = details["defaults"]
    print(f"defaults: quality {d['quality']}, effort {d['effort']}, {d['denoise_steps']} denoising steps;"
          f" fingerprint {details['fingerprint'][:32]}")


def _cmd_verify(args) -> None:
    from .manifest import load_manifest, verify_files

    models = _models(args)
    manifest = load_manifest(models)
    verify_files(models, manifest)
    print(f"{models}: {len(manifest.files)} files match the manifest; fingerprint {manifest.fingerprint[:32]}")


def size_bytes(text: str) -> int:
    """'2G', '512M', '1500000000' -> bytes (binary multiples)."""
    units = {"K": 1 << 10, "M": 1 << 20, "G": 1 << 30}
    try:
        value = text.strip().upper().removesuffix("B").removesuffix("I")
        return int(float(value[:-1]) * units[value[-1]]) if value[-1:] in units else int(value)
    except (ValueError, IndexError):
        raise argparse.ArgumentTypeError(f"not a size: {text!r} (use e.g. 2G, 512M)") from None


def build_parser() -> argparse.ArgumentParser:
    parser = ToolParser(prog=PROG, description="Encode and decode .sdc images with ONNX Runtime.")
    parser.add_argument("--version", action="version", version=f"{PROG} {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, parser_class=ToolParser)

    def common(p):
        p.add_argument("--models", metavar="DIR", help="model set folder (sdc-export output; default $SDC_MODELS)")
        p.add_argument("--provider", default="cpu", choices=sorted(PROVIDERS), help="ONNX Runtime provider")
        p.add_argument("--threads", type=int, default=None, help="intra-op threads (default: onnxruntime's)")
        p.add_argument("--max-pixels", type=int, default=DEFAULT_MAX_PIXELS,
                       help=f"refuse larger images (default {DEFAULT_MAX_PIXELS})")
        p.add_argument("--memory-limit", type=size_bytes, default=DEFAULT_MEMORY_LIMIT, metavar="BYTES",
                       help="working memory of the neural stages, besides the model weights; larger images "
                            "run in tiles that fit it (suffixes K, M, G; default 2G)")
        p.add_argument("--tile-size", type=int, default=None, metavar="PIXELS",
                       help="tile side in pixels instead of one from --memory-limit; 0: never tile")
        p.add_argument("-v", "--verbose", action="store_true")

    p = coding_parser(sub, common, "encode", "image -> .sdc (or folders of them, with --out-dir)",
                      "an image file (- for stdin) and a .sdc file (- for stdout)", "images")
    add_encode_options(p)
    p.set_defaults(run=_cmd_encode)

    p = coding_parser(sub, common, "decode", ".sdc -> image (format from OUT's extension; PNG on stdout)",
                      "a .sdc file (- for stdin) and an image file (- for stdout)", ".sdc files")
    p.add_argument("--denoise-steps", type=int, default=None,
                   help="UNet denoising steps (default: the file's; 0 skips the UNet)")
    p.add_argument("--format", default=None, metavar="EXT",
                   help="output image format (png, jpeg, webp, ...); default: OUT's extension, PNG on stdout")
    p.add_argument("--output-quality", type=int, default=None, metavar="Q",
                   help="quality 1..100 of a lossy output format (JPEG, WebP)")
    p.add_argument("--decoder", default="vae_decoder", choices=DECODERS,
                   help="which decoder graph of the set to use")
    p.set_defaults(run=_cmd_decode)

    p = sub.add_parser("info", help="describe a .sdc file (no model needed), or a model set folder")
    p.add_argument("input", help=".sdc file, - for stdin, or a model set folder")
    p.add_argument("--json", action="store_true", help="machine-readable output")
    p.set_defaults(run=_cmd_info)

    p = sub.add_parser("verify", help="check a model set's files against the sha256 in its manifest")
    p.add_argument("--models", metavar="DIR", help="model set folder (default $SDC_MODELS)")
    p.set_defaults(run=_cmd_verify)
    for command in entry_points(group=COMMANDS_GROUP):
        command.load()(sub, common)
    return parser


def coding_parser(sub, common, name: str, summary: str, one: str, walked: str) -> argparse.ArgumentParser:
    """encode and decode: INPUT OUTPUT, or with --out-dir any number of inputs."""
    p = sub.add_parser(name, help=summary)
    p.add_argument("paths", nargs="+", metavar="PATH",
                   help=f"INPUT OUTPUT: {one}; with --out-dir, every PATH is an input: a file, a folder"
                        f" (walked for {walked}) or a glob")
    common(p)
    add_batch_options(p)
    return p


def add_batch_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--out-dir", metavar="DIR", default=None,
                        help="code every input into DIR, mirroring the inputs' relative paths (README: bulk coding)")
    parser.add_argument("--jobs", "-j", type=int, default=1, metavar="N",
                        help="with --out-dir: N workers, each with one codec, sharing the threads and --memory-limit")
    parser.add_argument("--report", metavar="FILE", default=None,
                        help="with --out-dir: one JSON line per input (path, output, bytes, bpp, seconds, error)")
    parser.add_argument("--resume", action="store_true",
                        help="with --out-dir: skip the inputs whose output is already complete")
    parser.add_argument("--engine", choices=("local", "ray"), default="local",
                        help="with --out-dir: local worker processes, or a Ray cluster (the ray extra)")
    parser.add_argument("--ray-address", default=None, metavar="ADDR",
                        help="with --engine ray: the cluster to join (default: a local Ray instance)")


def add_encode_options(parser: argparse.ArgumentParser) -> None:
    """A flag for every encoder option EncodeOptions declares; None (not given) is the set's default."""
    for spec in encode_options.ENCODE_OPTIONS:
        names = [spec.flag] + ([f"-{spec.short}"] if spec.short else [])
        if spec.kind is bool:
            parser.add_argument(*names, dest=spec.name, action=argparse.BooleanOptionalAction, default=None,
                                help=spec.help)
        else:
            parser.add_argument(*names, dest=spec.name, type=spec.kind, choices=spec.choices, default=None,
                                metavar=spec.metavar, help=spec.help)


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    # --max-pixels is the limit: Pillow's own, checked inside Image.open, would cap it at 179 MP.
    Image.MAX_IMAGE_PIXELS = None
    return run_tool(PROG, lambda: args.run(args))


if __name__ == "__main__":
    sys.exit(main())
