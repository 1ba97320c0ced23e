"""Writing a complete model set: graphs, optional fp16 pass, parity checks, manifest."""
from __future__ import annotations

import hashlib
import json
import math
import os
import shutil
import tempfile
from dataclasses import dataclass, field, replace

import numpy as np
import torch

from sdc_runtime.errors import SdcExportError
from sdc_runtime.latent import sd_quant_mapping
from sdc_runtime.manifest import MANIFEST_NAME, Graph, Manifest, Scheduler, sha256_file
from sdc_runtime.options import EncoderDefaults, QualityPoint
from sdc_runtime.progress import report
from sdc_runtime.roles import DECODERS, ROLES

from .graphs import GraphSpec, UNetEmptyPrompt, VaeDecoder, VaeEncoder, check_parity, convert_fp16, export_graph
from .inputs import prepare_output
from .plan import ExportPlan
from .sources import StableDiffusionParts, VaeParts, weights_digest

# Each family's encoder defaults, written into its manifests: the runtime has none of its own.
#
# The quality scale (1..100) of TAE sets: the Pareto frontier of the operating points measured
# on Kodak-24 with TAEF2 (BENCHMARKS.md §3, §7 and §13): u8 steps throughout.  Before the
# context coder (coder 3), two palettes held the low end; coded 12% smaller, u8 steps now beat
# them there too (coarse steps 2.0 and 1.6: 10.6 KB 21.9 dB and 13.7 KB 22.9 dB on six Kodak
# images, against the palettes' 12.6 KB 21.4 dB and 15.8 KB 22.5 dB).  Mean bytes / PSNR on
# Kodak-24 at effort 0: Q20 16.4 KB 25.4 dB, Q60 43.7 KB 28.8 dB (§13).  Above Q60 the curve
# flattens (Q70: +28% bytes, +0.7 dB).
TAE_QUALITY = (
    QualityPoint(1, "u8", quant_step=2.6),
    QualityPoint(10, "u8", quant_step=1.8),
    QualityPoint(20, "u8", quant_step=1.3),
    QualityPoint(30, "u8", quant_step=1.0),
    QualityPoint(40, "u8", quant_step=0.8),
    QualityPoint(50, "u8", quant_step=0.6),
    QualityPoint(60, "u8", quant_step=0.45),
    QualityPoint(70, "u8", quant_step=0.3),
    QualityPoint(80, "u8", quant_step=0.2),
    QualityPoint(90, "u8", quant_step=0.1),
    QualityPoint(100, "u8", quant_step=0.02),
)


def tae_defaults(channels: int) -> EncoderDefaults:
    """TAE: no UNet; nearest-colour palettes (dithering lost ~0.5 dB on Kodak, BENCHMARKS.md);
    effort 1, the default by measured time against gain: two descent steps (BENCHMARKS.md §15)."""
    return EncoderDefaults(mode="palette", colors=256, group_channels=4, dither=False, denoise_steps=0,
                           denoise_stride=0, eta=0.0, quality=60, effort=1, quality_table=TAE_QUALITY)


def vae_defaults(channels: int) -> EncoderDefaults:
    """A VAE alone: TAE's scale, whose latents are in the same (diffusion model's) units, with
    effort 0: a VAE-only set ships no decoder gradient, and the free passes of effort 1 would
    each cost a full-size VAE decode.  Not measured: no such weights exist here."""
    return replace(tae_defaults(channels), effort=0)


def sd_quality(channels: int, scaling_factor: float) -> tuple[QualityPoint, ...]:
    """SD's quality scale.  No SD weights exist on this project's machines, so it is not
    measured: the 2022 recipe (palette K=256 G=4, dithered) is Q40 and the default, palettes
    below it, and above it TAE's u8 steps scaled to SD's latent range (the 8-bit mapping
    spans 255 steps of sd_quant_mapping's raw units against TAE's 12)."""
    group = min(4, channels)
    wide = min(8, channels)
    ratio = 255 * sd_quant_mapping(scaling_factor, 1)[0][0] / 12.0
    return (
        QualityPoint(1, "palette", colors=16, group_channels=wide),
        QualityPoint(10, "palette", colors=64, group_channels=wide),
        QualityPoint(20, "palette", colors=16, group_channels=group),
        QualityPoint(30, "palette", colors=64, group_channels=group),
        QualityPoint(40, "palette", colors=256, group_channels=group),
        QualityPoint(50, "u8", quant_step=round(0.6 * ratio, 4)),
        QualityPoint(70, "u8", quant_step=round(0.3 * ratio, 4)),
        QualityPoint(90, "u8", quant_step=round(0.1 * ratio, 4)),
        QualityPoint(100, "u8", quant_step=round(0.02 * ratio, 4)),
    )


def sd_defaults(channels: int, scaling_factor: float) -> EncoderDefaults:
    """SD: the 2022 experiment: 256 colours with dithering, 3 DDIM steps at stride 15
    (t = 30, 15, 0), eta 0.9.  Effort 0: a UNet set's loop costs UNet steps per pass, and
    its gain cannot be measured without SD weights."""
    return EncoderDefaults(mode="palette", colors=256, group_channels=4, dither=True,
                           denoise_steps=3, denoise_stride=15, eta=0.9, quality=40, effort=0,
                           quality_table=sd_quality(channels, scaling_factor))




@dataclass
class ExportReport:
    manifest: Manifest
    parity: list  # Agreement (tiny decoders), Parity (against torch), then Int8Parity (int8 against fp32)
    sizes: dict[str, int] = field(default_factory=dict)
    sweeps: list = field(default_factory=list)  # quantize.SweepResult per int8 role


def shipping_mode(mode: int) -> int:
    """``mode`` under the process umask: mkdtemp and the exporters create private files, but a
    model set is for shipping, so it gets what open() and mkdir() would give."""
    umask = os.umask(0)
    os.umask(umask)
    return mode & ~umask


def parity_latent_size(multiple: int) -> tuple[int, int]:
    """A small non-square latent size the UNet accepts: 6x10 cells rounded up to its multiple."""
    return multiple * math.ceil(6 / multiple), multiple * math.ceil(10 / multiple)


def decoder_sensitivity(decode, channels: int, latent_std: float, *, side: int = 24, seed: int = 0) -> tuple:
    """Mean squared change of the decoded image when noise (10% of the latent's std) is added
    to one latent channel, per channel, normalized to mean 1.  Measured on seeded random
    latents, so it describes the decoder, not any data set."""
    generator = torch.Generator().manual_seed(seed)
    latent = torch.randn(1, channels, side, side, generator=generator) * latent_std
    changes = []
    with torch.no_grad():
        base = decode(latent)
        for c in range(channels):
            nudged = latent.clone()
            nudged[0, c] += torch.randn(side, side, generator=generator) * (0.1 * latent_std)
            changes.append(float(((decode(nudged) - base) ** 2).mean()))
    mean = sum(changes) / channels
    return tuple(round(max(c / mean, 1e-6), 6) for c in changes)


def fingerprint_of(description: dict) -> str:
    return hashlib.sha256(json.dumps(description, sort_keys=True).encode()).hexdigest()


def scheduler_constants(config: dict) -> Scheduler:
    from diffusers import DDIMScheduler

    scheduler = DDIMScheduler.from_config(config)
    return Scheduler(
        num_train_timesteps=int(scheduler.config.num_train_timesteps),
        prediction_type=str(scheduler.config.prediction_type),
        alphas_cumprod=tuple(float(a) for a in scheduler.alphas_cumprod.tolist()),
        final_alpha_cumprod=float(scheduler.final_alpha_cumprod),
    )


class ScaledTinyDecoder(torch.nn.Module):
    """raw SD latent -> image in [0, 1] through a TAESD decoder (which takes scaled latents)."""

    def __init__(self, decoder, scaling_factor: float):
        super().__init__()
        self.decoder = decoder
        self.scaling_factor = scaling_factor

    def forward(self, latent):
        return self.decoder(latent * self.scaling_factor)


def sd_modules(parts: StableDiffusionParts) -> dict[str, torch.nn.Module]:
    """An SD or SDXL pipeline's graphs as torch modules, by role."""
    downscale = 2 ** (len(parts.vae.config.block_out_channels) - 1)
    return {"vae_encoder": VaeEncoder(parts.vae).eval(), "vae_decoder": VaeDecoder(parts.vae).eval(),
            "unet": UNetEmptyPrompt(parts.unet, parts.empty_prompt_embedding, parts.pooled_embedding,
                                    downscale).eval()}


def vae_modules(parts: VaeParts) -> dict[str, torch.nn.Module]:
    """A VAE-only set's graphs as torch modules: latents in the diffusion model's units."""
    units = (parts.scaling_factor, parts.shift_factor)
    return {"vae_encoder": VaeEncoder(parts.vae, *units).eval(), "vae_decoder": VaeDecoder(parts.vae, *units).eval()}


def source_modules(path: str) -> dict[str, torch.nn.Module]:
    """The torch modules a model set's graphs were exported from, by role, for the benches."""
    from .inputs import classify_source
    from .sources import load_stable_diffusion, load_vae
    from .tae import DecoderGradient, load_tae_pair

    src = classify_source(path)
    if src.kind == "tae":
        encoder, decoder, _, _ = load_tae_pair(path)
        return {"vae_encoder": encoder, "vae_decoder": decoder, "decoder_gradient": DecoderGradient(decoder)}
    if src.kind == "vae":
        return vae_modules(load_vae(src))
    return sd_modules(load_stable_diffusion(src))


def sd_graph_specs(parts: StableDiffusionParts) -> tuple[list[GraphSpec], int, int]:
    vae, unet = parts.vae, parts.unet
    downscale = 2 ** (len(vae.config.block_out_channels) - 1)
    multiple = 2 ** (len(unet.config.block_out_channels) - 1)
    channels = vae.config.latent_channels
    lh, lw = parity_latent_size(multiple)
    modules = sd_modules(parts)
    specs = [
        GraphSpec("vae_encoder", modules["vae_encoder"], ["image"], "latent",
                  (torch.zeros(1, 3, lh * downscale, lw * downscale),)),
        GraphSpec("vae_decoder", modules["vae_decoder"], ["latent"], "image", (torch.zeros(1, channels, lh, lw),)),
        GraphSpec("unet", modules["unet"], ["sample", "timestep"], "prediction",
                  (torch.zeros(1, channels, lh, lw), torch.zeros(1))),
    ]
    return specs, downscale, multiple


@dataclass
class Agreement:
    """How closely a tiny decoder's image follows the big decoder's on the same latent: PSNR
    (dB, images in [0, 1]) on the latent the VAE's encoder makes of a test image.  Reported,
    not enforced: only trained weights can agree (random ones measure noise)."""

    role: str
    against: str  # the decoder it follows
    psnr_db: float
    passed: bool = True

    def line(self) -> str:
        return f"{self.role:12s} agrees with {self.against} to {self.psnr_db:.2f} dB PSNR on the same latent"


def agreement_image(side: int = 64) -> np.ndarray:
    """A smooth colour test image, (1, 3, side, side) in [0, 1]: gradients and a disc."""
    y, x = np.mgrid[0:side, 0:side] / (side - 1)
    disc = ((x - 0.6) ** 2 + (y - 0.4) ** 2 < 0.08).astype(np.float64)
    return np.stack([x, y, 0.5 * (1 - x) + 0.4 * disc])[None].astype(np.float32)


def decoder_agreement(role: str, against: str, encode_unit, decode_unit, tiny_unit) -> Agreement:
    """``encode_unit``/``decode_unit``: the VAE from and to images in [0, 1]; ``tiny_unit``: the
    tiny decoder to images in [0, 1]; all on numpy arrays."""
    latent = encode_unit(agreement_image())
    big, tiny = np.clip(decode_unit(latent), 0, 1), np.clip(tiny_unit(latent), 0, 1)
    mse = float(np.mean((big.astype(np.float64) - tiny) ** 2))
    return Agreement(role, against, 10 * math.log10(1 / max(mse, 1e-12)))


def _torch_unit(module, image_range: tuple[float, float], *, encoder: bool = False):
    """A torch encoder (image in ``image_range`` -> latent) or decoder (latent -> image) as a
    numpy function with its images in [0, 1]."""
    lo, hi = image_range

    def run(array):
        with torch.no_grad():
            value = torch.from_numpy(np.asarray(array, np.float32))
            if encoder:
                return module(value * (hi - lo) + lo).float().numpy()
            return (module(value).float().numpy() - lo) / (hi - lo)
    return run


def tiny_decoder_spec(folder: str, channels: int, example, scaling: float | None,
                      modules) -> tuple[GraphSpec, Agreement]:
    """``--tiny-decoder``: its graph (raw latents scaled inside where ``scaling`` is given) and
    its agreement with the VAE's own decoder; one line where it cannot take this VAE's latents."""
    from .tae import load_tae_decoder

    decoder, tiny_channels = load_tae_decoder(folder)
    if tiny_channels != channels:
        raise SdcExportError(f"the tiny decoder in {folder} takes {tiny_channels} latent channels; this VAE's latent"
                             f" space has {channels}: it was trained for another family")
    module = (decoder if scaling is None else ScaledTinyDecoder(decoder, scaling)).eval()
    ranges = {role: ROLES[role].image_range["sd"] for role in ("vae_encoder", "vae_decoder", "tiny_decoder")}
    agreement = decoder_agreement("tiny_decoder", "vae_decoder",
                                  _torch_unit(modules["vae_encoder"], ranges["vae_encoder"], encoder=True),
                                  _torch_unit(modules["vae_decoder"], ranges["vae_decoder"]),
                                  _torch_unit(module, ranges["tiny_decoder"]))
    return GraphSpec("tiny_decoder", module, ["latent"], "image", example), agreement


def write_model_set(out: str, specs: list[GraphSpec], describe, plan: ExportPlan, progress=None,
                    agreements: list | None = None) -> ExportReport:
    """Export ``specs`` into a scratch folder beside ``out``, check parity, write the manifest,
    then move the folder into place, in the precisions ``plan`` gives each role (the int8 ones
    quantized by ``int8``, calibrated by running the finished set on the plan's images).
    ``describe(graphs, files, opset)`` builds the Manifest; ``agreements`` (decoder against
    decoder) are reported with the parity lines."""
    roles = [spec.role for spec in specs]
    if sorted(roles) != sorted(plan.roles):
        raise SdcExportError(f"the plan names the graphs {', '.join(plan.roles)}; the export writes {', '.join(roles)}")
    prepare_output(out, plan.force)
    parent = os.path.dirname(os.path.abspath(out))
    scratch = tempfile.mkdtemp(prefix=".sdc-export-", dir=parent)
    parity: list = list(agreements or [])
    sweeps: list = []
    try:
        parts: dict[str, dict] = {}
        precisions: dict[str, str] = {}
        for spec in specs:
            precision = plan.precision_of(spec.role)
            precisions[spec.role] = precision
            fallback = precision == "fp16" and plan.fp32_fallback and spec.role in DECODERS
            for graph in [spec] + (spec.parts() if spec.split is not None else []):
                path = os.path.join(scratch, f"{graph.role}.onnx")
                report(progress, f"export {graph.role}", 0, 1)
                export_graph(graph, path, plan.opset, fuse=plan.fuse_attention)
                if fallback:
                    shutil.copyfile(path, os.path.join(scratch, f"{graph.role}.fp32.onnx"))
                    parts.setdefault(spec.role, {}).setdefault("fallback", {})[f"{graph.role}.onnx"] = \
                        f"{graph.role}.fp32.onnx"
                if precision == "fp16":
                    report(progress, f"fp16 {graph.role}", 0, 1)
                    convert_fp16(path)
                report(progress, f"parity {graph.role}", 0, 1)
                # int8 graphs are exported in fp32 first: their torch parity is the fp32 one.
                parity.append(check_parity(graph, path, "fp16" if precision == "fp16" else "fp32"))
                if graph is not spec:
                    parts.setdefault(spec.role, {})[graph.role.rsplit(".", 1)[1]] = f"{graph.role}.onnx"
        _check(parity)
        if plan.int8:
            from .int8 import keep_reference_decoder, needs_reference_decoder, quantize_set

            if needs_reference_decoder(plan.int8, precisions):
                decoder_parts = {k: v for k, v in parts.get("vae_decoder", {}).items() if k in ("whole", "tiled")}
                copies = keep_reference_decoder(scratch, {"file": "vae_decoder.onnx", **decoder_parts})
                precisions["reference_decoder"] = "fp32"
                parts["reference_decoder"] = {k: v for k, v in copies.items() if k != "file"}

            # The calibration runs the set through the runtime, so it first needs a manifest:
            # the same set with its int8 graphs still in fp32.
            _write_manifest(scratch, describe, {r: "fp32" if p == "int8" else p for r, p in precisions.items()},
                            parts, plan.opset)
            graph_fields, int8_parity, sweeps = quantize_set(scratch, tuple(r for r in roles if r in plan.int8),
                                                            plan.calibration, sweep_nodes=plan.sweep_nodes,
                                                            weight_bits=plan.weight_bits, progress=progress,
                                                            recipe=plan.int8_recipe)
            parity.extend(int8_parity)
            _check(parity)
            for role, fields in graph_fields.items():
                parts.setdefault(role, {}).update(fields, weight_bits=plan.weight_bits)
        report(progress, "hash files", 0, 1)
        manifest = _write_manifest(scratch, describe, precisions, parts, plan.opset)
        sizes = {name: os.path.getsize(os.path.join(scratch, name)) for name in os.listdir(scratch)}
        for name in sizes:
            os.chmod(os.path.join(scratch, name), shipping_mode(0o666))
        os.chmod(scratch, shipping_mode(0o777))
        if os.path.isdir(out):
            shutil.rmtree(out)
        os.replace(scratch, out)
    except BaseException:
        shutil.rmtree(scratch, ignore_errors=True)
        raise
    return ExportReport(manifest, parity, sizes, sweeps)


def _check(parity: list) -> None:
    failed = [p for p in parity if not p.passed]
    if failed:
        raise SdcExportError("parity check failed: " + "; ".join(p.line() for p in failed))


def _write_manifest(folder: str, describe, precisions: dict[str, str], parts: dict[str, dict], opset: int) -> Manifest:
    files = {name: sha256_file(os.path.join(folder, name)) for name in sorted(os.listdir(folder))
             if name != MANIFEST_NAME}
    manifest = describe({role: (f"{role}.onnx", precision, parts.get(role, {}))
                         for role, precision in precisions.items()}, files, opset)
    manifest.validate()
    with open(os.path.join(folder, MANIFEST_NAME), "w", encoding="utf-8") as fh:
        fh.write(manifest.to_json())
    return manifest


def export_stable_diffusion(parts: StableDiffusionParts, out: str, plan: ExportPlan, progress=None) -> ExportReport:
    specs, downscale, multiple = sd_graph_specs(parts)
    vae = parts.vae
    channels = vae.config.latent_channels
    scaling = float(vae.config.scaling_factor)
    if "decoder_gradient" in plan.roles:
        specs.append(vae_gradient_spec(vae, 1.0, 0.0, channels, downscale, specs[1].example[0].shape[2:]))
    agreements = []
    if plan.tiny_decoder is not None:
        spec, agreement = tiny_decoder_spec(plan.tiny_decoder, channels, specs[1].example, scaling,
                                            {s.role: s.module for s in specs})
        specs.append(spec)
        agreements.append(agreement)
    scale, zero = sd_quant_mapping(scaling, channels)
    scheduler = scheduler_constants(parts.scheduler_config)
    report(progress, "fingerprint weights", 0, 1)
    weights = decoder_sensitivity(lambda z: vae.decode(z).sample, channels, 1.0 / scaling)
    description = {
        "family": "sd", "vae": weights_digest(vae), "unet": weights_digest(parts.unet),
        "empty_prompt": _digest(parts.empty_prompt_embedding), "latent_channels": channels, "scaling_factor": scaling,
    }
    if parts.pooled_embedding is not None:
        description["pooled_prompt"] = _digest(parts.pooled_embedding)
    fingerprint = fingerprint_of(description)

    def describe(graphs, files, opset_used):
        return Manifest(
            family="sd", latent_channels=channels, downscale=downscale, scaling_factor=scaling,
            quant_scale=scale, quant_zero=zero,
            graphs={role: Graph(file, prec, ROLES[role].image_range["sd"],
                                ROLES[role].memory_per_pixel["sd"], **parts)
                    for role, (file, prec, parts) in graphs.items()}, defaults=sd_defaults(channels, scaling),
            files=files, fingerprint=fingerprint, opset=opset_used, source=parts.source,
            scheduler=scheduler, unet_latent_multiple=multiple, channel_weights=weights,
            architecture=parts.architecture)

    return write_model_set(out, specs, describe, plan, progress, agreements)


def _digest(tensor: torch.Tensor) -> str:
    return hashlib.sha256(tensor.numpy().astype("<f4").tobytes()).hexdigest()


def export_vae(parts: VaeParts, out: str, plan: ExportPlan, progress=None) -> ExportReport:
    """An autoencoder alone -> a set without a denoiser, its latents in the diffusion model's
    units (``(raw - shift) * scaling``: what its family's diffusion model and tiny decoders
    take), quantized as TAE sets are."""
    vae = parts.vae
    downscale = 2 ** (len(vae.config.block_out_channels) - 1)
    channels = vae.config.latent_channels
    lh, lw = parity_latent_size(1)
    modules = vae_modules(parts)
    latent_example = (torch.zeros(1, channels, lh, lw),)
    specs = [GraphSpec("vae_encoder", modules["vae_encoder"], ["image"], "latent",
                       (torch.zeros(1, 3, lh * downscale, lw * downscale),)),
             GraphSpec("vae_decoder", modules["vae_decoder"], ["latent"], "image", latent_example)]
    if "decoder_gradient" in plan.roles:
        specs.append(vae_gradient_spec(vae, parts.scaling_factor, parts.shift_factor, channels, downscale, (lh, lw)))
    agreements = []
    if plan.tiny_decoder is not None:
        spec, agreement = tiny_decoder_spec(plan.tiny_decoder, channels, latent_example, None, modules)
        specs.append(spec)
        agreements.append(agreement)
    report(progress, "fingerprint weights", 0, 1)
    weights = decoder_sensitivity(modules["vae_decoder"], channels, 1.0)
    fingerprint = fingerprint_of({"family": "vae", "vae": weights_digest(vae), "latent_channels": channels,
                                  "scaling_factor": parts.scaling_factor, "shift_factor": parts.shift_factor})
    source = parts.source | {"scaling_factor": parts.scaling_factor, "shift_factor": parts.shift_factor}

    def describe(graphs, files, opset_used):
        return Manifest(
            family="sd", latent_channels=channels, downscale=downscale, scaling_factor=1.0,
            quant_scale=(TAE_STEP,) * channels, quant_zero=(127.5,) * channels, quant_adaptive=True,
            channel_weights=weights,
            graphs={role: Graph(file, prec, ROLES[role].image_range["sd"], ROLES[role].memory_per_pixel["sd"], **p)
                    for role, (file, prec, p) in graphs.items()},
            defaults=vae_defaults(channels), files=files, fingerprint=fingerprint, opset=opset_used,
            source=source, architecture="vae")

    return write_model_set(out, specs, describe, plan, progress, agreements)


# TAE latents pass through tanh(x/3)*3 in the decoder: beyond +-6 nothing changes.  VAE-only
# sets, whose latents are in the same (diffusion model's) units, share the mapping.
TAE_LATENT_RANGE = 6.0
TAE_STEP = 2 * TAE_LATENT_RANGE / 255


def decoder_gradient_spec(decoder, split: int | None, channels: int, lh: int, lw: int) -> GraphSpec:
    """The decoder's gradient graph; for a split decoder also its parts: the whole part's
    backward (which also gives the tiles their input) and the local part's gradient, which
    the runtime runs in tiles on images too large for the whole graph."""
    from .tae import DecoderBackward, DecoderGradient

    latent, image, weight = torch.zeros(1, channels, lh, lw), torch.zeros(1, 3, lh * 8, lw * 8), torch.ones(1, 1, lh * 8, lw * 8)
    parts = None
    if split is not None:
        with torch.no_grad():
            features = decoder[:split](latent)
        parts = [GraphSpec("decoder_gradient.whole", DecoderBackward(decoder[:split]), ["latent", "output_gradient"],
                           "gradient", (latent, torch.zeros_like(features)), extra_outputs=("features",)),
                 GraphSpec("decoder_gradient.tiled", DecoderGradient(decoder[split:]), ["features", "image", "weight"],
                           "gradient", (features, image, weight), extra_outputs=("error",))]
    return GraphSpec("decoder_gradient", DecoderGradient(decoder), ["latent", "image", "weight"], "gradient",
                     (latent, image, weight), split=split, extra_outputs=("error",), split_parts=parts)


def vae_gradient_spec(vae, scaling: float, shift: float, channels: int, downscale: int, latent_size) -> GraphSpec:
    """An SD or VAE-only set's decoder gradient graph (``vae_gradient``), whole: its GroupNorms
    span the whole image, so tiles of it are approximate (as the decoder's own)."""
    from .vae_gradient import VaeDecoderGradient

    lh, lw = latent_size
    example = (torch.zeros(1, channels, lh, lw), torch.zeros(1, 3, lh * downscale, lw * downscale),
               torch.ones(1, 1, lh * downscale, lw * downscale))
    return GraphSpec("decoder_gradient", VaeDecoderGradient(vae, scaling, shift), ["latent", "image", "weight"],
                     "gradient", example, extra_outputs=("error",))


def export_tae(folder: str, out: str, plan: ExportPlan, progress=None, latent_space: str | None = None) -> ExportReport:
    """A TAESD-format pair -> model set: image in [0, 1], latent scale 1, no UNet.  With
    ``latent_space`` (a VAE-only set, whose latents are in the same units): the pair joins that
    set's latent space, its files and the set's decoding with either."""
    from .tae import load_tae_pair, tae_splits

    encoder, decoder, channels, variant = load_tae_pair(folder)
    lh, lw = parity_latent_size(1)
    # Pooled (TAEF2) blocks hold GroupNorms, whose statistics span the whole latent: those
    # layers, all at latent resolution, run whole; the rest may run in tiles.
    encoder_split, decoder_split = tae_splits(encoder, decoder)
    specs = [
        GraphSpec("vae_encoder", encoder, ["image"], "latent", (torch.zeros(1, 3, lh * 8, lw * 8),), encoder_split),
        GraphSpec("vae_decoder", decoder, ["latent"], "image", (torch.zeros(1, channels, lh, lw),), decoder_split),
        decoder_gradient_spec(decoder, decoder_split, channels, lh, lw),
    ]
    report(progress, "fingerprint weights", 0, 1)
    weights = decoder_sensitivity(decoder, channels, 1.5)
    agreements = []
    if latent_space is None:
        fingerprint = fingerprint_of({"family": "tae", "encoder": weights_digest(encoder),
                                      "decoder": weights_digest(decoder), "latent_channels": channels})
    else:
        fingerprint, agreement = _join_latent_space(latent_space, encoder, decoder, channels)
        agreements.append(agreement)

    def describe(graphs, files, opset_used):
        return Manifest(
            family="tae", latent_channels=channels, downscale=8, scaling_factor=1.0,
            quant_scale=(TAE_STEP,) * channels, quant_zero=(127.5,) * channels, quant_adaptive=True,
            channel_weights=weights,
            graphs={role: Graph(file, prec, ROLES[role].image_range["tae"],
                                ROLES[role].memory_per_pixel["tae"], **parts)
                    for role, (file, prec, parts) in graphs.items()},
            defaults=tae_defaults(channels),
            files=files, fingerprint=fingerprint, opset=opset_used,
            source={"model": os.path.abspath(folder), "kind": "tae", "variant": variant}
            | ({"latent_space_of": os.path.abspath(latent_space)} if latent_space else {}),
            architecture="tae")

    return write_model_set(out, specs, describe, plan, progress, agreements)


def _join_latent_space(model_dir: str, encoder, decoder, channels: int) -> tuple[str, Agreement]:
    """The fingerprint of the VAE-only set in ``model_dir``, which a TAE pair may share where
    the units agree, and how closely the pair's decoder follows the set's on the pair's latent
    of a test image (the set's decoder run in ONNX Runtime: the set needs no checkpoint)."""
    import onnxruntime as ort

    from sdc_runtime.manifest import load_manifest

    manifest = load_manifest(model_dir)
    if manifest.architecture != "vae":
        raise SdcExportError(f"--latent-space {model_dir} is a {manifest.architecture or manifest.family} set; it takes"
                             " a VAE-only set (exported from a VAE folder), whose latents are in the units a TAE"
                             " pair uses")
    if (manifest.latent_channels, manifest.downscale) != (channels, 8):
        raise SdcExportError(f"--latent-space {model_dir} has {manifest.latent_channels} latent channels at"
                             f" 1/{manifest.downscale} scale; the pair has {channels} at 1/8")
    graph = manifest.graphs["vae_decoder"]
    session = ort.InferenceSession(os.path.join(model_dir, graph.file), providers=["CPUExecutionProvider"])
    lo, hi = graph.image_range

    def set_decode(latent):
        return (session.run(None, {"latent": latent.astype(np.float32)})[0] - lo) / (hi - lo)

    tae_range = ROLES["vae_decoder"].image_range["tae"]
    agreement = decoder_agreement("vae_decoder", f"{model_dir}'s vae_decoder",
                                  _torch_unit(encoder, tae_range, encoder=True), set_decode,
                                  _torch_unit(decoder, tae_range))
    return manifest.fingerprint, agreement
