"""The interactive HTML reports in a real headless Chromium driven by selenium: no console
errors, hover values, filter, sort, zoom; one run's page (show --html) with masked zero norms."""

from __future__ import annotations

import re

import numpy as np
import pytest
from browser import chromium_page
from click.testing import CliRunner
from diff_builders import MLP_CLASSES, simulate

import graddiff
import graddiff.cli
from graddiff.postmortem.html import ABSENT, NONFINITE, ZERO, encode_heatmap


@pytest.fixture(scope="module")
def traces(tmp_path_factory):
    d = tmp_path_factory.mktemp("html")
    kw = {"n_steps": 12, "module_classes": MLP_CLASSES}
    return {
        "base": simulate(d / "base.h5", **kw),
        "same": simulate(d / "same.h5", **kw),
        "nozero": simulate(d / "nozero.h5", zero_grad=False, **kw),
    }


@pytest.fixture
def page(tmp_path):
    p = chromium_page(tmp_path)
    try:
        yield p
    finally:
        p.driver.quit()


def _compare_html(traces, b, tmp_path):
    out = tmp_path / f"{b}.html"
    r = CliRunner().invoke(
        graddiff.cli.main, ["compare", traces["base"], traces[b], "--html", str(out)]
    )
    assert r.exit_code in (0, 1), r.output
    return out


def _hover_cell(page, canvas_id, row, col, n_cols):
    """Move the mouse to the centre of heatmap cell (row, col) and return the tooltip text."""
    from selenium.webdriver.common.action_chains import ActionChains

    canvas = page.driver.find_element("css selector", f"#{canvas_id} canvas")
    d = canvas.get_dom_attribute
    gutter, top = float(d("data-gutter")), float(d("data-top"))
    row_h, heat_w = float(d("data-row-h")), float(d("data-heat-w"))
    x = gutter + (col + 0.5) * heat_w / n_cols
    y = top + (row + 0.5) * row_h
    w, h = canvas.size["width"], canvas.size["height"]
    ActionChains(page.driver).move_to_element_with_offset(
        canvas, int(x - w / 2), int(y - h / 2)
    ).perform()
    tip = page.driver.find_element("id", "tip")
    assert tip.is_displayed()
    return tip.text


def test_compare_report_loads_hovers_filters_sorts_zooms(traces, page, tmp_path):
    out = _compare_html(traces, "nozero", tmp_path)
    report = graddiff.compare(traces["base"], traces["nozero"])
    steps, labels, rel = report.divergence_matrix()
    page.open(out)
    assert page.errors() == []
    text = page.driver.find_element("tag name", "body").text
    # verdict, cause and fix at the top, with the module class
    assert text.index("DIVERGED at step 1: grad fc1.weight (Linear)") < text.index(
        "Where the runs differ"
    )
    assert "missing zero_grad" in text and "Fix:" in text

    # hovering the first divergence shows its value (3 significant digits) and the mark
    row, col = labels.index(report.first.label), int(np.flatnonzero(steps == report.first.step)[0])
    tip = _hover_cell(page, "heat-diff", row, col, len(steps))
    assert "grad fc1.weight (Linear)" in tip and "step 1:" in tip and "first divergence" in tip
    shown = float(re.search(r"rel diff ([0-9.e+-]+)", tip).group(1))
    assert shown == pytest.approx(report.first.rel_diff, rel=2e-3) and "beyond rtol" in tip
    # a cell before the divergence: bitwise equal
    assert "bitwise equal" in _hover_cell(page, "heat-diff", row, 0, len(steps))

    # the filter reduces the heatmap rows and the table rows
    n_all = page.js("return document.querySelectorAll('#records tbody tr').length")
    assert n_all == len(labels)
    box = page.driver.find_element("id", "filter")
    box.send_keys("fc2 grad")
    visible = page.js(
        "return Array.from(document.querySelectorAll('#records tbody tr'))"
        ".filter(r => r.style.display !== 'none').map(r => r.cells[0].textContent + ' ' + r.cells[2].textContent)"
    )
    assert visible and len(visible) < n_all
    assert all("fc2" in v and "grad" in v for v in visible)
    rng = page.driver.find_element("css selector", "#heat-diff .range").text
    assert f"{len(visible)} of {len(labels)} records" in rng
    box.clear()
    box.send_keys("Linear")  # the module class is searchable too
    n_linear = page.js(
        "return Array.from(document.querySelectorAll('#records tbody tr')).filter(r => r.style.display !== 'none').length"
    )
    assert 0 < n_linear < n_all
    page.js(
        "const b = document.getElementById('filter'); b.value = ''; b.dispatchEvent(new Event('input'))"
    )

    # sorting by the largest difference
    header = page.driver.find_element(
        "xpath", "//div[@id='records']//th[text()='largest rel diff']"
    )
    header.click()
    header.click()  # descending
    col_vals = page.js(
        "return Array.from(document.querySelectorAll('#records tbody tr')).map(r => r.cells[4].textContent)"
    )
    nums = [float(v) for v in col_vals if v != "–"]
    assert nums == sorted(nums, reverse=True) and nums[0] == pytest.approx(np.nanmax(rel), rel=1e-2)

    # drag across steps 3..6 zooms into them
    from selenium.webdriver.common.action_chains import ActionChains

    canvas = page.driver.find_element("css selector", "#heat-diff canvas")
    g = float(canvas.get_dom_attribute("data-gutter"))
    w = float(canvas.get_dom_attribute("data-heat-w"))
    cw = w / len(steps)
    ox = lambda k: int(g + (k + 0.5) * cw - canvas.size["width"] / 2)  # noqa: E731
    oy = int(10 - canvas.size["height"] / 2)
    (
        ActionChains(page.driver)
        .move_to_element_with_offset(canvas, ox(3), oy)
        .click_and_hold()
        .move_to_element_with_offset(canvas, ox(6), oy)
        .release()
        .perform()
    )
    rng = page.driver.find_element("css selector", "#heat-diff .range").text
    assert rng.startswith("steps 3–6 (4 of 12)"), rng
    page.driver.find_element("css selector", "#heat-diff .reset").click()
    assert "(12 of 12)" in page.driver.find_element("css selector", "#heat-diff .range").text
    assert page.errors() == []


def test_identical_runs_get_a_white_map_not_an_empty_one(traces, page, tmp_path):
    out = _compare_html(traces, "same", tmp_path)
    page.open(out)
    assert page.errors() == []
    assert "No difference" in page.driver.find_element("tag name", "body").text
    tip = _hover_cell(page, "heat-diff", 0, 5, 12)
    assert "step 5: bitwise equal" in tip


def test_show_html_one_run(traces, page, tmp_path):
    out = tmp_path / "run.html"
    r = CliRunner().invoke(graddiff.cli.main, ["show", traces["nozero"], "--html", str(out)])
    assert r.exit_code == 0, r.output
    page.open(out)
    assert page.errors() == []
    text = page.driver.find_element("tag name", "body").text
    for needle in (
        "12 steps (0..11)",
        "Findings (",
        "grad_accumulation",
        "Gradient norm per layer",
        "Parameter norm per layer",
        "Loss",
    ):
        assert needle in text
    # fc1.bias starts at zero: its norm at step 0 is masked, not clipped
    with graddiff.open(traces["nozero"]) as run:
        names = [k.name for k in run.keys if k.kind == "param"]
    tip = _hover_cell(page, "heat-param", names.index("fc1.bias"), 0, 12)
    assert "fc1.bias (Linear)" in tip and "norm 0 (masked)" in tip
    tip = _hover_cell(page, "heat-param", names.index("fc1.weight"), 0, 12)
    assert re.search(r"norm [0-9.]+", tip)


def test_heatmap_encoding_roundtrip():
    v = np.array([[np.nan, 0.0, 1e-7, 3.3e-3], [0.5, 12.0, np.nan, 1.0]])
    bad = np.zeros(v.shape, bool)
    bad[1, 2] = True
    enc = encode_heatmap(v, bad)
    import base64
    import zlib

    raw = base64.b64decode(enc["data"])
    codes = np.frombuffer(zlib.decompress(raw) if enc["deflate"] else raw, "<u2").reshape(v.shape)
    assert codes[0, 0] == ABSENT and codes[0, 1] == ZERO and codes[1, 2] == NONFINITE
    logs = enc["lo"] + (codes.astype(float) - 2) / 65532 * (enc["hi"] - enc["lo"])
    for i, j in [(0, 2), (0, 3), (1, 0), (1, 1), (1, 3)]:
        assert 10 ** logs[i, j] == pytest.approx(v[i, j], rel=2e-3)
