"""The depth of a record counts only module outputs (and output gradients) that compute.

A container whose output is its last child's, ``nn.Identity``, ``nn.Flatten`` and a Dropout in
eval mode or with p = 0 pass a tensor on bitwise: they round nothing, so they add no depth to
the precision bound (graddiff/diff/precision.py, chain_depths). The oracle is the test's own
count of the modules that compute, in call order.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

import graddiff
from graddiff.diff.align import align
from graddiff.diff.precision import chain_depths, pair_chain, slot_depths
from graddiff.kinds import ALL_KINDS


def _net(p_inner: float, training: bool = True) -> nn.Module:
    net = nn.Sequential(
        nn.Linear(8, 16),  # 0: computes
        nn.Identity(),  # 1: passes on
        nn.ReLU(),  # 2: computes
        nn.Dropout(0.0),  # 3: p = 0, passes on
        nn.Sequential(nn.Linear(16, 16), nn.Dropout(p_inner)),  # 4.0 computes, 4.1 ?, 4 passes on
        nn.Flatten(),  # 5: a view, passes on
        nn.Linear(16, 4),  # 6: computes
    )
    return net.train(training)


def _record(path, p_inner: float, training: bool = True, bf16: bool = False) -> str:
    torch.manual_seed(0)
    net = _net(p_inner, training)
    o = torch.optim.SGD(net.parameters(), lr=0.1)
    g = torch.Generator().manual_seed(0)
    with graddiff.trace(net, path):
        for _ in range(2):
            x, y = torch.randn(8, 8, generator=g), torch.randint(0, 4, (8,), generator=g)
            o.zero_grad()
            with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
                loss = F.cross_entropy(net(x).float(), y)
            loss.backward()
            o.step()
    return str(path)


def test_identity_modules_and_containers_add_no_depth(tmp_path):
    with graddiff.open(_record(tmp_path / "a.h5", p_inner=0.0)) as run:
        d = chain_depths(run, 0)
    act = {n: v for (k, n), v in d.items() if k == "activation"}
    # computing outputs in call order: 0, 2, 4.0, 6 -> depths 1, 2, 3, 4
    assert act == {"0": 1, "1": 1, "2": 2, "3": 2, "4.0": 3, "4.1": 3, "4": 3, "5": 3, "6": 4,
                   "(root)": 4}  # fmt: skip
    gout = {n: v for (k, n), v in d.items() if k == "grad_output"}
    # backward: dL/d(out 6) (from the loss), then each computing module's backward writes the
    # output gradient of the module before it; a view/identity passes it on bitwise
    assert max(gout.values()) == 4 + 4 and gout["0"] == max(gout.values())
    assert gout["(root)"] == gout["6"]


def test_dropout_that_drops_counts(tmp_path):
    with graddiff.open(_record(tmp_path / "a.h5", p_inner=0.5)) as run:
        d = chain_depths(run, 0)
    assert d[("activation", "4.1")] == d[("activation", "4.0")] + 1
    with graddiff.open(_record(tmp_path / "e.h5", p_inner=0.5, training=False)) as run:
        d = chain_depths(run, 0)  # eval mode: Dropout passes its input on
    assert d[("activation", "4.1")] == d[("activation", "4.0")]


def test_depth_does_not_depend_on_the_compared_kinds(tmp_path):
    """--kinds (or the loss-scale path, which leaves loss and output gradients out) compares
    fewer slots; a gradient is still as deep as the output gradients computed before it."""
    a = _record(tmp_path / "a.h5", 0.0, bf16=True)
    b = _record(tmp_path / "b.h5", 0.0, bf16=True)
    with graddiff.open(a) as ra, graddiff.open(b) as rb:
        chain = pair_chain(ra, rb, 0)
        full, part = align(ra, rb, ALL_KINDS), align(ra, rb, ("param", "grad"))
        df, dp = slot_depths(full, chain), slot_depths(part, chain)
        by_f = {s.label: int(df[s.index]) for s in full.slots}
        by_p = {s.label: int(dp[s.index]) for s in part.slots}
    assert by_p == {k: v for k, v in by_f.items() if k in by_p}
    assert by_p["grad 0.weight"] == by_f["grad_output 0"] + 1 == 9
