"""``graddiff check`` on healthy runs of common architectures: no finding (exit 0); and one
consistent NaN/Inf story on a run that blows up."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from click.testing import CliRunner
from torch import nn

import graddiff
import graddiff.cli
from graddiff.diff.precision import computing_dtype


class _Tfm(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.emb = nn.Embedding(16, 16)
        self.enc = nn.TransformerEncoderLayer(16, 2, 32, dropout=0.1, batch_first=True)
        self.head = nn.Linear(16, 4)

    def forward(self, x):
        return self.head(self.enc(self.emb(x)).mean(1))


class _Lstm(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.lstm = nn.LSTM(8, 16, batch_first=True)
        self.head = nn.Linear(16, 4)

    def forward(self, x):
        return self.head(self.lstm(x)[0][:, -1])


def _bn_mlp():
    return nn.Sequential(
        nn.Linear(8, 32), nn.BatchNorm1d(32), nn.ReLU(), nn.Linear(32, 32), nn.BatchNorm1d(32),
        nn.ReLU(), nn.Linear(32, 4),
    )  # fmt: skip


def _cnn():
    return nn.Sequential(
        nn.Conv2d(1, 4, 3, padding=1), nn.BatchNorm2d(4), nn.ReLU(), nn.MaxPool2d(2),
        nn.Flatten(), nn.Linear(4 * 4 * 4, 4),
    )  # fmt: skip


MODELS = {
    "bn_mlp": (_bn_mlp, lambda g: torch.randn(16, 8, generator=g)),
    "cnn": (_cnn, lambda g: torch.randn(16, 1, 8, 8, generator=g)),
    "transformer": (_Tfm, lambda g: torch.randint(0, 16, (16, 6), generator=g)),
    "lstm": (_Lstm, lambda g: torch.randn(16, 5, 8, generator=g)),
}


def _train(
    path, name: str, steps: int = 6, lr: float = 0.05, opt: str = "sgd", amp: str = ""
) -> str:
    """amp: "" (float32), "bf16" (bfloat16 autocast) or "fp16" (float16 autocast with a
    GradScaler, the AMP recipe)."""
    build, batch = MODELS[name]
    torch.manual_seed(0)
    net = build()
    o = (
        torch.optim.SGD(net.parameters(), lr=lr, momentum=0.9)
        if opt == "sgd"
        else torch.optim.AdamW(net.parameters(), lr=lr)
    )
    scaler = torch.amp.GradScaler("cpu") if amp == "fp16" else None
    dtype = torch.float16 if amp == "fp16" else torch.bfloat16
    g = torch.Generator().manual_seed(0)
    with graddiff.trace(net, path):
        for _ in range(steps):
            x, y = batch(g), torch.randint(0, 4, (16,), generator=g)
            o.zero_grad()
            with torch.autocast("cpu", dtype=dtype, enabled=bool(amp)):
                loss = F.cross_entropy(net(x), y)
            if scaler is None:
                loss.backward()
                o.step()
            else:
                scaler.scale(loss).backward()
                scaler.step(o)
                scaler.update()
    return str(path)


@pytest.mark.parametrize("opt", ["sgd", "adamw"])
@pytest.mark.parametrize("name", list(MODELS))
def test_healthy_run_is_clean(tmp_path, name, opt):
    path = _train(tmp_path / f"{name}.h5", name, opt=opt, lr=0.05 if opt == "sgd" else 1e-3)
    with graddiff.open(path) as run:
        report = run.check()
    assert report.exit_code == 0, [str(f) for f in report]
    out = CliRunner().invoke(graddiff.cli.main, ["check", path])
    assert out.exit_code == 0, out.output


AMP_CASES = [(amp, name) for amp in ("bf16", "fp16") for name in MODELS]


@pytest.mark.parametrize("opt", ["sgd", "adamw"])
@pytest.mark.parametrize(("amp", "name"), AMP_CASES)
def test_healthy_mixed_precision_run_is_clean(tmp_path, amp, name, opt):
    """bfloat16 autocast, and float16 autocast with a GradScaler (scaled gradients, the scale
    changing over steps): the same healthy training, no finding."""
    try:
        path = _train(
            tmp_path / f"{name}.h5", name, 4, 0.05 if opt == "sgd" else 1e-3, opt=opt, amp=amp
        )
    except RuntimeError as exc:  # torch's own: oneDNN has no float16 LSTM on some CPUs
        if (amp, name) == ("fp16", "lstm") and "primitive" in str(exc):
            pytest.skip(f"torch cannot run a float16 LSTM on this CPU: {exc}")
        raise
    with graddiff.open(path) as run:
        assert computing_dtype(run) == {"bf16": "bfloat16", "fp16": "float16"}[amp]
        report = run.check()
    assert report.exit_code == 0, [str(f) for f in report]


def test_bias_before_batchnorm_is_not_frozen(tmp_path):
    """Its gradient is rounding residue (zero in exact arithmetic): not a frozen parameter."""
    path = _train(tmp_path / "bn.h5", "bn_mlp")
    with graddiff.open(path) as run:
        g = run.get("grad", "0.bias", 1)
        w = run.get("grad", "0.weight", 1)
        assert 0 < float((g**2).sum()) ** 0.5 < 1e-4 * float((w**2).sum()) ** 0.5
        assert not run.check().of_kind("frozen_param")


def test_a_really_frozen_parameter_is_still_found(tmp_path):
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 4))
    o = torch.optim.SGD(list(net[2].parameters()), lr=0.1)  # net[0] left out of the optimizer
    g = torch.Generator().manual_seed(0)
    path = str(tmp_path / "f.h5")
    with graddiff.trace(net, path):
        for _ in range(4):
            o.zero_grad()
            F.cross_entropy(net(torch.randn(16, 8, generator=g)), torch.zeros(16).long()).backward()
            o.step()
    with graddiff.open(path) as run:
        frozen = run.check().of_kind("frozen_param")
    assert frozen and set(frozen[0].evidence["names"]) == {"0.weight", "0.bias"}


def test_nan_run_tells_one_story(tmp_path):
    """An overflow to Inf in an activation, NaN after it: the NaN follows the Inf; no
    'exploded' for the non-finite gradients; show names the trailing non-finite losses."""
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 4))
    o = torch.optim.SGD(net.parameters(), lr=0.1)
    g = torch.Generator().manual_seed(0)
    path = str(tmp_path / "nan.h5")
    with graddiff.trace(net, path, values="full"):
        for step in range(6):
            x = torch.randn(16, 8, generator=g)
            if step == 3:
                with torch.no_grad():
                    net[0].weight.mul_(1e38)  # the next forward overflows to Inf
            o.zero_grad()
            F.cross_entropy(net(x), torch.zeros(16).long()).backward()
            o.step()
    with graddiff.open(path) as run:
        report = run.check()
    first = report.findings[0]
    assert first.kind == "inf" and first.step >= 3, [str(f) for f in report]
    nan = report.of_kind("nan")
    assert nan and "finite" not in nan[0].message and "follows the first Inf" in nan[0].message
    assert not report.of_kind("exploding_grad")
    show = CliRunner().invoke(graddiff.cli.main, ["show", path])
    assert f"non-finite since step {nan[0].step}" in " ".join(show.output.split()), show.output
