"""``graddiff plot A.h5 [B.h5] -o FILE``: norms of one run, or the divergence between two."""

from __future__ import annotations

from typing import Optional

import click

from ..postmortem.plots import check_output, plot_divergence, plot_run
from ..reader import open_run
from ..textsafe import echo


@click.command("plot")
@click.argument("run_a", metavar="A.h5")
@click.argument("run_b", metavar="[B.h5]", required=False)
@click.option(
    "-o", "--output", required=True, metavar="FILE", help="Image to write: .png, .svg or .pdf."
)
def plot_cmd(run_a: str, run_b: Optional[str], output: str) -> int:
    """One run: the loss and per-layer gradient and parameter norms over steps (log10 heatmaps).
    Two runs: the divergence heatmap (steps x records, log10 relative difference, first
    divergence circled) and the growth of the difference per kind.

    Needs matplotlib (pip install 'graddiff[plot]'). Exit code 0, or 2 for bad input.
    """
    check_output(output)
    if run_b is None:
        with open_run(run_a) as run:
            fig = plot_run(run, output)
    else:
        import graddiff

        fig = plot_divergence(graddiff.compare(run_a, run_b), output)
    panels = sum(1 for ax in fig.axes if ax.get_label() != "<colorbar>")
    echo(f"wrote {output} ({panels} panels)", err=True)
    return 0
