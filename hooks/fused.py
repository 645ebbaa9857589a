"""One pass per tensor: fingerprint + sum + sum of squares + min/max + non-finite count (numba).

Data flow: snapshot --(a contiguous CPU tensor of a supported dtype)--> fused --> snapshot.
This module owns only the kernels; which dtypes go through it (and which take the pure-torch reference path) is decided in ``snapshot``.

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
import threading
from typing import Any, Optional

import numpy as np

from .._warn import warn_user

_lock = threading.Lock()
_kernels: Optional[dict[str, Any]] = None
_failed: Optional[str] = None


def _value(vals, j, lut):  # pragma: no cover
    """``vals[j]`` as float64; replaced in compiled code by ``_value_impl`` (per dtype)."""
    return np.float64(vals[j]) if lut.shape[0] == 0 else lut[vals[j]]


def _value_impl(vals, j, lut):
    """numba overload of ``_value``: 16-bit floats arrive as their raw bits (uint16) and are
    converted by a 65,536-entry table (exact: every half/bfloat16 is a float64); every other
    dtype is cast."""
    from numba import types

    if vals.dtype == types.uint16:
        return lambda vals, j, lut: lut[vals[j]]
    return lambda vals, j, lut: np.float64(vals[j])


def _tile(out, t0, t1):  # pragma: no cover
    """``out[t0:t1]``; replaced in compiled code by ``_tile_impl`` (None when ``out`` is)."""
    return None if out is None else out[t0:t1]


def _tile_impl(out, t0, t1):
    """numba overload of ``_tile``: with ``out`` None (the statistics pass) the copy vanishes
    at compile time, so that kernel is the same machine code as without a copy."""
    from numba import types

    if isinstance(out, types.NoneType):
        return lambda out, t0, t1: None
    return lambda out, t0, t1: out[t0:t1]


def _store(to, j, w):  # pragma: no cover
    """``to[j] = w``; replaced in compiled code by ``_store_impl`` (nothing when ``to`` is
    None)."""
    if to is not None:
        to[j] = w


def _store_impl(to, j, w):
    """numba overload of ``_store``."""
    from numba import types

    if isinstance(to, types.NoneType):
        return lambda to, j, w: None

    def store(to, j, w):
        to[j] = w

    return store


def _chunk(words, keys, vals, lut, kc, shift, w_lo, w_hi, e_hi, out, src):  # pragma: no cover
    """Words [w_lo, w_hi) and their elements, then elements [w_hi * per_word, e_hi) (the
    partial last word's, for the last chunk). Compiled by numba; returns one chunk's sums.
    ``out``: None (statistics only), or the int64 words of a destination: each word read is
    also stored there (the copy-and-summarise pass of full values, one read of the source;
    the partial last word's bytes are the caller's). Both compile from this one source, so
    they sum in the same order and agree bit for bit.

    ``fp_pos`` uses each word's own weight ``(j >> shift) + 1`` (shift 0: one-word blocks,
    6: 64-word blocks), equal to the block formula of ``graddiff.format`` mod 2**64 without
    a per-block loop. Work goes in tiles of ``TILE_WORDS`` words: the integer loop and the
    element loop of one tile read the same 16 KiB, so memory is read once, and each loop is
    long enough to vectorise. kc = [smallest key, largest key, sign shift, magnitude mask,
    infinity bits] in the key dtype; integers pass mask 0 and infinity 1, so the float-only
    terms vanish without a branch. float16/bfloat16 values come as raw uint16 bits with
    ``lut`` (bits -> float64); every other dtype passes an empty ``lut``.
    ``src``: None, or a strided source (see ``_fill``) whose elements are copied into ``vals``
    (the destination) one tile at a time just before the tile is summarised: a view is read
    once, and its tile summarised from the cache, by the same loops as a contiguous tensor.
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
        e1 = e_hi if t1 == w_hi else t1 * per_word  # the last tile takes the partial word's
        _fill(src, vals, t0 * per_word, e1)
        tw = words[t0:t1]
        to = _tile(out, t0, t1)
        for j in range(tw.shape[0]):
            w = tw[j]
            _store(to, j, w)
            s_sum += w
            s_pos += w * (((t0 + j) >> shift) + 1)
        tv = vals[t0 * per_word : e1]
        tk = keys[t0 * per_word : e1]
        for j in range(tv.shape[0]):
            v = _value(tv, j, lut)
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


def _fill(src, dst, e0, e1):  # pragma: no cover
    """Copy elements [e0, e1) (C order) of a strided source into ``dst[e0:e1]``; replaced in
    compiled code by ``_fill_impl`` (nothing when ``src`` is None)."""
    raise NotImplementedError


def _fill_impl(src, dst, e0, e1):
    """numba overload of ``_fill``. ``src`` = (base, shape, strides, state): ``base`` the
    source's memory from its first element as a 1-D array, ``shape`` and ``strides`` (in
    elements, never negative in torch) as int64 arrays (a 0-d tensor: shape (1,)), ``state``
    int64[ndim + 1], zero at the start: the multi-index of element e0 and, last, its offset
    in ``base``. Runs along the innermost dimension and carries into the outer ones."""
    from numba import types

    if isinstance(src, types.NoneType):
        return lambda src, dst, e0, e1: None

    def fill(src, dst, e0, e1):
        base, shape, strides, st = src
        nd = shape.shape[0]
        inner_n = shape[nd - 1]
        inner_s = strides[nd - 1]
        off = st[nd]
        e = e0
        while e < e1:
            k = min(inner_n - st[nd - 1], e1 - e)
            if inner_s == 1:  # a contiguous run: a loop LLVM vectorises
                d = dst[e : e + k]
                b = base[off : off + k]
                for j in range(k):
                    d[j] = b[j]
            else:
                for j in range(k):
                    dst[e + j] = base[off + j * inner_s]
            e += k
            off += k * inner_s
            st[nd - 1] += k
            if st[nd - 1] == inner_n:  # carry into the outer dimensions
                off -= inner_n * inner_s
                st[nd - 1] = 0
                d = nd - 2
                while d >= 0:
                    st[d] += 1
                    off += strides[d]
                    if st[d] < shape[d]:
                        break
                    off -= shape[d] * strides[d]
                    st[d] = 0
                    d -= 1
        st[nd] = off

    return fill


def _decoded(k, vals, lut):  # pragma: no cover
    """A min/max key of ``_chunk`` back to its value, as float64; replaced in compiled code by
    ``_decoded_impl`` (per dtype)."""
    raise NotImplementedError


def _decoded_impl(k, vals, lut):
    """numba overload of ``_decoded``: the key transform is its own inverse on the low bits;
    16-bit floats look their bits up in ``lut``, float32/float64 reinterpret them, integers
    are cast (keys are int64; little-endian, as every numba target)."""
    from numba import types

    dt = vals.dtype
    if dt == types.uint16:
        return lambda k, vals, lut: lut[(k ^ ((k >> 15) & 0x7FFF)) & 0xFFFF]
    if dt == types.float32:

        def f32(k, vals, lut):
            tmp = np.empty(1, np.int64)
            tmp[0] = k ^ ((k >> 31) & 0x7FFFFFFF)
            return np.float64(tmp.view(np.float32)[0])

        return f32
    if dt == types.float64:

        def f64(k, vals, lut):
            tmp = np.empty(1, np.int64)
            tmp[0] = k ^ ((k >> 63) & 0x7FFFFFFFFFFFFFFF)
            return tmp.view(np.float64)[0]

        return f64
    return lambda k, vals, lut: np.float64(k)


#: Words per tile of ``_chunk`` (16 KiB: the integer and float loops share L1).
TILE_WORDS = 2048

_chunk_jit: Any = None  # the compiled ``_chunk``, which the compiled ``_whole`` calls


def _words_of(dst, k):  # pragma: no cover
    """``dst[:k]`` as int64 words; replaced in compiled code by ``_words_of_impl``."""
    return None if dst is None else dst[:k].view(np.int64)


def _words_of_impl(dst, k):
    from numba import types

    if isinstance(dst, types.NoneType):
        return lambda dst, k: None
    return lambda dst, k: dst[:k].view(np.int64)


def _bytes_of(dst):  # pragma: no cover
    """``dst`` as bytes; replaced in compiled code by ``_bytes_of_impl``."""
    return None if dst is None else dst.view(np.uint8)


def _bytes_of_impl(dst):
    from numba import types

    if isinstance(dst, types.NoneType):
        return lambda dst: None
    return lambda dst: dst.view(np.uint8)


def _whole(vals, lut, kc, shift, dst, src):  # pragma: no cover
    """A whole 1-D contiguous array in one compiled call: its word and key views, the kernel,
    and the zero-padded partial last word (weighted like the words of its block), so that a
    small tensor costs one dispatch. Returns ``_chunk``'s tuple with the tail included and
    min/max decoded to float64 values. ``dst``: None, or an array of the same dtype and size
    that receives a copy of ``vals`` in the same pass. ``src``: None, or a strided source
    that ``vals`` (then the destination) is filled from tile by tile (``_fill``)."""
    nbytes = vals.size * vals.itemsize
    n_words = nbytes >> 3
    k = n_words * 8 // vals.itemsize
    words = vals[:k].view(np.int64)
    keys = vals.view(kc.dtype)
    s_sum, s_pos, fs, fss, kmin, kmax, bad = _chunk_jit(
        words, keys, vals, lut, kc, shift, 0, n_words, vals.size, _words_of(dst, k), src
    )
    if nbytes & 7:
        b = vals.view(np.uint8)
        ob = _bytes_of(dst)
        last = np.int64(0)
        for i in range(n_words * 8, nbytes):
            _store(ob, i, b[i])
            last |= np.int64(b[i]) << (8 * (i - n_words * 8))
        s_sum += last
        s_pos += ((n_words >> shift) + 1) * last
    return s_sum, s_pos, fs, fss, _decoded(kmin, vals, lut), _decoded(kmax, vals, lut), bad


_whole_jit: Any = None  # the compiled ``_whole``, which the compiled ``_whole_at`` calls
_typed_pointer: Any = None  # numba intrinsic: an address as a pointer to ``proto``'s dtype


def _whole_at(addr, n, proto, lut, kc, shift):  # pragma: no cover
    """``_whole`` of the ``n`` elements at address ``addr`` (dtype of the empty array
    ``proto``): no numpy array is made for the tensor (``Tensor.numpy()`` and ``reshape`` cost
    more than the kernel on a small tensor). The caller keeps the memory alive and aligned."""
    return _whole_jit(_carray(_typed_pointer(addr, proto), n), lut, kc, shift, None, None)


def _whole_copy_at(addr, dst_addr, n, proto, lut, kc, shift):  # pragma: no cover
    """``_whole_at`` that also copies the ``n`` elements to address ``dst_addr``."""
    return _whole_jit(
        _carray(_typed_pointer(addr, proto), n),
        lut,
        kc,
        shift,
        _carray(_typed_pointer(dst_addr, proto), n),
        None,
    )


def _whole_strided_at(
    addr, span, shape, strides, dst_addr, n, proto, lut, kc, shift
):  # pragma: no cover
    """``_whole_copy_at`` of a strided source: the ``n`` elements of the view whose first
    element is at ``addr`` (``span`` elements of memory from there), with ``shape`` and
    ``strides`` (int64 arrays, strides in elements), copied in C order to the contiguous
    ``dst_addr`` and summarised in the same pass, tile by tile: each source byte is read once,
    and the results are those of ``_whole`` over the contiguous copy (the same loops)."""
    st = np.zeros(shape.shape[0] + 1, np.int64)
    src = (_carray(_typed_pointer(addr, proto), span), shape, strides, st)
    return _whole_jit(_carray(_typed_pointer(dst_addr, proto), n), lut, kc, shift, None, src)


_carray: Any = None  # numba.carray, bound at build time (numba is imported lazily)


def _typed_pointer_impl(typingctx, addr, proto):
    """numba intrinsic: the integer ``addr`` as a pointer to ``proto``'s element type."""
    from numba import types

    sig = types.CPointer(proto.dtype)(addr, proto)

    def codegen(context, builder, signature, args):
        return builder.inttoptr(args[0], context.get_data_type(proto.dtype).as_pointer())

    return sig, codegen


def _build() -> dict[str, Any]:
    import numba
    from numba.extending import intrinsic, overload

    overload(_value)(_value_impl)
    overload(_decoded)(_decoded_impl)
    overload(_tile)(_tile_impl)
    overload(_store)(_store_impl)
    overload(_words_of)(_words_of_impl)
    overload(_bytes_of)(_bytes_of_impl)
    overload(_fill)(_fill_impl)

    global _typed_pointer, _carray
    _typed_pointer = intrinsic(_typed_pointer_impl)
    _carray = numba.carray
    try:  # machine code cached next to this file, or in numba's user-wide cache directory
        return _compile(numba.njit(nogil=True, cache=True, fastmath={"reassoc"}))
    except RuntimeError:  # "cannot cache function ...": no writable cache location
        return _compile(numba.njit(nogil=True, cache=False, fastmath={"reassoc"}))


def _compile(jit: Any) -> dict[str, Any]:
    global _chunk_jit, _whole_jit
    _chunk_jit = jit(_chunk)
    _whole_jit = jit(_whole)
    return {
        "whole": _whole_jit,
        "whole_at": jit(_whole_at),
        "whole_copy_at": jit(_whole_copy_at),
        "whole_strided_at": jit(_whole_strided_at),
    }


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


def summarise(
    arr: np.ndarray,
    block_shift: int,
    *,
    bfloat16: bool = False,
) -> Optional[tuple[int, int, float, float, float, float, int]]:
    """(s_sum, s_pos, sum, sumsq, min, max, non_finite) of a 1-D contiguous array, in one
    compiled call on the calling thread.

    ``s_sum``/``s_pos`` are the fingerprint's two sums, the zero-padded partial last word
    included (weight ``(n_words >> block_shift) + 1``), as integers to be taken mod 2**64.
    None when the kernel is unavailable or the dtype is not one it takes (unsigned, bool,
    complex: the reference path). ``bfloat16``: ``arr`` (uint16) holds bfloat16 bits; a
    float16 array is read as its bits too. Large arrays are not split across threads: the pass
    is memory-bound and torch's OpenMP workers spin on the other cores between ops, so a
    helper thread made it slower (docs/performance.md, "The 2-thread gap").
    """
    kernels = _kernels if _kernels is not None else _get()
    spec = _BF16_SPEC if bfloat16 and arr.dtype == np.uint16 else _SPECS.get(arr.dtype)
    if kernels is None or spec is None:
        return None
    kc, lut = spec
    if lut.shape[0]:
        arr = arr.view(np.uint16)
    try:  # min/max decoded in the kernel
        s_sum, s_pos, fs, fss, lo, hi, bad = kernels["whole"](arr, lut, kc, block_shift, None, None)
    except Exception as exc:  # numba compiles per dtype on first use: a failure is not fatal
        _disable(exc)
        return None
    if not arr.nbytes:
        return s_sum, s_pos, 0.0, 0.0, 0.0, 0.0, 0
    return s_sum, s_pos, fs, fss, lo, hi, bad


def summarise_at(
    addr: int, numel: int, dtype: str, block_shift: int, dst: int = 0
) -> Optional[tuple[int, int, float, float, float, float, int]]:
    """:func:`summarise` of ``numel`` (> 0) contiguous elements of torch dtype ``dtype`` at
    the 8-byte-aligned address ``addr``, in one compiled call (the caller keeps the memory
    alive). None when the kernel is unavailable or the dtype not one it takes.
    ``dst``: the 8-byte-aligned address of as many bytes, which receive a copy in the same
    pass (0: no copy)."""
    kernels = _kernels if _kernels is not None else _get()
    spec = _AT_SPECS.get(dtype)
    if kernels is None or spec is None:
        return None
    try:
        if dst:
            return kernels["whole_copy_at"](
                addr, dst, numel, spec[0], spec[1], spec[2], block_shift
            )
        return kernels["whole_at"](addr, numel, spec[0], spec[1], spec[2], block_shift)
    except Exception as exc:  # numba compiles per dtype on first use: a failure is not fatal
        _disable(exc)
        return None


def summarise_strided_at(
    addr: int,
    shape: tuple[int, ...],
    strides: tuple[int, ...],
    dtype: str,
    block_shift: int,
    dst: int,
) -> Optional[tuple[int, int, float, float, float, float, int]]:
    """:func:`summarise_at` of a strided view (first element at ``addr``, ``shape``,
    ``strides`` in elements, none negative) whose elements are copied in C order to the
    contiguous, 8-byte-aligned address ``dst`` in the same pass: one read of the view, and
    the results of :func:`summarise_at` over the copy, bit for bit (the same loops run over
    each tile of the copy just after it is filled). None when the kernel is unavailable or
    the dtype not one it takes."""
    kernels = _kernels if _kernels is not None else _get()
    spec = _AT_SPECS.get(dtype)
    if kernels is None or spec is None:
        return None
    if not shape:  # a 0-d tensor: one element
        shape, strides = (1,), (1,)
    n = 1
    span = 1
    for size, stride in zip(shape, strides):
        n *= size
        span += (size - 1) * stride
    if n == 0:
        return None
    try:
        return kernels["whole_strided_at"](
            addr,
            span,
            np.array(shape, np.int64),
            np.array(strides, np.int64),
            dst,
            n,
            spec[0],
            spec[1],
            spec[2],
            block_shift,
        )
    except Exception as exc:  # numba compiles per dtype on first use: a failure is not fatal
        _disable(exc)
        return None


def _key_consts(t: type, inf: Optional[int]) -> np.ndarray:
    """Kernel constants for keys of integer type ``t``; ``inf``: the float's infinity bits
    (None for integer values)."""
    info = np.iinfo(t)
    if inf is None:
        return np.array([info.min, info.max, 0, 0, 1], dtype=t)
    return np.array([info.min, info.max, info.bits - 1, info.max, inf], dtype=t)


_NO_LUT = np.zeros(0, dtype=np.float64)
_BITS16 = np.arange(1 << 16, dtype=np.uint32)
#: float64 value of every float16 / bfloat16 bit pattern (exact conversions).
with np.errstate(invalid="ignore"):  # NaN patterns (their values are never summed: non-finite)
    _LUT_F16 = _BITS16.astype(np.uint16).view(np.float16).astype(np.float64)
    _LUT_BF16 = (_BITS16 << 16).view(np.float32).astype(np.float64)
del _BITS16


#: Per value dtype: (kernel constants (see ``_chunk``), bits -> float64 table or empty).
#: Dtypes not listed take the reference path.
_SPECS = {
    np.dtype(np.float16): (_key_consts(np.int16, 0x7C00), _LUT_F16),
    np.dtype(np.float32): (_key_consts(np.int32, 0x7F800000), _NO_LUT),
    np.dtype(np.float64): (_key_consts(np.int64, 0x7FF0000000000000), _NO_LUT),
    **{
        np.dtype(t): (_key_consts(t, None), _NO_LUT)
        for t in (np.int8, np.int16, np.int32, np.int64)
    },
}
_BF16_SPEC = (_key_consts(np.int16, 0x7F80), _LUT_BF16)

#: Per torch dtype name (``summarise_at``): (an empty array of the dtype the kernel reads,
#: bits -> float64 table or empty, kernel constants). 16-bit floats are read as their bits.
_AT_SPECS = {
    "float16": (np.empty(0, np.uint16), _LUT_F16, _SPECS[np.dtype(np.float16)][0]),
    "bfloat16": (np.empty(0, np.uint16), _LUT_BF16, _BF16_SPEC[0]),
    **{
        name: (np.empty(0, name), _NO_LUT, _SPECS[np.dtype(name)][0])
        for name in ("float32", "float64", "int8", "int16", "int32", "int64")
    },
}
