"""Loading a Stable Diffusion checkpoint with diffusers' own loaders (local folder or hub id)."""
from __future__ import annotations

import math
import os
import warnings
from dataclasses import dataclass

import torch

from sdc_runtime.errors import SdcExportError

from .inputs import Source


@dataclass
class StableDiffusionParts:
    vae: torch.nn.Module
    unet: torch.nn.Module
    empty_prompt_embedding: torch.Tensor  # (1, tokens, width): the text encoder(s)' output for ""
    scheduler_config: dict
    source: dict
    # SDXL: the second text encoder's pooled projection of "" (the UNet's text_embeds); None for SD.
    pooled_embedding: torch.Tensor | None = None

    @property
    def architecture(self) -> str:
        return "sd" if self.pooled_embedding is None else "sdxl"


@dataclass
class VaeParts:
    """An autoencoder alone.  Its latents in the diffusion model's units are
    ``(raw - shift_factor) * scaling_factor``: the units the set's graphs use."""

    vae: torch.nn.Module
    scaling_factor: float
    shift_factor: float
    source: dict


def _first_line(exc: Exception) -> str:
    return str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__


def _described(src: Source, revision: str | None) -> dict:
    return {"model": src.path if src.where == "hub" else os.path.abspath(src.path), "kind": src.where,
            "revision": revision}


def load_stable_diffusion(src: Source, *, revision: str | None = None) -> StableDiffusionParts:
    """Load VAE, UNet, text encoder(s) + tokenizer(s) and scheduler config; the "" conditioning
    computed once, as the pipeline computes it (SDXL: both encoders' hidden states and the
    second one's pooled projection, by the pipeline's own ``encode_prompt``)."""
    from diffusers import AutoencoderKL, DDIMScheduler, UNet2DConditionModel
    from transformers import CLIPTextModel, CLIPTokenizer

    _quiet_loaders()
    pooled = None
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            if src.kind == "sdxl":
                from diffusers import StableDiffusionXLPipeline

                pipe = StableDiffusionXLPipeline.from_pretrained(src.path, revision=revision)
                vae, unet = pipe.vae.eval(), pipe.unet.eval()
                with torch.no_grad():
                    embedding, _, pooled, _ = pipe.encode_prompt("", device="cpu", num_images_per_prompt=1,
                                                                 do_classifier_free_guidance=False)
                embedding, pooled = embedding.float(), pooled.float()
            else:
                vae = AutoencoderKL.from_pretrained(src.path, subfolder="vae", revision=revision).eval()
                unet = UNet2DConditionModel.from_pretrained(src.path, subfolder="unet", revision=revision).eval()
                text_encoder = CLIPTextModel.from_pretrained(src.path, subfolder="text_encoder",
                                                             revision=revision).eval()
                tokenizer = CLIPTokenizer.from_pretrained(src.path, subfolder="tokenizer", revision=revision)
                tokens = tokenizer([""], padding="max_length", max_length=tokenizer.model_max_length,
                                   truncation=True, return_tensors="pt").input_ids
                with torch.no_grad():
                    embedding = text_encoder(tokens)[0].float()
            scheduler_config = dict(DDIMScheduler.load_config(src.path, subfolder="scheduler", revision=revision))
    except Exception as exc:  # diffusers/transformers/hub raise many unrelated types
        raise SdcExportError(f"cannot load {src.path}: {_first_line(exc)}") from None
    if src.kind == "sdxl" and getattr(unet.config, "addition_embed_type", None) != "text_time":
        raise SdcExportError(f"{src.path}: an SDXL pipeline whose UNet takes no text_time conditioning"
                             f" (addition_embed_type {getattr(unet.config, 'addition_embed_type', None)!r})")
    source = _described(src, revision)
    commit = getattr(unet.config, "_commit_hash", None)
    if commit:
        source["commit"] = commit
    return StableDiffusionParts(vae, unet, embedding, scheduler_config, source, pooled)


# What a standalone VAE without a scaling_factor in its config could be: the families share
# architectures (SD and SDXL 4 channels, SD3 and FLUX.1 16), so none is assumed.
SCALING_HINT = ("--scaling-factor (SD 1.x/2.x 0.18215, SDXL 0.13025, SD3 1.5305 with --shift-factor 0.0609,"
                " FLUX.1 0.3611 with --shift-factor 0.1159)")


def load_vae(src: Source, *, revision: str | None = None, scaling_factor: float | None = None,
             shift_factor: float | None = None) -> VaeParts:
    """An autoencoder alone (``src.kind == 'vae'``), with the constants that put its latents in
    the diffusion model's units: the options' where given, else its config's.  FLUX.2's
    autoencoder is used unscaled (its pipeline normalizes patchified latents instead, and TAEF2
    takes them raw)."""
    import diffusers

    _quiet_loaders()
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            vae = getattr(diffusers, src.vae_class).from_pretrained(
                src.path, **({"subfolder": src.subfolder} if src.subfolder else {}), revision=revision).eval()
    except Exception as exc:
        raise SdcExportError(f"cannot load {src.path}: {_first_line(exc)}") from None
    # The config as written: diffusers fills in 0.18215 where the file says nothing.
    written = vae.config.get("_use_default_values", [])
    if scaling_factor is None:
        if src.vae_class == "AutoencoderKLFlux2":
            scaling_factor = 1.0
        elif "scaling_factor" in written or vae.config.get("scaling_factor") is None:
            raise SdcExportError(f"{src.path}: its config gives no scaling_factor; set it with {SCALING_HINT}")
        else:
            scaling_factor = float(vae.config.scaling_factor)
    if shift_factor is None:
        shift_factor = float(vae.config.get("shift_factor") or 0.0)
    if not (math.isfinite(scaling_factor) and scaling_factor > 0 and math.isfinite(shift_factor)):
        raise SdcExportError(f"scaling factor {scaling_factor} and shift factor {shift_factor}: the scaling must be"
                             " a positive number and the shift finite")
    source = _described(src, revision) | {"class": src.vae_class}
    return VaeParts(vae, float(scaling_factor), float(shift_factor), source)


def _quiet_loaders() -> None:
    """The export has its own progress bar; the loaders' info lines and bars are noise."""
    import diffusers
    import transformers

    diffusers.utils.logging.set_verbosity_error()
    diffusers.utils.logging.disable_progress_bar()
    transformers.utils.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()


def weights_digest(module: torch.nn.Module) -> str:
    """sha256 of a module's state dict as float32 little-endian bytes, in key order.

    The same checkpoint gives the same digest whatever precision it is exported at, so a file
    encoded with the fp32 set decodes with the fp16 set.
    """
    import hashlib

    digest = hashlib.sha256()
    for name, tensor in sorted(module.state_dict().items()):
        digest.update(name.encode())
        digest.update(tensor.detach().to(torch.float32).contiguous().numpy().astype("<f4").tobytes())
    return digest.hexdigest()
