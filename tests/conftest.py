"""Fixtures that build model sets through the real sdc-export CLI (torch): the export, int8 and
bench tests use them as they are; tests/runtime/conftest.py replaces the SD ones with the
committed sets, and without torch every fixture here skips its tests."""
from __future__ import annotations

import os

import pytest
from helpers import TAEF2


def pytest_runtest_logreport(report):
    """Where SDC_SKIPPED_LOG names a file, appends the id of each skipped test to it: .ci/run's
    torch phase runs the runtime's tests that skipped without torch, and not the others again."""
    log = os.environ.get("SDC_SKIPPED_LOG")
    if log and report.skipped:
        with open(log, "a") as fh:
            fh.write(report.nodeid + "\n")


def _needs_export():
    for module in ("torch", "diffusers", "onnx"):
        pytest.importorskip(module, reason="builds a model set with sdc-export (the export extra)")


@pytest.fixture(scope="session")
def tiny_sd(tmp_path_factory) -> str:
    _needs_export()
    from sdc_export.tiny import make_random_sd

    return make_random_sd(str(tmp_path_factory.mktemp("sd") / "tiny-sd"), preset="tiny", seed=0)


def _export(tmp_path_factory, src: str, name: str, *extra: str) -> str:
    from sdc_export.cli import main

    out = str(tmp_path_factory.mktemp("sets") / name)
    assert main(["--model", src, "--out", out, "--quiet", *extra]) == 0
    return out


@pytest.fixture(scope="session")
def model_set(tmp_path_factory, tiny_sd) -> str:
    return _export(tmp_path_factory, tiny_sd, "tiny-fp32")


@pytest.fixture(scope="session")
def model_set_fp16(tmp_path_factory, tiny_sd) -> str:
    return _export(tmp_path_factory, tiny_sd, "tiny-fp16", "--fp16")


@pytest.fixture(scope="session")
def other_model_set(tmp_path_factory) -> str:
    """A set from differently seeded weights: its fingerprint differs."""
    _needs_export()
    from sdc_export.tiny import make_random_sd

    src = make_random_sd(str(tmp_path_factory.mktemp("sd2") / "tiny-sd-2"), preset="tiny", seed=1)
    return _export(tmp_path_factory, src, "tiny-other")


@pytest.fixture(scope="session")
def taef2_set(tmp_path_factory):
    """The trained TAEF2 pair from ../shared exported through sdc-export."""
    if not os.path.isdir(TAEF2):
        pytest.skip("../shared/models/taef2 is not present")
    _needs_export()
    from sdc_export.cli import main

    out = str(tmp_path_factory.mktemp("sets") / "taef2")
    assert main(["--model", TAEF2, "--out", out, "--quiet"]) == 0
    return out


@pytest.fixture(scope="session")
def taesd_random(tmp_path_factory) -> str:
    """A random SD-compatible (4-channel, plain) TAESD pair in the checkpoint format."""
    _needs_export()
    import torch

    from sdc_export.tae import make_decoder, make_encoder

    folder = tmp_path_factory.mktemp("taesd")
    torch.manual_seed(0)
    torch.save(make_encoder(4, pooled=False).state_dict(), folder / "taesd_encoder.pth")
    torch.save(make_decoder(4, pooled=False).state_dict(), folder / "taesd_decoder.pth")
    return str(folder)


@pytest.fixture(scope="session")
def tae_set(tmp_path_factory, taesd_random) -> str:
    return _export(tmp_path_factory, taesd_random, "taesd-random")


@pytest.fixture(scope="session")
def codec(model_set):
    from sdc_runtime import SdcCodec

    return SdcCodec(model_set)
