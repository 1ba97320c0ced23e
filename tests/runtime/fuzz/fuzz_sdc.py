"""Coverage-guided fuzzing (atheris / libFuzzer) of everything that reads untrusted .sdc bytes
without a model set: the bitstream layer (check, info, decode down to the latent levels) and
the Pillow plugin's open and header path.  Each input is tried as it is and with its CRC32
fixed up.  Any exception other than an SdcError, any crash and any hang is a finding.

    python tests/runtime/fuzz/fuzz_sdc.py -max_total_time=60              # seeded with tests/runtime/golden
    python tests/runtime/fuzz/fuzz_sdc.py -runs=10000000 -print_final_stats=1 CORPUS_DIR

libFuzzer options pass through.  Without a corpus folder the golden files are copied into a
scratch corpus (libFuzzer writes new inputs into its first corpus folder, never into tests/).
"""
import io
import os
import shutil
import sys
import tempfile
import zlib

import atheris
import numpy  # noqa: F401  imported first so that only Pillow and the codec are instrumented

with atheris.instrument_imports():
    from PIL import Image, UnidentifiedImageError

    from sdc_runtime import SdcError, pillow_plugin, sdc_check, sdc_decode, sdc_info

GOLDEN = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "golden")
# Small enough that any size a header may claim decodes quickly: a fuzzer looks for crashes,
# not for the cost of honouring a large (valid) file.
MAX_PIXELS = 1 << 20


def one_input(data: bytes) -> None:
    check(data)
    # The same bytes with a correct CRC32: mutations then reach the checks behind the checksum.
    if len(data) > 4:
        body = data[:-4]
        check(body + zlib.crc32(body).to_bytes(4, "little"))


def check(data: bytes) -> None:
    is_sdc = sdc_check(data)
    details = None
    try:
        details = sdc_info(data)
        header, levels = sdc_decode(data, max_pixels=MAX_PIXELS)
        assert is_sdc
        assert levels.shape == (header.latent_channels, header.latent_height, header.latent_width)
        assert details["total_bytes"] == len(data)
    except SdcError:
        pass
    try:  # Pillow's open: magic check, then the plugin reads the header (no model needed)
        with Image.open(io.BytesIO(data), formats=["SDC"]) as image:
            assert image.size == (details["width"], details["height"])
    except SdcError:
        pass
    except UnidentifiedImageError:
        assert not is_sdc  # Pillow's own answer is right only for bytes that are not ours


def main() -> None:
    pillow_plugin.register()
    argv = list(sys.argv)
    scratch = None
    if not any(os.path.isdir(arg) for arg in argv[1:]):
        scratch = tempfile.mkdtemp(prefix="sdc-fuzz-")
        for name in os.listdir(GOLDEN):
            if name.endswith(".sdc"):
                shutil.copy(os.path.join(GOLDEN, name), scratch)
        argv.append(scratch)
    try:
        atheris.Setup(argv, one_input)
        atheris.Fuzz()
    finally:
        if scratch:
            shutil.rmtree(scratch, ignore_errors=True)


if __name__ == "__main__":
    main()
