"""The on-disk format of a graddiff trace: this docstring is the specification.

Owned here and nowhere else: the writer builds files from these names and dtypes, the reader
checks ``FORMAT_VERSION`` first and trusts only what the commit marker covers.

A trace is an HDF5 file in HDF5's default (oldest compatible) format, flushed after every step::

    /                       attrs: graddiff_format = "graddiff-trace"
                                   format_version  = 1
                                   graddiff_version, created (ISO 8601 UTC)
                                   environment     = JSON (torch/CUDA versions, seeds, flags, ...)
                                   options         = JSON (the trace() options used;
                                                     "forward_only" since 0.1, absent = false;
                                                     "full_kinds": kinds that keep values in
                                                     full-values steps, absent/null = all;
                                                     "perturb": null | "ulp" | "bfloat16" |
                                                     "float16", absent = null (a perturbed
                                                     twin for compare --noise);
                                                     "mapped_from" only in the temporary
                                                     copies written by compare --map/--offset)
                                   status          = "recording" | "complete" | "stopped: <why>"
                                   values_note     = "" or why full values stopped (budget)
                                   module_classes  = JSON {module name: class name}, written
                                                     once ("(root)" is the model); optional
                                                     (absent in older files: {}); used by
                                                     compare --map auto and shown with every
                                                     record name (graddiff.modclass)
                                   module_settings = JSON {module name: its extra_repr() on
                                                     one line, <= 400 characters}, written
                                                     once; modules printing nothing are left
                                                     out; optional (older files: {}); the
                                                     evidence for compare's module_config
                                   tied_parameters = JSON {alias name: recorded name}: the
                                                     parameters registered under several
                                                     names (tied weights, found at trace
                                                     time; the trace records each tensor
                                                     once, under its first name); "{}" when
                                                     none; optional (absent in older files:
                                                     unknown); evidence for compare's
                                                     tied_weights cause
    /records                1-D table, one row per record key (kind, name, call, dtype);
                            row index = record id.
    /entries                1-D table, one row per (step, record): shape, fingerprint, stats,
                            and where the full values are (offset/nbytes into /values/<step>).
    /values/<step:08d>      1-D uint8, the raw bytes of that step's stored tensors (C order,
                            little endian): entry e's bytes are [offset, offset + nbytes).
                            Absent for steps stored as stats only. Ranges never overlap,
                            except that one tensor recorded under two names shares one range;
                            their order is unspecified and up to 63 zero bytes of padding may
                            lie between two (the recorder's per-step arena: slots 64-byte
                            aligned, written in capture order; values from elsewhere follow
                            back to back, as in older files). Readers refuse a row whose
                            range overlaps another's or leaves the dataset. Since 2026-12-01
                            created with early allocation and no fill (HDF5 properties only:
                            the same contiguous dataset to readers).
    /steps                  1-D table, one row per COMPLETE step: step index, its entries rows
                            [start, stop), whether full values were stored, wall time. Written
                            last and flushed: this is the commit marker. Readers ignore any
                            entries row or values dataset that no /steps row covers. Since
                            2026-12-01 the writer extends /entries up to TABLE_CHUNK_ROWS rows
                            ahead and cuts it to the written rows at close: a file cut off by a
                            crash may end with unwritten rows, whose step, record and offset
                            are -1 (the dataset's fill value).

Why this layout: per-call overhead dominates HDF5 writes of many small tensors (~150 us per
dataset write vs ~6 ms for the same bytes in one row; FIELD-NOTES 8), so a step costs a handful
of calls whatever the model size. The default libver plus a flush per step survived kill -9
every time; ``libver='latest'`` did not (FIELD-NOTES 9).

Reading one tensor without graddiff (h5py and numpy only)::

    rec = f["records"][:]; ent = f["entries"][:]
    row = ent[(ent["step"] == 3) & (ent["record"] == RECORD_ID)][0]
    raw = f[f"values/{3:08d}"][row["offset"] : row["offset"] + row["nbytes"]]
    arr = raw.view(rec[RECORD_ID]["dtype"].decode()).reshape(row["shape"][: row["ndim"]])

Additive extensions (optional: older files lack them, readers tolerate that):

- kind ``buffer_start`` (records table): module buffers at the step's start, captured with the
  parameters; recorded whenever ``buffer`` (the step's end) is. Distributed replicas that sync
  buffers agree here (graddiff/launch.py, ``graddiff ranks``).
- environment keys ``local_rank`` and ``node`` next to ``rank`` and ``world_size``, and
  ``run_id``: one id shared by the ranks of one distributed launch (None otherwise).
- environment keys for the float32 matmul/convolution precision next to the legacy
  ``tf32_matmul``/``tf32_cudnn`` (which are None where torch refuses to read them after the
  new API was used): ``float32_matmul_precision`` (``torch.get_float32_matmul_precision()``,
  None where torch refuses) and, on torch >= 2.9, ``fp32_precision`` (the generic default),
  ``fp32_precision_cudnn``, ``fp32_precision_mkldnn`` and ``fp32_precision_<backend>_<op>``
  for cuda_matmul, cudnn_conv, cudnn_rnn, mkldnn_matmul, mkldnn_conv, mkldnn_rnn ("ieee",
  "tf32", "bf16" or "none": inherit).
- root attribute ``shards`` (JSON): for each sharded parameter name (and its grad), where this
  rank's piece sits: ``global_shape`` plus ``offset``/``local_shape`` (FSDP2, DTensor: the
  records hold the local shard) or ``flat_range`` [start, stop) of the flattened tensor (FSDP1),
  and ``placements``, ``mesh_shape``. FSDP1 with ``use_orig_params=False`` (FlatParameters)
  adds ``flat_param`` (the FlatParameter's name, wrapper segments dropped) and ``shard_range``
  [start, stop) of this rank's flat shard that the record was cut from; its ``param`` and
  ``grad`` records are named by the original parameter, as with ``use_orig_params=True``.

- ``/optimizer`` (1-D table ``OPTIMIZER_DTYPE``: ``step`` int64, ``changes`` UTF-8 JSON), the
  settings of every optimizer that updates traced parameters, as seen by the step pre-hook
  right before the update of that step (so the settings at step ``s`` produced the parameters
  of step ``s + 1``). A row is written only at a step where something changed, in the same
  flush as the step, before its ``/steps`` row: rows after the last committed step are
  ignored (rows of earlier steps stay: they are changes, and later steps build on them). Absent
  when no optimizer stepped (manual loops, older files). ``changes`` is a list, one object per
  optimizer that changed: ``optimizer`` (int, the order in which optimizers first stepped in
  the trace; a rebuilt optimizer is a new one), and only what changed since its last row:
  ``class`` (qualified class name, at its first row), ``groups`` (number of param groups; when
  it changes every group is given again), ``hyper`` ({group index: {name: value}}: the
  scalar or tuple-of-scalars entries of the group that changed, merged into what the group had;
  a one-element CPU tensor as a float; every entry when the group is new), ``removed``
  ({group index: [names of entries the group no longer has]}), ``params`` ({group index: [record names of the traced
  parameters in it]}) with ``untraced`` ({group index: count of others}), ``state_step``
  ({group index: the state step count of the group's first parameter before the update, 0
  without state, null when there is none (state without a count, e.g. SGD's momentum buffer;
  no state kept across updates) or it is not read}), stored when it is not the last stored
  count plus the steps since; then ``state_steps`` ({group index: {name: count}}, ``{}`` when
  they agree again) when the group's parameters' counts differ from one another and from what
  the last stored ones imply (+1 per step; a count of 0, no state yet, stays 0);
  ``state_entries`` (optional: ``len(optimizer.state)`` before the update, stored when it
  changes; 0 after a state cleared or an optimizer re-created); ``state_fp`` (optional, at an
  optimizer's first row only, when its state is not empty there: it was loaded or filled
  before its first update): the fingerprint of everything the state holds (32 hex digits:
  BLAKE2b-128 over, per parameter in param-group order, each entry's name and, for a tensor,
  dtype, shape and the fingerprint defined below, for a number its value);
  ``loaded`` (optional: ``optimizer.load_state_dict`` ran since the previous row of this
  optimizer): ``count`` (calls), ``fp`` (the state's fingerprint before this update, as
  loaded; null: empty; absent when it could not be taken) and ``changed`` (whether the loads
  changed the state: its fingerprint before the first of them differs; absent when not
  known); ``notes`` (what was not read, e.g. a tensor on an accelerator). Added in 0.1 without
  a version change: ``state_fp``, ``loaded`` (older files have neither: nothing is known
  about the state's contents there). Per-parameter ``state_steps`` are also stored when a
  count parts from what the stored ones imply in a way the per-update checks do not see (one
  other parameter's count is read per update, in turn).
  Group indices are JSON strings.

- ``/reach`` (1-D table, same layout as ``/optimizer``: ``step`` int64, ``changes`` UTF-8
  JSON): how many backward passes accumulated into each traced parameter's ``.grad`` during
  the step (one post-accumulate-grad hook per trainable parameter, torch >= 2.1; recorded when
  the ``grad`` kind is, not under ``forward_only``). A row only where the counts changed (the
  first step always has one), holding the whole map ``{param name: count}``; a parameter not
  listed had none. Rows after the last committed step are ignored. Absent: not recorded.
- root attribute ``backward_hooks`` (JSON): the user's backward hooks on the traced modules
  and parameters at trace entry and exit (graddiff's own are never present then), the union:
  ``{"modules": {name: {"backward": [...], "backward_pre": [...]}}, "params": {name:
  {"tensor": [...], "post_accumulate": [...]}}, "global": {"backward": [...],
  "backward_pre": [...]}}``, each hook by its function's qualified name; only what has
  hooks. Absent in older files (unknown).
- root attribute ``custom_functions`` (JSON): ``{"names": [...], "complete": bool}``, the
  user's custom autograd Functions (forward class module + qualified name; torch's own left
  out) in the graphs of the first step's gradient computations, written when that step
  ends; ``complete`` false when a graph was cut at 200,000 nodes. Absent: not recorded.

The fingerprint of a tensor is two unsigned 64-bit sums over its raw bytes read as
little-endian int64 words (the last partial word zero-padded), both modulo 2**64:
``fp_sum`` = sum of all words; ``fp_pos`` = sum over blocks of (block index + 1) * (block
sum), where a block is one word for tensors of at most ``FP_SMALL_BYTES`` bytes and
``FP_BLOCK_WORDS`` words (512 bytes) for larger ones (``fp_block_words``). Integer sums are
exact and independent of reduction order, so equal tensors give equal fingerprints on any
device and thread count; ``fp_pos`` also sees elements that moved: any move in a small tensor
(a permuted batch of labels or of short rows), and moves between 512-byte blocks in a large
one, where per-word weights would cost a second pass over the data.

dtype names are torch's (``float32``, ``bfloat16``, ...), the keys of ``_NUMPY_DTYPES``; types
numpy lacks are stored as raw bits and decoded on read (bfloat16 and float8 to float32,
complex32 to complex64). Added in 0.1 without a version change: ``complex32``,
``float8_e4m3fnuz``, ``float8_e5m2fnuz``, ``float8_e8m0fnu``. The recorder files any other
tensor under a name listed here (``hooks/snapshot.storable``): sparse layouts densified,
quantized dequantized as float32, other dtypes as raw bits (``uint8``..``uint64``).
"""

from __future__ import annotations

import numpy as np

FORMAT_MARKER = "graddiff-trace"
FORMAT_VERSION = 1

#: Tensors with more dimensions are stored flattened (shape recorded as (numel,)).
MAX_NDIM = 8
#: Words per block of the position-sensitive fingerprint of large tensors.
FP_BLOCK_WORDS = 64
#: Tensors up to this many bytes are fingerprinted with one-word blocks (per-word weights).
FP_SMALL_BYTES = 32768

#: Flags in ``entries["flags"]``.
FLAG_TRAINING = 1  # activation: the module was in train() mode
FLAG_VALUES = 2  # full values are stored for this entry
FLAG_NDIM_CLIPPED = 4  # tensor had more than MAX_NDIM dims; shape is (numel,)

# h5py's variable-length UTF-8 string, for names of any length.
_VLEN_STR = np.dtype("O", metadata={"vlen": str})

RECORD_DTYPE = np.dtype([("kind", "S16"), ("name", _VLEN_STR), ("call", "<i4"), ("dtype", "S16")])

ENTRY_DTYPE = np.dtype(
    [
        ("step", "<i8"),
        ("record", "<i4"),
        ("seq", "<i4"),  # capture order within the step (firing order)
        ("ndim", "<i1"),
        ("flags", "u1"),
        ("shape", "<i8", (MAX_NDIM,)),
        ("numel", "<i8"),
        ("fp_sum", "<u8"),
        ("fp_pos", "<u8"),
        ("norm", "<f8"),
        ("mean", "<f8"),
        ("min", "<f8"),
        ("max", "<f8"),
        ("nan", "<i8"),
        ("inf", "<i8"),
        ("offset", "<i8"),  # byte offset into /values/<step>, -1 when stats only
        ("nbytes", "<i8"),
    ]
)

STEP_DTYPE = np.dtype(
    [("step", "<i8"), ("start", "<i8"), ("stop", "<i8"), ("full", "u1"), ("time", "<f8")]
)

#: ``/optimizer``: one row per step at which an optimizer's settings changed (JSON list).
OPTIMIZER_DTYPE = np.dtype([("step", "<i8"), ("changes", _VLEN_STR)])

#: Stats fields, in the order the recorder packs them.
STAT_FIELDS = ("norm", "mean", "min", "max", "nan", "inf")

#: Rows per chunk of the resizable tables (one chunk holds many steps of a small model). Each
#: step's flush rewrites the table's last, partly filled chunk: 1024 rows (174 KB of entries)
#: cost 132 us of writer CPU per 27-entry step against 160 us for 4096 rows (256: 130 us).
#: Readers do not depend on it.
TABLE_CHUNK_ROWS = 1024

# dtype names as torch spells them (str(torch.float32) without "torch.") -> numpy dtype.
# Types numpy lacks are stored as raw bits of the same width and converted on read.
_NUMPY_DTYPES = {
    "float64": "<f8",
    "float32": "<f4",
    "float16": "<f2",
    "bfloat16": "<u2",  # converted to float32 on read
    "int64": "<i8",
    "int32": "<i4",
    "int16": "<i2",
    "int8": "i1",
    "uint8": "u1",
    "uint16": "<u2",
    "uint32": "<u4",
    "uint64": "<u8",
    "bool": "?",
    "complex64": "<c8",
    "complex128": "<c16",
    "complex32": "<u4",  # two float16 (real, imaginary); complex64 on read
    "float8_e4m3fn": "u1",  # raw bits; every float8 type is float32 on read (exact)
    "float8_e5m2": "u1",
    "float8_e4m3fnuz": "u1",
    "float8_e5m2fnuz": "u1",
    "float8_e8m0fnu": "u1",
}


def _float8_table(exp_bits: int, bias: int, kind: str) -> np.ndarray:
    """float32 value of each of the 256 bit patterns of a float8 type. kind "ieee": IEEE 754
    with infinities; "fn": no infinities, NaN at S.1111.111; "fnuz": no infinities, no -0,
    NaN at 0x80 only."""
    man_bits = 7 - exp_bits
    b = np.arange(256)
    sign = np.where(b & 0x80, -1.0, 1.0)
    e = (b >> man_bits) & ((1 << exp_bits) - 1)
    m = (b & ((1 << man_bits) - 1)) / (1 << man_bits)
    with np.errstate(over="ignore"):
        val = np.where(e == 0, m * 2.0 ** (1 - bias), (1 + m) * 2.0 ** (e - bias)) * sign
    top = (1 << exp_bits) - 1
    if kind == "ieee":
        val = np.where((e == top) & (m == 0), sign * np.inf, val)
        val = np.where((e == top) & (m != 0), np.nan, val)
    elif kind == "fn":
        val = np.where((e == top) & (m == 1 - 1 / (1 << man_bits)), np.nan, val)
    else:
        val = np.where(b == 0x80, np.nan, val)
    return val.astype(np.float32)


def _e8m0_table() -> np.ndarray:
    """float8_e8m0fnu: an exponent only, 2**(b - 127); 0xff is NaN."""
    b = np.arange(256, dtype=np.float64)
    return np.where(b == 255, np.nan, 2.0 ** (b - 127)).astype(np.float32)


_FLOAT8_TABLES = {
    "float8_e4m3fn": lambda: _float8_table(4, 7, "fn"),
    "float8_e5m2": lambda: _float8_table(5, 15, "ieee"),
    "float8_e4m3fnuz": lambda: _float8_table(4, 8, "fnuz"),
    "float8_e5m2fnuz": lambda: _float8_table(5, 16, "fnuz"),
    "float8_e8m0fnu": _e8m0_table,
}


def storable_dtypes() -> frozenset[str]:
    """The dtype names a trace stores as themselves (others are recorded as raw bits)."""
    return frozenset(_NUMPY_DTYPES)


def storage_dtype(dtype_name: str) -> np.dtype:
    """The numpy dtype whose bytes hold a tensor of torch dtype ``dtype_name``."""
    try:
        return np.dtype(_NUMPY_DTYPES[dtype_name])
    except KeyError:
        raise ValueError(f"unsupported dtype {dtype_name!r}") from None


def decode_values(raw: np.ndarray, dtype_name: str, shape: tuple[int, ...]) -> np.ndarray:
    """Turn stored bytes back into an array: bfloat16 and float8 types become float32,
    complex32 becomes complex64, exactly."""
    arr = np.frombuffer(raw.tobytes(), dtype=storage_dtype(dtype_name)).reshape(shape)
    if dtype_name == "bfloat16":
        arr = (arr.astype(np.uint32) << 16).view(np.float32)
    elif dtype_name in _FLOAT8_TABLES:
        arr = _FLOAT8_TABLES[dtype_name]()[arr]
    elif dtype_name == "complex32":
        halves = arr.reshape(-1).view("<f2").astype(np.float32)
        arr = halves.view(np.complex64).reshape(shape)
    return arr


def fp_block_words(n_bytes: int) -> int:
    """Words per ``fp_pos`` block for a tensor of ``n_bytes`` bytes."""
    return 1 if n_bytes <= FP_SMALL_BYTES else FP_BLOCK_WORDS


def fingerprint_bytes(raw: np.ndarray) -> tuple[int, int]:
    """(fp_sum, fp_pos) of a buffer, as specified above. Pure numpy; used to verify reads."""
    b = np.ascontiguousarray(raw).reshape(-1).view(np.uint8)
    block = fp_block_words(b.size)
    n_words = b.size // 8
    n_full = n_words // block
    words = b[: n_words * 8].view("<i8")
    last = 0  # the partial last block: leftover words plus the zero-padded tail bytes
    with np.errstate(over="ignore"):
        block_sums = words[: n_full * block].reshape(n_full, block).sum(axis=1, dtype="<i8")
        weights = np.arange(1, n_full + 1, dtype="<i8")
        fp_sum = int(block_sums.sum(dtype="<i8"))
        fp_pos = int((block_sums * weights).sum(dtype="<i8"))
    if n_words > n_full * block:
        last += int(words[n_full * block :].sum(dtype="<i8"))
    tail = b[n_words * 8 :]
    if tail.size:
        padded = np.zeros(8, np.uint8)
        padded[: tail.size] = tail
        last += int(padded.view("<i8")[0])
    fp_sum += last
    fp_pos += (n_full + 1) * last
    return fp_sum % 2**64, fp_pos % 2**64
