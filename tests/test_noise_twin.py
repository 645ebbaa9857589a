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


def _run(
    path,
    *,
    perturb=None,
    foreach=False,
    lr=1e-2,
    steps=4,
    bf16=False,
    bn=False,
    seed=0,
    data_seed=None,
    act=nn.Tanh,
) -> str:
    torch.manual_seed(seed)
    if bn:
        net = nn.Sequential(nn.Linear(8, 16), nn.BatchNorm1d(16), act(), nn.Linear(16, 4))
    else:
        net = nn.Sequential(nn.Linear(8, 16), act(), nn.Linear(16, 4))
    o = torch.optim.AdamW(net.parameters(), lr=lr, foreach=foreach)
    g = None if data_seed is None else torch.Generator().manual_seed(data_seed)
    with graddiff.trace(net, path, values="full", perturb=perturb):
        for _ in range(steps):  # data from the global RNG: the twin must draw the same
            x, y = torch.randn(16, 8, generator=g), torch.randint(0, 4, (16,), generator=g)
            o.zero_grad()
            with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
                loss = F.cross_entropy(net(x), y)
            loss.backward()
            o.step()
    return str(path)


def test_twin_is_a_one_ulp_nudge_and_nothing_else(tmp_path):
    a, tw = _run(tmp_path / "a.h5"), _run(tmp_path / "tw.h5", perturb="ulp")
    with graddiff.open(a) as ra, graddiff.open(tw) as rt:
        assert rt.options["perturb"] == "ulp" and ra.options["perturb"] is None
        for name in ("0.weight", "2.bias"):
            pa, pt = ra.get("param", name, 0), rt.get("param", name, 0)
            up = np.nextafter(pa, np.float32(np.inf))
            down = np.nextafter(pa, np.float32(-np.inf))
            assert np.all((pt == up) | (pt == down))  # one ulp, up or down, per element
            if pa.size > 100:  # about half each way: not a rescaling
                assert 0.4 < np.mean(pt == up) < 0.6
        name = ra.names("input")[0]
        for step in range(4):  # the random numbers drawn after entry are the same
            assert np.array_equal(ra.get("input", name, step), rt.get("input", name, step))


def test_bfloat16_nudge_moves_by_one_bfloat16_ulp(tmp_path):
    a, tw = _run(tmp_path / "a.h5"), _run(tmp_path / "tw.h5", perturb="bfloat16")
    with graddiff.open(a) as ra, graddiff.open(tw) as rt:
        pa, pt = ra.get("param", "0.weight", 0), rt.get("param", "0.weight", 0)
    _, e = np.frexp(pa)
    assert np.array_equal(np.abs(pt - pa), np.ldexp(np.float32(1), e - 8).astype(np.float32))


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


def test_bf16_pair_is_within_the_noise_of_the_bf16_runs_twin(tmp_path):
    """The twin of the lower-precision run, nudged by one bfloat16 ulp, rounds every operation
    in bfloat16 too: its drift holds what autocast's rounding does, a float32 twin's does not."""
    a = _run(tmp_path / "a.h5", bn=True)
    b = _run(tmp_path / "b.h5", bn=True, bf16=True)
    tw = _run(tmp_path / "tw.h5", bn=True, bf16=True, perturb="bfloat16")
    assert graddiff.compare(a, b).headline().startswith("Within bfloat16 precision")
    r = graddiff.compare(a, b, noise=tw)
    assert (r.verdict, r.exit_code, r.noise_of) == ("within_tolerance", 0, "B"), r.headline()
    assert r.headline().startswith("Within the noise of the perturbed twin")
    assert any("the twin is B's: it records the same records and dtypes as B" in n for n in r.notes)
    assert r.max_rel_diff > 1e-2  # a real bfloat16-sized difference, judged within the noise
    # a real bug in the same setting (twice the learning rate; its twin is its own nudged copy)
    bug = _run(tmp_path / "bug.h5", bn=True, bf16=True, lr=2e-2)
    bug_tw = _run(tmp_path / "bug_tw.h5", bn=True, bf16=True, lr=2e-2, perturb="bfloat16")
    r = graddiff.compare(a, bug, noise=bug_tw)
    assert r.exit_code == 1 and (r.first.step, r.first.kind) == (1, "param"), r.headline()
    assert "beyond 10x the twin's drift here" in r.headline()


def test_a_twin_that_cannot_see_the_pairs_rounding_is_refused(tmp_path):
    a, b = _run(tmp_path / "a.h5"), _run(tmp_path / "b.h5", bf16=True)
    fp32_twin = _run(tmp_path / "t32.h5", perturb="bfloat16")  # a twin of A: no bf16 rounding
    ulp_twin = _run(tmp_path / "tulp.h5", bf16=True, perturb="ulp")  # rounded away by autocast
    for twin, why in (
        (fp32_twin, "Record the twin from B: graddiff.trace(..., perturb='bfloat16')"),
        (ulp_twin, "rounds such a nudge away (no drift)"),
    ):
        out = CliRunner().invoke(graddiff.cli.main, ["compare", a, b, "--noise", twin])
        assert out.exit_code == 2 and why in out.output, out.output


def test_noise_of_names_the_twins_run(tmp_path):
    a, b = _run(tmp_path / "a.h5"), _run(tmp_path / "b.h5", foreach=True)
    tw = _run(tmp_path / "tw.h5", foreach=True, perturb="ulp")  # B's twin: same dtypes as A's
    r = graddiff.compare(a, b, noise=tw)
    assert r.noise_of == "A" and any("A by default" in n for n in r.notes)
    r = graddiff.compare(a, b, noise=tw, noise_of="b")
    assert r.noise_of == "B" and r.exit_code == 0, r.headline()
    assert r.to_dict()["noise_of"] == "B"
    out = CliRunner().invoke(graddiff.cli.main, ["compare", a, b, "--noise-of", "B"])
    assert out.exit_code == 2 and "--noise-of applies only with --noise" in out.output


WRONG_TWINS = {  # a twin of another run: each would hide B's bug (lr x1.1) in its drift
    "another seed": ({"seed": 1}, "differs by rel"),
    "another data order": ({"data_seed": 7}, "its input '0' differs at step 0 (other data)"),
    "another script (the buggy one)": (
        {"lr": 1.1e-2},
        "its optimizer settings differ at step 0: lr is 0.011 in the twin, 0.01 in the run",
    ),
    "another script (an op swapped)": ({"act": nn.ReLU}, "at step 0, before any update"),
    "another model (BatchNorm added)": ({"bn": True}, "its records differ (only in the twin"),
}


@pytest.mark.parametrize("kind", sorted(WRONG_TWINS))
def test_a_twin_of_another_run_is_refused(tmp_path, kind):
    """The twin must be A's: the same records, optimizer settings and inputs, initial
    parameters one ulp apart, and a first step within what one ulp explains. Otherwise its
    drift holds a real difference: the bug in B (10 % larger learning rate) would be within
    it. One Error line and exit 2 on the command line, NotATwinError through the API."""
    kw, why = WRONG_TWINS[kind]
    a, b = _run(tmp_path / "a.h5"), _run(tmp_path / "b.h5", lr=1.1e-2)
    good = _run(tmp_path / "good.h5", perturb="ulp")
    r = graddiff.compare(a, b, noise=good)  # the genuine twin: accepted, the bug found
    assert r.exit_code == 1 and r.first.step == 1, r.headline()
    bad = _run(tmp_path / "bad.h5", perturb="ulp", **kw)
    with pytest.raises(graddiff.NotATwinError, match="not a perturbed copy of") as err:
        graddiff.compare(a, b, noise=bad)
    assert why in str(err.value) and isinstance(err.value, graddiff.GraddiffError)
    out = CliRunner().invoke(graddiff.cli.main, ["compare", a, b, "--noise", bad])
    assert out.exit_code == 2, out.output
    lines = out.output.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("Error: --noise ") and why in lines[0]
