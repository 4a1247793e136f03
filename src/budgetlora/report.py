"""Plots and a self-contained HTML/Markdown report for one run or a folder of runs.

Figures are plain `matplotlib.figure.Figure` objects (results.new_figure), which render with
the Agg canvas and never touch pyplot's global state: no display is needed and a user's
interactive backend is left alone. Every plot is skipped (with a note in the report) when its data is missing.
"""

from __future__ import annotations

import argparse
import base64
import html
import itertools
import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from budgetlora.errors import BudgetLoraError
from budgetlora.results import (
    TIE_NOTE,
    Run,
    accuracy_of,
    atomic_save_figure,
    atomic_write_text,
    build_table,
    canonical,
    collect_runs,
    display_table,
    display_value,
    is_run_dir,
    is_seed_key,
    markdown_table,
    new_figure,
    results_markdown,
    varying_keys,
)

# Legends with dozens of sweep runs cover the data; past this many runs they are dropped.
_MAX_LEGEND = 12
_MAX_POINT_LABELS = 15
_MAX_ANNOTATED_CLASSES = 12


@dataclass
class Plots:
    """What the report shows: written images (title, path) and why others were skipped."""

    images: list[tuple[str, Path]] = field(default_factory=list)
    skipped: list[str] = field(default_factory=list)

    def add(self, title: str, path: Path | None, reason: str) -> None:
        if path is None:
            self.skipped.append(f"{title}: {reason}")
        else:
            self.images.append((title, path))


# --------------------------------------------------------------------------------------------
# Training curves


def _series(run: Run, key: str) -> tuple[np.ndarray, np.ndarray]:
    points = [(r["step"], r[key]) for r in run.metrics if r.get(key) is not None]
    if not points:
        return np.empty(0), np.empty(0)
    steps, values = zip(*points, strict=True)
    return np.asarray(steps, dtype=float), np.asarray(values, dtype=float)


def _curve_plot(runs: Sequence[Run], keys: Sequence[str], title: str, ylabel: str, path: Path) -> Path | None:
    """One line per (run, key): train keys solid, eval keys dashed with markers, one colour per run."""
    fig = new_figure((7, 4))
    ax = fig.subplots()
    drawn = 0
    for i, run in enumerate(runs):
        color = f"C{i % 10}"
        for key in keys:
            steps, values = _series(run, key)
            if not len(steps):
                continue
            is_eval = key.startswith("eval")
            style: dict[str, Any] = {"linestyle": "--", "marker": "o", "markersize": 3} if is_eval else {}
            name = key if len(runs) == 1 else f"{run.label} {key}"
            ax.plot(steps, values, color=color, label=name, **style)
            drawn += 1
    if not drawn:
        return None
    ax.set_title(title)
    ax.set_xlabel("step")
    ax.set_ylabel(ylabel)
    ax.grid(alpha=0.3)
    if drawn <= _MAX_LEGEND:
        ax.legend(fontsize=8)
    return atomic_save_figure(fig, path)


def _curves(runs: Sequence[Run], out: Path, plots: Plots) -> None:
    plots.add(
        "loss",
        _curve_plot(runs, ["train_loss", "eval_loss"], "loss", "loss", out / "loss.png"),
        "no loss in metrics.jsonl",
    )
    plots.add(
        "accuracy",
        _curve_plot(runs, ["train_acc", "eval_acc"], "accuracy", "accuracy", out / "accuracy.png"),
        "no accuracy in metrics.jsonl",
    )
    plots.add(
        "learning rate",
        _curve_plot(runs, ["lr"], "learning rate", "lr", out / "lr.png"),
        "no lr in metrics.jsonl",
    )


# --------------------------------------------------------------------------------------------
# Accuracy vs trainable parameters


def _plot_accuracy(run: Run) -> tuple[str, Any] | None:
    """The accuracy a run is judged by: test if it has one, else validation."""
    test = accuracy_of(run.test)
    if test is not None:
        return "test", test
    val = accuracy_of(run.summary.get("val"))
    return ("val", val) if val is not None else None


def accuracy_vs_params(runs: Sequence[Run], path: Path) -> Path | None:
    points = []
    for run in runs:
        acc = _plot_accuracy(run)
        params = run.summary.get("trainable_params")
        if acc is not None and params:
            points.append((run.label, float(params), acc[0], acc[1]))
    if not points:
        return None
    fig = new_figure((7, 4.5))
    ax = fig.subplots()
    for split, marker in (("test", "o"), ("val", "s")):
        chosen = [p for p in points if p[2] == split]
        if not chosen:
            continue
        x = np.array([p[1] for p in chosen])
        y = np.array([100 * p[3].accuracy for p in chosen])
        err = np.array(
            [
                [y_ - 100 * p[3].ci_low for y_, p in zip(y, chosen, strict=True)],
                [100 * p[3].ci_high - y_ for y_, p in zip(y, chosen, strict=True)],
            ]
        )
        ax.errorbar(x, y, yerr=err, fmt=marker, capsize=3, label=f"{split} accuracy (95% CI)")
    if len(points) <= _MAX_POINT_LABELS:
        for label, x_, _, acc in points:
            ax.annotate(
                label, (x_, 100 * acc.accuracy), fontsize=7, xytext=(4, 4), textcoords="offset points"
            )
    xs = [p[1] for p in points]
    # Budgets span orders of magnitude (LoRA r=1 vs full fine-tuning).
    if max(xs) / min(xs) > 20:
        ax.set_xscale("log")
    ax.set_xlabel("trainable parameters")
    ax.set_ylabel("accuracy %")
    ax.set_title("accuracy vs trainable parameters")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    return atomic_save_figure(fig, path)


# --------------------------------------------------------------------------------------------
# Confusion matrix


def _confusion(run: Run) -> tuple[np.ndarray, list[str]] | None:
    test = run.test or {}
    matrix = test.get("confusion_matrix")
    if not matrix:
        return None
    try:
        cm = np.asarray(matrix, dtype=float)
    except (TypeError, ValueError):
        return None
    if cm.ndim != 2 or cm.shape[0] != cm.shape[1]:
        return None
    names = run.summary.get("label_names") or []
    if len(names) != cm.shape[0]:
        names = [str(i) for i in range(cm.shape[0])]
    return cm, [str(n) for n in names]


def confusion_heatmap(run: Run, path: Path) -> Path | None:
    """Colour = row-normalised (recall per true class), so rare classes stay readable; text = counts."""
    data = _confusion(run)
    if data is None:
        return None
    cm, names = data
    totals = cm.sum(axis=1, keepdims=True)
    norm = np.divide(cm, totals, out=np.zeros_like(cm), where=totals > 0)
    size = max(4.0, 0.6 * len(names) + 2)
    fig = new_figure((size + 1, size))
    ax = fig.subplots()
    image = ax.imshow(norm, cmap="Blues", vmin=0, vmax=1)
    fig.colorbar(image, ax=ax, label="fraction of true class")
    ticks = np.arange(len(names))
    ax.set_xticks(ticks, names, rotation=45, ha="right")
    ax.set_yticks(ticks, names)
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    ax.set_title(f"confusion matrix (test): {run.label}")
    if len(names) <= _MAX_ANNOTATED_CLASSES:
        for i, j in itertools.product(range(len(names)), repeat=2):
            ax.text(
                j,
                i,
                f"{int(cm[i, j])}",
                ha="center",
                va="center",
                fontsize=8,
                color="white" if norm[i, j] > 0.5 else "black",
            )
    return atomic_save_figure(fig, path)


def _best_run(runs: Sequence[Run]) -> Run | None:
    scored = [(acc.accuracy, i, run) for i, run in enumerate(runs) if (acc := accuracy_of(run.test))]
    # Highest accuracy; on equal accuracy the first run, as in the results table's "best".
    return max(scored, key=lambda t: (t[0], -t[1]))[2] if scored else None


# --------------------------------------------------------------------------------------------
# Sweep heatmap


@dataclass
class Grid:
    row_key: str
    col_key: str
    rows: list[Any]
    cols: list[Any]
    values: np.ndarray  # NaN where no run has that combination
    metric: str
    averaged_over: list[str]


def _ordered(values: set[str], originals: dict[str, Any]) -> list[str]:
    """Axis order: numeric when every value is a number (r=2,4,8,16), else alphabetical."""
    nums = {v: originals[v] for v in values}
    if all(isinstance(x, (int, float)) and not isinstance(x, bool) for x in nums.values()):
        return sorted(values, key=lambda v: nums[v])
    return sorted(values, key=lambda v: str(display_value(nums[v])))


def _run_metric(run: Run, metric: str) -> float | None:
    if metric == "test":
        acc = accuracy_of(run.test)
        return acc.accuracy if acc else None
    value = run.summary.get("best_val_acc")
    return float(value) if value is not None else None


def sweep_grid(runs: Sequence[Run]) -> Grid | None:
    """The pair of varying config keys that best forms a 2-D grid, with mean accuracy per cell.

    Seeds are averaged within a cell (and not named in `averaged_over`). A pair qualifies when
    each key takes two or more values and the filled cells are more than either axis alone (so
    it is not one diagonal line); missing cells are allowed because a sweep skips configs over
    the parameter budget. Among qualifying pairs the one with most filled cells wins; other
    varying keys are averaged.
    """
    keys = [k for k in varying_keys(runs) if not is_seed_key(k)]
    metric = "test" if any(accuracy_of(r.test) for r in runs) else "val"
    best: Grid | None = None
    for row_key, col_key in itertools.combinations(keys, 2):
        grid = _grid_for(runs, row_key, col_key, metric, [k for k in keys if k not in (row_key, col_key)])
        if grid is not None and (
            best is None
            or np.count_nonzero(~np.isnan(grid.values)) > np.count_nonzero(~np.isnan(best.values))
        ):
            best = grid
    return best


def _grid_for(runs: Sequence[Run], row_key: str, col_key: str, metric: str, others: list[str]) -> Grid | None:
    cells: dict[tuple[str, str], list[float]] = {}
    other_values: dict[tuple[str, str], dict[str, set[str]]] = {}
    originals: dict[str, Any] = {}
    for run in runs:
        value = _run_metric(run, metric)
        if value is None or row_key not in run.config or col_key not in run.config:
            continue
        r, c = canonical(run.config[row_key]), canonical(run.config[col_key])
        originals[r], originals[c] = run.config[row_key], run.config[col_key]
        cells.setdefault((r, c), []).append(value)
        seen = other_values.setdefault((r, c), {})
        for key in others:
            seen.setdefault(key, set()).add(canonical(run.config.get(key)))
    row_vals = {r for r, _ in cells}
    col_vals = {c for _, c in cells}
    if len(row_vals) < 2 or len(col_vals) < 2 or len(cells) <= max(len(row_vals), len(col_vals)):
        return None
    rows, cols = _ordered(row_vals, originals), _ordered(col_vals, originals)
    values = np.full((len(rows), len(cols)), np.nan)
    for (r, c), accs in cells.items():
        values[rows.index(r), cols.index(c)] = float(np.mean(accs))
    # Only keys that really differ inside a cell are averaged over (lora.alpha tied to lora.r is not).
    averaged = [k for k in others if any(len(seen.get(k, ())) > 1 for seen in other_values.values())]
    return Grid(
        row_key, col_key, [originals[r] for r in rows], [originals[c] for c in cols], values, metric, averaged
    )


def sweep_heatmap(runs: Sequence[Run], path: Path) -> Path | None:
    grid = sweep_grid(runs)
    if grid is None:
        return None
    fig = new_figure((max(5.0, 1.3 * len(grid.cols) + 2.5), max(3.5, 0.7 * len(grid.rows) + 2)))
    ax = fig.subplots()
    masked = np.ma.masked_invalid(100 * grid.values)
    image = ax.imshow(masked, cmap="viridis", aspect="auto")
    fig.colorbar(image, ax=ax, label=f"mean {grid.metric} accuracy %")
    ax.set_xticks(
        np.arange(len(grid.cols)), [str(display_value(c)) for c in grid.cols], rotation=30, ha="right"
    )
    ax.set_yticks(np.arange(len(grid.rows)), [str(display_value(r)) for r in grid.rows])
    ax.set_xlabel(grid.col_key)
    ax.set_ylabel(grid.row_key)
    # viridis is bright at the top of its range: dark text there, white text on the dark end.
    middle = (np.nanmin(grid.values) + np.nanmax(grid.values)) / 2
    for i, j in itertools.product(range(len(grid.rows)), range(len(grid.cols))):
        v = grid.values[i, j]
        text, color = (
            ("—", "black") if math.isnan(v) else (f"{100 * v:.2f}", "black" if v > middle else "white")
        )
        ax.text(j, i, text, ha="center", va="center", fontsize=8, color=color)
    title = f"mean {grid.metric} accuracy: {grid.row_key} × {grid.col_key}"
    if grid.averaged_over:
        title += f"\n(averaged over {', '.join(grid.averaged_over)})"
    ax.set_title(title, fontsize=10)
    return atomic_save_figure(fig, path)


# --------------------------------------------------------------------------------------------
# Report documents


def _data_uri(path: Path) -> str:
    return "data:image/png;base64," + base64.b64encode(path.read_bytes()).decode("ascii")


_CSS = """
body { font-family: system-ui, sans-serif; margin: 2em; max-width: 1200px; color: #222; }
table { border-collapse: collapse; font-size: 0.85em; }
th, td { border: 1px solid #ccc; padding: 3px 8px; text-align: right; }
th { background: #f3f3f3; }
td:first-child { text-align: left; }
img { max-width: 100%; border: 1px solid #eee; margin-bottom: 1em; }
.note { color: #555; font-size: 0.9em; }
"""


def render_html(title: str, subtitle: str, table: pd.DataFrame, plots: Plots) -> str:
    shown = display_table(table)
    parts = [
        "<!DOCTYPE html>",
        '<html lang="en"><head><meta charset="utf-8">',
        f"<title>{html.escape(title)}</title><style>{_CSS}</style></head><body>",
        f"<h1>{html.escape(title)}</h1>",
        f'<p class="note">{html.escape(subtitle)}</p>',
        "<h2>Results</h2>",
        shown.to_html(index=False, escape=True, border=0, na_rep=""),
        f'<p class="note">{html.escape(TIE_NOTE)}</p>',
        "<h2>Plots</h2>",
    ]
    for name, path in plots.images:
        parts.append(f"<h3>{html.escape(name)}</h3>")
        parts.append(f'<img alt="{html.escape(name)}" src="{_data_uri(path)}">')
    if plots.skipped:
        parts.append('<h2>Skipped</h2><ul class="note">')
        parts.extend(f"<li>{html.escape(s)}</li>" for s in plots.skipped)
        parts.append("</ul>")
    parts.append("</body></html>\n")
    return "\n".join(parts)


def render_markdown(title: str, subtitle: str, table: pd.DataFrame, plots: Plots, out: Path) -> str:
    lines = [
        f"# {title}",
        "",
        subtitle,
        "",
        "## Results",
        "",
        markdown_table(display_table(table)),
        TIE_NOTE,
        "",
        "## Plots",
        "",
    ]
    for name, path in plots.images:
        lines += [f"### {name}", "", f"![{name}]({path.relative_to(out).as_posix()})", ""]
    if plots.skipped:
        lines += ["## Skipped", ""] + [f"- {s}" for s in plots.skipped] + [""]
    return "\n".join(lines)


def _single_run_plots(run: Run, out: Path) -> Plots:
    plots = Plots()
    _curves([run], out, plots)
    plots.add(
        "confusion matrix",
        confusion_heatmap(run, out / "confusion_matrix.png"),
        "no test confusion matrix in summary.json",
    )
    return plots


def _folder_plots(runs: Sequence[Run], out: Path) -> Plots:
    plots = Plots()
    _curves(runs, out, plots)
    plots.add(
        "accuracy vs trainable parameters",
        accuracy_vs_params(runs, out / "accuracy_vs_params.png"),
        "no run has both trainable_params and a test or val accuracy",
    )
    best = _best_run(runs)
    cm_path = confusion_heatmap(best, out / "confusion_matrix.png") if best else None
    plots.add(
        f"confusion matrix of the best run ({best.label if best else '-'})",
        cm_path,
        "no run has a test confusion matrix",
    )
    plots.add(
        "sweep heatmap",
        sweep_heatmap(runs, out / "sweep_heatmap.png"),
        "no two varying config keys form a grid",
    )
    return plots


def write_report(path: str | Path) -> Path:
    """Write PNGs, report.html (self-contained) and report.md into a run dir or a folder of runs.

    Returns the path of report.html. A folder also gets results.csv/results.md (the same table).
    """
    out = Path(path)
    if not out.is_dir():
        raise BudgetLoraError(f"directory not found: {out}")
    runs = collect_runs(out)
    table = build_table(runs)
    if is_run_dir(out):
        title = f"budgetlora report: {runs[0].summary.get('name') or out.name}"
        subtitle = f"run directory {out}"
        plots = _single_run_plots(runs[0], out)
    else:
        title = f"budgetlora report: {out.name}"
        subtitle = f"{len(runs)} runs under {out}"
        plots = _folder_plots(runs, out)
        atomic_write_text(out / "results.csv", table.to_csv(index=False))
        atomic_write_text(out / "results.md", results_markdown(table, out))
    atomic_write_text(out / "report.md", render_markdown(title, subtitle, table, plots, out))
    return atomic_write_text(out / "report.html", render_html(title, subtitle, table, plots))


def _cmd_report(args: argparse.Namespace) -> int:
    report = write_report(args.path)
    print(f"wrote {report} and {report.with_name('report.md')}")
    return 0


def add_subcommands(subparsers: Any) -> None:
    """Register `report` on an argparse subparsers object."""
    parser = subparsers.add_parser(
        "report",
        help="plots plus a self-contained report.html for a run or a folder of runs",
    )
    parser.add_argument("path", metavar="RUN_OR_DIR", help="a run directory or a folder of runs")
    parser.set_defaults(func=_cmd_report)
