"""What an export checks before it loads anything: the source (a TAESD-format pair, a diffusers
Stable Diffusion or SDXL folder or hub id, or a VAE alone) and the output folder (the options are the
plan's, ``plan.py``).  Without torch, so that a mistyped path or a full folder is reported at once,
not after seconds of imports."""
from __future__ import annotations

import glob
import json
import os
import re
from dataclasses import dataclass

from sdc_runtime.errors import SdcExportError
from sdc_runtime.files import parent_problem

SD_SUBFOLDERS = ("vae", "unet", "text_encoder", "tokenizer", "scheduler")
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")


def find_pair(folder: str) -> tuple[str, str] | None:
    """The (encoder, decoder) .pth files of a TAESD-format folder, or None if it is not one."""
    if not os.path.isdir(folder):
        return None
    encoders = sorted(glob.glob(os.path.join(folder, "*_encoder.pth")))
    decoders = sorted(glob.glob(os.path.join(folder, "*_decoder.pth")))
    if not encoders and not decoders:
        return None
    if len(encoders) != 1 or len(decoders) != 1:
        raise SdcExportError(f"{folder} must hold exactly one *_encoder.pth and one *_decoder.pth "
                          f"(found {len(encoders)} and {len(decoders)})")
    return encoders[0], decoders[0]


# The autoencoder classes a VAE-only set may hold (diffusers' names).
VAE_CLASSES = ("AutoencoderKL", "AutoencoderKLFlux2")
# Pipelines exported whole, with their UNet: diffusers' class name -> the source's kind.
PIPELINES = {"StableDiffusionPipeline": "sd", "StableDiffusionImg2ImgPipeline": "sd",
             "StableDiffusionXLPipeline": "sdxl", "StableDiffusionXLImg2ImgPipeline": "sdxl"}
SUPPORTED = ("a Stable Diffusion 1.x/2.x or SDXL pipeline folder, a folder whose vae/ holds an "
             f"{' or '.join(VAE_CLASSES)}, a VAE folder (config.json at its root), or a TAESD-format pair")


@dataclass(frozen=True)
class Source:
    """What an export reads, told from its files: ``kind`` is 'sd' or 'sdxl' (a pipeline with its
    UNet), 'vae' (an autoencoder alone, in ``subfolder`` of ``path``, of class ``vae_class``)
    or 'tae' (a TAESD-format pair); ``where`` is 'folder' or 'hub'."""

    kind: str
    path: str
    where: str = "folder"
    subfolder: str | None = None
    vae_class: str = "AutoencoderKL"


def _config(path: str) -> dict:
    try:
        with open(path, encoding="utf-8") as fh:
            data = json.load(fh)
    except (OSError, ValueError) as exc:
        raise SdcExportError(f"cannot read {path}: {getattr(exc, 'strerror', None) or exc}") from None
    if not isinstance(data, dict):
        raise SdcExportError(f"{path} is not a JSON object")
    return data


def _vae_source(src: str, subfolder: str | None) -> Source:
    config_path = os.path.join(src, *([subfolder] if subfolder else []), "config.json")
    found = _config(config_path).get("_class_name")
    if found not in VAE_CLASSES:
        raise SdcExportError(f"{config_path} describes {found or 'no _class_name'}; supported autoencoders:"
                             f" {', '.join(VAE_CLASSES)}")
    return Source("vae", src, subfolder=subfolder, vae_class=found)


def classify_source(src: str) -> Source:
    """The kind of checkpoint SRC is, from its files (never its name); raises SdcExportError
    naming what was found and what is supported."""
    if os.path.isdir(src):
        if find_pair(src) is not None:
            return Source("tae", src)
        if os.path.isfile(os.path.join(src, "model_index.json")):
            pipeline = _config(os.path.join(src, "model_index.json")).get("_class_name")
            kind = PIPELINES.get(pipeline)
            if kind is None:
                # Other pipelines (SD3, FLUX) carry a transformer this codec does not run: their VAE
                # alone makes a set, where there is one.
                if os.path.isfile(os.path.join(src, "vae", "config.json")):
                    return _vae_source(src, "vae")
                raise SdcExportError(f"{src} is a {pipeline or 'diffusers'} folder without vae/;"
                                     f" supported: {SUPPORTED}")
            needed = SD_SUBFOLDERS + (("text_encoder_2", "tokenizer_2") if kind == "sdxl" else ())
            missing = [d for d in needed if not os.path.isdir(os.path.join(src, d))]
            if missing:
                raise SdcExportError(f"{src} lacks the subfolder{'s' if len(missing) > 1 else ''}"
                                     f" {', '.join(m + '/' for m in missing)}")
            return Source(kind, src)
        if os.path.isfile(os.path.join(src, "vae", "config.json")):
            return _vae_source(src, "vae")
        if os.path.isfile(os.path.join(src, "config.json")):
            return _vae_source(src, None)
        raise SdcExportError(f"{src} holds no model_index.json, vae/config.json, config.json or *_encoder.pth"
                             f" / *_decoder.pth pair; supported: {SUPPORTED}")
    if os.path.exists(src):
        raise SdcExportError(f"{src} is a file, not a checkpoint folder")
    if _HUB_ID.match(src):
        from huggingface_hub import constants, try_to_load_from_cache

        # Offline, a hub id not in the local cache can only fail: say so now, not after the
        # loaders' retries.
        index = try_to_load_from_cache(src, "model_index.json")
        if constants.HF_HUB_OFFLINE and not isinstance(index, str):
            raise SdcExportError(f"{src} is not found locally (offline: HF_HUB_OFFLINE is set); "
                                 "pass a local folder or go online once to cache it")
        kind = PIPELINES.get(_config(index).get("_class_name"), "sd") if isinstance(index, str) else "sd"
        return Source(kind, src, where="hub")
    raise SdcExportError(f"{src} is neither a folder nor a hub id (owner/name)")


def prepare_output(out: str, force: bool) -> None:
    if os.path.exists(out) and not os.path.isdir(out):
        raise SdcExportError(f"{out} exists and is not a folder")
    if os.path.isdir(out) and os.listdir(out) and not force:
        raise SdcExportError(f"{out} is not empty (use --force to replace it)")
    problem = parent_problem(out)
    if problem:
        raise SdcExportError(f"cannot write {out}: {problem}")
