"""The model-set manifest: one schema, written by sdc-export and read by the runtime.

A model set is a folder holding ONNX graphs and ``manifest.json``.  The manifest tells the
runtime everything it needs without torch: the latent geometry, the default 8-bit
quantization mapping, the family's encoder defaults, the scheduler constants for the numpy
denoising loop, and which graph file plays which role.
"""
from __future__ import annotations

import hashlib
import json
import math
import os
from dataclasses import asdict, dataclass, field, replace

from .errors import SdcInputError, SdcModelError
from .files import write_atomic
from .options import EncoderDefaults, ModelLimits, QualityPoint, check_quality_table, resolve_encode_options
from .roles import GRAPH_ROLES, REQUIRED_ROLES

MANIFEST_NAME = "manifest.json"
# 2: encoder defaults moved from the runtime into the manifest.
# 3: the defaults hold the family's quality scale, default quality and effort.
# 4: the decoder gradient weighs the pixels it counts and returns their squared error too; a
#    split decoder's has whole and tiled parts, so it runs on images of any size.
MANIFEST_VERSION = 4
# The autoencoder's conventions: "sd" (diffusers' VAEs: images in [-1, 1]) or "tae" (TAESD-format).
FAMILIES = ("sd", "tae")
# What the set was exported from: an SD 1.x/2.x or SDXL pipeline (with its UNet), a VAE alone
# (its latents in the diffusion model's units), or a TAESD-format pair.
ARCHITECTURES = ("sd", "sdxl", "vae", "tae")
PRECISIONS = ("fp32", "fp16", "int8")
# The spans of int8 graphs' weights (Graph.weight_bits).
WEIGHT_BITS = (7, 8)


@dataclass(frozen=True)
class Graph:
    """One ONNX graph of the set: its file, numeric precision, and the conventions of its I/O."""

    file: str
    precision: str
    # Value range of images on the graph's pixel side: [-1, 1] for SD VAEs, [0, 1] for TAE.
    image_range: tuple[float, float]
    # Working memory (bytes) per pixel of the image side when the graph runs on the CPU EP,
    # measured per family (BENCHMARKS.md): the runtime sizes its tiles from it.
    memory_per_pixel: float
    # The same graph in two files, for graphs with layers that need the whole latent
    # (GroupNorm statistics) at latent resolution: ``whole`` runs on the whole latent, ``tiled``
    # is spatially local and may run in tiles.  An encoder runs tiled then whole, a decoder
    # whole then tiled.  Without them the whole graph runs in tiles, blended.
    whole: str | None = None
    tiled: str | None = None
    # fp16 graphs only: an fp32 file for each of the graph's files, which the runtime runs
    # instead where the fp16 output is not finite (an fp16 overflow).
    fallback: dict[str, str] | None = None
    # int8 graphs only: the nodes the export's sensitivity sweep kept in float, each with the
    # output SNR (dB, against fp32, on the calibration set) that keeping it float gained.
    float_nodes: dict[str, float] | None = None
    # int8 graphs only: the bits their int8 weights span, 8 or 7 (within [-64, 64]).  With 7
    # the runtime runs the CPUs' fast u8s8 kernels, exact for such weights (neural.py).
    weight_bits: int | None = None
    # int8 graphs only: the nodes whose activations the sweep made 16-bit (the decoder's
    # lowest-resolution stage), each with the output SNR (dB) that gained.
    wide_nodes: dict[str, float] | None = None


@dataclass(frozen=True)
class Scheduler:
    """Training constants of the diffusion scheduler, enough for a DDIM update in numpy."""

    num_train_timesteps: int
    prediction_type: str  # "epsilon" or "v_prediction"
    alphas_cumprod: tuple[float, ...]
    final_alpha_cumprod: float


@dataclass(frozen=True)
class Manifest:
    family: str
    latent_channels: int
    downscale: int
    scaling_factor: float
    # Default 8-bit mapping per latent channel: q = round(clip(z / scale + zero, 0, 255)).
    quant_scale: tuple[float, ...]
    quant_zero: tuple[float, ...]
    graphs: dict[str, Graph]
    # The family's encoder defaults: what SdcCodec.encode does when the caller names nothing.
    defaults: EncoderDefaults
    files: dict[str, str]  # file name -> sha256 hex, for every file of the set
    fingerprint: str  # hex; identifies the latent space (see docs/FORMAT.md)
    opset: int
    source: dict = field(default_factory=dict)
    scheduler: Scheduler | None = None
    # The UNet needs latent sides that are multiples of this; the runtime pads to it.
    unet_latent_multiple: int = 1
    # True: the encoder fits the 8-bit mapping to each image's per-channel range, within the
    # range the default mapping above covers (stored in the file's header either way).
    quant_adaptive: bool = False
    # How much each latent channel moves the decoded image (mean 1), measured at export: the
    # encoder weights its palette search by it.  Encoder-side only; files do not depend on it.
    channel_weights: tuple[float, ...] | None = None
    # One of ARCHITECTURES; None in sets written before it was recorded (SD pipelines and TAE
    # pairs, as ``family`` says).
    architecture: str | None = None
    format_version: int = MANIFEST_VERSION

    @property
    def limits(self) -> ModelLimits:
        has_unet = "unet" in self.graphs and self.scheduler is not None
        return ModelLimits(self.latent_channels, self.scheduler.num_train_timesteps if has_unet else 0)

    @property
    def denoiser(self) -> str:
        """What the decoder's denoising steps run: 'none', or the UNet and what it predicts."""
        return f"unet ({self.scheduler.prediction_type})" if self.limits.train_timesteps else "none"

    def to_json(self) -> str:
        data = asdict(self)
        return json.dumps(data, indent=1, sort_keys=True)

    @classmethod
    def from_json(cls, text: str) -> Manifest:
        try:
            data = json.loads(text)
            if not isinstance(data, dict):
                raise ValueError("not a JSON object")
            version = data.get("format_version")
            if isinstance(version, int) and version < MANIFEST_VERSION:
                raise SdcModelError(
                    f"the model set was written by an older sdc-export (manifest format_version {version}; this"
                    f" runtime reads {MANIFEST_VERSION}): re-export it with sdc-export (the files it wrote still decode)")
            if version != MANIFEST_VERSION:
                raise ValueError(f"unsupported manifest format_version {version!r}")
            defaults = dict(data["defaults"])
            defaults["quality_table"] = tuple(QualityPoint(**p) for p in defaults["quality_table"])
            data["defaults"] = EncoderDefaults(**defaults)
            data["graphs"] = {
                role: Graph(g["file"], g["precision"], tuple(g["image_range"]), float(g["memory_per_pixel"]),
                            g.get("whole"), g.get("tiled"), g.get("fallback"), g.get("float_nodes"),
                            g.get("weight_bits"), g.get("wide_nodes"))
                for role, g in data["graphs"].items()
            }
            if data.get("scheduler") is not None:
                s = data["scheduler"]
                data["scheduler"] = Scheduler(
                    int(s["num_train_timesteps"]), str(s["prediction_type"]),
                    tuple(float(a) for a in s["alphas_cumprod"]), float(s["final_alpha_cumprod"]),
                )
            data["quant_scale"] = tuple(float(v) for v in data["quant_scale"])
            data["quant_zero"] = tuple(float(v) for v in data["quant_zero"])
            if data.get("channel_weights") is not None:
                data["channel_weights"] = tuple(float(v) for v in data["channel_weights"])
            manifest = cls(**data)
        except (KeyError, TypeError, ValueError) as exc:
            raise SdcModelError(f"invalid model manifest: {exc}") from None
        manifest.validate()
        return manifest

    def validate(self) -> None:
        def bad(msg: str):
            raise SdcModelError(f"invalid model manifest: {msg}")

        if self.family not in FAMILIES:
            bad(f"unknown family {self.family!r}")
        if self.architecture is not None and self.architecture not in ARCHITECTURES:
            bad(f"unknown architecture {self.architecture!r}")
        if not 1 <= self.latent_channels <= 256:
            bad("latent_channels out of range")
        if self.downscale not in (1, 2, 4, 8, 16, 32, 64):
            bad("downscale must be a power of two up to 64")
        if len(self.quant_scale) != self.latent_channels or len(self.quant_zero) != self.latent_channels:
            bad("quantization mapping must have one entry per latent channel")
        if not all(math.isfinite(s) and s > 0 for s in self.quant_scale):
            bad("quantization scales must be positive")
        for role in REQUIRED_ROLES:
            if role not in self.graphs:
                bad(f"graph {role!r} missing")
        for role, graph in self.graphs.items():
            if role not in GRAPH_ROLES:
                bad(f"unknown graph role {role!r}")
            if graph.precision not in PRECISIONS:
                bad(f"unknown precision {graph.precision!r}")
            if not (math.isfinite(graph.memory_per_pixel) and graph.memory_per_pixel > 0):
                bad(f"memory_per_pixel of {role} must be a positive number")
            if (graph.whole is None) != (graph.tiled is None):
                bad(f"{role} needs both parts, whole and tiled, or neither")
            own = [f for f in (graph.file, graph.whole, graph.tiled) if f is not None]
            if graph.fallback is not None and (graph.precision == "fp32" or not set(graph.fallback) <= set(own)):
                bad(f"{role}: fallback files stand in for the graph's own fp16 files")
            for name, nodes in (("float_nodes", graph.float_nodes), ("wide_nodes", graph.wide_nodes)):
                if nodes is not None and (graph.precision != "int8" or not isinstance(nodes, dict) or not all(
                        isinstance(n, str) and isinstance(g, (int, float)) for n, g in nodes.items())):
                    bad(f"{role}: {name} map node names to SNR gains, in int8 graphs only")
            if graph.weight_bits is not None and (graph.precision != "int8" or graph.weight_bits not in WEIGHT_BITS):
                bad(f"{role}: weight_bits is 7 or 8, in int8 graphs only")
            for file in own + list((graph.fallback or {}).values()):
                if file not in self.files or os.path.basename(file) != file:
                    bad(f"graph file {file!r} not listed in files")
        if "unet" in self.graphs and self.scheduler is None:
            bad("a set with a UNet needs scheduler constants")
        if self.scheduler is not None and len(self.scheduler.alphas_cumprod) != self.scheduler.num_train_timesteps:
            bad("alphas_cumprod must have num_train_timesteps entries")
        if self.channel_weights is not None and (
                len(self.channel_weights) != self.latent_channels
                or not all(math.isfinite(w) and w > 0 for w in self.channel_weights)):
            bad("channel_weights must be one positive number per latent channel")
        if self.unet_latent_multiple < 1:
            bad("unet_latent_multiple must be >= 1")
        try:  # the same checks a caller's options get, for the defaults and every quality anchor
            check_quality_table(self.defaults.quality_table)
            for point in self.defaults.quality_table:
                resolve_encode_options(self.defaults, self.limits, quality=point.quality)
            resolve_encode_options(self.defaults, self.limits)
        except SdcInputError as exc:
            bad(f"defaults: {exc}")


def load_manifest(model_dir: str | os.PathLike) -> Manifest:
    path = os.path.join(model_dir, MANIFEST_NAME)
    try:
        with open(path, encoding="utf-8") as fh:
            text = fh.read()
    except FileNotFoundError:
        folder = os.fspath(model_dir)
        names = os.listdir(folder) if os.path.isdir(folder) else []
        if "model_index.json" in names or any(n.endswith((".pth", ".safetensors", ".ckpt")) for n in names):
            raise SdcModelError(f"{folder} is a checkpoint, not a model set: run sdc-export --model {folder}"
                                " --out DIR first, then use DIR") from None
        if not os.path.exists(folder):
            raise SdcModelError(f"model set {folder} does not exist") from None
        raise SdcModelError(f"{folder} is not a model set: no {MANIFEST_NAME}") from None
    except OSError as exc:
        raise SdcModelError(f"cannot read {path}: {exc.strerror}") from None
    return Manifest.from_json(text)


def model_set_info(manifest: Manifest) -> dict:
    """What a model set is, for ``sdc-runtime info DIR``: where it came from, its latent space
    and its graphs."""
    source = manifest.source
    return {
        "architecture": manifest.architecture or manifest.family,
        "autoencoder": source.get("class", "TAESD-format pair" if manifest.family == "tae" else "AutoencoderKL"),
        "latent_channels": manifest.latent_channels,
        "downscale": manifest.downscale,
        # The VAE's own constants: the set's latents are (raw - shift) * scaling (VAE-only sets)
        # or raw, scaled by scaling_factor for the UNet (SD pipelines).
        "scaling_factor": source.get("scaling_factor", manifest.scaling_factor),
        "shift_factor": source.get("shift_factor", 0.0),
        "denoiser": manifest.denoiser,
        "fingerprint": manifest.fingerprint,
        "graphs": {role: graph.precision for role, graph in sorted(manifest.graphs.items())},
        "defaults": {"quality": manifest.defaults.quality, "effort": manifest.defaults.effort,
                     "denoise_steps": manifest.defaults.denoise_steps},
        "source": source.get("model"),
    }


def sha256_file(path: str | os.PathLike, chunk: int = 1 << 22) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        while block := fh.read(chunk):
            digest.update(block)
    return digest.hexdigest()


def verify_files(model_dir: str | os.PathLike, manifest: Manifest) -> None:
    """Check every file of the set against its recorded sha256 (slow for large sets)."""
    for name, expected in sorted(manifest.files.items()):
        path = os.path.join(model_dir, name)
        if not os.path.isfile(path):
            raise SdcModelError(f"model set file missing: {name}")
        if sha256_file(path) != expected:
            raise SdcModelError(f"model set file {name} does not match its sha256 in the manifest")


def write_manifest(model_dir: str | os.PathLike, manifest: Manifest) -> Manifest:
    """Write ``manifest`` into the set's folder, its file hashes taken afresh from the folder's
    files (every file but the manifest), validated first; returns what was written."""
    files = {name: sha256_file(os.path.join(model_dir, name)) for name in sorted(os.listdir(model_dir))
             if name != MANIFEST_NAME and os.path.isfile(os.path.join(model_dir, name))}
    manifest = replace(manifest, files=files)
    manifest.validate()
    write_atomic(os.path.join(model_dir, MANIFEST_NAME), manifest.to_json().encode("utf-8"))
    return manifest
