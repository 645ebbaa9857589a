"""DistributedDataParallel on gloo (CPU), two processes, one trace per rank via ``{rank}``.

tests/scripts/ddp_worker.py runs each rank. What must hold: names are the plain model's (no
``module.`` prefix), the environment records rank and world size, inputs differ per rank, and
``grad`` is the gradient the optimizer consumes, i.e. after DDP's all-reduce: equal bitwise on
both ranks and equal to the average of the two ranks' local gradients, which the test
recomputes in numpy from the recorded params and inputs.
"""

from __future__ import annotations

import os

import numpy as np
import pytest
from dist_launch import run_ranks

import graddiff

SCRIPT = os.path.join(os.path.dirname(__file__), "scripts", "ddp_worker.py")
STEPS = 3
PARAMS = ["0.weight", "0.bias", "2.weight", "2.bias"]


@pytest.fixture(scope="module")
def traces(tmp_path_factory):
    d = tmp_path_factory.mktemp("ddp")
    init = d / "init"  # file:// rendezvous: no port to find, nothing leaves the machine
    run_ranks([[SCRIPT, str(rank), "2", str(init), str(d)] for rank in range(2)], timeout=180)
    return [str(d / f"run_{rank}.h5") for rank in range(2)]


def _local_grads(run: graddiff.Run, step: int) -> dict[str, np.ndarray]:
    """This rank's own gradient of mean(model(x)**2) for Linear-ReLU-Linear, in float64."""
    w1, b1, w2, b2 = (run.get("param", n, step).astype(np.float64) for n in PARAMS)
    x = run.get("input", "0", step).astype(np.float64)
    z = x @ w1.T + b1
    h = np.maximum(z, 0)
    y = h @ w2.T + b2
    dy = 2 * y / y.size
    dz = (dy @ w2) * (z > 0)
    return {"0.weight": dz.T @ x, "0.bias": dz.sum(0), "2.weight": dy.T @ h, "2.bias": dy.sum(0)}


@pytest.mark.slow
def test_both_rank_files_with_plain_names(traces):
    for rank, path in enumerate(traces):
        assert os.path.exists(path)
        with graddiff.open(path) as run:
            assert run.status == "complete"
            assert [int(s) for s in run.steps] == list(range(STEPS))
            assert run.environment["rank"] == rank
            assert run.environment["world_size"] == 2
            assert run.options["path"].endswith(f"run_{rank}.h5")
            names = [k.name for k in run.keys]
            assert not [n for n in names if n.startswith("module")], names
            assert run.names("param") == PARAMS
            assert set(run.names("activation")) == {"0", "1", "2", "(root)"}


@pytest.mark.slow
def test_grads_are_the_allreduced_average(traces):
    with graddiff.open(traces[0]) as r0, graddiff.open(traces[1]) as r1:
        for step in range(STEPS):
            # Different data per rank ...
            x0, x1 = r0.get("input", "0", step), r1.get("input", "0", step)
            assert x0.shape == x1.shape == (5, 6)
            assert not np.array_equal(x0, x1)
            assert r0.get("loss", "loss", step) != r1.get("loss", "loss", step)
            # ... the same weights (DDP keeps replicas in sync) ...
            for name in PARAMS:
                assert (
                    r0.get("param", name, step).tobytes() == r1.get("param", name, step).tobytes()
                )
            local0, local1 = _local_grads(r0, step), _local_grads(r1, step)
            for name in PARAMS:
                g0, g1 = r0.get("grad", name, step), r1.get("grad", name, step)
                # ... and one all-reduced gradient, bit for bit on both ranks,
                assert g0.tobytes() == g1.tobytes(), (step, name)
                # which is the average of the local ones, not this rank's own.
                avg = (local0[name] + local1[name]) / 2
                np.testing.assert_allclose(g0, avg, rtol=1e-5, atol=1e-7)
                if name == "0.weight":
                    assert not np.allclose(g0, local0[name], rtol=1e-3, atol=1e-5)
                    assert not np.allclose(g0, local1[name], rtol=1e-3, atol=1e-5)
