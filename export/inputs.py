"""What an export checks before it loads anything: the source (a TAESD-format pair or a
diffusers Stable Diffusion folder or hub id) and the output folder (the options are the
plan's, ``plan.py``).  Without torch, so that a mistyped path or a full folder is reported at once,
not after seconds of imports."""
from __future__ import annotations

import glob
import os
import re

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


def check_source(src: str) -> str:
    """'folder' or 'hub'; raises SdcExportError naming what is wrong with SRC."""
    if os.path.isdir(src):
        if not os.path.isfile(os.path.join(src, "model_index.json")):
            raise SdcExportError(f"{src} is not a diffusers Stable Diffusion folder (no model_index.json)")
        missing = [d for d in SD_SUBFOLDERS if not os.path.isdir(os.path.join(src, d))]
        if missing:
            raise SdcExportError(f"{src} lacks the subfolder{'s' if len(missing) > 1 else ''} {', '.join(m + '/' for m in missing)}")
        return "folder"
    if os.path.exists(src):
        raise SdcExportError(f"{src} is a file, not a diffusers folder")
    if _HUB_ID.match(src):
        from huggingface_hub import constants, try_to_load_from_cache

        # Offline, a hub id not in the local cache can only fail: say so now, not after the
        # loaders' retries.
        if constants.HF_HUB_OFFLINE and not isinstance(try_to_load_from_cache(src, "model_index.json"), str):
            raise SdcExportError(f"{src} is not found locally (offline: HF_HUB_OFFLINE is set); "
                              "pass a local diffusers folder or go online once to cache it")
        return "hub"
    raise SdcExportError(f"{src} is neither a folder nor a hub id (owner/name)")


def prepare_output(out: str, force: bool) -> None:
    if os.path.exists(out) and not os.path.isdir(out):
        raise SdcExportError(f"{out} exists and is not a folder")
    if os.path.isdir(out) and os.listdir(out) and not force:
        raise SdcExportError(f"{out} is not empty (use --force to replace it)")
    problem = parent_problem(out)
    if problem:
        raise SdcExportError(f"cannot write {out}: {problem}")
