"""The comparison report as a browser shows it: rendered by headless Chromium to a screenshot."""

from __future__ import annotations

import shutil
import subprocess

import matplotlib.image
import numpy as np
import pytest

from dropkit.lab.compare import summarise
from dropkit.lab.report import write_report
from test_compare import _clear_runs

BROWSERS = ("chromium", "chromium-browser", "google-chrome")


@pytest.mark.slow
def test_the_report_renders_in_a_headless_browser_with_its_charts(tmp_path):
    browser = next((path for name in BROWSERS if (path := shutil.which(name))), None)
    if browser is None:
        pytest.skip(f"no headless browser ({', '.join(BROWSERS)}) on this machine: apt-get install chromium")
    runs = _clear_runs()
    _, page = write_report(tmp_path, "dropkit compare: tutorial_mlp on mnist", runs, summarise(runs), {"epochs": 3})
    shot = tmp_path / "report.png"
    subprocess.run([browser, "--headless", "--no-sandbox", "--disable-gpu", "--hide-scrollbars",
                    f"--user-data-dir={tmp_path / 'profile'}", f"--screenshot={shot}", "--window-size=1200,2600",
                    page.as_uri()], check=True, capture_output=True, timeout=120)
    pixels = matplotlib.image.imread(shot)[..., :3]
    assert pixels.shape[:2] == (2600, 1200)
    ink = (pixels < 0.9).any(axis=2)
    assert ink.mean() > 0.02  # text, table and charts, not a blank or error page
    # the charts' colours: matplotlib's first two (blue C0, orange C1) both appear
    for colour in ((0x1F, 0x77, 0xB4), (0xFF, 0x7F, 0x0E)):
        assert (np.abs(pixels - np.array(colour) / 255).max(axis=2) < 0.03).sum() > 200, colour
