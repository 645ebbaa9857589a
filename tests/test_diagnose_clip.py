"""Clipping by global norm: before ``scaler.unscale_`` in one of two GradScaler runs, or in one
run only (rules_clip). Each test is its own oracle: it knows which run clips where, at which
max_norm and scale, and what the differ must recover from the gradients' norms."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from classcheck import diagnosis_unlabelled
from torch import nn

import graddiff


def _run(
    path,
    *,
    clip: str = "none",
    max_norm: float = 1.0,
    scale: float = 2.0**16,
    scaler: bool = True,
    values: str = "full",
    steps: int = 3,
) -> str:
    """clip: "none", "after" (scaler.unscale_ then clip_grad_norm_: correct) or "before"
    (clip_grad_norm_ on the still-scaled gradients); "left": optimizer.step() without the
    scaler's unscale (the scale stays in the gradients)."""
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 4))
    o = torch.optim.SGD(net.parameters(), lr=0.1, momentum=0.9)
    sc = torch.amp.GradScaler("cpu", init_scale=scale, enabled=scaler)
    g = torch.Generator().manual_seed(0)
    with graddiff.trace(net, path, values=values):
        for _ in range(steps):
            x, y = torch.randn(16, 8, generator=g), torch.randint(0, 4, (16,), generator=g)
            o.zero_grad()
            sc.scale(F.cross_entropy(net(x), y)).backward()
            if clip == "after":
                sc.unscale_(o)
            if clip in ("after", "before"):
                torch.nn.utils.clip_grad_norm_(net.parameters(), max_norm)
            if clip == "left":
                o.step()
            else:
                sc.step(o)
                sc.update()
    return str(path)


@pytest.mark.parametrize("values", ["full", "stats"])
def test_clip_before_unscale_that_engages_in_one_run_only(tmp_path, values):
    """max_norm 1: the unscaled global norm (about 0.5) is never clipped; x 2^16 it always is."""
    a = _run(tmp_path / "a.h5", clip="after", values=values)
    b = _run(tmp_path / "b.h5", clip="before", values=values)
    r = graddiff.compare(a, b)
    assert r.exit_code == 1 and (r.first.step, r.first.kind) == (0, "grad"), r.headline()
    assert [c.cause for c in r.diagnosis][0] == "clip_before_unscale", [
        (c.cause, c.title) for c in r.diagnosis
    ]
    assert "scaled_gradients" not in [c.cause for c in r.diagnosis]
    assert r.cause.title.startswith("B clips its gradients while they are still scaled")
    assert "(1 / 2^16)" in r.cause.title
    text = " ".join(r.cause.evidence)
    assert "B's global gradient norm is 1.53e-05 at every step of steps 0..2" in text
    assert "A's global norm stays below 1" in text
    assert "scaler.unscale_(optimizer) before clip_grad_norm_" in r.cause.fix
    assert not diagnosis_unlabelled(r)


def test_clip_before_unscale_when_both_clip(tmp_path):
    """max_norm 0.01 at scale 2^10: both clip, B's gradients are exactly A's / 2^10."""
    a = _run(tmp_path / "a.h5", clip="after", max_norm=0.01, scale=2.0**10)
    b = _run(tmp_path / "b.h5", clip="before", max_norm=0.01, scale=2.0**10)
    r = graddiff.compare(b, a)  # the faulty run as A
    assert r.cause.cause == "clip_before_unscale", [(c.cause, c.title) for c in r.diagnosis]
    assert r.cause.title.startswith("A clips") and "(0.01 / 2^10)" in r.cause.title
    text = " ".join(r.cause.evidence)
    assert "B clips at max_norm 0.01 after scaler.unscale_, A before it, at the scale 2^10" in text


def test_clipping_in_one_run_only(tmp_path):
    a = _run(tmp_path / "a.h5", clip="after", max_norm=0.2, scaler=False)
    b = _run(tmp_path / "b.h5", scaler=False)
    r = graddiff.compare(a, b)
    assert (r.first.step, r.first.kind) == (0, "grad"), r.headline()
    assert [c.cause for c in r.diagnosis] == ["grad_clipping"], r.cause.title
    assert r.cause.title == "A clips gradients by global norm at max_norm 0.2, B does not"


def test_scale_left_in_the_gradients_is_not_clipping(tmp_path):
    """optimizer.step() instead of scaler.step: gradients 2^16 x, norms vary per step."""
    a = _run(tmp_path / "a.h5")
    b = _run(tmp_path / "b.h5", clip="left")
    r = graddiff.compare(a, b)
    causes = [c.cause for c in r.diagnosis]
    assert causes[0] == "scaled_gradients" and "clip_before_unscale" not in causes, causes
    assert "scale is left in B's gradients" in r.cause.title
