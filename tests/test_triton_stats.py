"""The Triton kernels of the accelerator path, run by Triton's interpreter on CPU tensors.

No GPU on CI: ``TRITON_INTERPRET=1`` makes ``triton.jit`` build interpreted kernels, and the
interpreter runs each program with numpy on the tensors' own memory. Triton reads the variable
when a function is decorated, and its own library (``tl.sum``, ``tl.zeros``, ...) is decorated
when ``triton.language`` is first imported, so the variable must be set before triton is
imported: the tests below run in a fresh pytest process started with it
(``test_the_kernels_under_the_interpreter``), and are skipped in the outer one. So
the kernels' logic is checked here bit for bit: the fingerprint equals
``graddiff.format.fingerprint_bytes``, the torch-op device path's and the numba kernel's; min/max
and NaN/Inf counts equal the CPU path's; norm and mean agree with float64 arithmetic to
rounding. What the interpreter cannot show (GPU code generation, int64 wrap-around in the
compiled reductions, streams and pinned copies) is checked by ``benchmarks/gpu_check.py``.

Sizes are small (the interpreter runs one program at a time, ~10 ms each); ``words`` is set
small so that small tensors still span many programs.
"""

from __future__ import annotations

import math
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

pytest.importorskip("triton")

from graddiff.format import FP_SMALL_BYTES, fingerprint_bytes  # noqa: E402
from graddiff.hooks import device_stats, fused, triton_stats  # noqa: E402
from graddiff.hooks.device_stats import RING, DeviceStatsBatch  # noqa: E402
from graddiff.hooks.snapshot import (  # noqa: E402
    PendingEntry,
    capture_on_device,
    fingerprint_parts,
    stats_on_cpu,
    stats_on_cpu_reference,
)

DTYPES = (torch.float32, torch.float16, torch.bfloat16, torch.float64)
RTOL_FLOAT64 = 1e-9
INTERPRETED = os.environ.get("TRITON_INTERPRET") == "1"


def test_the_kernels_under_the_interpreter():
    """Every other test of this file, in a fresh process with TRITON_INTERPRET=1."""
    if INTERPRETED:
        pytest.skip("this is the interpreted process")
    env = dict(os.environ, TRITON_INTERPRET="1")
    root = Path(__file__).resolve().parents[1]
    cmd = [sys.executable, "-m", "pytest", "-q", "-x", "-rs", "-p", "no:cacheprovider", __file__]
    r = subprocess.run(cmd, cwd=root, env=env, capture_output=True, text=True, timeout=900)
    assert r.returncode == 0, r.stdout[-6000:] + r.stderr[-3000:]
    assert " passed" in r.stdout, r.stdout
    skips = [line for line in r.stdout.splitlines() if line.startswith("SKIPPED")]
    outer_only = ("this is the interpreted process", "kernels are interpreted in this process")
    assert all(any(why in line for why in outer_only) for line in skips), skips


def _cuda_signature(single: bool, int_t: str) -> dict[str, str]:
    scalars = dict.fromkeys(triton_stats._SCALARS, "i32")  # as Triton types ints below 2**31
    pointers = {"tab_ptr": "*i64", "part_i": "*i64", "part_f": "*fp64", "desc": "*i64"}
    consts = dict.fromkeys(("INT_T", "FCODE", "PER_WORD", "WORDS", "SINGLE"), "constexpr")
    return {"x_ptr": f"*i{int_t[3:]}", **pointers, **scalars, **consts}


@pytest.mark.parametrize("capability", (90,))  # sm_90: H100/H200 (75 and 80: docs/performance.md)
def test_the_kernels_compile_for_cuda_targets(capability, tmp_path, monkeypatch):
    """No GPU is needed to compile: Triton lowers every kernel variant graddiff launches (4
    dtypes, one tensor or a group, and the reduction) to a cubin with its bundled ptxas. This
    catches what the interpreter cannot (types, constexpr use, fp64 and int64 lowering)."""
    if INTERPRETED:
        pytest.skip("kernels are interpreted in this process")
    import triton
    import triton.language as tl
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    monkeypatch.setenv("TRITON_CACHE_DIR", str(tmp_path))  # compile, do not reuse a cache
    part, fin = triton_stats.kernels()
    target = GPUTarget("cuda", capability, 32)
    for dtype, (int_t, fcode, _) in triton_stats.DTYPES.items():
        name = str(int_t).replace("torch.", "")
        for single in (True, False):
            consts = {
                "INT_T": getattr(tl, name),
                "FCODE": fcode,
                "PER_WORD": 8 // torch.empty((), dtype=dtype).element_size(),
                "WORDS": triton_stats.WORDS,
                "SINGLE": single,
            }
            src = ASTSource(part, _cuda_signature(single, name), consts)
            assert triton.compile(src, target=target).asm["cubin"], (dtype, single)
    sig = {"desc": "*i64", "part_i": "*i64", "part_f": "*fp64", "rows_i": "*i64"}
    sig |= {"rows_f": "*fp64", "BLOCK": "constexpr"}
    src = ASTSource(fin, sig, {"BLOCK": triton_stats.FINAL_BLOCK})
    assert triton.compile(src, target=target).asm["cubin"]


OUTER = ("test_the_kernels_under_the_interpreter", "test_the_kernels_compile_for_cuda_targets")


@pytest.fixture(autouse=True)
def interpreted(request, monkeypatch):
    """Only in the interpreted process; the device path's one-time state restored after each."""
    if not INTERPRETED and request.node.originalname not in OUTER:
        pytest.skip("runs in the interpreted process (test_the_kernels_under_the_interpreter)")
    monkeypatch.delenv("GRADDIFF_NO_TRITON", raising=False)
    monkeypatch.setattr(device_stats, "_TRITON", {"module": None, "failed": None})
    monkeypatch.setattr(device_stats, "_CHECKED", {})
    # The interpreter computes with numpy, which warns where IEEE arithmetic makes a NaN or an
    # Inf (inf + -inf in a sum); the compiled kernel does the same arithmetic silently.
    with np.errstate(all="ignore"):
        yield


def _tensors(dtype: torch.dtype) -> list[torch.Tensor]:
    """Empty, one element, sizes around words and chunks, both fingerprint block sizes."""
    g = torch.Generator().manual_seed(7)
    item = torch.empty((), dtype=dtype).element_size()
    big = FP_SMALL_BYTES // item + 77  # just above 32 KiB: 64-word blocks, partial block
    sizes = [0, 1, 3, 5, 7, 33, 64 * 8 // item + 1, FP_SMALL_BYTES // item, big]
    out = [(torch.randn(n, generator=g) * 3).to(dtype) for n in sizes]
    out.append((torch.randn(6, 7, generator=g)).to(dtype).t())  # non-contiguous
    out.append(torch.tensor(2.5, dtype=dtype))  # 0-d
    return out


def _special(dtype: torch.dtype) -> list[torch.Tensor]:
    vals = [1.5, float("nan"), -0.0, float("inf"), -2.0, float("-inf"), 0.0, 1e-40, -3.25]
    return [
        torch.tensor(vals).to(dtype),
        torch.tensor([float("nan")] * 3).to(dtype),
        torch.tensor([float("inf"), float("-inf")]).to(dtype),
        torch.tensor([float("inf"), 1.0, 2.0]).to(dtype),
        torch.tensor([-0.0, 0.0, -0.0]).to(dtype),
    ]


def _run(xs: list[torch.Tensor], words: int, grouped: bool) -> list[tuple]:
    rows = triton_stats.StepRows(torch.device("cpu"), words)
    got = rows.launch(xs) if grouped else [rows.launch([x])[0] for x in xs]
    out = rows.finalize().clone()
    return [triton_stats.unpack(out[r]) for r in got]


def _float64(x: torch.Tensor) -> tuple[float, float]:
    xd = x.to(torch.float64)
    return float(torch.linalg.vector_norm(xd)), float(xd.mean())


def _check(x: torch.Tensor, stats: tuple, fp: tuple[int, int]) -> None:
    raw = x.contiguous().reshape(-1)
    if x.dtype == torch.bfloat16:
        raw = raw.view(torch.int16)
    assert fp == fingerprint_bytes(raw.numpy()), (x.dtype, x.shape)
    want_stats, want_fp = stats_on_cpu_reference(x)
    assert fp == want_fp
    assert fp == tuple(int(v) % 2**64 for v in fingerprint_parts(x))  # the torch device path
    if fused.available():
        assert fp == stats_on_cpu(x)[1]  # the numba kernel's
    assert stats[4:] == want_stats[4:]  # NaN / Inf counts: exact
    for got, want in zip(stats[2:4], want_stats[2:4]):  # min / max over finite values: exact
        assert got == want or (math.isnan(got) and math.isnan(want)), (stats, want_stats)
    if not x.numel():
        assert stats == (0.0, 0.0, 0.0, 0.0, 0, 0)
        return
    norm, mean = _float64(x)
    if not (math.isfinite(norm) and math.isfinite(mean)):
        for got, want in zip(stats[:2], (norm, mean)):
            assert got == want or (math.isnan(got) and math.isnan(want))
        return
    rms = norm / math.sqrt(x.numel())
    assert abs(stats[0] - norm) <= RTOL_FLOAT64 * norm
    assert abs(stats[1] - mean) <= RTOL_FLOAT64 * rms
    # and the reference path (float32 sums for float32/16-bit tensors) to its own rounding
    assert abs(stats[0] - want_stats[0]) <= 1e-4 * norm
    assert abs(stats[1] - want_stats[1]) <= 1e-4 * rms


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_each_tensor_alone_matches_the_definition(dtype):
    xs = _tensors(dtype)
    for x, (stats, fp) in zip(xs, _run(xs, words=256, grouped=False)):
        _check(x, stats, fp)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_many_tensors_in_one_launch_match_the_definition(dtype):
    xs = _tensors(dtype) + _special(dtype)
    rows = triton_stats.StepRows(
        torch.device("cpu"), 512 // torch.empty((), dtype=dtype).element_size()
    )
    got = rows.launch(xs)
    assert rows.launches == 1  # one launch for the whole group
    out = rows.finalize()
    assert rows.launches == 2  # and one reduction for the step
    for x, r in zip(xs, got):
        _check(x, *triton_stats.unpack(out[r]))


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_nan_inf_signed_zero_and_subnormals(dtype):
    xs = _special(dtype)
    for x, (stats, fp) in zip(xs, _run(xs, words=1, grouped=False)):  # one word per program
        _check(x, stats, fp)
    nan_row = _run([xs[1]], words=8, grouped=False)[0][0]
    assert math.isnan(nan_row[2]) and math.isnan(nan_row[3]) and nan_row[4] == 3


def test_the_default_chunk_size_and_float32_overflow_convention():
    g = torch.Generator().manual_seed(3)
    xs = [torch.randn(40_000, generator=g), torch.full((4,), 3e38)]  # 5 programs; sum > f32 max
    (stats, fp), (big, big_fp) = _run(xs, words=triton_stats.WORDS, grouped=True)
    _check(xs[0], stats, fp)
    # The reference sums float32 in float32, where these sums overflow: the kernel says so too.
    assert big[0] == math.inf and big[1] == math.inf
    assert big_fp == stats_on_cpu_reference(xs[1])[1]
    assert stats_on_cpu_reference(xs[1])[0][:2] == (math.inf, math.inf)
    f64 = _run([xs[1].double()], words=4, grouped=False)[0][0]
    assert math.isfinite(f64[0]) and math.isfinite(f64[1])  # float64 tensors: no such rule


def test_results_are_deterministic_and_arenas_are_reused_and_grown():
    g = torch.Generator().manual_seed(1)
    xs = [torch.randn(n, generator=g) for n in (3, 100, 17, 150)]
    rows = triton_stats.StepRows(torch.device("cpu"), 16)
    first = None
    for step in range(3):
        for x in xs[:2]:
            rows.launch([x])
        rows.launch(xs[2:] * (step + 1))  # the group grows: arenas grow mid-step
        out = rows.finalize().clone()
        assert out.shape[0] == 2 + 2 * (step + 1)
        if first is None:
            first = out
        assert torch.equal(out[:4].view(torch.int64), first[:4].view(torch.int64))  # bitwise
        for x, r in zip(xs, range(4)):
            _check(x, *triton_stats.unpack(out[r]))


@pytest.mark.parametrize("dtype", (torch.float32, torch.bfloat16), ids=str)
def test_the_self_check_passes_under_the_interpreter(dtype):
    assert triton_stats.self_check(torch.device("cpu"), dtype, words=256) is None


def test_the_self_check_catches_a_wrong_kernel(monkeypatch):
    """Per-word weights for every size (a fingerprint that differs above 32 KiB) must fail."""
    monkeypatch.setattr(triton_stats, "shift_for", lambda numel, itemsize: 0)
    problem = triton_stats.self_check(torch.device("cpu"), torch.float64, words=512)
    assert problem is not None and problem.startswith("fingerprint of torch.float64 x 7173")


def _entry(x: torch.Tensor) -> PendingEntry:
    return PendingEntry("param", "w", 0, str(x.dtype), tuple(x.shape), (0.0,) * 6, (0, 0))


def test_batch_wiring_single_grouped_and_torch_rows_over_many_steps():
    """Captures on the Triton path (alone and grouped) and on the torch-op path (int64) share
    one host buffer per step; values are those at capture, across more steps than the ring."""
    g = torch.Generator().manual_seed(0)
    batch = DeviceStatsBatch(triton=True)
    seen = set()
    for step in range(RING + 2):
        xs = [
            torch.randn(5 + step, generator=g),
            torch.randint(-9, 9, (7,), generator=g),  # not a Triton dtype: torch ops
            torch.randn(3, 50, generator=g).to(torch.bfloat16),
            torch.randn(4, dtype=torch.float64, generator=g),
        ]
        entries = [_entry(x) for x in xs]
        capture_on_device(entries[0], xs[0], False, batch)
        capture_on_device(entries[1], xs[1], False, batch)
        with batch.group():
            capture_on_device(entries[2], xs[2], True, batch)
            capture_on_device(entries[3], xs[3], False, batch)
        assert len(batch) == 4
        originals = [x.clone() for x in xs]
        for x in xs:
            x.add_(1)  # training goes on: the statistics are those at capture
        batch.flush()
        assert len(batch) == 0
        seen.add(entries[0]._stats_host.untyped_storage().data_ptr())
        for x, e in zip(originals, entries):
            e.resolve()
            want_stats, want_fp = stats_on_cpu_reference(x)
            assert e.fingerprint == want_fp
            assert e.stats[2:] == want_stats[2:]
            np.testing.assert_allclose(e.stats[:2], want_stats[:2], rtol=1e-5)
    steps = batch._steps[(torch.device("cpu"), None)]
    # per step: one single launch, one group launch per dtype (bfloat16, float64), one reduction
    assert steps.launches == 4 * (RING + 2)
    assert len(seen) == RING


def test_a_failing_kernel_warns_once_and_the_torch_path_takes_over(monkeypatch):
    def broken(self, xs):
        raise RuntimeError("compile error (simulated)")

    monkeypatch.setattr(triton_stats.StepRows, "launch", broken)
    batch = DeviceStatsBatch(triton=True)
    xs = [torch.randn(10), torch.randn(3)]
    entries = [_entry(x) for x in xs]
    with pytest.warns(RuntimeWarning, match="Triton statistics kernels are unavailable"):
        capture_on_device(entries[0], xs[0], False, batch)
    with batch.group():  # no second warning
        capture_on_device(entries[1], xs[1], False, batch)
    batch.flush()
    for x, e in zip(xs, entries):
        e.resolve()
        assert e.fingerprint == stats_on_cpu_reference(x)[1]
    assert device_stats._TRITON["failed"].startswith("RuntimeError: compile error")


def test_a_failing_self_check_disables_the_kernels(monkeypatch):
    monkeypatch.setattr(triton_stats, "self_check", lambda device, dtype: "fingerprint differs")
    batch = DeviceStatsBatch(triton=True)
    x = torch.randn(5)
    e = _entry(x)
    with pytest.warns(RuntimeWarning, match="self-check failed: fingerprint differs"):
        capture_on_device(e, x, False, batch)
    batch.flush()
    e.resolve()
    assert e.fingerprint == stats_on_cpu_reference(x)[1]


def test_disabled_by_environment_and_cpu_tensors_by_default(monkeypatch):
    x = torch.randn(5)
    assert not DeviceStatsBatch().add_tensor(_entry(x), x)  # CPU tensors: only when forced
    monkeypatch.setenv("GRADDIFF_NO_TRITON", "1")
    assert not DeviceStatsBatch(triton=True).add_tensor(_entry(x), x)
    assert device_stats.triton_unavailable_reason(x.device) == "disabled by GRADDIFF_NO_TRITON"


# -- deferral: a step's hook captures in a few launches (DeviceStatsBatch.add_tensor) -------
def _hook_entry(name: str, x: torch.Tensor, kind: str = "activation") -> PendingEntry:
    return PendingEntry(kind, name, 0, str(x.dtype), tuple(x.shape), (0.0,) * 6, (0, 0))


def _launches(batch: DeviceStatsBatch) -> int:
    rows = batch._steps.get((torch.device("cpu"), None))
    return 0 if rows is None else rows.launches


def _results(entries: list[PendingEntry]) -> list[str]:
    return [repr((e.resolve().stats, e.fingerprint)) for e in entries]


def test_deferred_captures_launch_once_per_dtype_with_the_per_tensor_results():
    """The first step launches each hook capture at once and watches it; from the second,
    records seen unchanged until their settle are deferred and launched together at the
    settle (one launch per dtype), with the same results, bit for bit, as one launch each,
    and the statistics of the tensors as captured."""
    g = torch.Generator().manual_seed(1)
    batch = DeviceStatsBatch(triton=True)
    single = DeviceStatsBatch(triton=True)
    per_step = []
    for _step in range(3):
        xs = [torch.randn(40 + 7 * i, generator=g) for i in range(5)]
        xs.append(torch.randn(9, 30, generator=g).to(torch.bfloat16))
        entries = [_hook_entry(f"m{i}", x) for i, x in enumerate(xs)]
        alone = [_hook_entry(f"m{i}", x) for i, x in enumerate(xs)]
        before = _launches(batch)
        for e, x in zip(entries, xs):
            capture_on_device(e, x, False, batch)
        batch.settle()  # the forward's end
        per_step.append(_launches(batch) - before)
        for e, x in zip(alone, xs):
            single._launch([(e, x)])
        originals = [x.clone() for x in xs]
        for x in xs:
            x.mul_(3)  # after the settle: the statistics are those at capture
        batch.flush()
        single.flush()
        assert _results(entries) == _results(alone)
        for x, e in zip(originals, entries):
            assert e.fingerprint == stats_on_cpu_reference(x)[1]
    assert per_step == [6, 2, 2]  # six tensors at once, then one launch per dtype


def test_a_tensor_changed_after_its_capture_is_learned_and_summarised_at_capture():
    """ResNet's ``out += identity`` changes a captured BatchNorm output before the forward
    ends: that record is never deferred, and its statistics are those at capture."""
    batch = DeviceStatsBatch(triton=True)
    for step in range(3):
        a, b = torch.arange(50.0) + step, torch.arange(30.0) - step
        ea, eb = _hook_entry("bn", a), _hook_entry("fc", b)
        capture_on_device(ea, a, False, batch)
        want = stats_on_cpu_reference(a.clone())
        a.add_(1)  # in place, before the forward's end
        capture_on_device(eb, b, False, batch)
        assert [x is a for _, x, *_ in batch._deferred] == ([False] if step else [])
        batch.settle()
        batch.flush()
        ea.resolve()
        assert ea.fingerprint == want[1] and ea.stats[2:] == want[0][2:]
        assert eb.resolve().fingerprint == stats_on_cpu_reference(b)[1]
    assert ("activation", "bn", 0) in batch._unsafe
    assert ("activation", "fc", 0) in batch._safe


def test_a_deferred_tensor_changed_before_its_launch_is_dropped_with_a_warning():
    """A record learned safe whose tensor is changed in place before its deferred launch (the
    loop took another path) cannot be summarised as captured: dropped, with a warning, and
    summarised at capture from then on."""
    batch = DeviceStatsBatch(triton=True)
    x = torch.arange(20.0)
    capture_on_device(_hook_entry("m", x), x, False, batch)
    batch.flush()  # learned: unchanged until its settle
    y = torch.arange(20.0)
    e = _hook_entry("m", y)
    capture_on_device(e, y, False, batch)
    assert batch._deferred
    y.add_(1)
    with pytest.warns(RuntimeWarning, match="changed in place after its capture"):
        batch.flush()
    assert e.dropped and batch.take_dropped() == [e] and not batch.take_dropped()
    z = torch.arange(20.0)
    e2 = _hook_entry("m", z)
    capture_on_device(e2, z, False, batch)
    z.add_(1)
    batch.flush()
    assert e2.resolve().fingerprint == stats_on_cpu_reference(torch.arange(20.0))[1]


def test_deferred_bytes_are_capped(monkeypatch):
    """Past ``DEFER_BYTES`` of held tensors the batch settles early (the memory deferral may
    keep alive stays bounded)."""
    monkeypatch.setattr(device_stats, "DEFER_BYTES", 1000)
    batch = DeviceStatsBatch(triton=True)
    for _step in range(2):
        xs = [torch.randn(100) for _ in range(6)]  # 400 bytes each
        entries = [_hook_entry(f"m{i}", x) for i, x in enumerate(xs)]
        for e, x in zip(entries, xs):
            capture_on_device(e, x, False, batch)
            assert batch._held <= 1000
        batch.flush()
        for x, e in zip(xs, entries):
            assert e.resolve().fingerprint == stats_on_cpu_reference(x)[1]


class _Block(nn.Module):
    """Linear + BatchNorm whose output is changed in place after its hook (``out += x``),
    every step or from ``late`` on."""

    def __init__(self, width: int, late: int = 0) -> None:
        super().__init__()
        self.fc = nn.Linear(width, width)
        self.bn = nn.BatchNorm1d(width)
        self.late = late
        self.calls = 0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.bn(self.fc(x))
        if self.calls >= self.late:
            out += x
        self.calls += 1
        return torch.relu(out)


def _traced_on_the_device_path(model, batches, path, monkeypatch):
    """Train ``model`` traced in stats mode with its activations and output gradients sent
    down the accelerator path (Triton kernels under the interpreter, deferral included),
    everything else on the CPU path."""
    import graddiff
    from graddiff import recorder as recorder_module

    cpu_capture = recorder_module.capture

    def capture(kind, name, x, *, call, seq, flags, keep_values, batch, arena):
        if kind not in ("activation", "grad_output") or keep_values:
            return cpu_capture(kind, name, x, call=call, seq=seq, flags=flags,
                               keep_values=keep_values, batch=batch, arena=arena)  # fmt: skip
        e = PendingEntry(kind, name, call, "float32", tuple(x.shape), (0.0,) * 6, (0, 0))
        e.flags, e.seq = flags, seq
        capture_on_device(e, x.detach(), False, batch)
        return e

    monkeypatch.setattr(recorder_module, "capture", capture)
    with graddiff.trace(model, path, values="stats") as tr:
        tr_batch = DeviceStatsBatch(triton=True)
        _train(model, batches[:1])  # step 0 on the CPU path: the recorder exists now
        tr._recorder._device_batch = tr_batch
        _train(model, batches[1:])
    monkeypatch.undo()
    return tr_batch


def _train(model, batches):
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    for x, y in batches:
        opt.zero_grad()
        nn.functional.cross_entropy(model(x), y).backward()
        opt.step()


def _model(late: int = 0):
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(8, 16), nn.ReLU(), _Block(16, late), nn.Linear(16, 4))


def _fingerprints(path):
    import graddiff

    with graddiff.open(path) as run:
        return {
            (int(e["step"]), run._keys[int(e["record"])]): (int(e["fp_sum"]), int(e["fp_pos"]))
            for e in run.entries()
        }


def test_the_recorder_settles_deferred_captures_at_each_pass_end(tmp_path, monkeypatch):
    """End to end through the recorder: activations and output gradients deferred to the
    forward's and the backward's end give the fingerprints of the CPU path's trace of the same
    training, the in-place changed BatchNorm output included, and training is unchanged."""
    g = torch.Generator().manual_seed(5)
    batches = [(torch.randn(6, 8, generator=g), torch.randint(0, 4, (6,), generator=g))
               for _ in range(5)]  # fmt: skip
    plain = _model()
    _train(plain, batches)
    reference = _model()
    import graddiff

    with graddiff.trace(reference, tmp_path / "cpu.h5", values="stats"):
        _train(reference, batches)
    device = _model()
    batch = _traced_on_the_device_path(device, batches, tmp_path / "dev.h5", monkeypatch)
    for a, b in zip(plain.state_dict().values(), device.state_dict().values()):
        assert torch.equal(a, b)
    assert _fingerprints(tmp_path / "dev.h5") == _fingerprints(tmp_path / "cpu.h5")
    assert ("activation", "2.bn", 0) in batch._unsafe  # changed by ``out += x``
    assert ("activation", "0", 0) in batch._safe and ("grad_output", "0", 0) in batch._safe


def test_a_record_changed_before_its_deferred_launch_is_left_out_of_its_step(tmp_path, monkeypatch):
    """A BatchNorm output first changed in place at step 3, after it was learned safe, is not
    recorded at step 3 (a warning says so), recorded again from step 4, and every other record
    is unaffected."""
    g = torch.Generator().manual_seed(6)
    batches = [(torch.randn(6, 8, generator=g), torch.randint(0, 4, (6,), generator=g))
               for _ in range(5)]  # fmt: skip
    reference = _model(late=3)
    import graddiff

    with graddiff.trace(reference, tmp_path / "cpu.h5", values="stats"):
        _train(reference, batches)
    with pytest.warns(RuntimeWarning, match="'2.bn' .* changed in place after its capture"):
        _traced_on_the_device_path(_model(late=3), batches, tmp_path / "dev.h5", monkeypatch)
    want, got = _fingerprints(tmp_path / "cpu.h5"), _fingerprints(tmp_path / "dev.h5")
    missing = set(want) - set(got)
    assert {(s, k.kind, k.name) for s, k in missing} == {(3, "activation", "2.bn")}
    assert got == {k: v for k, v in want.items() if k not in missing}
