"""Plots: norms of one run (``graddiff plot A.h5``) and the divergence of two (``Report.plot``).

Data flow: Run --series--> :func:`plot_run`; ``graddiff.diff.Report`` (``divergence_matrix()``,
``growth``, ``first``) --> :func:`plot_divergence`. Both return the matplotlib Figure (so tests
count panels by their labels) and save it when given a path. matplotlib is the optional
``plot`` extra, imported here only; figures are built without pyplot (no global state, no GUI).
"""

from __future__ import annotations

import os
from typing import Any, Optional

import numpy as np

from ..errors import GraddiffError
from ..kinds import CAUSAL_RANK, GRADIENT_KINDS
from ..reader import Run
from .series import collect_series, loss_curve

FORMATS = (".png", ".svg", ".pdf")
MAX_TICK_LABELS = 40


def _figure_class():
    try:
        from matplotlib.figure import Figure
    except ImportError:
        raise GraddiffError(
            "plotting needs matplotlib, which is not installed: pip install 'graddiff[plot]'"
        ) from None
    return Figure


def check_output(path: Any) -> str:
    """The output path, validated: a known image format in an existing folder."""
    path = os.fspath(path)
    ext = os.path.splitext(path)[1].lower()
    if ext not in FORMATS:
        raise GraddiffError(
            f"{path}: unsupported plot format {ext or '(none)'!r}; use {', '.join(FORMATS)}"
        )
    folder = os.path.dirname(os.path.abspath(path))
    if not os.path.isdir(folder):
        raise GraddiffError(f"{path}: the folder {folder} does not exist")
    return path


def _save(fig, path: Optional[Any]) -> None:
    if path is not None:
        path = check_output(path)
        try:
            fig.savefig(path, dpi=110)
        except OSError as exc:
            raise GraddiffError(f"{path}: cannot write the plot ({exc.strerror or exc})") from None


def _cmap(name: str):
    import matplotlib

    return matplotlib.colormaps[name].with_extremes(bad="#dddddd", under="#ffffff")


def _label_rows(ax, labels: list[str]) -> None:
    n = len(labels)
    every = max(1, -(-n // MAX_TICK_LABELS))
    ticks = list(range(0, n, every))
    ax.set_yticks(ticks)
    ax.set_yticklabels([labels[i] for i in ticks], fontsize=7 if n > 12 else 8)


def _integer_steps(ax) -> None:
    from matplotlib.ticker import MaxNLocator

    ax.xaxis.set_major_locator(MaxNLocator(integer=True))


def _heatmap(
    fig, ax, matrix: np.ndarray, steps: np.ndarray, labels: list[str], title: str, cbar: str
):
    """log10 image of ``matrix`` (rows = labels, columns = steps); grey where absent."""
    shown = np.ma.masked_invalid(matrix)
    half = 0.5 if len(steps) < 2 else (steps[-1] - steps[0]) / (len(steps) - 1) / 2
    extent = (steps[0] - half, steps[-1] + half, len(labels) - 0.5, -0.5)
    im = ax.imshow(
        shown, aspect="auto", interpolation="nearest", cmap=_cmap("viridis"), extent=extent
    )
    _label_rows(ax, labels)
    ax.set_title(title, fontsize=10, loc="left")
    ax.set_xlabel("step")
    _integer_steps(ax)
    fig.colorbar(im, ax=ax, label=cbar, pad=0.01)
    return im


def _log_norms(series: dict, kinds: set, steps: np.ndarray):
    """(labels, log10-norm matrix, non-finite mask) for the records of ``kinds``."""
    pos = {int(s): i for i, s in enumerate(steps)}
    keys = [k for k in series if k.kind in kinds]
    labels = [k.name if len(kinds) == 1 else f"{k.kind} {k.name}" for k in keys]
    labels = [f"{lab} (call {k.call})" if k.call else lab for lab, k in zip(labels, keys)]
    mat = np.full((len(keys), len(steps)), np.nan)
    bad = np.zeros_like(mat, dtype=bool)
    for r, k in enumerate(keys):
        s = series[k]
        cols = [pos[int(x)] for x in s.steps]
        norms = s.norm.astype(np.float64)
        nonfinite = ~np.isfinite(norms) | (s.rows["nan"] > 0) | (s.rows["inf"] > 0)
        with np.errstate(divide="ignore"):
            mat[r, cols] = np.where(nonfinite, np.nan, np.log10(np.maximum(norms, 1e-45)))
        bad[r, cols] = nonfinite
    return labels, mat, bad


def _empty(ax, text: str) -> None:
    ax.text(0.5, 0.5, text, ha="center", va="center", transform=ax.transAxes, color="#666666")
    ax.set_xticks([])
    ax.set_yticks([])


def plot_run(run: Run, path: Optional[Any] = None):
    """Loss, per-layer gradient norms and parameter norms over steps (log10 heatmaps).

    Panels (axes labels): ``loss``, ``grad``, ``param`` (plus two colorbars). Non-finite
    entries are marked with red crosses. Returns the Figure; saves it when ``path`` is given.
    """
    Figure = _figure_class()
    if path is not None:
        check_output(path)
    series = collect_series(run, kinds={"loss", "param", *GRADIENT_KINDS})
    steps = np.asarray(run.steps, dtype=np.int64)
    grad_kinds = {k.kind for k in series if k.kind in GRADIENT_KINDS} or {"grad"}
    n_params = sum(1 for k in series if k.kind == "param")
    n_grads = sum(1 for k in series if k.kind in grad_kinds)
    rows = max(n_params, n_grads, 1)
    fig = Figure(figsize=(10, 4 + min(rows, 60) * 0.36), layout="constrained")
    grid = fig.add_gridspec(
        3, 1, height_ratios=[1.2, max(1.5, n_grads * 0.25), max(1.5, n_params * 0.25)]
    )
    ax_loss = fig.add_subplot(grid[0], label="loss")
    ax_grad = fig.add_subplot(grid[1], label="grad")
    ax_param = fig.add_subplot(grid[2], label="param", sharex=ax_grad if n_grads else None)
    fig.suptitle(f"{os.path.basename(run.path)}: {len(steps)} steps", fontsize=11)

    loss_steps, loss = loss_curve(run, series)
    if len(loss):
        finite = np.isfinite(loss)
        ax_loss.plot(loss_steps[finite], loss[finite], color="C0", lw=1.2)
        if (~finite).any():  # non-finite losses: red crosses along the bottom
            floor = float(loss[finite].min()) if finite.any() else 0.0
            ax_loss.plot(
                loss_steps[~finite], np.full((~finite).sum(), floor), "rx", label="NaN/Inf"
            )
            ax_loss.legend(fontsize=8)
        if (
            finite.any()
            and np.all(loss[finite] > 0)
            and loss[finite].max() / loss[finite].min() > 100
        ):
            ax_loss.set_yscale("log")
        ax_loss.set_ylabel("loss")
        ax_loss.set_title("loss", fontsize=10, loc="left")
        ax_loss.grid(alpha=0.3)
        _integer_steps(ax_loss)
    else:
        _empty(ax_loss, "no loss recorded")

    for ax, kinds, title in (
        (ax_grad, grad_kinds, "gradient norm (log10)"),
        (ax_param, {"param"}, "parameter norm (log10)"),
    ):
        labels, mat, bad = _log_norms(series, kinds, steps)
        if not labels or not len(steps):
            _empty(ax, f"no {' / '.join(sorted(kinds))} recorded")
            continue
        _heatmap(fig, ax, mat, steps, labels, title, "log10 norm")
        rr, cc = np.nonzero(bad)
        if len(rr):
            ax.plot(steps[cc], rr, "x", color="red", ms=5, label="NaN/Inf")
            ax.legend(fontsize=8, loc="upper right")
    _save(fig, path)
    return fig


def _first_label(first: Any, labels: list[str]) -> Optional[int]:
    """Row of the first divergent record in the divergence matrix, matched by kind and name."""
    if not first:
        return None
    kind, name = str(first.get("kind", "")), str(first.get("name", ""))
    for i, lab in enumerate(labels):
        if lab in (first.get("label"), f"{kind} {name}", name):
            return i
    for i, lab in enumerate(labels):
        if name and name in lab and kind in lab:
            return i
    return None


def plot_divergence(report: Any, path: Optional[Any] = None):
    """Where two runs diverge: a steps x records heatmap of log10 relative difference (causal
    order, first divergence circled) and the growth of the difference per kind.

    ``report`` is a ``graddiff.diff.Report`` (anything with ``divergence_matrix()``, ``growth``,
    ``to_dict()``, ``run_a`` and ``run_b``). Panels (axes labels): ``divergence``, ``growth``.
    """
    Figure = _figure_class()
    if path is not None:
        check_output(path)
    steps, labels, rel = report.divergence_matrix()
    steps = np.asarray(steps)
    rel = np.asarray(rel, dtype=np.float64).reshape(len(steps), len(labels))
    first = report.to_dict().get("first")
    fig = Figure(figsize=(11, 3.5 + min(len(labels), 60) * 0.2 + 2.5), layout="constrained")
    grid = fig.add_gridspec(2, 1, height_ratios=[max(2.0, min(len(labels), 60) * 0.2), 2.2])
    ax_div = fig.add_subplot(grid[0], label="divergence")
    ax_growth = fig.add_subplot(grid[1], label="growth")
    name_a, name_b = (os.path.basename(str(p)) for p in (report.run_a, report.run_b))
    verdict = (
        f"first divergence: step {first['step']}, {first['kind']} {first['name']}"
        if first
        else "no divergence"
    )
    fig.suptitle(f"{name_a} vs {name_b}: {verdict}", fontsize=11)

    if len(steps) and len(labels):
        with np.errstate(divide="ignore", invalid="ignore"):
            logs = np.log10(rel.T)  # rows = records, columns = steps; 0 -> -inf -> 'under'
        finite = logs[np.isfinite(logs)]
        vmax = float(finite.max()) if len(finite) else 0.0
        vmin = float(finite.min()) if len(finite) else vmax - 1
        vmin = min(vmin, vmax - 1)
        logs = np.where(np.isneginf(logs), vmin - 1, logs)  # bitwise equal: drawn white
        im = _heatmap(
            fig,
            ax_div,
            logs,
            steps,
            list(labels),
            "log10 relative difference (white: bitwise equal, grey: not recorded)",
            "log10 rel. diff",
        )
        im.set_clim(vmin, vmax)
        row = _first_label(first, list(labels))
        if first is not None and row is not None:
            ax_div.plot(
                [first["step"]],
                [row],
                "o",
                ms=14,
                mfc="none",
                mec="red",
                mew=2,
                label="first divergence",
            )
            ax_div.legend(fontsize=8, loc="upper right")
    else:
        _empty(ax_div, "nothing compared")

    growth = getattr(report, "growth", None) or {}
    drawn = False
    for kind in sorted(growth, key=lambda k: CAUSAL_RANK.get(k, 99)):
        pts = [(s, d) for s, d in growth[kind] if d is not None and np.isfinite(d) and d > 0]
        if pts:
            xs, ys = zip(*pts)
            ax_growth.plot(xs, ys, marker=".", lw=1.2, label=kind)
            drawn = True
    if drawn:
        ax_growth.set_yscale("log")
        ax_growth.legend(fontsize=8, ncol=4)
        ax_growth.grid(alpha=0.3)
        _integer_steps(ax_growth)
        ax_growth.set_xlabel("step")
        ax_growth.set_ylabel("max relative difference")
        ax_growth.set_title("growth of the difference per kind", fontsize=10, loc="left")
        if first is not None:
            ax_growth.axvline(first["step"], color="red", lw=1, ls="--")
    else:
        _empty(ax_growth, "no difference to plot")
    _save(fig, path)
    return fig
