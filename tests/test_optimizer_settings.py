"""The optimizer settings recorded per step (``/optimizer``): what is stored, when, and how it
reads back. Each test keeps its own oracle: the settings the loop itself saw at each step."""

from __future__ import annotations

import collections
import json

import h5py
import numpy as np
import pytest
import torch
from click.testing import CliRunner

import graddiff
from graddiff.cli import main as cli_main
from graddiff.writer import TraceWriter


def _mlp(seed: int = 0) -> torch.nn.Module:
    torch.manual_seed(seed)
    return torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.ReLU(), torch.nn.Linear(8, 2))


def _data():
    g = torch.Generator().manual_seed(1)
    return torch.randn(16, 4, generator=g), torch.randn(16, 2, generator=g)


def _groups(m):
    decay = [p for n, p in m.named_parameters() if n.endswith("weight")]
    rest = [p for n, p in m.named_parameters() if not n.endswith("weight")]
    return [{"params": decay, "weight_decay": 0.1}, {"params": rest, "weight_decay": 0.0}]


def _train(m, opt, sched, steps, x, y, seen=None):
    for _ in range(steps):
        opt.zero_grad()
        loss = ((m(x) - y) ** 2).mean()
        loss.backward()
        if seen is not None:
            seen.append(
                [dict((k, v) for k, v in g.items() if k != "params") for g in opt.param_groups]
            )
        opt.step()
        if sched is not None:
            sched.step()


def test_adamw_groups_and_warmup_schedule(tmp_path):
    m = _mlp()
    opt = torch.optim.AdamW(_groups(m), lr=1e-3, betas=(0.8, 0.99))
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min(1.0, (s + 1) / 3))
    x, y = _data()
    seen: list = []
    with graddiff.trace(m, tmp_path / "a.h5"):
        _train(m, opt, sched, 6, x, y, seen)
    with graddiff.open(tmp_path / "a.h5") as run:
        st = run.optimizer_settings
        steps = [int(s) for s in run.steps]
        assert steps == list(range(6))
        # one row at the start, then one per step where the warmup changed lr (steps 1, 2)
        assert st.change_steps == [0, 1, 2]
        assert st.series("lr", steps) == [g[0]["lr"] for g in seen]
        assert st.series("lr", steps, group=1) == [g[1]["lr"] for g in seen]
        for s in steps:
            (o,) = st.at(s)
            assert o.class_name == "torch.optim.adamw.AdamW" and o.short_class == "AdamW"
            g0, g1 = o.groups
            assert g0.params == ("0.weight", "2.weight") and g1.params == ("0.bias", "2.bias")
            assert g0.get("weight_decay") == 0.1 and g1.get("weight_decay") == 0.0
            assert g0.get("betas") == [0.8, 0.99] and g0.get("eps") == 1e-8
            assert g0.state_step == s and g1.state_step == s  # Adam's count before the update
            assert st.for_param(s, "2.bias")[1].index == 1
        # stored compactly: later rows hold only what changed
        with h5py.File(tmp_path / "a.h5", "r") as f:
            rows = f["optimizer"][:]
        later = json.loads(rows[1]["changes"])
        assert later == [
            {
                "optimizer": 0,
                "state_entries": 4,  # the state now holds the 4 parameters (empty at step 0)
                "hyper": {"0": {"lr": seen[1][0]["lr"]}, "1": {"lr": seen[1][1]["lr"]}},
            }
        ]
        assert json.loads(rows[2]["changes"]) == [
            {
                "optimizer": 0,
                "hyper": {"0": {"lr": seen[2][0]["lr"]}, "1": {"lr": seen[2][1]["lr"]}},
            }
        ]


def test_traced_is_bitwise_identical_to_untraced(tmp_path):
    x, y = _data()
    out = []
    for traced in (False, True):
        m = _mlp()
        opt = torch.optim.AdamW(_groups(m), lr=1e-2)
        sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=0.05, total_steps=10)
        if traced:
            with graddiff.trace(m, tmp_path / "t.h5"):
                _train(m, opt, sched, 5, x, y)
        else:
            _train(m, opt, sched, 5, x, y)
        out.append([p.detach().clone() for p in m.parameters()])
    assert all(torch.equal(a, b) for a, b in zip(*out))
    import torch.optim.optimizer as optimizer_module

    assert not optimizer_module._global_optimizer_pre_hooks  # every hook removed on exit
    assert not optimizer_module._global_optimizer_post_hooks


def test_fresh_optimizer_and_cleared_state(tmp_path):
    """A rebuilt optimizer is a new one (index 1) whose count starts at 0; a cleared state
    shows as a count that is not the last one plus the steps since."""
    m = _mlp()
    x, y = _data()
    with graddiff.trace(m, tmp_path / "r.h5"):
        opt = torch.optim.Adam(m.parameters(), lr=1e-3)
        _train(m, opt, None, 3, x, y)
        opt = torch.optim.Adam(m.parameters(), lr=1e-3)  # resumed without the optimizer state
        _train(m, opt, None, 2, x, y)
        opt.state = collections.defaultdict(dict)  # moments reset in place
        _train(m, opt, None, 2, x, y)
    with graddiff.open(tmp_path / "r.h5") as run:
        st = run.optimizer_settings
        counts = [st.for_param(s, "0.weight")[1].state_step for s in range(7)]
        assert counts == [0, 1, 2, 0, 1, 0, 1]
        assert [st.for_param(s, "0.weight")[0].index for s in range(7)] == [0, 0, 0, 1, 1, 1, 1]
        # the number of parameters with state: emptied by the new optimizer and by the clear
        assert [st.for_param(s, "0.weight")[0].state_entries for s in range(7)] == [
            0,
            4,
            4,
            0,
            4,
            0,
            4,
        ]
        assert st.change_steps == [0, 1, 3, 4, 5, 6]  # the counts alone change at 0, 3, 5


def test_sgd_momentum_tensor_lr_and_lbfgs(tmp_path):
    m = _mlp()
    x, y = _data()
    opt = torch.optim.SGD(m.parameters(), lr=torch.tensor(0.05), momentum=0.9, nesterov=True)
    with graddiff.trace(m, tmp_path / "s.h5"):
        _train(m, opt, None, 2, x, y)
    with graddiff.open(tmp_path / "s.h5") as run:
        (o,) = run.optimizer_settings.at(1)
        g = o.groups[0]
        assert o.short_class == "SGD"
        assert g.get("lr") == pytest.approx(0.05) and isinstance(g.get("lr"), float)
        assert g.get("momentum") == 0.9 and g.get("nesterov") is True
        assert g.state_step is None  # SGD keeps no step count (its state: a momentum buffer)
    m = _mlp()
    opt = torch.optim.LBFGS(m.parameters(), lr=0.5, max_iter=3)

    def closure():
        opt.zero_grad()
        loss = ((m(x) - y) ** 2).mean()
        loss.backward()
        return loss

    with graddiff.trace(m, tmp_path / "l.h5"):
        for _ in range(2):
            opt.step(closure)
    with graddiff.open(tmp_path / "l.h5") as run:
        (o,) = run.optimizer_settings.at(1)
        assert o.short_class == "LBFGS" and o.groups[0].get("max_iter") == 3


def test_stateless_sgd_and_a_gan_like_alternation_store_little(tmp_path):
    """SGD without momentum keeps no state: its count is null after the first step, not a row
    per step; an optimizer that steps every other step gets its count stored where it steps."""
    m = _mlp()
    x, y = _data()
    opt = torch.optim.SGD(m.parameters(), lr=0.1)
    with graddiff.trace(m, tmp_path / "s.h5"):
        _train(m, opt, None, 5, x, y)
    with graddiff.open(tmp_path / "s.h5") as run:
        st = run.optimizer_settings
        assert st.change_steps == [0, 1]
        assert [st.at(s)[0].groups[0].state_step for s in range(5)] == [0, None, None, None, None]
    # two optimizers over one model, alternating: each steps every other trace step
    m = _mlp()
    first = torch.optim.Adam(m[0].parameters(), lr=1e-3)
    second = torch.optim.Adam(m[2].parameters(), lr=1e-3)
    with graddiff.trace(m, tmp_path / "g.h5"):
        for _ in range(6):
            for o in (first, second):
                o.zero_grad()
                ((m(x) - y) ** 2).mean().backward()
                o.step()
    with graddiff.open(tmp_path / "g.h5") as run:
        st = run.optimizer_settings
        assert [int(s) for s in run.steps] == list(range(12))
        # optimizer 1 steps at odd trace steps: its count there is the number of its updates
        assert [st.for_param(s, "2.weight")[1].state_step for s in range(1, 12, 2)] == list(
            range(6)
        )
        assert [st.for_param(s, "0.weight")[1].state_step for s in range(0, 12, 2)] == list(
            range(6)
        )


def test_manual_loop_and_old_files_have_none(tmp_path):
    m = _mlp()
    x, y = _data()
    with graddiff.trace(m, tmp_path / "m.h5"):
        for _ in range(2):
            m.zero_grad()
            ((m(x) - y) ** 2).mean().backward()
            with torch.no_grad():
                for p in m.parameters():
                    p -= 0.1 * p.grad
    with graddiff.open(tmp_path / "m.h5") as run:
        assert not run.optimizer_settings and run.optimizer_settings.at(1) == []
        assert run.summary()["optimizer"]["changes"] == []
    with h5py.File(tmp_path / "m.h5", "r") as f:
        assert "optimizer" not in f
    res = CliRunner().invoke(cli_main, ["show", str(tmp_path / "m.h5"), "--no-check"])
    assert res.exit_code == 0 and "optimizer settings not recorded" in res.output


def _synthetic(path, rows, steps=(0, 1)):
    from graddiff.entries import entry_from_array

    w = TraceWriter(str(path), {}, {}, ballast=False)
    for s in steps:
        w.write_step(
            s, [entry_from_array("param", "w", np.zeros(2, np.float32), seq=0)], rows.get(s)
        )
    w.close()


def test_rows_of_uncommitted_steps_are_ignored_and_bad_rows_refused(tmp_path):
    good = [{"optimizer": 0, "class": "x.SGD", "groups": 1, "hyper": {"0": {"lr": 0.1}}}]
    _synthetic(tmp_path / "g.h5", {0: good, 1: [{"optimizer": 0, "hyper": {"0": {"lr": 0.2}}}]})
    with h5py.File(tmp_path / "g.h5", "a") as f:  # a row written for a step never committed
        ds = f["optimizer"]
        ds.resize((3,))
        ds[2] = (2, json.dumps([{"optimizer": 0, "hyper": {"0": {"lr": 9.0}}}]))
    with graddiff.open(tmp_path / "g.h5") as run:
        assert run.optimizer_settings.series("lr", [0, 1, 2]) == [0.1, 0.2, 0.2]
    _synthetic(tmp_path / "b.h5", {0: good})
    with h5py.File(tmp_path / "b.h5", "a") as f:
        f["optimizer"][0] = (0, "{not json")
    with graddiff.open(tmp_path / "b.h5") as run:
        with pytest.raises(graddiff.TraceFileError, match="optimizer settings"):
            _ = run.optimizer_settings
    res = CliRunner().invoke(cli_main, ["show", str(tmp_path / "b.h5")])
    assert res.exit_code == 2 and res.output.startswith("Error:")
    assert "Traceback" not in res.output


def test_offset_copy_shifts_the_settings(tmp_path):
    """compare --offset writes B shifted: its settings rows move with its steps."""
    from graddiff.diff.mapped import write_mapped

    m = _mlp()
    opt = torch.optim.SGD(m.parameters(), lr=0.1)
    sched = torch.optim.lr_scheduler.StepLR(opt, step_size=2, gamma=0.5)
    x, y = _data()
    with graddiff.trace(m, tmp_path / "b.h5"):
        _train(m, opt, sched, 5, x, y)
    with graddiff.open(tmp_path / "b.h5") as b:
        write_mapped(b, b, None, str(tmp_path / "o.h5"), offset=3, window_b=(1, None))
    with graddiff.open(tmp_path / "o.h5") as o:
        assert [int(s) for s in o.steps] == [4, 5, 6, 7]
        assert o.optimizer_settings.series("lr", [4, 5, 6, 7]) == [0.1, 0.05, 0.05, 0.025]


def test_show_lists_the_changes(tmp_path):
    m = _mlp()
    opt = torch.optim.SGD(m.parameters(), lr=0.1)
    sched = torch.optim.lr_scheduler.StepLR(opt, step_size=1, gamma=0.5)
    x, y = _data()
    with graddiff.trace(m, tmp_path / "c.h5"):
        _train(m, opt, sched, 9, x, y)
    res = CliRunner().invoke(cli_main, ["show", str(tmp_path / "c.h5"), "--no-check"])
    assert res.exit_code == 0
    assert "optimizer 0 (SGD): 1 param group(s)" in res.output
    assert "lr 0.1 -> 0.05" in res.output and "more change step(s)" in res.output
    res = CliRunner().invoke(
        cli_main, ["show", str(tmp_path / "c.h5"), "--no-check", "--optimizer"]
    )
    assert "lr 0.00078125 -> 0.000390625" in res.output and "more change" not in res.output
    res = CliRunner().invoke(cli_main, ["show", str(tmp_path / "c.h5"), "--no-check", "--json"])
    doc = json.loads(res.output)
    assert [c["step"] for c in doc["optimizer"]["changes"]] == list(range(9))


def test_merged_ranks_keep_rank_0s_optimizer_settings(tmp_path):
    """compare on rank files merges them: the merged trace carries rank 0's settings, so the
    settings causes work on distributed runs too."""
    import json

    import h5py
    from test_ranks_parallel import _write

    from graddiff.format import OPTIMIZER_DTYPE
    from graddiff.ranks import open_ranks
    from graddiff.ranks.merge import merge_ranks

    (pattern,) = _write(str(tmp_path / "r"), n_ranks=2, n_steps=3)
    rows = np.zeros(2, dtype=OPTIMIZER_DTYPE)
    rows[0] = (
        0,
        json.dumps(
            [
                {
                    "optimizer": 0,
                    "class": "x.SGD",
                    "groups": 1,
                    "hyper": {"0": {"lr": 0.1}},
                    "params": {"0": ["layer0.weight"]},
                }
            ]
        ),
    )
    rows[1] = (2, json.dumps([{"optimizer": 0, "hyper": {"0": {"lr": 0.05}}}]))
    with h5py.File(tmp_path / "r" / "run_0.h5", "a") as f:
        f.create_dataset("optimizer", data=rows, maxshape=(None,), chunks=(64,))
    rs = open_ranks([pattern])
    merged = merge_ranks(rs, "mean", "A")
    st = merged.run.optimizer_settings
    assert st.series("lr", [0, 1, 2]) == [0.1, 0.1, 0.05]
    assert st.for_param(1, "layer0.weight")[0].class_name == "x.SGD"


@pytest.mark.parametrize("transform", [False, True])
def test_mapped_copy_renames_the_settings(tmp_path, transform):
    """compare --map writes B under A's names: its settings' parameter names follow, on the
    byte-copy path (renames only) and on the rewrite path (a rule that transforms values)."""
    from graddiff.diff.mapped import write_mapped
    from graddiff.diff.namemap import parse_map

    x, y = _data()
    torch.manual_seed(0)
    layers = [("enc", torch.nn.Linear(4, 8)), ("1", torch.nn.ReLU()), ("2", torch.nn.Linear(8, 2))]
    a = torch.nn.Sequential(collections.OrderedDict(layers))
    with graddiff.trace(a, tmp_path / "a.h5"):
        _train(a, torch.optim.SGD(a.parameters(), lr=0.1), None, 3, x, y)
    m = _mlp()
    with graddiff.trace(m, tmp_path / "b.h5"):
        _train(m, torch.optim.SGD(_groups(m), lr=0.1), None, 3, x, y)
    bias = {"from": "0.bias", "to": "enc.bias"}
    if transform:
        bias["reshape"] = [8]
    nm = parse_map({"rules": [{"from": "0.weight", "to": "enc.weight"}, bias]})
    with graddiff.open(tmp_path / "a.h5") as ra, graddiff.open(tmp_path / "b.h5") as rb:
        write_mapped(ra, rb, nm, str(tmp_path / "o.h5"))
    with graddiff.open(tmp_path / "o.h5") as o:
        groups = o.optimizer_settings.at(int(o.steps[0]))
    decay, rest = groups[0].groups
    assert sorted(decay.params) == ["2.weight", "enc.weight"]
    assert sorted(rest.params) == ["2.bias", "enc.bias"]


def _counts(opt, names):
    """The oracle: every parameter's Adam step count before the update (0 without state)."""
    return {n: int(opt.state[p]["step"]) if opt.state.get(p) else 0 for n, p in names.items()}


def test_per_parameter_counts_when_a_parameter_joins_late_or_is_skipped(tmp_path):
    """A layer that gets no gradient in the first steps joins Adam's state late, and a layer
    skipped at one update (no gradient) lags by one from then on: each parameter's recorded
    count is its own, at every step, while the group's first parameter counts regularly."""
    torch.manual_seed(0)
    m = torch.nn.ModuleDict(
        {"a": torch.nn.Linear(4, 4), "b": torch.nn.Linear(4, 2), "c": torch.nn.Linear(4, 1)}
    )  # "c" is never used: no gradient, no state, count 0 at every step
    opt = torch.optim.Adam(m.parameters(), lr=1e-2)
    x, _ = _data()
    names = {f"{k}.{n}": p for k, mod in m.items() for n, p in mod.named_parameters()}
    seen = []
    with graddiff.trace(m, tmp_path / "j.h5"):
        for step in range(8):
            opt.zero_grad(set_to_none=True)
            h = m["a"](x)
            # "b" is used from step 3 on, except at step 5 (no gradient: Adam skips it)
            loss = h.square().mean() if step < 3 or step == 5 else m["b"](h).square().mean()
            loss.backward()
            seen.append(_counts(opt, names))
            opt.step()
    with graddiff.open(tmp_path / "j.h5") as run:
        st = run.optimizer_settings
        for s in range(8):
            (o,) = st.at(s)
            (g,) = o.groups
            got = {n: g.state_steps.get(n, g.state_step) for n in names}
            assert got == seen[s], (s, got, seen[s])
        # rows only where the counts part: the first step, the state filling (1), "b" in the
        # state after its first update (4), "b" lagging after its skip at 5 (6); the unused "c"
        # stores nothing per step
        assert st.change_steps == [0, 1, 4, 6]
    assert seen[7]["b.weight"] == 3 and seen[7]["a.weight"] == 7  # the oracle did part
    assert seen[7]["c.weight"] == 0


def test_state_entries_show_a_reset_for_any_optimizer_and_nothing_in_a_normal_run(tmp_path):
    """len(optimizer.state) is kept as a change: an SGD momentum buffer cleared (no count to
    read) and an Adam optimizer re-created both show as state emptied at that step; a normal
    run only shows the state filling once, at its first update."""
    x, y = _data()
    for make in (
        lambda m: torch.optim.SGD(m.parameters(), lr=0.1, momentum=0.9),
        lambda m: torch.optim.Adam(m.parameters(), lr=1e-3),
    ):
        for reset_at in (None, 3):
            m = _mlp()
            opt = make(m)
            oracle = []
            with graddiff.trace(m, tmp_path / "e.h5"):
                for step in range(5):
                    if step == reset_at:
                        opt = make(m)  # resumed without the optimizer state
                    opt.zero_grad()
                    ((m(x) - y) ** 2).mean().backward()
                    oracle.append(len(opt.state))
                    opt.step()
            with graddiff.open(tmp_path / "e.h5") as run:
                st = run.optimizer_settings
                got = [st.for_param(s, "0.weight")[0].state_entries for s in range(5)]
                assert got == oracle
                emptied = [line for _, lines in st.changes() for line in lines if "emptied" in line]
                assert not emptied  # a new optimizer is listed as new, not as emptied
            assert oracle == ([0, 4, 4, 4, 4] if reset_at is None else [0, 4, 4, 0, 4])
    m = _mlp()
    opt = torch.optim.SGD(m.parameters(), lr=0.1, momentum=0.9)
    with graddiff.trace(m, tmp_path / "c.h5"):
        for step in range(4):
            if step == 2:
                opt.state.clear()  # the same optimizer, its momentum buffers dropped
            opt.zero_grad()
            ((m(x) - y) ** 2).mean().backward()
            opt.step()
    res = CliRunner().invoke(
        cli_main, ["show", str(tmp_path / "c.h5"), "--no-check", "--optimizer"]
    )
    assert "optimizer 0 (SGD): state emptied (4 -> 0 parameter entries)" in res.output


def test_a_parameter_swapped_between_groups_in_place_is_recorded(tmp_path):
    """Group sizes unchanged, membership changed in place: the recorded groups follow."""
    m = _mlp()
    opt = torch.optim.SGD(_groups(m), lr=0.1)
    x, y = _data()
    with graddiff.trace(m, tmp_path / "w.h5"):
        for step in range(3):
            if step == 2:
                g0, g1 = opt.param_groups[0]["params"], opt.param_groups[1]["params"]
                g0[0], g1[0] = g1[0], g0[0]
            opt.zero_grad()
            ((m(x) - y) ** 2).mean().backward()
            opt.step()
    with graddiff.open(tmp_path / "w.h5") as run:
        st = run.optimizer_settings
        assert st.for_param(1, "0.weight")[1].index == 0
        assert st.for_param(2, "0.weight")[1].index == 1
        assert st.for_param(2, "0.bias")[1].index == 0
        assert st.at(2)[0].groups[0].params == ("0.bias", "2.weight")
