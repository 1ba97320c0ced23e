"""Ray Data as the engine of bulk coding (the ray extra): ``sdc-runtime encode|decode --out-dir
DIR --engine ray``, and datasets for people who build their own Ray pipelines.

    import ray
    from sdc_runtime.ray import SdcDatasink, encode_dataset
    ds = ray.data.read_binary_files("s3://bucket/photos/", include_paths=True)
    encode_dataset(ds, "models/taef2", quality=60).write_datasink(SdcDatasink("out/"))

Each actor holds one SdcCodec for its whole life, with ONNX Runtime's threads pinned to the
CPUs Ray gives it (ORT's default, one thread per core of the node, oversubscribes a node that
runs several actors), and a GPU where the provider is CUDA.  A failed image is a row with an
error, never a failed job.  Outputs are written by a datasink, each atomically, so a rerun
with ``--resume`` skips the finished ones.
"""
from __future__ import annotations

import logging
import os

from .batch import Job, Outcome, Work, coded, write_output
from .extras import require_extra


class _Coder:
    """The map_batches callable: one codec per actor; rows in, coded rows out."""

    def __init__(self, work: Work):
        self.work = work

    def __call__(self, batch: dict) -> dict:
        rows = {"path": [], "output": [], "data": [], "bytes": [], "bpp": [], "seconds": [], "error": []}
        for index, path in enumerate(batch["path"]):
            output = str(batch["output"][index]) if "output" in batch else ""
            data = bytes(batch["bytes"][index]) if "bytes" in batch else None
            job = Job(str(path), output, str(batch["relative"][index]) if "relative" in batch else str(path))
            result, outcome = coded(self.work, job, data)
            rows["path"].append(outcome.path)
            rows["output"].append(output)
            rows["data"].append(result or b"")
            rows["bytes"].append(outcome.bytes or 0)
            rows["bpp"].append(outcome.bpp or 0.0)
            rows["seconds"].append(outcome.seconds or 0.0)
            rows["error"].append(outcome.error or "")
        return rows


def _coded_dataset(ds, work: Work, actors: int | None, cpus_per_actor: int):
    import ray.data

    work = Work(**{**work.__dict__, "codec_options": {**work.codec_options, "threads": cpus_per_actor}})
    gpus = 1 if work.codec_options.get("provider") == "cuda" else 0
    return ds.map_batches(_Coder, fn_constructor_kwargs={"work": work}, batch_size=1, batch_format="numpy",
                          compute=ray.data.ActorPoolStrategy(size=actors or _default_actors(cpus_per_actor)),
                          num_cpus=cpus_per_actor, num_gpus=gpus)


def encode_dataset(ds, models: str, *, actors: int | None = None, cpus_per_actor: int = 1, provider: str = "cpu",
                   **options):
    """A Dataset of images, rows {"path", "bytes"} as ``ray.data.read_binary_files(...,
    include_paths=True)`` gives them -> a Dataset of rows {"path", "data" (the .sdc bytes, empty
    where it failed), "bytes", "bpp", "seconds", "error" ("" or why)}.  ``options``: the
    encoder options (EncodeOptions), checked here, before any actor starts.  ``actors``: at
    most the cluster's CPUs less one (default), as the reads need one."""
    require_extra("ray", "encode_dataset")
    from .codec import SdcCodec

    resolved = SdcCodec(models).options(**options)
    return _coded_dataset(ds, Work(os.fspath(models), {"provider": provider}, decode=False, encode_options=resolved),
                          actors, cpus_per_actor)


def _default_actors(cpus_per_actor: int) -> int:
    """Actors for the cluster's CPUs less one: the tasks that read the inputs need a CPU too,
    and actors holding them all would leave the reads waiting for ever."""
    return max(1, (_cluster_cpus() - 1) // cpus_per_actor)


def _cluster_cpus() -> int:
    import ray

    return int(ray.cluster_resources().get("CPU", 1))


class SdcDatasink:
    """Writes each row's ``data`` to its ``output`` (or, without one, to FOLDER/<name>.sdc),
    atomically; rows with an error are not written.  Its ``outcomes`` hold every row's."""

    def __new__(cls, *args, **kwargs):
        from ray.data import Datasink

        class _Sink(Datasink):
            def __init__(self, folder: str | None = None):
                self.folder, self.outcomes = folder, []

            def write(self, blocks, ctx):
                from ray.data.block import BlockAccessor

                written = []
                for block in blocks:
                    for row in BlockAccessor.for_block(block).iter_rows(public_row_format=True):
                        output = row["output"] or os.path.join(
                            self.folder, os.path.splitext(os.path.basename(row["path"]))[0] + ".sdc")
                        error = row["error"] or None
                        if error is None:
                            try:
                                write_output(output, bytes(row["data"]))
                            except OSError as exc:
                                error = f"cannot write: {exc.strerror or exc}"
                        written.append(Outcome(row["path"], output, row["bytes"] or None, row["bpp"] or None,
                                               row["seconds"], error))
                return written

            def on_write_complete(self, write_result):
                self.outcomes = [o for returned in write_result.write_returns for o in returned]

        return _Sink(*args, **kwargs)


def run_ray(work: Work, jobs: list[Job], workers: int, *, address: str | None = None):
    """The CLI's Ray engine: the jobs as a path manifest (actors read the inputs themselves,
    so a cluster needs them on shared storage), ``workers`` actors, outputs by the datasink."""
    require_extra("ray", "--engine ray")
    import ray
    import ray.data

    if not ray.is_initialized():
        ray.init(address=address, include_dashboard=False, log_to_driver=False, configure_logging=False)
    # The batch reports every file itself (progress, failures, summary): Ray Data's own bars
    # and INFO lines would break the tools' one line per message on stderr.
    logging.getLogger("ray.data").setLevel(logging.ERROR)
    ray.data.DataContext.get_current().enable_progress_bars = False
    if not jobs:
        return []
    manifest = ray.data.from_items([{"path": job.source, "output": job.output, "relative": job.relative}
                                    for job in jobs])
    cpus = max(1, _cluster_cpus() // workers)
    sink = SdcDatasink()
    _coded_dataset(manifest, work, workers, cpus).write_datasink(sink)
    return sink.outcomes
