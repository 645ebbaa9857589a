"""Pre-flight check of the HDF5 global heap, where names and string metadata live.

HDF5 walks a global heap collection object by object; an object header that says "free space
of size 0" (16 zeroed bytes are enough) sends that walk into an endless loop inside the C
library, with the GIL held. So before the reader lets HDF5 decode any string, this module walks
the collections itself, from the raw bytes (``os.pread``, no HDF5), with HDF5's own stepping
rule (HDF5 1.x/2.0 ``H5HG__cache_heap_deserialize``), and refuses a collection that would not
advance or that overruns its end.

Which collections: those holding the record names (found from the raw chunks of ``/records``)
and the optimizer settings (``/optimizer``), and any in the first 64 KiB of the file (the root attributes: format marker, environment,
options, status are written first). A damaged collection elsewhere is left to the CLI's
watchdog (``graddiff/cli/watchdog.py``).
"""

from __future__ import annotations

import os
import struct
from typing import Optional

import h5py

HEAD_SCAN_BYTES = 64 * 1024
_OBJ_HEADER = 16  # index u16, refcount u16, reserved u32, size (sizeof_size = 8)


def collection_problem(fd: int, addr: int, file_size: int, strict: bool = True) -> Optional[str]:
    """Why HDF5 could not walk the collection at ``addr`` (None if it can). Not ``strict``:
    bytes that merely contain "GCOL" but no collection header are not a problem."""
    head = os.pread(fd, 16, addr)
    if len(head) < 16 or head[:4] != b"GCOL" or (not strict and head[4:8] != b"\x01\0\0\0"):
        return f"no global heap collection at byte {addr}" if strict else None
    (size,) = struct.unpack_from("<Q", head, 8)
    if size < 16 + _OBJ_HEADER or addr + size > file_size:
        return f"global heap collection at byte {addr} has a bad size"
    data = os.pread(fd, size, addr)
    if len(data) < size:
        return f"global heap collection at byte {addr} is truncated"
    p = 16
    while p < size:
        if p + _OBJ_HEADER > size:  # too small for a header: HDF5 takes it as free space
            break
        idx, _, _, obj = struct.unpack_from("<HHIQ", data, p)
        need = obj if idx == 0 else _OBJ_HEADER + ((obj + 7) & ~7)
        if need <= 0 or p + need > size:
            return f"global heap collection at byte {addr} is corrupt (object at byte {addr + p})"
        p += need
    return None


def _records_collections(
    f: h5py.File, fd: int, table: str = "records", column: bytes = b"name"
) -> set[int]:
    """Addresses of the collections that hold the strings of ``/records`` (``name``) or
    another table's string column (raw chunk bytes)."""
    ds = f.get(table, getlink=True)
    if not isinstance(ds, h5py.HardLink):
        return set()
    ds = f[table]
    if not isinstance(ds, h5py.Dataset) or ds.dtype.names is None:
        return set()
    ftype = ds.id.get_type()
    if not isinstance(ftype, h5py.h5t.TypeCompoundID):
        return set()
    # On disk a variable-length member takes 16 bytes (length u32, collection address u64,
    # object index u32) whatever its size in memory, and the members after it move along.
    off = row = None
    shift = 0
    for i in range(ftype.get_nmembers()):
        member = ftype.get_member_type(i)
        size = member.get_size()
        variable = isinstance(member, h5py.h5t.TypeVlenID) or (
            isinstance(member, h5py.h5t.TypeStringID) and member.is_variable_str()
        )
        if ftype.get_member_name(i) == column and variable:
            off = ftype.get_member_offset(i) + shift
        if variable:
            shift += 16 - size
    if off is None:
        return set()
    row = ftype.get_size() + shift
    found: set[int] = set()
    n_rows = ds.shape[0]
    if ds.chunks is None:  # contiguous (a compacted copy): one run of rows
        start = ds.id.get_offset()
        pieces = [] if start is None else [(0, start, ds.id.get_storage_size())]
    else:
        pieces = []
        for c in range(ds.id.get_num_chunks()):
            info = ds.id.get_chunk_info(c)
            if not info.filter_mask and info.byte_offset is not None:
                pieces.append((info.chunk_offset[0], info.byte_offset, info.size))
    for first, at, size in pieces:
        raw = os.pread(fd, size, at)
        for r in range(min(len(raw) // row, max(0, n_rows - first))):
            length, addr = struct.unpack_from("<IQ", raw, r * row + off)
            if length:
                found.add(addr)
    return found


def check_heaps(f: h5py.File, path: str) -> Optional[str]:
    """The first problem with a global heap collection of this file, or None."""
    if f.id.get_create_plist().get_sizes() != (8, 8):  # offsets/lengths as h5py writes them
        return None
    fd = os.open(path, os.O_RDONLY)
    try:
        size = os.fstat(fd).st_size
        head = os.pread(fd, HEAD_SCAN_BYTES, 0)
        at = head.find(b"GCOL")
        while at >= 0:
            problem = collection_problem(fd, at, size, strict=False)
            if problem:
                return problem
            at = head.find(b"GCOL", at + 4)
        addrs = _records_collections(f, fd) | _records_collections(f, fd, "optimizer", b"changes")
        for addr in sorted(addrs):
            problem = collection_problem(fd, addr, size)
            if problem:
                return problem
    finally:
        os.close(fd)
    return None
