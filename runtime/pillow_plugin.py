"""Registers the .sdc format with Pillow.

    from sdc_runtime import pillow_plugin
    pillow_plugin.register("models/sd15")          # or set SDC_MODELS
    Image.open("photo.sdc").save("photo.png")
    image.save("photo.sdc", colors=128, mode="palette")

Decoding is lazy: ``Image.open`` reads only the header (size, mode); ``load()`` runs the
model.  Save options are the codec's encoder options (``EncodeOptions``), checked in Python
with the codec's own errors.
"""
from __future__ import annotations

import os
import threading

from PIL import Image, ImageFile

from . import options as encode_options
from .bitstream import sdc_check, sdc_info, sdc_metadata
from .codec import SdcCodec
from .errors import SdcInputError

FORMAT = "SDC"

_default_models: str | None = None
_provider = "cpu"
_codecs: dict[tuple[str, str], SdcCodec] = {}
_lock = threading.Lock()


def register(models: str | os.PathLike | None = None, *, provider: str = "cpu") -> None:
    """Register the format; ``models`` (else $SDC_MODELS) is the model set used to decode and encode."""
    global _default_models, _provider
    if models is not None:
        _default_models = os.fspath(models)
    _provider = provider
    Image.register_open(FORMAT, SdcImageFile, _accept)
    Image.register_save(FORMAT, _save)
    Image.register_extension(FORMAT, ".sdc")
    Image.register_mime(FORMAT, "image/x-sdc")


def _codec() -> SdcCodec:
    models = _default_models or os.environ.get("SDC_MODELS")
    if not models:
        raise SdcInputError("no model set for .sdc images: call pillow_plugin.register(models) or set SDC_MODELS")
    with _lock:
        key = (models, _provider)
        if key not in _codecs:
            _codecs[key] = SdcCodec(models, provider=_provider)
        return _codecs[key]


def _accept(prefix: bytes) -> bool:
    return sdc_check(prefix)


class SdcImageFile(ImageFile.ImageFile):
    format = FORMAT
    format_description = "sdcodec latent image"

    def _open(self):
        data = self.fp.read()
        details = sdc_info(data)  # validates the whole container; no model needed
        self._size = (details["width"], details["height"])
        # As Pillow's own plugins do: the mode and the metadata from the file at open, so that
        # convert() and save() see them before (and without) a decode.
        alpha = "alpha" in details["sections"]
        grey = {0: "RGBA" if alpha else "RGB", 8: "LA" if alpha else "L", 16: "LA" if alpha else "I;16"}
        self._mode = grey[details["grey_bits"]]
        self.info.update(sdc_metadata(data))
        self.info["sdc"] = details
        self._sdc_data = data
        self.tile = []

    def load(self):
        if getattr(self, "_sdc_data", None) is not None:
            decoded = _codec().decode(self._sdc_data)
            self._sdc_data = None
            self.im = decoded.im
        return Image.Image.load(self)


def encoder_keywords(encoderinfo: dict) -> dict:
    """The save keywords as encoder options: every option EncodeOptions declares, by its name.
    Unknown names are refused (SdcInputError), as the codec refuses them."""
    known = {spec.name for spec in encode_options.ENCODE_OPTIONS}
    unknown = sorted(set(encoderinfo) - known)
    if unknown:
        raise SdcInputError(f"unknown encoder option(s) {', '.join(unknown)}; known: {', '.join(sorted(known))}")
    return dict(encoderinfo)


def _save(image: Image.Image, fp, filename) -> None:
    # Checked before any model work.
    fp.write(_codec().encode(image, **encoder_keywords(image.encoderinfo)))
