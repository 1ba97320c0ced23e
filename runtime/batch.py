"""Bulk coding: many inputs into one output folder (``sdc-runtime encode|decode --out-dir``).

Inputs are files, folders (walked recursively for the files of the kind coded: image types
Pillow reads, or ``.sdc``) and globs.  The output tree mirrors each input's relative path:
``photos/2024/a.jpg`` under the folder ``photos`` -> ``OUT/2024/a.sdc``.  Two inputs that would
write one output (``a.png`` and ``a.jpg`` side by side) keep their whole names instead:
``a.png.sdc`` and ``a.jpg.sdc``.  A decode writes ``NAME.sdc`` as ``NAME.<format>``.

Outputs are written through a temporary file and renamed (``files.write_atomic``), so after
a crash at any moment every output is whole or absent; a rerun removes the temporary files
such a crash left (``.sdc-*.tmp`` in the output folders) and, with ``resume``, skips the
outputs that are complete.  A failed input is reported by name and the batch goes on.
"""
from __future__ import annotations

import glob
import json
import os
import time
from concurrent.futures import ProcessPoolExecutor
from dataclasses import asdict, dataclass

from .errors import SdcError, SdcUsageError
from .files import write_atomic

SDC_SUFFIX = ".sdc"
TEMPORARY_PATTERN = ".sdc-*.tmp"  # files.write_atomic's temporary files


@dataclass(frozen=True)
class Job:
    source: str  # the input's path as found
    output: str  # where its output goes
    relative: str  # the input's path relative to what named it (the report's name for it)


@dataclass(frozen=True)
class Outcome:
    """One input's line of the report."""

    path: str
    output: str
    bytes: int | None = None
    bpp: float | None = None
    seconds: float | None = None
    error: str | None = None
    skipped: bool = False  # resumed: the output was already complete


def image_extensions() -> frozenset[str]:
    """The file extensions of the image formats Pillow can open here."""
    from PIL import Image

    Image.init()
    return frozenset(ext for ext, fmt in Image.registered_extensions().items() if fmt in Image.OPEN) - {SDC_SUFFIX}


def find_inputs(inputs: list[str], *, decode: bool) -> tuple[list[tuple[str, str]], list[Outcome]]:
    """(path, relative path) of every input file, in a stable order, each once; and an Outcome
    with an error for each INPUT that names nothing.  Folders and globs yield the files of
    the kind coded (other files, a notes.txt, are skipped silently); a file named on its own is
    always taken."""
    wanted = {SDC_SUFFIX} if decode else image_extensions()
    found, missing, seen = [], [], set()

    def take(path: str, relative: str) -> None:
        key = os.path.realpath(path)
        if key not in seen:
            seen.add(key)
            found.append((path, relative))

    for item in inputs:
        if os.path.isdir(item):
            for folder, dirs, files in os.walk(item):
                dirs.sort()
                for name in sorted(files):
                    if os.path.splitext(name)[1].lower() in wanted:
                        path = os.path.join(folder, name)
                        take(path, os.path.relpath(path, item))
        elif os.path.isfile(item):
            take(item, os.path.basename(item))
        elif glob.has_magic(item):
            base = _static_prefix(item)
            for path in sorted(glob.glob(item, recursive=True)):
                if os.path.isfile(path) and os.path.splitext(path)[1].lower() in wanted:
                    take(path, os.path.relpath(path, base))
        else:
            missing.append(Outcome(item, "", error="no such file or folder"))
    return found, missing


def _static_prefix(pattern: str) -> str:
    """The folder a glob's matches are relative to: its path before the first wildcard."""
    parts = []
    for part in pattern.split(os.sep):
        if glob.has_magic(part):
            break
        parts.append(part)
    return os.sep.join(parts) or "."


def plan(found: list[tuple[str, str]], out_dir: str, *, decode: bool, extension: str = "png") -> list[Job]:
    """The output of each input under ``out_dir`` (module docstring: names and collisions)."""
    def named(relative: str, whole: bool) -> str:
        if decode:
            stem = relative[:-len(SDC_SUFFIX)] if relative.lower().endswith(SDC_SUFFIX) else relative
            return f"{stem}.{extension}"
        return (relative if whole else os.path.splitext(relative)[0]) + SDC_SUFFIX

    first = [named(relative, False) for _, relative in found]
    taken: dict[str, int] = {}
    for name in first:
        taken[name] = taken.get(name, 0) + 1
    return [Job(path, os.path.join(out_dir, named(relative, taken[name] > 1)), relative)
            for (path, relative), name in zip(found, first)]


def remove_stale_temporaries(jobs: list[Job]) -> int:
    """Delete the temporary files a killed run left in the jobs' output folders."""
    removed = 0
    for folder in sorted({os.path.dirname(job.output) for job in jobs}):
        for path in glob.glob(os.path.join(glob.escape(folder), TEMPORARY_PATTERN)):
            os.unlink(path)
            removed += 1
    return removed


def is_complete(path: str, *, decode: bool) -> bool:
    """Whether an output is whole: a .sdc that checks end to end, or an image Pillow verifies."""
    try:
        if not decode:
            from .bitstream import sdc_info

            with open(path, "rb") as fh:
                sdc_info(fh.read())
            return True
        from PIL import Image

        with Image.open(path) as image:
            image.verify()
        return True
    except (OSError, SdcError, SyntaxError, ValueError):
        return False


@dataclass(frozen=True)
class Work:
    """What each worker needs to build its codec and code one input (picklable)."""

    models: str
    codec_options: dict  # SdcCodec's keywords (provider, threads, memory limit, ...)
    decode: bool
    encode_options: object = None  # resolved EncodeOptions
    decode_options: dict | None = None  # denoise_steps, decoder
    image_format: str = "PNG"
    output_quality: int | None = None


_codec = None  # the worker's one SdcCodec, built once


def _worker_codec(work: Work):
    global _codec
    if _codec is None:
        from .codec import SdcCodec

        _codec = SdcCodec(work.models, **work.codec_options)
    return _codec


def code_bytes(work: Work, data: bytes) -> tuple[bytes, int]:
    """One input's bytes coded by the worker's codec: (output bytes, image pixels)."""
    codec = _worker_codec(work)
    if work.decode:
        from .image import image_bytes

        image = codec.decode(data, **(work.decode_options or {}))
        return image_bytes(image, work.image_format, quality=work.output_quality), image.width * image.height
    from .image import load_image

    image = load_image(data, max_pixels=codec.max_pixels)
    return codec.encode(image, work.encode_options), image.width * image.height


def coded(work: Work, job: Job, data: bytes | None = None) -> tuple[bytes | None, Outcome]:
    """(the output's bytes, its Outcome) for one input, read from ``job.source`` unless given;
    (None, an Outcome with the error) where it fails.  Never raises for the input."""
    started = time.perf_counter()
    try:
        if data is None:
            with open(job.source, "rb") as fh:
                data = fh.read()
        output, pixels = code_bytes(work, data)
        size = len(data) if work.decode else len(output)
        return output, Outcome(job.relative, job.output, size, round(8 * size / pixels, 5),
                               round(time.perf_counter() - started, 3))
    except (SdcError, OSError, MemoryError) as exc:
        message = exc.strerror if isinstance(exc, OSError) and exc.strerror else str(exc) or type(exc).__name__
        return None, Outcome(job.relative, job.output, seconds=round(time.perf_counter() - started, 3), error=message)


def write_output(path: str, data: bytes) -> None:
    """An output written whole or not at all, its folder made where missing."""
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    write_atomic(path, data)


def code_one(work: Work, job: Job) -> Outcome:
    """One input coded and its output written (the local engine's task)."""
    output, outcome = coded(work, job)
    if output is not None:
        try:
            write_output(job.output, output)
        except OSError as exc:
            return Outcome(job.relative, job.output, error=f"cannot write: {exc.strerror or exc}")
    return outcome


def _pool_init(work: Work) -> None:
    _worker_codec(work)


def run_local(work: Work, jobs: list[Job], workers: int):
    """Yield each job's Outcome as it finishes: in this process, or in ``workers`` processes
    that each hold one codec for the whole run."""
    if workers <= 1:
        for job in jobs:
            yield code_one(work, job)
        return
    import multiprocessing

    # spawn: a fresh interpreter per worker, whatever threads this one holds (fork would copy them).
    with ProcessPoolExecutor(max_workers=workers, mp_context=multiprocessing.get_context("spawn"),
                             initializer=_pool_init, initargs=(work,)) as pool:
        futures = [pool.submit(code_one, work, job) for job in jobs]
        from concurrent.futures import as_completed

        for future in as_completed(futures):
            yield future.result()


def per_worker(codec_options: dict, workers: int) -> dict:
    """Each worker's share of the machine: threads and working memory (``memory_limit``) split
    so that the workers fit the limits together, not each."""
    threads = codec_options.get("threads") or os.cpu_count() or 1
    return {**codec_options, "threads": max(1, threads // workers),
            "memory_limit": max(1 << 20, codec_options["memory_limit"] // workers)}


def run_batch(work: Work, jobs: list[Job], outcomes: list[Outcome], engine=None, *, workers: int = 1,
              resume: bool = False, report_path: str | None = None, show_progress: bool = False,
              on_failure=None) -> list[Outcome]:
    """Code every job not already complete (with ``resume``) with ``engine(work, jobs,
    workers)`` (``run_local`` by default; ``sdc_runtime.ray.run_ray``); each outcome goes to the
    report (one JSON line per input) and failures to ``on_failure`` as they come."""
    if workers < 1:
        raise SdcUsageError(f"--jobs must be at least 1, not {workers}")
    remove_stale_temporaries(jobs)
    todo = []
    for job in jobs:
        if os.path.abspath(job.output) == os.path.abspath(job.source):
            outcomes.append(Outcome(job.relative, job.output, error="the output would overwrite the input"))
        elif resume and os.path.exists(job.output) and is_complete(job.output, decode=work.decode):
            outcomes.append(Outcome(job.relative, job.output, skipped=True))
        else:
            todo.append(job)
    report = open(report_path, "w", encoding="utf-8") if report_path else None
    bar = _bar(len(jobs), show_progress)
    try:
        def record(outcome: Outcome) -> None:
            if report is not None:
                report.write(json.dumps({k: v for k, v in asdict(outcome).items() if v not in (None, False)}) + "\n")
                report.flush()
            if outcome.error and on_failure is not None:
                on_failure(outcome)
            if bar is not None:
                bar.update(1)

        for outcome in outcomes:
            record(outcome)
        for outcome in (engine or run_local)(work, todo, workers):
            outcomes.append(outcome)
            record(outcome)
    finally:
        if bar is not None:
            bar.close()
        if report is not None:
            report.close()
    return outcomes


def _bar(total: int, enabled: bool):
    if not enabled:
        return None
    try:
        from tqdm import tqdm
    except ImportError:
        return None
    import sys

    return tqdm(total=total, desc="files", unit="img", file=sys.stderr)


def summary(outcomes: list[Outcome], seconds: float) -> str:
    done = [o for o in outcomes if not o.error and not o.skipped]
    failed = sum(1 for o in outcomes if o.error)
    skipped = sum(1 for o in outcomes if o.skipped)
    rate = len(done) / seconds if seconds > 0 else 0.0
    return (f"{len(done)} coded, {skipped} already complete, {failed} failed, in {seconds:.1f} s"
            f" ({rate:.2f} images/s)")
