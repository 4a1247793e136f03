"""The numbers reported for a set of predictions: accuracy with n and its 95% Wilson interval,
macro-F1, per-class precision / recall / F1, the confusion matrix; and their text rendering."""

from __future__ import annotations

from typing import Optional, Sequence

import numpy as np

from budgetlora.evaluate.stats import wilson_interval


def softmax(logits: np.ndarray) -> np.ndarray:
    shifted = logits - logits.max(axis=1, keepdims=True)
    exp = np.exp(shifted)
    return exp / exp.sum(axis=1, keepdims=True)


def cross_entropy(logits: np.ndarray, labels: np.ndarray) -> float:
    """Mean cross-entropy; NaN when the logits are not finite (the caller decides what that means)."""
    with np.errstate(invalid="ignore", over="ignore"):
        shifted = logits - logits.max(axis=1, keepdims=True)
        log_probs = shifted - np.log(np.exp(shifted).sum(axis=1, keepdims=True))
        return float(-log_probs[np.arange(len(labels)), labels].mean())


def classification_metrics(
    labels: np.ndarray, preds: np.ndarray, names: Sequence[str], logits: Optional[np.ndarray] = None
) -> dict:
    """Accuracy with n and 95% Wilson CI, macro-F1, per-class P/R/F1 and the confusion matrix
    (rows: true class, columns: predicted class)."""
    k = len(names)
    confusion = np.zeros((k, k), dtype=np.int64)
    np.add.at(confusion, (labels, preds), 1)
    correct = int(np.trace(confusion))
    n = int(len(labels))
    low, high = wilson_interval(correct, n)
    per_class, f1s = {}, []
    for i, name in enumerate(names):
        tp = confusion[i, i]
        precision = tp / confusion[:, i].sum() if confusion[:, i].sum() else 0.0
        recall = tp / confusion[i].sum() if confusion[i].sum() else 0.0
        f1 = 2 * precision * recall / (precision + recall) if precision + recall else 0.0
        per_class[name] = {
            "precision": float(precision),
            "recall": float(recall),
            "f1": float(f1),
            "support": int(confusion[i].sum()),
        }
        f1s.append(f1)
    metrics = {
        "accuracy": correct / n if n else 0.0,
        "n": n,
        "correct": correct,
        "ci_low": low,
        "ci_high": high,
        "macro_f1": float(np.mean(f1s)),
        "per_class": per_class,
        "confusion_matrix": confusion.tolist(),
    }
    if logits is not None:
        metrics["loss"] = cross_entropy(logits, labels)
    return metrics


def _format_scores(metrics: dict) -> str:
    percent = metrics.get("task") == "multi_label"
    k, digits = (100, 2) if percent else (1, 4)
    return (
        "  ".join(
            f"{name.replace('_', '-')} {k * s['value']:.{digits}f} (95% CI {k * s['low']:.{digits}f}-{k * s['high']:.{digits}f})"
            for name, s in metrics["scores"].items()
        )
        + f"  n={metrics['n']:,}"
    )


def format_metrics(metrics: dict, names: Sequence[str]) -> str:
    """The human-readable report: headline, per-class (per-label, per-target) table, and for
    single-label the confusion matrix."""
    if metrics.get("task") == "regression":
        lines = [_format_scores(metrics)]
        for target, row in metrics.get("per_target", {}).items():
            lines.append(f"{target}: " + "  ".join(f"{k} {v:.4f}" for k, v in row.items()))
        return "\n".join(lines)
    if metrics.get("task") == "multi_label":
        width = max(len(n) for n in names)
        lines = [_format_scores(metrics), f"{'label':<{width}}  precision  recall     f1  support"]
        for name in names:
            row = metrics["per_class"][name]
            lines.append(
                f"{name:<{width}}  {row['precision']:>9.4f}  {row['recall']:>6.4f}  {row['f1']:>5.4f}  {row['support']:>7,}"
            )
        return "\n".join(lines)
    acc, low, high = metrics["accuracy"], metrics["ci_low"], metrics["ci_high"]
    lines = [
        f"accuracy {100 * acc:.2f}% (95% CI {100 * low:.2f}-{100 * high:.2f}, "
        f"n={metrics['n']:,}, correct={metrics['correct']:,})  macro-F1 {100 * metrics['macro_f1']:.2f}"
    ]
    width = max(len(n) for n in names)
    lines.append(f"{'class':<{width}}  precision  recall     f1  support")
    for name in names:
        row = metrics["per_class"][name]
        lines.append(
            f"{name:<{width}}  {row['precision']:>9.4f}  {row['recall']:>6.4f}  {row['f1']:>5.4f}  {row['support']:>7,}"
        )
    lines.append("confusion matrix (rows: true, columns: predicted)")
    cell = max([7] + [len(n) for n in names])
    lines.append(" " * (width + 2) + " ".join(f"{n:>{cell}}" for n in names))
    for name, row in zip(names, metrics["confusion_matrix"], strict=False):
        lines.append(f"{name:<{width}}  " + " ".join(f"{v:>{cell},}" for v in row))
    calibration = metrics.get("calibration")
    if calibration:
        lines.append(
            f"calibration: temperature {calibration['temperature']:.3f}, expected calibration error "
            f"{100 * calibration['ece_before']:.2f}% before, {100 * calibration['ece_after']:.2f}% after"
        )
    return "\n".join(lines)
