"""Image stage: input images of any Pillow mode -> RGB, alpha and metadata; pixels <-> a
graph's value range; output images in the format asked for, with their metadata."""
from __future__ import annotations

import io
import math
import os
import warnings
from dataclasses import dataclass, field

import numpy as np
from PIL import Image, ImageCms, ImageOps, PngImagePlugin, UnidentifiedImageError

from .errors import SdcInputError, SdcLimitError

# Output formats that carry each kind of metadata (Pillow's save options).
METADATA_FORMATS = {"PNG", "JPEG", "WEBP"}
ALPHA_FORMATS = {"PNG", "WEBP", "TIFF", "GIF", "BMP"}


class SdcWarning(UserWarning):
    """Something about an input the codec handled, but a user should know (extra frames)."""


@dataclass
class Picture:
    """An input image as the codec codes it: (H, W, 3) uint8 RGB, (H, W) uint8 alpha or None
    when opaque, the metadata to carry (icc_profile, exif, xmp), and ``grey_bits``: 0 for a
    colour image, 8 or 16 for a grey one (decoded to one channel of that depth)."""

    rgb: np.ndarray
    alpha: np.ndarray | None = None
    metadata: dict[str, bytes] = field(default_factory=dict)
    grey_bits: int = 0


# Pillow modes of grey images, and the depth a decoder gives them back in.
GREY_MODES = {"1": 8, "L": 8, "LA": 8, "La": 8, "F": 8, "I": 16}


def check_pixel_limit(width: int, height: int, max_pixels: int | None) -> None:
    """SdcLimitError where an image is over ``max_pixels``: the one error of that cause, on
    encode and decode alike."""
    if max_pixels is not None and width * height > max_pixels:
        raise SdcLimitError(f"image of {width}x{height} is over the pixel limit of {max_pixels}"
                            " (raise it with max_pixels= or --max-pixels)")


def load_image(source, *, max_pixels: int | None = None) -> Image.Image:
    """A path, bytes or file object -> PIL image; unreadable input is an SdcInputError.

    The size is checked against ``max_pixels`` from the header, before the pixels are decoded.
    """
    try:
        if isinstance(source, (bytes, bytearray, memoryview)):
            source = io.BytesIO(source)
        with warnings.catch_warnings():
            # The pixel limit is ours (max_pixels): Pillow's own bomb check would only repeat it.
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            image = Image.open(source)
            check_pixel_limit(image.width, image.height, max_pixels)
            frames = getattr(image, "n_frames", 1)
            if frames > 1:
                warnings.warn(f"the input has {frames} frames; only the first is encoded", SdcWarning, stacklevel=2)
            image.load()
        return image
    except SdcLimitError:
        raise
    except Image.DecompressionBombError as exc:  # Pillow's own limit, checked inside Image.open
        raise SdcLimitError(f"cannot read the input image: {exc} (Pillow's limit: Image.MAX_IMAGE_PIXELS)") from None
    except UnidentifiedImageError:  # its message holds the source's repr: a file object's address
        what = os.fspath(source) if isinstance(source, (str, os.PathLike)) else "the input"
        raise SdcInputError(f"cannot read {what}: not an image format Pillow reads") from None
    except (OSError, ValueError) as exc:
        raise SdcInputError(f"cannot read the input image: {exc}") from None


def _from_16bit(values: np.ndarray) -> np.ndarray:
    """0..65535 -> 0..255, rounded (x / 257: 65535 -> 255 exactly)."""
    return ((np.clip(values.astype(np.int64), 0, 65535) * 255 + 32767) // 65535).astype(np.uint8)


def picture_of(image: Image.Image) -> Picture:
    """Any Pillow image -> Picture.  EXIF orientation is applied (and reset in the EXIF
    carried).  Grey scales use their full range: I;16* and I as 0..65535, F (float) as 0..1;
    everything else goes through Pillow's own conversion."""
    image = ImageOps.exif_transpose(image) or image
    metadata = {}
    if image.info.get("icc_profile"):
        metadata["icc_profile"] = bytes(image.info["icc_profile"])
    if image.info.get("exif"):
        metadata["exif"] = bytes(image.info["exif"])
    xmp = image.info.get("xmp") or image.info.get("XML:com.adobe.xmp")
    if xmp:
        metadata["xmp"] = xmp.encode() if isinstance(xmp, str) else bytes(xmp)
    space = _profile_space(metadata.get("icc_profile"))
    if image.mode == "CMYK" and space == "CMYK":
        image = _cmyk_to_srgb(image)
        metadata.pop("icc_profile")
        space = None
    mode, alpha = image.mode, None
    if mode.startswith("I;16") or mode == "I":
        grey = _from_16bit(np.asarray(image))
    elif mode == "F":
        grey = np.rint(np.clip(np.nan_to_num(np.asarray(image, np.float64)), 0.0, 1.0) * 255).astype(np.uint8)
    else:
        grey = None
    if grey is not None:
        rgb = np.repeat(grey[:, :, None], 3, axis=2)
    else:
        has_alpha = "A" in image.getbands() or (mode == "P" and "transparency" in image.info) or (
            mode in ("L", "RGB") and "transparency" in image.info)
        try:
            converted = image.convert("RGBA" if has_alpha else "RGB")
        except ValueError as exc:
            raise SdcInputError(f"cannot convert an image of mode {mode} to RGB: {exc}") from None
        array = np.asarray(converted)
        rgb = np.ascontiguousarray(array[:, :, :3])
        if has_alpha and array[:, :, 3].min() < 255:
            alpha = np.ascontiguousarray(array[:, :, 3])
    grey_bits = 16 if mode.startswith("I;16") else GREY_MODES.get(mode, 0)
    if space is not None and space != ("GRAY" if grey_bits else "RGB"):
        warnings.warn(f"the ICC profile describes {space} data, not the {'grey' if grey_bits else 'RGB'} image"
                      " coded: it is dropped", SdcWarning, stacklevel=3)
        metadata.pop("icc_profile")
    return Picture(rgb, alpha, metadata, grey_bits)


def _profile_space(icc: bytes | None) -> str | None:
    """The colour space an ICC profile describes ('RGB', 'GRAY', 'CMYK', 'Lab', ...); None
    without one, or for bytes littlecms cannot read (carried as they are)."""
    if not icc:
        return None
    try:
        return ImageCms.ImageCmsProfile(io.BytesIO(icc)).profile.xcolor_space.strip()
    except (OSError, ImageCms.PyCMSError):
        return None


def _cmyk_to_srgb(image: Image.Image) -> Image.Image:
    """A colour-managed CMYK image in sRGB, through its own profile (the output carries no
    profile: untagged RGB is sRGB); Pillow's plain conversion would ignore the profile."""
    source = ImageCms.ImageCmsProfile(io.BytesIO(image.info["icc_profile"]))
    return ImageCms.profileToProfile(image, source, ImageCms.createProfile("sRGB"), outputMode="RGB")


def shown_as_coded(image: Image.Image, grey_bits: int) -> Image.Image:
    """A decoded RGB(A) image as its file says the input was: grey images as their luma (L or
    LA; I;16 for 16-bit grey without alpha), colour ones as they are."""
    if not grey_bits:
        return image
    info = dict(image.info)
    if image.mode == "RGBA":
        grey = image.convert("LA")
    elif grey_bits == 16:
        grey = Image.fromarray(np.asarray(image.convert("L")).astype(np.uint16) * np.uint16(257))  # I;16
    else:
        grey = image.convert("L")
    grey.info.update(info)
    return grey


def to_picture(image, *, max_pixels: int | None = None) -> Picture:
    """A PIL image or an (H, W, 3) uint8 array -> Picture.  The size is checked against
    ``max_pixels`` before anything is converted or allocated."""
    if isinstance(image, np.ndarray):
        if image.ndim != 3 or image.shape[2] != 3 or image.dtype != np.uint8:
            raise SdcInputError("an array image must be (H, W, 3) uint8")
        check_pixel_limit(image.shape[1], image.shape[0], max_pixels)
        picture = Picture(image)
    elif isinstance(image, Image.Image):
        check_pixel_limit(image.width, image.height, max_pixels)
        picture = picture_of(image)
    else:
        raise SdcInputError(f"expected a PIL image or an (H, W, 3) uint8 array, not {type(image).__name__}")
    if picture.rgb.shape[0] < 1 or picture.rgb.shape[1] < 1:
        raise SdcInputError("the image is empty")
    return picture


def pad_to(pixels: np.ndarray, downscale: int) -> np.ndarray:
    """(H, W, 3) -> edge-replicated to multiples of downscale (the decoder crops back)."""
    height, width = pixels.shape[:2]
    return np.ascontiguousarray(np.pad(pixels, ((0, -height % downscale), (0, -width % downscale), (0, 0)),
                                       mode="edge"))


def to_graph_input(pixels: np.ndarray, value_range: tuple[float, float]) -> np.ndarray:
    """(h, w, 3) uint8 -> (1, 3, h, w) float32 in a graph's value range."""
    lo, hi = value_range
    array = pixels.astype(np.float32) / np.float32(255) * np.float32(hi - lo) + np.float32(lo)
    return np.ascontiguousarray(array.transpose(2, 0, 1)[None])


def graph_output_to_levels(array: np.ndarray, value_range: tuple[float, float]) -> np.ndarray:
    """(1, 3, h, w) graph output -> (h, w, 3) float32 on the 0..255 scale, not yet clipped."""
    lo, hi = value_range
    return (array[0].transpose(1, 2, 0) - np.float32(lo)) * np.float32(255 / (hi - lo))


def to_uint8(levels: np.ndarray) -> np.ndarray:
    return np.rint(np.clip(levels, 0.0, 255.0)).astype(np.uint8)


def image_format_for(path: str) -> str:
    """Pillow format name for an output path's extension (PNG for '-' / stdout)."""
    if path == "-":
        return "PNG"
    Image.init()  # all of Pillow's plugins: WebP, TIFF, ... are known by extension
    ext = os.path.splitext(path)[1].lower()
    fmt = Image.registered_extensions().get(ext)
    if fmt is None or fmt not in Image.SAVE:
        raise SdcInputError(f"cannot tell an image format from the extension {ext or '(none)'!r} of {path}")
    return fmt


def image_bytes(image: Image.Image, fmt: str, *, quality: int | None = None) -> bytes:
    """Encode an output image, with the metadata it carries in ``info`` where the format holds
    it, alpha where it holds alpha, and ``quality`` for lossy formats."""
    options = {}
    if fmt in METADATA_FORMATS:
        for name in ("icc_profile", "exif"):
            if image.info.get(name):
                options[name] = image.info[name]
        if image.info.get("xmp"):
            if fmt == "PNG":  # Pillow writes PNG XMP only as this iTXt chunk
                info = PngImagePlugin.PngInfo()
                info.add_itxt("XML:com.adobe.xmp", image.info["xmp"].decode("utf-8", "replace"))
                options["pnginfo"] = info
            else:
                options["xmp"] = image.info["xmp"]
    if quality is not None and fmt in ("JPEG", "WEBP", "AVIF"):
        options["quality"] = quality
    if image.mode in ("RGBA", "LA") and fmt not in ALPHA_FORMATS:
        image = image.convert(image.mode[:-1])
    if image.mode == "I;16" and fmt != "PNG":  # PNG alone holds 16-bit grey among the outputs
        image = Image.fromarray((np.asarray(image) // 257).astype(np.uint8), "L")
    buffer = io.BytesIO()
    image.save(buffer, format=fmt, **options)
    return buffer.getvalue()


def psnr(reference: np.ndarray, test: np.ndarray, peak: float = 255.0) -> float:
    """PSNR in dB of ``test`` against ``reference`` (arrays of one shape, values up to ``peak``):
    the one every part of the project scores with."""
    error = float(np.mean(np.square(np.asarray(reference, np.float64) - np.asarray(test, np.float64))))
    return math.inf if error == 0 else 10 * math.log10(peak ** 2 / error)
