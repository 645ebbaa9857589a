"""Summaries, the terminal chart, lookups, plots and the HTML report (fake comparison reports)."""

from __future__ import annotations

import sys

import numpy as np
import pytest
from browser import distinct_colours, screenshot
from diff_builders import simulate as simulate_pair
from test_postmortem_traces import simulate

import graddiff
from graddiff.errors import GraddiffError
from graddiff.postmortem.html import render_html, write_html
from graddiff.postmortem.lookup import check_step, resolve
from graddiff.postmortem.summary import describe_ranges, render_summary, summarize
from graddiff.postmortem.termchart import render_chart


class FakeReport:
    """What graddiff.diff.Report exposes to plots and html."""

    run_a, run_b = "runs/a.h5", "runs/b.h5"
    growth = {"param": [(0, 0.0), (1, 1e-7), (2, 1e-4)], "grad": [(0, 1e-6), (1, 1e-3), (2, 0.5)]}
    labels = ["param fc.weight", "activation fc", "loss loss", "grad fc.weight"]

    def to_dict(self):
        return {
            "diverged": True,
            "headline": "DIVERGED at step 1: grad fc.weight <script>",
            "first": {
                "step": 1,
                "kind": "grad",
                "name": "fc.weight",
                "label": "grad fc.weight",
                "rel_diff": 1e-3,
            },
            "first_bitwise": None,
            "diagnosis": [{"cause": "nondeterministic op", "evidence": ["scatter_add"]}],
            "environment_diff": [{"key": "torch_version", "a": "2.14.1", "b": "2.13.0"}],
            "growth": {k: [list(p) for p in v] for k, v in self.growth.items()},
        }

    def divergence_matrix(self):
        rel = np.zeros((3, 4))
        rel[1, 3] = 1e-3
        rel[2] = [1e-7, 1e-5, np.nan, 0.5]
        return np.arange(3), list(self.labels), rel


def test_describe_ranges():
    assert describe_ranges([0, 1, 2, 5, 7, 8]) == "0-2, 5, 7-8"
    assert describe_ranges([]) == "none"


def test_chart_shape_and_nonfinite():
    lines = render_chart(
        np.arange(100), np.r_[np.linspace(3, 1, 99), np.nan], width=40, height=5, label="loss"
    )
    assert len(lines) == 7  # 5 rows, the step axis, the legend
    assert all(line == line.rstrip() for line in lines)
    assert lines[0].lstrip().startswith("2.98 ┤")  # bucket means of 100 steps in 40 columns
    assert lines[4].endswith("!")  # the NaN bucket, on the bottom row
    assert lines[5].split("└")[1].split() == ["0", "99"]
    assert "linear scale" in lines[6] and "!: NaN/Inf" in lines[6]
    assert render_chart(np.arange(0), np.zeros(0)) == []


def test_chart_log_scale_when_the_loss_spans_decades():
    steps = np.arange(30)
    values = np.logspace(0, -9, 30)
    lines = render_chart(steps, values, width=30, height=4, label="loss")
    assert "log scale" in lines[-1] and "!" not in lines[-1]
    assert lines[0].lstrip().startswith("1 ┤") and lines[3].lstrip().startswith("1e-09 ┤")
    # every decade gets the same height: the middle step fills the bottom row (linear: 1/8)
    assert lines[3][lines[3].index("┤") + 1 + 15] == "█"
    linear = render_chart(steps, values, width=30, height=4, label="loss")
    assert "linear scale" in render_chart(steps, 1.0 + steps, width=30)[-1]
    assert linear == lines
    assert "linear scale" in render_chart(steps, 1.0 + steps, width=30)[-1]


def test_summary_of_a_budgeted_killed_run(tmp_path):
    path = simulate(
        tmp_path / "run.h5",
        values={0, 1, 2},
        status="recording",
        values_note="budget of 1 MiB spent",
    )
    with graddiff.open(path) as run:
        s = summarize(run)
    assert s["steps"] == {"count": 6, "first": 0, "last": 5}
    assert s["kinds"]["grad"] == {"records": 4, "entries": 24}
    assert s["values"]["stats_only_from"] == 3 and s["values"]["mode"] == "mixed"
    assert len(s["loss"]["values"]) == 6 and s["findings"] == []
    lines = render_summary(s, env=True)
    text = " ".join(" ".join(lines).split())  # wrapped lines joined back
    assert "killed" in text and "statistics only from step 3 (budget of 1 MiB spent)" in text
    assert "torch_version" in text and "┤" in text
    assert all(len(line) <= 80 and line == line.rstrip() for line in lines[1:])  # [0]: the path
    folded = render_summary(s)
    assert "torch_version" not in "\n".join(folded) and "--env lists them" in folded[-1]


def test_lookup_errors_hint(tmp_path):
    with graddiff.open(simulate(tmp_path / "run.h5")) as run:
        assert [k.name for k in resolve(run, "grad", "fc1.*")] == ["fc1.weight", "fc1.bias"]
        with pytest.raises(
            GraddiffError, match=r"no grad record named 'fc1.weigth'; did you mean fc1.weight"
        ):
            resolve(run, "grad", "fc1.weigth")
        with pytest.raises(GraddiffError, match=r"unknown kind 'gard'; did you mean grad\?"):
            resolve(run, "gard", "x")
        with pytest.raises(GraddiffError, match=r"no buffer records"):
            resolve(run, "buffer", None)
        with pytest.raises(GraddiffError, match=r"step 9 is not a complete step \(steps 0-5\)"):
            check_step(run, 9)


def _labels(fig):
    return [ax.get_label() for ax in fig.axes if ax.get_label() != "<colorbar>"]


def _image(path):
    import matplotlib.image

    img = matplotlib.image.imread(path)
    assert img.ndim == 3 and img.shape[0] > 100 and img.std() > 0.01
    return img


def test_plot_run_panels_and_file(tmp_path):
    with graddiff.open(simulate(tmp_path / "run.h5", nan_at=3)) as run:
        fig = run.plot(tmp_path / "run.png")
    assert _labels(fig) == ["loss", "grad", "param"]
    assert len(fig.axes) == 5  # plus two colorbars
    _image(tmp_path / "run.png")


def test_plot_divergence_panels(tmp_path):
    from graddiff.postmortem.plots import plot_divergence

    fig = plot_divergence(FakeReport(), tmp_path / "div.png")
    assert _labels(fig) == ["divergence", "growth"]
    marker = [line for line in fig.axes[0].lines if line.get_label() == "first divergence"]
    assert marker and list(marker[0].get_ydata()) == [3]
    _image(tmp_path / "div.png")
    plot_divergence(FakeReport(), tmp_path / "div.svg")
    assert (tmp_path / "div.svg").read_text().lstrip().startswith("<?xml")


def test_plot_rejects_unknown_format(tmp_path):
    with graddiff.open(simulate(tmp_path / "run.h5")) as run:
        with pytest.raises(GraddiffError, match=r"unsupported plot format '.jpg'"):
            run.plot(tmp_path / "x.jpg")


def test_plot_without_matplotlib(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "matplotlib", None)
    monkeypatch.setitem(sys.modules, "matplotlib.figure", None)
    with graddiff.open(simulate(tmp_path / "run.h5")) as run:
        with pytest.raises(
            GraddiffError, match=r"needs matplotlib.*pip install 'graddiff\[plot\]'"
        ):
            run.plot(tmp_path / "x.png")
    a, b = simulate_pair(tmp_path / "a.h5"), simulate_pair(tmp_path / "b.h5", zero_grad=False)
    html = render_html(graddiff.compare(a, b))  # the HTML report needs no matplotlib
    assert 'id="heat-diff"' in html


def test_html_is_self_contained_and_escaped(tmp_path):
    evil = {"(root)": "MLP", "fc1": "<script>alert(1)</script>", "fc2": "Linear</script>"}
    a = simulate_pair(tmp_path / "a.h5", module_classes=evil)
    b = simulate_pair(
        tmp_path / "b.h5",
        zero_grad=False,
        module_classes=evil,
        environment={"torch_version": "2.13.0", "device": "cpu"},
    )
    path = write_html(graddiff.compare(a, b), tmp_path / "r.html")
    assert path == str(tmp_path / "r.html")
    text = (tmp_path / "r.html").read_text("utf-8")
    assert text.count("<script") == 2  # the data block and the page's own script, nothing else
    assert "<script>alert" not in text and "Linear</script>" not in text
    assert "&lt;script&gt;alert(1)&lt;/script&gt;" in text  # in the headline, escaped
    assert "http://" not in text.replace("http://www.w3.org/2000/svg", "")
    assert "https://" not in text and "<link" not in text and " src=" not in text
    for needle in ("torch_version", "2.13.0", "Growth of the difference", "missing zero_grad"):
        assert needle in text


@pytest.mark.slow
def test_html_renders_in_headless_chromium(tmp_path):
    a, b = simulate_pair(tmp_path / "a.h5"), simulate_pair(tmp_path / "b.h5", zero_grad=False)
    page = write_html(graddiff.compare(a, b), tmp_path / "r.html")
    img = screenshot(page, tmp_path)
    assert img.shape[:2] == (1600, 1200)
    # the verdict banner's pink and the heatmap's colours are there: many distinct colours
    assert distinct_colours(img) > 50
