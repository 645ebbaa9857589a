"""The fused one-pass kernel (numba) agrees with the pure-torch reference path.

Fingerprints, min/max and NaN/Inf counts must agree exactly; norm and mean to the documented
float tolerance (docs/performance.md): the fused pass accumulates in float64 in a vectorised
order, the reference in the tensor's dtype in torch's order. Without numba (or with
``GRADDIFF_NO_NUMBA=1``, which CI runs too) the fused-only tests are skipped and the
dispatching tests check the reference path against itself and the numpy definition.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from graddiff.format import fingerprint_bytes
from graddiff.hooks import fused, snapshot
from graddiff.hooks.snapshot import capture, stats_on_cpu, stats_on_cpu_reference

FUSED = (
    torch.float16,
    torch.bfloat16,
    torch.float32,
    torch.float64,
    torch.int64,
    torch.int32,
    torch.int16,
    torch.int8,
)
#: summarised in float32 by the reference (its sums overflow where float32's do)
FLOAT32_ACCUMULATED = (torch.float32, torch.float16, torch.bfloat16)
needs_numba = pytest.mark.skipif(
    not fused.available(), reason=f"fused kernel unavailable: {fused.unavailable_reason()}"
)

#: norm: relative; mean: relative to the RMS of the tensor. Against the reference the bound is
#: the reference's own float32 accumulation error; against float64 arithmetic it is rounding.
RTOL_REFERENCE = 1e-4
RTOL_FLOAT64 = 1e-9


def _cases():
    g = torch.Generator().manual_seed(0)

    def r(*shape, dtype=torch.float32):
        return torch.randn(*shape, generator=g).to(dtype)

    big = r(1_100_000)  # 4.4 MB: several fingerprint blocks of 64 words, many kernel tiles
    return {
        "scalar": torch.tensor(3.5),
        "one": r(1),
        "odd_float32": r(7),  # a partial last word
        "small_limit": r(8192),  # 32 KiB: one-word blocks
        "just_large": r(8193),  # 64-word blocks, leftover words and a tail
        "blocks_exact": r(128, 64),
        "large_tail": r(3, 100_003),
        "split": big,
        "split_odd": big[:1_099_999],
        "float64": r(5000, dtype=torch.float64),
        "float64_large": r(300_001, dtype=torch.float64),
        "int64": torch.randint(-(2**62), 2**62, (4099,), generator=g),
        "int32": torch.randint(-(2**31), 2**31 - 1, (70_001,), generator=g, dtype=torch.int32),
        "int16": torch.randint(-(2**15), 2**15 - 1, (33,), generator=g, dtype=torch.int16),
        "int8": torch.randint(-128, 127, (40_003,), generator=g, dtype=torch.int8),
        "transposed": r(300, 70).t(),
        "offset_view": r(50, 50)[1:, 3:],
        "signed_zeros": torch.tensor([-0.0, 0.0, -0.0]),
        "extremes": torch.tensor([3.4e38, -3.4e38, 1e-45, -1e-45, 0.0]),
        "huge_float64": torch.tensor([1e300, -1e300, 5.0], dtype=torch.float64),
        "nan_inf": torch.tensor([1.0, float("nan"), float("inf"), -float("inf"), -2.0] * 10_000),
        "all_nan": torch.full((9,), float("nan")),
        "empty": torch.zeros(0),
        "half": r(101, dtype=torch.float16),
        "half_split": r(1_100_003, dtype=torch.float16),  # 2.2 MB, a partial last word
        "half_extremes": torch.tensor(
            [65504.0, -65504.0, 6e-8, -6e-8, 6.1e-5, -0.0, 0.0, 1.0], dtype=torch.float16
        ),
        "half_nan_inf": torch.tensor(
            [1.0, float("nan"), float("inf"), -3.0] * 9, dtype=torch.float16
        ),
        "half_transposed": r(90, 31, dtype=torch.float16).t(),
        "bfloat16": r(40_000, dtype=torch.bfloat16),
        "bfloat16_odd": r(4_099, dtype=torch.bfloat16),
        "bfloat16_extremes": torch.tensor(
            [3.38e38, -3.38e38, 1e-40, -1e-40, 9.2e-41, -0.0, 0.0, 2.5], dtype=torch.bfloat16
        ),  # squares beyond float32's range: norm inf, as the reference's float32 sum gives
        "bfloat16_nan_inf": torch.tensor(
            [float("nan"), 2.0, -float("inf"), 0.5] * 7, dtype=torch.bfloat16
        ),
        "bfloat16_offset_view": r(64, 65, dtype=torch.bfloat16)[1:, 1:],
        "bool": torch.tensor([True, False, True]),
        "uint8": torch.arange(200, dtype=torch.uint8),
        "complex": torch.randn(17, dtype=torch.complex64, generator=g),
    }


CASES = _cases()


def _bytes(t: torch.Tensor) -> np.ndarray:
    t = t.contiguous().reshape(-1)
    if t.is_complex():
        t = torch.view_as_real(t)
    return t.reshape(-1).view(torch.uint8).numpy()


def assert_stats_agree(fast, ref, x):
    (fs, ffp), (rs, rfp) = fast, ref
    assert ffp == rfp, "fingerprints differ"
    assert fs[4:] == rs[4:], "NaN/Inf counts differ"
    for a, b in zip(fs[2:4], rs[2:4]):  # min/max: exact, -0.0 == 0.0
        assert a == b or (math.isnan(a) and math.isnan(b)), (fs, rs)
    n = max(1, x.numel())
    truth = (0.0, 0.0)
    if x.numel() and not (x.is_complex() or x.dtype == torch.bool):
        d = x.double()
        truth = (float(torch.linalg.vector_norm(d)), float(d.mean()))
    fused_result = not (rs[4] or rs[5]) and x.dtype in FUSED and fused.available()
    f32 = x.dtype in FLOAT32_ACCUMULATED  # (stat, what float32 must hold) below
    checks = [(0, truth[0] ** 2 if f32 else 0.0), (1, abs(truth[1]) * n if f32 else 0.0)]
    for i, held in checks:
        if fused_result and f32 and held > FLOAT32_MAX:
            # Beyond float32's range the reference is inconsistent (inf, or the true value
            # for some shapes); the fused path reports inf, as float32 summation gives.
            assert math.isinf(fs[i]), (i, fs, truth)
            continue
        scale = truth[0] if math.isfinite(truth[0]) and truth[0] else rs[0]
        rms = scale / math.sqrt(n) if math.isfinite(scale) else 0.0
        tols = (RTOL_REFERENCE * abs(rs[i]) if i == 0 else RTOL_REFERENCE * rms) + 1e-18 * (n**0.5)
        assert _close(fs[i], rs[i], tols), (i, fs, rs)  # reference floor: float32 underflow
        if fused_result:
            tolt = RTOL_FLOAT64 * (abs(truth[i]) if i == 0 else rms) + 1e-300
            assert _close(fs[i], truth[i], tolt), (i, fs, truth)


def _close(a: float, b: float, tol: float) -> bool:
    if math.isfinite(b):
        return abs(a - b) <= tol
    return a == b or (math.isnan(a) and math.isnan(b))


FLOAT32_MAX = float(torch.finfo(torch.float32).max)


@pytest.mark.parametrize("case", list(CASES), ids=list(CASES))
def test_dispatching_path_matches_reference_and_format(case):
    x = CASES[case]
    fast, ref = stats_on_cpu(x), stats_on_cpu_reference(x)
    assert_stats_agree(fast, ref, x)
    assert fast[1] == fingerprint_bytes(_bytes(x))


@needs_numba
@pytest.mark.parametrize("threads", [1, 2, 3])
def test_statistics_do_not_depend_on_the_torch_thread_count(threads):
    """One compiled call per tensor, on the capturing thread: the same sums in the same order
    whatever ``torch.get_num_threads()`` is (a large tensor was once split per thread)."""
    x = CASES["split_odd"]
    before = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = stats_on_cpu(x)
        torch.set_num_threads(threads)
        assert repr(stats_on_cpu(x)) == repr(one)
    finally:
        torch.set_num_threads(before)
    assert one[1] == fingerprint_bytes(_bytes(x))
    assert one[0][2:] == stats_on_cpu_reference(x)[0][2:]


@needs_numba
def test_the_kernel_really_runs_for_its_dtypes():
    arr = CASES["large_tail"].reshape(-1).numpy()
    assert fused.summarise(arr, 6) is not None
    assert fused.summarise(np.zeros(3, np.float16), 0) is not None
    bf16 = np.array([0x3F80, 0xC000, 0x0001], np.uint16)  # bfloat16 bits: 1, -2, a denormal
    assert fused.summarise(bf16, 0, bfloat16=True)[4:6] == (-2.0, 1.0)
    assert fused.summarise(bf16, 0) is None  # plain uint16: the reference path
    assert fused.summarise(np.zeros(3, np.uint8), 0) is None


@needs_numba
@settings(max_examples=60, deadline=None)
@given(
    raw=st.binary(min_size=0, max_size=40_000),
    dtype=st.sampled_from(
        [
            torch.float16,
            torch.bfloat16,
            torch.float32,
            torch.float64,
            torch.int64,
            torch.int32,
            torch.int8,
        ]
    ),
)
def test_any_bit_pattern_agrees_with_the_reference(raw, dtype):
    """Arbitrary bytes (NaN payloads, denormals, -0.0, infinities) reinterpreted as a dtype."""
    size = torch.empty(0, dtype=dtype).element_size()
    raw = raw[: len(raw) // size * size]
    x = (
        torch.zeros(0, dtype=dtype)
        if not raw
        else torch.from_numpy(np.frombuffer(raw, dtype=np.uint8).copy()).view(dtype)
    )

    assert_stats_agree(stats_on_cpu(x), stats_on_cpu_reference(x), x)


def test_disabled_by_environment_falls_back(monkeypatch):
    monkeypatch.setattr(fused, "_kernels", None)
    monkeypatch.setattr(fused, "_failed", None)
    monkeypatch.setenv("GRADDIFF_NO_NUMBA", "1")
    assert not fused.available()
    assert "GRADDIFF_NO_NUMBA" in fused.unavailable_reason()
    x = CASES["large_tail"]
    assert stats_on_cpu(x) == stats_on_cpu_reference(x)


def test_capture_uses_the_dispatching_path():
    x = CASES["just_large"]
    entry = capture("param", "w", x, call=0, seq=0, flags=0, keep_values=False)
    assert entry.fingerprint == fingerprint_bytes(_bytes(x))
    assert_stats_agree((entry.stats, entry.fingerprint), stats_on_cpu_reference(x), x)


def _fresh_state(monkeypatch):
    monkeypatch.setattr(fused, "_kernels", None)
    monkeypatch.setattr(fused, "_failed", None)
    monkeypatch.delenv("GRADDIFF_NO_NUMBA", raising=False)


def test_numba_not_installed_falls_back_silently(monkeypatch):
    """A platform without numba wheels (setup.cfg's marker): no warning, the reference path."""
    _fresh_state(monkeypatch)

    def build():
        raise ModuleNotFoundError("No module named 'numba'", name="numba")

    monkeypatch.setattr(fused, "_build", build)
    x = CASES["large_tail"]
    assert stats_on_cpu(x) == stats_on_cpu_reference(x)  # filterwarnings=error: no warning
    assert not fused.available() and "not installed" in fused.unavailable_reason()


def test_numba_that_cannot_import_warns_once(monkeypatch):
    """An installed numba that fails to import (e.g. a numpy newer than it supports)."""
    _fresh_state(monkeypatch)

    def build():
        raise ImportError("Numba needs NumPy 2.5 or less. Got NumPy 2.6.")

    monkeypatch.setattr(fused, "_build", build)
    x = CASES["large_tail"]
    with pytest.warns(RuntimeWarning, match="fused statistics kernel .* NumPy 2.6") as record:
        first = stats_on_cpu(x)
        second = stats_on_cpu(x)
    assert len(record) == 1
    assert first == second == stats_on_cpu_reference(x)


def test_kernel_that_fails_to_compile_warns_once(monkeypatch):
    """numba compiles on first use: a failure there switches to the reference path."""
    _fresh_state(monkeypatch)
    calls = []

    def chunk(*args):
        calls.append(1)
        raise RuntimeError("Failed in nopython mode pipeline (step: nopython frontend)")

    monkeypatch.setattr(fused, "_build", lambda: {"whole": chunk, "whole_at": chunk})
    x, y = CASES["large_tail"], CASES["just_large"]
    with pytest.warns(RuntimeWarning, match="nopython") as record:
        assert stats_on_cpu(x) == stats_on_cpu_reference(x)
        assert stats_on_cpu(y) == stats_on_cpu_reference(y)
    assert len(record) == 1 and len(calls) == 1
    assert not fused.available()


@pytest.mark.parametrize("name", list(CASES), ids=list(CASES))
def test_address_path_equals_array_path(name, monkeypatch):
    """Plain tensors reach the kernel by address (``fused.summarise_at``), everything else
    through a numpy view (``fused.summarise``): the same kernel, so the same results, bit for
    bit (compared with the address path switched off)."""
    if not fused.available():
        pytest.skip("numba unavailable")
    x = CASES[name]
    calls = []
    at = fused.summarise_at
    monkeypatch.setattr(fused, "summarise_at", lambda *a: calls.append(a) or at(*a))
    by_address = stats_on_cpu(x)
    plain = type(x) is torch.Tensor and x.is_contiguous() and x.dtype in snapshot._AT_NAMES
    if plain and x.nbytes:
        assert calls, "the address path was not taken"
    monkeypatch.setattr(fused, "summarise_at", lambda *a: None)  # the address path off
    assert repr(stats_on_cpu(x)) == repr(by_address)


# -- the fused copy of full values: copy + statistics in one pass ---------------------------
def _fused_copy_applies(x: torch.Tensor) -> bool:
    """Does the fused pass copy ``x`` (by address, or gathered by strides)?"""
    if not (fused.available() and x.dtype in FUSED and x.numel() > 0):
        return False
    if x.is_contiguous() and x.data_ptr() % 8 == 0:
        return True
    return snapshot._runs(x) is not None


def _slot(x: torch.Tensor) -> tuple[torch.Tensor, int]:
    """A contiguous destination for ``x`` at a 64-byte-aligned address (as an arena slot)."""
    nbytes = x.numel() * x.element_size()
    buf = torch.full((nbytes + 128,), 0xA5, dtype=torch.uint8)
    skip = -buf.data_ptr() % 64
    dst = buf[skip : skip + nbytes].view(x.dtype).view(x.shape)
    return dst, dst.data_ptr()


@pytest.mark.parametrize("name", list(CASES), ids=list(CASES))
def test_copy_and_stats_equals_the_statistics_pass(name):
    """One read of the source copies it and summarises it: the same stats and fingerprint,
    bit for bit, as the statistics pass over the same tensor (and so as the reference to its
    tolerance), and the destination holds the tensor's bytes. Where it does not apply (no
    numba, a dtype or a view the kernel does not read) it copies nothing."""
    x = CASES[name]
    dst, addr = _slot(x)
    got = snapshot.copy_and_stats(x, dst, addr)
    if not _fused_copy_applies(x):
        assert got is None
        assert (dst.reshape(-1).view(torch.uint8) == 0xA5).all(), "copied although declined"
        return
    assert got is not None
    assert repr(got) == repr(stats_on_cpu(x.contiguous()))
    assert_stats_agree(got, stats_on_cpu_reference(x), x)
    assert np.array_equal(_bytes(dst), _bytes(x))


@needs_numba
@pytest.mark.parametrize("threads", [1, 2, 3])
@pytest.mark.parametrize("name", ["split", "split_odd", "half_split", "large_tail"])
def test_copy_and_stats_of_large_tensors_at_any_thread_count(name, threads):
    x = CASES[name]
    dst, addr = _slot(x)
    before = torch.get_num_threads()
    try:
        torch.set_num_threads(threads)
        got = snapshot.copy_and_stats(x, dst, addr)
    finally:
        torch.set_num_threads(before)
    assert repr(got) == repr(stats_on_cpu(x))
    assert got[1] == fingerprint_bytes(_bytes(x))
    assert np.array_equal(_bytes(dst), _bytes(x))


@needs_numba
@settings(max_examples=40, deadline=None)
@given(
    raw=st.binary(min_size=1, max_size=20_000),
    dtype=st.sampled_from(list(FUSED)),
)
def test_copy_and_stats_any_bit_pattern(raw, dtype):
    size = torch.empty(0, dtype=dtype).element_size()
    raw = raw[: len(raw) // size * size]
    if not raw:
        return
    x = torch.from_numpy(np.frombuffer(raw, dtype=np.uint8).copy()).view(dtype)
    dst, addr = _slot(x)
    got = snapshot.copy_and_stats(x, dst, addr)
    assert repr(got) == repr(stats_on_cpu(x))
    assert_stats_agree(got, stats_on_cpu_reference(x), x)
    assert bytes(_bytes(dst)) == raw


@pytest.mark.parametrize("no_numba", [False, True], ids=["fused", "GRADDIFF_NO_NUMBA"])
def test_full_values_capture_into_an_arena(no_numba, monkeypatch):
    """Full-values capture through an arena: every case's values are its bytes, and its stats
    and fingerprint those of the statistics pass (fused where it applies, taken at capture;
    else summarised by the writer), with numba and without."""
    from graddiff.arena import ArenaPool

    if no_numba:
        _fresh_state(monkeypatch)
        monkeypatch.setenv("GRADDIFF_NO_NUMBA", "1")
    pool = ArenaPool()
    pool._fit(sum(-(-max(x.nbytes, 1) // 64) * 64 for x in CASES.values()))
    arena = pool.acquire()
    for name, x in CASES.items():
        entry = capture("param", name, x, call=0, seq=0, flags=0, keep_values=True, arena=arena)
        summarised = entry._summarised
        got = entry.resolve()
        stored = x
        if x.is_complex():
            stored = torch.view_as_real(x)
        assert np.array_equal(got.values.reshape(-1).view(np.uint8), _bytes(stored)), name
        # the writer summarises the contiguous copy: a view's float sums may round
        # differently from its source's (as without an arena, or with a clone)
        assert repr((got.stats, got.fingerprint)) == repr(stats_on_cpu(x.contiguous())), name
        assert summarised == _fused_copy_applies(x), name
        if no_numba:
            assert not summarised
    arena.release()


# -- views: gathered by shape and strides in the same pass (one read of the source) ---------
def _views():
    g = torch.Generator().manual_seed(3)

    def r(*shape, dtype=torch.float32):
        return torch.randn(*shape, generator=g).to(dtype)

    return {
        "row_slice": r(300, 130)[:, 5:125],
        "row_slice_large": r(1100, 1030)[:, 3:1003],  # several fingerprint blocks and tiles
        "strided_slice": r(200, 300)[::3, ::2],
        "offset_view": r(50, 50)[1:, 3:],
        "expand": r(7, 1).expand(7, 1000),
        "expand_inner": r(5, 1, 9).expand(5, 4, 9),
        "channels_last": r(2, 3, 17, 19).to(memory_format=torch.channels_last),
        "scalar_of_view": r(5)[2],
        "size_one_dims": r(4, 1, 6, 1, 8)[:, :, 1:5],
        "half_rows": r(90, 31, dtype=torch.float16)[:, 1:30],
        "half_odd": r(33, 3, dtype=torch.float16)[:, :1],  # 66 bytes: a partial last word
        "bfloat16_rows": r(64, 65, dtype=torch.bfloat16)[1:, 1:],
        "float64_every_other": r(333, 31, dtype=torch.float64)[:, ::2],
        "int8_rows": torch.randint(-128, 127, (301, 77), generator=g, dtype=torch.int8)[:, 3:],
        "int64_steps": torch.randint(-(2**62), 2**62, (40, 60), generator=g)[::2, 1::3],
        "nan_inf_rows": torch.tensor([[1.0, float("nan"), 3.0, float("inf")]] * 9)[:, 1:],
        "transposed": r(300, 70).t(),  # declined: torch copies, the pass reads the copy
        "permuted": r(4, 5, 6, 7).permute(2, 0, 3, 1),  # declined
    }


VIEWS = _views()


def _copy_bytes(t: torch.Tensor) -> np.ndarray:
    """The C-order bytes of any tensor (a one-element view may be "contiguous" with any
    stride, which ``view(torch.uint8)`` refuses)."""
    return _bytes(torch.empty(t.shape, dtype=t.dtype).copy_(t))


@needs_numba
@pytest.mark.parametrize("name", list(VIEWS), ids=list(VIEWS))
def test_views_are_gathered_in_one_pass(name):
    """A view whose innermost dimension steps at most a cache line is gathered in C order by
    the fused pass itself: the copy holds the view's bytes, and the stats and fingerprint are
    those of the statistics pass over the contiguous copy, bit for bit (and the fingerprint
    the format's); a statistics-only capture of the view gives the same. Transposed views are
    declined (torch copies them)."""
    x = VIEWS[name]
    c = x.contiguous()
    dst, addr = _slot(x)
    got = snapshot.copy_and_stats(x, dst, addr)
    assert repr(stats_on_cpu(x)) == repr(stats_on_cpu(c))
    if name in ("transposed", "permuted"):
        assert got is None and snapshot._runs(x) is None
        return
    assert not x.is_contiguous() or x.data_ptr() % 8 or x.dim() == 0
    assert got is not None
    assert repr(got) == repr(stats_on_cpu(c))
    assert got[1] == fingerprint_bytes(_copy_bytes(x))
    assert np.array_equal(_copy_bytes(dst), _copy_bytes(x))
    assert_stats_agree(got, stats_on_cpu_reference(c), c)


@needs_numba
def test_a_gathered_view_is_not_copied_by_torch(monkeypatch):
    """Full values of a row slice: one read (the fused gather), no torch copy first."""
    from graddiff.arena import ArenaPool

    x = VIEWS["row_slice_large"]
    pool = ArenaPool()
    pool._fit(x.nbytes + 64)
    arena = pool.acquire()
    copies = []
    for method in ("copy_", "contiguous", "clone"):
        orig = getattr(torch.Tensor, method)
        monkeypatch.setattr(
            torch.Tensor,
            method,
            lambda self, *a, _o=orig, _m=method, **k: copies.append(_m) or _o(self, *a, **k),
        )
    entry = capture("param", "w", x, call=0, seq=0, flags=0, keep_values=True, arena=arena)
    monkeypatch.undo()
    assert entry._summarised and not copies
    got = entry.resolve()
    assert np.array_equal(got.values.reshape(-1).view(np.uint8), _copy_bytes(x))
    assert repr((got.stats, got.fingerprint)) == repr(stats_on_cpu(x.contiguous()))
    arena.release()


@needs_numba
@settings(max_examples=60, deadline=None)
@given(
    shape=st.lists(st.integers(1, 9), min_size=1, max_size=4),
    data=st.data(),
    dtype=st.sampled_from(list(FUSED)),
)
def test_any_sliced_view_gathers_like_its_copy(shape, data, dtype):
    """Random slices (start, stop, step per dimension) and expansions of random tensors: the
    gather's carry through the dimensions gives the copy's bytes and statistics exactly."""
    base = torch.randint(-100, 100, [s + 3 for s in shape]).to(dtype)
    index = []
    for s in shape:
        start = data.draw(st.integers(0, 2))
        step = data.draw(st.integers(1, 3))
        index.append(slice(start, start + s * step, step))
    x = base[tuple(index)]
    if data.draw(st.booleans()):
        x = x.unsqueeze(0).expand(3, *x.shape)
    dst, addr = _slot(x)
    got = snapshot.copy_and_stats(x, dst, addr)
    if got is None:
        assert snapshot._runs(x) is None
        return
    assert np.array_equal(_copy_bytes(dst), _copy_bytes(x))
    assert repr(got) == repr(stats_on_cpu(x.contiguous()))
