"""A module of the same class built with other settings (``module_config``), from the
settings every trace records (torch's ``extra_repr``).

The oracle is the test: it knows which module it built differently, with which argument, and
so which record differs first and what the diagnosis must say.
"""

from __future__ import annotations

import h5py
import pytest
import torch
import torch.nn.functional as F
from torch import nn

import graddiff
from graddiff.diff.rules_config import settings_diff, split_settings


def _run(path, *, approximate="none", eps=1e-5, bias=True, p=0.1, momentum=0.1, lr=0.1):
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Linear(12, 16, bias=bias),
        nn.BatchNorm1d(16, momentum=momentum),
        nn.GELU(approximate=approximate),
        nn.Dropout(p),
        nn.Linear(16, 8),
        nn.LayerNorm(8, eps=eps),
        nn.Linear(8, 3),
    )
    opt = torch.optim.SGD(model.parameters(), lr=lr)
    gen = torch.Generator().manual_seed(1)
    with graddiff.trace(model, path, values="full"):
        for _ in range(2):
            x, y = torch.randn(10, 12, generator=gen), torch.randint(0, 3, (10,), generator=gen)
            loss = F.cross_entropy(model(x), y)
            opt.zero_grad()
            loss.backward()
            opt.step()
    return path


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    return _run(tmp_path_factory.mktemp("cfg") / "a.h5")


@pytest.mark.parametrize(
    "change, module, cls, setting",
    [
        ({"approximate": "tanh"}, "2", "GELU", "approximate='none' in A, 'tanh' in B"),
        ({"eps": 1e-12}, "5", "LayerNorm", "eps=1e-05 in A, 1e-12 in B"),
        ({"bias": False}, "0", "Linear", "bias=True in A, False in B"),
    ],
)
def test_module_built_with_other_settings(tmp_path, base, change, module, cls, setting):
    r = graddiff.compare(base, _run(tmp_path / "b.h5", **change))
    first = r.first or r.first_bitwise
    assert first.name.split(".")[0].split(":")[0] == module, r.headline()
    assert r.cause.cause == "module_config", [(c.cause, c.title) for c in r.diagnosis]
    assert r.cause.title == f"module {module} ({cls}) is built with other settings: {setting}"
    assert "the module class is the same in both runs" in r.cause.evidence


def test_dropout_p_and_bn_momentum_keep_their_specific_causes(tmp_path, base):
    r = graddiff.compare(base, _run(tmp_path / "p.h5", p=0.3))
    assert [c.cause for c in r.diagnosis][0] == "dropout_rate", r.diagnosis
    assert "module_config" not in [c.cause for c in r.diagnosis]
    assert "recorded settings of 3 (Dropout) differ: p=0.1 in A, 0.3 in B" in r.cause.evidence
    r = graddiff.compare(base, _run(tmp_path / "m.h5", momentum=0.01))
    assert r.cause.cause == "batchnorm_stats", r.diagnosis
    assert any("momentum=0.1 in A, 0.01 in B" in e for e in r.cause.evidence), r.cause.evidence


def test_same_settings_and_other_causes_do_not_name_it(tmp_path, base):
    assert not graddiff.compare(base, _run(tmp_path / "same.h5")).diverged
    r = graddiff.compare(base, _run(tmp_path / "lr.h5", lr=0.2))
    assert r.diverged and r.cause.cause == "learning_rate", r.diagnosis
    assert "module_config" not in [c.cause for c in r.diagnosis]


def test_settings_are_recorded_and_old_files_read_as_empty(tmp_path, base):
    with h5py.File(base, "r") as f:
        assert "eps=1e-05" in f.attrs["module_settings"]
    run = graddiff.open(base)
    assert run.module_settings["2"] == "approximate='none'"
    assert "(root)" not in run.module_settings  # a Sequential prints no settings of its own
    old = tmp_path / "old.h5"
    old.write_bytes(base.read_bytes())
    with h5py.File(old, "r+") as f:
        del f.attrs["module_settings"]
    assert graddiff.open(old).module_settings == {}
    assert not graddiff.compare(base, old).diverged


class _BrokenRepr(nn.Linear):
    def extra_repr(self):
        raise RuntimeError("user bug")


def test_a_failing_extra_repr_does_not_stop_the_trace(tmp_path):
    model = nn.Sequential(_BrokenRepr(4, 4), nn.Linear(4, 2))
    with graddiff.trace(model, tmp_path / "t.h5"):
        model(torch.randn(3, 4)).sum().backward()
    settings = graddiff.open(tmp_path / "t.h5").module_settings
    assert "0" not in settings and settings["1"].startswith("in_features=4")


def test_settings_split_and_diff():
    assert split_settings("(4,), eps=1e-05, elementwise_affine=True") == [
        "(4,)",
        "eps=1e-05",
        "elementwise_affine=True",
    ]
    assert split_settings("p='a,b', d={1: 2, 3: 4}") == ["p='a,b'", "d={1: 2, 3: 4}"]
    assert settings_diff("(4,), eps=1e-05", "(8,), eps=1e-05") == [("#0", "(4,)", "(8,)")]
    assert settings_diff("p=0.1", "p=0.1, inplace=True") == [("inplace", "(absent)", "True")]
    assert settings_diff("a=1", "a=1") == []


def test_a_corrupt_settings_attribute_is_one_error_line_and_exit_2(tmp_path, base):
    from click.testing import CliRunner

    from graddiff.cli import main as cli_main

    bad = tmp_path / "bad.h5"
    bad.write_bytes(base.read_bytes())
    with h5py.File(bad, "r+") as f:
        f.attrs["module_settings"] = "{not json"
    res = CliRunner().invoke(cli_main, ["compare", str(base), str(bad)])
    assert res.exit_code == 2, res.output
    lines = [ln for ln in res.output.splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[0].startswith("Error:") and "module_settings" in lines[0]
