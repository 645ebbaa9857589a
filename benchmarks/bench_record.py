"""Recording overhead of graddiff.trace, measured against what else could be done per step.

Runs, interleaved round-robin in one process, the same training steps of the same model from
the same initial weights and data under several variants:

    untraced   plain training (the reference)
    stats      graddiff.trace(values="stats"), every kind on
    full       graddiff.trace(values="full"), every kind on
    save       untraced + torch.save({params, grads, buffers, loss}) to a new file each step
               (what users do by hand; PEERS.md 3.2 "naive torch.save")
    save_all   untraced + torch.save of the same tensors graddiff records in full mode
               (params, inputs, activations, loss, output gradients, grads, buffers)
    raw        untraced + writing as many bytes per step as a full trace does, with
               numpy tofile + flush, to a file on the same disk (the physical limit)
    floor      untraced + one read (a sum) of every tensor graddiff records, with minimal hooks
               (the floor of any recorder that looks at every value)
    stats_torch  stats with the fused numba kernel switched off (the pure-torch reference path,
               what graddiff runs where numba is not installed)
    full_pg    graddiff.trace(values="full", full_kinds="param,grad"): values of parameters and
               gradients, statistics of everything else
    tensorboard  untraced + SummaryWriter.add_histogram of every parameter and gradient each step
               (PEERS.md 3.2 "TensorBoard histograms"; needs the tensorboard package)

Models: ``mlp`` (seed MLP, below), ``mlp_small`` (784-300-100-10, 0.27 M parameters, batch 64:
where the per-record cost dominates), ``resnet18`` and ``gpt2`` (transformers'
GPT2LMHeadModel built from a config: 4 layers, 256 wide, 4 heads, vocabulary 8192, no dropout;
batch 8 x 128 tokens). ``--per-record`` times one capture of a small tensor (fused and
reference paths) in microseconds; ``--memory-steps N`` traces N steps of mlp_small and samples
the process's resident memory (flat = no per-step leak).

Each round runs every variant once (the start rotates between rounds), each run does --steps
steps; per-step times are medians, ratios are medians over rounds of (variant median /
untraced median of the same round). Each run starts after ``os.sync()``, so that no variant
pays for the page-cache writeback of the one before it (on the 2-core VM, writes past a few
hundred MB slow to the disk's speed for any writer). After each run the final parameters and buffers are
compared bitwise with the same round's untraced run (OK / MISMATCH).

Models: ``mlp`` is the seed MLP of the forum question (fc1..fc4 = Sequential(Linear(bias=False),
BatchNorm1d, ReLU), widths 784-1440-1440-784-784, fc5 = Linear(784, 10)) at batch 300 on
synthetic data; ``resnet18`` is torchvision's resnet18 (10 classes) at a small CPU-sized batch
(--resnet-batch images of 3 x --resnet-size^2; default 16 x 3x64x64, about 0.2 s a step on
2 cores). SGD lr 0.1, cross entropy, CPU, --threads torch threads (default 2).

Usage::

    python benchmarks/bench_record.py --model all --rounds 5   # the four models, side by side
    python benchmarks/bench_record.py --per-record            # microseconds per capture
    python benchmarks/bench_record.py --memory-steps 10000    # resident memory over 10k steps
    python benchmarks/bench_record.py                       # mlp and resnet18, defaults
    python benchmarks/bench_record.py --model mlp --rounds 7 --steps 20 --json
    python benchmarks/bench_record.py --profile full        # cProfile of the traced step
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import cProfile
import io
import json
import os
import pstats
import shutil
import statistics
import sys
import tempfile
import time
from typing import Any, Callable, Optional

import numpy as np
import torch
from torch import nn

import graddiff
from graddiff.hooks import fused
from graddiff.hooks.naming import flatten_tensors
from graddiff.kinds import ALL_KINDS

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
VARIANTS = (
    "untraced",
    "stats",
    "stats_torch",
    "full",
    "full_pg",
    "save",
    "save_all",
    "raw",
    "floor",
    "tensorboard",
)
DEFAULT_VARIANTS = "untraced,stats,stats_torch,full,full_pg,save_all,floor,tensorboard"
MODELS = ("mlp", "mlp_small", "resnet18", "gpt2")


# -- models and data ------------------------------------------------------------------------
class SeedMLP(nn.Module):
    """The model of the forum question behind graddiff (PEERS.md: the benchmark MLP)."""

    def __init__(
        self, widths: tuple[int, ...] = (784, 1440, 1440, 784, 784), classes: int = 10
    ) -> None:
        super().__init__()
        for i, (a, b) in enumerate(zip(widths[:-1], widths[1:]), start=1):
            self.add_module(
                f"fc{i}", nn.Sequential(nn.Linear(a, b, bias=False), nn.BatchNorm1d(b), nn.ReLU())
            )
        self.fc5 = nn.Linear(widths[-1], classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x.flatten(1)
        x = self.fc4(self.fc3(self.fc2(self.fc1(x))))
        return self.fc5(x)


class Workload:
    """A model with its initial state and a few fixed batches; every run starts identically."""

    def __init__(self, name: str, args: argparse.Namespace) -> None:
        self.name = name
        torch.manual_seed(0)
        g = torch.Generator().manual_seed(1234)
        if name == "mlp":
            self.model = SeedMLP()
            self.batch_desc = "300 x 1x28x28"
            shape, n = (300, 1, 28, 28), 300
        elif name == "mlp_small":
            self.model = nn.Sequential(
                nn.Flatten(),
                nn.Linear(784, 300),
                nn.ReLU(),
                nn.Linear(300, 100),
                nn.ReLU(),
                nn.Linear(100, 10),
            )
            self.batch_desc = "64 x 1x28x28"
            shape, n = (64, 1, 28, 28), 64
        elif name == "gpt2":
            from transformers import GPT2Config, GPT2LMHeadModel

            cfg = GPT2Config(
                n_layer=4,
                n_embd=256,
                n_head=4,
                vocab_size=8192,
                n_positions=128,
                bos_token_id=0,
                eos_token_id=0,
                resid_pdrop=0.0,
                embd_pdrop=0.0,
                attn_pdrop=0.0,
            )
            self.model = GPT2LMHeadModel(cfg)
            self.batch_desc = "8 x 128 tokens"
            self.batches = [
                (ids, ids)
                for ids in (torch.randint(0, 8192, (8, 128), generator=g) for _ in range(4))
            ]
            self.loss_fn = lambda model, x, y: model(input_ids=x, labels=y).loss
            self.params = sum(p.numel() for p in self.model.parameters())
            return
        elif name == "resnet18":
            import torchvision

            self.model = torchvision.models.resnet18(num_classes=10)
            s, n = args.resnet_size, args.resnet_batch
            self.batch_desc = f"{n} x 3x{s}x{s}"
            shape = (n, 3, s, s)
        else:
            raise SystemExit(f"unknown model {name}")
        self.batches = [
            (torch.rand(shape, generator=g), torch.randint(0, 10, (n,), generator=g))
            for _ in range(4)
        ]
        self.loss_fn = lambda model, x, y: nn.functional.cross_entropy(model(x), y)
        self.params = sum(p.numel() for p in self.model.parameters())

    def fresh(self) -> tuple[nn.Module, torch.optim.Optimizer]:
        model = copy.deepcopy(self.model)
        model.train()
        return model, torch.optim.SGD(model.parameters(), lr=0.1)


def train_step(
    model: nn.Module,
    opt: torch.optim.Optimizer,
    batch: tuple,
    after_backward: Optional[Callable] = None,
    loss_fn: Optional[Callable] = None,
) -> torch.Tensor:
    x, y = batch
    opt.zero_grad()
    loss = nn.functional.cross_entropy(model(x), y) if loss_fn is None else loss_fn(model, x, y)
    loss.backward()
    if after_backward is not None:
        after_backward(loss)
    opt.step()
    return loss


def final_state(model: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def bitwise_equal(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> bool:
    if a.keys() != b.keys():
        return False
    for k in a:
        x, y = a[k], b[k]
        if x.shape != y.shape or x.dtype != y.dtype:
            return False
        if not torch.equal(
            x.contiguous().reshape(-1).view(torch.uint8),
            y.contiguous().reshape(-1).view(torch.uint8),
        ):
            return False
    return True


# -- hooks the baselines need (not graddiff's) --------------------------------------------------
class Collector:
    """Minimal hooks that see what graddiff records: inputs, every module output, every output
    gradient. ``on_tensor`` is called with each tensor once per step (aliases skipped)."""

    def __init__(self, model: nn.Module, on_tensor: Callable[[str, torch.Tensor], None]) -> None:
        self.on_tensor = on_tensor
        self.seen: set[tuple[int, int]] = set()
        self.handles = [model.register_forward_pre_hook(self._pre, with_kwargs=True)]
        for name, m in model.named_modules():
            self.handles.append(m.register_forward_hook(self._fwd(name or "(root)")))

    def _once(self, key: str, t: torch.Tensor) -> None:
        ident = (id(t), t._version)
        if ident not in self.seen:
            self.seen.add(ident)
            self.on_tensor(key, t)

    def _pre(self, module: nn.Module, args: tuple, kwargs: dict) -> None:
        for path, a in flatten_tensors([list(args), dict(kwargs)]):
            self._once(f"input/{path}", a.detach())

    def _fwd(self, name: str) -> Callable:
        def hook(module: nn.Module, args: tuple, output: Any) -> None:
            for path, out in flatten_tensors(output):
                key = f"{name}/{path}"
                self._once(f"activation/{key}", out.detach())
                if out.requires_grad:
                    out.register_hook(lambda g, _n=key: self._once(f"grad_output/{_n}", g) or None)

        return hook

    def new_step(self) -> None:
        self.seen = set()

    def remove(self) -> None:
        for h in self.handles:
            h.remove()


def state_tensors(model: nn.Module, loss: torch.Tensor) -> dict[str, torch.Tensor]:
    out: dict[str, torch.Tensor] = {}
    for n, p in model.named_parameters():
        out[f"param/{n}"] = p.detach()
        if p.grad is not None:
            out[f"grad/{n}"] = p.grad
    for n, b in model.named_buffers():
        out[f"buffer/{n}"] = b
    out["loss"] = loss.detach()
    return out


# -- other processes on the same cores ------------------------------------------------------
def _busy_jiffies() -> int:
    """CPU time used by everything on the machine (and stolen by the hypervisor), in ticks."""
    with open("/proc/stat") as fh:
        f = [int(x) for x in fh.readline().split()[1:]]
    return f[0] + f[1] + f[2] + f[5] + f[6] + (f[7] if len(f) > 7 else 0)


class OthersMeter:
    """Share of the machine's CPUs that other processes used while a run was timed.

    The benchmark is only meaningful when it has the cores to itself; runs where others used
    more than --max-others are repeated (the round is run again)."""

    def __init__(self) -> None:
        self.ok = os.path.exists("/proc/stat")
        self.tick = os.sysconf("SC_CLK_TCK") if self.ok else 100
        self.ncpu = os.cpu_count() or 1

    def start(self) -> tuple[float, float, int]:
        return time.perf_counter(), time.process_time(), _busy_jiffies() if self.ok else 0

    def share(self, t0: tuple[float, float, int]) -> float:
        if not self.ok:
            return 0.0
        wall = time.perf_counter() - t0[0]
        mine = time.process_time() - t0[1]
        busy = (_busy_jiffies() - t0[2]) / self.tick
        return max(0.0, busy - mine) / max(wall * self.ncpu, 1e-9)

    def wait_quiet(self, limit: float, max_wait: float, log: Callable[[str], None]) -> None:
        """Sleep until others use less than ``limit`` of the CPUs over 1 s (or max_wait)."""
        deadline = time.perf_counter() + max_wait
        said = False
        while self.ok and time.perf_counter() < deadline:
            t0 = self.start()
            time.sleep(1.0)
            if self.share(t0) < limit:
                return
            if not said:
                log(f"  (other processes busy on this machine; waiting up to {max_wait:.0f} s)")
                said = True


METER = OthersMeter()


# -- one run of one variant ----------------------------------------------------------------
def run_variant(
    variant: str, wl: Workload, steps: int, out_dir: str, raw_bytes: int
) -> dict[str, Any]:
    torch.manual_seed(0)  # every variant starts from the same RNG state too
    if hasattr(os, "sync"):
        os.sync()  # and with no other variant's writes still pending in the page cache
    model, opt = wl.fresh()
    times: list[float] = []
    cpu: list[float] = []  # process CPU time (all threads, the writer's included)
    res: dict[str, Any] = {"variant": variant}
    files: list[str] = []
    path = os.path.join(out_dir, f"bench-{wl.name}-{variant}.h5")

    def loop(
        before: Optional[Callable] = None,
        after_backward: Optional[Callable] = None,
        after: Optional[Callable] = None,
    ) -> None:
        for i in range(steps):
            c0 = time.process_time()
            t0 = time.perf_counter()
            if before is not None:
                before(i)
            loss = train_step(
                model, opt, wl.batches[i % len(wl.batches)], after_backward, wl.loss_fn
            )
            if after is not None:
                after(i, loss)
            times.append(time.perf_counter() - t0)
            cpu.append(time.process_time() - c0)

    t_start = time.perf_counter()
    meter = METER.start()
    if variant == "untraced":
        loop()
    elif variant in ("stats", "full", "stats_torch", "full_pg"):
        waits: list[float] = []
        options: dict[str, Any] = {"values": "stats" if variant.startswith("stats") else "full"}
        if variant == "full_pg":
            options["full_kinds"] = ("param", "grad")
        saved = fused._kernels, fused._failed
        if variant == "stats_torch":  # the pure-torch reference path, as without numba
            fused._kernels, fused._failed = None, "benchmark: reference path"
        try:
            with graddiff.trace(model, path, kinds=list(ALL_KINDS), **options) as tr:
                bw = tr._writer  # benchmark instrumentation: time spent blocked in submit()
                submit = bw.submit

                def timed_submit(step: int, entries: list, **kw: Any) -> None:
                    t = time.perf_counter()
                    submit(step, entries, **kw)
                    waits.append(time.perf_counter() - t)

                bw.submit = timed_submit
                loop()
                t_loop = time.perf_counter()
        finally:
            fused._kernels, fused._failed = saved
        res["exit_s"] = time.perf_counter() - t_loop
        res["steps_written"] = bw.steps_written
        # statistics-only steps written on the training thread (the writer idle): their write
        # is then inside the timed submit() below, counted as queue wait
        res["steps_inline"] = getattr(bw, "steps_inline", 0)
        res["writer_s_per_step"] = bw.write_seconds / max(bw.steps_written, 1)
        res["queue_wait_s_per_step"] = sum(waits) / max(len(waits), 1)
        res["steps_waited"] = sum(1 for w in waits if w > 1e-3)
        res["bytes_per_step"] = os.path.getsize(path) / max(bw.steps_written, 1)
        res["status"] = graddiff.open(path).status
        import h5py

        with h5py.File(path, "r") as f:
            res["records_per_step"] = f["entries"].shape[0] / max(bw.steps_written, 1)
        files.append(path)
    elif variant == "tensorboard":
        from torch.utils.tensorboard import SummaryWriter

        tb_dir = os.path.join(out_dir, f"tb-{wl.name}")
        tb = SummaryWriter(tb_dir, flush_secs=3600)
        named = list(model.named_parameters())

        def histograms(i: int, loss: torch.Tensor) -> None:
            for n, p in named:
                tb.add_histogram(f"param/{n}", p.detach(), i)
                if p.grad is not None:
                    tb.add_histogram(f"grad/{n}", p.grad, i)
            tb.add_scalar("loss", loss.detach(), i)
            tb.flush()

        loop(after=histograms)
        tb.close()
        res["bytes_per_step"] = (
            sum(os.path.getsize(os.path.join(tb_dir, f)) for f in os.listdir(tb_dir)) / steps
        )
        shutil.rmtree(tb_dir, ignore_errors=True)
    elif variant in ("save", "save_all"):
        keep: dict[str, torch.Tensor] = {}
        col = (
            Collector(model, lambda k, t: keep.__setitem__(k, t)) if variant == "save_all" else None
        )

        def save(i: int, loss: torch.Tensor) -> None:
            f = os.path.join(out_dir, f"bench-{wl.name}-{variant}-{i:05d}.pt")
            torch.save({**keep, **state_tensors(model, loss)}, f)
            files.append(f)
            keep.clear()
            if col is not None:
                col.new_step()

        loop(after=save)
        if col is not None:
            col.remove()
        res["bytes_per_step"] = sum(os.path.getsize(f) for f in files) / steps
    elif variant == "raw":
        buf = np.full(raw_bytes, 7, dtype=np.uint8)
        wtimes: list[float] = []
        raw_path = path.replace(".h5", ".bin")
        files.append(raw_path)
        with open(raw_path, "wb") as fh:

            def write(i: int, loss: torch.Tensor) -> None:
                t = time.perf_counter()
                buf.tofile(fh)
                fh.flush()
                wtimes.append(time.perf_counter() - t)

            loop(after=write)
        res["raw_write_s"] = statistics.median(wtimes)
        res["bytes_per_step"] = float(raw_bytes)
    elif variant == "floor":
        sink: list[torch.Tensor] = []
        col = Collector(model, lambda k, t: sink.append(t.sum()))

        def before(i: int) -> None:
            col.new_step()
            for p in model.parameters():  # params at step start
                sink.append(p.detach().sum())

        def after_backward(loss: torch.Tensor) -> None:
            sink.append(loss.detach().sum())
            for p in model.parameters():
                if p.grad is not None:
                    sink.append(p.grad.sum())

        def after(i: int, loss: torch.Tensor) -> None:
            for b in model.buffers():
                sink.append(b.sum())
            sink.clear()

        loop(before=before, after_backward=after_backward, after=after)
        col.remove()
    else:
        raise ValueError(variant)
    res["wall_s"] = time.perf_counter() - t_start
    res["others"] = METER.share(meter)
    res["times"] = times
    res["cpu"] = cpu
    res["state"] = final_state(model)
    for f in files:
        with contextlib.suppress(OSError):
            os.unlink(f)
    return res


# -- the benchmark -------------------------------------------------------------------------
def median(xs: list[float]) -> float:
    return statistics.median(xs) if xs else float("nan")


def bench_model(
    name: str,
    args: argparse.Namespace,
    out_dir: str,
    log: Callable[[str], None],
    deadline: float = float("inf"),
) -> dict[str, Any]:
    wl = Workload(name, args)
    steps = args.steps or {"mlp": 20, "mlp_small": 50}.get(name, 8)
    variants = [v for v in args.variants.split(",") if v]
    if "tensorboard" in variants:
        try:
            from torch.utils.tensorboard import SummaryWriter  # noqa: F401
        except ImportError:
            log("tensorboard is not installed: the tensorboard variant is skipped")
            variants.remove("tensorboard")
    # Warm-up (discarded): first-call costs, and the full trace's bytes per step for "raw".
    warm = {v: run_variant(v, wl, 3, out_dir, 1 << 20) for v in variants if v != "raw"}
    raw_bytes = int(warm["full"]["bytes_per_step"]) if "full" in warm else 64 << 20
    log(
        f"[{name}] batch {wl.batch_desc}; {args.rounds} rounds x {steps} steps; raw write {raw_bytes / 1e6:.1f} MB/step"
    )
    per: dict[str, list[dict[str, Any]]] = {v: [] for v in variants}
    transparency: dict[str, bool] = {v: True for v in variants}
    r = attempts = discarded = 0
    last_round_s = 0.0
    while r < args.rounds:
        if r >= 2 and time.perf_counter() + last_round_s > deadline:
            log(f"[{name}] time budget reached after {r} rounds (--budget-s)")
            break
        attempts += 1
        round_start = time.perf_counter()
        METER.wait_quiet(args.max_others, args.max_wait, log)
        order = variants[r % len(variants) :] + variants[: r % len(variants)]
        results = {v: run_variant(v, wl, steps, out_dir, raw_bytes) for v in order}
        last_round_s = time.perf_counter() - round_start
        busiest = max(res["others"] for res in results.values())
        if busiest > args.max_others and discarded < args.retries:
            discarded += 1
            log(f"[{name}] round discarded: other processes used {busiest:.0%} of the CPUs")
            continue
        ref = results.get("untraced")
        for v, res in results.items():
            if ref is not None:
                transparency[v] &= bitwise_equal(res["state"], ref["state"])
            per[v].append(res)
        for res in results.values():
            del res["state"]
        line = "  ".join(
            f"{v} {median(results[v]['times'][1:]):.3f} ({results[v]['wall_s']:.1f}s)"
            for v in variants
        )
        log(f"[{name}] round {r + 1}/{args.rounds} (others {busiest:.0%}): {line}")
        r += 1
    rows = []
    base = [median(res["times"][1:]) for res in per.get("untraced", [])]
    for v in variants:
        meds = [median(res["times"][1:]) for res in per[v]]
        ratios = [m / b for m, b in zip(meds, base)]
        row: dict[str, Any] = {
            "model": name,
            "variant": v,
            "median_s": median([t for res in per[v] for t in res["times"][1:]]),
            "cpu_s": median([t for res in per[v] for t in res["cpu"][1:]]),
            "cpu_ratio": median(
                [
                    median(res["cpu"][1:]) / median(u["cpu"][1:])
                    for res, u in zip(per[v], per.get("untraced", []))
                ]
            ),
            "others": median([res["others"] for res in per[v]]),
            "round_medians_s": meds,
            "ratio": median(ratios) if base else float("nan"),
            "ratio_min": min(ratios) if ratios else float("nan"),
            "ratio_max": max(ratios) if ratios else float("nan"),
            "transparent": transparency[v],
        }
        for key in (
            "bytes_per_step",
            "writer_s_per_step",
            "queue_wait_s_per_step",
            "exit_s",
            "raw_write_s",
        ):
            vals = [res[key] for res in per[v] if key in res]
            if vals:
                row[key] = median(vals)
        recs = [res["records_per_step"] for res in per[v] if "records_per_step" in res]
        if recs and base:
            row["records_per_step"] = median(recs)
            row["us_per_record"] = median([(m - b) / r * 1e6 for m, b, r in zip(meds, base, recs)])
            # the same from the process's CPU time (all threads): the figure a loaded machine
            # leaves meaningful (waits for a core inflate the wall clock, not the CPU time)
            cpu_meds = [median(res["cpu"][1:]) for res in per[v]]
            cpu_base = [median(u["cpu"][1:]) for u in per["untraced"]]
            row["cpu_us_per_record"] = median(
                [(m - b) / r * 1e6 for m, b, r in zip(cpu_meds, cpu_base, recs)]
            )
        waited = [res["steps_waited"] for res in per[v] if "steps_waited" in res]
        if waited:
            row["steps_waited"] = f"{sum(waited)}/{sum(res['steps_written'] for res in per[v])}"
        inline = [res["steps_inline"] for res in per[v] if "steps_inline" in res]
        if inline:
            row["steps_inline"] = f"{sum(inline)}/{sum(res['steps_written'] for res in per[v])}"
        rows.append(row)
    by = {r["variant"]: r for r in rows}
    targets: dict[str, Any] = {}
    stats_limit = {"mlp": 1.15, "resnet18": 1.15, "gpt2": 1.25, "mlp_small": 2.0}[name]
    if "stats" in by:
        targets["stats_ratio"] = by["stats"]["ratio"]
        targets["stats_target"] = stats_limit
        targets["stats_met"] = by["stats"]["ratio"] <= stats_limit
        if "us_per_record" in by["stats"]:
            targets["us_per_record"] = by["stats"]["us_per_record"]
            targets["us_per_record_met"] = by["stats"]["us_per_record"] <= 25
            targets["cpu_us_per_record"] = by["stats"]["cpu_us_per_record"]
            targets["cpu_us_per_record_met"] = by["stats"]["cpu_us_per_record"] <= 25
        targets["stats_cpu_ratio"] = by["stats"]["cpu_ratio"]
        targets["stats_cpu_met"] = by["stats"]["cpu_ratio"] <= stats_limit
    for save in ("save_all", "save"):
        if "full" in by and save in by:
            targets[f"full_vs_{save}"] = by["full"]["median_s"] / by[save]["median_s"]
            targets[f"full_no_slower_than_{save}"] = by["full"]["median_s"] <= by[save]["median_s"]
    return {
        "model": name,
        "params": wl.params,
        "batch": wl.batch_desc,
        "steps": steps,
        "rounds": r,
        "rounds_discarded": discarded,
        "rows": rows,
        "targets": targets,
    }


def format_table(results: list[dict[str, Any]]) -> str:
    head = (
        "| model | variant | median s/step | x untraced (median, min-max over rounds) "
        "| CPU x untraced | bytes/step | records/step | us/record (wall, CPU) | writer s/step "
        "| others' CPU share | params bitwise |"
    )
    lines = [head, "|---" * (head.count("|") - 1) + "|"]
    for res in results:
        for r in res["rows"]:
            b = r.get("bytes_per_step")
            size = "-" if not b else (f"{b / 1e6:.1f} MB" if b >= 1e6 else f"{b / 1e3:.0f} KB")
            writer = f"{r['writer_s_per_step']:.3f}" if "writer_s_per_step" in r else "-"
            recs = f"{r['records_per_step']:.0f}" if "records_per_step" in r else "-"
            us = (
                f"{r['us_per_record']:.0f}, {r['cpu_us_per_record']:.0f}"
                if "us_per_record" in r
                else "-"
            )
            ok = "OK" if r["transparent"] else "MISMATCH"
            lines.append(
                f"| {r['model']} | {r['variant']} | {r['median_s']:.4f} | {r['ratio']:.2f} "
                f"({r['ratio_min']:.2f}-{r['ratio_max']:.2f}) | {r['cpu_ratio']:.2f} | {size} "
                f"| {recs} | {us} | {writer} | {r['others']:.0%} | {ok} |"
            )
    return "\n".join(lines)


def per_record(args: argparse.Namespace) -> dict[str, Any]:
    """Microseconds per capture of small tensors, fused and reference paths, interleaved: wall
    clock and the thread's CPU time (the second is what a loaded machine leaves meaningful)."""
    from graddiff.hooks.snapshot import capture

    out: dict[str, Any] = {}
    for numel in (1, 64, 4096):
        xs = [torch.randn(numel) for _ in range(2000)]
        timings: dict[str, list[float]] = {"fused": [], "reference": []}
        cpu: dict[str, list[float]] = {"fused": [], "reference": []}
        for _ in range(args.rounds * 2):
            for path in timings:
                saved = fused._kernels, fused._failed
                if path == "reference":
                    fused._kernels, fused._failed = None, "benchmark: reference path"
                try:
                    t0, c0 = time.perf_counter(), time.thread_time()
                    for x in xs:
                        capture("param", "w", x, call=0, seq=0, flags=0, keep_values=False)
                    timings[path].append((time.perf_counter() - t0) / len(xs) * 1e6)
                    cpu[path].append((time.thread_time() - c0) / len(xs) * 1e6)
                finally:
                    fused._kernels, fused._failed = saved
        out[f"numel {numel}"] = {
            k: {
                "median_us": median(v),
                "min_us": min(v),
                "cpu_median_us": median(cpu[k]),
                "cpu_min_us": min(cpu[k]),
            }
            for k, v in timings.items()
        }
    return out


def memory_flat(args: argparse.Namespace, out_dir: str, log: Callable[[str], None]) -> dict:
    """Resident memory of the process while mlp_small is traced (stats) for many steps."""
    wl = Workload("mlp_small", args)
    model, opt = wl.fresh()
    path = os.path.join(out_dir, "bench-memory.h5")
    page = os.sysconf("SC_PAGE_SIZE")

    def rss_mb() -> float:
        with open("/proc/self/statm") as fh:
            return int(fh.read().split()[1]) * page / 2**20

    samples: list[tuple[int, float]] = []
    every = max(1, args.memory_steps // 20)
    t0 = time.perf_counter()
    with graddiff.trace(model, path, values="stats"):
        for i in range(args.memory_steps):
            train_step(model, opt, wl.batches[i % len(wl.batches)], None, wl.loss_fn)
            if i % every == 0 or i == args.memory_steps - 1:
                samples.append((i, rss_mb()))
                log(f"  step {i}: RSS {samples[-1][1]:.1f} MiB")
    size = os.path.getsize(path)
    os.unlink(path)
    later = [m for i, m in samples if i >= args.memory_steps // 10]
    return {
        "steps": args.memory_steps,
        "seconds": time.perf_counter() - t0,
        "rss_mib": samples,
        "rss_growth_after_10pct_mib": (max(later) - min(later)) if later else 0.0,
        "trace_bytes": size,
    }


def profile(args: argparse.Namespace, out_dir: str) -> None:
    """cProfile of traced steps (main thread), plus the writer thread's total time."""
    wl = Workload(args.model if args.model in MODELS else "mlp", args)
    steps = args.steps or 20
    run_variant(args.profile, wl, 3, out_dir, 0)  # warm-up
    model, opt = wl.fresh()
    path = os.path.join(out_dir, "bench-profile.h5")
    prof = cProfile.Profile()
    with graddiff.trace(model, path, values=args.profile) as tr:
        t0 = time.perf_counter()
        prof.enable()
        for i in range(steps):
            train_step(model, opt, wl.batches[i % len(wl.batches)], None, wl.loss_fn)
        prof.disable()
        t_loop = time.perf_counter() - t0
    bw = tr._writer
    os.unlink(path)
    s = io.StringIO()
    pstats.Stats(prof, stream=s).sort_stats("tottime").print_stats(25)
    print(s.getvalue())
    s = io.StringIO()
    pstats.Stats(prof, stream=s).sort_stats("cumulative").print_stats(30)
    print(s.getvalue())
    print(
        f"loop {t_loop / steps:.4f} s/step; writer thread {bw.write_seconds / max(bw.steps_written, 1):.4f} s/step"
    )


def same_disk_tmp() -> str:
    """The system temp dir if it is on the repository's disk, else the repository's parent."""
    tmp = tempfile.gettempdir()
    return tmp if os.stat(tmp).st_dev == os.stat(REPO).st_dev else os.path.dirname(REPO)


def main(argv: Optional[list[str]] = None) -> int:
    p = argparse.ArgumentParser(
        description=__doc__.split("\n")[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter
    )
    p.add_argument("--model", choices=(*MODELS, "both", "all"), default="both")
    p.add_argument(
        "--steps",
        type=int,
        default=0,
        help="steps per run (default: mlp 20, mlp_small 50, resnet18 and gpt2 8)",
    )
    p.add_argument("--rounds", type=int, default=5, help="interleaved rounds of every variant")
    p.add_argument(
        "--variants",
        default=DEFAULT_VARIANTS,
        help="comma-separated subset of " + ",".join(VARIANTS),
    )
    p.add_argument(
        "--out",
        default=None,
        help="scratch folder for trace files (default: a temp dir inside the repo's disk)",
    )
    p.add_argument("--threads", type=int, default=2)
    p.add_argument(
        "--max-others",
        type=float,
        default=0.1,
        help="repeat a round when other processes used more than this share of the CPUs",
    )
    p.add_argument(
        "--max-wait",
        type=float,
        default=60.0,
        help="seconds to wait for a quiet machine before each round",
    )
    p.add_argument(
        "--retries",
        type=int,
        default=10,
        help="noisy rounds to run again, at most (then noisy rounds are kept and flagged)",
    )
    p.add_argument(
        "--budget-s",
        type=float,
        default=float("inf"),
        help="stop starting rounds when the whole run would exceed this many seconds "
        "(shared among the models; at least 2 rounds each)",
    )
    p.add_argument("--resnet-batch", type=int, default=16)
    p.add_argument("--resnet-size", type=int, default=64)
    p.add_argument("--json", action="store_true", help="print one JSON object instead of the table")
    p.add_argument(
        "--per-record", action="store_true", help="microseconds per capture of small tensors"
    )
    p.add_argument(
        "--memory-steps",
        type=int,
        default=0,
        help="trace this many mlp_small steps and report resident memory instead",
    )
    p.add_argument(
        "--profile",
        choices=("stats", "full"),
        default=None,
        help="cProfile the traced loop instead",
    )
    args = p.parse_args(argv)
    began = time.perf_counter()
    torch.set_num_threads(args.threads)
    scratch = args.out or tempfile.mkdtemp(prefix="graddiff-bench-", dir=same_disk_tmp())
    os.makedirs(scratch, exist_ok=True)
    log = (
        (lambda m: print(m, file=sys.stderr, flush=True))
        if args.json
        else (lambda m: print(m, flush=True))
    )
    try:
        if args.profile:
            profile(args, scratch)
            return 0
        if args.per_record:
            print(json.dumps(per_record(args), indent=1))
            return 0
        if args.memory_steps:
            print(json.dumps(memory_flat(args, scratch, log), indent=1))
            return 0
        if "untraced" not in args.variants.split(","):
            args.variants = "untraced," + args.variants
        models = {"both": ("mlp", "resnet18"), "all": MODELS}.get(args.model, (args.model,))
        results = []
        for i, m in enumerate(models):
            # The budget left is shared equally among the models left (cheapest first): what
            # one leaves unused passes to the next. At least 2 rounds per model regardless.
            left = began + args.budget_s - time.perf_counter()
            deadline = time.perf_counter() + left / (len(models) - i)
            results.append(bench_model(m, args, scratch, log, deadline))
    finally:
        if args.out is None:
            shutil.rmtree(scratch, ignore_errors=True)
    meta = {
        "command": " ".join([os.path.basename(sys.executable)] + sys.argv),
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "cpus": os.cpu_count(),
        "graddiff": graddiff.__version__,
        "fused_kernel": fused.available() and "numba",
        "load_average_at_end": os.getloadavg(),
        "elapsed_s": round(time.perf_counter() - began, 1),
    }
    if args.json:
        print(json.dumps({"meta": meta, "results": results}, indent=1))
        return 0
    print()
    print(format_table(results))
    for res in results:
        print(
            f"{res['model']} ({res['batch']}, {res['rounds']} rounds x {res['steps']} steps, "
            f"{res['rounds_discarded']} noisy rounds discarded): {json.dumps(res['targets'])}"
        )
    print(json.dumps(meta))
    return 0


if __name__ == "__main__":
    sys.exit(main())
