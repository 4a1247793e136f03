"""The end of a study: which configuration to use. The winner is chosen on the validation split
(the final model's validation accuracy; with confirmation runs, its mean over their seeds), never
on the test split, whose accuracy is reported beside it as the honest estimate; the
configurations statistically tied with it on the same validation rows; and the cheapest of those
(fewest trainable parameters, then fastest training)."""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, Optional

import numpy as np

from budgetlora.evaluate.stats import mcnemar_pvalue, mean_std
from budgetlora.results.runs import RunRecord
from budgetlora.results.table import ALPHA, accuracy_of, mark_ties, parse_cells
from budgetlora.results.wording import objective_word, shown


def _task_of(runs: Sequence[RunRecord]) -> str:
    return next((r.summary.task for r in runs if r.summary is not None), "single_label")


def _tie_test(task: str) -> str:
    return "an exact McNemar test" if task == "single_label" else f"a paired bootstrap of the {objective_word(task)}"


@dataclass
class Candidate:
    """One configuration: a single run, or its confirmation runs over several seeds."""

    label: str
    runs: list[RunRecord]
    accuracy: float  # on the validation split: what chose it
    std: float = 0.0
    p_vs_winner: float = math.nan

    @property
    def test_accuracy(self) -> float:
        """Mean test objective of its runs (accuracy, macro-F1 or Spearman; nan without a test
        split): reported, never compared."""
        scores = [accuracy_of(r.test) for r in self.runs]
        values = [s.accuracy for s in scores if s is not None]
        return float(np.mean(values)) if values else math.nan

    @property
    def task(self) -> str:
        return _task_of(self.runs)

    @property
    def trainable(self) -> float:
        value = self.runs[0].trainable_params
        return float(value) if value is not None else math.inf

    @property
    def train_time(self) -> float:
        times = [r.train_time_s for r in self.runs if r.train_time_s is not None]
        return float(np.mean(times)) if times else math.inf


@dataclass
class Verdict:
    winner: Candidate
    tied: list[Candidate] = field(default_factory=list)
    method: str = ""

    @property
    def cheapest(self) -> Candidate:
        return min([self.winner] + self.tied, key=lambda c: (c.trainable, c.train_time))

    def markdown(self) -> str:
        w, cheap, task = self.winner, self.cheapest, self.winner.task
        objective = objective_word(task)
        scale = 100 if task == "single_label" else 1
        spread = f" ± {scale * w.std:.2f} (sd over {len(w.runs)} seeds)" if len(w.runs) > 1 else ""
        test = (
            ""
            if math.isnan(w.test_accuracy)
            else f"; test {objective} {shown(w.test_accuracy, task)} (not used to choose)"
        )
        lines = [
            "## Verdict",
            "",
            f"- **winner: {w.label}**, validation {objective} {shown(w.accuracy, task)}{spread}{test}, "
            f"{w.trainable:,.0f} trainable parameters",
        ]
        if self.tied:
            lines.append(
                "- statistically tied with it (p >= 0.05): "
                + ", ".join(f"{c.label} ({shown(c.accuracy, task)}, p={c.p_vs_winner:.3f})" for c in self.tied)
            )
        else:
            lines.append("- no other configuration is statistically tied with it")
        lines.append(
            f"- **cheapest of these: {cheap.label}** ({cheap.trainable:,.0f} trainable parameters, "
            f"{cheap.train_time:.0f} s of training)"
        )
        lines += ["", self.method, ""]
        return "\n".join(lines)


def _stacked_outcomes(runs: Sequence[RunRecord]) -> Optional[dict[tuple[int, str], bool]]:
    """(seed position, validation row ID) -> correct, over a configuration's seed runs."""
    out: dict[tuple[int, str], bool] = {}
    for i, run in enumerate(sorted(runs, key=lambda r: str(r.config.get("train.seed")))):
        outcomes = run.val_outcomes
        if outcomes is None:
            return None
        out.update({(i, str(k)): bool(v) for k, v in outcomes.items()})
    return out


def _stacked_cells(runs: Sequence[RunRecord]) -> Any:
    """The validation rows of a configuration's seed runs, stacked with a (seed position, ID) index."""
    import pandas as pd

    parts = []
    for i, run in enumerate(sorted(runs, key=lambda r: str(r.config.get("train.seed")))):
        cells = run.val_cells
        if cells is None:
            return None
        parts.append(cells.set_axis([(i, str(k)) for k in cells.index], axis=0))
    return pd.concat(parts) if parts else None


def _grouped_bootstrap_p(a: Candidate, b: Candidate, task: str) -> float:
    """Paired bootstrap of the objective over the (seed, row) pairs (multi-label, regression)."""
    from budgetlora.evaluate.task_metrics import paired_bootstrap_pvalue

    ca, cb = _stacked_cells(a.runs), _stacked_cells(b.runs)
    if ca is None or cb is None or set(ca.index) != set(cb.index):
        return math.nan
    cb = cb.reindex(ca.index)
    width = len(a.runs[0].label_names)
    try:
        truth = parse_cells(ca["label"], task, width)
        pred_a, pred_b = parse_cells(ca["pred"], task, width), parse_cells(cb["pred"], task, width)
    except ValueError:
        return math.nan
    return paired_bootstrap_pvalue(truth, pred_a, pred_b, task)


def _grouped_p(a: Candidate, b: Candidate) -> float:
    """Exact McNemar over the (seed, row) pairs of two configurations' confirmation runs (a paired
    bootstrap of the objective for multi-label and regression, whose rows are not right or wrong)."""
    if a.task != "single_label":
        return _grouped_bootstrap_p(a, b, a.task)
    oa, ob = _stacked_outcomes(a.runs), _stacked_outcomes(b.runs)
    if oa is None or ob is None or set(oa) != set(ob):
        return math.nan
    keys = sorted(oa)
    return mcnemar_pvalue(np.array([oa[k] for k in keys]), np.array([ob[k] for k in keys]))


def single_run_verdict(runs: Sequence[RunRecord]) -> Optional[Verdict]:
    scored = [r for r in runs if accuracy_of(r.val) is not None and r.pruned is None]
    if not scored:
        return None
    marks = mark_ties(scored)
    candidates = {r.label: Candidate(r.label, [r], accuracy_of(r.val).accuracy) for r in scored}  # type: ignore[union-attr]
    winner = next(candidates[label] for label, (mark, _, _) in marks.items() if mark == "best")
    tied = []
    for label, (mark, p, _) in marks.items():
        if mark == "tie":
            candidates[label].p_vs_winner = p
            tied.append(candidates[label])
    return Verdict(
        winner,
        sorted(tied, key=lambda c: -c.accuracy),
        f"Chosen on the validation split (the final model of each run); ties: {_tie_test(winner.task)} on the "
        "paired validation rows, at 5%. Its validation figure is optimistic (it chose); its test figure, never "
        "used to choose, is the honest estimate.",
    )


def confirmed_verdict(groups: dict[str, list[RunRecord]], source: str = "the confirmation runs") -> Optional[Verdict]:
    """From runs over seeds (confirmation runs, or a study's own seeds): configuration label -> its
    seed runs; chosen on the mean validation objective."""
    candidates = []
    for label, runs in groups.items():
        accs = [accuracy_of(r.val).accuracy for r in runs if accuracy_of(r.val) is not None]  # type: ignore[union-attr]
        if accs:
            mean, std = mean_std(accs)
            candidates.append(Candidate(label, runs, mean, std))
    if not candidates:
        return None
    winner = max(candidates, key=lambda c: c.accuracy)
    tied = []
    for c in candidates:
        if c is not winner:
            c.p_vs_winner = _grouped_p(winner, c)
            if not c.p_vs_winner < ALPHA:
                tied.append(c)
    seeds = max(len(c.runs) for c in candidates)
    return Verdict(
        winner,
        sorted(tied, key=lambda c: -c.accuracy),
        f"From {source} ({seeds} seeds per configuration, full length): chosen on the mean ± sd "
        f"of the validation {objective_word(winner.task)}; ties by {_tie_test(winner.task)} "
        "over the (seed, validation row) pairs, at 5%; the test figure (mean over the seeds) is reported, never "
        "used to choose.",
    )
