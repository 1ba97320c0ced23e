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

from sdc_runtime.latent import sd_quant_mapping
from sdc_runtime.manifest import MANIFEST_NAME, Graph, Manifest, Scheduler, sha256_file
from sdc_runtime.options import EncoderDefaults

from . import DEFAULT_OPSET, ExportError
from .graphs import (
    GraphSpec, Parity, UNetEmptyPrompt, VaeDecoder, VaeEncoder, check_parity,
    convert_fp16, export_graph,
)
from .sources import StableDiffusionParts, weights_digest


# Each family's encoder defaults, written into its manifests: the runtime has none of its own.
# SD: the 2022 experiment: 256 colours with dithering, 3 DDIM steps at stride 15 (t = 30, 15, 0), eta 0.9.
SD_DEFAULTS = EncoderDefaults(mode="palette", colors=256, group_channels=4, dither=True,
                              denoise_steps=3, denoise_stride=15, eta=0.9)
# TAE: no UNet; measured on Kodak (BENCHMARKS.md), nearest-colour mapping beats dithering by ~0.5 dB.
TAE_DEFAULTS = EncoderDefaults(mode="palette", colors=256, group_channels=4, dither=False,
                               denoise_steps=0, denoise_stride=0, eta=0.0)


# Working memory per image pixel of each graph on the CPU EP, in bytes: the slope of peak RSS
# between two image sizes (/usr/bin/time -v, BENCHMARKS.md "Tiled neural stages"), rounded up.
# The runtime sizes its tiles from these; the UNet's is per image pixel too (latent cell / 64).
MEMORY_PER_PIXEL = {
    "sd": {"vae_encoder": 2100, "vae_decoder": 4200, "unet": 5400, "tiny_decoder": 1100},
    "tae": {"vae_encoder": 1100, "vae_decoder": 1100},
}


@dataclass
class ExportReport:
    manifest: Manifest
    parity: list[Parity]
    sizes: dict[str, int] = field(default_factory=dict)


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


def write_model_set(out: str, specs: list[GraphSpec], describe, *, fp16: bool, opset: int,
                    force: bool, progress=None) -> ExportReport:
    """Export ``specs`` into a scratch folder beside ``out``, check parity, write the manifest,
    then move the folder into place.  ``describe(graphs, files, opset)`` builds the Manifest."""
    prepare_output(out, force)
    parent = os.path.dirname(os.path.abspath(out))
    scratch = tempfile.mkdtemp(prefix=".sdc-export-", dir=parent)
    precision = "fp16" if fp16 else "fp32"
    parity: list[Parity] = []
    try:
        parts: dict[str, dict[str, str]] = {}
        for spec in specs:
            for graph in [spec] + (spec.parts() if spec.split is not None else []):
                path = os.path.join(scratch, f"{graph.role}.onnx")
                _step(progress, f"export {graph.role}")
                export_graph(graph, path, opset)
                if fp16:
                    _step(progress, f"fp16 {graph.role}")
                    convert_fp16(path)
                _step(progress, f"parity {graph.role}")
                parity.append(check_parity(graph, path, precision))
                if graph is not spec:
                    parts.setdefault(spec.role, {})[graph.role.rsplit(".", 1)[1]] = f"{graph.role}.onnx"
        failed = [p for p in parity if not p.passed]
        if failed:
            raise ExportError("parity check failed: " + "; ".join(p.line() for p in failed))
        _step(progress, "hash files")
        files = {name: sha256_file(os.path.join(scratch, name)) for name in sorted(os.listdir(scratch))}
        graphs = {spec.role: (f"{spec.role}.onnx", precision, parts.get(spec.role, {})) for spec in specs}
        manifest = describe(graphs, files, opset)
        manifest.validate()
        with open(os.path.join(scratch, MANIFEST_NAME), "w", encoding="utf-8") as fh:
            fh.write(manifest.to_json())
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
    return ExportReport(manifest, parity, sizes)


def prepare_output(out: str, force: bool) -> None:
    if os.path.exists(out) and not os.path.isdir(out):
        raise ExportError(f"{out} exists and is not a folder")
    if os.path.isdir(out) and os.listdir(out) and not force:
        raise ExportError(f"{out} is not empty (use --force to replace it)")
    parent = os.path.dirname(os.path.abspath(out))
    if not os.path.isdir(parent):
        raise ExportError(f"cannot write {out}: {parent} does not exist")
    if not os.access(parent, os.W_OK | os.X_OK):
        raise ExportError(f"cannot write {out}: {parent} is not writable")


def _step(progress, text: str) -> None:
    if progress is not None:
        progress(text)


def export_stable_diffusion(parts: StableDiffusionParts, out: str, *, fp16: bool = False,
                            opset: int = DEFAULT_OPSET, force: bool = False, tiny_decoder: str | None = None,
                            progress=None) -> ExportReport:
    specs, downscale, multiple = sd_graph_specs(parts)
    vae = parts.vae
    channels = vae.config.latent_channels
    scaling = float(vae.config.scaling_factor)
    if tiny_decoder is not None:
        from .tae import load_tae_decoder

        decoder, tiny_channels = load_tae_decoder(tiny_decoder)
        if tiny_channels != channels:
            raise ExportError(f"the tiny decoder takes {tiny_channels} latent channels, the VAE makes {channels}")
        specs.append(GraphSpec("tiny_decoder", ScaledTinyDecoder(decoder, scaling).eval(), ["latent"], "image",
                               specs[1].example))
    scale, zero = sd_quant_mapping(scaling, channels)
    scheduler = scheduler_constants(parts.scheduler_config)
    _step(progress, "fingerprint weights")
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
            graphs={role: Graph(file, prec, (0.0, 1.0) if role == "tiny_decoder" else (-1.0, 1.0),
                                MEMORY_PER_PIXEL["sd"][role], **parts)
                    for role, (file, prec, parts) in graphs.items()}, defaults=SD_DEFAULTS,
            files=files, fingerprint=fingerprint, opset=opset_used, source=parts.source,
            scheduler=scheduler, unet_latent_multiple=multiple, channel_weights=weights)

    return write_model_set(out, specs, describe, fp16=fp16, opset=opset, force=force, progress=progress)


# TAE latents pass through tanh(x/3)*3 in the decoder: beyond +-6 nothing changes.
TAE_LATENT_RANGE = 6.0


def export_tae(folder: str, out: str, *, fp16: bool = False, opset: int = DEFAULT_OPSET, force: bool = False,
               progress=None) -> ExportReport:
    """A TAESD-format pair -> model set: image in [0, 1], latent scale 1, no UNet."""
    from .tae import load_tae_pair, tae_splits

    encoder, decoder, channels, variant = load_tae_pair(folder)
    lh, lw = parity_latent_size(1)
    # Pooled (TAEF2) blocks hold GroupNorms, whose statistics span the whole latent: those
    # layers, all at latent resolution, run whole; the rest may run in tiles.
    encoder_split, decoder_split = tae_splits(encoder, decoder)
    specs = [
        GraphSpec("vae_encoder", encoder, ["image"], "latent", (torch.zeros(1, 3, lh * 8, lw * 8),), encoder_split),
        GraphSpec("vae_decoder", decoder, ["latent"], "image", (torch.zeros(1, channels, lh, lw),), decoder_split),
    ]
    _step(progress, "fingerprint weights")
    weights = decoder_sensitivity(decoder, channels, 1.5)
    fingerprint = fingerprint_of({"family": "tae", "encoder": weights_digest(encoder),
                                  "decoder": weights_digest(decoder), "latent_channels": channels})
    step = 2 * TAE_LATENT_RANGE / 255

    def describe(graphs, files, opset_used):
        return Manifest(
            family="tae", latent_channels=channels, downscale=8, scaling_factor=1.0,
            quant_scale=(step,) * channels, quant_zero=(127.5,) * channels, quant_adaptive=True,
            channel_weights=weights,
            graphs={role: Graph(file, prec, (0.0, 1.0), MEMORY_PER_PIXEL["tae"][role], **parts)
                    for role, (file, prec, parts) in graphs.items()},
            defaults=TAE_DEFAULTS,
            files=files, fingerprint=fingerprint, opset=opset_used,
            source={"model": os.path.abspath(folder), "kind": "tae", "variant": variant})

    return write_model_set(out, specs, describe, fp16=fp16, opset=opset, force=force, progress=progress)
