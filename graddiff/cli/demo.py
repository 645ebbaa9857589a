"""``graddiff demo``: record the motivating bugs and show what ``graddiff compare`` says.

Runs the compact scenarios of ``graddiff.demo.scenarios`` in a temporary folder (or ``--keep``),
compares each pair of runs and prints the reports. The demo exists to show divergences, so it
exits 0 whenever it ran, whatever the reports say.
"""

from __future__ import annotations

import tempfile
import time
from pathlib import Path
from typing import Optional

import click

from . import terminal_console


@click.command("demo")
@click.option(
    "--steps",
    type=click.IntRange(min=2),
    default=40,
    show_default=True,
    help="Training steps per run (batch 300, lr 0.1).",
)
@click.option(
    "--keep",
    "keep",
    default=None,
    metavar="DIR",
    help="Write the trace files to DIR and keep them (default: a temporary folder).",
)
@click.option(
    "--width",
    type=click.IntRange(min=8),
    default=256,
    show_default=True,
    help="Hidden width of question 1's MLP (the question's model: 1440).",
)
@click.option(
    "--only",
    type=click.Choice(["q1", "q2"]),
    multiple=True,
    help="Run only these scenarios (repeatable).",
)
@click.option("--device", default=None, help="Default: cuda when available, else cpu.")
def demo_cmd(
    steps: int, keep: Optional[str], width: int, only: tuple[str, ...], device: Optional[str]
) -> int:
    """Record two small training bugs from real user questions and compare the runs.

    Question 1: manual autograd.grad updates vs opt.step() with two models built one after
    the other. Question 2: backward() + manual update without zero_grad(). Takes under a minute
    on a laptop CPU; the examples/ folder of the repository has the full-size versions.
    """
    import torch

    from ..demo.scenarios import SCENARIOS, Setup
    from ..diff import compare

    console = terminal_console()
    with tempfile.TemporaryDirectory(prefix="graddiff-demo-") as tmp:
        out = Path(keep) if keep else Path(tmp)
        out.mkdir(parents=True, exist_ok=True)
        setup = Setup(
            out=out,
            steps=steps,
            device=torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu")),
            mlp_width=width,
        )
        console.print(
            f"graddiff demo: {steps} steps per run on {setup.device}, synthetic MNIST-shaped "
            f"data (batch 300, lr 0.1); question 1's MLP at width {width} to stay quick."
        )
        for key in only or tuple(SCENARIOS):
            t0 = time.perf_counter()
            rec = SCENARIOS[key](setup)
            console.rule(f"{key}: {rec.title}")
            console.print(f'"{rec.question}"')
            if rec.note:
                console.print(f"note: {rec.note}")
            for ab, (label, acc) in zip("AB", rec.accuracy.items()):
                console.print(f"run {ab}: {label:<24} test accuracy {100 * acc:5.1f} %")
            console.print(f"recorded in {time.perf_counter() - t0:.1f} s; graddiff compare says:\n")
            compare(rec.a, rec.b).render(console)
            console.print()
        if keep:
            console.print(f"Traces kept in {out}: try 'graddiff compare', 'graddiff show' on them.")
    return 0
