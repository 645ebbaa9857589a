"""One pass per tensor: fingerprint + sum + sum of squares + min/max + non-finite count (numba).

Data flow: snapshot --(a contiguous CPU tensor of a supported dtype)--> fused --> snapshot.
This module owns only the kernels and how a tensor is split across threads; which dtypes go
through it (and which take the pure-torch reference path) is decided in ``snapshot``.

Why numba: it ships as binary wheels with its own LLVM (no compiler on the user's machine), it
compiles the loop below once per dtype and caches the machine code on disk, and the result
reads each tensor once (the torch reference reads it four times). It is a core dependency
where numba has wheels (setup.cfg) and never required: without it (or with
``GRADDIFF_NO_NUMBA=1``) ``available()`` is False and snapshot uses the reference path; a numba
that is installed but fails to import or to compile the kernel gives one warning and the same
fallback, never an error. The choice and its measurements are in docs/performance.md.

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

from .._warn import warn_user

#: Tensors at least this large are split across the torch thread count (one chunk per thread).
SPLIT_BYTES = 1 << 20

_lock = threading.Lock()
_kernels: Optional[dict[str, Any]] = None
_failed: Optional[str] = None
_pool: Optional[ThreadPoolExecutor] = None
_pool_size = 0


def _chunk(words, keys, vals, kc, shift, w_lo, w_hi, e_hi):  # pragma: no cover
    """Words [w_lo, w_hi) and their elements, then elements [w_hi * per_word, e_hi) (the
    partial last word's, for the last chunk). Compiled by numba; returns one chunk's sums.

    ``fp_pos`` uses each word's own weight ``(j >> shift) + 1`` (shift 0: one-word blocks,
    6: 64-word blocks), equal to the block formula of ``graddiff.format`` mod 2**64 without
    a per-block loop. Work goes in tiles of ``TILE_WORDS`` words: the integer loop and the
    element loop of one tile read the same 16 KiB, so memory is read once, and each loop is
    long enough to vectorise. kc = [smallest key, largest key, sign shift, magnitude mask,
    infinity bits] in the key dtype; integers pass mask 0 and infinity 1, so the float-only
    terms vanish without a branch.
    """
    sign, mask, inf_bits = kc[2], kc[3], kc[4]
    per_word = 8 // vals.itemsize
    s_sum = np.int64(0)
    s_pos = np.int64(0)
    fs = 0.0
    fss = 0.0
    kmin = kc[1]
    kmax = kc[0]
    bad = 0
    # Per tile, slices (indices from 0): numba then knows no index is negative and the
    # loops vectorise (a loop from a computed start ran 6x slower).
    for t0 in range(w_lo, w_hi + 1, TILE_WORDS):
        t1 = min(t0 + TILE_WORDS, w_hi)
        tw = words[t0:t1]
        for j in range(tw.shape[0]):
            w = tw[j]
            s_sum += w
            s_pos += w * (((t0 + j) >> shift) + 1)
        e1 = e_hi if t1 == w_hi else t1 * per_word  # the last tile takes the partial word's
        tv = vals[t0 * per_word : e1]
        tk = keys[t0 * per_word : e1]
        for j in range(tv.shape[0]):
            v = np.float64(tv[j])
            fs += v
            fss += v * v
            k = tk[j]
            bad += (k & mask) >= inf_bits
            k = k ^ ((k >> sign) & mask)
            kmin = min(kmin, k)
            kmax = max(kmax, k)
        if t1 == w_hi:
            break
    return s_sum, s_pos, fs, fss, np.int64(kmin), np.int64(kmax), bad


#: Words per tile of ``_chunk`` (16 KiB: the integer and float loops share L1).
TILE_WORDS = 2048


def _build() -> dict[str, Any]:
    import numba

    try:  # machine code cached next to this file, or in numba's user-wide cache directory
        jit = numba.njit(nogil=True, cache=True, fastmath={"reassoc"})
        return {"chunk": jit(_chunk)}
    except RuntimeError:  # "cannot cache function ...": no writable cache location
        jit = numba.njit(nogil=True, cache=False, fastmath={"reassoc"})
        return {"chunk": jit(_chunk)}


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
                except ModuleNotFoundError as exc:
                    if exc.name != "numba":  # numba is there, but a module it needs is not
                        _disable(exc)
                    else:  # not installed (a platform without numba wheels): no warning
                        _failed = "numba is not installed"
                except Exception as exc:  # a numba that cannot import here (numpy too new...)
                    _disable(exc)
    return _kernels


def _disable(exc: BaseException) -> None:
    """Switch the kernel off for this process, with one warning: the reference path runs."""
    global _kernels, _failed
    _kernels = None
    if _failed is None:
        _failed = f"{type(exc).__name__}: {' '.join(str(exc).split())[:300]}"
        warn_user(
            f"graddiff: the fused statistics kernel (numba) is unavailable ({_failed}); "
            f"recording uses the slower pure-torch path, with the same results"
        )


def _executor(threads: int) -> ThreadPoolExecutor:
    """A pool with at least ``threads - 1`` workers. It only grows, and a replaced pool is never
    shut down, so a thread holding the old one can still submit to it."""
    global _pool, _pool_size
    with _lock:
        if _pool is None or _pool_size < threads - 1:
            _pool = ThreadPoolExecutor(threads - 1, thread_name_prefix="graddiff-fused")
            _pool_size = threads - 1
        return _pool


def summarise(
    arr: np.ndarray, block_shift: int, threads: int
) -> Optional[tuple[int, int, float, float, float, float, int]]:
    """(s_sum, s_pos, sum, sumsq, min, max, non_finite) of a 1-D contiguous array.

    ``s_sum``/``s_pos`` cover the whole int64 words (the caller adds the zero-padded tail
    bytes with weight ``(n_words >> block_shift) + 1``), as int64 (wrap mod 2**64). None when
    the kernel is unavailable or the dtype is not one it takes (unsigned, bool, half, complex:
    the reference path). Arrays of ``SPLIT_BYTES`` or more are split into one chunk per thread
    (``threads``), combined in a fixed order.
    """
    kernels = _kernels if _kernels is not None else _get()
    spec = _SPECS.get(arr.dtype)
    if kernels is None or spec is None:
        return None
    key_dtype, kc, decode = spec
    keys = arr.view(key_dtype) if key_dtype is not None else arr
    nbytes = arr.nbytes
    n_words = nbytes >> 3
    whole = arr[: n_words * 8 // arr.itemsize] if nbytes & 7 else arr
    words = whole.view(np.int64)
    chunk = kernels["chunk"]
    n = arr.shape[0]
    parts = min(threads, nbytes // SPLIT_BYTES)
    try:
        res = _run(chunk, words, keys, arr, kc, block_shift, n_words, n, parts)
    except Exception as exc:  # numba compiles per dtype on first use: a failure is not fatal
        _disable(exc)
        return None
    s_sum, s_pos, fs, fss, kmin, kmax, bad = res
    if n == 0:
        return s_sum, s_pos, 0.0, 0.0, 0.0, 0.0, 0
    return s_sum, s_pos, fs, fss, decode(kmin), decode(kmax), bad


def _run(chunk, words, keys, arr, kc, block_shift, n_words, n, parts) -> tuple:
    """The kernel over the whole array: one call, or ``parts`` chunks combined in order."""
    if parts <= 1:
        return chunk(words, keys, arr, kc, block_shift, 0, n_words, n)
    bounds = [n_words * i // parts for i in range(parts)] + [n_words]
    per_word = 8 // arr.itemsize
    ends = [bounds[i + 1] * per_word for i in range(parts - 1)] + [n]
    pool = _executor(parts)
    futs = [
        pool.submit(chunk, words, keys, arr, kc, block_shift, bounds[i], bounds[i + 1], ends[i])
        for i in range(1, parts)
    ]
    res = [chunk(words, keys, arr, kc, block_shift, 0, bounds[1], ends[0])]
    res += [f.result() for f in futs]
    s_sum = sum(r[0] for r in res)
    s_pos = sum(r[1] for r in res)
    fs = sum(r[2] for r in res)
    fss = sum(r[3] for r in res)
    kmin = min(r[4] for r in res)
    kmax = max(r[5] for r in res)
    bad = sum(r[6] for r in res)
    return s_sum, s_pos, fs, fss, kmin, kmax, bad


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
