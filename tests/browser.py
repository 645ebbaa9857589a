"""Headless Chromium for tests that must see a page rendered (skips where none is installed)."""

from __future__ import annotations

import os
import shutil
import subprocess

import numpy as np
import pytest

FLAGS = (
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
)


def find_chromium():
    for name in ("chromium", "chromium-browser", "google-chrome", "chrome"):
        found = shutil.which(name)
        if found:
            return found
    return None


def screenshot(page, tmp_path, size=(1200, 1600)):
    """Render ``page`` and return the screenshot as an RGB(A) float array."""
    browser = find_chromium()
    if browser is None:
        pytest.skip("no chromium found (CI installs it in .ci/run)")
    shot = tmp_path / "shot.png"
    subprocess.run(
        [
            browser,
            *FLAGS,
            f"--user-data-dir={tmp_path / 'profile'}",
            f"--screenshot={shot}",
            f"--window-size={size[0]},{size[1]}",
            "file://" + os.path.abspath(page),
        ],
        capture_output=True,
        timeout=120,
        check=False,
    )
    assert shot.exists(), "chromium wrote no screenshot"
    import matplotlib.image

    return matplotlib.image.imread(str(shot))


def distinct_colours(img) -> int:
    return len(np.unique(img.reshape(-1, img.shape[2])[:, :3].round(2), axis=0))
