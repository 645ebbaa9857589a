"""Synthetic traces for the post-mortem tests: a numpy two-layer MLP trained with SGD.

``simulate`` computes the real forward and backward pass in numpy and writes what
``graddiff.trace`` records (param, input, activation, loss, grad_output, grad) through the
writer, so checks see exact gradient relationships without torch. Switches inject the bugs
``graddiff check`` must find: no zero_grad, a NaN, a frozen parameter, dead units.
"""

from __future__ import annotations

from typing import Optional, Union

import numpy as np
import pytest

import graddiff
from graddiff.entries import entry_from_array
from graddiff.writer import TraceWriter

PARAMS = ("fc1.weight", "fc1.bias", "fc2.weight", "fc2.bias")
ENV = {"torch_version": "2.14.1", "device": "cpu", "dtype": "float32", "initial_seed": 0}


def simulate(
    path,
    *,
    steps: int = 6,
    lr: float = 0.05,
    zero_grad: bool = True,
    values: Union[str, set] = "full",
    kinds: Optional[set] = None,
    frozen: tuple = (),
    nan_at: Optional[int] = None,
    inf_at: Optional[int] = None,
    dead: int = 0,
    batch: int = 16,
    seed: int = 0,
    status: str = "complete",
    values_note: str = "",
) -> str:
    """Write a trace of ``steps`` SGD steps of a 4-8-2 ReLU MLP on a linear teacher."""
    with np.errstate(invalid="ignore", over="ignore"):  # injected NaN/Inf propagate on purpose
        return _simulate(
            path,
            steps,
            lr,
            zero_grad,
            values,
            kinds,
            frozen,
            nan_at,
            inf_at,
            dead,
            batch,
            seed,
            status,
            values_note,
        )


def _simulate(
    path,
    steps,
    lr,
    zero_grad,
    values,
    kinds,
    frozen,
    nan_at,
    inf_at,
    dead,
    batch,
    seed,
    status,
    values_note,
):
    rng = np.random.default_rng(seed)
    p = {
        "fc1.weight": rng.normal(0, 0.5, (8, 4)),
        "fc1.bias": rng.normal(0, 0.1, 8),
        "fc2.weight": rng.normal(0, 0.5, (2, 8)),
        "fc2.bias": rng.normal(0, 0.1, 2),
    }
    p["fc1.bias"][:dead] = -100.0
    teacher = rng.normal(0, 1, (2, 4))
    grads = {n: np.zeros_like(v) for n, v in p.items()}
    w = TraceWriter(str(path), environment=ENV, options={"values": str(values)}, ballast=False)
    for k in range(steps):
        full = values == "full" or (isinstance(values, set) and k in values)
        x = rng.normal(size=(batch, 4))
        y = x @ teacher.T
        h = x @ p["fc1.weight"].T + p["fc1.bias"]
        if nan_at == k:
            h[0, 0] = np.nan
        if inf_at == k:
            h[0, 1] = np.inf
        a = np.maximum(h, 0)
        out = a @ p["fc2.weight"].T + p["fc2.bias"]
        loss = np.mean((out - y) ** 2)
        d_out = 2 * (out - y) / out.size
        d_a = d_out @ p["fc2.weight"]
        d_h = d_a * (h > 0)
        fresh = {
            "fc2.weight": d_out.T @ a,
            "fc2.bias": d_out.sum(0),
            "fc1.weight": d_h.T @ x,
            "fc1.bias": d_h.sum(0),
        }
        grads = fresh if zero_grad else {n: grads[n] + fresh[n] for n in p}
        records = [
            *(("param", n, v) for n, v in p.items()),
            ("input", "0", x),
            ("activation", "fc1", h),
            ("activation", "act", a),
            ("activation", "fc2", out),
            ("loss", "loss", np.array(loss)),
            ("grad_output", "fc2", d_out),
            ("grad_output", "act", d_a),
            ("grad_output", "fc1", d_h),
            *(("grad", n, v) for n, v in grads.items()),
        ]
        entries = [
            entry_from_array(kind, name, np.asarray(v, np.float32), seq=i, store_values=full)
            for i, (kind, name, v) in enumerate(records)
            if kinds is None or kind in kinds
        ]
        w.write_step(k, entries)
        p = {n: v if n in frozen else v - lr * grads[n] for n, v in p.items()}
    if values_note:
        w.set_attr("values_note", values_note)
    if status == "recording":  # what a killed process leaves: no final status written
        w._file.flush()
        w._file.close()
        w._file = None
        w._lock.release()  # the kernel drops a killed process's lock
    else:
        w.close(status)
    return str(path)


def write_series(path, per_step: list, *, status: str = "complete") -> str:
    """A trace from explicit data: ``per_step[k]`` = list of (kind, name, array)."""
    w = TraceWriter(str(path), environment=ENV, ballast=False)
    for k, records in enumerate(per_step):
        w.write_step(
            k,
            [entry_from_array(kd, n, np.asarray(v), seq=i) for i, (kd, n, v) in enumerate(records)],
        )
    w.close(status)
    return str(path)


@pytest.mark.parametrize("values", ["full", "stats"], ids=["full", "stats"])
def test_simulated_trace_reads_back(tmp_path, values):
    path = simulate(tmp_path / "run.h5", values=values)
    with graddiff.open(path) as run:
        assert list(run.steps) == list(range(6))
        assert run.kinds == ["param", "input", "activation", "loss", "grad_output", "grad"]
        assert run.has_values("grad", "fc1.bias", 2) == (values == "full")


def test_recording_status_is_kept(tmp_path):
    path = simulate(tmp_path / "run.h5", steps=2, status="recording")
    with graddiff.open(path) as run:
        assert run.status == "recording"
        assert len(run.steps) == 2
