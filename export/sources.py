"""Loading a Stable Diffusion checkpoint with diffusers' own loaders (local folder or hub id)."""
from __future__ import annotations

import os
import warnings
from dataclasses import dataclass

import torch

from sdc_runtime.errors import SdcExportError

from .inputs import check_source


@dataclass
class StableDiffusionParts:
    vae: torch.nn.Module
    unet: torch.nn.Module
    empty_prompt_embedding: torch.Tensor  # (1, tokens, width): the text encoder's output for ""
    scheduler_config: dict
    source: dict


def load_stable_diffusion(src: str, *, revision: str | None = None) -> StableDiffusionParts:
    """Load VAE, UNet, text encoder + tokenizer and scheduler config; compute the "" embedding once."""
    from diffusers import AutoencoderKL, DDIMScheduler, UNet2DConditionModel
    from transformers import CLIPTextModel, CLIPTokenizer

    kind = check_source(src)
    _quiet_loaders()
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            vae = AutoencoderKL.from_pretrained(src, subfolder="vae", revision=revision).eval()
            unet = UNet2DConditionModel.from_pretrained(src, subfolder="unet", revision=revision).eval()
            text_encoder = CLIPTextModel.from_pretrained(src, subfolder="text_encoder", revision=revision).eval()
            tokenizer = CLIPTokenizer.from_pretrained(src, subfolder="tokenizer", revision=revision)
            scheduler_config = dict(DDIMScheduler.load_config(src, subfolder="scheduler", revision=revision))
    except Exception as exc:  # diffusers/transformers/hub raise many unrelated types
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise SdcExportError(f"cannot load {src}: {first}") from None
    tokens = tokenizer([""], padding="max_length", max_length=tokenizer.model_max_length,
                       truncation=True, return_tensors="pt").input_ids
    with torch.no_grad():
        embedding = text_encoder(tokens)[0].float()
    source = {"model": src if kind == "hub" else os.path.abspath(src), "kind": kind, "revision": revision}
    commit = getattr(unet.config, "_commit_hash", None)
    if commit:
        source["commit"] = commit
    return StableDiffusionParts(vae, unet, embedding, scheduler_config, source)


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
