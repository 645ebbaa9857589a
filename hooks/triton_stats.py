"""Statistics and fingerprints of many accelerator tensors in two Triton kernels (UNVERIFIED on a GPU).

Data flow: device_stats (a captured CUDA tensor, or a group of them) --launch--> per-chunk
partial sums in a device arena --finalize, once per step--> one float64 row per tensor
[norm, mean, min, max, nan, inf, fp_sum, fp_pos] (the layout of ``snapshot.stats_on_device``)
--> device_stats copies the rows to a pinned host buffer.

Design (multi-tensor apply): ``_partials`` reads a chunk of ``WORDS`` 8-byte words of one
tensor per program and writes that chunk's integer sums (the fingerprint's, wrapping mod
2**64) and float64 sums, finite min/max and NaN/Inf counts. One launch covers one tensor
(``SINGLE``: the pointer is the kernel's argument) or a group of same-dtype tensors (a table
of raw addresses; each program finds its tensor by binary search over the table's first
program column). ``_finalize`` runs one program per recorded tensor over all of a step's
rows and adds each tensor's partials in a fixed order, so the float results are deterministic
for a given device and the integer ones are exact on any device.

The fingerprint is ``graddiff.format.fingerprint_bytes``: the tensor's elements are read as
their integer bits and packed little-endian into int64 words (the zero-padded partial last
word falls out of the masked loads), ``fp_sum`` is the sum of the words and ``fp_pos`` the sum
of ``word * ((word_index >> shift) + 1)``, shift 0 for tensors of at most ``FP_SMALL_BYTES``
and 6 (64-word blocks) above, which equals the format's per-block formula mod 2**64 (as in
``hooks/fused.py``). Statistics follow the CPU path's conventions (``hooks/snapshot.py``):
sums in float64; min/max over the finite values (NaN when there are none); for float32,
float16 and bfloat16 a sum of squares (or sum) beyond float32's range is reported as inf, as
float32 summation gives.

Imported only when a CUDA tensor is captured and ``triton`` imports; ``kernels()`` builds the
two kernels with ``triton.jit`` when first called, which reads ``TRITON_INTERPRET`` then
(Triton decides at decoration time): the tests build them under the interpreter and run them on
CPU tensors. Never run on a GPU by the author: see docs/performance.md.
"""

from __future__ import annotations

import contextlib
import threading
from typing import Any, Optional

import torch
import triton.language as tl

from ..format import FP_SMALL_BYTES, fp_block_words
from .snapshot import _unpack_device_stats as unpack  # a host row to (stats, fingerprint)

#: 8-byte words read by one ``_partials`` program (8 KiB).
WORDS = 1024
#: Partial rows one ``_finalize`` program adds per iteration.
FINAL_BLOCK = 128

#: dtype -> (integer dtype of the same width, float code for the kernel: 0 float16, 1 bfloat16,
#: 2 float32, 3 float64, float32-accumulated convention flag)
DTYPES: dict[torch.dtype, tuple[torch.dtype, int, int]] = {
    torch.float16: (torch.int16, 0, 1),
    torch.bfloat16: (torch.int16, 1, 1),
    torch.float32: (torch.int32, 2, 1),
    torch.float64: (torch.int64, 3, 0),
}
# A group launch's tensor table has 6 int64 columns: address, numel, first program, shift,
# row, float32-convention flag.

_SCALARS = ["numel_arg", "shift_arg", "base", "row_arg", "flag_arg", "n_tensors"]
_lock = threading.Lock()
_built: dict[bool, Any] = {}


# The kernels, as plain functions: ``kernels()`` decorates them with ``triton.jit`` when first
# called in a mode (compiled, or interpreted under TRITON_INTERPRET=1).


def _partials(
    x_ptr,
    tab_ptr,
    part_i,
    part_f,
    desc,
    numel_arg,
    shift_arg,
    base,
    row_arg,
    flag_arg,
    n_tensors,
    INT_T: tl.constexpr,
    FCODE: tl.constexpr,
    PER_WORD: tl.constexpr,
    WORDS: tl.constexpr,
    SINGLE: tl.constexpr,
):
    pid = tl.program_id(0).to(tl.int64)
    if SINGLE:
        ptr = x_ptr
        numel = numel_arg.to(tl.int64)
        shift = shift_arg.to(tl.int64)
        chunk = pid
        row = row_arg.to(tl.int64)
        flag = flag_arg.to(tl.int64)
    else:
        # The tensor of this program: the last table row whose first program <= pid.
        lo = tl.zeros((), tl.int64)
        hi = n_tensors.to(tl.int64) - 1
        while lo < hi:
            mid = (lo + hi + 1) // 2
            first_mid = tl.load(tab_ptr + mid * 6 + 2)
            ok = first_mid <= pid
            lo = tl.where(ok, mid, lo)
            hi = tl.where(ok, hi, mid - 1)
        t = lo
        ptr = tl.load(tab_ptr + t * 6).to(tl.pointer_type(INT_T))
        numel = tl.load(tab_ptr + t * 6 + 1)
        chunk = pid - tl.load(tab_ptr + t * 6 + 2)
        shift = tl.load(tab_ptr + t * 6 + 3)
        row = tl.load(tab_ptr + t * 6 + 4)
        flag = tl.load(tab_ptr + t * 6 + 5)
    widx = chunk * WORDS + tl.arange(0, WORDS).to(tl.int64)
    word = tl.zeros((WORDS,), tl.int64)
    f_sum = tl.zeros((), tl.float64)
    f_sq = tl.zeros((), tl.float64)
    f_min = tl.full((), float("inf"), tl.float64)
    f_max = tl.full((), float("-inf"), tl.float64)
    n_nan = tl.zeros((), tl.int64)
    n_inf = tl.zeros((), tl.int64)
    for e in tl.static_range(PER_WORD):
        idx = widx * PER_WORD + e
        m = idx < numel
        bits = tl.load(ptr + idx, mask=m, other=0)
        if PER_WORD == 1:
            word = bits.to(tl.int64)
        elif PER_WORD == 2:
            word = word | (bits.to(tl.uint32, bitcast=True).to(tl.int64) << (32 * e))
        else:
            word = word | (bits.to(tl.uint16, bitcast=True).to(tl.int64) << (16 * e))
        if FCODE == 0:
            v = bits.to(tl.float16, bitcast=True).to(tl.float32).to(tl.float64)
        elif FCODE == 1:  # bfloat16: its bits are the top half of a float32's
            v = (
                (bits.to(tl.uint16, bitcast=True).to(tl.uint32) << 16)
                .to(tl.float32, bitcast=True)
                .to(tl.float64)
            )
        elif FCODE == 2:
            v = bits.to(tl.float32, bitcast=True).to(tl.float64)
        else:
            v = bits.to(tl.float64, bitcast=True)
        is_nan = v != v
        is_inf = tl.abs(v) == float("inf")
        fin = m & (tl.abs(v) < float("inf"))
        f_sum += tl.sum(tl.where(m, v, 0.0))
        f_sq += tl.sum(tl.where(m, v * v, 0.0))
        f_min = tl.minimum(f_min, tl.min(tl.where(fin, v, float("inf"))))
        f_max = tl.maximum(f_max, tl.max(tl.where(fin, v, float("-inf"))))
        n_nan += tl.sum((m & is_nan).to(tl.int64))
        n_inf += tl.sum((m & is_inf).to(tl.int64))
    weight = (widx >> shift) + 1
    out = base + pid
    tl.store(part_i + out * 4, tl.sum(word))
    tl.store(part_i + out * 4 + 1, tl.sum(word * weight))
    tl.store(part_i + out * 4 + 2, n_nan)
    tl.store(part_i + out * 4 + 3, n_inf)
    tl.store(part_f + out * 4, f_sum)
    tl.store(part_f + out * 4 + 1, f_sq)
    tl.store(part_f + out * 4 + 2, f_min)
    tl.store(part_f + out * 4 + 3, f_max)
    if chunk == 0:  # the tensor's descriptor for _finalize: first partial, count, numel, flag
        n_words = (numel * (8 // PER_WORD) + 7) // 8
        n_chunks = tl.maximum((n_words + WORDS - 1) // WORDS, 1)
        tl.store(desc + row * 4, out)
        tl.store(desc + row * 4 + 1, n_chunks)
        tl.store(desc + row * 4 + 2, numel)
        tl.store(desc + row * 4 + 3, flag)


def _finalize(desc, part_i, part_f, rows_i, rows_f, BLOCK: tl.constexpr):
    r = tl.program_id(0).to(tl.int64)
    first = tl.load(desc + r * 4)
    n = tl.load(desc + r * 4 + 1)
    numel = tl.load(desc + r * 4 + 2)
    flag = tl.load(desc + r * 4 + 3)
    s_sum = tl.zeros((), tl.int64)
    s_pos = tl.zeros((), tl.int64)
    n_nan = tl.zeros((), tl.int64)
    n_inf = tl.zeros((), tl.int64)
    f_sum = tl.zeros((), tl.float64)
    f_sq = tl.zeros((), tl.float64)
    f_min = tl.full((), float("inf"), tl.float64)
    f_max = tl.full((), float("-inf"), tl.float64)
    offs = tl.arange(0, BLOCK).to(tl.int64)
    for k in range(0, n, BLOCK):  # a fixed order: deterministic float sums
        m = k + offs < n
        p = first + k + offs
        s_sum += tl.sum(tl.load(part_i + p * 4, mask=m, other=0))
        s_pos += tl.sum(tl.load(part_i + p * 4 + 1, mask=m, other=0))
        n_nan += tl.sum(tl.load(part_i + p * 4 + 2, mask=m, other=0))
        n_inf += tl.sum(tl.load(part_i + p * 4 + 3, mask=m, other=0))
        f_sum += tl.sum(tl.load(part_f + p * 4, mask=m, other=0.0))
        f_sq += tl.sum(tl.load(part_f + p * 4 + 1, mask=m, other=0.0))
        f_min = tl.minimum(f_min, tl.min(tl.load(part_f + p * 4 + 2, mask=m, other=float("inf"))))
        f_max = tl.maximum(f_max, tl.max(tl.load(part_f + p * 4 + 3, mask=m, other=float("-inf"))))
    big = 3.4028234663852886e38  # float32 max
    norm = tl.sqrt(f_sq)
    norm = tl.where((flag != 0) & (f_sq > big), float("inf"), norm)
    mean = f_sum / tl.maximum(numel, 1).to(tl.float64)
    mean = tl.where((flag != 0) & (f_sum > big), float("inf"), mean)
    mean = tl.where((flag != 0) & (f_sum < -big), float("-inf"), mean)
    none_finite = numel - n_nan - n_inf == 0
    f_min = tl.where(none_finite, float("nan"), f_min)
    f_max = tl.where(none_finite, float("nan"), f_max)
    empty = numel == 0
    zero = tl.zeros((), tl.float64)
    tl.store(rows_f + r * 8, tl.where(empty, zero, norm))
    tl.store(rows_f + r * 8 + 1, tl.where(empty, zero, mean))
    tl.store(rows_f + r * 8 + 2, tl.where(empty, zero, f_min))
    tl.store(rows_f + r * 8 + 3, tl.where(empty, zero, f_max))
    tl.store(rows_f + r * 8 + 4, n_nan.to(tl.float64))
    tl.store(rows_f + r * 8 + 5, n_inf.to(tl.float64))
    tl.store(rows_i + r * 8 + 6, s_sum)
    tl.store(rows_i + r * 8 + 7, s_pos)


def kernels() -> tuple[Any, Any]:
    """(partials, finalize), decorated by ``triton.jit`` on first use in this mode (compiled
    or interpreted, as ``TRITON_INTERPRET`` says now). Raises ImportError without triton."""
    import triton

    interpret = bool(triton.knobs.runtime.interpret)
    got = _built.get(interpret)
    if got is None:
        with _lock:
            got = _built.get(interpret)
            if got is None:
                # Integer arguments unspecialised: Triton would otherwise compile a variant per
                # value pattern (a 1 becomes a constant; multiples of 16 get hints), i.e. new
                # compilations in the middle of training; x_ptr may be any element offset.
                part = triton.jit(
                    _partials,
                    do_not_specialize=_SCALARS,
                    do_not_specialize_on_alignment=["x_ptr"],
                )
                got = _built[interpret] = (part, triton.jit(_finalize))
    return got


def supported(x: torch.Tensor) -> bool:
    return x.dtype in DTYPES


def n_chunks(numel: int, itemsize: int, words: int = WORDS) -> int:
    """Programs (and partial rows) for a tensor: one per ``words`` words, at least one."""
    n_words = (numel * itemsize + 7) // 8
    return max(-(-n_words // words), 1)


def shift_for(numel: int, itemsize: int) -> int:
    return fp_block_words(numel * itemsize).bit_length() - 1  # 0, or 6 for 64-word blocks


def int_view(x: torch.Tensor) -> torch.Tensor:
    """A contiguous 1-D view of ``x``'s elements as integers of their width (copies only a
    non-contiguous tensor)."""
    if not x.is_contiguous():
        x = x.contiguous()
    return x.reshape(-1).view(DTYPES[x.dtype][0])


class StepRows:
    """One device's (one stream's) arenas: partial rows, descriptors and result rows of the
    tensors captured in the current step; reused across steps (stream order makes the reuse
    safe: a step's kernels and copies run before the next step's on the same stream).

    ``launch`` starts the partials of one tensor or a same-dtype group now, on the current
    stream, and returns their row numbers; ``finalize`` reduces every row of the step in one
    launch and returns the rows (a view of the arena, valid until the next step's launches)."""

    def __init__(self, device: torch.device, words: int = WORDS) -> None:
        self.device = device
        self.words = words
        self.rows = 0
        self.parts = 0
        self._part_i = torch.empty((0, 4), dtype=torch.int64, device=device)
        self._part_f = torch.empty((0, 4), dtype=torch.float64, device=device)
        self._desc = torch.empty((0, 4), dtype=torch.int64, device=device)
        self._out = torch.empty((0, 8), dtype=torch.float64, device=device)
        self.launches = 0

    def _reserve(self, parts: int, rows: int) -> None:
        """Grow the arenas (a larger one, the used prefix copied over in stream order)."""
        need_p, need_r = self.parts + parts, self.rows + rows
        if need_p > self._part_i.shape[0]:
            cap = max(need_p, 2 * self._part_i.shape[0], 256)
            self._part_i = _grown(self._part_i, cap, self.parts)
            self._part_f = _grown(self._part_f, cap, self.parts)
        if need_r > self._desc.shape[0]:
            cap = max(need_r, 2 * self._desc.shape[0], 64)
            self._desc = _grown(self._desc, cap, self.rows)
            self._out = torch.empty((cap, 8), dtype=torch.float64, device=self.device)

    def launch(self, xs: list[torch.Tensor]) -> list[int]:
        """Partials of ``xs`` (tensors of one supported dtype), in one kernel launch on the
        current stream; returns their rows. A group goes through a table of addresses (one
        non-blocking host-to-device copy from pinned memory); one tensor needs none."""
        dtype = xs[0].dtype
        int_t, fcode, flag = DTYPES[dtype]
        itemsize = xs[0].element_size()
        views = [int_view(x) for x in xs]
        chunks = [n_chunks(v.numel(), itemsize, self.words) for v in views]
        total = sum(chunks)
        self._reserve(total, len(xs))
        part, _ = kernels()
        rows = list(range(self.rows, self.rows + len(xs)))
        consts = dict(INT_T=_tl_dtype(int_t), FCODE=fcode, PER_WORD=8 // itemsize, WORDS=self.words)
        if len(xs) == 1:
            v = views[0]
            n = v.numel()
            part[(total,)](
                v, self._desc, self._part_i, self._part_f, self._desc,
                n, shift_for(n, itemsize), self.parts, rows[0], flag, 1, SINGLE=True, **consts,
            )  # fmt: skip
        else:
            spec, first = [], 0
            for v, c, r in zip(views, chunks, rows):
                n = v.numel()
                spec.append([v.data_ptr(), n, first, shift_for(n, itemsize), r, flag])
                first += c
            table = torch.tensor(spec, dtype=torch.int64)
            if self.device.type == "cuda":  # pinned: the copy below does not sync the host
                table = table.pin_memory()
            tab = table.to(self.device, non_blocking=True)
            part[(total,)](
                views[0], tab, self._part_i, self._part_f, self._desc,
                0, 0, self.parts, 0, 0, len(xs), SINGLE=False, **consts,
            )  # fmt: skip
        self.launches += 1
        self.parts += total
        self.rows += len(xs)
        return rows

    def finalize(self) -> torch.Tensor:
        """One launch over every row of the step; returns rows[:n] (float64, n x 8) and starts
        a new step."""
        n = self.rows
        if n:
            _, fin = kernels()
            fin[(n,)](
                self._desc,
                self._part_i,
                self._part_f,
                self._out.view(torch.int64),
                self._out,
                BLOCK=FINAL_BLOCK,
            )
            self.launches += 1
        out = self._out[:n]
        self.rows = self.parts = 0
        return out


def _grown(t: torch.Tensor, cap: int, used: int) -> torch.Tensor:
    new = torch.empty((cap,) + tuple(t.shape[1:]), dtype=t.dtype, device=t.device)
    if used:
        new[:used].copy_(t[:used])
    return new


def _tl_dtype(int_t: torch.dtype):
    return {torch.int16: tl.int16, torch.int32: tl.int32, torch.int64: tl.int64}[int_t]


def _check_tensors(dtype: torch.dtype) -> list[torch.Tensor]:
    """CPU tensors that exercise every branch: empty, one element, a partial last word, many
    chunks, both fingerprint block sizes, NaN, ±Inf, -0.0, subnormals. No RNG is used."""
    n_big = FP_SMALL_BYTES // torch.empty((), dtype=dtype).element_size() + 3 * WORDS + 5
    sizes = [0, 1, 3, 7, 1000, n_big]
    out = []
    for i, n in enumerate(sizes):
        k = torch.arange(n, dtype=torch.float64)
        x = (torch.sin(k * (0.37 + i)) * (10.0 ** (i % 3))).to(dtype)
        out.append(x)
    special = torch.tensor([1.5, float("nan"), -0.0, float("inf"), -2.0, float("-inf"), 1e-40])
    out.append(special.to(dtype))
    out.append(torch.full((5,), float("nan")).to(dtype))
    return out


def self_check(device: torch.device, dtype: torch.dtype, words: int = WORDS) -> Optional[str]:
    """Run both kernels for ``dtype`` on ``device`` (compiling them) over ``_check_tensors``,
    one at a time and as a group, and compare with the CPU path: the fingerprint bit for bit,
    min/max and NaN/Inf counts exactly, norm within 1e-9 relative of float64 arithmetic and
    mean within 1e-9 of the root mean square. None when they agree,
    else what differed. On CUDA everything runs on a new side stream and only that stream is
    waited for."""
    from .snapshot import stats_on_cpu_reference

    stream = torch.cuda.Stream(device) if device.type == "cuda" else None
    ctx = torch.cuda.stream(stream) if stream is not None else contextlib.nullcontext()
    with ctx:
        cpu = _check_tensors(dtype)
        xs = [x.to(device) for x in cpu]
        rows = StepRows(device, words)
        single = [rows.launch([x])[0] for x in xs]
        grouped = rows.launch(xs)
        got = rows.finalize().to("cpu")
    if stream is not None:
        stream.synchronize()
    for x, a, b in zip(cpu, single, grouped):
        want_stats, want_fp = stats_on_cpu_reference(x)
        for r in (a, b):
            stats, fp = unpack(got[r])
            what = f"{dtype} x {x.numel()}"
            if fp != want_fp:
                return f"fingerprint of {what}: {fp} != {want_fp}"
            if stats[2:] != want_stats[2:] and not _same_nan(stats[2:4], want_stats[2:4]):
                return f"min/max/counts of {what}: {stats[2:]} != {want_stats[2:]}"
            if not _close64(stats[:2], x):
                return f"norm/mean of {what}: {stats[:2]} != {want_stats[:2]}"
    return None


def _close64(norm_mean: tuple, x: torch.Tensor, rtol: float = 1e-9) -> bool:
    """Do (norm, mean) agree with float64 arithmetic on ``x`` (non-finite ones exactly)?"""
    import math

    if not x.numel():
        return norm_mean == (0.0, 0.0)
    xd = x.to(torch.float64)
    norm, mean = float(torch.linalg.vector_norm(xd)), float(xd.mean())
    if not (math.isfinite(norm) and math.isfinite(mean)):
        return _same_nan(norm_mean, (norm, mean))
    rms = norm / math.sqrt(x.numel())
    return abs(norm_mean[0] - norm) <= rtol * norm and abs(norm_mean[1] - mean) <= rtol * rms


def _same_nan(a: tuple, b: tuple) -> bool:
    import math

    return len(a) == len(b) and all(
        (math.isnan(x) and math.isnan(y)) or x == y for x, y in zip(a, b)
    )
