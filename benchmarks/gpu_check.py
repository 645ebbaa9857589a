"""One run on a CUDA machine: are the accelerator path's kernels right, and what do they cost?

Not a CI test (CI has no GPU): the lead runs it in one go when a GPU is lent, e.g.

    python benchmarks/gpu_check.py --out "$OUT"            # ~3-5 minutes on one GPU

It checks, on real CUDA tensors, each printed as PASS/FAIL:

1. ``triton_stats.self_check`` for float32/float16/bfloat16/float64 (what graddiff runs at the
   first capture of a dtype);
2. the Triton rows, one tensor per launch and many per launch, against the CPU definition:
   fingerprints bit for bit equal to ``graddiff.format.fingerprint_bytes`` of the bytes copied
   to the host and to the torch-op device path's (``snapshot.stats_on_device``); min/max and
   NaN/Inf counts equal to the CPU path's; norm and mean within 1e-9 of float64 arithmetic;
   the same rows bitwise in a second run (determinism); sizes up to 2**24 + 3 elements;
3. no host sync: captures and the step's flush run under ``torch.cuda.set_sync_debug_mode
   ("error")`` (after the one-time self-check);
4. deferral (``DeviceStatsBatch.add_tensor``): a model of 12 Linear+ReLU and 4 residual
   blocks (in-place adds), stats mode: from the second step the activations and output
   gradients cost a few group launches per step (at most 12 graddiff launches in all), and
   every activation's and output gradient's fingerprint equals that of a host copy taken by a
   hook right after graddiff's (the tensor as captured);
5. traced training: the seed MLP (and resnet18 when torchvision imports) on the GPU, traced
   with ``values="full"``: parameters bitwise equal to the untraced run's, and every stored
   value of every entry read back through ``graddiff.open(...).get`` (which checks the Triton
   fingerprint against the stored bytes) with norm/min/max checked against the values;
6. timing (interleaved rounds, medians, ``torch.cuda.synchronize`` after each step): untraced,
   stats mode on the Triton path, stats mode on the torch-op path (``GRADDIFF_NO_TRITON=1``),
   and the CUDA kernels per step of each (torch.profiler), for the seed MLP and resnet18.

Exit status 0 when every check passed, 1 otherwise; ``--out DIR`` also writes
``gpu_check.json`` there. It also runs the CPU test files of the device path
(``tests/test_device_stats.py``, ``tests/test_triton_stats.py``) unless ``--no-pytest``.
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import os
import statistics
import subprocess
import sys
import tempfile
import time
import traceback
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch
from torch import nn

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))

import graddiff  # noqa: E402
from graddiff.format import fingerprint_bytes  # noqa: E402
from graddiff.hooks import device_stats, triton_stats  # noqa: E402
from graddiff.hooks.snapshot import stats_on_cpu_reference, stats_on_device  # noqa: E402

DTYPES = (torch.float32, torch.float16, torch.bfloat16, torch.float64)
#: --cpu-dry-run (with TRITON_INTERPRET=1): the script's own logic on CPU tensors, small sizes
DRY = "--cpu-dry-run" in sys.argv
RESULTS: dict[str, Any] = {"checks": {}, "timings": {}}


def check(name: str, fn: Callable[[], Any]) -> None:
    t0 = time.perf_counter()
    try:
        detail = fn()
        ok = True
    except Exception as exc:
        ok, detail = False, f"{type(exc).__name__}: {exc}\n{traceback.format_exc(limit=6)}"
    RESULTS["checks"][name] = {"ok": ok, "detail": detail, "s": round(time.perf_counter() - t0, 2)}
    print(f"{'PASS' if ok else 'FAIL'} {name} ({time.perf_counter() - t0:.1f} s)"
          + (f": {detail}" if detail else ""), flush=True)  # fmt: skip


def host_raw(x: torch.Tensor) -> np.ndarray:
    c = x.detach().contiguous().reshape(-1).cpu()
    return (c.view(torch.int16) if c.dtype == torch.bfloat16 else c).numpy()


def tensors(dtype: torch.dtype, g: torch.Generator) -> list[torch.Tensor]:
    sizes = [0, 1, 3, 7, 1023, 4096, 8193, 65_537, 1_000_003, (1 << 24) + 3]
    if DRY:
        sizes = sizes[:7]
    xs = [(torch.randn(n, generator=g) * 4).to(dtype) for n in sizes]
    special = torch.tensor([1.5, float("nan"), -0.0, float("inf"), -2.0, float("-inf"), 1e-40])
    xs += [special.to(dtype), torch.full((9,), float("nan")).to(dtype)]
    xs.append(torch.randn(300, 7 if DRY else 77, generator=g).to(dtype).t())  # non-contiguous
    return xs


def kernel_rows(xs: list[torch.Tensor], grouped: bool) -> torch.Tensor:
    rows = triton_stats.StepRows(xs[0].device)
    got = rows.launch(xs) if grouped else [rows.launch([x])[0] for x in xs]
    out = rows.finalize()[got].cpu()
    sync()
    return out


def sync() -> None:
    if not DRY:
        torch.cuda.synchronize()


def compare(x_cpu: torch.Tensor, row: torch.Tensor, torch_row: torch.Tensor) -> None:
    stats, fp = triton_stats.unpack(row)
    what = f"{x_cpu.dtype} x {x_cpu.numel()}"
    assert fp == fingerprint_bytes(host_raw(x_cpu)), f"fingerprint vs format: {what}"
    assert fp == triton_stats.unpack(torch_row)[1], f"fingerprint vs torch-op path: {what}"
    want, want_fp = stats_on_cpu_reference(x_cpu)
    assert fp == want_fp, what
    assert stats[4:] == want[4:], f"NaN/Inf counts {what}: {stats} vs {want}"
    for a, b in zip(stats[2:4], want[2:4]):
        assert a == b or (math.isnan(a) and math.isnan(b)), f"min/max {what}: {stats} vs {want}"
    if x_cpu.numel():
        xd = x_cpu.double()
        norm, mean = float(torch.linalg.vector_norm(xd)), float(xd.mean())
        if math.isfinite(norm) and math.isfinite(mean):
            rms = norm / math.sqrt(x_cpu.numel())
            assert abs(stats[0] - norm) <= 1e-9 * norm, f"norm {what}: {stats[0]} vs {norm}"
            assert abs(stats[1] - mean) <= 1e-9 * rms, f"mean {what}: {stats[1]} vs {mean}"


def check_kernels(device: torch.device) -> str:
    g = torch.Generator().manual_seed(0)
    n = 0
    for dtype in DTYPES:
        cpu = tensors(dtype, g)
        xs = [x.to(device) for x in cpu]
        torch_rows = [stats_on_device(x).cpu() for x in xs]
        single = kernel_rows(xs, grouped=False)
        grouped = kernel_rows(xs, grouped=True)
        again = kernel_rows(xs, grouped=True)
        assert torch.equal(grouped.view(torch.int64), again.view(torch.int64)), "not deterministic"
        for x, a, b, t in zip(cpu, single, grouped, torch_rows):
            compare(x, a, t)
            compare(x, b, t)
            n += 1
    return f"{n} tensors x (single, grouped) launches, 4 dtypes"


def check_no_sync(device: torch.device) -> str:
    from graddiff.hooks.snapshot import PendingEntry, capture_on_device

    xs = [torch.randn(n, device=device).to(dt) for n in (5, 70_001) for dt in DTYPES]
    xs.append(torch.randint(0, 9, (11,), device=device))  # torch-op path in the same step
    batch = device_stats.DeviceStatsBatch()
    for x in xs:  # warm-up: self-check and compile (each waits on its own side stream only)
        assert batch.add_tensor(PendingEntry("param", "w", 0, "", (), (0.0,) * 6, (0, 0)), x) or (
            x.dtype == torch.int64
        )
    batch.flush()
    torch.cuda.synchronize()
    entries = [PendingEntry("param", "w", 0, str(x.dtype), (), (0.0,) * 6, (0, 0)) for x in xs]
    torch.cuda.set_sync_debug_mode("error")
    try:
        for e, x in zip(entries[:4], xs[:4]):
            capture_on_device(e, x, False, batch)
        with batch.group():
            for e, x in zip(entries[4:], xs[4:]):
                capture_on_device(e, x, False, batch)
        batch.flush()
    finally:
        torch.cuda.set_sync_debug_mode("default")
    for e, x in zip(entries, xs):
        e.resolve()
        assert e.fingerprint == fingerprint_bytes(host_raw(x)), str(x.dtype)
    return f"{len(xs)} captures + flush with sync debug mode 'error'"


# -- hook captures deferred into a few launches per step ----------------------------------
class _Residual(nn.Module):
    """A block whose BatchNorm output is changed in place after its hook (ResNet's
    ``out += identity``): graddiff must learn to summarise it at capture."""

    def __init__(self, width: int) -> None:
        super().__init__()
        self.fc = nn.Linear(width, width)
        self.bn = nn.BatchNorm1d(width)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.bn(self.fc(x))
        out += x
        return torch.relu(out)


def check_deferred(device: torch.device) -> str:
    """Stats mode on 12 Linear+ReLU and 4 residual blocks: from the second step the
    activations and output gradients cost a few group launches per step (StepRows.launches),
    not one each, and every activation's and output gradient's fingerprint equals that of a
    host copy taken by a hook that runs right after graddiff's (the tensor as captured), the
    in-place changed BatchNorm outputs included."""
    from graddiff.hooks.naming import module_display_name

    torch.manual_seed(0)
    width = 64 if DRY else 512
    layers: list[nn.Module] = []
    for _ in range(12):
        layers += [nn.Linear(width, width), nn.ReLU()]
    layers += [_Residual(width) for _ in range(4)]
    model = nn.Sequential(*layers, nn.Linear(width, 10)).to(device)
    g = torch.Generator().manual_seed(2)
    batches = [(torch.randn(32, width, generator=g).to(device),
                torch.randint(0, 10, (32,), generator=g).to(device)) for _ in range(2)]  # fmt: skip
    seen: dict[tuple[int, str, str], tuple[int, int]] = {}
    step = [0]

    def fp(t: torch.Tensor) -> tuple[int, int]:
        return fingerprint_bytes(host_raw(t.detach()))

    def watch(name: str):
        def hook(module: nn.Module, args: Any, out: Any) -> None:
            if isinstance(out, torch.Tensor):
                seen[(step[0], "activation", name)] = fp(out)
                if out.requires_grad:
                    out.register_hook(
                        lambda gr, k=(step[0], "grad_output", name): seen.__setitem__(k, fp(gr))
                    )

        return hook

    launches: list[int] = []
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "deferred.h5")
        with graddiff.trace(model, path, values="stats") as tr:
            # registered after graddiff's hooks: each sees the tensor as graddiff captured it
            handles = [
                m.register_forward_hook(watch(module_display_name(n)))
                for n, m in model.named_modules()
            ]  # fmt: skip
            opt = torch.optim.SGD(model.parameters(), lr=0.01)
            for i in range(4):
                step[0] = i
                rows = tr._recorder._device_batch._steps
                before = sum(r.launches for r in rows.values())
                x, y = batches[i % 2]
                opt.zero_grad()
                nn.functional.cross_entropy(model(x), y).backward()
                opt.step()
                rows = tr._recorder._device_batch._steps
                launches.append(sum(r.launches for r in rows.values()) - before)
            for h in handles:
                h.remove()
        checked = 0
        with graddiff.open(path) as run:
            for e in run.entries():
                key = run._keys[int(e["record"])]
                want = seen.get((int(e["step"]), key.kind, key.name))
                if want is None or key.call:
                    continue
                got = (int(e["fp_sum"]), int(e["fp_pos"]))
                assert got == want, f"{key} at step {int(e['step'])}: not the captured tensor"
                checked += 1
    assert checked >= 4 * 40, f"only {checked} records checked"
    assert max(launches[1:]) <= 12, f"launches per step {launches}"
    return f"{checked} records checked; graddiff launches per step {launches} (first: learning)"


# -- traced training ------------------------------------------------------------------------
def workload(name: str, device: torch.device):
    from bench_record import SeedMLP

    torch.manual_seed(0)
    g = torch.Generator().manual_seed(1)
    if name == "mlp":
        model, shape, n = SeedMLP(), (300, 1, 28, 28), 300
    else:
        import torchvision

        model = torchvision.models.resnet18(num_classes=10)
        shape, n = ((2, 3, 32, 32), 2) if DRY else ((64, 3, 64, 64), 64)
    batches = [
        (torch.rand(shape, generator=g).to(device), torch.randint(0, 10, (n,), generator=g).to(device))
        for _ in range(4)
    ]  # fmt: skip
    return model.to(device), batches


def train(model: nn.Module, batches: list, steps: int, sync: bool = True) -> list[float]:
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    times = []
    for i in range(steps):
        t0 = time.perf_counter()
        x, y = batches[i % len(batches)]
        opt.zero_grad()
        nn.functional.cross_entropy(model(x), y).backward()
        opt.step()
        if sync:
            globals()["sync"]()
        times.append(time.perf_counter() - t0)
    return times


def check_traced(name: str, device: torch.device, tmp: str) -> str:
    base, batches = workload(name, device)
    plain = copy.deepcopy(base)
    train(plain, batches, 3)
    traced = copy.deepcopy(base)
    path = os.path.join(tmp, f"{name}.h5")
    with graddiff.trace(traced, path, values="full"):
        train(traced, batches, 3)
    for (k, a), b in zip(plain.state_dict().items(), traced.state_dict().values()):
        assert torch.equal(a, b), f"{k} differs from the untraced run"
    from graddiff.format import FLAG_VALUES

    n = 0
    with graddiff.open(path) as run:
        for e in run.entries():
            if not e["flags"] & FLAG_VALUES:
                continue
            v = np.asarray(run.values_of(e), dtype=np.float64)  # raises if fingerprint differs
            fin = v[np.isfinite(v)]
            if fin.size and e["nan"] == 0 and e["inf"] == 0:
                norm = float(np.linalg.norm(v))
                where = (int(e["record"]) if "record" in e.dtype.names else "?", int(e["step"]))
                assert abs(float(e["norm"]) - norm) <= 1e-6 * max(norm, 1e-30), where
                assert float(e["min"]) == fin.min() and float(e["max"]) == fin.max(), where
            n += 1
    assert n, "no entry kept full values"
    return f"{n} entries verified (fingerprint vs stored bytes, stats vs values); params bitwise"


def kernels_per_step(model: nn.Module, batches: list, traced_path: str | None) -> float:
    from torch.profiler import ProfilerActivity, profile

    ctx = graddiff.trace(model, traced_path, values="stats") if traced_path else None
    steps = 3
    if ctx is not None:
        ctx.__enter__()
    try:
        train(model, batches, 2)  # warm-up
        with profile(activities=[ProfilerActivity.CUDA]) as prof:
            train(model, batches, steps)
    finally:
        if ctx is not None:
            ctx.__exit__(None, None, None)
    kernels = [e for e in prof.events() if e.device_type == torch.autograd.DeviceType.CUDA]
    return len(kernels) / steps


def time_models(device: torch.device, tmp: str, rounds: int, steps: int) -> None:
    names = ["mlp"]
    try:
        import torchvision  # noqa: F401

        names.append("resnet18")
    except ImportError:
        print("resnet18 skipped: torchvision does not import", flush=True)
    for name in names:
        base, batches = workload(name, device)
        variants = {"untraced": None, "stats_triton": "0", "stats_torch_ops": "1"}
        per: dict[str, list[float]] = {v: [] for v in variants}
        for r in range(rounds):
            for v, no_triton in variants.items():
                model = copy.deepcopy(base)
                if no_triton is None:
                    times = train(model, batches, steps)
                else:
                    os.environ["GRADDIFF_NO_TRITON"] = no_triton
                    with graddiff.trace(model, os.path.join(tmp, f"t{r}{v}.h5"), values="stats"):
                        times = train(model, batches, steps)
                per[v].append(statistics.median(times[2:]))
        os.environ.pop("GRADDIFF_NO_TRITON", None)
        launches = {}
        for v, no_triton in variants.items():
            if no_triton is not None:
                os.environ["GRADDIFF_NO_TRITON"] = no_triton
            try:
                path = os.path.join(tmp, f"k{v}.h5") if no_triton is not None else None
                if DRY:
                    raise RuntimeError("not in a dry run")
                launches[v] = kernels_per_step(copy.deepcopy(base), batches, path)
            except Exception as exc:
                launches[v] = f"profiler failed: {exc}"
            os.environ.pop("GRADDIFF_NO_TRITON", None)
        un = statistics.median(per["untraced"])
        row = {
            v: {
                "ms_per_step": round(1e3 * statistics.median(t), 3),
                "x_untraced": round(statistics.median(t) / un, 3),
                "rounds_ms": [round(1e3 * x, 3) for x in t],
                "cuda_ops_per_step": launches[v],
            }
            for v, t in per.items()
        }
        RESULTS["timings"][name] = row
        for v, d in row.items():
            print(f"{name:9s} {v:16s} {d['ms_per_step']:9.3f} ms/step  x{d['x_untraced']:.3f}  "
                  f"CUDA kernels+copies/step {d['cuda_ops_per_step']}", flush=True)  # fmt: skip


def kernels_on() -> str:
    failed = device_stats._TRITON["failed"]
    assert failed is None, f"the Triton path was disabled: {failed}"
    return ""


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--out", default=os.environ.get("OUT"), help="directory for gpu_check.json")
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--steps", type=int, default=12)
    p.add_argument("--no-pytest", action="store_true")
    p.add_argument(
        "--cpu-dry-run",
        action="store_true",
        help="with TRITON_INTERPRET=1: run this script's logic on CPU tensors (no sync or "
        "profiler checks; the traced runs take the CPU path), to test the script itself",
    )
    args = p.parse_args()
    if args.cpu_dry_run:
        if os.environ.get("TRITON_INTERPRET") != "1":
            print("Error: --cpu-dry-run needs TRITON_INTERPRET=1", file=sys.stderr)
            return 2
        device = torch.device("cpu")
        np.seterr(all="ignore")  # the interpreter's numpy warns where IEEE makes NaN/Inf
    elif not torch.cuda.is_available():
        print("Error: no CUDA device", file=sys.stderr)
        return 2
    else:
        device = torch.device("cuda", torch.cuda.current_device())
    import triton

    RESULTS["env"] = {
        "torch": torch.__version__,
        "triton": triton.__version__,
        "gpu": torch.cuda.get_device_name(device) if not DRY else "none (dry run)",
        "cuda": torch.version.cuda,
    }
    print(json.dumps(RESULTS["env"]), flush=True)
    for dtype in DTYPES:
        check(f"self_check {dtype}", lambda d=dtype: triton_stats.self_check(device, d) or "")
    check("kernels vs CPU definition and torch-op path", lambda: check_kernels(device))
    if not DRY:
        check("no host sync in capture and flush", lambda: check_no_sync(device))
    check("hook captures deferred into a few launches", lambda: check_deferred(device))
    with tempfile.TemporaryDirectory() as tmp:
        check("traced seed MLP (full values verified)", lambda: check_traced("mlp", device, tmp))
        try:
            import torchvision  # noqa: F401

            check("traced resnet18 (full values verified)",
                  lambda: check_traced("resnet18", device, tmp))  # fmt: skip
        except ImportError:
            pass
        check("fallback unused (no warning, kernels on)", kernels_on)
        if DRY:
            args.rounds, args.steps = 1, 4
        time_models(device, tmp, args.rounds, args.steps)
    if not args.no_pytest:
        cmd = [sys.executable, "-m", "pytest", "-q", "tests/test_device_stats.py",
               "tests/test_triton_stats.py"]  # fmt: skip
        r = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True)
        RESULTS["checks"]["pytest device tests"] = {"ok": r.returncode == 0,
                                                    "detail": r.stdout[-2000:]}  # fmt: skip
        print(("PASS" if r.returncode == 0 else "FAIL") + " pytest: " + r.stdout.strip()[-300:])
    if args.out:
        os.makedirs(args.out, exist_ok=True)
        with open(os.path.join(args.out, "gpu_check.json"), "w") as f:
            json.dump(RESULTS, f, indent=1, default=str)
    ok = all(c["ok"] for c in RESULTS["checks"].values())
    print("ALL PASS" if ok else "SOME CHECKS FAILED", flush=True)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
