"""The atheris harness over the bitstream layer and the Pillow plugin's open path, briefly
(the long run is in BENCHMARKS.md).  A crash, hang or non-SdcError exception fails it."""
import os
import subprocess
import sys

import pytest

HARNESS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "fuzz", "fuzz_sdc.py")
# Briefly in CI (SDC_FUZZ_SECONDS for longer); the 10-million-run campaign is BENCHMARKS.md §4.
SECONDS = int(os.environ.get("SDC_FUZZ_SECONDS", "10"))


def test_fuzz_the_bitstream_and_the_pillow_open_path(tmp_path):
    pytest.importorskip("atheris")
    corpus = tmp_path / "corpus"
    corpus.mkdir()
    golden = os.path.join(os.path.dirname(HARNESS), "..", "golden")
    for name in os.listdir(golden):
        if name.endswith(".sdc"):
            (corpus / name).write_bytes(open(os.path.join(golden, name), "rb").read())
    result = subprocess.run(
        [sys.executable, HARNESS, f"-max_total_time={SECONDS}", "-timeout=10", "-rss_limit_mb=2048",
         "-print_final_stats=1", str(corpus)],
        capture_output=True, timeout=SECONDS + 120, cwd=tmp_path)
    log = result.stderr.decode(errors="replace")
    assert result.returncode == 0, log[-3000:]
    runs = int(log.split("stat::number_of_executed_units:")[1].split()[0])
    assert runs > 1000, log[-2000:]  # it really ran
    assert len(os.listdir(corpus)) > 3  # and found new inputs beyond the golden seeds
