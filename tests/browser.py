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


def find_chromedriver():
    for name in ("chromedriver", "chromium-driver"):
        found = shutil.which(name)
        if found:
            return found
    for path in ("/usr/bin/chromedriver", "/usr/lib/chromium/chromedriver"):
        if os.path.exists(path):
            return path
    return None


class Page:
    """A page open in headless Chromium, driven by selenium; ``errors()`` = console errors."""

    def __init__(self, driver):
        self.driver = driver

    def open(self, path, ready="body"):
        from selenium.webdriver.support.ui import WebDriverWait

        self.driver.get("file://" + os.path.abspath(path))
        WebDriverWait(self.driver, 30).until(
            lambda d: d.execute_script(
                "return document.body && document.body.dataset.ready === '1' && "
                "Array.from(document.querySelectorAll('.heat')).every(h => h.dataset.ready === '1')"
            )
        )
        return self

    def js(self, script, *args):
        return self.driver.execute_script(script, *args)

    def errors(self):
        return [e for e in self.driver.get_log("browser") if e.get("level") == "SEVERE"]


def chromium_page(tmp_path, size=(1280, 1600)):
    """A :class:`Page` on a fresh headless Chromium (skips without chromium/chromedriver)."""
    browser, driver_path = find_chromium(), find_chromedriver()
    if browser is None or driver_path is None:
        pytest.skip("no chromium/chromedriver found (CI installs them in .ci/run)")
    from selenium import webdriver
    from selenium.webdriver.chrome.options import Options
    from selenium.webdriver.chrome.service import Service

    opts = Options()
    for flag in (
        *FLAGS,
        f"--user-data-dir={tmp_path / 'profile'}",
        f"--window-size={size[0]},{size[1]}",
    ):
        opts.add_argument(flag)
    opts.binary_location = browser
    opts.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    return Page(webdriver.Chrome(options=opts, service=Service(driver_path)))
