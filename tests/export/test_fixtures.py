"""The runtime tests' committed model set is what the export writes today."""
import os

import numpy as np
from helpers import make_image

FIXTURE_SET = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "runtime", "fixtures",
                           "tiny-sd")


def test_the_committed_runtime_set_is_what_the_export_writes(model_set):
    """Regenerate it with tests/runtime/fixtures/make_fixtures.py when this fails."""
    from sdc_runtime import SdcCodec
    from sdc_runtime.manifest import load_manifest

    fresh, committed = load_manifest(model_set), load_manifest(FIXTURE_SET)
    assert committed.fingerprint == fresh.fingerprint
    assert committed.defaults == fresh.defaults and committed.channel_weights == fresh.channel_weights
    image = make_image(48, 40)
    ours, theirs = SdcCodec(FIXTURE_SET), SdcCodec(model_set)
    assert ours.encode(image, mode="u8") == theirs.encode(image, mode="u8")
    data = theirs.encode(image)
    np.testing.assert_allclose(np.asarray(ours.decode(data), float), np.asarray(theirs.decode(data), float), atol=1)
