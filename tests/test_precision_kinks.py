"""Tipped kinks: a float16 AMP run of a CNN is the same training as its float32 run.

In float16, rounding moves a few ReLU inputs across zero and breaks a few max-pool near-ties:
those output-gradient elements are zero in one run and full-sized in the other, and the first
convolution's weight gradient then differs by rel 0.13 at step 1, twice the bound linear in the
unit roundoff (graddiff/diff/kinks.py, docs/tolerance.md "Tipped kinks"). The oracle is the
test's own: it reads both runs' output gradients and counts the switched elements itself.
A real bug in the same float16 pair (twice the learning rate) is still DIVERGED, with its cause;
a gradient zeroed by a detach is not a tipped kink.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

import graddiff
from graddiff.diff.kinks import tipped


def _cnn() -> nn.Module:
    return nn.Sequential(
        nn.Conv2d(1, 4, 3, padding=1), nn.BatchNorm2d(4), nn.ReLU(), nn.MaxPool2d(2),
        nn.Flatten(), nn.Linear(4 * 4 * 4, 4),
    )  # fmt: skip


def _train(path, *, fp16: bool, lr_factor: float = 1.0, adam: bool = False, steps: int = 3) -> str:
    """The CNN under AdamW (lr 1e-3), or Adam (lr 0.01): float32, or float16 autocast with a
    GradScaler."""
    torch.manual_seed(0)
    net = _cnn()
    if adam:
        o = torch.optim.Adam(net.parameters(), lr=0.01 * lr_factor)
    else:
        o = torch.optim.AdamW(net.parameters(), lr=1e-3 * lr_factor)
    scaler = torch.amp.GradScaler("cpu", enabled=fp16)
    g = torch.Generator().manual_seed(0)
    with graddiff.trace(net, path, values="full"):
        for _ in range(steps):
            x, y = torch.randn(16, 1, 8, 8, generator=g), torch.randint(0, 4, (16,), generator=g)
            o.zero_grad()
            with torch.autocast("cpu", dtype=torch.float16, enabled=fp16):
                loss = F.cross_entropy(net(x), y)
            scaler.scale(loss).backward()
            scaler.step(o)
            scaler.update()
    return str(path)


def _rel(a, b) -> float:
    a, b = a.astype(np.float64), b.astype(np.float64)
    return float(np.linalg.norm(a - b) / max(np.linalg.norm(a), np.linalg.norm(b)))


def test_float16_amp_cnn_is_within_precision(tmp_path):
    a, b = _train(tmp_path / "a.h5", fp16=False), _train(tmp_path / "b.h5", fp16=True)
    r = graddiff.compare(a, b)
    assert r.verdict == "within_tolerance" and r.exit_code == 0, r.headline()
    assert "Within float16 precision" in r.headline()
    assert r.loss_scale["run"] == "B" and r.cause.cause == "loss_scaling"
    note = next(n for n in r.notes if n.startswith("tipped kinks"))
    assert "at step 1" in note and "grad 0.weight" in note, note
    with graddiff.open(a) as ra, graddiff.open(b) as rb:  # the oracle, from the records
        switched = {
            name: int(((ra.get("grad_output", name, 1) == 0)
                       != (rb.get("grad_output", name, 1) == 0)).sum())
            for name in ("1", "2")
        }  # fmt: skip
        rel = _rel(ra.get("grad", "0.weight", 1), rb.get("grad", "0.weight", 1))
        same0 = ((ra.get("grad_output", "2", 0) == 0) == (rb.get("grad_output", "2", 0) == 0)).all()
    assert same0 and switched["2"] > 0 and switched["1"] > 0, switched
    # 8 x u x (1 + depth) x sqrt(2): depth 11 (5 computing outputs, 5 output gradients, + 1)
    linear = 8 * 2.0**-11 * 12 * 2**0.5
    assert rel > linear, rel  # the kinks were needed: rounding linear in u does not explain it
    assert f"rel {rel:.2g}" in note


def test_a_real_bug_in_the_float16_pair_is_still_found(tmp_path):
    a, b = _train(tmp_path / "a.h5", fp16=True), _train(tmp_path / "b.h5", fp16=True, lr_factor=2)
    r = graddiff.compare(a, b)
    assert r.verdict == "diverged" and r.exit_code == 1, r.headline()
    assert (r.first.step, r.first.kind) == (1, "param"), r.headline()
    assert r.cause.cause == "learning_rate", r.diagnosis[:1]
    # float32 vs float16 + GradScaler with twice the lr: the loss scale at step 0 (gradients
    # agree unscaled) is not the story; the divergence is the update at step 1
    r = graddiff.compare(_train(tmp_path / "f.h5", fp16=False), b)
    assert r.verdict == "diverged" and r.exit_code == 1, r.headline()
    assert (r.first.step, r.first.kind) == (1, "param"), r.headline()
    assert r.first.update["rel"] == pytest.approx(0.5, abs=0.01)
    assert "B scales its loss by 2^16 (a GradScaler)" in r.notes[0]


def test_only_switches_a_kink_explains_are_tipped():
    rng = np.random.default_rng(0)
    z = rng.standard_normal(64)
    za, zb = z.copy(), z.copy()
    zb[3] = -za[3] if abs(za[3]) < 1 else zb[3]
    za[3], zb[3] = 1e-4, -1e-4  # a ReLU input within rounding of zero: the sign flipped
    up = rng.standard_normal(64)
    ga, gb = up * (za > 0), up * (zb > 0)
    assert tipped(ga, gb, za, zb).tolist() == [i == 3 for i in range(64)]
    # max-pool: the gradient of a window moved from element 5 to element 6 (a broken tie)
    pa, pb = up.copy(), up.copy()
    pa[6], pb[5] = 0.0, 0.0
    pb[6] = pa[5]
    assert np.flatnonzero(tipped(pa, pb, None, None)).tolist() == [5, 6]
    # a detach zeroing half of B's gradient: outputs far from zero, nothing re-routed
    db = ga.copy()
    db[:32] = 0.0
    assert not tipped(ga, db, za, za).any()


def _amp_mlp(path, *, fp16: bool, lr_factor: float = 1.0, perturb=None) -> str:
    """A BatchNorm MLP under SGD with momentum: float32, or float16 autocast + GradScaler."""
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(8, 32), nn.BatchNorm1d(32), nn.ReLU(), nn.Linear(32, 4))
    o = torch.optim.SGD(net.parameters(), lr=0.05 * lr_factor, momentum=0.9)
    scaler = torch.amp.GradScaler("cpu", enabled=fp16)
    g = torch.Generator().manual_seed(0)
    with graddiff.trace(net, path, values="full", perturb=perturb):
        for _ in range(4):
            x, y = torch.randn(16, 8, generator=g), torch.randint(0, 4, (16,), generator=g)
            o.zero_grad()
            with torch.autocast("cpu", dtype=torch.float16, enabled=fp16):
                loss = F.cross_entropy(net(x), y)
            scaler.scale(loss).backward()
            scaler.step(o)
            scaler.update()
    return str(path)


def test_noise_twin_judges_a_grad_scaler_pair(tmp_path):
    """compare --noise with a twin of the float16 run: the loss scale is found as without a
    twin (loss_scaling, exit 0), and the rest is judged by the twin's drift; the same pair
    with twice the learning rate in B is DIVERGED (its twin has the same bug, as a twin must)."""
    a = _amp_mlp(tmp_path / "a.h5", fp16=False)
    b = _amp_mlp(tmp_path / "b.h5", fp16=True)
    tw = _amp_mlp(tmp_path / "tw.h5", fp16=True, perturb="float16")
    r = graddiff.compare(a, b, noise=tw)
    assert r.verdict != "diverged" and r.exit_code == 0, r.headline()
    assert r.loss_scale is not None and r.loss_scale["run"] == "B", r.headline()
    assert r.cause.cause == "loss_scaling" and r.noise_of == "B"
    assert r.headline().startswith("Within the noise of the perturbed twin"), r.headline()
    bug = _amp_mlp(tmp_path / "bug.h5", fp16=True, lr_factor=2)
    bug_tw = _amp_mlp(tmp_path / "bug_tw.h5", fp16=True, lr_factor=2, perturb="float16")
    r = graddiff.compare(a, bug, noise=bug_tw)
    assert r.verdict == "diverged" and r.exit_code == 1, r.headline()
    assert r.first.step == 1 and r.first.kind in ("param", "activation"), r.headline()
    assert "B scales its loss by 2^16 (a GradScaler)" in r.notes[0]


class _Encoder(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.inp = nn.Linear(8, 16)
        self.layer = nn.TransformerEncoderLayer(16, 2, 32, dropout=0.0, batch_first=True)
        self.out = nn.Linear(16, 4)

    def forward(self, x):
        return self.out(self.layer(self.inp(x)).mean(1))


def _enc(path, *, fp16: bool, lr_factor: float = 1.0) -> str:
    torch.manual_seed(0)
    net = _Encoder()
    o = torch.optim.Adam(net.parameters(), lr=0.01 * lr_factor)
    scaler = torch.amp.GradScaler("cpu", enabled=fp16)
    g = torch.Generator().manual_seed(0)
    with graddiff.trace(net, path, values="full"):
        for _ in range(3):
            x, y = torch.randn(16, 6, 8, generator=g), torch.randint(0, 4, (16,), generator=g)
            o.zero_grad()
            with torch.autocast("cpu", dtype=torch.float16, enabled=fp16):
                loss = F.cross_entropy(net(x).float(), y)
            scaler.scale(loss).backward()
            scaler.step(o)
            scaler.update()
    return str(path)


def test_adam_on_rounding_residue_is_within_precision(tmp_path):
    """The key third of in_proj_bias has a gradient that is zero in exact arithmetic (softmax
    ignores a key bias): rounding residue, which Adam turns into +-lr updates of either sign.
    The oracle: the test reads both runs' gradients and parameters itself."""
    a, b = _enc(tmp_path / "a.h5", fp16=False), _enc(tmp_path / "b.h5", fp16=True)
    name = "layer.self_attn.in_proj_bias"
    with graddiff.open(a) as ra, graddiff.open(b) as rb:
        ga, gb = ra.get("grad", name, 0), rb.get("grad", name, 0)
        pa, pb = ra.get("param", name, 1), rb.get("param", name, 1)
    key = slice(16, 32)
    assert np.abs(ga[key]).max() < 1e-5 * np.abs(ga).max()  # residue in float32 ...
    assert np.abs(gb[key]).max() < 1e-3 * np.abs(gb).max()  # ... and in float16
    assert _rel(pa, pb) > 0.2  # yet the parameter differs by far more than rounding
    assert _rel(np.delete(pa, np.s_[16:32]), np.delete(pb, np.s_[16:32])) < 1e-3
    r = graddiff.compare(a, b)
    assert r.verdict == "within_tolerance" and r.exit_code == 0, r.headline()
    note = next(n for n in r.notes if n.startswith("rounding-dominated"))
    assert f"param {name}" in note and "at step 1" in note, note
    bug = _enc(tmp_path / "bug.h5", fp16=True, lr_factor=2.0)
    r = graddiff.compare(b, bug)
    assert r.verdict == "diverged" and (r.first.step, r.first.kind) == (1, "param"), r.headline()
    assert r.cause.cause == "learning_rate", r.diagnosis[:1]


def test_a_conv_bias_before_batchnorm_under_adam_is_within_float16_precision(tmp_path):
    """The bias's residue updates shift the conv output per channel (its difference beyond
    the bound only through that shift), BatchNorm's running mean averages the shifted output,
    and the next step starts from it: each is read as what it is, not as a divergence."""
    a = _train(tmp_path / "a.h5", fp16=False, adam=True, steps=4)
    r = graddiff.compare(a, _train(tmp_path / "b.h5", fp16=True, adam=True, steps=4))
    assert not r.diverged, r.headline()
    assert any("once the shift its bias 0.bias adds is taken out" in n for n in r.notes), r.notes
    # the same pair with twice the learning rate is still a divergence, named
    r = graddiff.compare(a, _train(tmp_path / "c.h5", fp16=True, lr_factor=2, adam=True, steps=4))
    assert r.diverged and r.first.step == 1, r.headline()
    assert r.cause.cause == "learning_rate", r.diagnosis
