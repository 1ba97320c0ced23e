"""sdc-runtime: encode, decode and inspect .sdc files.

Errors are one line on stderr; exit 2 for usage errors (bad options or option values, an
output that cannot be written), 1 for failures, 0 for success.  Warnings are one line too.
"""
from __future__ import annotations

import argparse
import json
import os
import signal
import sys
import warnings

from PIL import Image

from . import __version__
from .bitstream import sdc_info
from .codec import DECODERS, SdcCodec
from .container import DEFAULT_MAX_PIXELS
from .errors import SdcError, SdcInputError
from .files import parent_problem, write_atomic
from .image import image_bytes, image_format_for, load_image
from .neural import DEFAULT_MEMORY_LIMIT, PROVIDERS
from .options import MODES

PROG = "sdc-runtime"


class _Parser(argparse.ArgumentParser):
    def error(self, message):  # one line, exit 2, like argparse but without the usage dump
        sys.stderr.write(f"{PROG}: error: {message}\n")
        sys.exit(2)


class UsageError(Exception):
    """A bad command line: exit 2."""


def _check_output(output: str, source: str) -> None:
    """Before any work: the output can be written, and it is not the input."""
    if output == "-":
        if sys.stdout.isatty():
            raise UsageError("refusing to write binary data to a terminal: redirect stdout or name an output file")
        return
    if os.path.isdir(output):
        raise UsageError(f"cannot write {output}: it is a directory")
    problem = parent_problem(output)
    if problem:
        raise UsageError(f"cannot write {output}: {problem}")
    if source != "-" and os.path.exists(output) and os.path.exists(source) and os.path.samefile(source, output):
        raise UsageError(f"refusing to overwrite the input {source} with the output")


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


class _Progress:
    """tqdm bars on stderr, one per stage (tiles of the encoder, denoising steps, decoder
    tiles), each opened at its first report; nothing when not wanted or tqdm is missing."""

    def __init__(self, enabled: bool):
        self.enabled, self.stage, self.bar = enabled, None, None

    def __call__(self, stage: str, done: int, total: int) -> None:
        if not self.enabled:
            return
        if stage != self.stage:
            self.close()
            try:
                from tqdm import tqdm
            except ImportError:
                self.enabled = False
                return
            unit = {"denoise": "step", "refine": "pass", "descend": "step", "score": "file", "size search": "file"}.get(stage, "tile")
            self.stage, self.bar = stage, tqdm(total=total, desc=stage, unit=unit, leave=False, file=sys.stderr)
        self.bar.update(done - self.bar.n)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
            self.bar = None


def _codec(args) -> SdcCodec:
    models = args.models or os.environ.get("SDC_MODELS")
    if not models:
        raise UsageError("no model set: pass --models DIR or set SDC_MODELS")
    try:
        return SdcCodec(models, provider=args.provider, max_pixels=args.max_pixels, threads=args.threads,
                        memory_limit=args.memory_limit, tile_size=args.tile_size)
    except SdcInputError as exc:  # the limits given on the command line
        raise UsageError(str(exc)) from None


def _cmd_encode(args) -> None:
    _check_output(args.output, args.input)
    codec = _codec(args)
    try:
        options = codec.options(quality=args.quality, target_bytes=args.target_bytes, effort=args.effort,
                                mode=args.mode, colors=args.colors, group_channels=args.group_channels,
                                dither=args.dither, quant_step=args.quant_step, denoise_steps=args.denoise_steps,
                                seed=args.seed, alpha=args.alpha, strip=args.strip)
    except SdcInputError as exc:
        raise UsageError(str(exc)) from None
    image = load_image(sys.stdin.buffer.read() if args.input == "-" else args.input, max_pixels=args.max_pixels)
    bar = _Progress(sys.stderr.isatty() or args.verbose)
    try:
        result = codec.encode_to_size(image, options, progress=bar)
    finally:
        bar.close()
    _write(args.output, result.data)
    if args.verbose:
        found = f", quality {result.quality} after {result.encodes} encodes" if options.target_bytes else ""
        print(f"{args.output}: {len(result.data)} bytes, {8 * len(result.data) / (image.width * image.height):.4f} bpp"
              f"{found}", file=sys.stderr)


def _cmd_decode(args) -> None:
    _check_output(args.output, args.input)
    try:
        fmt = image_format_for(f"output.{args.format}" if args.format else args.output)
    except SdcInputError as exc:
        raise UsageError(str(exc)) from None
    if args.output_quality is not None and not 1 <= args.output_quality <= 100:
        raise UsageError(f"--output-quality must be in 1..100, not {args.output_quality}")
    codec = _codec(args)
    data = _read(args.input)
    bar = _Progress(sys.stderr.isatty() or args.verbose)
    try:
        image = codec.decode(data, denoise_steps=args.denoise_steps, decoder=args.decoder, progress=bar)
    except SdcInputError as exc:
        # From the file alone this is a failure; with --denoise-steps given, that option is the
        # only input of the caller's the decode checks: a usage error.
        if args.denoise_steps is not None:
            raise UsageError(str(exc)) from None
        raise
    finally:
        bar.close()
    _write(args.output, image_bytes(image, fmt, quality=args.output_quality))


def _cmd_info(args) -> None:
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


def _cmd_verify(args) -> None:
    from .manifest import load_manifest, verify_files

    manifest = load_manifest(args.models)
    verify_files(args.models, manifest)
    print(f"{args.models}: {len(manifest.files)} files match the manifest; fingerprint {manifest.fingerprint[:32]}")


def _cmd_serve(args) -> None:
    from .extras import missing_modules

    missing = missing_modules("starlette", "uvicorn", "prometheus_client")
    if missing:
        raise UsageError(f"serve needs the serve extra (missing: {', '.join(missing)}): pip install 'sdcodec[serve]'")
    import uvicorn
    from sdc_serve import create_app

    if args.workers < 1 or args.queue < 0 or args.max_body < 1:
        raise UsageError("--workers must be at least 1, --queue at least 0, --max-body at least 1")
    app = create_app(_codec(args), workers=args.workers, queue=args.queue, max_body=args.max_body)
    # uvicorn: one access-log line per request; SIGTERM stops accepting and finishes in-flight
    # work, then uvicorn re-raises it to the handler it found: a no-op, so the exit status is 0.
    signal.signal(signal.SIGTERM, lambda signum, frame: None)
    uvicorn.run(app, host=args.host, port=args.port, log_level="info", access_log=True, timeout_graceful_shutdown=60)


def _size(text: str) -> int:
    """'2G', '512M', '1500000000' -> bytes (binary multiples)."""
    units = {"K": 1 << 10, "M": 1 << 20, "G": 1 << 30}
    try:
        value = text.strip().upper().removesuffix("B").removesuffix("I")
        return int(float(value[:-1]) * units[value[-1]]) if value[-1:] in units else int(value)
    except (ValueError, IndexError):
        raise argparse.ArgumentTypeError(f"not a size: {text!r} (use e.g. 2G, 512M)") from None


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog=PROG, description="Encode and decode .sdc images with ONNX Runtime.")
    parser.add_argument("--version", action="version", version=f"{PROG} {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)

    def common(p):
        p.add_argument("--models", metavar="DIR", help="model set folder (sdc-export output; default $SDC_MODELS)")
        p.add_argument("--provider", default="cpu", choices=sorted(PROVIDERS), help="ONNX Runtime provider")
        p.add_argument("--threads", type=int, default=None, help="intra-op threads (default: onnxruntime's)")
        p.add_argument("--max-pixels", type=int, default=DEFAULT_MAX_PIXELS,
                       help=f"refuse larger images (default {DEFAULT_MAX_PIXELS})")
        p.add_argument("--memory-limit", type=_size, default=DEFAULT_MEMORY_LIMIT, metavar="BYTES",
                       help="working memory of the neural stages, besides the model weights; larger images "
                            "run in tiles that fit it (suffixes K, M, G; default 2G)")
        p.add_argument("--tile-size", type=int, default=None, metavar="PIXELS",
                       help="tile side in pixels instead of one from --memory-limit; 0: never tile")
        p.add_argument("-v", "--verbose", action="store_true")

    p = sub.add_parser("encode", help="image -> .sdc")
    p.add_argument("input", help="image file, or - for stdin")
    p.add_argument("output", help=".sdc file, or - for stdout")
    common(p)
    p.add_argument("--quality", "-q", type=int, default=None, metavar="Q",
                   help="1..100, higher is larger and better: a point on the model set's quality scale, which "
                        "chooses --mode, --colors, --group-channels and --quant-step (default: the set's)")
    p.add_argument("--target-bytes", type=int, default=None, metavar="N",
                   help="the best quality whose file is not larger than N bytes (exit 1 if none is)")
    p.add_argument("--effort", "-e", type=int, default=None, metavar="E",
                   help="0..9: closed-loop refinement passes; higher is slower and better at equal bytes, "
                        "same format (default: the set's)")
    p.add_argument("--mode", choices=sorted(MODES), default=None, help="latent coding (default: the model set's)")
    p.add_argument("--colors", type=int, default=None, help="palette mode: palette size, 2..4096 (default: the set's)")
    p.add_argument("--group-channels", type=int, default=None, metavar="G",
                   help="palette mode: one palette per group of G latent channels (default: the set's)")
    p.add_argument("--dither", action=argparse.BooleanOptionalAction, default=None,
                   help="palette mode: Floyd-Steinberg dithering of the latent (default: the set's)")
    p.add_argument("--quant-step", type=float, default=None,
                   help="u8 mode: quantization step in raw latent units for a channel of average decoder "
                        "sensitivity; larger is smaller and worse (default: the finest that fits 8 bits)")
    p.add_argument("--denoise-steps", type=int, default=None,
                   help="UNet denoising steps the decoder runs by default (default: the set's)")
    p.add_argument("--seed", type=int, default=0, help="seed of the palette and the DDIM noise")
    p.add_argument("--alpha", choices=["keep", "drop"], default="keep",
                   help="an alpha channel is stored losslessly (keep, the default) or ignored (drop)")
    p.add_argument("--strip", action="store_true", help="drop the ICC profile, EXIF and XMP")
    p.set_defaults(run=_cmd_encode)

    p = sub.add_parser("decode", help=".sdc -> image (format from OUT's extension; PNG on stdout)")
    p.add_argument("input", help=".sdc file, or - for stdin")
    p.add_argument("output", help="image file, or - for stdout")
    common(p)
    p.add_argument("--denoise-steps", type=int, default=None,
                   help="UNet denoising steps (default: the file's; 0 skips the UNet)")
    p.add_argument("--format", default=None, metavar="EXT",
                   help="output image format (png, jpeg, webp, ...); default: OUT's extension, PNG on stdout")
    p.add_argument("--output-quality", type=int, default=None, metavar="Q",
                   help="quality 1..100 of a lossy output format (JPEG, WebP)")
    p.add_argument("--decoder", default="vae_decoder", choices=DECODERS,
                   help="which decoder graph of the set to use")
    p.set_defaults(run=_cmd_decode)

    p = sub.add_parser("info", help="describe a .sdc file (no model needed)")
    p.add_argument("input", help=".sdc file, or - for stdin")
    p.add_argument("--json", action="store_true", help="machine-readable output")
    p.set_defaults(run=_cmd_info)

    p = sub.add_parser("serve", help="the codec as an HTTP service (the serve extra)")
    common(p)
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=8080)
    p.add_argument("--workers", type=int, default=2, help="threads running neural work (default 2)")
    p.add_argument("--queue", type=int, default=16, help="requests that may wait for a worker; more get 503")
    p.add_argument("--max-body", type=_size, default=32 << 20, metavar="BYTES", help="largest request body (default 32M)")
    p.set_defaults(run=_cmd_serve)

    p = sub.add_parser("verify", help="check a model set's files against the sha256 in its manifest")
    p.add_argument("--models", required=True, metavar="DIR")
    p.set_defaults(run=_cmd_verify)
    return parser


def _warn(message, category, filename, lineno, file=None, line=None):
    sys.stderr.write(f"{PROG}: warning: {message}\n")


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    warnings.showwarning = _warn
    # --max-pixels is the limit: Pillow's own, checked inside Image.open, would cap it at 179 MP.
    Image.MAX_IMAGE_PIXELS = None
    try:
        args.run(args)
    except UsageError as exc:
        sys.stderr.write(f"{PROG}: error: {exc}\n")
        return 2
    except SdcError as exc:
        sys.stderr.write(f"{PROG}: error: {exc}\n")
        return 1
    except KeyboardInterrupt:
        sys.stderr.write(f"{PROG}: interrupted\n")
        return 130
    except BrokenPipeError:  # the reader went away (| head): nothing left to say to it
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 1
    except MemoryError:
        sys.stderr.write(f"{PROG}: error: out of memory\n")
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
