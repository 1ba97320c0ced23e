"""The runtime's tests run without torch: their SD model set is the committed fixture
(fixtures/make_fixtures.py writes it; tests/export/test_fixtures.py checks it is what the
export writes today), and a set of another fingerprint is a copy of it that says so."""
from __future__ import annotations

import os
import shutil
from dataclasses import replace

import pytest

FIXTURE_SET = os.path.join(os.path.dirname(os.path.abspath(__file__)), "fixtures", "tiny-sd")


@pytest.fixture(scope="session")
def model_set(tmp_path_factory) -> str:
    out = str(tmp_path_factory.mktemp("sets") / "tiny-sd")
    shutil.copytree(FIXTURE_SET, out)  # tests may not change the committed files
    return out


@pytest.fixture(scope="session")
def other_model_set(tmp_path_factory, model_set) -> str:
    """The same graphs under another latent space's fingerprint: a set whose files this one's
    are not."""
    from sdc_runtime.manifest import load_manifest, write_manifest

    out = str(tmp_path_factory.mktemp("sets") / "tiny-sd-other")
    shutil.copytree(model_set, out)
    manifest = load_manifest(out)
    write_manifest(out, replace(manifest, fingerprint=manifest.fingerprint[::-1]))
    return out
