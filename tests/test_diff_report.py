"""The Report object: API == CLI, JSON safety, text rendering, lazy post-mortem features."""

from __future__ import annotations

import json
import sys

import pytest
from diff_builders import simulate

import graddiff


@pytest.fixture(scope="module")
def report(tmp_path_factory):
    d = tmp_path_factory.mktemp("r")
    return graddiff.compare(
        simulate(d / "a.h5"), graddiff.open(simulate(d / "b.h5", zero_grad=False))
    )


def test_report_accepts_paths_and_runs(report):
    assert report.run_b.endswith("b.h5") and report.first["step"] == report.first.step == 1
    assert isinstance(report, graddiff.Report)


def test_to_dict_is_strict_json(report):
    text = json.dumps(report.to_dict(), allow_nan=False)
    assert json.loads(text)["verdict"] == "diverged"


def test_str_is_plain_text_with_the_verdict_first(report):
    text = str(report)
    assert text.splitlines()[0].startswith("DIVERGED at step 1") and "\x1b[" not in text
    assert "Likely cause" in text and "First divergence" in text


def test_growth_and_matrix_names(report):
    assert report.growth["grad"][0][0] == 1
    assert report.to_dict()["growth"]["grad"][0][0] == 1
    steps, labels, rel = report.divergence_matrix()
    assert rel.shape == (len(steps), len(labels))


@pytest.mark.parametrize(
    ("method", "module"),
    [("html", "graddiff.postmortem.html"), ("plot", "graddiff.postmortem.plots")],
)
def test_missing_postmortem_feature_is_a_graddiff_error(
    report, tmp_path, monkeypatch, method, module
):
    monkeypatch.setitem(sys.modules, module, None)
    with pytest.raises(graddiff.GraddiffError, match="not available"):
        getattr(report, method)(tmp_path / "x")


def test_no_complete_step_is_an_input_error(tmp_path):
    from graddiff.writer import TraceWriter

    w = TraceWriter(str(tmp_path / "e.h5"), ballast=False)
    w.close()
    with pytest.raises(graddiff.GraddiffError, match="no complete step"):
        graddiff.compare(tmp_path / "e.h5", simulate(tmp_path / "a.h5"))
