"""The accelerator path's batching logic, run on CPU tensors (no GPU on CI).

Per-tensor device statistics are collected per step and brought to the host in one stacked
copy into a reused buffer; the results must equal the CPU path's, across more steps than the
buffer ring holds. Pinning and CUDA events are not exercised here (UNVERIFIED on a GPU).
"""

from __future__ import annotations

import numpy as np
import torch

from graddiff.hooks.device_stats import RING, DeviceStatsBatch
from graddiff.hooks.snapshot import PendingEntry, capture_on_device, stats_on_cpu_reference


def _entry(x: torch.Tensor) -> PendingEntry:
    return PendingEntry("param", "w", 0, str(x.dtype), tuple(x.shape), (0.0,) * 6, (0, 0))


def test_batched_device_stats_equal_the_cpu_path_over_many_steps():
    g = torch.Generator().manual_seed(0)
    batch = DeviceStatsBatch()
    seen_buffers = set()
    for step in range(RING * 2 + 1):
        tensors = [
            torch.randn(5 + step, generator=g),
            torch.randn(3, 9000, generator=g),  # > 32 KiB: 64-word blocks
            torch.randint(-9, 9, (7,), generator=g),
            torch.randn(4, dtype=torch.float64, generator=g),
        ]
        keep = [False, True, False, True]
        entries = []
        for x, k in zip(tensors, keep):
            e = _entry(x)
            capture_on_device(e, x, k, batch)
            entries.append(e)
        assert len(batch) == len(tensors)
        originals = [x.clone() for x in tensors]
        for x in tensors:
            x.add_(1)  # training goes on before the step is written: captured values stay
        batch.flush()
        assert len(batch) == 0
        seen_buffers.add(entries[0]._stats_host.untyped_storage().data_ptr())
        for x, k, e in zip(originals, keep, entries):
            e.resolve()
            ref_stats, ref_fp = stats_on_cpu_reference(x)
            assert e.fingerprint == ref_fp
            np.testing.assert_allclose(e.stats[:4], ref_stats[:4], rtol=1e-6)
            assert e.stats[4:] == ref_stats[4:]
            if k:
                np.testing.assert_array_equal(e.values, x.numpy())
            else:
                assert e.values is None
    assert batch.flushes == RING * 2 + 1
    assert len(seen_buffers) == RING  # host buffers are reused, one per ring slot


def test_unbatched_device_capture_still_works():
    x = torch.randn(100)
    e = _entry(x)
    capture_on_device(e, x, False, None)
    e.resolve()
    assert e.fingerprint == stats_on_cpu_reference(x)[1]


def test_torch_op_path_takes_min_max_over_finite_values_like_the_cpu_path():
    """The torch-op path (accelerators where the kernels do not apply) follows the CPU path's
    conventions on non-finite values: min/max over the finite ones, NaN when there are none."""
    from graddiff.hooks.snapshot import _unpack_device_stats, stats_on_device

    nan, inf = float("nan"), float("inf")
    cases = [
        torch.tensor([1.0, nan, -2.0, 3.0]),
        torch.tensor([inf, -5.0, 0.5, -inf]),
        torch.tensor([nan, inf, -inf]),
        torch.tensor([nan, nan]),
        torch.tensor([1.0, nan], dtype=torch.bfloat16),
        torch.tensor([-1.0, 2.0, 7.0]),
    ]
    for x in cases:
        (got, fp) = _unpack_device_stats(stats_on_device(x))
        ref, ref_fp = stats_on_cpu_reference(x)
        assert fp == ref_fp
        np.testing.assert_array_equal(np.array(got[2:4]), np.array(ref[2:4]))  # NaN == NaN here
        assert got[4:] == ref[4:]
