"""Writing a complete model set: graphs, optional fp16 pass, parity checks, manifest."""
from __future__ import annotations

import hashlib
import json
import math
import os
import shutil
import tempfile
from dataclasses import dataclass, field

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
from .sources import StableDiffusionParts, weights_digest

# Each family's encoder defaults, written into its manifests: the runtime has none of its own.
#
# The quality scale (1..100) of TAE sets: the Pareto frontier of the operating points measured
# on Kodak-24 with TAEF2 (BENCHMARKS.md §3 and §7): two palettes at the low end (u8 is not
# reached that small), then u8 steps, which beat every palette above ~20 KB per Kodak image.
# Mean bytes / PSNR on Kodak: Q1 12.3 KB 23.3 dB, Q20 20.5 KB 25.6 dB, Q60 52.0 KB 29.0 dB,
# Q90 102 KB 30.1 dB.  The default, Q60, costs what the earlier default (palette K=256 G=4,
# 54.9 KB 28.85 dB) did, for more PSNR; above it the curve flattens (Q70: +26% bytes, +0.6 dB).
TAE_U8_QUALITY = (
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


def tae_quality(channels: int) -> tuple[QualityPoint, ...]:
    """TAE's quality scale; the palettes' groups no wider than a set with few channels has."""
    wide = min(8, channels)
    return (QualityPoint(1, "palette", colors=16, group_channels=wide),
            QualityPoint(10, "palette", colors=32, group_channels=wide)) + TAE_U8_QUALITY


def tae_defaults(channels: int) -> EncoderDefaults:
    """TAE: no UNet; nearest-colour palettes (dithering lost ~0.5 dB on Kodak, BENCHMARKS.md);
    effort 1, the default by measured time against gain: its single free pass and four descent
    steps buy 80% of effort 2's gain in 55% of its time (BENCHMARKS.md §7)."""
    return EncoderDefaults(mode="palette", colors=256, group_channels=4, dither=False, denoise_steps=0,
                           denoise_stride=0, eta=0.0, quality=60, effort=1, quality_table=tae_quality(channels))


def sd_quality(channels: int, scaling_factor: float) -> tuple[QualityPoint, ...]:
    """SD's quality scale.  No SD weights exist on this project's machines, so it is not
    measured: the 2022 recipe (palette K=256 G=4, dithered) is Q40 and the default, palettes
    below it, and above it TAE's u8 steps scaled to SD's latent range (the 8-bit mapping
    spans 255 * scaling_factor raw units against TAE's 12)."""
    group = min(4, channels)
    wide = min(8, channels)
    ratio = 255 * scaling_factor / 12.0
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
    parity: list  # Parity (against torch), then Int8Parity (int8 against fp32)
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


def sd_graph_specs(parts: StableDiffusionParts) -> tuple[list[GraphSpec], int, int]:
    vae, unet = parts.vae, parts.unet
    downscale = 2 ** (len(vae.config.block_out_channels) - 1)
    multiple = 2 ** (len(unet.config.block_out_channels) - 1)
    channels = vae.config.latent_channels
    lh, lw = parity_latent_size(multiple)
    specs = [
        GraphSpec("vae_encoder", VaeEncoder(vae).eval(), ["image"], "latent",
                  (torch.zeros(1, 3, lh * downscale, lw * downscale),)),
        GraphSpec("vae_decoder", VaeDecoder(vae).eval(), ["latent"], "image", (torch.zeros(1, channels, lh, lw),)),
        GraphSpec("unet", UNetEmptyPrompt(unet, parts.empty_prompt_embedding).eval(), ["sample", "timestep"],
                  "prediction", (torch.zeros(1, channels, lh, lw), torch.zeros(1))),
    ]
    return specs, downscale, multiple


def write_model_set(out: str, specs: list[GraphSpec], describe, plan: ExportPlan, progress=None) -> ExportReport:
    """Export ``specs`` into a scratch folder beside ``out``, check parity, write the manifest,
    then move the folder into place, in the precisions ``plan`` gives each role (the int8 ones
    quantized by ``int8``, calibrated by running the finished set on the plan's images).
    ``describe(graphs, files, opset)`` builds the Manifest."""
    roles = [spec.role for spec in specs]
    if sorted(roles) != sorted(plan.roles):
        raise SdcExportError(f"the plan names the graphs {', '.join(plan.roles)}; the export writes {', '.join(roles)}")
    prepare_output(out, plan.force)
    parent = os.path.dirname(os.path.abspath(out))
    scratch = tempfile.mkdtemp(prefix=".sdc-export-", dir=parent)
    parity: list = []
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
            from .int8 import quantize_set

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
    if plan.tiny_decoder is not None:
        from .tae import load_tae_decoder

        decoder, tiny_channels = load_tae_decoder(plan.tiny_decoder)
        if tiny_channels != channels:
            raise SdcExportError(f"the tiny decoder takes {tiny_channels} latent channels, the VAE makes {channels}")
        specs.append(GraphSpec("tiny_decoder", ScaledTinyDecoder(decoder, scaling).eval(), ["latent"], "image",
                               specs[1].example))
    scale, zero = sd_quant_mapping(scaling, channels)
    scheduler = scheduler_constants(parts.scheduler_config)
    report(progress, "fingerprint weights", 0, 1)
    weights = decoder_sensitivity(lambda z: vae.decode(z).sample, channels, 1.0 / scaling)
    fingerprint = fingerprint_of({
        "family": "sd", "vae": weights_digest(vae), "unet": weights_digest(parts.unet),
        "empty_prompt": hashlib.sha256(parts.empty_prompt_embedding.numpy().astype("<f4").tobytes()).hexdigest(),
        "latent_channels": channels, "scaling_factor": scaling,
    })

    def describe(graphs, files, opset_used):
        return Manifest(
            family="sd", latent_channels=channels, downscale=downscale, scaling_factor=scaling,
            quant_scale=scale, quant_zero=zero,
            graphs={role: Graph(file, prec, ROLES[role].image_range["sd"],
                                ROLES[role].memory_per_pixel["sd"], **parts)
                    for role, (file, prec, parts) in graphs.items()}, defaults=sd_defaults(channels, scaling),
            files=files, fingerprint=fingerprint, opset=opset_used, source=parts.source,
            scheduler=scheduler, unet_latent_multiple=multiple, channel_weights=weights)

    return write_model_set(out, specs, describe, plan, progress)


# TAE latents pass through tanh(x/3)*3 in the decoder: beyond +-6 nothing changes.
TAE_LATENT_RANGE = 6.0


def export_tae(folder: str, out: str, plan: ExportPlan, progress=None) -> ExportReport:
    """A TAESD-format pair -> model set: image in [0, 1], latent scale 1, no UNet."""
    from .tae import DecoderGradient, load_tae_pair, tae_splits

    encoder, decoder, channels, variant = load_tae_pair(folder)
    lh, lw = parity_latent_size(1)
    # Pooled (TAEF2) blocks hold GroupNorms, whose statistics span the whole latent: those
    # layers, all at latent resolution, run whole; the rest may run in tiles.
    encoder_split, decoder_split = tae_splits(encoder, decoder)
    specs = [
        GraphSpec("vae_encoder", encoder, ["image"], "latent", (torch.zeros(1, 3, lh * 8, lw * 8),), encoder_split),
        GraphSpec("vae_decoder", decoder, ["latent"], "image", (torch.zeros(1, channels, lh, lw),), decoder_split),
        GraphSpec("decoder_gradient", DecoderGradient(decoder), ["latent", "image"], "gradient",
                  (torch.zeros(1, channels, lh, lw), torch.zeros(1, 3, lh * 8, lw * 8))),
    ]
    report(progress, "fingerprint weights", 0, 1)
    weights = decoder_sensitivity(decoder, channels, 1.5)
    fingerprint = fingerprint_of({"family": "tae", "encoder": weights_digest(encoder),
                                  "decoder": weights_digest(decoder), "latent_channels": channels})
    step = 2 * TAE_LATENT_RANGE / 255

    def describe(graphs, files, opset_used):
        return Manifest(
            family="tae", latent_channels=channels, downscale=8, scaling_factor=1.0,
            quant_scale=(step,) * channels, quant_zero=(127.5,) * channels, quant_adaptive=True,
            channel_weights=weights,
            graphs={role: Graph(file, prec, ROLES[role].image_range["tae"],
                                ROLES[role].memory_per_pixel["tae"], **parts)
                    for role, (file, prec, parts) in graphs.items()},
            defaults=tae_defaults(channels),
            files=files, fingerprint=fingerprint, opset=opset_used,
            source={"model": os.path.abspath(folder), "kind": "tae", "variant": variant})

    return write_model_set(out, specs, describe, plan, progress)
