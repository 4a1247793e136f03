"""Collect finished runs into one table, mark statistical ties, and compare runs side by side.

Reads only what `budgetlora train` writes (docs/run-directory.md): summary.json, config.yaml,
metrics.jsonl and test_predictions.csv. Nothing here needs torch, so tables and reports can be
built on a machine that never trained anything.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import tempfile
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import numpy.typing as npt
import pandas as pd
import yaml

from budgetlora.errors import BudgetLoraError
from budgetlora.stats import mcnemar_pvalue, mean_std, two_proportion_pvalue, wilson_interval

if TYPE_CHECKING:
    from matplotlib.figure import Figure

SUMMARY = "summary.json"
CONFIG = "config.yaml"
METRICS = "metrics.jsonl"
PREDICTIONS = "test_predictions.csv"
MAX_DEPTH = 3
ALPHA = 0.05

# Folders inside a run (or left by a failed run) that never contain other runs.
_SKIP_DIRS = {"adapter", "tokenizer", "checkpoints", "__pycache__"}
# Config keys that differ between runs without describing the experiment: where the run was
# written and what it was called. Kept out of the "varying" columns and out of seed grouping.
_NOISE_LEAVES = {"name", "out", "out_dir", "output_dir", "run_dir", "resume", "checkpoint_dir", "log_dir"}
_SEED_KEYS = ("train.seed", "seed")
# Short names users are likely to type for --sort.
_SORT_ALIASES = {"test": "test_acc", "val": "best_val_acc", "params": "trainable_params", "name": "run"}


# --------------------------------------------------------------------------------------------
# Loading runs


@dataclass
class Run:
    """One finished run directory, loaded lazily beyond summary and config."""

    path: Path
    label: str
    summary: dict[str, Any]
    config: dict[str, Any] = field(default_factory=dict)  # flattened to dotted keys

    @property
    def test(self) -> dict[str, Any] | None:
        test = self.summary.get("test")
        return test if isinstance(test, dict) and test.get("n") else None

    @cached_property
    def metrics(self) -> list[dict[str, Any]]:
        return read_metrics(self.path / METRICS)

    @cached_property
    def test_outcomes(self) -> pd.Series | None:
        """Per-row correctness indexed by test ID, or None when no usable predictions file."""
        return _read_outcomes(self.path / PREDICTIONS)


def is_run_dir(path: Path) -> bool:
    return (Path(path) / SUMMARY).is_file()


def flatten_config(config: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """Nested dict → {"lora.r": 8, ...}, so that configs compare key by key."""
    flat: dict[str, Any] = {}
    for key, value in config.items():
        dotted = f"{prefix}{key}"
        if isinstance(value, dict) and value:
            flat.update(flatten_config(value, dotted + "."))
        else:
            flat[dotted] = value
    return flat


def _read_json(path: Path) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as exc:
        raise BudgetLoraError(f"cannot read {path}: {exc}") from exc
    if not isinstance(data, dict):
        raise BudgetLoraError(f"{path} does not hold a JSON object")
    return data


def _read_config(path: Path) -> dict[str, Any]:
    # A run without config.yaml is still worth listing; it just has no config columns.
    if not path.is_file():
        return {}
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except (OSError, yaml.YAMLError) as exc:
        raise BudgetLoraError(f"cannot read {path}: {exc}") from exc
    return flatten_config(data) if isinstance(data, dict) else {}


def read_metrics(path: Path) -> list[dict[str, Any]]:
    """metrics.jsonl as a list of dicts; unparsable lines (a run killed mid-write) are skipped."""
    if not path.is_file():
        return []
    records = []
    for line in path.read_text(encoding="utf-8").splitlines():
        line = line.strip()
        if not line:
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            continue
        if isinstance(record, dict) and "step" in record:
            records.append(record)
    return records


def _read_outcomes(path: Path) -> pd.Series | None:
    if not path.is_file():
        return None
    try:
        # Strings throughout: IDs like "007" must not become 7, and label/pred compare as text.
        frame = pd.read_csv(path, dtype=str, keep_default_na=False)
    except (OSError, ValueError):
        return None
    if not {"ID", "label", "pred"} <= set(frame.columns) or frame["ID"].duplicated().any():
        return None
    return pd.Series((frame["label"] == frame["pred"]).to_numpy(), index=frame["ID"].to_numpy())


def load_run(path: str | Path, label: str | None = None) -> Run:
    path = Path(path)
    if not path.is_dir():
        raise BudgetLoraError(f"run directory not found: {path}")
    if not is_run_dir(path):
        raise BudgetLoraError(f"{path} is not a finished run (no {SUMMARY})")
    summary = _read_json(path / SUMMARY)
    return Run(path=path, label=label or path.name, summary=summary, config=_read_config(path / CONFIG))


def _find_run_dirs(root: Path, max_depth: int) -> list[Path]:
    found: list[Path] = []

    def walk(folder: Path, depth: int) -> None:
        try:
            children = sorted(p for p in folder.iterdir() if p.is_dir())
        except OSError:
            return
        for child in children:
            # Hidden folders include the `.name.tmp-*` leftovers of runs still being written.
            if child.name.startswith(".") or child.name in _SKIP_DIRS:
                continue
            if is_run_dir(child):
                found.append(child)
            elif depth < max_depth:
                walk(child, depth + 1)

    walk(root, 1)
    return found


def collect_runs(root: str | Path, max_depth: int = MAX_DEPTH) -> list[Run]:
    """Every run under root: root itself if it is a run, else subfolders up to max_depth deep.

    Labels are paths relative to root so that two sweeps' "r8" runs stay distinguishable.
    """
    root = Path(root)
    if not root.is_dir():
        raise BudgetLoraError(f"directory not found: {root}")
    if is_run_dir(root):
        return [load_run(root)]
    dirs = _find_run_dirs(root, max_depth)
    if not dirs:
        raise BudgetLoraError(f"no runs found in {root} (no {SUMMARY} up to {max_depth} levels deep)")
    return [load_run(d, d.relative_to(root).as_posix()) for d in dirs]


# --------------------------------------------------------------------------------------------
# Config comparison


def canonical(value: Any) -> str:
    return json.dumps(value, sort_keys=True, default=str)


def _is_noise_key(key: str) -> bool:
    return key.rsplit(".", 1)[-1] in _NOISE_LEAVES


def is_seed_key(key: str) -> bool:
    return key in _SEED_KEYS


def varying_keys(runs: Sequence[Run]) -> list[str]:
    """Config keys whose value is not the same in every run (in first-seen config order)."""
    keys: dict[str, None] = {}
    for run in runs:
        keys.update(dict.fromkeys(run.config))
    return [
        key
        for key in keys
        if not _is_noise_key(key) and len({canonical(run.config.get(key)) for run in runs}) > 1
    ]


def display_value(value: Any) -> Any:
    """Config value as a table cell: lists joined so that `[query, value]` reads "query,value"."""
    if value is None:
        return ""
    if isinstance(value, (list, tuple)):
        return ",".join(str(v) for v in value)
    if isinstance(value, dict):
        return canonical(value)
    return value


def seed_groups(runs: Sequence[Run]) -> list[list[Run]]:
    """Runs that differ only in their seed, for groups of two or more."""
    groups: dict[str, list[Run]] = {}
    for run in runs:
        if not run.config:
            continue
        key = canonical({k: v for k, v in run.config.items() if not _is_noise_key(k) and not is_seed_key(k)})
        groups.setdefault(key, []).append(run)
    return [members for members in groups.values() if len(members) > 1]


def _seed_of(run: Run) -> Any:
    for key in _SEED_KEYS:
        if key in run.config:
            return run.config[key]
    return None


# --------------------------------------------------------------------------------------------
# Accuracy, intervals, ties


@dataclass(frozen=True)
class Accuracy:
    accuracy: float
    correct: int
    n: int
    ci_low: float
    ci_high: float


def accuracy_of(block: dict[str, Any] | None) -> Accuracy | None:
    """Accuracy with its Wilson interval from a summary's `test`/`val` block (None if absent)."""
    if not isinstance(block, dict) or not block.get("n") or block.get("accuracy") is None:
        return None
    n = int(block["n"])
    correct = int(block["correct"]) if block.get("correct") is not None else round(block["accuracy"] * n)
    low, high = block.get("ci_low"), block.get("ci_high")
    if low is None or high is None:
        low, high = wilson_interval(correct, n)
    return Accuracy(float(block["accuracy"]), correct, n, float(low), float(high))


def format_acc_ci(acc: Accuracy | None) -> str:
    """ "90.12 ± 0.67": percent with the half-width of the 95% interval."""
    if acc is None:
        return ""
    return f"{100 * acc.accuracy:.2f} ± {100 * (acc.ci_high - acc.ci_low) / 2:.2f}"


def paired_pvalue(a: Run, b: Run) -> tuple[float, str]:
    """p-value for "a and b have the same test accuracy" and the test used.

    McNemar when both runs scored exactly the same test IDs (paired and more powerful),
    otherwise the two-proportion z-test on the summary counts.
    """
    out_a, out_b = a.test_outcomes, b.test_outcomes
    if out_a is not None and out_b is not None and len(out_a) and set(out_a.index) == set(out_b.index):
        aligned_b = out_b.reindex(out_a.index)
        return mcnemar_pvalue(out_a.to_numpy(bool), aligned_b.to_numpy(bool)), "mcnemar"
    acc_a, acc_b = accuracy_of(a.test), accuracy_of(b.test)
    if acc_a is None or acc_b is None:
        raise ValueError("both runs need a test set to be compared")
    return two_proportion_pvalue(acc_a.correct, acc_a.n, acc_b.correct, acc_b.n), "z-test"


def mark_ties(runs: Sequence[Run], alpha: float = ALPHA) -> dict[str, tuple[str, float, str]]:
    """label → (mark, p-value vs the best run, test used) for runs that have a test set.

    The best test accuracy is "best"; a run is a "tie" when the test cannot tell it apart from
    the best at level alpha, i.e. the ranking between the two is noise.
    """
    scored = [r for r in runs if accuracy_of(r.test) is not None]
    if not scored:
        return {}
    best = max(scored, key=lambda r: accuracy_of(r.test).accuracy)  # type: ignore[union-attr]
    marks: dict[str, tuple[str, float, str]] = {best.label: ("best", math.nan, "")}
    for run in scored:
        if run is best:
            continue
        p, method = paired_pvalue(best, run)
        marks[run.label] = ("tie" if p >= alpha else "", p, method)
    return marks


# --------------------------------------------------------------------------------------------
# The results table


def _nan(value: Any) -> float:
    return float(value) if value is not None else math.nan


def _run_row(run: Run, varying: list[str], marks: dict[str, tuple[str, float, str]]) -> dict[str, Any]:
    test = accuracy_of(run.test)
    mark, p, method = marks.get(run.label, ("", math.nan, ""))
    row: dict[str, Any] = {"run": run.label, "kind": "run"}
    row.update({key: display_value(run.config.get(key)) for key in varying})
    row.update(
        seeds="",
        trainable_params=_nan(run.summary.get("trainable_params")),
        best_val_acc=_nan(run.summary.get("best_val_acc")),
        best_val_acc_std=math.nan,
        best_step=_nan(run.summary.get("best_step")),
        test=format_acc_ci(test),
        test_acc=test.accuracy if test else math.nan,
        test_acc_std=math.nan,
        test_ci_low=test.ci_low if test else math.nan,
        test_ci_high=test.ci_high if test else math.nan,
        test_n=test.n if test else math.nan,
        mark=mark,
        p_vs_best=p,
        p_test=method,
        train_time_s=_nan(run.summary.get("train_time_s")),
        samples_per_s=_nan(run.summary.get("samples_per_s")),
    )
    return row


def _mean_or_nan(values: Iterable[Any]) -> tuple[float, float]:
    present = [v for v in values if v is not None]
    return mean_std(present) if present else (math.nan, math.nan)


def _group_row(members: list[Run], varying: list[str]) -> dict[str, Any]:
    """Mean ± sample std over seeds; ties are not marked because the rows are not paired runs."""
    first = members[0]
    seeds = [_seed_of(r) for r in members]
    tests = [accuracy_of(r.test) for r in members]
    test_mean, test_std = _mean_or_nan(t.accuracy for t in tests if t is not None)
    val_mean, val_std = _mean_or_nan(r.summary.get("best_val_acc") for r in members)
    row: dict[str, Any] = {"run": "mean of " + ", ".join(r.label for r in members), "kind": "mean"}
    row.update({key: "" if is_seed_key(key) else display_value(first.config.get(key)) for key in varying})
    row.update(
        seeds=",".join(str(s) for s in seeds),
        trainable_params=_nan(first.summary.get("trainable_params")),
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
        train_time_s=_mean_or_nan(r.summary.get("train_time_s") for r in members)[0],
        samples_per_s=_mean_or_nan(r.summary.get("samples_per_s") for r in members)[0],
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
    return "test_acc" if table["test_acc"].notna().any() else "best_val_acc"


def build_table(runs: Sequence[Run], sort_by: str | None = None, descending: bool = True) -> pd.DataFrame:
    """One row per run plus one "mean" row per group of seed repeats, sorted.

    Numeric columns hold fractions (test_acc=0.9012); the `test` column is the display string.
    """
    if not runs:
        raise BudgetLoraError("no runs to tabulate")
    varying = varying_keys(runs)
    marks = mark_ties(runs)
    rows = [_run_row(run, varying, marks) for run in runs]
    rows += [_group_row(members, varying) for members in seed_groups(runs)]
    table = pd.DataFrame(rows)
    table.attrs["varying"] = varying
    return sort_table(table, sort_by or default_sort_column(table), descending)


# --------------------------------------------------------------------------------------------
# Rendering


def _fmt_number(value: Any, digits: int = 1) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return ""
    if isinstance(value, (int, np.integer)) or (
        isinstance(value, float) and value.is_integer() and digits == 0
    ):
        return f"{int(value):,}"
    return f"{value:.{digits}f}"


def _fmt_pct(value: Any) -> str:
    return "" if value is None or math.isnan(value) else f"{100 * value:.2f}"


def _fmt_p(value: Any) -> str:
    if value is None or math.isnan(value):
        return ""
    return "<0.001" if value < 0.001 else f"{value:.3f}"


def display_table(table: pd.DataFrame) -> pd.DataFrame:
    """Human-facing version of the results table (strings, percent, thousands separators)."""
    varying = [c for c in table.attrs.get("varying", []) if c in table.columns]
    out = pd.DataFrame({"run": table["run"]})
    for key in varying:
        out[key] = table[key].astype(str)
    if (table["seeds"] != "").any():
        out["seeds"] = table["seeds"]
    out["trainable params"] = table["trainable_params"].map(lambda v: _fmt_number(v, 0))
    out["best val acc %"] = [
        _fmt_pct(acc) + (f" @ {int(step)}" if not math.isnan(step) else "")
        for acc, step in zip(table["best_val_acc"], table["best_step"], strict=True)
    ]
    out["test acc % (95% CI / ± sd)"] = table["test"]
    out["mark"] = table["mark"]
    out["p vs best"] = table["p_vs_best"].map(_fmt_p)
    out["train time s"] = table["train_time_s"].map(_fmt_number)
    out["samples/s"] = table["samples_per_s"].map(_fmt_number)
    return out


def _md_cell(value: Any) -> str:
    return str(value).replace("|", "\\|").replace("\n", " ")


def markdown_table(frame: pd.DataFrame) -> str:
    """Pipe table without the optional `tabulate` dependency."""
    header = "| " + " | ".join(_md_cell(c) for c in frame.columns) + " |"
    rule = "|" + "|".join("---" for _ in frame.columns) + "|"
    body = ["| " + " | ".join(_md_cell(v) for v in row) + " |" for row in frame.itertuples(index=False)]
    return "\n".join([header, rule, *body]) + "\n"


TIE_NOTE = (
    "`best` = highest test accuracy; `tie` = not significantly different from `best` at 5% "
    "(exact McNemar test on the paired rows of test_predictions.csv when both runs scored the same "
    "test IDs, else a two-proportion z-test). Test accuracy is shown ± the half-width of its 95% "
    "Wilson interval; `mean of …` rows are seed repeats, shown as mean ± sample std."
)


def results_markdown(table: pd.DataFrame, root: Path) -> str:
    return f"# Results: {root}\n\n{TIE_NOTE}\n\n" + markdown_table(display_table(table))


# --------------------------------------------------------------------------------------------
# Atomic file output


def _atomic_write(path: Path, write: Callable[[str], object]) -> Path:
    """Write via a temp file in the same folder, then rename, so readers never see half a file."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    # mkstemp creates 0600; give the final file the permissions a plain open() would have.
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(tmp, 0o666 & ~umask)
    try:
        write(tmp)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def atomic_write_text(path: Path, text: str) -> Path:
    return _atomic_write(path, lambda tmp: Path(tmp).write_text(text, encoding="utf-8"))


def new_figure(figsize: tuple[float, float]) -> Figure:
    """A pyplot-free Figure (renders with Agg, no display, no global backend switch).

    matplotlib is imported here because it costs most of a second at CLI start.
    """
    from matplotlib.figure import Figure

    return Figure(figsize=figsize)


def atomic_save_figure(fig: Figure, path: Path) -> Path:
    return _atomic_write(path, lambda tmp: fig.savefig(tmp, format="png", dpi=110, bbox_inches="tight"))


def write_results(root: str | Path, sort_by: str | None = None, descending: bool = True) -> pd.DataFrame:
    """Collect the runs under root, write root/results.csv and root/results.md, return the table."""
    root = Path(root)
    table = build_table(collect_runs(root), sort_by, descending)
    atomic_write_text(root / "results.csv", table.to_csv(index=False))
    atomic_write_text(root / "results.md", results_markdown(table, root))
    return table


# --------------------------------------------------------------------------------------------
# compare


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


def _compare_row(run: Run, marks: dict[str, tuple[str, float, str]]) -> dict[str, Any]:
    test = accuracy_of(run.test)
    mark, p, method = marks.get(run.label, ("", math.nan, ""))
    s = run.summary
    return {
        "run": run.label,
        "path": str(run.path),
        "trainable_params": _nan(s.get("trainable_params")),
        "wall_time_s": _nan(s.get("wall_time_s")),
        "train_time_s": _nan(s.get("train_time_s")),
        "samples_per_s": _nan(s.get("samples_per_s")),
        "peak_memory_mb": _nan(s.get("peak_memory_mb")),
        "final_train_loss": _nan(s.get("final_train_loss")),
        "final_eval_loss": _nan(s.get("final_eval_loss")),
        "test": format_acc_ci(test),
        "test_acc": test.accuracy if test else math.nan,
        "test_ci_low": test.ci_low if test else math.nan,
        "test_ci_high": test.ci_high if test else math.nan,
        "mark": mark,
        "p_vs_best": p,
        "p_test": method,
    }


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
        ax.bar(
            x + (i - (len(series) - 1) / 2) * width,
            np.nan_to_num(vals),
            width,
            label=name,
            yerr=yerr,
            capsize=4,
        )
    ax.set_xticks(
        x, labels, rotation=30 if len(labels) > 3 else 0, ha="right" if len(labels) > 3 else "center"
    )
    ax.set_title(title)
    ax.set_ylabel(ylabel)
    if len(series) > 1:
        ax.legend()
    return atomic_save_figure(fig, path)


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
    acc = 100 * table["test_acc"].to_numpy(float)
    errors = [
        acc - 100 * table["test_ci_low"].to_numpy(float),
        100 * table["test_ci_high"].to_numpy(float) - acc,
    ]
    written.append(
        bar_chart(
            labels,
            {"test": acc},
            "test accuracy (95% CI)",
            "accuracy %",
            out_dir / "compare_test_acc.png",
            np.nan_to_num(errors),
        )
    )
    return [p for p in written if p is not None]


def compare_runs(run_dirs: Sequence[str | Path], out_dir: str | Path) -> pd.DataFrame:
    """Side-by-side table of cost and quality for the given runs; writes compare.md/.csv + PNGs."""
    if not run_dirs:
        raise BudgetLoraError("compare needs at least one run directory")
    paths = [Path(p) for p in run_dirs]
    runs = [load_run(p, label) for p, label in zip(paths, unique_labels(paths), strict=True)]
    out = Path(out_dir)
    marks = mark_ties(runs)
    table = pd.DataFrame([_compare_row(run, marks) for run in runs])
    charts = _compare_charts(table, out)
    atomic_write_text(out / "compare.csv", table.to_csv(index=False))
    atomic_write_text(out / "compare.md", _compare_markdown(table, charts))
    table.attrs["charts"] = [str(p) for p in charts]
    return table


def _compare_markdown(table: pd.DataFrame, charts: list[Path]) -> str:
    shown = pd.DataFrame(
        {
            "run": table["run"],
            "trainable params": table["trainable_params"].map(lambda v: _fmt_number(v, 0)),
            "wall time s": table["wall_time_s"].map(_fmt_number),
            "samples/s": table["samples_per_s"].map(_fmt_number),
            "peak memory MB": table["peak_memory_mb"].map(_fmt_number),
            "final train loss": table["final_train_loss"].map(lambda v: _fmt_number(v, 4)),
            "final eval loss": table["final_eval_loss"].map(lambda v: _fmt_number(v, 4)),
            "test acc % (95% CI)": table["test"],
            "mark": table["mark"],
            "p vs best": table["p_vs_best"].map(_fmt_p),
        }
    )
    images = "".join(f"![{p.stem}]({p.name})\n\n" for p in charts)
    return "# Run comparison\n\n" + TIE_NOTE + "\n\n" + markdown_table(shown) + "\n" + images


# --------------------------------------------------------------------------------------------
# CLI


def _cmd_results(args: argparse.Namespace) -> int:
    root = Path(args.dir)
    table = write_results(root, args.sort, descending=not args.ascending)
    print(markdown_table(display_table(table)), end="")
    print(f"\nwrote {root / 'results.csv'} and {root / 'results.md'}")
    return 0


def _cmd_compare(args: argparse.Namespace) -> int:
    if len(args.runs) < 2:
        raise BudgetLoraError("compare needs at least two run directories")
    table = compare_runs(args.runs, args.out)
    print(_compare_markdown(table, []), end="")
    print(f"\nwrote {Path(args.out) / 'compare.md'}, compare.csv and {len(table.attrs['charts'])} charts")
    return 0


def add_subcommands(subparsers: Any) -> None:
    """Register `results` and `compare` on an argparse subparsers object."""
    results = subparsers.add_parser(
        "results",
        help="table of all runs under DIR with ties marked; writes DIR/results.csv and results.md",
        description="Collect every run (folder with summary.json, up to 3 levels deep) under DIR.",
    )
    results.add_argument("dir", metavar="DIR", help="a sweep's --out folder or any folder of runs")
    results.add_argument("--sort", metavar="COL", default=None, help="column to sort by (default: test_acc)")
    results.add_argument("--ascending", action="store_true", help="sort ascending (default: descending)")
    results.set_defaults(func=_cmd_results)

    compare = subparsers.add_parser(
        "compare",
        help="side-by-side cost/accuracy table and bar charts for two or more runs",
    )
    compare.add_argument("runs", nargs="+", metavar="RUN", help="run directories")
    compare.add_argument("--out", metavar="DIR", default="compare", help="output folder (default: ./compare)")
    compare.set_defaults(func=_cmd_compare)
