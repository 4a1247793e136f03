"""The results table: one row per run (plus a mean row per group of seed repeats), config columns
for the keys that vary, the task's objective (accuracy, macro-F1 or Spearman) on validation and
test with its 95% interval, and ties with the best run on validation marked by a paired test
(McNemar for accuracy, a paired bootstrap otherwise), so runs are not ranked by noise."""

from __future__ import annotations

import json
import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from budgetlora import atomic
from budgetlora.artifacts import run_dir as rd
from budgetlora.artifacts.summary import SplitMetrics
from budgetlora.errors import BudgetLoraError
from budgetlora.evaluate.stats import mcnemar_pvalue, mean_std, two_proportion_pvalue
from budgetlora.results.runs import RunRecord, collect_runs
from budgetlora.results.wording import objective_heading, selection_note, table_task, tie_note

ALPHA = 0.05

# Config keys that differ between runs without describing the experiment: where the run was
# written and what it was called. Kept out of the "varying" columns and out of seed grouping.
_NOISE_LEAVES = {"name", "out", "out_dir", "output_dir", "run_dir", "resume", "checkpoint_dir", "log_dir"}


_SEED_KEYS = ("train.seed", "seed")


# Short names users are likely to type for --sort.
_SORT_ALIASES = {"test": "test_acc", "val": "best_val_acc", "params": "trainable_params", "name": "run"}


def canonical(value: Any) -> str:
    return json.dumps(value, sort_keys=True, default=str)


def _is_noise_key(key: str) -> bool:
    return key.rsplit(".", 1)[-1] in _NOISE_LEAVES


def is_seed_key(key: str) -> bool:
    return key in _SEED_KEYS


def varying_keys(runs: Sequence[RunRecord]) -> list[str]:
    """Config keys whose value is not the same in every run (in first-seen config order)."""
    keys: dict[str, None] = {}
    for run in runs:
        keys.update(dict.fromkeys(run.config))
    return [key for key in keys if not _is_noise_key(key) and len({canonical(run.config.get(key)) for run in runs}) > 1]


def display_value(value: Any) -> Any:
    """Config value as a table cell: lists joined so that `[query, value]` reads "query,value"."""
    if value is None:
        return ""
    if isinstance(value, (list, tuple)):
        return ",".join(str(v) for v in value)
    if isinstance(value, dict):
        return canonical(value)
    return value


def seed_groups(runs: Sequence[RunRecord]) -> list[list[RunRecord]]:
    """Runs that differ only in their seed, for groups of two or more."""
    groups: dict[str, list[RunRecord]] = {}
    for run in runs:
        if not run.config:
            continue
        key = canonical({k: v for k, v in run.config.items() if not _is_noise_key(k) and not is_seed_key(k)})
        groups.setdefault(key, []).append(run)
    return [members for members in groups.values() if len(members) > 1]


def _seed_of(run: RunRecord) -> Any:
    for key in _SEED_KEYS:
        if key in run.config:
            return run.config[key]
    return None


@dataclass(frozen=True)
class Accuracy:
    """A split's objective with its 95% interval: accuracy (single-label, with its count of right
    rows), macro-F1 (multi-label) or Spearman (regression)."""

    accuracy: float
    correct: int
    n: int
    ci_low: float
    ci_high: float
    task: str = "single_label"


def accuracy_of(split: SplitMetrics | None) -> Accuracy | None:
    """The objective with its interval from a summary's `test`/`val` metrics (None if absent)."""
    if split is None or not split.n:
        return None
    score = split.objective
    if split.task != "single_label":
        return Accuracy(score.value, 0, split.n, score.low, score.high, split.task)
    correct = split.correct if split.correct is not None else round(score.value * split.n)
    return Accuracy(score.value, correct, split.n, score.low, score.high)


def format_acc_ci(acc: Accuracy | None) -> str:
    """ "90.12 ± 0.67": percent with the half-width of the 95% interval."""
    if acc is None:
        return ""
    return f"{100 * acc.accuracy:.2f} ± {100 * (acc.ci_high - acc.ci_low) / 2:.2f}"


SELECTION_SPLIT = "val"  # the split that chooses between runs; the test split is reported beside, never used


def split_of(run: RunRecord, split: str) -> SplitMetrics | None:
    return run.val if split == "val" else run.test


def paired_pvalue(a: RunRecord, b: RunRecord, split: str = SELECTION_SPLIT) -> tuple[float, str]:
    """p-value for "a and b have the same accuracy on `split`" and the test used.

    McNemar when both runs scored exactly the same rows of the split (paired and more powerful;
    val_predictions.csv / test_predictions.csv), otherwise the two-proportion z-test on the counts.
    """
    task = a.summary.task if a.summary is not None else "single_label"
    if task != "single_label":
        return paired_objective_pvalue(a, b, split, task)
    out_a, out_b = (a.val_outcomes, b.val_outcomes) if split == "val" else (a.test_outcomes, b.test_outcomes)
    if out_a is not None and out_b is not None and len(out_a) and set(out_a.index) == set(out_b.index):
        aligned_b = out_b.reindex(out_a.index)
        return mcnemar_pvalue(out_a.to_numpy(bool), aligned_b.to_numpy(bool)), "mcnemar"
    acc_a, acc_b = accuracy_of(split_of(a, split)), accuracy_of(split_of(b, split))
    if acc_a is None or acc_b is None:
        raise ValueError(f"both runs need a {split} split to be compared")
    return two_proportion_pvalue(acc_a.correct, acc_a.n, acc_b.correct, acc_b.n), "z-test"


def paired_objective_pvalue(a: RunRecord, b: RunRecord, split: str, task: str) -> tuple[float, str]:
    """Two-sided paired bootstrap of the objective (macro-F1, Spearman) on the rows both runs
    scored; NaN (no test) when either run's predictions file is missing or holds other rows."""
    from budgetlora.evaluate.task_metrics import paired_bootstrap_pvalue

    cells_a, cells_b = (a.val_cells, b.val_cells) if split == "val" else (a.test_cells, b.test_cells)
    if cells_a is None or cells_b is None or not len(cells_a) or set(cells_a.index) != set(cells_b.index):
        return math.nan, ""
    cells_b = cells_b.reindex(cells_a.index)
    width = len(a.label_names)
    try:
        truth = parse_cells(cells_a["label"], task, width)
        pred_a, pred_b = parse_cells(cells_a["pred"], task, width), parse_cells(cells_b["pred"], task, width)
    except ValueError:
        return math.nan, ""
    return paired_bootstrap_pvalue(truth, pred_a, pred_b, task), "bootstrap"


def parse_cells(cells: Any, task: str, width: int) -> np.ndarray:
    """A predictions file's column as arrays: label indices joined by spaces as a rows x labels
    boolean matrix (multi-label), numbers joined by spaces as rows x targets (regression)."""
    if task == "multi_label":
        out = np.zeros((len(cells), width), dtype=bool)
        for row, cell in enumerate(cells):
            for index in str(cell).split():
                out[row, int(index)] = True
        return out
    return np.array([[float(v) for v in str(cell).split()] for cell in cells], dtype=float)


def mark_ties(
    runs: Sequence[RunRecord], alpha: float = ALPHA, split: str = SELECTION_SPLIT
) -> dict[str, tuple[str, float, str]]:
    """label → (mark, p-value vs the best run, test used) for runs scored on `split`.

    The best objective on the validation split (the final model's: accuracy, macro-F1 or
    Spearman; runs of different tasks are marked separately) is "best": it is the split that
    chooses, so the test figure beside it stays an honest estimate. A run is a "tie" when the
    paired test on the same validation rows cannot tell it apart from the best at level alpha.
    """
    scored = [r for r in runs if accuracy_of(split_of(r, split)) is not None and r.pruned is None]
    marks: dict[str, tuple[str, float, str]] = {}
    for task in sorted({r.summary.task for r in scored if r.summary is not None}):
        group = [r for r in scored if r.summary is not None and r.summary.task == task]
        best = max(group, key=lambda r: accuracy_of(split_of(r, split)).accuracy)  # type: ignore[union-attr]
        marks[best.label] = ("best", math.nan, "")
        for run in group:
            if run is best:
                continue
            p, method = paired_pvalue(best, run, split)
            marks[run.label] = ("tie" if p >= alpha else "", p, method)
    return marks


def number_or_nan(value: Any) -> float:
    return float(value) if value is not None else math.nan


def run_task(run: RunRecord) -> str:
    """The run's task: its summary's, else (a pruned run has none) its config's."""
    if run.summary is not None:
        return run.summary.task
    return str(run.config.get("task", "single_label")) if run.config else ""


def _run_row(run: RunRecord, varying: list[str], marks: dict[str, tuple[str, float, str]]) -> dict[str, Any]:
    test, val = accuracy_of(run.test), accuracy_of(run.val)
    mark, p, method = marks.get(run.label, ("", math.nan, ""))
    if run.pruned is not None:
        mark = f"pruned @ {run.pruned.step}"
    row: dict[str, Any] = {"run": run.label, "kind": "pruned" if run.pruned is not None else "run"}
    row.update({key: display_value(run.config.get(key)) for key in varying})
    row.update(
        task=run_task(run),
        seeds="",
        trainable_params=number_or_nan(run.trainable_params),
        val=format_acc_ci(val),
        val_acc=val.accuracy if val else math.nan,
        val_n=val.n if val else math.nan,
        val_ci_low=val.ci_low if val else math.nan,
        val_ci_high=val.ci_high if val else math.nan,
        best_val_acc=number_or_nan(run.val_acc),
        best_val_acc_std=math.nan,
        best_step=number_or_nan(run.best_step),
        test=format_acc_ci(test),
        test_acc=test.accuracy if test else math.nan,
        test_acc_std=math.nan,
        test_ci_low=test.ci_low if test else math.nan,
        test_ci_high=test.ci_high if test else math.nan,
        test_n=test.n if test else math.nan,
        mark=mark,
        p_vs_best=p,
        p_test=method,
        train_time_s=number_or_nan(run.train_time_s),
        samples_per_s=number_or_nan(run.samples_per_s),
        note=run.pruned.reason if run.pruned is not None else "",
    )
    return row


def _mean_or_nan(values: Iterable[Any]) -> tuple[float, float]:
    present = [v for v in values if v is not None]
    return mean_std(present) if present else (math.nan, math.nan)


def _group_row(members: list[RunRecord], varying: list[str]) -> dict[str, Any]:
    """Mean ± sample std over seeds; ties are not marked because the rows are not paired runs."""
    first = members[0]
    seeds = [_seed_of(r) for r in members]
    tests = [accuracy_of(r.test) for r in members]
    test_mean, test_std = _mean_or_nan(t.accuracy for t in tests if t is not None)
    final_val_mean, final_val_std = _mean_or_nan(v.accuracy for v in map(accuracy_of, (r.val for r in members)) if v)
    val_mean, val_std = _mean_or_nan(r.val_acc for r in members)
    row: dict[str, Any] = {"run": "mean of " + ", ".join(r.label for r in members), "kind": "mean"}
    row.update({key: "" if is_seed_key(key) else display_value(first.config.get(key)) for key in varying})
    row.update(
        task=run_task(first),
        seeds=",".join(str(s) for s in seeds),
        trainable_params=number_or_nan(first.trainable_params),
        val="" if math.isnan(final_val_mean) else f"{100 * final_val_mean:.2f} ± {100 * final_val_std:.2f}",
        val_acc=final_val_mean,
        val_n=math.nan,
        val_ci_low=math.nan,
        val_ci_high=math.nan,
        best_val_acc=val_mean,
        best_val_acc_std=val_std,
        best_step=math.nan,
        test="" if math.isnan(test_mean) else f"{100 * test_mean:.2f} ± {100 * test_std:.2f}",
        test_acc=test_mean,
        test_acc_std=test_std,
        test_ci_low=math.nan,
        test_ci_high=math.nan,
        test_n=math.nan,
        mark="",
        p_vs_best=math.nan,
        p_test="",
        train_time_s=_mean_or_nan(r.train_time_s for r in members)[0],
        samples_per_s=_mean_or_nan(r.samples_per_s for r in members)[0],
        note="",
    )
    return row


def _sort_key(series: pd.Series) -> pd.Series:
    # Config columns mix numbers and "" (missing); compare numerically when that is possible.
    numeric = pd.to_numeric(series, errors="coerce")
    present = series.map(lambda v: v != "" and not (isinstance(v, float) and math.isnan(v)))
    if numeric[present].notna().all():
        return numeric
    return series.astype(str)


def sort_table(table: pd.DataFrame, sort_by: str, descending: bool = True) -> pd.DataFrame:
    column = _SORT_ALIASES.get(sort_by, sort_by)
    if column not in table.columns:
        aliases = ", ".join(f"{a} (= {c})" for a, c in sorted(_SORT_ALIASES.items()))
        raise BudgetLoraError(
            f"unknown sort column {sort_by!r}; valid columns: {', '.join(table.columns)}; aliases: {aliases}"
        )
    return table.sort_values(
        column, ascending=not descending, na_position="last", kind="stable", key=_sort_key
    ).reset_index(drop=True)


def default_sort_column(table: pd.DataFrame) -> str:
    """The split that chooses: the final model's validation accuracy, where the runs have one."""
    for column in ("val_acc", "best_val_acc", "test_acc"):
        if table[column].notna().any():
            return column
    return "val_acc"


def build_table(runs: Sequence[RunRecord], sort_by: str | None = None, descending: bool = True) -> pd.DataFrame:
    """One row per run plus one "mean" row per group of seed repeats, sorted.

    Numeric columns hold fractions (test_acc=0.9012); the `test` column is the display string.
    """
    if not runs:
        raise BudgetLoraError("no runs to tabulate")
    varying = varying_keys(runs)
    marks = mark_ties(runs)
    rows = [_run_row(run, varying, marks) for run in runs]
    rows += [_group_row(members, varying) for members in seed_groups([r for r in runs if r.pruned is None])]
    table = pd.DataFrame(rows)
    table.attrs["varying"] = varying
    return sort_table(table, sort_by or default_sort_column(table), descending)


def fmt_number(value: Any, digits: int = 1) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return ""
    if isinstance(value, (int, np.integer)) or (isinstance(value, float) and value.is_integer() and digits == 0):
        return f"{int(value):,}"
    return f"{value:.{digits}f}"


def fmt_pct(value: Any) -> str:
    return "" if value is None or math.isnan(value) else f"{100 * value:.2f}"


def fmt_p(value: Any) -> str:
    if value is None or math.isnan(value):
        return ""
    return "<0.001" if value < 0.001 else f"{value:.3f}"  # noqa: PLR2004 - the third decimal shown


def display_table(table: pd.DataFrame) -> pd.DataFrame:
    """Human-facing version of the results table (strings, percent, thousands separators), its
    headings naming the runs' objective."""
    varying = [c for c in table.attrs.get("varying", []) if c in table.columns]
    unit = objective_heading(table_task(table))
    out = pd.DataFrame({"run": table["run"]})
    for key in varying:
        out[key] = table[key].astype(str)
    if (table["seeds"] != "").any():
        out["seeds"] = table["seeds"]
    out["trainable params"] = table["trainable_params"].map(lambda v: fmt_number(v, 0))
    out[f"best val {unit}"] = [
        fmt_pct(acc) + (f" @ {int(step)}" if not math.isnan(step) else "")
        for acc, step in zip(table["best_val_acc"], table["best_step"], strict=True)
    ]
    if (table["val"] != "").any():
        out[f"val {unit} (95% CI / ± sd)"] = table["val"]
    out[f"test {unit} (95% CI / ± sd)"] = table["test"]
    out["mark"] = table["mark"]
    out["p vs best"] = table["p_vs_best"].map(fmt_p)
    out["train time s"] = table["train_time_s"].map(fmt_number)
    out["samples/s"] = table["samples_per_s"].map(fmt_number)
    if (table["note"] != "").any():
        out["note"] = table["note"]
    return out


def _md_cell(value: Any) -> str:
    return str(value).replace("|", "\\|").replace("\n", " ")


def markdown_table(frame: pd.DataFrame) -> str:
    """Pipe table without the optional `tabulate` dependency."""
    header = "| " + " | ".join(_md_cell(c) for c in frame.columns) + " |"
    rule = "|" + "|".join("---" for _ in frame.columns) + "|"
    body = ["| " + " | ".join(_md_cell(v) for v in row) + " |" for row in frame.itertuples(index=False)]
    return "\n".join([header, rule, *body]) + "\n"


def results_markdown(table: pd.DataFrame, root: Path, verdict: str = "") -> str:
    text = f"# Results: {root}\n\n{tie_note(table_task(table))}\n\n" + markdown_table(display_table(table))
    note = selection_note(table)
    return text + (f"\n{note}" if note else "") + (f"\n{verdict}" if verdict else "")


RESULTS_FILES = ("results.csv", "results.md")


def csv_safe_frame(table: pd.DataFrame) -> pd.DataFrame:
    """The table with formula-leading text cells neutralised (run names, notes: rd.spreadsheet_safe)."""
    return table.apply(lambda column: column.map(rd.spreadsheet_safe) if column.dtype == object else column)


def write_results(
    root: str | Path, sort_by: str | None = None, descending: bool = True, verdict: str = "", overwrite: bool = False
) -> pd.DataFrame:
    """Collect the runs under root, write root/results.csv and root/results.md (with a sweep's
    verdict, when given), return the table. Files of those names that budgetlora did not write
    are replaced only with `overwrite`."""
    root = Path(root)
    folder = atomic.OutputFolder(root, overwrite)
    folder.claim(RESULTS_FILES)
    table = build_table(collect_runs(root), sort_by, descending)
    folder.write_text("results.csv", csv_safe_frame(table).to_csv(index=False))
    folder.write_text("results.md", results_markdown(table, root, verdict))
    return table
