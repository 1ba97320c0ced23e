"""Calibration: the images, and every input feed the runtime gives each graph of the set."""
from __future__ import annotations

import hashlib
import os
from collections import defaultdict

import numpy as np

from sdc_runtime.errors import SdcExportError
from sdc_runtime.progress import report

from .ops import CALIBRATION_SIDE, MIN_CALIBRATION_IMAGES
from .recipe import DEFAULT_RECIPE, Int8Recipe


def calibration_side(text: str) -> int:
    """The argparse type of --calibration-side, for sdc-export and sdc-bench alike: 0 (whole
    images) or a crop's side in pixels."""
    import argparse

    try:
        side = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be a whole number of pixels, not {text!r}") from None
    if side < 0:
        raise argparse.ArgumentTypeError(f"must be 0 (whole images) or a side in pixels, not {side}")
    return side


def calibration_images(folder: str, count: int, side: int = CALIBRATION_SIDE) -> list[np.ndarray]:
    """The first ``count`` images of ``folder`` (sorted by name), centre-cropped to ``side``
    (smaller images, and every image with ``side`` 0, whole) as uint8 RGB."""
    from PIL import Image, UnidentifiedImageError

    if not os.path.isdir(folder):
        raise SdcExportError(f"--calibration {folder} is not a folder")
    images = []
    for name in sorted(os.listdir(folder)):
        path = os.path.join(folder, name)
        if not os.path.isfile(path) or name.startswith("."):
            continue
        try:
            with Image.open(path) as im:
                im = im.convert("RGB")
                w, h = im.size
                side_w, side_h = (w, h) if side == 0 else (min(w, side), min(h, side))
                left, top = (w - side_w) // 2, (h - side_h) // 2
                images.append(np.asarray(im.crop((left, top, left + side_w, top + side_h))))
        except (UnidentifiedImageError, OSError):
            continue  # not an image: calibration folders hold other files too
        if len(images) == count:
            break
    if len(images) < MIN_CALIBRATION_IMAGES:
        raise SdcExportError(f"--calibration {folder}: needs at least {MIN_CALIBRATION_IMAGES} images Pillow can read,"
                          f" found {len(images)}")
    return images


def record_graph_inputs(model_dir: str, images: list[np.ndarray], progress=None, *,
                        recipe: Int8Recipe = DEFAULT_RECIPE) -> dict[str, list[dict]]:
    """Run the set's codec on ``images`` and record, per graph file, every input feed the
    runtime gives it: the encoder's images, the UNet's latents at the timesteps the runtime
    uses, the decoders' dequantized latents of the scale's qualities, whole and in tiles, as the set's
    default encoder effort writes them."""
    from sdc_runtime import SdcCodec
    from sdc_runtime.manifest import load_manifest

    # Each feed once: the encoder loop decodes the same unquantized latent at every quality,
    # the decode of a finished file repeats the loop's decode of its candidate, and an image
    # no larger than a tile runs whole in the tiled pass too; a repeated feed would only
    # crowd out others in the fits' picks.
    seen: set[bytes] = set()
    feeds: dict[str, list[dict]] = defaultdict(list)

    def record(file: str, graph_feeds: dict) -> None:
        digest = hashlib.blake2b(file.encode())
        for a in graph_feeds.values():
            digest.update(repr(a.shape).encode())
            digest.update(np.ascontiguousarray(a, np.float32).tobytes())
        if digest.digest() not in seen:
            seen.add(digest.digest())
            feeds[file].append({name: np.array(a, np.float32) for name, a in graph_feeds.items()})

    tile = recipe.calibration_tile
    if any(graph.tiled for graph in load_manifest(model_dir).graphs.values()):
        tile = max(recipe.min_calibration_tile, min(tile, max(max(rgb.shape[:2]) for rgb in images) // 2))
    for tile_size, qualities in ((0, recipe.calibration_qualities), (tile, recipe.calibration_tiled_qualities)):
        codec = SdcCodec(model_dir, tile_size=tile_size)
        codec.stages.observe_feeds(record)
        # The parts of split decoders run only in tiles, and exact tiles are larger than the
        # calibration crops: tile them as asked.
        codec.stages.exact_tiles = False
        effort = codec.options().effort
        for done, rgb in enumerate(images, 1):
            report(progress, f"calibrate{' in tiles' if tile_size else ''}", done - 1, len(images))
            if effort:
                # The files of the set's default effort: its encoder loop decodes candidates,
                # and the decoders then read latents descended for the fp32 decoder, which
                # reach ranges the plain latents do not (BENCHMARKS.md §8).
                for quality in qualities:
                    codec.decode(codec.encode(rgb, quality=quality))
            else:
                latent, size = codec.image_to_latent(rgb)  # one encoder run serves every quality
                for quality in qualities:
                    codec.decode(codec.encode_latent(latent, size, quality=quality))
        report(progress, f"calibrate{' in tiles' if tile_size else ''}", len(images), len(images))
    return dict(feeds)


class CalibrationFeeds:
    """onnxruntime's CalibrationDataReader protocol over recorded feeds, in ranges."""

    def __init__(self, feeds: list[dict]):
        self._feeds = feeds
        self._next, self._end = 0, len(feeds)

    def __len__(self) -> int:
        return len(self._feeds)

    def set_range(self, start_index: int, end_index: int) -> None:
        self._next, self._end = start_index, end_index

    def get_next(self):
        if self._next >= self._end:
            return None
        self._next += 1
        return self._feeds[self._next - 1]


def drawn_feeds(feeds: list[dict], count: int) -> list[dict]:
    """``count`` of ``feeds``, or all if fewer: one drawn at random (seeded) from each of
    ``count`` equal runs of the list, in order.

    Why not a stride: the calibration records each image's feeds in one repeating order (per
    quality, the encoder loop's decode of the unquantized latent, then the coded candidates),
    and a stride that is a multiple of that period picks one kind of feed only.  The stride this
    replaced fitted TAEF2's decoder on the unquantized latents alone (BENCHMARKS.md §8)."""
    if len(feeds) <= count:
        return list(feeds)
    starts = np.arange(count) * len(feeds) / count
    picks = np.floor(starts + np.random.default_rng(0).random(count) * len(feeds) / count).astype(int)
    return [feeds[i] for i in picks]
