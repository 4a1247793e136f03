"""The words of a results table: what its figures, marks and ties mean for the runs' task
(accuracy with McNemar and Wilson intervals, macro-F1 or Spearman with a paired bootstrap), and
the selection note that sets the validation-chosen winner beside the one choosing on test would
have named."""

from __future__ import annotations

import math
from collections.abc import Iterable

import pandas as pd

from budgetlora.artifacts.summary import OBJECTIVE_WORDS

MIN_SELECTION_RUNS, TOP_RUNS = 2, 3


def common_task(tasks: Iterable[str]) -> str | None:
    """The one task of these runs, or None when they have none or several."""
    found = {t for t in tasks if t}
    return found.pop() if len(found) == 1 else None


def table_task(table: pd.DataFrame) -> str | None:
    """The task of every run in the table, or None when it holds none or several."""
    return common_task(table["task"])


def objective_word(task: str | None) -> str:
    """The task's objective in prose (accuracy, macro-F1, Spearman); "objective" for several tasks."""
    return OBJECTIVE_WORDS.get(task or "", "objective")


def objective_heading(task: str | None) -> str:
    """A column's unit: figures are shown x100 ("acc %", "macro-F1 %", "Spearman x100")."""
    return {"single_label": "acc %", "multi_label": "macro-F1 %", "regression": "Spearman x100"}.get(
        task or "", "objective x100"
    )


def shown(value: float, task: str | None) -> str:
    """Accuracy as a percentage; macro-F1 and Spearman as they are (0-1, -1-1)."""
    return f"{100 * value:.2f}%" if task == "single_label" else f"{value:.4f}"


def gap(value: float, task: str | None) -> str:
    """A difference of the objective: points of accuracy, else its own units."""
    return f"{100 * value:.2f} points" if task == "single_label" else f"{value:.4f}"


_ACCURACY_TIES = (
    "exact McNemar test on the paired rows of val_predictions.csv when both runs scored the same rows, "
    "else a two-proportion z-test"
)
_ACCURACY_INTERVAL = "Accuracies are shown ± the half-width of their 95% Wilson interval"


def tie_note(task: str | None) -> str:
    """What `best`, `tie` and the figures of a results table mean, in the words of its runs' task
    (None: several tasks, each marked within its own runs)."""
    if task == "single_label":
        objective, test, interval = "validation accuracy", _ACCURACY_TIES, _ACCURACY_INTERVAL
    elif task in OBJECTIVE_WORDS:
        word = OBJECTIVE_WORDS[task]
        objective = f"validation {word}"
        test = (
            f"two-sided paired bootstrap of the {word} on the rows of val_predictions.csv; runs that scored "
            "other rows are not compared"
        )
        interval = f"The {word} is shown x100 ± the half-width of its 95% bootstrap interval"
    else:
        objective = "validation objective (accuracy, macro-F1 or Spearman, by task; each task marked separately)"
        test = f"accuracy: {_ACCURACY_TIES}; macro-F1 and Spearman: a two-sided paired bootstrap on the same rows"
        interval = "Figures are shown x100 ± the half-width of their 95% interval (Wilson for accuracy, bootstrap else)"
    return (
        f"`best` = highest {objective} of the final model (the split that chooses; the test split is shown "
        "beside it and never used to choose, so the best run's test figure is an honest estimate); `tie` = "
        f"not significantly different from `best` on the validation rows at 5% ({test}). {interval}; "
        "`mean of …` rows are seed repeats, shown as mean ± sample std."
    )


def selection_note(table: pd.DataFrame) -> str:
    """How much choosing on the test split would have overstated the winner (its test figure
    beside the validation-chosen winner's), and a warning when the validation split is too small
    to separate the top runs (the half-width of the objective's 95% interval against their
    spread). Empty for fewer than two scored runs, or runs of several tasks."""
    runs = table[(table["kind"] == "run") & table["val_acc"].notna() & table["test_acc"].notna()]
    task = table_task(runs) if len(runs) else None
    if len(runs) < MIN_SELECTION_RUNS or task is None:
        return ""
    word = objective_word(task)
    by_val = runs.sort_values("val_acc", ascending=False, kind="stable")
    chosen, test_best = by_val.iloc[0], runs.loc[runs["test_acc"].idxmax()]
    lines = ["## Selection", ""]
    lines.append(
        f"- chosen on validation: **{chosen['run']}**, validation {word} {shown(chosen['val_acc'], task)}, test "
        f"{shown(chosen['test_acc'], task)} (the honest estimate of the choice)"
    )
    if test_best["run"] == chosen["run"]:
        lines.append("- choosing on the test split would have picked the same run")
    else:
        lines.append(
            f"- choosing on the test split would have picked {test_best['run']} and reported "
            f"{shown(test_best['test_acc'], task)}: {gap(test_best['test_acc'] - chosen['test_acc'], task)} more "
            f"than the validation-chosen winner scores on test (the winner's curse of choosing on test, over "
            f"{len(runs)} runs)"
        )
    top = by_val.head(TOP_RUNS)
    n = int(chosen["val_n"]) if not math.isnan(chosen["val_n"]) else 0
    low, high = chosen["val_ci_low"], chosen["val_ci_high"]
    if n and len(top) > 1 and not (math.isnan(low) or math.isnan(high)):
        half, spread = (high - low) / 2, top["val_acc"].max() - top["val_acc"].min()
        if half > spread:
            lines.append(
                f"- **warning**: the validation split (n = {n:,}, 95% interval ±{gap(half, task)}) is too "
                f"small to separate the top {len(top)} runs (their validation {word} values span "
                f"{gap(spread, task)}); raise data.val_size, or confirm the top runs over seeds (--confirm-top)"
            )
    return "\n".join(lines) + "\n"
