"""One pass per tensor: fingerprint + sum + sum of squares + min/max + non-finite count (numba).

Data flow: snapshot --(a contiguous CPU tensor of a supported dtype)--> fused --> snapshot.
This module owns only the kernels and how a tensor is split across threads; which dtypes go
through it (and which take the pure-torch reference path) is decided in ``snapshot``.

Why numba: it ships as binary wheels with its own LLVM (no compiler on the user's machine), it
compiles the loop below once per dtype and caches the machine code on disk, and the result
reads each tensor once (the torch reference reads it four times). It is optional: without it
(or with ``GRADDIFF_NO_NUMBA=1``) ``available()`` is False and snapshot uses the reference path.
The choice and its measurements are in docs/performance.md.

The fingerprint is exactly ``graddiff.format.fingerprint_bytes`` (integer sums mod 2**64, order
independent). The float statistics are accumulated in float64 over the tensor's own dtype: sums
in a vectorised order (LLVM's ``reassoc``), so they agree with the reference to rounding, not
bit for bit (tolerance in docs/performance.md). Min/max are taken on order-preserving integer
keys of the float bits, which vectorise without fast-math and never see a NaN as a number; when
any value is NaN or infinite the caller recomputes the statistics with the reference path.
"""

from __future__ import annotations

import os
import struct
import threading
from concurrent.futures import ThreadPoolExecutor
from typing import Any, Optional

import numpy as np

#: Tensors at least this large are split across the torch thread count (one chunk per thread).
SPLIT_BYTES = 1 << 20

_lock = threading.Lock()
_kernels: Optional[dict[str, Any]] = None
_failed: Optional[str] = None
_pool: Optional[ThreadPoolExecutor] = None
_pool_size = 0


def _chunk(words, keys, vals, kc, block, per, b_lo, b_hi, rest_w, rest_e):  # pragma: no cover
    """Full blocks [b_lo, b_hi); with rest_w >= 0 also words [rest_w:] and elements [rest_e:]
    (the partial last block). Returns the partial sums of one chunk (compiled by numba).

    kc = [smallest key, largest key, sign shift, magnitude mask, infinity bits] in the key
    dtype; integers pass mask 0 and infinity 1, so the float-only terms vanish without a branch.
    """
    shift, mask, inf_bits = kc[2], kc[3], kc[4]
    s_sum = np.int64(0)
    s_pos = np.int64(0)
    last = np.int64(0)
    fs = 0.0
    fss = 0.0
    kmin = kc[1]
    kmax = kc[0]
    bad = 0
    for b in range(b_lo, b_hi):
        bs = np.int64(0)
        for j in range(b * block, (b + 1) * block):
            bs += words[j]
        s_sum += bs
        s_pos += bs * np.int64(b + 1)
        for j in range(b * per, (b + 1) * per):
            v = np.float64(vals[j])
            fs += v
            fss += v * v
            k = keys[j]
            bad += (k & mask) >= inf_bits
            k = k ^ ((k >> shift) & mask)
            kmin = min(kmin, k)
            kmax = max(kmax, k)
    if rest_w >= 0:
        for j in range(rest_w, words.shape[0]):
            last += words[j]
        for j in range(rest_e, vals.shape[0]):
            v = np.float64(vals[j])
            fs += v
            fss += v * v
            k = keys[j]
            bad += (k & mask) >= inf_bits
            k = k ^ ((k >> shift) & mask)
            kmin = min(kmin, k)
            kmax = max(kmax, k)
    return s_sum, s_pos, last, fs, fss, np.int64(kmin), np.int64(kmax), bad


def _small(words, keys, vals, kc):  # pragma: no cover
    """A tensor of at most FP_SMALL_BYTES (one-word blocks), in one call (compiled by numba)."""
    shift, mask, inf_bits = kc[2], kc[3], kc[4]
    s_sum = np.int64(0)
    s_pos = np.int64(0)
    for j in range(words.shape[0]):
        w = words[j]
        s_sum += w
        s_pos += w * np.int64(j + 1)
    fs = 0.0
    fss = 0.0
    kmin = kc[1]
    kmax = kc[0]
    bad = 0
    for j in range(vals.shape[0]):
        v = np.float64(vals[j])
        fs += v
        fss += v * v
        k = keys[j]
        bad += (k & mask) >= inf_bits
        k = k ^ ((k >> shift) & mask)
        kmin = min(kmin, k)
        kmax = max(kmax, k)
    return s_sum, s_pos, fs, fss, np.int64(kmin), np.int64(kmax), bad


def _build() -> dict[str, Any]:
    import numba

    try:  # machine code cached next to this file, or in numba's user-wide cache directory
        jit = numba.njit(nogil=True, cache=True, fastmath={"reassoc"})
        return {"chunk": jit(_chunk), "small": jit(_small)}
    except RuntimeError:  # "cannot cache function ...": no writable cache location
        jit = numba.njit(nogil=True, cache=False, fastmath={"reassoc"})
        return {"chunk": jit(_chunk), "small": jit(_small)}


def available() -> bool:
    """Is the fused kernel usable here (numba importable, not disabled)?"""
    return _kernels is not None or _get() is not None


def unavailable_reason() -> Optional[str]:
    _get()
    return _failed


def _get() -> Optional[dict[str, Any]]:
    global _kernels, _failed
    if _kernels is not None or _failed is not None:
        return _kernels
    with _lock:
        if _kernels is None and _failed is None:
            if os.environ.get("GRADDIFF_NO_NUMBA", "") not in ("", "0"):
                _failed = "disabled by GRADDIFF_NO_NUMBA"
            else:
                try:
                    _kernels = _build()
                except Exception as exc:  # ImportError, or a numba that cannot build these
                    _failed = f"{type(exc).__name__}: {exc}"
    return _kernels


def _executor(threads: int) -> ThreadPoolExecutor:
    global _pool, _pool_size
    with _lock:
        if _pool is None or _pool_size != threads - 1:
            if _pool is not None:
                _pool.shutdown(wait=False)
            _pool = ThreadPoolExecutor(threads - 1, thread_name_prefix="graddiff-fused")
            _pool_size = threads - 1
        return _pool


def summarise(
    arr: np.ndarray, n_full: int, block: int, threads: int
) -> Optional[tuple[int, int, int, float, float, float, float, int]]:
    """(s_sum, s_pos, last, sum, sumsq, min, max, non_finite) of a 1-D contiguous array.

    ``s_sum``/``s_pos`` cover the ``n_full`` whole blocks of ``block`` int64 words, ``last`` the
    leftover whole words (the caller adds the zero-padded tail bytes); all three are int64
    (wrap mod 2**64). None when the kernel is unavailable or the dtype is not one it takes
    (unsigned, bool, half, complex: the reference path). Tensors of ``SPLIT_BYTES`` or more are
    split into one chunk per thread (``threads``), summed in a fixed order.
    """
    kernels = _kernels if _kernels is not None else _get()
    spec = _SPECS.get(arr.dtype)
    if kernels is None or spec is None:
        return None
    key_dtype, kc, decode = spec
    keys = arr.view(key_dtype) if key_dtype is not None else arr
    nbytes = arr.nbytes
    if nbytes % 8:
        words = arr[: (nbytes // 8) * 8 // arr.itemsize].view(np.int64)
    else:
        words = arr.view(np.int64)
    if block == 1:
        s_sum, s_pos, fs, fss, kmin, kmax, bad = kernels["small"](words, keys, arr, kc)
        last = 0
    else:
        chunk = kernels["chunk"]
        per = block * 8 // arr.itemsize
        rest_e = n_full * per
        parts = min(threads, nbytes // SPLIT_BYTES)
        if parts <= 1:
            s_sum, s_pos, last, fs, fss, kmin, kmax, bad = chunk(
                words, keys, arr, kc, block, per, 0, n_full, n_full * block, rest_e
            )
        else:
            bounds = [n_full * i // parts for i in range(parts + 1)]
            pool = _executor(parts)
            futs = [
                pool.submit(
                    chunk, words, keys, arr, kc, block, per, bounds[i], bounds[i + 1], -1, 0
                )
                for i in range(1, parts)
            ]
            res = [chunk(words, keys, arr, kc, block, per, 0, bounds[1], n_full * block, rest_e)]
            res += [f.result() for f in futs]
            s_sum = sum(r[0] for r in res)
            s_pos = sum(r[1] for r in res)
            last = sum(r[2] for r in res)
            fs = sum(r[3] for r in res)
            fss = sum(r[4] for r in res)
            kmin = min(r[5] for r in res)
            kmax = max(r[6] for r in res)
            bad = sum(r[7] for r in res)
    if arr.size == 0:
        return s_sum, s_pos, last, 0.0, 0.0, 0.0, 0.0, 0
    return s_sum, s_pos, last, fs, fss, decode(kmin), decode(kmax), bad


_I32, _F32, _I64, _F64 = (struct.Struct(f) for f in ("<i", "<f", "<q", "<d"))


def _decode_f32(key: int) -> float:
    return _F32.unpack(_I32.pack(key ^ ((key >> 31) & 0x7FFFFFFF)))[0]


def _decode_f64(key: int) -> float:
    return _F64.unpack(_I64.pack(key ^ ((key >> 63) & 0x7FFFFFFFFFFFFFFF)))[0]


def _key_consts(t: type, is_float: bool) -> np.ndarray:
    info = np.iinfo(t)
    bits = info.bits
    if not is_float:
        return np.array([info.min, info.max, 0, 0, 1], dtype=t)
    inf = {32: 0x7F800000, 64: 0x7FF0000000000000}[bits]
    return np.array([info.min, info.max, bits - 1, info.max, inf], dtype=t)


#: Per value dtype: (key dtype or None for the values themselves, kernel constants (see
#: ``_chunk``), key -> value). Dtypes not listed take the reference path.
_SPECS = {
    np.dtype(np.float32): (np.int32, _key_consts(np.int32, True), _decode_f32),
    np.dtype(np.float64): (np.int64, _key_consts(np.int64, True), _decode_f64),
    **{
        np.dtype(t): (None, _key_consts(t, False), float)
        for t in (np.int8, np.int16, np.int32, np.int64)
    },
}
