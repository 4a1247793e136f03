"""Decisions tuned on the validation split after training: a softmax temperature (single-label,
fitted by likelihood; argmax unchanged, probabilities honest) with the expected calibration error
before and after, and per-label decision thresholds (multi-label, each label's F1 maximised on
validation; labels with too few validation positives share one threshold tuned on their pooled
counts, and the notes say which). No torch."""

from __future__ import annotations

import math
from typing import Sequence

import numpy as np

from budgetlora.evaluate.task_metrics import _f1
from budgetlora.task import MULTI, SINGLE, THRESHOLD_RANGE, Decisions, LabelSpace, softmax

ECE_BINS = 15
LISTED = 8  # rare labels named in the note
MIN_POSITIVES = 5  # a label with fewer validation positives cannot have its own threshold tuned
THRESHOLD_GRID = np.round(np.arange(THRESHOLD_RANGE[0], THRESHOLD_RANGE[1] + 1e-9, 0.01), 2)
TEMPERATURE_BOUNDS = (0.05, 20.0)
LOG_TEMPERATURE_TOLERANCE = 1e-6


def reliability_bins(probabilities: np.ndarray, labels: np.ndarray, bins: int = ECE_BINS) -> dict[str, list]:
    """A reliability diagram's points: per equal-width confidence bin, its rows, their mean
    confidence and their accuracy (both 0 in an empty bin)."""
    confidence = probabilities.max(1)
    correct = (probabilities.argmax(1) == labels).astype(np.float64)
    edges = np.linspace(0, 1, bins + 1)
    which = np.clip(np.digitize(confidence, edges[1:-1]), 0, bins - 1)
    count = np.bincount(which, minlength=bins)
    per_row = np.maximum(count, 1)
    return {
        "count": [int(c) for c in count],
        "confidence": [float(v) for v in np.bincount(which, weights=confidence, minlength=bins) / per_row],
        "accuracy": [float(v) for v in np.bincount(which, weights=correct, minlength=bins) / per_row],
    }


def expected_calibration_error(probabilities: np.ndarray, labels: np.ndarray, bins: int = ECE_BINS) -> float:
    """Mean |accuracy - confidence| over equal-width confidence bins, weighted by their rows."""
    points = reliability_bins(probabilities, labels, bins)
    count = np.asarray(points["count"], dtype=np.float64)
    gap = np.abs(np.asarray(points["accuracy"]) - np.asarray(points["confidence"]))
    return float((count * gap).sum() / max(count.sum(), 1))


def _nll(logits: np.ndarray, labels: np.ndarray, temperature: float) -> float:
    scaled = logits / temperature
    shifted = scaled - scaled.max(1, keepdims=True)
    log_probs = shifted - np.log(np.exp(shifted).sum(1, keepdims=True))
    return float(-log_probs[np.arange(len(labels)), labels].mean())


def fit_temperature(logits: np.ndarray, labels: np.ndarray) -> float:
    """The temperature that minimises the validation negative log-likelihood.

    A golden-section search on log T: the NLL is convex in 1/T, so it has one minimum on the
    bounded interval, and the search needs no SciPy (core commands run without it)."""
    logits = np.asarray(logits, dtype=np.float64)
    low, high = (math.log(b) for b in TEMPERATURE_BOUNDS)
    ratio = (math.sqrt(5) - 1) / 2
    a, b = high - ratio * (high - low), low + ratio * (high - low)
    nll_a, nll_b = _nll(logits, labels, math.exp(a)), _nll(logits, labels, math.exp(b))
    while high - low > LOG_TEMPERATURE_TOLERANCE:
        if nll_a <= nll_b:
            high, b, nll_b = b, a, nll_a
            a = high - ratio * (high - low)
            nll_a = _nll(logits, labels, math.exp(a))
        else:
            low, a, nll_a = a, b, nll_b
            b = low + ratio * (high - low)
            nll_b = _nll(logits, labels, math.exp(b))
    return float(math.exp((low + high) / 2))


def _best_threshold(f1: np.ndarray) -> float:
    """The grid threshold with the highest F1; among equals, the middle one (less overfit to the
    few validation rows near the boundary)."""
    best = np.flatnonzero(f1 >= f1.max() - 1e-12)
    return float(THRESHOLD_GRID[best[len(best) // 2]])


def tune_thresholds(probabilities: np.ndarray, truth: np.ndarray, names: Sequence[str]) -> tuple:
    """Per-label thresholds maximising each label's validation F1; (thresholds, tuned flags, notes)."""
    truth = np.asarray(truth, dtype=bool)
    width = truth.shape[1]
    tp, fp, fn = (np.zeros((width, len(THRESHOLD_GRID))) for _ in range(3))
    for i in range(width):  # one label at a time: rows x grid, never rows x labels x grid in memory
        above = probabilities[:, i, None] > THRESHOLD_GRID[None, :]
        positives = truth[:, i, None]
        tp[i], fp[i], fn[i] = (above & positives).sum(0), (above & ~positives).sum(0), (~above & positives).sum(0)
    support = truth.sum(0)
    tunable = support >= MIN_POSITIVES
    thresholds = np.full(len(names), 0.5)
    for i in np.flatnonzero(tunable):
        thresholds[i] = _best_threshold(_f1(tp[i], fp[i], fn[i]))
    notes = []
    rare = np.flatnonzero(~tunable)
    if len(rare):
        pooled = _f1(tp[rare].sum(0), fp[rare].sum(0), fn[rare].sum(0))
        shared = _best_threshold(pooled) if support[rare].sum() else 0.5
        thresholds[rare] = shared
        listed = ", ".join(f"{names[i]} ({int(support[i])})" for i in rare[:LISTED]) + (
            " ..." if len(rare) > LISTED else ""
        )
        notes.append(
            f"{len(rare)} label(s) have fewer than {MIN_POSITIVES} validation positives and share one threshold "
            f"{shared:.2f} tuned on their pooled counts: {listed}"
        )
    return tuple(float(t) for t in thresholds), tuple(bool(t) for t in tunable), tuple(notes)


def tune_decisions(space: LabelSpace, logits: np.ndarray, labels: np.ndarray) -> tuple[Decisions, dict]:
    """Decisions for `space` tuned on validation outputs, and what the tuning measured."""
    decisions = Decisions.default(space)
    if space.task == SINGLE:
        before = expected_calibration_error(softmax(logits), labels)
        temperature = fit_temperature(logits, labels)
        after = expected_calibration_error(softmax(logits / temperature), labels)
        calibrated = Decisions(space.task, space.width, temperature=temperature)
        return calibrated, {"temperature": temperature, "ece_before": before, "ece_after": after}
    if space.task == MULTI:
        probabilities = 1.0 / (1.0 + np.exp(-np.asarray(logits, dtype=np.float64)))
        thresholds, tuned, notes = tune_thresholds(probabilities, labels, space.names)
        tuned_decisions = Decisions(space.task, space.width, thresholds=thresholds, tuned=tuned, notes=notes)
        return tuned_decisions, {"tuned_labels": int(sum(tuned)), "labels": space.width}
    return decisions, {}
