"""Figures for results and reports: plain `matplotlib.figure.Figure` objects rendered with Agg,
which never touch pyplot's global state (no display needed, a user's interactive backend is left
alone), saved atomically. A plot whose data is missing returns None instead of a file."""

from __future__ import annotations

import itertools
import math
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import numpy.typing as npt

from budgetlora import atomic
from budgetlora.results.runs import RunRecord
from budgetlora.results.wording import common_task, objective_word
from budgetlora.results.table import accuracy_of, canonical, display_value, is_seed_key, varying_keys

if TYPE_CHECKING:
    from matplotlib.figure import Figure

# Legends with dozens of sweep runs cover the data; past this many runs they are dropped.
_MAX_LEGEND = 12


_MAX_POINT_LABELS = 15


_MAX_ANNOTATED_CLASSES = 12
ROTATE_FROM = 3  # bar labels turn when there are more
LOG_SCALE_RATIO = 20  # an x axis spanning more than this factor is drawn in log scale
MIN_AXIS = 2  # values per heatmap axis


def new_figure(figsize: tuple[float, float]) -> Figure:
    """A pyplot-free Figure; matplotlib is imported here because it costs most of a second."""
    from matplotlib.figure import Figure

    return Figure(figsize=figsize)


def save_figure(fig: Figure, path: Path) -> Path:
    """Into its folder's outputs; the caller claimed the name (atomic.OutputFolder.claim) first."""
    return atomic.OutputFolder(path.parent, overwrite=True).write_with(
        path.name, lambda tmp: fig.savefig(tmp, format="png", dpi=110, bbox_inches="tight")
    )


def bar_chart(
    labels: Sequence[str],
    series: dict[str, npt.ArrayLike],
    title: str,
    ylabel: str,
    path: Path,
    errors: npt.ArrayLike | None = None,
) -> Path | None:
    """Grouped bar chart; None (nothing written) when every value is missing."""
    values = np.asarray(list(series.values()), dtype=float)
    if np.isnan(values).all():
        return None
    fig = new_figure((max(4.0, 1.2 * len(labels) + 2), 3.6))
    ax = fig.subplots()
    x = np.arange(len(labels))
    width = 0.8 / len(series)
    for i, (name, vals) in enumerate(series.items()):
        yerr = np.asarray(errors, dtype=float) if errors is not None and i == 0 else None
        ax.bar(x + (i - (len(series) - 1) / 2) * width, np.nan_to_num(vals), width, label=name, yerr=yerr, capsize=4)
    ax.set_xticks(
        x,
        labels,
        rotation=30 if len(labels) > ROTATE_FROM else 0,
        ha="right" if len(labels) > ROTATE_FROM else "center",
    )
    ax.set_title(title)
    ax.set_ylabel(ylabel)
    if len(series) > 1:
        ax.legend()
    return save_figure(fig, path)


def _series(run: RunRecord, key: str) -> tuple[np.ndarray, np.ndarray]:
    points = [(r["step"], r[key]) for r in run.metrics if r.get(key) is not None]
    if not points:
        return np.empty(0), np.empty(0)
    steps, values = zip(*points, strict=True)
    return np.asarray(steps, dtype=float), np.asarray(values, dtype=float)


def curve_plot(runs: Sequence[RunRecord], keys: Sequence[str], title: str, ylabel: str, path: Path) -> Path | None:
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
    return save_figure(fig, path)


def _plot_accuracy(run: RunRecord) -> tuple[str, Any] | None:
    """The accuracy a run is judged by: test if it has one, else validation."""
    test = accuracy_of(run.test)
    if test is not None:
        return "test", test
    val = accuracy_of(run.val)
    return ("val", val) if val is not None else None


def accuracy_vs_params(runs: Sequence[RunRecord], path: Path) -> Path | None:
    points = []
    for run in runs:
        acc = _plot_accuracy(run)
        params = run.trainable_params
        if acc is not None and params:
            points.append((run.label, float(params), acc[0], acc[1]))
    if not points:
        return None
    word = objective_word(common_task(p[3].task for p in points))
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
        ax.errorbar(x, y, yerr=err, fmt=marker, capsize=3, label=f"{split} {word} (95% CI)")
    if len(points) <= _MAX_POINT_LABELS:
        for label, x_, _, acc in points:
            ax.annotate(label, (x_, 100 * acc.accuracy), fontsize=7, xytext=(4, 4), textcoords="offset points")
    xs = [p[1] for p in points]
    # Budgets span orders of magnitude (LoRA r=1 vs full fine-tuning).
    if max(xs) / min(xs) > LOG_SCALE_RATIO:
        ax.set_xscale("log")
    ax.set_xlabel("trainable parameters")
    ax.set_ylabel(f"{word} x100")
    ax.set_title(f"{word} vs trainable parameters")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    return save_figure(fig, path)


def _confusion(run: RunRecord) -> tuple[np.ndarray, list[str]] | None:
    matrix = run.test.confusion_matrix if run.test is not None else None
    if not matrix:
        return None
    try:
        cm = np.asarray(matrix, dtype=float)
    except (TypeError, ValueError):
        return None
    if cm.ndim != 2 or cm.shape[0] != cm.shape[1]:  # noqa: PLR2004 - a matrix
        return None
    names = run.label_names
    if len(names) != cm.shape[0]:
        names = [str(i) for i in range(cm.shape[0])]
    return cm, [str(n) for n in names]


def confusion_heatmap(run: RunRecord, path: Path) -> Path | None:
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
                color="white" if norm[i, j] > 0.5 else "black",  # noqa: PLR2004 - dark half of the colormap
            )
    return save_figure(fig, path)


def reliability_diagram(run: RunRecord, path: Path) -> Path | None:
    """Accuracy against confidence per bin on the test split, before and after the temperature
    tuned on validation: points on the diagonal are calibrated."""
    calibration = run.test.calibration if run.test is not None else None
    if calibration is None or calibration.bins_before is None or calibration.bins_after is None:
        return None
    fig = new_figure((4.6, 4.2))
    ax = fig.subplots()
    ax.plot([0, 1], [0, 1], color="grey", linestyle=":", label="calibrated")
    for name, bins, ece in (
        ("before", calibration.bins_before, calibration.ece_before),
        (f"after (T = {calibration.temperature:.2f})", calibration.bins_after, calibration.ece_after),
    ):
        used = np.asarray(bins.count) > 0
        ax.plot(
            np.asarray(bins.confidence)[used],
            np.asarray(bins.accuracy)[used],
            marker="o",
            label=f"{name}: ECE {100 * ece:.2f}%",
        )
    ax.set_xlim(0, 1)
    ax.set_ylim(0, 1)
    ax.set_xlabel("confidence (mean of the bin)")
    ax.set_ylabel("accuracy")
    ax.set_title(f"reliability (test): {run.label}")
    ax.legend(fontsize=8)
    return save_figure(fig, path)


def per_label_f1(run: RunRecord, path: Path) -> Path | None:
    """Each label's test F1 at the run's decisions (multi-label), most frequent label first."""
    if run.summary is None or run.summary.task != "multi_label" or run.test is None or not run.test.per_class:
        return None
    ordered = sorted(run.test.per_class.items(), key=lambda item: -item[1].support)
    return bar_chart(
        [f"{name} ({m.support})" for name, m in ordered],
        {"F1": [m.f1 for _, m in ordered]},
        f"per-label F1 (test, support in brackets): {run.label}",
        "F1",
        path,
    )


def predicted_vs_true(run: RunRecord, path: Path) -> Path | None:
    """Predicted against true values on the test split (regression; the first target)."""
    cells = run.test_cells
    if run.summary is None or run.summary.task != "regression" or cells is None or not len(cells):
        return None
    try:
        truth = np.array([float(str(c).split()[0]) for c in cells["label"]])
        pred = np.array([float(str(c).split()[0]) for c in cells["pred"]])
    except (ValueError, IndexError):
        return None
    fig = new_figure((4.6, 4.2))
    ax = fig.subplots()
    ax.scatter(truth, pred, s=6, alpha=0.4)
    low, high = float(min(truth.min(), pred.min())), float(max(truth.max(), pred.max()))
    ax.plot([low, high], [low, high], color="grey", linestyle=":")
    target = run.label_names[0] if run.label_names else "target"
    ax.set_xlabel(f"true {target}")
    ax.set_ylabel(f"predicted {target}")
    ax.set_title(f"predicted vs true (test, n = {len(truth):,}): {run.label}")
    return save_figure(fig, path)


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


def _run_metric(run: RunRecord, metric: str) -> float | None:
    if metric == "test":
        acc = accuracy_of(run.test)
        return acc.accuracy if acc else None
    return run.val_acc


def sweep_grid(runs: Sequence[RunRecord]) -> Grid | None:
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
            best is None or np.count_nonzero(~np.isnan(grid.values)) > np.count_nonzero(~np.isnan(best.values))
        ):
            best = grid
    return best


def _grid_for(runs: Sequence[RunRecord], row_key: str, col_key: str, metric: str, others: list[str]) -> Grid | None:
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
    if len(row_vals) < MIN_AXIS or len(col_vals) < MIN_AXIS or len(cells) <= max(len(row_vals), len(col_vals)):
        return None
    rows, cols = _ordered(row_vals, originals), _ordered(col_vals, originals)
    values = np.full((len(rows), len(cols)), np.nan)
    for (r, c), accs in cells.items():
        values[rows.index(r), cols.index(c)] = float(np.mean(accs))
    # Only keys that really differ inside a cell are averaged over (lora.alpha tied to lora.r is not).
    averaged = [k for k in others if any(len(seen.get(k, ())) > 1 for seen in other_values.values())]
    return Grid(row_key, col_key, [originals[r] for r in rows], [originals[c] for c in cols], values, metric, averaged)


def sweep_heatmap(runs: Sequence[RunRecord], path: Path) -> Path | None:
    grid = sweep_grid(runs)
    if grid is None:
        return None
    fig = new_figure((max(5.0, 1.3 * len(grid.cols) + 2.5), max(3.5, 0.7 * len(grid.rows) + 2)))
    ax = fig.subplots()
    masked = np.ma.masked_invalid(100 * grid.values)
    image = ax.imshow(masked, cmap="viridis", aspect="auto")
    word = objective_word(common_task(r.summary.task for r in runs if r.summary is not None))
    fig.colorbar(image, ax=ax, label=f"mean {grid.metric} {word} x100")
    ax.set_xticks(np.arange(len(grid.cols)), [str(display_value(c)) for c in grid.cols], rotation=30, ha="right")
    ax.set_yticks(np.arange(len(grid.rows)), [str(display_value(r)) for r in grid.rows])
    ax.set_xlabel(grid.col_key)
    ax.set_ylabel(grid.row_key)
    # viridis is bright at the top of its range: dark text there, white text on the dark end.
    middle = (np.nanmin(grid.values) + np.nanmax(grid.values)) / 2
    for i, j in itertools.product(range(len(grid.rows)), range(len(grid.cols))):
        v = grid.values[i, j]
        text, color = ("—", "black") if math.isnan(v) else (f"{100 * v:.2f}", "black" if v > middle else "white")
        ax.text(j, i, text, ha="center", va="center", fontsize=8, color=color)
    title = f"mean {grid.metric} {word}: {grid.row_key} × {grid.col_key}"
    if grid.averaged_over:
        title += f"\n(averaged over {', '.join(grid.averaged_over)})"
    ax.set_title(title, fontsize=10)
    return save_figure(fig, path)
