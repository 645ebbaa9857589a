"""Turn a live tensor into a record: exact fingerprint and stats where the tensor lives.

Data flow: hooks --tensor--> snapshot --EntryData / PendingEntry--> recorder --> writer.
The fingerprint here must equal ``graddiff.format.fingerprint_bytes`` of the same bytes, bit for
bit: the reader recomputes it to verify stored values, and the differ trusts it for equality.

CPU tensors that keep full values are copied into the step's arena on the hot path, by the
fused kernel that summarises them in the same pass (``copy_and_stats``); those it does not read
(views, other dtypes, no numba) are copied by torch and summarised on the writer thread.
Stats-only CPU tensors are summarised in place (no copy). On CPU the summary is
one fused pass (``hooks/fused.py``, numba) for the dtypes in ``_FUSED_DTYPES``; every other
dtype, and every tensor when numba is absent, takes the pure-torch reference path
(``stats_on_cpu_reference``), which gives the same fingerprint bit for bit. CUDA tensors are
summarised on the device and copied to pinned host memory without a sync; the writer thread
waits on a CUDA event (UNVERIFIED here: no GPU on the development machines).
"""

from __future__ import annotations

import math
from typing import Optional

import numpy as np
import torch

from .._warn import warn_user
from ..arena import Arena
from ..entries import EntryData
from ..format import FP_BLOCK_WORDS, FP_SMALL_BYTES, fp_block_words, storable_dtypes
from . import fused
from .device_stats import DeviceStatsBatch

_WEIGHTS: dict[tuple[int, torch.device], torch.Tensor] = {}


def dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).replace("torch.", "")


def _weights(n: int, device: torch.device) -> torch.Tensor:
    key = (n, device)
    w = _WEIGHTS.get(key)
    if w is None:
        if len(_WEIGHTS) > 256:
            _WEIGHTS.clear()
        w = _WEIGHTS[key] = torch.arange(1, n + 1, dtype=torch.int64, device=device)
    return w


def _as_bytes(x: torch.Tensor) -> torch.Tensor:
    """A 1-D uint8 view of a tensor's data, 8-byte aligned (copies only when it must)."""
    if not x.is_contiguous() or (x.storage_offset() * x.element_size()) % 8:
        x = x.contiguous() if not x.is_contiguous() else x.clone()
        if (x.storage_offset() * x.element_size()) % 8:
            x = x.clone()
    if x.is_complex():
        x = torch.view_as_real(x)
    return x.reshape(-1).view(torch.uint8)


def fingerprint_parts(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(fp_sum, fp_pos) as int64 tensors on x's device, no sync (see graddiff.format)."""
    b = _as_bytes(x)
    n = b.numel()
    block = fp_block_words(n)
    n_words = n // 8
    n_full = n_words // block
    words = b[: n_words * 8].view(torch.int64)
    block_sums = words[: n_full * block].view(n_full, block).sum(1)
    last = words[n_full * block :].sum()
    if n % 8:
        pad = torch.zeros(8, dtype=torch.uint8, device=b.device)
        pad[: n % 8] = b[n_words * 8 :]
        last = last + pad.view(torch.int64)[0]
    fp_sum = block_sums.sum() + last
    fp_pos = (block_sums * _weights(n_full, b.device)).sum() + (n_full + 1) * last
    return fp_sum, fp_pos


def _float_view(x: torch.Tensor) -> torch.Tensor:
    if x.is_complex():
        return x.abs()
    if not x.is_floating_point():
        return x.to(torch.float64)
    if x.dtype in (torch.float32, torch.float64):
        return x
    return x.to(torch.float32)  # half, bfloat16, float8: summarise in float32


def stats_on_device(x: torch.Tensor) -> torch.Tensor:
    """A float64 vector [norm, mean, min, max, nan, inf, fp_sum, fp_pos] with no host sync.

    fp_* are int64 bit patterns carried through float64 storage via ``view``.
    """
    fp_sum, fp_pos = fingerprint_parts(x)
    if x.numel() == 0:
        head = torch.zeros(6, dtype=torch.float64, device=x.device)
    else:
        xf = _float_view(x)
        # min/max over the finite values, as the CPU path and the kernels take them (NaN when
        # there are none: the masked min then exceeds the masked max); no host sync
        finite = torch.isfinite(xf)
        mn = torch.where(finite, xf, math.inf).amin()
        mx = torch.where(finite, xf, -math.inf).amax()
        empty = mn > mx
        mn = torch.where(empty, math.nan, mn)
        mx = torch.where(empty, math.nan, mx)
        head = torch.stack(
            [
                torch.linalg.vector_norm(xf).to(torch.float64),
                xf.mean().to(torch.float64),
                mn.to(torch.float64),
                mx.to(torch.float64),
                torch.isnan(xf).sum().to(torch.float64),
                torch.isinf(xf).sum().to(torch.float64),
            ]
        )
    fps = torch.stack([fp_sum, fp_pos]).view(torch.float64)
    return torch.cat([head, fps])


_MV_WEIGHTS: dict[int, torch.Tensor] = {}


def _mv_weights(n_full: int) -> torch.Tensor:
    """(2, n_full) int64 rows [1, 1, ...] and [1, 2, ...]: one ``mv`` gives fp_sum and fp_pos."""
    w = _MV_WEIGHTS.get(n_full)
    if w is None:
        if len(_MV_WEIGHTS) > 256:
            _MV_WEIGHTS.clear()
        w = _MV_WEIGHTS[n_full] = torch.stack(
            [torch.ones(n_full, dtype=torch.int64), torch.arange(1, n_full + 1, dtype=torch.int64)]
        )
    return w


def fingerprint_cpu(x: torch.Tensor) -> tuple[int, int]:
    """(fp_sum, fp_pos) of a CPU tensor as Python ints mod 2**64; same definition as
    :func:`fingerprint_parts` and ``graddiff.format.fingerprint_bytes``.

    The hot path of stats-only recording: one pass over the data (64-word block sums), then one
    small ``mv`` for both sums; the partial last block and the arithmetic mod 2**64 are done in
    Python, so a tensor costs about 4 torch calls instead of about 12 (FIELD-NOTES 7: below
    64 KiB every op is call overhead).
    """
    b = _as_bytes(x)
    n = b.numel()
    block = fp_block_words(n)
    n_words = n // 8
    n_full = n_words // block
    s = pos = last = 0
    if n_words:
        words = (b if n == n_words * 8 else b[: n_words * 8]).view(torch.int64)
        full = n_full * block
        if n_full:
            blocks = (words if n_words == full else words[:full]).view(n_full, block)
            s, pos = torch.mv(_mv_weights(n_full), blocks.sum(1)).tolist()
        if n_words > full:
            last = int(words[full:].sum())
    if n % 8:
        tail = bytes(b[n_words * 8 :].tolist())
        last += int.from_bytes(tail + bytes(8 - len(tail)), "little", signed=True)
    return (s + last) % 2**64, (pos + (n_full + 1) * last) % 2**64


# -- the fused pass (hooks/fused.py) and which dtypes take it --------------------------------
#: dtypes the fused kernel reads directly; every other dtype takes the reference path.
_FUSED_DTYPES = frozenset(
    (
        torch.float16,
        torch.bfloat16,
        torch.float32,
        torch.float64,
        torch.int64,
        torch.int32,
        torch.int16,
        torch.int8,
    )
)
#: The same dtypes by name, for ``fused.summarise_at``.
_AT_NAMES = {d: dtype_name(d) for d in _FUSED_DTYPES}
#: dtypes the reference summarises in float32 arithmetic (``_float_view``): a sum of squares
#: or a sum beyond float32's range is inf there, and the fused path reports the same.
_FLOAT32_ACCUMULATED = frozenset((torch.float32, torch.float16, torch.bfloat16))


def _fused_array(x: torch.Tensor):
    """A 1-D numpy view of ``x``'s bytes for the fused kernel, or None (dtype dispatch only)."""
    dtype = x.dtype
    if dtype not in _FUSED_DTYPES:
        return None
    try:
        if x.data_ptr() & 7 or not x.is_contiguous():
            x = _as_bytes(x).view(dtype)
        if dtype == torch.bfloat16:  # numpy has no bfloat16: its raw bits (fused reads them)
            return x.view(torch.int16).numpy().reshape(-1).view(np.uint16)
        return x.numpy().reshape(-1)
    except (RuntimeError, TypeError):  # tensor subclasses, conjugate/negative views, ...
        return None


def stats_on_cpu(
    x: torch.Tensor,
) -> tuple[tuple[float, float, float, float, int, int], tuple[int, int]]:
    """Stats and fingerprint of a CPU tensor: one fused pass where it applies, else the
    reference (:func:`stats_on_cpu_reference`). Same fingerprint bit for bit either way.

    A plain, contiguous, 8-byte-aligned tensor (nearly every tensor of a step) goes to the
    kernel by its address, with no numpy view (``fused.summarise_at``); the same kernel, so
    the same results as through :func:`fused.summarise`. Either way one call on this thread
    (no split across threads: docs/performance.md, "The 2-thread gap"), so the statistics do
    not depend on the torch thread count. ``x`` need not be detached: only its memory is read
    there, and it is detached before any torch op.
    """
    size = x.numel()
    n = size * x.element_size()
    r = None
    if n and _plain(x):
        name = _AT_NAMES.get(x.dtype)
        if name is not None:
            r = fused.summarise_at(
                x.data_ptr(), size, name, 0 if n <= FP_SMALL_BYTES else _BLOCK_SHIFT
            )
    elif n and x.dtype in _AT_NAMES and fused.available():
        runs = _runs(x)  # a view with contiguous runs: gathered and summarised in one read
        if runs is not None:
            scratch = np.empty(-(-n // 8), dtype=np.uint64)  # 8-byte aligned, for the kernel
            r = fused.summarise_strided_at(
                x.data_ptr(),
                runs[0],
                runs[1],
                _AT_NAMES[x.dtype],
                0 if n <= FP_SMALL_BYTES else _BLOCK_SHIFT,
                scratch.ctypes.data,
            )
    if r is None:
        x = x.detach()  # for numpy and torch ops (the kernel reads only the memory)
        arr = _fused_array(x) if fused.available() else None
        if arr is None:
            return stats_on_cpu_reference(x)
        n, size = arr.nbytes, arr.size
        shift = 0 if n <= FP_SMALL_BYTES else _BLOCK_SHIFT
        r = fused.summarise(arr, shift, bfloat16=x.dtype == torch.bfloat16)
        if r is None:
            return stats_on_cpu_reference(x)
    return _finish(x, r, n, size)


def _plain(x: torch.Tensor) -> bool:
    """A plain, contiguous, 8-byte-aligned tensor whose bytes are its values: the kernel can
    read it by its address."""
    return (
        type(x) in _PLAIN
        and x.is_contiguous()
        and not x.is_neg()
        and not x.is_conj()
        and not x.data_ptr() & 7
    )


def copy_and_stats(
    x: torch.Tensor, dst: torch.Tensor, dst_addr: int
) -> Optional[tuple[tuple[float, float, float, float, int, int], tuple[int, int]]]:
    """Copy CPU tensor ``x`` into ``dst`` (contiguous, same dtype and shape, 8-byte-aligned
    at ``dst_addr``) and return its stats and fingerprint, in one fused pass that reads each
    byte of ``x`` once. Bit for bit what :func:`stats_on_cpu` gives for ``x`` (the same
    kernel, in the same order). None, with nothing copied, where the kernel does not apply
    (numba absent, a dtype or a tensor it does not read): the caller copies and summarises
    on its own."""
    name = _AT_NAMES.get(x.dtype)
    if name is None or not fused.available():
        return None
    size = x.numel()
    n = size * x.element_size()
    if not n:
        return None
    shift = 0 if n <= FP_SMALL_BYTES else _BLOCK_SHIFT
    if _plain(x):
        r = fused.summarise_at(x.data_ptr(), size, name, shift, dst_addr)
    else:
        runs = _runs(x)
        if runs is None:
            return None
        r = fused.summarise_strided_at(x.data_ptr(), runs[0], runs[1], name, shift, dst_addr)
    if r is None:
        return None
    return _finish(dst, r, n, size)


#: Largest innermost stride (bytes) the fused pass gathers: up to one element per cache line,
#: lines read in order (the hardware prefetches them); wider strides are torch's.
_MAX_RUN_STRIDE = 64


def _runs(x: torch.Tensor) -> Optional[tuple[tuple[int, ...], tuple[int, ...]]]:
    """(shape, strides) of view ``x`` with dimensions of size 1 dropped and dimensions that are
    contiguous with the next merged, when the fused pass gathers it: a plain strided tensor
    (no lazy negation or conjugation) at an address aligned to its element size whose
    innermost dimension steps at most one cache line (``_MAX_RUN_STRIDE``: row and column
    slices, strided slices, offset views, ``expand``). Else None: a transposed innermost
    dimension is copied
    by torch (cache-blocked), then summarised from the copy; a gather element by element
    across rows measured 1.6x slower than that at 64 KiB and 6x at 4 MiB (power-of-two strides
    defeat the cache: docs/performance.md, "Views")."""
    if (
        type(x) not in _PLAIN
        or x.layout != torch.strided
        or x.is_neg()
        or x.is_conj()
        or x.data_ptr() % x.element_size()
    ):
        return None
    shape: list[int] = []
    strides: list[int] = []
    for size, stride in zip(x.shape, x.stride()):
        if size == 1:
            continue
        if shape and strides[-1] == stride * size:  # contiguous with the one before: merge
            shape[-1] *= size
            strides[-1] = stride
        else:
            shape.append(size)
            strides.append(stride)
    if not shape:
        return (1,), (1,)
    if strides[-1] * x.element_size() > _MAX_RUN_STRIDE:
        return None
    return tuple(shape), tuple(strides)


def _finish(
    x: torch.Tensor, r: tuple, n: int, size: int
) -> tuple[tuple[float, float, float, float, int, int], tuple[int, int]]:
    """Stats and fingerprint from the fused kernel's sums ``r`` over ``x`` (``n`` bytes,
    ``size`` elements): NaN/Inf and sums out of range go to the reference, as it reports them."""
    s, pos, total, squares, lo, hi, bad = r
    fp = (s & _MASK64, pos & _MASK64)
    if not n:
        return (0.0, 0.0, 0.0, 0.0, 0, 0), fp
    if bad or not math.isfinite(total):
        return _reference_stats(x.detach(), fp)  # NaN/Inf (counted there), a float64 overflow
    if squares < 1e-290 and (lo or hi) or squares > 1e300:
        # float64 squares under/overflow (only float64 tensors get here): torch's scaled norm
        norm = float(torch.linalg.vector_norm(x.detach().to(torch.float64)))
    else:
        norm = math.sqrt(squares)
    mean = total / size
    if x.dtype in _FLOAT32_ACCUMULATED:
        # The reference sums these in float32: a sum of squares (or a sum) beyond the float32
        # range is inf there. Report the same, so that both paths describe a tensor alike.
        if squares > _FLOAT32_MAX:
            norm = math.inf
        if abs(total) > _FLOAT32_MAX:
            mean = math.copysign(math.inf, total)
    return (norm, mean, lo, hi, 0, 0), fp


_FLOAT32_MAX = float(torch.finfo(torch.float32).max)
#: Tensor types whose memory the kernel reads by address (``nn.Parameter`` adds no storage
#: behaviour; other subclasses may, and take the checked paths).
_PLAIN = frozenset((torch.Tensor, torch.nn.Parameter))


_MASK64 = 2**64 - 1
_BLOCK_SHIFT = FP_BLOCK_WORDS.bit_length() - 1  # 64 words: weight (word index >> 6) + 1
assert 1 << _BLOCK_SHIFT == FP_BLOCK_WORDS


def stats_on_cpu_reference(
    x: torch.Tensor,
) -> tuple[tuple[float, float, float, float, int, int], tuple[int, int]]:
    """Stats and fingerprint of a CPU tensor in pure torch: the reference for the fused pass.

    Counts NaN/Inf only when the norm is not finite. Four passes over the data (block sums, norm, mean, min/max) and about ten torch calls;
    floats are checked with ``math.isfinite`` on the host values, not with more torch calls.
    """
    return _reference_stats(x, fingerprint_cpu(x))


def _reference_stats(
    x: torch.Tensor, fp: tuple[int, int]
) -> tuple[tuple[float, float, float, float, int, int], tuple[int, int]]:
    if x.numel() == 0:
        return (0.0, 0.0, 0.0, 0.0, 0, 0), fp
    xf = _float_view(x)
    norm = float(torch.linalg.vector_norm(xf))
    mean = float(xf.mean())
    if math.isfinite(norm) and math.isfinite(mean):
        mn, mx = torch.aminmax(xf)
        return (norm, mean, float(mn), float(mx), 0, 0), fp
    nan = int(torch.isnan(xf).sum())
    inf = int(torch.isinf(xf).sum())
    finite = xf[torch.isfinite(xf)]
    if finite.numel():
        mn, mx = torch.aminmax(finite)
        lo, hi = float(mn), float(mx)
    else:
        lo = hi = float("nan")
    return (norm, mean, lo, hi, nan, inf), fp


def _unpack_device_stats(v: torch.Tensor) -> tuple[tuple, tuple[int, int]]:
    vals = v[:6].tolist()
    fps = v[6:].view(torch.int64).tolist()
    stats = (vals[0], vals[1], vals[2], vals[3], int(vals[4]), int(vals[5]))
    return stats, (fps[0] % 2**64, fps[1] % 2**64)


class PendingEntry(EntryData):
    """An entry whose stats/fingerprint/values are finished on the writer thread."""

    _source: Optional[torch.Tensor] = None
    _stats_host: Optional[torch.Tensor] = None
    _event: Optional[object] = None
    _summarised: bool = False  # stats and fingerprint already taken (the fused copy)
    dropped: bool = False  # changed in place before its deferred device statistics

    def resolve(self) -> EntryData:
        if self._event is not None:
            self._event.synchronize()  # type: ignore[attr-defined]
        if self._stats_host is not None:
            self.stats, self.fingerprint = _unpack_device_stats(self._stats_host)
        elif self._source is not None and not self._summarised:
            self.stats, self.fingerprint = stats_on_cpu(self._source)
        if self._source is not None and self.values is None and self._keep_values:
            self.values = _to_numpy_bytes(self._source)
        self._source = self._stats_host = self._event = None
        return self

    _keep_values: bool = False


def _to_numpy_bytes(t: torch.Tensor):
    if t.is_complex():
        t = torch.view_as_real(t)
    if t.dtype in (torch.bfloat16,):
        return t.view(torch.int16).numpy().view("<u2")
    if t.dtype in (getattr(torch, "float8_e4m3fn", None), getattr(torch, "float8_e5m2", None)):
        return t.view(torch.uint8).numpy()
    if t.dtype.is_floating_point and t.dtype not in (torch.float16, torch.float32, torch.float64):
        return t.view(torch.uint8).numpy()
    return t.numpy()


#: dtype -> name, for the dtypes a trace stores as themselves (filled by ``storable``).
_DTYPE_NAMES: dict[torch.dtype, str] = {}
STORABLE = storable_dtypes()
_RAW_BITS = {1: torch.uint8, 2: torch.uint16, 4: torch.uint32, 8: torch.uint64}
_WARNED: set[tuple[str, str, str]] = set()


def storable(kind: str, name: str, x: torch.Tensor) -> tuple[torch.Tensor, str]:
    """The tensor to record for ``x`` and the dtype name to file it under.

    Sparse layouts (COO, CSR, CSC, BSR, BSC: ``nn.Embedding(sparse=True)`` gradients) are
    recorded densified; every dtype in ``graddiff.format`` as itself; a quantized tensor as its
    dequantized float32 values, and any other dtype (``int1``..``int7``, ``uint1``..``uint7``,
    ``bits*``, ``float4_e2m1fn_x2``) as its raw bits (``uint8``..``uint64`` of the same width):
    each of these last two with one warning naming the tensor.
    """
    if x.layout != torch.strided:
        x = x.to_dense()
    if x.is_quantized:
        _warn_once(kind, name, x, "recorded dequantized, as float32")
        return x.dequantize(), "float32"
    dname = dtype_name(x.dtype)
    if dname in STORABLE:
        _DTYPE_NAMES[x.dtype] = dname
        return x, dname
    raw = _RAW_BITS.get(x.element_size())
    _warn_once(kind, name, x, f"recorded as its raw bits ({dtype_name(raw)})")
    return x.view(raw), dtype_name(raw)


def _warn_once(kind: str, name: str, x: torch.Tensor, how: str) -> None:
    key = (kind, name, str(x.dtype))
    if key not in _WARNED:
        _WARNED.add(key)
        warn_user(
            f"graddiff: {kind} {name!r} has dtype {x.dtype}, which a trace cannot hold as "
            f"it is; {how}"
        )


def capture(
    kind: str,
    name: str,
    tensor: torch.Tensor,
    *,
    call: int,
    seq: int,
    flags: int,
    keep_values: bool,
    batch: Optional[DeviceStatsBatch] = None,
    arena: Optional[Arena] = None,
) -> EntryData:
    """Snapshot ``tensor`` now. Never modifies it and never consumes RNG.

    ``batch`` collects accelerator statistics for one transfer at the step's end (the recorder
    flushes it before handing the step to the writer); without it each is copied on its own.
    ``arena``: the step's staging buffer; a CPU tensor whose values are kept is copied into a
    slot of it (one copy, no allocation), or cloned when it does not fit.
    """
    dtype = _DTYPE_NAMES.get(tensor.dtype)
    if dtype is None or tensor.layout != torch.strided:  # rare: sparse, quantized, exotic dtypes
        x, dtype = storable(kind, name, tensor.detach())
    else:
        x = tensor  # detached where torch ops or numpy read it; the kernel needs no detach
    if x.is_cpu:
        if keep_values:
            x = x.detach()
            entry = PendingEntry(kind, name, call, dtype, tuple(x.shape), _ZERO_STATS, (0, 0))
            entry.flags, entry.seq = flags, seq
            copy = _into_arena(x, arena, entry) if arena is not None else None
            if copy is None:
                copy = x.clone(memory_format=torch.contiguous_format)
            entry._source = copy
            entry._keep_values = True
            return entry
        stats, fp = stats_on_cpu(x)
        return EntryData(kind, name, call, dtype, tuple(x.shape), stats, fp, None, flags, seq)
    x = x.detach()
    entry = PendingEntry(kind, name, call, dtype, tuple(x.shape), _ZERO_STATS, (0, 0))
    entry.flags, entry.seq = flags, seq
    capture_on_device(entry, x, keep_values, batch)
    return entry


_ZERO_STATS = (0.0, 0.0, 0.0, 0.0, 0, 0)


def _into_arena(x: torch.Tensor, arena: Arena, entry: PendingEntry) -> Optional[torch.Tensor]:
    """A copy of CPU tensor ``x`` in a slot of ``arena`` (contiguous, x's dtype and shape), or
    None when it does not fit or cannot be viewed there (the caller clones it).

    Where the fused kernel applies, the copy and ``entry``'s stats and fingerprint are one
    pass over ``x`` (:func:`copy_and_stats`); otherwise torch copies and the writer thread
    summarises the copy."""
    nbytes = x.numel() * x.element_size()
    off = arena.slot(nbytes)
    if off is None:
        return None
    views = arena.views
    key = (off, x.dtype, x.shape)
    try:
        dst = views.get(key)
        if dst is None:  # a training loop repeats its captures: each slot's view is made once
            whole = arena.keepalive
            if whole is None:  # the arena's bytes as a torch tensor, made once per arena
                whole = arena.keepalive = torch.from_numpy(arena.buf)
            dst = whole[off : off + nbytes].view(x.dtype).view(x.shape)
            if len(views) >= _MAX_VIEWS:
                views.clear()
            views[key] = dst
        done = copy_and_stats(x, dst, arena.base + off)
        if done is None:
            dst.copy_(x)
        else:
            entry.stats, entry.fingerprint = done
            entry._summarised = True
    except (RuntimeError, TypeError):  # tensor subclasses, exotic views: clone instead
        return None
    return dst


#: Slot views cached per arena at most (shapes that change every step stay bounded).
_MAX_VIEWS = 4096


def capture_on_device(
    entry: PendingEntry, x: torch.Tensor, keep_values: bool, batch: Optional[DeviceStatsBatch]
) -> None:
    """Accelerator tensors: summarise on the device (``batch``: the Triton kernels of
    ``hooks/triton_stats.py`` where they apply, else ``stats_on_device``), copy asynchronously
    (pinned host memory), sync on the writer thread. UNVERIFIED on a GPU; the logic runs on CPU
    tensors in the tests."""
    pin = x.device.type == "cuda"
    if batch is not None:
        if not batch.add_tensor(entry, x):  # the Triton kernels, else the torch ops below
            batch.add(entry, stats_on_device(x))
    else:
        stats = stats_on_device(x)
        host = torch.empty(stats.shape, dtype=stats.dtype, pin_memory=pin)
        host.copy_(stats, non_blocking=pin)
        entry._stats_host = host
    if keep_values:
        buf = torch.empty(x.shape, dtype=x.dtype, pin_memory=pin)
        buf.copy_(x, non_blocking=pin)
        entry._source = buf
        entry._keep_values = True
    if batch is not None and not keep_values:
        return  # the batch's flush records the event
    if x.device.type == "cuda":
        event = torch.cuda.Event()
        event.record()
        entry._event = event
    elif x.device.type != "cpu":
        torch_sync = getattr(getattr(torch, x.device.type, None), "synchronize", None)
        if torch_sync is not None:
            torch_sync()
