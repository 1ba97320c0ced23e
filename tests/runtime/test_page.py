"""The comparison page in a real headless browser: Debian's chromium driven by Playwright
(no browser is downloaded), against a real server on 127.0.0.1 with the trained TAEF2 set."""
import os
import shutil
import signal

import pytest
from helpers import KODAK, needs_shared
from PIL import Image

CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
# The flags this workplace's closed network needs, or Chromium keeps trying to reach out.
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync"]


@pytest.fixture
def server(taef2_set):
    from sdc_bench.serve import launch

    process, base = launch(taef2_set)
    yield base
    process.send_signal(signal.SIGTERM)
    process.wait(timeout=60)


@needs_shared
@pytest.mark.skipif(not os.path.exists(CHROMIUM), reason="Debian's chromium is not installed (.ci/run installs it)")
def test_the_comparison_page_shows_four_panels_with_numbers(server, tmp_path):
    playwright = pytest.importorskip("playwright.sync_api")
    with playwright.sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        try:
            page = browser.new_page(viewport={"width": 1400, "height": 900})
            page.goto(server + "/")
            # A 384x256 crop, for CI time: the full photo's encode is most of this test's time.
            photo = tmp_path / "kodim23-crop.png"
            Image.open(os.path.join(KODAK, "kodim23.png")).crop((128, 128, 512, 384)).save(photo)
            page.set_input_files("#file", str(photo))
            page.select_option("#quality", index=2)
            page.click("#compare")
            page.wait_for_selector(".panel:nth-child(4) .stats", timeout=240_000)
            panels = page.query_selector_all(".panel")
            names = [panel.get_attribute("data-codec") for panel in panels]
            assert names == ["sdcodec", "AVIF", "JPEG XL", "JPEG"]
            for panel in panels:
                stats = panel.query_selector(".stats").inner_text()
                assert "bytes" in stats and "bpp" in stats and "dB" in stats, stats
                assert panel.query_selector("img").evaluate("img => img.naturalWidth") == 384
            ours = int(panels[0].query_selector(".stats").inner_text().split()[0])
            for panel in panels[1:]:  # the classical codecs never get more bytes than ours
                assert int(panel.query_selector(".stats").inner_text().split()[0]) <= ours
            page.screenshot(path=str(tmp_path / "page.png"), full_page=True)
        finally:
            browser.close()
