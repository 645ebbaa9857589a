"""Damaged traces and a fork-per-run harness: shared by tests/test_fuzz.py and
scripts/fuzz_campaign.py.

Damage starts from real traces (a small model recorded with ``graddiff.trace``): byte-level
damage (truncation, bit flips and zeroed blocks aimed at the superblock, the metadata, the
global heap of names, the tables and the values, located with HDF5's own storage info),
structural edits made with h5py (wrong table types, record ids out of range, entry steps not in
``/steps``, unknown dtypes, metadata that is not a JSON object or is nested 10,000 deep, values
datasets of the wrong shape, external storage and links), and special files (FIFO, directory,
device, a sparse 4 GB file, a non-trace HDF5 file).

Each run forks this already-imported process (a fork server: ~10 ms a run instead of ~0.5 s for
a fresh interpreter), points fd 1 and 2 at files, runs one CLI command (``graddiff.cli.main``,
its watchdog included) or the Python API, and is killed after ``timeout`` seconds: a kill is a
hang. A run passes when it exits with a documented code (0/1/2) and, on exit 2, stderr is one
``Error:`` line, and nothing printed holds a traceback.
"""

from __future__ import annotations

import dataclasses
import json
import os
import random
import re
import shutil
import signal
import tempfile
import time
import traceback
from typing import Callable, Optional

import h5py
import numpy as np

DOCUMENTED = {0, 1, 2}
SECRET_MARK = "s3cr3t"

# -- real traces ------------------------------------------------------------------------------


RECORD = """
import sys, torch, graddiff
for name, lr in (("a.h5", 0.1), ("b.h5", 0.2)):
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(6, 8), torch.nn.ReLU(), torch.nn.Linear(8, 3))
    opt = torch.optim.SGD(model.parameters(), lr=lr)
    x, y = torch.randn(5, 6), torch.randint(0, 3, (5,))
    with graddiff.trace(model, sys.argv[1] + "/" + name, full_steps=[0, 1, 3]):
        for _ in range(4):
            opt.zero_grad()
            torch.nn.functional.cross_entropy(model(x), y).backward()
            opt.step()
"""


def record_real_traces(out_dir: str) -> tuple[str, str]:
    """Two short runs of a small MLP (B has twice A's learning rate): full values on some
    steps, statistics on the others. Recorded in a subprocess, so that the fork server does
    not carry torch."""
    import subprocess
    import sys

    subprocess.run([sys.executable, "-c", RECORD, out_dir], check=True, timeout=600)
    return os.path.join(out_dir, "a.h5"), os.path.join(out_dir, "b.h5")


# -- where things are in a trace ------------------------------------------------------------


@dataclasses.dataclass
class Regions:
    """Byte ranges of a trace, by what they hold."""

    size: int
    superblock: tuple[int, int]
    heap: list[tuple[int, int]]
    tables: list[tuple[int, int]]
    values: list[tuple[int, int]]
    metadata: list[tuple[int, int]]  # everything else: object headers, B-trees, local heaps


def regions(path: str) -> Regions:
    with open(path, "rb") as fh:
        data = fh.read()
    heap = [(m.start(), m.start() + 4096) for m in re.finditer(b"GCOL", data)]
    tables, values = [], []
    with h5py.File(path, "r") as f:
        for name in ("records", "entries", "steps"):
            ds = f[name]
            for i in range(ds.id.get_num_chunks()):
                info = ds.id.get_chunk_info(i)
                tables.append((info.byte_offset, info.byte_offset + info.size))
        for name in f["values"]:
            ds = f["values"][name]
            off = ds.id.get_offset()
            if off is not None:
                values.append((off, off + ds.id.get_storage_size()))
    taken = sorted(heap + tables + values)
    metadata, at = [], 96
    for lo, hi in taken:
        if lo > at:
            metadata.append((at, lo))
        at = max(at, hi)
    if at < len(data):
        metadata.append((at, len(data)))
    return Regions(len(data), (0, 96), heap, tables, values, metadata)


# -- damage -----------------------------------------------------------------------------------


@dataclasses.dataclass
class Case:
    """One damaged input: how it was made, and its path."""

    name: str
    path: str


def _pick(rng: random.Random, spans: list[tuple[int, int]], size: int) -> int:
    spans = [s for s in spans if s[1] > s[0]] or [(0, size)]
    lo, hi = rng.choice(spans)
    return rng.randrange(lo, min(hi, size))


def _bytes_case(src: str, dst: str, mutate: Callable[[bytearray], None]) -> None:
    with open(src, "rb") as fh:
        data = bytearray(fh.read())
    mutate(data)
    with open(dst, "wb") as fh:
        fh.write(data)


def byte_damage(src: str, reg: Regions, rng: random.Random, out: str, i: int) -> Case:
    """One byte-level damage of ``src``: truncation, bit flips or a zeroed block in a region."""
    how = rng.choice(["truncate", "flip", "zero", "flip", "zero", "heap-header"])
    where = rng.choice(["superblock", "metadata", "heap", "tables", "values"])
    spans = {
        "superblock": [reg.superblock],
        "metadata": reg.metadata,
        "heap": reg.heap,
        "tables": reg.tables,
        "values": reg.values,
    }[where]
    dst = os.path.join(out, f"{i:04d}.h5")

    def mutate(data: bytearray) -> None:
        if how == "truncate":
            del data[rng.randrange(0, len(data)) :]
        elif how == "flip":
            for _ in range(rng.choice([1, 1, 2, 4, 16])):
                at = _pick(rng, spans, len(data))
                data[at] ^= 1 << rng.randrange(8)
        elif how == "zero":
            n = rng.choice([1, 8, 16, 64, 512, 4096])
            at = _pick(rng, spans, len(data))
            data[at : at + n] = bytes(len(data[at : at + n]))
        else:  # 16 zeroed bytes over a global-heap object header (HDF5 loops forever on some)
            gcol = [lo for lo, _ in reg.heap] or [0]
            at = rng.choice(gcol) + 16 + 16 * rng.randrange(0, 4)
            data[at : at + 16] = bytes(len(data[at : at + 16]))

    _bytes_case(src, dst, mutate)
    name = f"{how}" if how in ("truncate", "heap-header") else f"{how}-{where}"
    return Case(name, dst)


def _edit_entries(f: h5py.File, fn: Callable[[np.ndarray], None]) -> None:
    ent = f["entries"][:]
    fn(ent)
    f["entries"][:] = ent


def _replace(f: h5py.File, name: str, data: np.ndarray) -> None:
    del f[name]
    f.create_dataset(name, data=data, maxshape=(None,) if data.ndim == 1 else None)


def _structural_edits(secret: str) -> list[tuple[str, Callable[[h5py.File, random.Random], None]]]:
    """Edits a crafted or buggy writer could make, each as (name, fn(file, rng))."""

    def attr(name: str, value: object) -> Callable[[h5py.File, random.Random], None]:
        def fn(f: h5py.File, rng: random.Random) -> None:
            f.attrs[name] = value

        return fn

    def ent_field(field: str, values: list) -> Callable[[h5py.File, random.Random], None]:
        def fn(f: h5py.File, rng: random.Random) -> None:
            def edit(e: np.ndarray) -> None:
                i = rng.randrange(len(e))
                if field == "shape":
                    e[i]["shape"][rng.randrange(max(1, int(e[i]["ndim"])))] = rng.choice(values)
                else:
                    e[i][field] = rng.choice(values)

            _edit_entries(f, edit)

        return fn

    def rec_field(field: str, values: list) -> Callable[[h5py.File, random.Random], None]:
        def fn(f: h5py.File, rng: random.Random) -> None:
            rec = f["records"][:]
            rec[rng.randrange(len(rec))][field] = rng.choice(values)
            f["records"][:] = rec

        return fn

    def step_field(field: str, values: list) -> Callable[[h5py.File, random.Random], None]:
        def fn(f: h5py.File, rng: random.Random) -> None:
            st = f["steps"][:]
            st[rng.randrange(len(st))][field] = rng.choice(values)
            f["steps"][:] = st

        return fn

    def retype(name: str) -> Callable[[h5py.File, random.Random], None]:
        def fn(f: h5py.File, rng: random.Random) -> None:
            old = f[name][:]
            fields = [
                (n, "<f4" if old.dtype[n].kind in "iu" else "<i8") for n in old.dtype.names[:2]
            ] + [(n, old.dtype[n]) for n in old.dtype.names[2:]]
            dt = np.dtype(
                [
                    (n, t) if h5py.check_string_dtype(np.dtype(t)) is None else (n, "S8")
                    for n, t in fields
                ]
            )
            new = np.zeros(len(old), dt)
            _replace(f, name, new)

        return fn

    def values_ds(kind: str) -> Callable[[h5py.File, random.Random], None]:
        def fn(f: h5py.File, rng: random.Random) -> None:
            name = rng.choice(list(f["values"]))
            size = f["values"][name].shape[0]
            del f["values"][name]
            g = f["values"]
            if kind == "2d":
                g.create_dataset(name, data=np.zeros((size, 2), np.uint8))
            elif kind == "float":
                g.create_dataset(name, data=np.zeros(size, np.float64))
            elif kind == "short":
                g.create_dataset(name, data=np.zeros(max(0, size // 2), np.uint8))
            elif kind == "group":
                g.create_group(name)
            elif kind == "external":
                n = os.path.getsize(secret)
                g.create_dataset(name, (n,), np.uint8, external=[(secret, 0, n)])
            elif kind == "extlink":
                g[name] = h5py.ExternalLink(secret, "/x")

        return fn

    def drop(name: str) -> Callable[[h5py.File, random.Random], None]:
        def fn(f: h5py.File, rng: random.Random) -> None:
            del f[name]

        return fn

    deep = "[" * 10000 + "]" * 10000
    return [
        ("attr-environment-list", attr("environment", "[1, 2, 3]")),
        ("attr-environment-deep", attr("environment", deep)),
        ("attr-environment-deep-dict", attr("environment", '{"a": ' + deep + "}")),
        ("attr-environment-notjson", attr("environment", "{not json")),
        ("attr-options-int", attr("options", np.int64(7))),
        ("attr-options-array", attr("options", np.arange(3))),
        ("attr-environment-markup", attr("environment", json.dumps({"argv": ["[/x]\x1b[2J"]}))),
        ("attr-status-bytes", attr("status", np.bytes_(b"\xff\xfe\x1b[2J"))),
        ("attr-version-string", attr("format_version", "1")),
        ("attr-version-float", attr("format_version", 1.5)),
        ("attr-version-array", attr("format_version", np.arange(2))),
        ("attr-marker-int", attr("graddiff_format", 3)),
        ("entry-record-range", ent_field("record", [-1, 10**6, 2**31 - 1])),
        ("entry-step-wrong", ent_field("step", [-5, 10**6, 2])),
        ("entry-ndim", ent_field("ndim", [-1, 9, 127])),
        ("entry-shape", ent_field("shape", [-1, 0, 2**40, 2**62])),
        ("entry-numel", ent_field("numel", [-1, 0, 2**62])),
        ("entry-offset", ent_field("offset", [-7, 2**40, 2**62])),
        ("entry-nbytes", ent_field("nbytes", [-1, 0, 2**40])),
        ("entry-flags", ent_field("flags", [0, 2, 255])),
        ("entry-nan", ent_field("nan", [-1, 2**40])),
        ("entry-stats-nan", ent_field("norm", [float("nan"), float("inf"), -1.0])),
        ("record-dtype-unknown", rec_field("dtype", [b"float4_e2m1", b"\xff\xff", b""])),
        ("record-kind-unknown", rec_field("kind", [b"zzz", b"\x1b[31m", b""])),
        ("record-call", rec_field("call", [-1, 2**31 - 1])),
        ("record-name-control", rec_field("name", ["\x1b]0;x\x07[/x]", "a" * 5000, ""])),
        ("record-name-bytes", rec_field("name", [b"\xff\xfe\xae", b"fc\xc3(.weight"])),
        ("step-start", step_field("start", [-1, 10**9])),
        ("step-stop", step_field("stop", [-1, 10**9])),
        ("step-step", step_field("step", [-1, 2**62, 0])),
        ("step-full", step_field("full", [0, 255])),
        ("retype-entries", retype("entries")),
        ("retype-steps", retype("steps")),
        ("retype-records", retype("records")),
        ("drop-entries", drop("entries")),
        ("drop-values", drop("values")),
        ("drop-steps", drop("steps")),
        ("values-2d", values_ds("2d")),
        ("values-float", values_ds("float")),
        ("values-short", values_ds("short")),
        ("values-group", values_ds("group")),
        ("values-external-storage", values_ds("external")),
        ("values-external-link", values_ds("extlink")),
        ("entries-2d", lambda f, r: _replace(f, "entries", np.zeros((3, 3)))),
        ("steps-scalar", lambda f, r: (f.__delitem__("steps"), f.create_dataset("steps", data=1))),
        (
            "records-external-link",
            lambda f, r: (
                f.__delitem__("records"),
                f.__setitem__("records", h5py.ExternalLink(secret, "/r")),
            ),
        ),
    ]


def structural_damage(src: str, rng: random.Random, out: str, i: int, secret: str) -> Case:
    name, fn = rng.choice(_structural_edits(secret))
    dst = os.path.join(out, f"{i:04d}.h5")
    shutil.copyfile(src, dst)
    with h5py.File(dst, "r+") as f:
        fn(f, rng)
    return Case(name, dst)


def special_cases(out: str, src: str) -> list[Case]:
    """Inputs that are not damaged traces at all."""
    cases = []
    d = os.path.join(out, "special")
    os.makedirs(d, exist_ok=True)
    if hasattr(os, "mkfifo"):
        fifo = os.path.join(d, "fifo.h5")
        os.mkfifo(fifo)
        cases.append(Case("fifo", fifo))
    cases.append(Case("directory", d))
    if os.path.exists("/dev/zero"):
        cases.append(Case("device", "/dev/zero"))
    sparse = os.path.join(d, "sparse4g.h5")
    with open(sparse, "wb") as fh:
        fh.truncate(4 * 2**30)
    cases.append(Case("sparse-4GB", sparse))
    cases.append(Case("missing", os.path.join(d, "missing.h5")))
    empty = os.path.join(d, "empty.h5")
    open(empty, "wb").close()
    cases.append(Case("empty", empty))
    text = os.path.join(d, "text.h5")
    with open(text, "w") as fh:
        fh.write("step,loss\n0,2.3\n")
    cases.append(Case("text", text))
    plain = os.path.join(d, "plain.h5")
    with h5py.File(plain, "w") as f:
        f["x"] = np.arange(4)
    cases.append(Case("plain-hdf5", plain))
    loop = os.path.join(d, "loop.h5")
    os.symlink(loop, loop)
    cases.append(Case("symlink-loop", loop))
    fifo_target = os.path.join(d, "fifo-link.h5")
    shutil.copyfile(src, fifo_target)
    if hasattr(os, "mkfifo"):
        with h5py.File(fifo_target, "r+") as f:
            del f["records"]
            f["records"] = h5py.ExternalLink(os.path.join(d, "fifo.h5"), "/records")
        cases.append(Case("extlink-to-fifo", fifo_target))
    return cases


def damaged_cases(a: str, b: str, out: str, n: int, seed: int, secret: str) -> list[Case]:
    """``n`` damaged copies of the real traces a and b: 60 % byte damage, 40 % structural."""
    rng = random.Random(seed)
    reg = {a: regions(a), b: regions(b)}
    cases = []
    for i in range(n):
        src = rng.choice([a, b])
        if rng.random() < 0.6:
            cases.append(byte_damage(src, reg[src], rng, out, i))
        else:
            cases.append(structural_damage(src, rng, out, i, secret))
    return cases


# -- commands -----------------------------------------------------------------------------------


def commands(path: str, good: str, work: str) -> list[tuple[str, list[str]]]:
    """Every command on a damaged file (as the only file, and against a good one)."""
    png = os.path.join(work, "plot.png")
    html = os.path.join(work, "report.html")
    return [
        ("show", ["show", path]),
        ("show --json", ["show", path, "--json"]),
        ("inspect --list", ["inspect", path, "--list"]),
        ("inspect --values --json", ["inspect", path, "-k", "param", "-n", "*", "-v", "--json"]),
        ("inspect grad", ["inspect", path, "-k", "grad", "-n", "*", "-v", "-s", "1"]),
        ("check", ["check", path]),
        ("check --json", ["check", path, "--json"]),
        ("compare good bad", ["compare", good, path]),
        ("compare --json bad good", ["compare", path, good, "--json", "--html", html]),
        ("compare --exact bad bad", ["compare", path, path, "--exact"]),
        ("plot", ["plot", path, "-o", png]),
        ("plot two", ["plot", good, path, "-o", png]),
        ("map", ["map", good, path]),
    ]


def python_api(path: str, good: str) -> None:
    """Everything the Python API offers on one file; documented errors are allowed."""
    import graddiff
    from graddiff.errors import GraddiffError

    def ok(fn: Callable[[], object]) -> None:
        try:
            fn()
        except (GraddiffError, KeyError):
            pass

    def on_run() -> None:
        with graddiff.open(path) as run:
            repr(run)
            run.keys, run.kinds, run.names(), run.step_table, run.complete  # noqa: B018
            for block in run.iter_step_blocks(2):
                len(block)
            for key in run.keys[:12]:
                for step in run.steps[:4]:
                    args = (key.kind, key.name, int(step), key.call)
                    ok(lambda a=args: run.stats(*a))
                    ok(lambda a=args: run.get(*a))
            ok(run.summary)
            ok(lambda: run.check().to_dict())

    ok(on_run)
    ok(lambda: graddiff.compare(good, path).to_dict())
    ok(lambda: str(graddiff.compare(path, path, exact=True)))


# -- the harness -------------------------------------------------------------------------------


@dataclasses.dataclass
class Outcome:
    case: str
    command: str
    code: Optional[int]  # None: killed after the timeout (a hang)
    seconds: float
    stdout: str
    stderr: str

    @property
    def hang(self) -> bool:
        return self.code is None

    @property
    def traceback(self) -> bool:
        return "Traceback (most recent call last)" in self.stdout + self.stderr

    @property
    def problem(self) -> Optional[str]:
        """Why this run breaks a promise, or None."""
        if self.hang:
            return "hang"
        if self.traceback:
            return "traceback"
        if SECRET_MARK in self.stdout + self.stderr:
            return "printed bytes from outside the trace"
        if self.code not in DOCUMENTED:
            return f"exit {self.code}"
        if self.code == 2:
            lines = self.stderr.strip().splitlines()
            if len(lines) != 1 or not lines[0].startswith("Error: "):
                return "not one Error: line"
        return None


def _read(path: str, limit: int = 20000) -> str:
    with open(path, "rb") as fh:
        return fh.read(limit).decode("utf-8", "replace")


def run_forked(
    fn: Callable[[], int], timeout: float, work: str
) -> tuple[Optional[int], float, str, str]:
    """Run ``fn`` in a forked child with fd 1/2 captured; kill it after ``timeout`` s."""
    import sys

    out, err = os.path.join(work, "out.txt"), os.path.join(work, "err.txt")
    sys.stdout.flush()
    sys.stderr.flush()
    t0 = time.monotonic()
    pid = os.fork()
    if pid == 0:
        code = 70
        try:
            os.setpgid(0, 0)  # the watchdog's own child is killed with us on a hang
            for fd, p in ((1, out), (2, err)):
                f = os.open(p, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
                os.dup2(f, fd)
                os.close(f)
            sys.stdout = os.fdopen(1, "w", closefd=False)  # not a test runner's capture object
            sys.stderr = os.fdopen(2, "w", closefd=False)
            try:
                code = fn()
            except SystemExit as exc:
                code = exc.code if isinstance(exc.code, int) else (0 if exc.code is None else 1)
            except BaseException:
                traceback.print_exc()
                code = 71
        finally:
            try:
                sys.stdout.flush()
                sys.stderr.flush()
            except Exception:
                pass
            os._exit(code)
    deadline = t0 + timeout
    code: Optional[int] = None
    while True:
        done, status = os.waitpid(pid, os.WNOHANG)
        if done:
            code = os.waitstatus_to_exitcode(status)
            break
        if time.monotonic() > deadline:
            try:
                os.killpg(pid, signal.SIGKILL)
            except OSError:
                os.kill(pid, signal.SIGKILL)
            os.waitpid(pid, 0)
            break
        time.sleep(0.005)
    seconds = time.monotonic() - t0
    return code, seconds, _read(out), _read(err)


def run_cli(case: Case, name: str, args: list[str], timeout: float, work: str) -> Outcome:
    from graddiff.cli import main

    def fn() -> int:
        main(args, prog_name="graddiff")
        return 0

    code, sec, out, err = run_forked(fn, timeout, work)
    return Outcome(case.name, name, code, sec, out, err)


def run_api(case: Case, good: str, timeout: float, work: str) -> Outcome:
    def fn() -> int:
        python_api(case.path, good)
        return 0

    code, sec, out, err = run_forked(fn, timeout, work)
    return Outcome(case.name, "python API", code, sec, out, err)


def prepare(out: str) -> None:
    """Import what the children use once, in the fork server."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot  # noqa: F401

    import graddiff.cli.check  # noqa: F401
    import graddiff.cli.compare  # noqa: F401
    import graddiff.cli.inspect  # noqa: F401
    import graddiff.cli.map  # noqa: F401
    import graddiff.cli.plot  # noqa: F401
    import graddiff.cli.show  # noqa: F401
    import graddiff.diff  # noqa: F401
    import graddiff.postmortem.findings  # noqa: F401

    os.makedirs(out, exist_ok=True)


def make_secret(out: str) -> str:
    secret = os.path.join(out, "secret.txt")
    with open(secret, "w") as fh:
        fh.write("TOKEN-s3cr3t-do-not-print\n")
    return secret


def new_workdir() -> str:
    return tempfile.mkdtemp(prefix="graddiff-fuzz-")
