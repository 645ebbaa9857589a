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
from ..modclass import describe
from ..reader import Run
from .series import collect_series, loss_curve
from .termchart import use_log

FORMATS = (".png", ".svg", ".pdf")


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


#: Rows labelled one by one up to this many; beyond, one label per module group.
MAX_ROW_LABELS = 150
#: Inches per heatmap row (labels at 6.5 pt stay legible) and the tallest heatmap drawn.
ROW_INCHES, MAX_HEAT_INCHES = 0.15, 40.0
ZERO_COLOUR = "#f4c7d7"  # zero norms: masked, drawn in their own colour


def _group(label: str) -> str:
    """The module group of a row label: kind + the module path up to its first numeric part
    (``transformer.h.3``, ``layers.12``), else its first two parts."""
    kind, _, rest = label.partition(" ") if " " in label else ("", "", label)
    parts = rest.split(" (", 1)[0].split(".")
    head = next(
        (parts[: i + 1] for i, p in enumerate(parts[:-1]) if p.isdigit()),
        parts[:2] if len(parts) > 2 else parts[:1],
    )
    return f"{kind} {'.'.join(head)}".strip()


def _label_rows(ax, labels: list[str]) -> None:
    """Every row labelled when they fit; else one label per module group, groups separated."""
    n = len(labels)
    if n <= MAX_ROW_LABELS:
        ax.set_yticks(range(n))
        ax.set_yticklabels(labels, fontsize=6.5 if n > 30 else 8)
        return
    starts = [i for i in range(n) if i == 0 or _group(labels[i]) != _group(labels[i - 1])]
    every = max(1, -(-len(starts) // MAX_ROW_LABELS))
    shown = starts[::every]
    ends = [*starts[1:], n]
    sizes = dict(zip(starts, (e - s for s, e in zip(starts, ends))))
    ax.set_yticks([s + (sizes[s] - 1) / 2 for s in shown])
    ax.set_yticklabels(
        [f"{_group(labels[s])} ({sizes[s]} rows)" if sizes[s] > 1 else labels[s] for s in shown],
        fontsize=6.5,
    )
    for s in starts[1:]:
        ax.axhline(s - 0.5, color="white", lw=0.4)


def heat_inches(n_rows: int) -> float:
    """Height of a heatmap panel for ``n_rows`` rows (grouped labels beyond MAX_ROW_LABELS)."""
    rows = min(n_rows, MAX_ROW_LABELS) if n_rows > MAX_ROW_LABELS else n_rows
    return float(min(MAX_HEAT_INCHES, max(1.6, rows * ROW_INCHES + 0.6)))


def _integer_steps(ax) -> None:
    from matplotlib.ticker import MaxNLocator

    ax.xaxis.set_major_locator(MaxNLocator(integer=True))


def _extent(steps: np.ndarray, n_rows: int) -> tuple[float, float, float, float]:
    half = 0.5 if len(steps) < 2 else (steps[-1] - steps[0]) / (len(steps) - 1) / 2
    return (steps[0] - half, steps[-1] + half, n_rows - 0.5, -0.5)


def _heatmap(
    fig,
    ax,
    matrix: np.ndarray,
    steps: np.ndarray,
    labels: list[str],
    title: str,
    cbar: str,
    cmap: Any = None,
    norm: Any = None,
):
    """Image of ``matrix`` (rows = labels, columns = steps); grey where absent (NaN)."""
    shown = np.ma.masked_invalid(matrix)
    im = ax.imshow(
        shown,
        aspect="auto",
        interpolation="nearest",
        cmap=cmap if cmap is not None else _cmap("viridis"),
        norm=norm,
        extent=_extent(steps, len(labels)),
    )
    _label_rows(ax, labels)
    ax.set_title(title, fontsize=10, loc="left")
    ax.set_xlabel("step")
    _integer_steps(ax)
    tall = ax.get_figure().get_figheight()  # a colour bar of at most ~6 inches
    fig.colorbar(im, ax=ax, label=cbar, pad=0.01, shrink=min(1.0, 6.0 / max(tall, 1.0)))
    return im


def _overlay(ax, mask: np.ndarray, steps: np.ndarray, colour: str) -> None:
    """Cells where ``mask`` holds, painted one flat colour over the heatmap."""
    from matplotlib.colors import ListedColormap

    if not mask.any():
        return
    ax.imshow(
        np.ma.masked_where(~mask, np.ones(mask.shape)),
        aspect="auto",
        interpolation="nearest",
        cmap=ListedColormap([colour]),
        extent=_extent(steps, mask.shape[0]),
        vmin=0,
        vmax=1,
    )


def _legend_outside(ax, handles: list, *, below: bool = False) -> Any:
    """A legend outside the axes (never over the data): right of it, or under the x label."""
    if not handles:
        return None
    if below:  # a fixed distance under the axes, clear of the tick labels and x label
        from matplotlib.transforms import offset_copy

        return ax.legend(
            handles=handles,
            loc="upper left",
            bbox_to_anchor=(0.0, 0.0),
            bbox_transform=offset_copy(ax.transAxes, fig=ax.get_figure(), y=-0.5, units="inches"),
            ncol=min(4, len(handles)),
            fontsize=8,
            frameon=False,
            borderaxespad=0.0,
        )
    return ax.legend(
        handles=handles, loc="upper left", bbox_to_anchor=(1.01, 1.0), fontsize=8, frameon=False
    )


def _log_norms(series: dict, kinds: set, steps: np.ndarray, classes: Optional[dict] = None):
    """(labels, log10-norm matrix, non-finite mask, zero mask) for the records of ``kinds``.

    Zero norms (zero-initialised biases, frozen or dead layers) are masked, not clipped: a
    clipped 1e-45 would stretch the colour scale over 40 empty decades.
    """
    pos = {int(s): i for i, s in enumerate(steps)}
    keys = [k for k in series if k.kind in kinds]
    labels = []
    for k in keys:
        lab = k.name if len(kinds) == 1 else f"{k.kind} {k.name}"
        lab = describe(classes or {}, k.kind, k.name, lab)
        labels.append(f"{lab} (call {k.call})" if k.call else lab)
    mat = np.full((len(keys), len(steps)), np.nan)
    bad = np.zeros_like(mat, dtype=bool)
    zero = np.zeros_like(mat, dtype=bool)
    for r, k in enumerate(keys):
        s = series[k]
        cols = [pos[int(x)] for x in s.steps]
        norms = s.norm.astype(np.float64)
        nonfinite = ~np.isfinite(norms) | (s.rows["nan"] > 0) | (s.rows["inf"] > 0)
        is_zero = ~nonfinite & (norms == 0)
        with np.errstate(divide="ignore", invalid="ignore"):
            mat[r, cols] = np.where(nonfinite | is_zero, np.nan, np.log10(norms))
        bad[r, cols] = nonfinite
        zero[r, cols] = is_zero
    return labels, mat, bad, zero


def _empty(ax, text: str) -> None:
    ax.text(0.5, 0.5, text, ha="center", va="center", transform=ax.transAxes, color="#666666")
    ax.set_xticks([])
    ax.set_yticks([])


def _handles(kinds: set[str]) -> list:
    """Legend entries for the marks a heatmap may carry."""
    from matplotlib.lines import Line2D
    from matplotlib.patches import Patch

    out = []
    if "zero" in kinds:
        out.append(Patch(facecolor=ZERO_COLOUR, edgecolor="#999999", label="norm 0 (masked)"))
    if "nonfinite" in kinds:
        out.append(Line2D([], [], ls="", marker="x", color="red", label="NaN/Inf"))
    if "absent" in kinds:
        out.append(Patch(facecolor="#dddddd", edgecolor="#999999", label="not recorded"))
    if "equal" in kinds:
        out.append(Patch(facecolor="white", edgecolor="#999999", label="bitwise equal"))
    if "first" in kinds:
        out.append(
            Line2D(
                [],
                [],
                ls="",
                marker="o",
                ms=9,
                mfc="none",
                mec="red",
                mew=2,
                label="first divergence",
            )
        )
    return out


def _loss_panel(ax, curves: list[tuple[str, np.ndarray, np.ndarray, str]]) -> None:
    """Loss curves (one per run: label, steps, loss, line style); NaN/Inf as red crosses."""
    from matplotlib.lines import Line2D

    handles = []
    allv = np.concatenate([c[2] for c in curves]) if curves else np.zeros(0)
    fin_all = allv[np.isfinite(allv)]
    floor = float(fin_all.min()) if len(fin_all) else 0.0
    nonfinite = False
    for i, (name, steps, loss, style) in enumerate(curves):
        finite = np.isfinite(loss)
        (line,) = ax.plot(steps[finite], loss[finite], style, color=f"C{i}", lw=1.3, label=name)
        handles.append(line)
        if (~finite).any():
            ax.plot(steps[~finite], np.full((~finite).sum(), floor), "rx")
            nonfinite = True
    if nonfinite:
        handles.append(Line2D([], [], ls="", marker="x", color="red", label="NaN/Inf"))
    if use_log(allv):
        ax.set_yscale("log")
    ax.set_ylabel("loss")
    ax.set_xlabel("step")
    ax.set_title("loss" + (" (log scale)" if use_log(allv) else ""), fontsize=10, loc="left")
    ax.grid(alpha=0.3)
    _integer_steps(ax)
    if len(handles) > 1:
        _legend_outside(ax, handles)


def plot_run(run: Run, path: Optional[Any] = None):
    """Loss, per-layer gradient norms and parameter norms over steps (log10 heatmaps).

    Panels (axes labels): ``loss``, ``grad``, ``param`` (plus two colorbars). Zero norms are
    masked in their own colour, non-finite entries marked with red crosses, every row labelled
    with the module class (grouped by module beyond 100 rows); legends sit outside the data.
    Returns the Figure; saves it when ``path`` is given.
    """
    Figure = _figure_class()
    if path is not None:
        check_output(path)
    series = collect_series(run, kinds={"loss", "param", *GRADIENT_KINDS})
    steps = np.asarray(run.steps, dtype=np.int64)
    grad_kinds = {k.kind for k in series if k.kind in GRADIENT_KINDS} or {"grad"}
    n_params = sum(1 for k in series if k.kind == "param")
    n_grads = sum(1 for k in series if k.kind in grad_kinds)
    heights = [2.2, heat_inches(n_grads) + 0.6, heat_inches(n_params) + 0.6]
    fig = Figure(figsize=(11, sum(heights) + 0.8), layout="constrained")
    grid = fig.add_gridspec(3, 1, height_ratios=heights)
    ax_loss = fig.add_subplot(grid[0], label="loss")
    ax_grad = fig.add_subplot(grid[1], label="grad")
    ax_param = fig.add_subplot(grid[2], label="param", sharex=ax_grad if n_grads else None)
    fig.suptitle(f"{os.path.basename(run.path)}: {len(steps)} steps", fontsize=11)

    loss_steps, loss = loss_curve(run, series)
    if len(loss):
        _loss_panel(ax_loss, [("loss", loss_steps, loss, "-")])
    else:
        _empty(ax_loss, "no loss recorded")

    classes = getattr(run, "module_classes", {}) or {}
    for ax, kinds, title in (
        (ax_grad, grad_kinds, "gradient norm per layer (log10)"),
        (ax_param, {"param"}, "parameter norm per layer (log10)"),
    ):
        labels, mat, bad, zero = _log_norms(series, kinds, steps, classes)
        if not labels or not len(steps):
            _empty(ax, f"no {' / '.join(sorted(kinds))} recorded")
            continue
        _heatmap(fig, ax, mat, steps, labels, title, "log10 norm")
        _overlay(ax, zero, steps, ZERO_COLOUR)
        rr, cc = np.nonzero(bad)
        if len(rr):
            ax.plot(steps[cc], rr, "x", color="red", ms=5)
        marks = {"zero"} if zero.any() else set()
        marks |= {"nonfinite"} if len(rr) else set()
        marks |= {"absent"} if (np.isnan(mat) & ~zero & ~bad).any() else set()
        _legend_outside(ax, _handles(marks), below=True)
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


def _diff_cmap(vmin: float, tol: Optional[float], vmax: float):
    """Blues up to the tolerance, yellow-to-red beyond it; (cmap, norm)."""
    import matplotlib
    from matplotlib.colors import ListedColormap, Normalize, TwoSlopeNorm

    cool = matplotlib.colormaps["Blues"](np.linspace(0.15, 0.95, 128))
    hot = matplotlib.colormaps["YlOrRd"](np.linspace(0.2, 1.0, 128))
    if tol is None or not vmin < tol < vmax:
        colours = hot if tol is not None and vmin >= tol else cool
        cmap = ListedColormap(colours).with_extremes(bad="#dddddd", under="#ffffff")
        return cmap, Normalize(vmin, vmax)
    cmap = ListedColormap(np.vstack([cool, hot])).with_extremes(bad="#dddddd", under="#ffffff")
    return cmap, TwoSlopeNorm(vcenter=tol, vmin=vmin, vmax=vmax)


def _run_curves(report: Any) -> tuple[list, list]:
    """(loss curves, total gradient norm curves) of both runs, for the overlay panels."""
    from ..errors import GraddiffError
    from ..reader import open_run

    losses, grads = [], []
    for tag, p, style in (("A", report.run_a, "-"), ("B", report.run_b, "--")):
        try:
            with open_run(p) as run:
                series = collect_series(run, kinds={"loss", *GRADIENT_KINDS})
                ls, lv = loss_curve(run, series)
                gkinds = {k.kind for k in series if k.kind in GRADIENT_KINDS}
                gkind = "grad" if "grad" in gkinds else next(iter(gkinds), None)
                steps = np.asarray(run.steps, dtype=np.int64)
                total = np.zeros(len(steps))
                seen = np.zeros(len(steps), dtype=bool)
                pos = {int(s): i for i, s in enumerate(steps)}
                for k, s in series.items():
                    if k.kind != gkind:
                        continue
                    idx = np.array([pos[int(x)] for x in s.steps], dtype=np.int64)
                    np.add.at(total, idx, s.norm.astype(np.float64) ** 2)
                    seen[idx] = True
        except (GraddiffError, OSError):
            return [], []
        name = f"{tag}: {os.path.basename(str(p))}"
        if len(lv):
            losses.append((name, ls, lv, style))
        if seen.any():
            grads.append((name, steps[seen], np.sqrt(total[seen]), style))
    return (losses if len(losses) == 2 else []), (grads if len(grads) == 2 else [])


def plot_divergence(report: Any, path: Optional[Any] = None):
    """Where two runs diverge: a steps x records heatmap of log10 relative difference (causal
    order; blue within the tolerance, yellow to red beyond it; first divergence circled), the
    growth of the difference per kind with the tolerance drawn, and, when both trace files are
    readable, the two runs overlaid: loss and total gradient norm.

    ``report`` is a ``graddiff.diff.Report`` (anything with ``divergence_matrix()``, ``growth``,
    ``to_dict()``, ``run_a`` and ``run_b``). Panels (axes labels): ``divergence``, ``growth``,
    then ``loss`` and ``grad_norm`` when the runs can be read.
    """
    Figure = _figure_class()
    if path is not None:
        check_output(path)
    steps, labels, rel = report.divergence_matrix()
    steps = np.asarray(steps)
    rel = np.asarray(rel, dtype=np.float64).reshape(len(steps), len(labels))
    d = report.to_dict()
    first = d.get("first")
    describe_label = getattr(report, "describe", None) or (lambda x: x)
    shown_labels = [describe_label(lab) for lab in labels]
    rtol = None if d.get("exact") or d.get("rtol") is None else float(d["rtol"])
    losses, grads = _run_curves(report)
    heights = [heat_inches(len(labels)) + 0.7, 2.4]
    if losses:
        heights.append(2.2)
    if grads:
        heights.append(2.2)
    fig = Figure(figsize=(11, sum(heights) + 0.8), layout="constrained")
    grid = fig.add_gridspec(len(heights), 1, height_ratios=heights)
    ax_div = fig.add_subplot(grid[0], label="divergence")
    ax_growth = fig.add_subplot(grid[1], label="growth")
    name_a, name_b = (os.path.basename(str(p)) for p in (report.run_a, report.run_b))
    if first:
        where = describe_label(first.get("label") or f"{first['kind']} {first['name']}")
        verdict = f"first divergence: step {first['step']}, {where}"
    else:
        verdict = "no divergence"
    fig.suptitle(f"{name_a} vs {name_b}: {verdict}", fontsize=11)

    if len(steps) and len(labels):
        with np.errstate(divide="ignore", invalid="ignore"):
            logs = np.log10(rel.T)  # rows = records, columns = steps; 0 -> -inf -> 'under'
        finite = logs[np.isfinite(logs)]
        vmax = float(finite.max()) if len(finite) else 0.0
        vmin = float(finite.min()) if len(finite) else vmax - 1
        vmin = min(vmin, vmax - 1)
        logs = np.where(np.isneginf(logs), vmin - 1, logs)  # bitwise equal: drawn white
        tol = None if rtol is None else float(np.log10(rtol))
        if tol is not None:
            vmax = max(vmax, tol + 0.5)
            vmin = min(vmin, tol - 0.5)
        cmap, norm = _diff_cmap(vmin, tol, vmax)
        im = _heatmap(
            fig,
            ax_div,
            logs,
            steps,
            shown_labels,
            "log10 relative difference per record",
            "log10 rel. diff",
            cmap=cmap,
            norm=norm,
        )
        cbar = im.colorbar
        if tol is not None and cbar is not None:  # the tolerance: a line and a tick
            cbar.ax.axhline(tol, color="black", lw=1.5)
            ticks = [t for t in cbar.get_ticks() if vmin <= t <= vmax and abs(t - tol) > 0.45]
            cbar.set_ticks([*ticks, tol])
            cbar.set_ticklabels([f"{t:g}" for t in ticks] + [f"rtol {rtol:g}"])
        marks = {"equal"} if (rel == 0).any() else set()
        marks |= {"absent"} if np.isnan(rel).any() else set()
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
            marks.add("first")
        _legend_outside(ax_div, _handles(marks), below=True)
    else:
        _empty(ax_div, "nothing compared")

    growth = getattr(report, "growth", None) or {}
    handles = []
    for kind in sorted(growth, key=lambda k: CAUSAL_RANK.get(k, 99)):
        pts = [(s, v) for s, v in growth[kind] if v is not None and np.isfinite(v) and v > 0]
        if pts:
            xs, ys = zip(*pts)
            (line,) = ax_growth.plot(xs, ys, marker=".", lw=1.2, label=kind)
            handles.append(line)
    if handles:
        ax_growth.set_yscale("log")
        ax_growth.grid(alpha=0.3)
        _integer_steps(ax_growth)
        ax_growth.set_xlabel("step")
        ax_growth.set_ylabel("max relative difference")
        ax_growth.set_title("growth of the difference per kind", fontsize=10, loc="left")
        if rtol is not None:
            handles.append(
                ax_growth.axhline(rtol, color="#9a6700", ls=":", lw=1.2, label=f"rtol {rtol:g}")
            )
        if first is not None:
            handles.append(
                ax_growth.axvline(
                    first["step"], color="red", lw=1, ls="--", label="first divergence"
                )
            )
        _legend_outside(ax_growth, handles)
    else:
        _empty(ax_growth, "no difference to plot")
    k = 2
    if losses:
        ax = fig.add_subplot(grid[k], label="loss", sharex=ax_growth if handles else None)
        _loss_panel(ax, losses)
        k += 1
    if grads:
        ax = fig.add_subplot(grid[k], label="grad_norm", sharex=ax_growth if handles else None)
        for i, (name, xs, ys, style) in enumerate(grads):
            ax.plot(xs, ys, style, color=f"C{i}", lw=1.3, label=name)
        if use_log(np.concatenate([g[2] for g in grads])):
            ax.set_yscale("log")
        ax.set_title("total gradient norm (all layers)", fontsize=10, loc="left")
        ax.set_ylabel("norm")
        ax.set_xlabel("step")
        ax.grid(alpha=0.3)
        _integer_steps(ax)
        _legend_outside(ax, ax.get_lines())
    _save(fig, path)
    return fig
