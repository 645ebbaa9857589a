"""An extra or missing gradient path told from parameter gradients alone (rules_path), and what
must not be read as one: a frozen layer, a zero vs a None gradient, clipping, L2 on gradients.

Each test is its own oracle: it knows which path it added or cut, at which step, which
parameters it reaches, and what the differ must then say.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from classcheck import diagnosis_unlabelled
from torch import nn

import graddiff

LEAN = ["param", "grad", "loss"]  # no output gradients: the path shows in .grad only


class _TwoHeads(nn.Module):
    def __init__(self):
        super().__init__()
        self.trunk = nn.Sequential(nn.Linear(6, 8), nn.Tanh(), nn.Linear(8, 8), nn.Tanh())
        self.digit = nn.Linear(8, 4)
        self.parity = nn.Linear(8, 2)

    def forward(self, x, detach_parity: bool = False):
        h = self.trunk(x)
        return self.digit(h), self.parity(h.detach() if detach_parity else h)


def _two_heads(path, forget: bool, autograd: bool, values: str = "full") -> str:
    """Two losses on a shared trunk. ``forget``: the second loss's gradient is taken for its
    head only (autograd.grad) or its head is fed a detached trunk (backward)."""
    torch.manual_seed(0)
    m = _TwoHeads()
    params = list(m.parameters())
    g = torch.Generator().manual_seed(0)
    with graddiff.trace(m, path, values=values):
        for _ in range(2):
            x, y = torch.randn(12, 6, generator=g), torch.randint(0, 4, (12,), generator=g)
            digit, parity = m(x, detach_parity=forget and not autograd)
            l1, l2 = F.cross_entropy(digit, y), F.cross_entropy(parity, y % 2)
            if autograd:
                g1 = torch.autograd.grad(l1, params, retain_graph=True, allow_unused=True)
                wrt = list(m.parity.parameters()) if forget else params
                got = dict(zip(map(id, wrt), torch.autograd.grad(l2, wrt, allow_unused=True)))
                with torch.no_grad():
                    for p, a in zip(params, g1):
                        b = got.get(id(p))
                        p -= 0.1 * (a if b is None else b if a is None else a + b)
            else:
                m.zero_grad()
                (l1 + l2).backward()
                with torch.no_grad():
                    for p in params:
                        p -= 0.1 * p.grad
    return str(path)


def _trunk_params():
    return {"trunk.0.weight", "trunk.0.bias", "trunk.2.weight", "trunk.2.bias"}


@pytest.mark.parametrize("kinds", [None, LEAN], ids=["all kinds", "no output gradients"])
def test_autograd_grad_call_that_leaves_out_the_trunk(tmp_path, kinds):
    """examples/q3 --forget-branch in small: B asks the parity loss's autograd.grad call for
    the parity head only, so the trunk misses that loss's gradient."""
    a = _two_heads(tmp_path / "a.h5", forget=False, autograd=False)
    b = _two_heads(tmp_path / "b.h5", forget=True, autograd=True)
    r = graddiff.compare(a, b, kinds=kinds)
    assert r.exit_code == 1 and r.first.step == 0, r.headline()
    if kinds is None:  # the trunk's output gradient (one backward pass reaches it in each run)
        assert (r.first.kind, r.first.name) == ("grad_output", "trunk.3"), r.headline()
    else:
        assert r.first.kind == "grad" and r.first.name in _trunk_params(), r.headline()
    assert [c.cause for c in r.diagnosis] == ["extra_grad_path"], [
        (c.cause, c.title) for c in r.diagnosis
    ]
    assert "gradient path into trunk (Sequential) is missing in B" in r.cause.title
    text = " ".join(r.cause.evidence)
    if kinds is None:
        assert "the output gradients of 5 module(s) differ" in text
    else:
        assert "the gradients of 4 parameter(s) differ" in text and "the other 4 agree" in text
    assert "B takes 2 torch.autograd.grad calls at step 0" in text
    assert "ask for parity.bias, parity.weight (both Linear) only" in text
    assert "in B, ask each torch.autograd.grad call" in r.cause.fix
    assert not diagnosis_unlabelled(r)


def test_detached_branch_under_backward(tmp_path):
    """Both runs use backward(); the side is not known from values, so none is claimed."""
    a = _two_heads(tmp_path / "a.h5", forget=False, autograd=False)
    b = _two_heads(tmp_path / "b.h5", forget=True, autograd=False)
    r = graddiff.compare(a, b, kinds=LEAN)
    assert (r.first.step, r.first.kind) == (0, "grad") and r.first.name in _trunk_params()
    assert r.cause.cause == "extra_grad_path", [(c.cause, c.title) for c in r.diagnosis]
    assert "gradient path into trunk (Sequential) differs" in r.cause.title
    assert "side not known" in r.cause.title
    text = " ".join(r.cause.evidence)
    assert "activations not compared" in text
    # why no side: the records are symmetric, and what was checked
    assert "which run has the path is not known from these records" in text
    assert "neither run's gradients of them are all zeros" in text
    # one backward per step in each run: the paths part within it, counted once (/reach)
    assert "as many backward passes accumulate into their .grad in both runs (1)" in text
    assert "output gradients were not compared" in text
    assert "the same records (g_A - g_B = d either way)" in text
    assert not diagnosis_unlabelled(r)


class _GAN(nn.Module):
    def __init__(self):
        super().__init__()
        self.G = nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.Linear(8, 6))
        self.D = nn.Sequential(nn.Linear(6, 8), nn.Tanh(), nn.Linear(8, 1))


def _gan(path, detach: bool, two_optimizers: bool) -> str:
    torch.manual_seed(0)
    m = _GAN()
    if two_optimizers:
        oD, oG = (torch.optim.SGD(p.parameters(), lr=0.1) for p in (m.D, m.G))
    else:
        oD = oG = torch.optim.SGD(m.parameters(), lr=0.1)
    g = torch.Generator().manual_seed(0)
    bce = F.binary_cross_entropy_with_logits
    with graddiff.trace(m, path, values="full"):
        for _ in range(2):
            z, real = torch.randn(8, 4, generator=g), torch.randn(8, 6, generator=g)
            oD.zero_grad()
            oG.zero_grad()
            fake = m.G(z)
            dr, df = m.D(real), m.D(fake.detach() if detach else fake)
            (bce(dr, torch.ones_like(dr)) + bce(df, torch.zeros_like(df))).backward(
                retain_graph=not two_optimizers
            )
            if two_optimizers:
                oD.step()
                fake = m.G(z)
            out = m.D(fake)
            bce(out, torch.ones_like(out)).backward()
            oG.step()
    return str(path)


@pytest.mark.parametrize("two_optimizers", [True, False], ids=["two optimizers", "one step"])
def test_missing_detach_without_output_gradients(tmp_path, two_optimizers):
    a = _gan(tmp_path / "a.h5", detach=True, two_optimizers=two_optimizers)
    b = _gan(tmp_path / "b.h5", detach=False, two_optimizers=two_optimizers)
    r = graddiff.compare(a, b, kinds=LEAN)
    assert r.exit_code == 1 and (r.first.step, r.first.kind) == (0, "grad"), r.headline()
    assert r.first.name.startswith("G.")
    assert [c.cause for c in r.diagnosis] == ["extra_grad_path"], [
        (c.cause, c.title) for c in r.diagnosis
    ]
    text = " ".join(r.cause.evidence)
    if two_optimizers:  # D's step: G gets a gradient in B only, and has one in A at step 1
        assert "reaches G (Sequential) in B at step 0" in r.cause.title
        assert "A computes gradients for them at other steps (step 1)" in text
    else:  # one step: G's gradients differ, D's agree; both runs call backward twice, and
        # the discriminator loss's backward also reaches G in B (counted per parameter)
        assert "an extra gradient path reaches G (Sequential) in B" in r.cause.title
        assert "the other 4 agree (D.0.weight, D.0.bias, D.2.weight (all Linear)" in text
        assert "at step 0: 1 in A, 2 in B (counted by a post-accumulate-grad hook" in text
        assert "a backward pass reaches them in B and not in A" in text
        assert "the other 4 parameter(s) are reached by as many backward passes" in text
        assert "both runs take 2 gradient(s)" in text
        assert "side not known" not in r.cause.title
        assert "detach the tensor that feeds the other loss in B" in r.cause.fix
    assert not diagnosis_unlabelled(r)
    # without the losses (or activations) compared the forward is unknown: no path is claimed
    r = graddiff.compare(a, b, kinds=["param", "grad"])
    assert "extra_grad_path" not in [c.cause for c in r.diagnosis]
    assert "forward" not in " ".join(" ".join(c.evidence) for c in r.diagnosis)


def _mlp(
    path, variant: str = "", steps: int = 3, momentum: float = 0.0, values: str = "full"
) -> str:
    """A 3-layer MLP under SGD with an auxiliary head used at step 1 only."""
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 16), nn.ReLU(), nn.Linear(16, 4))
    m = nn.ModuleDict({"net": net, "aux": nn.Linear(16, 4)})
    if variant == "frozen":
        net[0].requires_grad_(False)
    o = torch.optim.SGD([p for p in m.parameters() if p.requires_grad], lr=0.1, momentum=momentum)
    g = torch.Generator().manual_seed(0)
    with graddiff.trace(m, path, values=values):
        for step in range(steps):
            x, y = torch.randn(16, 8, generator=g), torch.randint(0, 4, (16,), generator=g)
            o.zero_grad(set_to_none=variant != "zeros")
            h = net[:4](x)
            loss = F.cross_entropy(net[4](h), y)
            if step == 1:
                loss = loss + F.cross_entropy(m["aux"](h), y)
            loss.backward()
            if variant == "clip_value":
                torch.nn.utils.clip_grad_value_(net[0].parameters(), 0.01)
            if variant == "l2":
                for n, p in net.named_parameters():
                    if n.endswith("weight"):
                        p.grad += 0.01 * p
            o.step()
    return str(path)


@pytest.mark.parametrize("variant", ["frozen", "clip_value", "l2"])
def test_not_a_gradient_path(tmp_path, variant):
    """A frozen layer, an elementwise clip and an L2 term on some gradients change the
    gradients of a sub-network while the forward agrees: none is an extra path."""
    a, b = _mlp(tmp_path / "a.h5"), _mlp(tmp_path / "b.h5", variant)
    r = graddiff.compare(a, b, kinds=LEAN)
    assert r.exit_code == 1 and (r.first.step, r.first.kind) == (0, "grad"), r.headline()
    assert "extra_grad_path" not in [c.cause for c in r.diagnosis], r.cause.title
    if variant == "frozen":
        assert r.cause.cause == "frozen_parameter"
    if variant == "clip_value":  # B clamps net.0's gradients to [-0.01, 0.01]
        assert r.cause.cause == "grad_clipping", r.cause.title
        assert "B clips gradients by value at 0.01 (clip_grad_value_), A does not" in r.cause.title
        assert "net.0.weight" in " ".join(r.cause.evidence)
        assert not diagnosis_unlabelled(r)
    else:
        assert "by value" not in " ".join(c.title for c in r.diagnosis)
    if variant == "l2":  # B adds 0.01 * p to net's weight gradients by hand
        assert r.cause.cause == "weight_decay", r.cause.title
        assert "B adds an L2 term 0.01 x p to its gradients before the step" in r.cause.title
        assert "net.0.weight" in " ".join(r.cause.evidence)
        assert not diagnosis_unlabelled(r)
    else:
        assert "L2 term" not in " ".join(c.title for c in r.diagnosis)


def test_zero_vs_none_gradient_is_the_same_training(tmp_path):
    """The auxiliary head is unused at step 2; B zeroes its .grad in place, A sets it to None.
    Under plain SGD that is the same training: a None gradient is zero, compared as equal, and
    said so in the headline, the notes and the structure."""
    a, b = _mlp(tmp_path / "a.h5"), _mlp(tmp_path / "b.h5", "zeros")
    r = graddiff.compare(a, b, kinds=LEAN)
    assert r.exit_code == 0 and r.verdict == "identical", r.headline()
    assert "counting a None gradient as zero (2 record(s)" in r.headline()
    zn = sorted(d["label"] for d in r.structure["zero_vs_none"])
    assert zn == ["grad aux.bias", "grad aux.weight"], zn
    assert all(d["steps"] == 1 for d in r.structure["zero_vs_none"])
    assert any("None in one run and all zeros" in n for n in r.notes)


def test_zero_vs_none_gradient_under_momentum(tmp_path):
    """With momentum, B's optimizer moves the unused head (its buffer decays on a zero
    gradient) while A's skips it: the first divergence is that head's parameters one step
    later, and the cause is the zero vs None gradient of the step before."""
    a = _mlp(tmp_path / "a.h5", steps=4, momentum=0.9)
    b = _mlp(tmp_path / "b.h5", "zeros", steps=4, momentum=0.9)
    r = graddiff.compare(a, b, kinds=LEAN)
    assert r.exit_code == 1, r.headline()
    assert (r.first.step, r.first.kind) == (3, "param"), r.headline()
    assert r.first.name in ("aux.weight", "aux.bias"), r.headline()
    assert r.cause.cause == "zero_vs_none_grad", r.cause.title
    assert "aux.weight, aux.bias (both Linear) unused at step 2" in r.cause.title
    assert "in place in B" in r.cause.title and "None in A" in r.cause.title
    assert not diagnosis_unlabelled(r)


def _td(path, detach: bool, values: str = "full", hook_scale: float = 0.0) -> str:
    """A bootstrapped (TD) target computed by the same network: ``detach`` cuts its path; without
    it every parameter gets a second contribution through the target, while the loss value is
    the same. ``hook_scale``: every gradient scaled by a hook instead (a factor, not a path)."""
    torch.manual_seed(0)
    m = nn.Sequential(nn.Linear(6, 16), nn.Tanh(), nn.Linear(16, 3))
    if hook_scale:
        for p in m.parameters():
            p.register_hook(lambda g: g * hook_scale)
    o = torch.optim.SGD(m.parameters(), lr=0.05)
    g = torch.Generator().manual_seed(0)
    with graddiff.trace(m, path, values=values):
        for _ in range(2):
            s, s2 = torch.randn(10, 6, generator=g), torch.randn(10, 6, generator=g)
            r = torch.randn(10, generator=g)
            nxt = m(s2).max(1).values
            target = r + 0.9 * (nxt.detach() if detach else nxt)
            loss = F.mse_loss(m(s).max(1).values, target)
            o.zero_grad()
            loss.backward()
            o.step()
    return str(path)


@pytest.mark.parametrize("values", ["full", "stats"])
def test_a_path_through_every_parameter(tmp_path, values):
    """B's TD target is not detached: every gradient differs, the loss agrees bitwise. Named as
    a path (side unknown, and why), ranked before a hook; from statistics too."""
    a = _td(tmp_path / "a.h5", detach=True, values=values)
    b = _td(tmp_path / "b.h5", detach=False, values=values)
    r = graddiff.compare(a, b, kinds=LEAN)
    assert r.exit_code == 1 and (r.first.step, r.first.kind) == (0, "grad"), r.headline()
    assert r.cause.cause == "extra_grad_path", [(c.cause, c.title) for c in r.diagnosis]
    assert "a gradient path differs for every parameter (0, 2 (both Linear))" in r.cause.title
    assert "while the loss agrees bitwise" in r.cause.title
    assert "side not known" in r.cause.title
    assert ("(from statistics)" in r.cause.title) == (values == "stats")
    text = " ".join(r.cause.evidence)
    assert "the losses bitwise; the gradients of every one of the 4 parameter(s) differ" in text
    assert "not loss scaling or another reduction" in text
    assert "which run has the path is not known from these records" in text
    assert "output gradients were not compared" in text
    # neither run registers a backward hook or uses a custom autograd.Function (recorded):
    # both are ruled out
    assert "backward hooks on the traced modules and parameters and the custom" in text
    assert "ranked second: a hook on an intermediate tensor" in text
    assert "activations" not in text.split("which run")[0].replace("activations not compared", "")
    if values == "stats":
        assert "the values themselves were not compared" in text
    assert not diagnosis_unlabelled(r)


def test_every_gradient_scaled_by_a_hook_is_not_a_path(tmp_path):
    """Every gradient differs by one factor (a hook halves them), the loss agrees: a factor,
    not a path, from values and from statistics."""
    for values in ("full", "stats"):
        a = _td(tmp_path / "a.h5", detach=True, values=values)
        b = _td(tmp_path / "b.h5", detach=True, values=values, hook_scale=0.5)
        r = graddiff.compare(a, b, kinds=LEAN)
        assert r.exit_code == 1 and (r.first.step, r.first.kind) == (0, "grad"), r.headline()
        assert "extra_grad_path" not in [c.cause for c in r.diagnosis], r.cause.title


def test_statistics_only_name_a_path_where_they_rule_out_the_transforms(tmp_path):
    """Recorded as statistics only: the detached branch is still named (side unknown, and
    said to come from statistics); a clip by value and an L2 term on some gradients are not
    called a path, since their statistics fit those transforms."""
    a = _two_heads(tmp_path / "a.h5", forget=False, autograd=False, values="stats")
    b = _two_heads(tmp_path / "b.h5", forget=True, autograd=False, values="stats")
    r = graddiff.compare(a, b, kinds=LEAN)
    assert (r.first.step, r.first.kind) == (0, "grad") and r.first.name in _trunk_params()
    assert r.cause.cause == "extra_grad_path", [(c.cause, c.title) for c in r.diagnosis]
    assert "gradient path into trunk (Sequential) differs" in r.cause.title
    assert r.cause.title.endswith("(from statistics)")
    text = " ".join(r.cause.evidence)
    assert "recorded as statistics only: the norms, means, minima and maxima" in text
    assert "the values themselves were not compared" in text
    assert "largest relative difference" not in text  # no value-based number claimed
    ref = _mlp(tmp_path / "m.h5", values="stats")
    for variant in ("clip_value", "l2"):
        r = graddiff.compare(
            ref, _mlp(tmp_path / f"{variant}.h5", variant, values="stats"), kinds=LEAN
        )
        assert r.exit_code == 1 and (r.first.step, r.first.kind) == (0, "grad"), r.headline()
        assert "extra_grad_path" not in [c.cause for c in r.diagnosis], (variant, r.cause.title)
