"""`budgetlora compare`: a side-by-side table of cost and quality for chosen runs, with ties to
the best marked, and bar charts of each column."""

from __future__ import annotations

import math
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from budgetlora import atomic
from budgetlora.artifacts import run_dir as rd
from budgetlora.errors import BudgetLoraError
from budgetlora.results.plots import bar_chart
from budgetlora.results.runs import RunRecord, read_run
from budgetlora.results.wording import objective_heading, objective_word, table_task, tie_note
from budgetlora.results.table import (
    csv_safe_frame,
    fmt_number,
    fmt_p,
    number_or_nan,
    run_task,
    accuracy_of,
    format_acc_ci,
    mark_ties,
    markdown_table,
)


def unique_labels(paths: Sequence[Path]) -> list[str]:
    """Shortest path suffixes that tell the runs apart (runs/a/r8 vs runs/b/r8 → a/r8, b/r8)."""
    parts = [Path(os.path.abspath(p)).parts for p in paths]
    for depth in range(1, max(len(p) for p in parts) + 1):
        labels = ["/".join(p[-depth:]) for p in parts]
        if len(set(labels)) == len(labels):
            return labels
    return [str(p) for p in paths]


_COMPARE_BARS = (
    ("trainable_params", "trainable parameters", "compare_trainable_params.png"),
    ("wall_time_s", "wall time (s)", "compare_wall_time.png"),
    ("samples_per_s", "training samples / s", "compare_samples_per_s.png"),
    ("peak_memory_mb", "peak memory (MB)", "compare_peak_memory.png"),
)


def _compare_row(run: RunRecord, marks: dict[str, tuple[str, float, str]]) -> dict[str, Any]:
    test = accuracy_of(run.test)
    mark, p, method = marks.get(run.label, ("", math.nan, ""))
    s = run.summary
    return {
        "run": run.label,
        "task": run_task(run),
        "path": str(run.path),
        "trainable_params": number_or_nan(run.trainable_params),
        "wall_time_s": number_or_nan(s.wall_time_s if s else None),
        "train_time_s": number_or_nan(run.train_time_s),
        "samples_per_s": number_or_nan(run.samples_per_s),
        "peak_memory_mb": number_or_nan(s.peak_memory_mb if s else None),
        "final_train_loss": number_or_nan(s.final_train_loss if s else None),
        "final_eval_loss": number_or_nan(s.final_eval_loss if s else None),
        "test": format_acc_ci(test),
        "test_acc": test.accuracy if test else math.nan,
        "test_ci_low": test.ci_low if test else math.nan,
        "test_ci_high": test.ci_high if test else math.nan,
        "mark": mark,
        "p_vs_best": p,
        "p_test": method,
    }


def _compare_charts(table: pd.DataFrame, out_dir: Path) -> list[Path]:
    labels = list(table["run"])
    written = [
        bar_chart(labels, {column: table[column]}, title, title, out_dir / filename)
        for column, title, filename in _COMPARE_BARS
    ]
    written.append(
        bar_chart(
            labels,
            {"train": table["final_train_loss"], "eval": table["final_eval_loss"]},
            "final loss",
            "loss",
            out_dir / "compare_loss.png",
        )
    )
    task = table_task(table)
    word = objective_word(task)
    acc = 100 * table["test_acc"].to_numpy(float)
    errors = [acc - 100 * table["test_ci_low"].to_numpy(float), 100 * table["test_ci_high"].to_numpy(float) - acc]
    written.append(
        bar_chart(
            labels,
            {"test": acc},
            f"test {word} (95% CI)",
            objective_heading(task),
            out_dir / "compare_test_acc.png",
            np.nan_to_num(errors),
        )
    )
    return [p for p in written if p is not None]


COMPARE_FILES = ("compare.csv", "compare.md", "compare_loss.png", "compare_test_acc.png") + tuple(
    name for _, _, name in _COMPARE_BARS
)


def compare_runs(run_dirs: Sequence[str | Path], out_dir: str | Path, overwrite: bool = False) -> pd.DataFrame:
    """Side-by-side table of cost and quality for the given runs; writes compare.md/.csv + PNGs."""
    if not run_dirs:
        raise BudgetLoraError("compare needs at least one run directory")
    paths = [Path(p) for p in run_dirs]
    out = Path(out_dir)
    inside = rd.inside_run(out)
    if inside is not None:
        raise BudgetLoraError(
            f"compare --out {out} is inside the run {inside}; a comparison is not part of one "
            "run: write it to another folder"
        )
    resolved = [p.resolve() for p in paths]
    twice = next((p for p, r in zip(paths, resolved, strict=False) if resolved.count(r) > 1), None)
    if twice is not None:
        raise BudgetLoraError(f"compare: {twice} is given twice; compare different runs")
    runs = [read_run(p, label) for p, label in zip(paths, unique_labels(paths), strict=True)]
    folder = atomic.OutputFolder(out, overwrite)
    folder.claim(COMPARE_FILES)
    marks = mark_ties(runs)
    table = pd.DataFrame([_compare_row(run, marks) for run in runs])
    charts = _compare_charts(table, out)
    folder.write_text("compare.csv", csv_safe_frame(table).to_csv(index=False))
    folder.write_text("compare.md", compare_markdown(table, charts))
    table.attrs["charts"] = [str(p) for p in charts]
    return table


def compare_markdown(table: pd.DataFrame, charts: list[Path]) -> str:
    shown = pd.DataFrame(
        {
            "run": table["run"],
            "trainable params": table["trainable_params"].map(lambda v: fmt_number(v, 0)),
            "wall time s": table["wall_time_s"].map(fmt_number),
            "samples/s": table["samples_per_s"].map(fmt_number),
            "peak memory MB": table["peak_memory_mb"].map(fmt_number),
            "final train loss": table["final_train_loss"].map(lambda v: fmt_number(v, 4)),
            "final eval loss": table["final_eval_loss"].map(lambda v: fmt_number(v, 4)),
            f"test {objective_heading(table_task(table))} (95% CI)": table["test"],
            "mark": table["mark"],
            "p vs best": table["p_vs_best"].map(fmt_p),
        }
    )
    images = "".join(f"![{p.stem}]({p.name})\n\n" for p in charts)
    return "# Run comparison\n\n" + tie_note(table_task(table)) + "\n\n" + markdown_table(shown) + "\n" + images
