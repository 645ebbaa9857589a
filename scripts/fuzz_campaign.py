"""Fuzz campaign: N damaged traces x every command and the Python API (docs/robustness.md).

    python scripts/fuzz_campaign.py --files 500 --seed 1 [--timeout 60] [--watchdog 5]

Records two real traces (a small MLP), damages copies of them (tests/fuzzing.py: byte damage
aimed at the superblock, metadata, heap, tables and values; structural edits with h5py; special
files), runs every command on each through a fork-per-run harness, and prints the figures:
runs, tracebacks, hangs (killed after --timeout s), undocumented exit codes, exit-2 runs whose
stderr is not one Error: line, and the exit codes per command. Exit 0 when no run broke a
promise, 1 otherwise (the failures are listed, and written to --report as JSON).

The workers are fork servers that import graddiff once: do not change the checkout while a
campaign runs, or the runs mix two versions of the code (and fail in ways graddiff does not).
"""

from __future__ import annotations

import argparse
import collections
import json
import os
import sys
import time

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "tests"))

import fuzzing  # noqa: E402


def run_all(cases: list, good: str, work: str, args: argparse.Namespace) -> list[dict]:
    """Every command and the Python API on every case, split over ``args.jobs`` forked workers."""
    t0 = time.monotonic()
    pids = []
    for j in range(args.jobs):
        pid = os.fork()
        if pid == 0:
            code = 1
            try:
                mine = os.path.join(work, f"worker{j}")
                os.makedirs(mine, exist_ok=True)
                with open(os.path.join(work, f"outcomes{j}.jsonl"), "w") as out:
                    for i, case in enumerate(cases[j :: args.jobs]):
                        runs = [
                            fuzzing.run_cli(case, name, argv, args.timeout, mine)
                            for name, argv in fuzzing.commands(case.path, good, mine)
                        ]
                        runs.append(fuzzing.run_api(case, good, args.timeout, mine))
                        for o in runs:
                            row = {
                                "case": case.name,
                                "path": case.path,
                                "command": o.command,
                                "code": o.code,
                                "seconds": o.seconds,
                                "problem": o.problem,
                                "stderr": o.stderr[-1500:] if o.problem else "",
                            }
                            out.write(json.dumps(row) + "\n")
                            if o.problem:
                                print(
                                    f"FAIL {o.problem}: {o.command} on {case.name} ({case.path})",
                                    flush=True,
                                )
                        out.flush()
                        if j == 0 and (i + 1) % 25 == 0:
                            print(
                                f"... worker 0: {i + 1} inputs, {time.monotonic() - t0:.0f} s",
                                flush=True,
                            )
                code = 0
            finally:
                os._exit(code)
        pids.append(pid)
    for pid in pids:
        os.waitpid(pid, 0)
    rows = []
    for j in range(args.jobs):
        with open(os.path.join(work, f"outcomes{j}.jsonl")) as fh:
            rows += [json.loads(line) for line in fh]
    return rows


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--files", type=int, default=500, help="damaged traces to make")
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--timeout", type=float, default=60.0, help="seconds before a run is a hang")
    ap.add_argument("--watchdog", type=float, default=5.0, help="GRADDIFF_WATCHDOG for the runs")
    ap.add_argument("--report", default=None, help="write every failure here as JSON")
    ap.add_argument("--keep", default=None, help="directory for the files (default: a temp dir)")
    ap.add_argument("--jobs", type=int, default=1, help="worker processes (fork servers)")
    args = ap.parse_args()

    os.environ["GRADDIFF_WATCHDOG"] = str(args.watchdog)
    work = args.keep or fuzzing.new_workdir()
    fuzzing.prepare(work)
    t0 = time.monotonic()
    real = os.path.join(work, "real")
    os.makedirs(real, exist_ok=True)
    a, b = fuzzing.record_real_traces(real)
    secret = fuzzing.make_secret(work)
    damaged = os.path.join(work, "damaged")
    os.makedirs(damaged, exist_ok=True)
    cases = fuzzing.damaged_cases(a, b, damaged, args.files, args.seed, secret)
    cases += fuzzing.special_cases(work, a)
    print(
        f"{len(cases)} inputs ({args.files} damaged traces + {len(cases) - args.files} "
        f"special files) in {work}",
        flush=True,
    )

    outcomes = run_all(cases, a, work, args)
    codes: dict[str, collections.Counter] = collections.defaultdict(collections.Counter)
    kinds = collections.Counter(c.name.split("-")[0] for c in cases)
    failures = [o for o in outcomes if o["problem"]]
    runs = len(outcomes)
    for o in outcomes:
        codes[o["command"]]["hang" if o["code"] is None else o["code"]] += 1
    slow = max(outcomes, key=lambda o: o["seconds"])
    slowest = (slow["seconds"], f"{slow['command']} on {slow['case']}")

    problems = collections.Counter(f["problem"] for f in failures)
    print()
    print(
        f"inputs: {len(cases)}; runs: {runs}; wall time {time.monotonic() - t0:.0f} s; "
        f"slowest run {slowest[0]:.1f} s ({slowest[1]})"
    )
    print(f"damage kinds: {dict(sorted(kinds.items()))}")
    print(
        f"tracebacks: {problems['traceback']}; hangs: {problems['hang']}; "
        f"undocumented exits: {sum(v for k, v in problems.items() if k.startswith('exit'))}; "
        f"exit 2 not one Error: line: {problems['not one Error: line']}; "
        f"bytes from outside the trace printed: {problems['printed bytes from outside the trace']}"
    )
    print("exit codes per command:")
    for cmd, c in codes.items():
        print(f"  {cmd:26s} " + ", ".join(f"{k}: {v}" for k, v in sorted(c.items(), key=str)))
    if args.report:
        with open(args.report, "w") as fh:
            json.dump(failures, fh, indent=1)
    for f in failures[:20]:
        print(
            f"  {f['problem']}: {f['command']} on {f['case']} ({f['path']}): "
            f"{f['stderr'].strip().splitlines()[-1:]}"
        )
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
