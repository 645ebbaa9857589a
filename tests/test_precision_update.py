"""Reduced precision judges a parameter by the size of its update, not only by its value.

Twice the learning rate under SGD moves a parameter by ~1e-3 of its norm, well within what
bfloat16 rounding explains for a deep record, so the value bound alone called such a pair
"within bfloat16 precision". The update the step adds is computed from the gradient, so its
size may differ by the gradient's tolerance (plus the rounding of storing the parameter) and
no more (graddiff/diff/precision.py, update_difference; docs/tolerance.md).

The grid: MLP / CNN / tiny transformer x SGD / SGD with momentum / Adam, both runs in bfloat16
autocast (or with bfloat16 parameters), B with twice A's learning rate; the oracle is the
test's own: B's update is twice A's at the first step, so the first divergence is a parameter
at step 1 whose recorded update norms (read back here) are 2:1, with cause learning_rate.
Genuine pairs of the same grid (float32 vs bfloat16 autocast, float32 vs bfloat16
parameters, bfloat16 with 2 accumulated micro-batches) must stay within precision.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

import graddiff

STEPS = 3
LR = {"sgd": 0.1, "momentum": 0.05, "adam": 0.01}
SHAPE = {"mlp": (16, 8), "cnn": (16, 1, 8, 8), "transformer": (16, 6, 8)}


class Encoder(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.inp = nn.Linear(8, 16)
        self.layer = nn.TransformerEncoderLayer(16, 2, 32, dropout=0.0, batch_first=True)
        self.out = nn.Linear(16, 4)

    def forward(self, x):
        return self.out(self.layer(self.inp(x)).mean(1))


def _net(model: str) -> nn.Module:
    if model == "mlp":
        return nn.Sequential(
            nn.Linear(8, 32), nn.ReLU(), nn.Linear(32, 32), nn.ReLU(), nn.Linear(32, 4)
        )
    if model == "cnn":
        return nn.Sequential(
            nn.Conv2d(1, 4, 3),
            nn.ReLU(),
            nn.Conv2d(4, 4, 3),
            nn.ReLU(),
            nn.Flatten(),
            nn.Linear(64, 4),
        )
    return Encoder()


def _train(path, model, opt, precision, *, lr_factor=1.0, micro=1) -> str:
    """precision: "float32", "autocast" (bfloat16 autocast) or "params" (bfloat16 model)."""
    torch.manual_seed(0)
    net = _net(model)
    if precision == "params":
        net = net.to(torch.bfloat16)
    lr = LR[opt] * lr_factor
    if opt == "adam":
        o = torch.optim.Adam(net.parameters(), lr=lr)
    else:
        o = torch.optim.SGD(net.parameters(), lr=lr, momentum=0.9 if opt == "momentum" else 0.0)
    g = torch.Generator().manual_seed(0)
    with graddiff.trace(net, path, values="full"):
        for _ in range(STEPS):
            x, y = torch.randn(*SHAPE[model], generator=g), torch.randint(0, 4, (16,), generator=g)
            if precision == "params":
                x = x.to(torch.bfloat16)
            o.zero_grad()
            for xm, ym in zip(x.chunk(micro), y.chunk(micro)):
                with torch.autocast("cpu", dtype=torch.bfloat16, enabled=precision == "autocast"):
                    loss = F.cross_entropy(net(xm).float(), ym) / micro
                loss.backward()
            o.step()
    return str(path)


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    d = tmp_path_factory.mktemp("prec_update")
    cache: dict[tuple, str] = {}

    def get(model, opt, precision, **kw) -> str:
        key = (model, opt, precision, tuple(sorted(kw.items())))
        if key not in cache:
            cache[key] = _train(d / f"{len(cache)}.h5", model, opt, precision, **kw)
        return cache[key]

    return get


def _update_norm(run, name: str, step: int) -> float:
    p1 = run.get("param", name, step).astype(np.float64)
    p0 = run.get("param", name, step - 1).astype(np.float64)
    return float(np.linalg.norm(p1 - p0))


LRX2 = [(m, o, "autocast") for m in SHAPE for o in LR] + [
    ("mlp", "sgd", "params"),
    ("mlp", "momentum", "params"),
    ("cnn", "sgd", "params"),
    # bfloat16 parameters in the transformer layer: found at step 3 (SGD) and not at all
    # (momentum) while the depth counted its Dropout(p=0), its container and the model
    ("transformer", "sgd", "params"),
    ("transformer", "momentum", "params"),
]


@pytest.mark.parametrize(("model", "opt", "precision"), LRX2)
def test_twice_the_learning_rate_in_bf16_diverges_at_the_first_update(runs, model, opt, precision):
    a = runs(model, opt, precision)
    b = runs(model, opt, precision, lr_factor=2.0)
    r = graddiff.compare(a, b)
    assert r.verdict == "diverged" and r.exit_code == 1, r.headline()
    f = r.first
    assert (f.step, f.kind) == (1, "param"), r.headline()
    assert f.update is not None and f.update["from_step"] == 0
    assert f.update["rel"] > f.update["tolerance"]
    assert "bfloat16 rounding explains for it" in r.headline()
    with graddiff.open(a) as ra, graddiff.open(b) as rb:  # the oracle: B's update is twice A's
        ratio = _update_norm(rb, f.name, 1) / _update_norm(ra, f.name, 1)
    assert ratio == pytest.approx(2.0, rel=0.05)
    assert f.update["rel"] == pytest.approx(1 - 1 / ratio, rel=1e-6)
    assert r.cause is not None and r.cause.cause == "learning_rate", r.diagnosis[:1]


GENUINE = [(m, o) for m in SHAPE for o in LR]


@pytest.mark.parametrize(("model", "opt"), GENUINE)
def test_genuine_bf16_pairs_stay_within_precision(runs, model, opt):
    """float32 vs bfloat16 autocast, and bfloat16 autocast vs the same with the batch summed
    over 2 micro-batches (another rounding order): the same computation, within precision."""
    bf16 = runs(model, opt, "autocast")
    for other in (runs(model, opt, "float32"), runs(model, opt, "autocast", micro=2)):
        r = graddiff.compare(other, bf16)
        assert r.verdict != "diverged" and r.exit_code == 0, r.headline()


@pytest.mark.parametrize("model", ["mlp", "cnn"])
@pytest.mark.parametrize("opt", ["sgd", "adam"])
def test_bf16_parameters_vs_float32_stay_within_precision(runs, model, opt):
    """A bfloat16 model's updates are quantised to its ulps (and Adam's normalised update
    flips sign where rounding flips a near-zero gradient): within the update's allowance."""
    r = graddiff.compare(runs(model, opt, "float32"), runs(model, opt, "params"))
    assert r.verdict != "diverged" and r.exit_code == 0, r.headline()


def _amp(path, *, fp16: bool, lr_factor: float = 1.0) -> str:
    """A BatchNorm MLP under AdamW: float32, or float16 autocast with a GradScaler."""
    torch.manual_seed(0)
    net = nn.Sequential(
        nn.Linear(8, 32), nn.BatchNorm1d(32), nn.ReLU(), nn.Linear(32, 32), nn.BatchNorm1d(32),
        nn.ReLU(), nn.Linear(32, 4),
    )  # fmt: skip
    o = torch.optim.AdamW(net.parameters(), lr=1e-3 * lr_factor)
    scaler = torch.amp.GradScaler("cpu", enabled=fp16)
    g = torch.Generator().manual_seed(0)
    with graddiff.trace(net, path, values="full"):
        for _ in range(4):
            x, y = torch.randn(16, 8, generator=g), torch.randint(0, 4, (16,), generator=g)
            o.zero_grad()
            with torch.autocast("cpu", dtype=torch.float16, enabled=fp16):
                loss = F.cross_entropy(net(x), y)
            scaler.scale(loss).backward()
            scaler.step(o)
            scaler.update()
    return str(path)


def test_float16_with_a_grad_scaler_vs_float32_is_the_same_training(tmp_path):
    """The AMP recipe: B's loss and output gradients are 2^16 x A's within float16 precision
    (not exactly: B also rounds in float16), everything else within it: loss_scaling, exit 0.
    The oracle: the recorded losses' ratio, read back here, is 2^16 to float16 precision."""
    a, b = _amp(tmp_path / "a.h5", fp16=False), _amp(tmp_path / "b.h5", fp16=True)
    r = graddiff.compare(a, b)
    assert r.verdict == "within_tolerance" and r.exit_code == 0, r.headline()
    assert r.loss_scale == {"run": "B", "log2": [16], "within": "float16"}
    assert "the loss within float16 precision" in r.headline()
    assert r.cause.cause == "loss_scaling", r.diagnosis[:1]
    with graddiff.open(a) as ra, graddiff.open(b) as rb:
        la, lb = float(ra.get("loss", "loss", 0)), float(rb.get("loss", "loss", 0))
    assert lb != la * 2.0**16 and lb == pytest.approx(la * 2.0**16, rel=2.0**-10)
    bug = _amp(tmp_path / "bug.h5", fp16=True, lr_factor=2.0)  # the same, twice the lr
    r = graddiff.compare(a, bug)
    assert r.verdict == "diverged" and r.exit_code == 1, r.headline()  # not the same training


@pytest.mark.parametrize("model, opt", [("mlp", "sgd"), ("cnn", "momentum"), ("mlp", "adam")])
def test_a_setting_changed_across_precisions_is_named_before_the_precision(runs, model, opt):
    """float32 vs bfloat16 autocast *and* twice the learning rate: the recorded rate is the
    cause of the divergence, the precision the other difference. The gradients before the
    update agree within the precision's bound (not within rtol), and that is what "the update
    differs after agreeing gradients" must mean in a reduced-precision pair."""
    r = graddiff.compare(runs(model, opt, "float32"), runs(model, opt, "autocast", lr_factor=2))
    assert r.diverged and (r.first.step, r.first.kind) == (1, "param"), r.headline()
    assert [c.cause for c in r.diagnosis][:2] == ["learning_rate", "precision"], r.diagnosis
    lr = LR[opt]
    assert f"learning rate differs: {lr:g} in A vs {2 * lr:g} in B at step 0" in r.cause.title
