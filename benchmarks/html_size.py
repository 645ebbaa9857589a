"""Size of the interactive HTML report for a large comparison (steps x records).

Builds a ``graddiff.diff.Report`` whose divergence matrix is synthetic (no traces needed), in
two patterns, and prints the size of ``render_html``'s output:

* ``typical``: bitwise equal for the first 30 % of the steps, then differences that grow
  smoothly over the steps, a few records absent (what a real divergence looks like);
* ``noise``: a random relative difference in every cell (incompressible: the upper bound).

Usage: python benchmarks/html_size.py [--steps 2000] [--records 500]
"""

from __future__ import annotations

import argparse

import numpy as np

from graddiff.diff.report import Difference, Report
from graddiff.postmortem.html import render_html


def report(n_steps: int, n_records: int, pattern: str) -> Report:
    rng = np.random.default_rng(0)
    steps = np.arange(n_steps)
    labels = [f"grad blocks.{i // 10}.layer{i % 10}.weight" for i in range(n_records)]
    if pattern == "noise":
        rel = 10.0 ** rng.uniform(-9, 0, (n_steps, n_records))
    else:
        start = int(0.3 * n_steps)
        rel = np.zeros((n_steps, n_records))
        t = np.arange(n_steps - start)[:, None]
        rate = np.linspace(0.002, 0.02, n_records)[None, :]
        rel[start:] = np.minimum(1.0, 1e-7 * np.exp(rate * t))
        rel[:, ::97] = np.nan
    first = Difference(
        step=int(0.3 * n_steps),
        kind="grad",
        name="blocks.0.layer0.weight",
        call=0,
        label=labels[0],
        status="values",
        basis="values",
        rel_diff=0.5,
    )
    r = Report(
        run_a="a.h5",
        run_b="b.h5",
        rtol=1e-3,
        exact=False,
        steps={"compared": n_steps, "first": 0, "last": n_steps - 1},
        first=first,
        first_bitwise=first,
        diagnosis=[],
        environment_diff=[],
        structure={},
        growth={"grad": [(int(s), float(np.nanmax(rel[s]))) for s in steps]},
        kinds=["grad"],
    )
    r._matrix = lambda: (steps, labels, rel)
    return r


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--steps", type=int, default=2000)
    p.add_argument("--records", type=int, default=500)
    a = p.parse_args()
    for pattern in ("typical", "noise"):
        text = render_html(report(a.steps, a.records, pattern))
        size = len(text.encode("utf-8"))
        print(f"{a.steps} steps x {a.records} records, {pattern:8s}: {size / 2**20:.2f} MiB")


if __name__ == "__main__":
    main()
