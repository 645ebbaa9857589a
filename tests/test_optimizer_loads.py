"""Optimizer state loads and group membership in the recorded settings (``/optimizer``):
runs resumed from different checkpoints (the same parameters and step counts, other values),
a load mid-run in one run or both, a re-created optimizer that starts from a loaded state, a
load that restores the state as it was (not a difference), and a parameter replaced in a
single param group. Each test is its own oracle: it knows which states it loaded, where."""

from __future__ import annotations

import copy
from typing import Optional

import pytest
import torch
import torch.nn.functional as F
from click.testing import CliRunner
from torch import nn

import graddiff
from graddiff.cli import main as cli_main
from graddiff.optimizer_settings import OptimizerSettings, SettingsError

STEPS = 5


def _net() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 4))


def _batches(n: int = 12) -> list:
    g = torch.Generator().manual_seed(0)
    return [
        (torch.randn(16, 8, generator=g), torch.randint(0, 4, (16,), generator=g)) for _ in range(n)
    ]


def _make(kind: str):
    if kind == "adam":
        return lambda m: torch.optim.Adam(m.parameters(), lr=1e-2)
    return lambda m: torch.optim.SGD(m.parameters(), lr=0.1, momentum=0.9)


def _checkpoint(kind: str, order: list[int]) -> tuple[dict, dict]:
    """(model, optimizer) state dicts after training on the batches in ``order``."""
    m = _net()
    opt = _make(kind)(m)
    data = _batches()
    for i in order:
        opt.zero_grad()
        F.cross_entropy(m(data[i][0]), data[i][1]).backward()
        opt.step()
    return copy.deepcopy(m.state_dict()), copy.deepcopy(opt.state_dict())


def _resume(
    path,
    kind: str,
    model_state: dict,
    opt_state: Optional[dict],
    *,
    load_at: Optional[int] = None,
    load_state: Optional[dict] = None,
    recreate_at: Optional[int] = None,
) -> nn.Module:
    """A run resumed from ``model_state``, its optimizer loaded with ``opt_state`` before the
    trace (None: fresh); ``load_at``: ``load_state`` loaded there (mid-run); with
    ``recreate_at`` a new optimizer is built there and ``load_state`` loaded into it."""
    m = _net()
    m.load_state_dict(model_state)
    make = _make(kind)
    opt = make(m)
    if opt_state is not None:
        opt.load_state_dict(copy.deepcopy(opt_state))
    data = _batches()
    ctx = graddiff.trace(m, path) if path is not None else None
    with ctx if ctx is not None else torch.enable_grad():
        for step in range(STEPS):
            if step == recreate_at:
                opt = make(m)
                opt.load_state_dict(copy.deepcopy(load_state))
            elif step == load_at:
                opt.load_state_dict(copy.deepcopy(load_state))
            x, y = data[3 + step]
            opt.zero_grad()
            F.cross_entropy(m(x), y).backward()
            opt.step()
    return m


def _diag(r) -> list[tuple[str, str]]:
    return [(c.cause, c.title) for c in r.diagnosis]


@pytest.mark.parametrize("kind", ["adam", "sgd"])
def test_resumed_from_checkpoint_a_vs_checkpoint_b(tmp_path, kind):
    """Both runs resume the same model weights; the optimizer state comes from checkpoint A
    or B (three steps each, other batch orders): the same parameters, the same step counts,
    other values. Named at the first update, from the fingerprints of the states."""
    model, opt_a = _checkpoint(kind, [0, 1, 2])
    _, opt_b = _checkpoint(kind, [2, 1, 0])
    _resume(tmp_path / "a.h5", kind, model, opt_a)
    _resume(tmp_path / "b.h5", kind, model, opt_b)
    r = graddiff.compare(tmp_path / "a.h5", tmp_path / "b.h5")
    assert r.exit_code == 1 and (r.first.step, r.first.kind) == (1, "param"), r.headline()
    assert r.cause.cause == "optimizer_state", _diag(r)
    assert "state held at the optimizers' first update at step 0 is not the same" in (r.cause.title)
    # nothing else tells them apart: the same step counts, the same number of entries
    with graddiff.open(tmp_path / "a.h5") as a, graddiff.open(tmp_path / "b.h5") as b:
        (oa,), (ob,) = a.optimizer_settings.at(0), b.optimizer_settings.at(0)
        assert oa.state_entries == ob.state_entries == 4
        assert oa.groups[0].state_step == ob.groups[0].state_step
        assert oa.state_fp.fp != ob.state_fp.fp and oa.state_fp.how == "first"
    # the same checkpoint in both: identical, no claim
    _resume(tmp_path / "a2.h5", kind, model, opt_a)
    assert graddiff.compare(tmp_path / "a.h5", tmp_path / "a2.h5").verdict == "identical"


def test_loaded_mid_run_from_different_checkpoints(tmp_path):
    model, opt_a = _checkpoint("adam", [0, 1, 2])
    _, opt_b = _checkpoint("adam", [2, 1, 0])
    fresh = _net().state_dict()
    _resume(tmp_path / "a.h5", "adam", fresh, None, load_at=2, load_state=opt_a)
    _resume(tmp_path / "b.h5", "adam", fresh, None, load_at=2, load_state=opt_b)
    r = graddiff.compare(tmp_path / "a.h5", tmp_path / "b.h5")
    assert (r.first.step, r.first.kind) == (3, "param"), r.headline()
    assert r.cause.cause == "optimizer_state", _diag(r)
    assert "the state loaded at step 2 is not the same in A and B" in r.cause.title
    assert any("load_state_dict() ran before the update of step 2" in e for e in r.cause.evidence)
    shown = CliRunner().invoke(cli_main, ["show", str(tmp_path / "b.h5"), "--optimizer"])
    assert "optimizer 0 (Adam): state loaded (load_state_dict x1: changed the state;" in (
        " ".join(shown.output.split())
    ), shown.output


def test_loaded_in_one_run_only(tmp_path):
    """B reloads an older optimizer state at step 2 (a stale checkpoint); A goes on."""
    _, old = _checkpoint("adam", [0])
    fresh = _net().state_dict()
    _resume(tmp_path / "a.h5", "adam", fresh, None)
    _resume(tmp_path / "b.h5", "adam", fresh, None, load_at=2, load_state=old)
    r = graddiff.compare(tmp_path / "a.h5", tmp_path / "b.h5")
    assert (r.first.step, r.first.kind) == (3, "param"), r.headline()
    assert r.cause.cause == "optimizer_state", _diag(r)
    assert "optimizer state loaded in B at step 2, not in A" in r.cause.title


def test_recreated_optimizer_starting_from_a_loaded_state(tmp_path):
    _, old = _checkpoint("sgd", [0, 1])
    fresh = _net().state_dict()
    _resume(tmp_path / "a.h5", "sgd", fresh, None)
    _resume(tmp_path / "b.h5", "sgd", fresh, None, recreate_at=2, load_state=old)
    r = graddiff.compare(tmp_path / "a.h5", tmp_path / "b.h5")
    assert (r.first.step, r.first.kind) == (3, "param"), r.headline()
    assert r.cause.cause == "optimizer_state", _diag(r)
    assert "optimizer re-created in B at step 2 with a loaded state, not in A" in r.cause.title


def test_a_load_that_restores_the_state_is_no_difference(tmp_path):
    """B saves and reloads its own optimizer state at step 2 (a checkpoint round trip): the
    load is recorded as restoring the same state, and the runs are identical."""
    fresh = _net().state_dict()
    _resume(tmp_path / "a.h5", "adam", fresh, None)
    m = _net()
    m.load_state_dict(fresh)
    opt = _make("adam")(m)
    data = _batches()
    with graddiff.trace(m, tmp_path / "b.h5"):
        for step in range(STEPS):
            if step == 2:
                opt.load_state_dict(copy.deepcopy(opt.state_dict()))
            x, y = data[3 + step]
            opt.zero_grad()
            F.cross_entropy(m(x), y).backward()
            opt.step()
    assert graddiff.compare(tmp_path / "a.h5", tmp_path / "b.h5").verdict == "identical"
    with graddiff.open(tmp_path / "b.h5") as run:
        f = run.optimizer_settings.at(2)[0].state_fp
        assert (f.step, f.how, f.changed, f.count) == (2, "load", False, 1)


def test_load_hooks_leave_nothing_behind_and_training_is_unchanged(tmp_path):
    model, opt_a = _checkpoint("adam", [0, 1, 2])
    m = _net()
    m.load_state_dict(model)
    opt = _make("adam")(m)
    before = (
        len(opt._optimizer_load_state_dict_pre_hooks),
        len(opt._optimizer_load_state_dict_post_hooks),
    )
    data = _batches()
    with graddiff.trace(m, tmp_path / "t.h5"):
        for step in range(STEPS):
            if step == 2:
                opt.load_state_dict(copy.deepcopy(opt_a))
                copy.deepcopy(opt)  # an optimizer copied while traced still copies
            opt.zero_grad()
            F.cross_entropy(m(data[3 + step][0]), data[3 + step][1]).backward()
            opt.step()
    after = (
        len(opt._optimizer_load_state_dict_pre_hooks),
        len(opt._optimizer_load_state_dict_post_hooks),
    )
    assert after == before
    plain = _resume(None, "adam", model, None, load_at=2, load_state=opt_a)
    assert all(torch.equal(p, q) for p, q in zip(m.parameters(), plain.parameters()))


def test_bad_load_rows_are_refused():
    ok = '[{"optimizer": 0, "class": "torch.optim.sgd.SGD", "groups": 0, "state_entries": 0}]'
    for bad in (
        '[{"optimizer": 0, "loaded": 3}]',
        '[{"optimizer": 0, "loaded": {"fp": 5}}]',
        '[{"optimizer": 0, "loaded": {"fp": "ab", "changed": "yes"}}]',
        '[{"optimizer": 0, "state_fp": ""}]',
    ):
        with pytest.raises(SettingsError):
            OptimizerSettings([(0, ok), (1, bad)])
    s = OptimizerSettings([(0, ok)])  # a trace without fingerprints: starts empty, known
    assert s.at(0)[0].state_fp.fp is None and s.at(0)[0].born == 0


def _single_group_run(path, replace_at: Optional[int]):
    """One param group; at ``replace_at`` its last parameter is replaced in place by the
    spare layer's bias (the same count of parameters, another one among them)."""
    torch.manual_seed(0)
    m = nn.ModuleDict({"body": nn.Linear(8, 4), "spare": nn.Linear(8, 4)})
    opt = torch.optim.SGD(list(m["body"].parameters()), lr=0.1)
    data = _batches()
    with graddiff.trace(m, path):
        for step in range(STEPS):
            if step == replace_at:
                opt.param_groups[0]["params"][-1] = m["spare"].bias
            x, _ = data[step]
            opt.zero_grad()
            (m["body"](x).square().mean() + m["spare"](x).square().mean()).backward()
            opt.step()
    return m


def test_a_parameter_replaced_in_a_single_group(tmp_path):
    _single_group_run(tmp_path / "a.h5", None)
    _single_group_run(tmp_path / "b.h5", 2)
    with graddiff.open(tmp_path / "b.h5") as run:
        st = run.optimizer_settings
        assert st.at(1)[0].groups[0].params == ("body.weight", "body.bias")
        assert st.at(2)[0].groups[0].params == ("body.weight", "spare.bias")
        assert 2 in st.change_steps
        # the gradients recorded follow the group: spare.bias's from step 2 on
        assert "spare.bias" in run.names("grad")
        run.stats("grad", "spare.bias", 2)
    r = graddiff.compare(tmp_path / "a.h5", tmp_path / "b.h5")
    # body.bias left B's optimizer: B's zero_grad() no longer clears its gradient
    assert (r.first.step, r.first.kind, r.first.name) == (2, "grad", "body.bias"), r.headline()
    assert r.cause.cause == "optimizer_settings", _diag(r)
    assert "parameters updated by the optimizer in A only" in r.cause.title
    assert any("spare.bias" in e and "B's optimizer only" in e for e in r.cause.evidence)


class _Lagging(torch.optim.Optimizer):
    """A custom SGD keeping a per-parameter step count (a plain int); from update ``start`` on,
    the parameters in ``double`` count two steps per update (a schedule of their own)."""

    def __init__(self, params, lr: float, double=(), start: int = 0):
        super().__init__(params, {"lr": lr})
        self.double, self.start, self.updates = {id(p) for p in double}, start, 0

    @torch.no_grad()
    def step(self, closure=None):
        for g in self.param_groups:
            for p in g["params"]:
                if p.grad is None:
                    continue
                st = self.state[p]
                k = 2 if id(p) in self.double and self.updates >= self.start else 1
                st["step"] = st.get("step", 0) + k
                p.add_(p.grad, alpha=-g["lr"])
        self.updates += 1


def test_custom_counts_that_part_another_way_are_read_per_parameter(tmp_path):
    """Counts that advance by two for one parameter from update 3 on (the first parameter's
    own count stays regular): found within len(params) updates of the parting by reading one
    other parameter in turn, and exact at every update after."""
    torch.manual_seed(0)
    m = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 2))
    names = dict(m.named_parameters())
    opt = _Lagging(m.parameters(), lr=0.05, double=[names["2.weight"]], start=3)
    x = torch.randn(16, 4)
    oracle = []
    with graddiff.trace(m, tmp_path / "c.h5"):
        for _ in range(12):
            opt.zero_grad()
            m(x).square().mean().backward()
            oracle.append(
                {n: opt.state[p]["step"] if opt.state.get(p) else 0 for n, p in names.items()}
            )
            opt.step()
    with graddiff.open(tmp_path / "c.h5") as run:
        st = run.optimizer_settings
        got = []
        for s in range(12):
            (g,) = st.at(s)[0].groups
            got.append({n: g.state_steps.get(n, g.state_step) for n in names})
    parted = next(s for s, o in enumerate(oracle) if len(set(o.values())) > 1)  # 4
    exact_from = next(s for s in range(12) if got[s:] == oracle[s:])
    assert parted == 4 and exact_from <= parted + len(names) - 1, (got, oracle)
    assert oracle[11]["2.weight"] == 19 and oracle[11]["0.weight"] == 11


@pytest.mark.parametrize("how", ["recreate", "clear"])
def test_a_recreated_optimizer_is_told_from_a_cleared_state(tmp_path, how):
    """B's momentum is lost at step 2: a new SGD there, or the same one's state cleared."""
    fresh = _net().state_dict()
    _resume(tmp_path / "a.h5", "sgd", fresh, None)
    m = _net()
    m.load_state_dict(fresh)
    opt = _make("sgd")(m)
    data = _batches()
    with graddiff.trace(m, tmp_path / "b.h5"):
        for step in range(STEPS):
            if step == 2:
                if how == "recreate":
                    opt = _make("sgd")(m)
                else:
                    opt.state.clear()
            x, y = data[3 + step]
            opt.zero_grad()
            F.cross_entropy(m(x), y).backward()
            opt.step()
    r = graddiff.compare(tmp_path / "a.h5", tmp_path / "b.h5")
    assert (r.first.step, r.first.kind) == (3, "param"), r.headline()
    assert r.cause.title.startswith("optimizer state reset in B at step 2"), _diag(r)
    assert ("B's optimizer is re-created there" in r.cause.title) == (how == "recreate")
