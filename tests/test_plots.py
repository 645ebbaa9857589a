"""Plots checked through their artists, no golden images: panels, labels with module classes,
zero norms masked, the tolerance drawn, legends outside the data, two runs overlaid."""

from __future__ import annotations

import numpy as np
import pytest
from diff_builders import MLP_CLASSES, simulate

import graddiff
from graddiff.postmortem.plots import MAX_ROW_LABELS, plot_divergence, plot_run

pytest.importorskip("matplotlib")


@pytest.fixture(scope="module")
def traces(tmp_path_factory):
    d = tmp_path_factory.mktemp("plots")
    kw = {"n_steps": 10, "module_classes": MLP_CLASSES}
    return {
        "base": simulate(d / "base.h5", **kw),
        "nozero": simulate(d / "nozero.h5", zero_grad=False, **kw),
        "nan": simulate(d / "nan.h5", nan_at=6, **kw),
    }


def _drawn(fig):
    from matplotlib.backends.backend_agg import FigureCanvasAgg

    FigureCanvasAgg(fig).draw()
    return fig.canvas.get_renderer()


def _panels(fig):
    return {ax.get_label(): ax for ax in fig.axes if ax.get_label() != "<colorbar>"}


def _assert_legends_outside_data(fig):
    r = _drawn(fig)
    data = [ax.get_window_extent(r) for ax in fig.axes]  # panels and colorbars
    legends = [ax.get_legend() for ax in fig.axes if ax.get_legend() is not None]
    assert legends
    for leg in legends:
        box = leg.get_window_extent(r)
        for ax_box in data:
            w = min(box.x1, ax_box.x1) - max(box.x0, ax_box.x0)
            h = min(box.y1, ax_box.y1) - max(box.y0, ax_box.y0)
            assert w <= 1 or h <= 1, f"legend {box} overlaps axes {ax_box}"
        fb = fig.bbox
        assert fb.x0 - 1 <= box.x0 and box.x1 <= fb.x1 + 1 and fb.y0 - 1 <= box.y0  # on the page


def test_run_plot_masks_zero_norms_and_labels_every_row_with_its_class(traces):
    with graddiff.open(traces["nan"]) as run:
        fig = plot_run(run)
        params = [k.name for k in run.keys if k.kind == "param"]
    panels = _panels(fig)
    assert list(panels) == ["loss", "grad", "param"]
    ax = panels["param"]
    labels = [t.get_text() for t in ax.get_yticklabels()]
    assert labels == [f"{n} (Linear)" for n in params]
    main, zero = ax.images[0], ax.images[1]
    row = params.index("fc1.bias")  # zero-initialised: norm 0 at step 0
    assert np.ma.is_masked(main.get_array()[row, 0])  # masked in the heatmap...
    assert not np.ma.is_masked(zero.get_array()[row, 0])  # ...and painted in its own colour
    lo, hi = main.get_clim()
    assert lo > -10, "zero norms must not stretch the colour scale (log10 1e-45 = -45)"
    assert [t.get_text() for t in ax.get_legend().get_texts()][0] == "norm 0 (masked)"
    grad_legend = [t.get_text() for t in panels["grad"].get_legend().get_texts()]
    assert "NaN/Inf" in grad_legend
    assert panels["loss"].get_ylabel() == "loss" and panels["grad"].get_xlabel() == "step"
    _assert_legends_outside_data(fig)


def test_divergence_plot_draws_tolerance_overlays_runs_and_keeps_legends_off_the_data(traces):
    report = graddiff.compare(traces["base"], traces["nozero"])
    fig = plot_divergence(report)
    panels = _panels(fig)
    assert list(panels) == ["divergence", "growth", "loss", "grad_norm"]
    div = panels["divergence"]
    ticks = [t.get_text() for t in div.get_yticklabels()]
    assert "grad fc1.weight (Linear)" in ticks and len(ticks) == len(report.divergence_matrix()[1])
    marker = [ln for ln in div.lines if ln.get_label() == "first divergence"]
    assert marker and list(marker[0].get_xdata()) == [1]
    cbar = div.images[0].colorbar
    assert "rtol 0.001" in [t.get_text() for t in cbar.ax.get_yticklabels()]
    growth = panels["growth"]
    tol = [ln for ln in growth.lines if ln.get_label() == "rtol 0.001"]
    assert tol and set(tol[0].get_ydata()) == {1e-3}
    assert growth.get_yscale() == "log" and growth.get_ylabel() == "max relative difference"
    for name in ("loss", "grad_norm"):  # both runs on one axes
        labels = [ln.get_label() for ln in panels[name].lines]
        assert labels[:2] == ["A: base.h5", "B: nozero.h5"]
    _assert_legends_outside_data(fig)
    assert "(Linear)" in fig.get_suptitle()


class ManyRecords:
    """A comparison of a wide model: 300 records in 25 modules."""

    run_a, run_b = "nowhere/a.h5", "nowhere/b.h5"
    growth = {"grad": [(0, 0.0), (1, 1e-2)]}

    def __init__(self, n):
        self.labels = [f"grad blocks.{i // 12}.layer{i % 12}.weight" for i in range(n)]

    def to_dict(self):
        first = {"step": 1, "kind": "grad", "name": "blocks.0.layer0.weight"}
        return {"first": {**first, "label": self.labels[0]}, "rtol": 1e-3, "exact": False}

    def divergence_matrix(self):
        rel = np.zeros((4, len(self.labels)))
        rel[1:] = np.logspace(-8, 0, len(self.labels))
        return np.arange(4), list(self.labels), rel

    def describe(self, label):
        return label + " (Linear)"


@pytest.mark.parametrize("n", [60, 300])
def test_labels_stay_readable_at_any_number_of_records(n):
    fig = plot_divergence(ManyRecords(n))
    div = _panels(fig)["divergence"]
    ticks = [t.get_text() for t in div.get_yticklabels()]
    r = _drawn(fig)
    if n <= MAX_ROW_LABELS:  # a label on every row, the figure grows to fit them
        assert len(ticks) == n and all(t.endswith("(Linear)") for t in ticks)
    else:  # one label per module group
        assert len(ticks) == 25 and ticks[0] == "grad blocks.0 (12 rows)"
    heights = [t.get_window_extent(r).height for t in div.get_yticklabels()]
    pitch = div.get_window_extent(r).height / len(ticks)
    assert max(heights) <= pitch * 1.05, "tick labels would overlap"
    assert fig.get_figheight() <= 50
    _assert_legends_outside_data(fig)
