"""A labeled split scored the way its task is judged, from the model's raw outputs and the run's
decisions: the metrics (as summary.json stores them) and the per-row answers written to the
predictions files. The one place `eval`, the recipe's final evaluation and the export checks
turn outputs into numbers. No torch."""

from __future__ import annotations

from typing import Optional

import numpy as np

from budgetlora.evaluate.calibration import expected_calibration_error, reliability_bins
from budgetlora.evaluate.metrics import classification_metrics
from budgetlora.evaluate.task_metrics import _binary_cross_entropy, multilabel_metrics, regression_metrics
from budgetlora.task import MULTI, POSITIVE, SINGLE, Decisions, LabelSpace, softmax


def score_split(
    space: LabelSpace, decisions: Decisions, outputs: np.ndarray, labels: np.ndarray
) -> tuple[dict, np.ndarray]:
    """(metrics, answers) of one labeled split; answers as `Decisions.decide` gives them."""
    answers = decisions.decide(outputs)
    if space.task == SINGLE:
        metrics = classification_metrics(labels, answers, list(space.names), outputs)
        if not decisions.baked and decisions.temperature != 1.0:
            before, after = softmax(outputs), decisions.scores(outputs)
            metrics["calibration"] = {
                "temperature": decisions.temperature,
                "ece_before": expected_calibration_error(before, labels),
                "ece_after": expected_calibration_error(after, labels),
                "bins_before": reliability_bins(before, labels),
                "bins_after": reliability_bins(after, labels),
            }
        return metrics, answers
    if space.task == MULTI:
        loss = None if decisions.baked else _binary_cross_entropy(outputs, labels)
        return multilabel_metrics(labels > POSITIVE, answers, list(space.names), loss), answers
    truth = labels.reshape(len(labels), -1)
    return regression_metrics(truth, answers, list(space.names), float(((answers - truth) ** 2).mean())), answers


def _number(value: float) -> str:
    return f"{float(value):.6g}"


def answer_cells(space: LabelSpace, answers: np.ndarray) -> list[str]:
    """One cell per row of a predictions file: the class index, the on labels' indices joined by
    spaces (multi-label), or the values (regression; several targets joined by spaces)."""
    if space.task == SINGLE:
        return [str(int(a)) for a in answers]
    if space.task == MULTI:
        return [" ".join(str(i) for i in np.flatnonzero(row)) for row in np.asarray(answers, dtype=bool)]
    return [" ".join(_number(v) for v in np.atleast_1d(row)) for row in np.asarray(answers).reshape(len(answers), -1)]


def label_cells(space: LabelSpace, labels: Optional[np.ndarray]) -> Optional[list[str]]:
    if labels is None:
        return None
    if space.task == MULTI:
        return answer_cells(space, labels > POSITIVE)
    return answer_cells(space, labels)
