"""A perturbed twin (trace(..., perturb=...)) and compare --noise: tolerance per record and
step from how far the twin drifts from A."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from click.testing import CliRunner
from torch import nn

import graddiff
import graddiff.cli


def _run(path, *, perturb=None, foreach=False, lr=1e-2, steps=4) -> str:
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(8, 16), nn.Tanh(), nn.Linear(16, 4))
    o = torch.optim.AdamW(net.parameters(), lr=lr, foreach=foreach)
    with graddiff.trace(net, path, values="full", perturb=perturb):
        for _ in range(steps):  # data from the global RNG: the twin must draw the same
            x, y = torch.randn(16, 8), torch.randint(0, 4, (16,))
            o.zero_grad()
            F.cross_entropy(net(x), y).backward()
            o.step()
    return str(path)


def test_twin_is_a_one_ulp_nudge_and_nothing_else(tmp_path):
    a, tw = _run(tmp_path / "a.h5"), _run(tmp_path / "tw.h5", perturb="ulp")
    with graddiff.open(a) as ra, graddiff.open(tw) as rt:
        assert rt.options["perturb"] == "ulp" and ra.options["perturb"] is None
        for name in ("0.weight", "2.bias"):
            pa, pt = ra.get("param", name, 0), rt.get("param", name, 0)
            assert np.array_equal(pt, np.nextafter(pa, np.float32(np.inf)))
        name = ra.names("input")[0]
        for step in range(4):  # the random numbers drawn after entry are the same
            assert np.array_equal(ra.get("input", name, step), rt.get("input", name, step))


def test_bfloat16_nudge_moves_by_one_bfloat16_ulp(tmp_path):
    a, tw = _run(tmp_path / "a.h5"), _run(tmp_path / "tw.h5", perturb="bfloat16")
    with graddiff.open(a) as ra, graddiff.open(tw) as rt:
        pa, pt = ra.get("param", "0.weight", 0), rt.get("param", "0.weight", 0)
    _, e = np.frexp(pa)
    assert np.array_equal(pt - pa, np.ldexp(np.float32(1), e - 8).astype(np.float32))


def test_equivalent_pair_is_within_the_twins_noise(tmp_path):
    a, tw = _run(tmp_path / "a.h5"), _run(tmp_path / "tw.h5", perturb="ulp")
    b = _run(tmp_path / "b.h5", foreach=True)
    r = graddiff.compare(a, b, noise=tw)
    assert r.exit_code == 0 and r.noise == tw, r.headline()
    assert r.headline().startswith("Within the noise of the perturbed twin") or (
        r.verdict == "identical"
    )


def test_a_real_difference_beyond_the_twins_noise_diverges(tmp_path):
    a, tw = _run(tmp_path / "a.h5"), _run(tmp_path / "tw.h5", perturb="ulp")
    b = _run(tmp_path / "b.h5", lr=1.1e-2)  # 10 % larger learning rate
    r = graddiff.compare(a, b, noise=tw)
    assert r.exit_code == 1 and r.first.kind == "param" and r.first.step == 1, r.headline()
    assert "beyond 10x the twin's drift here" in r.headline()
    assert r.cause.cause == "learning_rate"


def test_noise_needs_a_perturbed_twin(tmp_path):
    a, b = _run(tmp_path / "a.h5"), _run(tmp_path / "b.h5")
    out = CliRunner().invoke(graddiff.cli.main, ["compare", a, b, "--noise", b])
    assert out.exit_code == 2 and "not a perturbed twin" in out.output
    with pytest.raises(graddiff.TraceUsageError, match="perturb='half'"):
        graddiff.trace(nn.Linear(2, 2), tmp_path / "x.h5", perturb="half")
