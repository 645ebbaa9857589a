"""``graddiff demo`` records both scenarios, prints their reports and exits 0."""

from __future__ import annotations

from click.testing import CliRunner

import graddiff
import graddiff.cli


def invoke(*args: str):
    return CliRunner().invoke(graddiff.cli.main, ["demo", *args])


def test_demo_prints_both_verdicts_and_keeps_the_traces(tmp_path):
    result = invoke("--steps", "3", "--width", "32", "--device", "cpu", "--keep", str(tmp_path))
    assert result.exit_code == 0, result.output
    out = result.output
    assert "DIVERGED at step 0: param fc1.0.weight" in out
    assert "different initial weights" in out
    assert "DIVERGED at step 1: grad conv1.0.weight" in out
    assert "missing zero_grad" in out
    assert "width 32" in out
    q1 = graddiff.compare(tmp_path / "q1_manual.h5", tmp_path / "q1_optimizer.h5").to_dict()
    assert q1["diagnosis"][0]["cause"] == "different_init"
    q2 = graddiff.compare(tmp_path / "q2_autograd_grad.h5", tmp_path / "q2_backward.h5").to_dict()
    assert (q2["first"]["step"], q2["diagnosis"][0]["cause"]) == (1, "grad_accumulation")


def test_demo_only_one_scenario_in_a_temporary_folder():
    result = invoke("--steps", "2", "--only", "q2", "--device", "cpu")
    assert result.exit_code == 0, result.output
    assert "q2:" in result.output and "q1:" not in result.output
    assert "Traces kept" not in result.output


def test_demo_rejects_a_single_step():
    result = invoke("--steps", "1")
    assert result.exit_code == 2
    assert result.output.startswith("Error:")
