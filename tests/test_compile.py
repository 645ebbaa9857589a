"""``graddiff.trace`` on a ``torch.compile``d model (inductor, CPU).

Runs tests/scripts/compile_run.py in a subprocess: compile state (Dynamo caches, the config the
tracer flips) must not leak into the rest of the test session. Measured on 2 cores with a cold
inductor cache: about 23 s for the whole program (13 s of it the first inductor compile).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

import graddiff

SCRIPT = os.path.join(os.path.dirname(__file__), "scripts", "compile_run.py")
STEPS, AFTER = 3, 2  # as in the script


@pytest.fixture(scope="module")
def compiled_run(tmp_path_factory):
    d = tmp_path_factory.mktemp("compile")
    path, path_plain = str(d / "compiled.h5"), str(d / "plain.h5")
    out = subprocess.run(
        [sys.executable, SCRIPT, path, path_plain, "inductor"],
        capture_output=True,
        text=True,
        timeout=240,
    )
    assert out.returncode == 0, out.stderr[-3000:]
    assert "RuntimeWarning" not in out.stderr, out.stderr[-3000:]
    result = json.loads(out.stdout.strip().splitlines()[-1])
    result["path_plain"] = path_plain
    return path, result


@pytest.mark.slow
def test_compiled_trace_names_and_steps(compiled_run):
    path, _ = compiled_run
    with graddiff.open(path) as run:
        assert run.status == "complete"
        assert [int(s) for s in run.steps] == list(range(STEPS))
        names = [k.name for k in run.keys]
        assert not [n for n in names if "_orig_mod" in n], names
        assert run.names("param") == [
            "0.weight",
            "0.bias",
            "1.weight",
            "1.bias",
            "3.weight",
            "3.bias",
        ]
        assert set(run.names("activation")) == {"0", "1", "2", "3", "(root)"}
        # Activations, output gradients, grads and the loss are there at every step; AOTAutograd's
        # own fake autograd.grad calls are not (they once stopped the trace at step 0).
        for step in range(STEPS):
            for name in ("0", "1", "2", "3", "(root)"):
                assert run.get("activation", name, step).shape[0] == 16
                assert run.has_values("grad_output", name, step)
            assert run.get("grad", "3.weight", step).shape == (4, 16)
            assert run.get("loss", "loss", step).shape == ()
        assert "autograd_grad" not in run.kinds
        assert run.environment["model_class"].endswith("Sequential")  # not OptimizedModule


@pytest.mark.slow
def test_compiled_trace_is_transparent(compiled_run):
    path, r = compiled_run
    # Control: compile itself is bitwise reproducible here (two untraced compiled runs agree),
    # so traced vs untraced is a meaningful bitwise comparison.
    assert r["untraced_again"] == r["untraced"]
    assert r["weights_again_equal"]
    # Traced (3 steps inside the trace, 2 after it) == untraced, bit for bit, weights included.
    assert r["traced"] == r["untraced"]
    assert r["weights_traced_equal"]
    with graddiff.open(path) as run:
        recorded = [float(run.get("loss", "loss", s)).hex() for s in range(STEPS)]
    assert recorded == r["untraced"][:STEPS]


@pytest.mark.slow
def test_compiled_hooks_gone_after_exit(compiled_run):
    path, r = compiled_run
    during = r["calls_in_trace"]
    assert during["on_model_forward"] == STEPS
    assert during["on_module_output"] == 5 * STEPS  # 4 layers + the root, each step
    assert during["on_grad_output"] == 5 * STEPS
    assert during["before_gradient"] == STEPS  # only the user's backward, not AOT's tracing
    assert during["on_optimizer_step"] == STEPS
    # After the trace: training went on (2 more steps, losses checked above), nothing fired.
    assert set(r["calls_after_exit"].values()) == {0}, r["calls_after_exit"]
    assert set(r["calls_untraced_again"].values()) == {0}
    assert len(r["traced"]) == STEPS + AFTER
    with graddiff.open(path) as run:
        assert len(run.steps) == STEPS  # the post-trace steps added no records


@pytest.mark.slow
def test_trace_plain_module_of_precompiled_wrapper(compiled_run):
    """``trace(model)`` while the loop calls ``torch.compile(model)``, compiled before the
    trace: the tracer must still force the recompile that lets its hooks fire (this case once
    recorded params, loss and grads but silently no inputs, activations or output grads)."""
    _, r = compiled_run
    assert r["traced_plain"] == r["untraced"]
    assert r["weights_plain_equal"]
    assert r["calls_plain"]["on_module_output"] == 5 * (STEPS - 1)
    assert set(r["calls_plain_after_exit"].values()) == {0}
    with graddiff.open(r["path_plain"]) as run:
        assert [int(s) for s in run.steps] == list(range(STEPS - 1))
        assert set(run.names("activation")) == {"0", "1", "2", "3", "(root)"}
        for step in range(STEPS - 1):
            assert run.get("input", "0", step).shape == (16, 8)
            assert run.has_values("grad_output", "3", step)
