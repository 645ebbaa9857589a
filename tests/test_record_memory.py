"""Recording keeps no tensor of the step alive: activations and output gradients are freed when
training frees them, not at the step's end (they are summarised when captured)."""

from __future__ import annotations

import gc
import weakref

import torch
import torch.nn.functional as F
from torch import nn

import graddiff


def test_activations_and_output_grads_are_not_kept_alive(tmp_path):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 8), nn.ReLU(), nn.Linear(8, 3))
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    x, y = torch.randn(4, 6), torch.randint(0, 3, (4,))
    seen: list[weakref.ref] = []
    grads: list[weakref.ref] = []

    def keep_ref(module, args, out):
        seen.append(weakref.ref(out))
        out.register_hook(lambda g: grads.append(weakref.ref(g)))

    # registered before the trace's own hook: sees the same output tensor
    handle = model[0].register_forward_hook(keep_ref)
    try:
        with graddiff.trace(model, tmp_path / "m.h5", values="stats"):
            for _ in range(2):
                opt.zero_grad()
                loss = F.cross_entropy(model(x), y)
                loss.backward()
                del loss
                gc.collect()
                # still inside the step (before optimizer.step ends it): the first Linear's
                # output (not saved for backward: ReLU keeps its own output) and its gradient
                # are gone, as without graddiff
                assert seen[-1]() is None
                assert grads[-1]() is None
                opt.step()
    finally:
        handle.remove()
    run = graddiff.open(tmp_path / "m.h5")
    names = {(k.kind, k.name) for k in run.keys}
    assert ("activation", "0") in names and ("grad_output", "0") in names
