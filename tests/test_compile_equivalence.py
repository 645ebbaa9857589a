"""torch.compile vs eager is the same computation: never DIVERGED, by the precision-aware
tolerance and by the perturbed twin (``--noise``). The runs are made in a subprocess
(tests/scripts/compile_vs_eager.py): compiling in the test process leaks Dynamo state."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

import graddiff

SCRIPT = os.path.join(os.path.dirname(__file__), "scripts", "compile_vs_eager.py")


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    d = tmp_path_factory.mktemp("compile_vs_eager")
    out = subprocess.run(
        [sys.executable, SCRIPT, str(d)], capture_output=True, text=True, timeout=300
    )
    assert out.returncode == 0, out.stderr[-3000:]
    return {name: str(d / f"{name}.h5") for name in ("eager", "compiled", "twin", "compiled_lr")}


def test_compiled_run_is_not_diverged_from_eager(runs):
    r = graddiff.compare(runs["eager"], runs["compiled"])
    assert (r.verdict, r.exit_code) == ("within_tolerance", 0), r.headline()


def test_compiled_run_is_within_the_noise_of_the_perturbed_twin(runs):
    r = graddiff.compare(runs["eager"], runs["compiled"], noise=runs["twin"])
    assert (r.verdict, r.exit_code) == ("within_tolerance", 0), r.headline()


def test_a_real_bug_under_compile_is_beyond_the_twins_noise(runs):
    """Compiled with a 10 % larger learning rate: beyond the twin's drift from the first update."""
    r = graddiff.compare(runs["eager"], runs["compiled_lr"], noise=runs["twin"])
    assert r.exit_code == 1 and (r.first.step, r.first.kind) == (1, "param"), r.headline()
    assert "beyond 10x the twin's drift here" in r.headline()


def test_the_pair_really_differs_bitwise(runs):
    """Inductor's fused kernels round differently (first at the LayerNorm), and the twin drifts
    from its source: the two verdicts above judge real rounding differences, not equal files."""
    for other in ("compiled", "twin"):
        r = graddiff.compare(runs["eager"], runs[other], exact=True)
        assert (r.verdict, r.exit_code) == ("diverged", 1), r.headline()
