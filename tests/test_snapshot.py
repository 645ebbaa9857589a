"""The torch-side fingerprint and stats agree with the numpy reference bit for bit.

The accelerator path (``stats_on_device``) cannot run on CPU-only CI as a whole (it needs
pinned memory and CUDA events), but its arithmetic is device-agnostic: it is checked here on
CPU tensors against the CPU path and the numpy reference.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from graddiff.entries import array_stats
from graddiff.format import fingerprint_bytes
from graddiff.hooks.snapshot import (
    _unpack_device_stats,
    capture,
    fingerprint_parts,
    stats_on_cpu,
    stats_on_device,
)

CASES = {
    "matrix": lambda: torch.randn(37, 41),
    "scalar": lambda: torch.tensor(3.5),
    "exact_blocks": lambda: torch.randn(128, 64),  # whole 64-word blocks, no tail
    "large_with_tail": lambda: torch.randn(8203),  # > 32 KiB, leftover words and a tail
    "at_small_limit": lambda: torch.randn(8192),  # exactly 32 KiB: per-word weights
    "odd_bytes_half": lambda: torch.randn(7).half(),
    "bfloat16": lambda: torch.randn(9).bfloat16(),
    "int64": lambda: torch.randint(-50, 50, (13,)),
    "bool": lambda: torch.tensor([True, False, True]),
    "empty": lambda: torch.zeros(0),
    "float64": lambda: torch.randn(5, 3, dtype=torch.float64),
    "offset_view": lambda: torch.randn(10, 10)[1:, 3],
    "transposed": lambda: torch.randn(6, 4).t(),
}


def _bytes(t):
    t = t.contiguous().reshape(-1)
    return t.view(torch.uint8).numpy()


@pytest.mark.parametrize("case", list(CASES), ids=list(CASES))
def test_fingerprint_matches_numpy_reference(case):
    torch.manual_seed(0)
    t = CASES[case]()
    fp = tuple(int(v) % 2**64 for v in fingerprint_parts(t))
    assert fp == fingerprint_bytes(_bytes(t))


@pytest.mark.parametrize("case", list(CASES), ids=list(CASES))
def test_device_path_arithmetic_matches_cpu_path(case):
    torch.manual_seed(0)
    t = CASES[case]()
    dev_stats, dev_fp = _unpack_device_stats(stats_on_device(t))
    cpu_stats, cpu_fp = stats_on_cpu(t)
    assert dev_fp == cpu_fp
    np.testing.assert_allclose(dev_stats[:4], cpu_stats[:4], rtol=1e-6)
    assert dev_stats[4:] == cpu_stats[4:]


def test_stats_match_numpy_reference():
    torch.manual_seed(0)
    t = torch.randn(50, 20)
    (norm, mean, lo, hi, nan, inf), _ = stats_on_cpu(t)
    ref = array_stats(t.numpy())
    np.testing.assert_allclose([norm, mean, lo, hi], ref[:4], rtol=1e-5, atol=1e-7)
    assert (nan, inf) == ref[4:]


def test_fingerprint_sees_moves_and_single_bits():
    torch.manual_seed(0)
    x = torch.randn(300, 64)
    shuffled = x[torch.randperm(300)]
    fx, fs = fingerprint_bytes(_bytes(x)), fingerprint_bytes(_bytes(shuffled))
    assert fx[0] == fs[0]  # the plain sum cannot see a permutation...
    assert fx[1] != fs[1]  # ...the position-weighted sum does
    flipped = x.clone()
    flipped.view(torch.int32)[5, 5] ^= 1
    assert fingerprint_bytes(_bytes(flipped)) != fx
    signed_zero = torch.zeros(4)
    assert fingerprint_bytes(_bytes(signed_zero)) != fingerprint_bytes(_bytes(-signed_zero))


def test_small_tensors_see_any_permutation():
    """A small batch whose rows (or labels) were permuted never fingerprints as equal."""
    torch.manual_seed(0)
    rows = torch.randn(8, 4)  # 128 bytes: one 512-byte block would hide the permutation
    labels = torch.randint(0, 10, (300,))
    for t, perm in ((rows, torch.tensor([1, 0, 2, 3, 4, 5, 6, 7])), (labels, torch.randperm(300))):
        if torch.equal(t, t[perm]):
            continue
        a, b = fingerprint_bytes(_bytes(t)), fingerprint_bytes(_bytes(t[perm]))
        assert a[0] == b[0] and a[1] != b[1]
        assert tuple(int(v) % 2**64 for v in fingerprint_parts(t[perm])) == b


def test_capture_copies_instead_of_referencing():
    t = torch.ones(4)
    entry = capture("param", "w", t, call=0, seq=0, flags=0, keep_values=True)
    t.add_(1)  # the training loop keeps mutating its tensors
    np.testing.assert_array_equal(entry.resolve().values, np.ones(4, np.float32))
