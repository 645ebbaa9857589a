"""Everything PyTorch can train or keep in a state dict is recorded and reads back.

Every torch dtype as a buffer (stored as itself, float8 and complex32 decoded exactly, quantized
dequantized and the rest as raw bits, with one warning each), and sparse gradients
(``nn.Embedding(sparse=True)`` with ``SparseAdam``), recorded densified at every step.
"""

from __future__ import annotations

import json
import subprocess
import sys
import warnings

import numpy as np
import pytest
import torch

import graddiff
from graddiff.format import storable_dtypes

ALL_DTYPES = sorted(
    {getattr(torch, n) for n in dir(torch) if isinstance(getattr(torch, n), torch.dtype)},
    key=str,
)


def _tensor(dt: torch.dtype) -> torch.Tensor:
    with warnings.catch_warnings():  # deprecated quantize_per_tensor, experimental bcomplex32
        warnings.simplefilter("ignore")
        return _make(dt)


def _make(dt: torch.dtype) -> torch.Tensor:
    base = torch.tensor([[0.0, 1.5, -2.0], [3.0, 0.25, 448.0]])
    if str(dt).startswith("torch.q"):
        return torch.quantize_per_tensor(base.abs(), 0.25, 0, dt)
    try:
        return base.abs().to(dt) if not dt.is_complex else (base + 1j * base).to(dt)
    except (RuntimeError, TypeError, NotImplementedError):  # bit and shell types: from bytes
        size = torch.empty(0, dtype=dt).element_size()
        return torch.arange(6 * size, dtype=torch.uint8).reshape(2, 3 * size).view(dt)


def _name(dt: torch.dtype) -> str:
    return str(dt).replace("torch.", "")


def test_every_torch_dtype_records_and_reads_back(tmp_path):
    model = torch.nn.Linear(3, 1)
    made = {}
    for dt in ALL_DTYPES:
        t = _tensor(dt)
        made[_name(dt)] = t
        model.register_buffer(f"b_{_name(dt)}", t)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    path = str(tmp_path / "dtypes.h5")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        with graddiff.trace(model, path, values="full"):
            for _ in range(2):
                model(torch.ones(1, 3)).sum().backward()
                opt.step()
    messages = [str(w.message) for w in caught if "graddiff" in str(w.message)]
    stored = storable_dtypes()
    for name in made:
        about = {m for m in messages if f"'b_{name}' has dtype" in m}
        # one warning per record (the buffer at the step's start and at its end), not per step
        assert len(about) == (0 if name in stored else 2), (name, about)
    with graddiff.open(path) as run:
        assert len(run.steps) == 2
        for name, t in made.items():
            got = run.get("buffer", f"b_{name}", 1)
            if t.is_quantized:
                want = t.dequantize().numpy()
            elif name in stored:
                want = (torch.view_as_real(t) if t.is_complex() else t).to(
                    torch.float64 if not t.is_complex() else torch.float32
                )
                want = want.numpy()
                if t.is_complex():
                    want = want[..., 0] + 1j * want[..., 1]
                want = want.astype(got.dtype)
            else:
                want = t.view({1: torch.uint8, 2: torch.uint16, 4: torch.uint32}[t.element_size()])
                want = want.numpy()
            np.testing.assert_array_equal(got, want, err_msg=name)
    for args in (
        ["compare", path, path, "--exact"],
        ["inspect", path, "-k", "buffer", "-n", "*", "-v", "--json", "-s", "1"],
    ):
        res = subprocess.run(
            [sys.executable, "-m", "graddiff", *args], capture_output=True, text=True, timeout=120
        )
        assert res.returncode == 0, res.stderr
    assert len(json.loads(res.stdout)) == 20  # inspect shows the first 20 matches


@pytest.mark.parametrize("optimizer", ["SparseAdam", "SGD"])
def test_sparse_gradients_record_every_step(tmp_path, optimizer):
    torch.manual_seed(0)
    emb = torch.nn.Embedding(10, 4, sparse=True)
    head = torch.nn.Linear(4, 1)
    model = torch.nn.Sequential(emb, head)
    opts = [
        getattr(torch.optim, optimizer)(list(emb.parameters()), lr=0.1),
        torch.optim.SGD(head.parameters(), lr=0.1),
    ]
    path = str(tmp_path / "sparse.h5")
    dense_grads = []
    with graddiff.trace(model, path, values="full"):
        for step in range(4):
            for o in opts:
                o.zero_grad()
            idx = torch.tensor([step, step + 1, step + 1])  # a repeated index: summed
            model(idx).sum().backward()
            assert emb.weight.grad.is_sparse
            dense_grads.append(emb.weight.grad.to_dense().clone())
            for o in opts:
                o.step()
    with graddiff.open(path) as run:
        assert list(run.steps) == [0, 1, 2, 3] and run.complete
        for step, want in enumerate(dense_grads):
            np.testing.assert_array_equal(run.get("grad", "0.weight", step), want.numpy())
