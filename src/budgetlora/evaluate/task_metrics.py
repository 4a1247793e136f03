"""The numbers reported for multi-label and regression predictions, each headline with a 95%
bootstrap interval over rows (paired resamples, so the figures of one split agree with each other):
multi-label micro/macro-F1, subset accuracy (with its Wilson interval: it is a proportion of rows),
sample-averaged Jaccard and per-label precision / recall / F1; regression Pearson, Spearman, MAE and
RMSE (several targets: the mean over targets). No torch."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Iterator, Optional, Sequence

import numpy as np

from budgetlora.evaluate.stats import wilson_interval
from budgetlora.task import POSITIVE

BOOTSTRAP_RESAMPLES = 1000
BOOTSTRAP_SEED = 0
CONFIDENCE = 0.95


def _interval(value: float, resampled: np.ndarray) -> dict[str, float]:
    finite = resampled[np.isfinite(resampled)]
    if not len(finite):
        return {"value": float(value), "low": float(value), "high": float(value)}
    tail = (1 - CONFIDENCE) / 2
    low, high = np.quantile(finite, [tail, 1 - tail])
    return {"value": float(value), "low": float(min(low, value)), "high": float(max(high, value))}


BOOTSTRAP_CHUNK_CELLS = 1 << 23  # resamples x rows per chunk of weights: about 100 MB at a time


def resample_weight_chunks(
    n: int, resamples: int = BOOTSTRAP_RESAMPLES, seed: int = BOOTSTRAP_SEED
) -> Iterator[np.ndarray]:
    """The row counts of a bootstrap (each row drawn with replacement n times), a chunk of
    resamples x n at a time, so memory stays bounded on large evaluation files."""
    rng = np.random.default_rng(seed)
    step = max(1, BOOTSTRAP_CHUNK_CELLS // max(n, 1))
    for start in range(0, resamples, step):
        k = min(step, resamples - start)
        draws = rng.integers(0, n, size=(k, n)) + (np.arange(k) * n)[:, None]
        yield np.bincount(draws.ravel(), minlength=k * n).reshape(k, n).astype(np.float32)


def _f1(tp: np.ndarray, fp: np.ndarray, fn: np.ndarray) -> np.ndarray:
    denom = 2 * tp + fp + fn
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(denom > 0, 2 * tp / np.maximum(denom, 1e-12), 0.0)


def multilabel_counts(truth: np.ndarray, pred: np.ndarray, weights: Optional[np.ndarray] = None) -> tuple:
    """Per-label TP / FP / FN (rows weighted: a bootstrap's counts, resamples x labels)."""
    tp, fp, fn = (truth & pred), (~truth & pred), (truth & ~pred)
    if weights is None:
        return tp.sum(0).astype(float), fp.sum(0).astype(float), fn.sum(0).astype(float)
    return weights @ tp.astype(np.float32), weights @ fp.astype(np.float32), weights @ fn.astype(np.float32)


def macro_f1_of(truth: np.ndarray, pred: np.ndarray) -> float:
    tp, fp, fn = multilabel_counts(truth, pred)
    return float(_f1(tp, fp, fn).mean())


def multilabel_metrics(truth: np.ndarray, pred: np.ndarray, names: Sequence[str], loss: Optional[float] = None) -> dict:
    """Metrics of a rows x labels boolean prediction against the truth (same shape)."""
    truth, pred = np.asarray(truth, dtype=bool), np.asarray(pred, dtype=bool)
    n = len(truth)
    tp, fp, fn = multilabel_counts(truth, pred)
    per_label_f1 = _f1(tp, fp, fn)
    exact = (truth == pred).all(1)
    union = (truth | pred).sum(1)
    jaccard_rows = np.where(union > 0, (truth & pred).sum(1) / np.maximum(union, 1), 1.0)
    macro, micro, jaccard = [], [], []
    for weights in resample_weight_chunks(n):
        btp, bfp, bfn = multilabel_counts(truth, pred, weights)
        macro.append(_f1(btp, bfp, bfn).mean(1))
        micro.append(_f1(btp.sum(1), bfp.sum(1), bfn.sum(1)))
        jaccard.append(weights @ jaccard_rows.astype(np.float32) / n)
    scores = {
        "macro_f1": _interval(per_label_f1.mean(), np.concatenate(macro)),
        "micro_f1": _interval(float(_f1(tp.sum(), fp.sum(), fn.sum())), np.concatenate(micro)),
        "jaccard": _interval(float(jaccard_rows.mean()), np.concatenate(jaccard)),
    }
    correct = int(exact.sum())
    low, high = wilson_interval(correct, n)
    scores["subset_accuracy"] = {"value": correct / n, "low": low, "high": high}
    per_class = {}
    for i, name in enumerate(names):
        precision = tp[i] / (tp[i] + fp[i]) if tp[i] + fp[i] else 0.0
        recall = tp[i] / (tp[i] + fn[i]) if tp[i] + fn[i] else 0.0
        per_class[name] = {
            "precision": float(precision),
            "recall": float(recall),
            "f1": float(per_label_f1[i]),
            "support": int(truth[:, i].sum()),
        }
    out = {
        "task": "multi_label",
        "n": n,
        "accuracy": correct / n,
        "correct": correct,
        "ci_low": low,
        "ci_high": high,
        "macro_f1": float(per_label_f1.mean()),
        "per_class": per_class,
        "scores": scores,
    }
    if loss is not None:
        out["loss"] = loss
    return out


def _ranks(values: np.ndarray) -> np.ndarray:
    """Average ranks along axis 0 (ties share their mean rank), like scipy's rankdata, which core
    commands do without."""
    values = np.asarray(values, dtype=np.float64)
    columns = values.reshape(len(values), -1)
    ranks = np.empty_like(columns)
    for column in range(columns.shape[1]):
        v = columns[:, column]
        order = np.argsort(v, kind="mergesort")
        sorted_v = v[order]
        starts = np.flatnonzero(np.r_[True, sorted_v[1:] != sorted_v[:-1]])
        ends = np.r_[starts[1:], len(v)]
        ranks[order, column] = np.repeat((starts + ends + 1) / 2.0, ends - starts)  # mean 1-based position
    return ranks.reshape(values.shape)


def _pearson_columns(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Per-column correlation; 0 where a column never varies. Scored targets always vary (the data
    checks refuse a split whose targets do not), so a zero variance is a constant prediction, which
    ranks nothing; NaN there would make the objective and the summary unusable."""
    a = a - a.mean(0)
    b = b - b.mean(0)
    denom = np.sqrt((a * a).sum(0) * (b * b).sum(0))
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(denom > 0, (a * b).sum(0) / np.maximum(denom, 1e-300), 0.0)


def regression_scores(truth: np.ndarray, pred: np.ndarray) -> dict[str, float]:
    """Pearson, Spearman, MAE, RMSE, each the mean over targets (columns)."""
    truth, pred = np.asarray(truth, float).reshape(len(truth), -1), np.asarray(pred, float).reshape(len(pred), -1)
    error = pred - truth
    return {
        "pearson": float(_pearson_columns(truth, pred).mean()),
        "spearman": float(_pearson_columns(_ranks(truth), _ranks(pred)).mean()),
        "mae": float(np.abs(error).mean()),
        "rmse": float(np.sqrt((error**2).mean(0)).mean()),
    }


def regression_metrics(
    truth: np.ndarray, pred: np.ndarray, names: Sequence[str], loss: Optional[float] = None, resamples: int = 500
) -> dict:
    """Regression metrics with bootstrap intervals, and each target's own figures."""
    truth, pred = np.asarray(truth, float).reshape(len(truth), -1), np.asarray(pred, float).reshape(len(pred), -1)
    n = len(truth)
    headline = regression_scores(truth, pred)
    rng = np.random.default_rng(BOOTSTRAP_SEED)
    samples = {key: np.empty(resamples) for key in headline}
    with np.errstate(invalid="ignore", divide="ignore"):
        for b in range(resamples):
            rows = rng.integers(0, n, size=n)
            for key, value in regression_scores(truth[rows], pred[rows]).items():
                samples[key][b] = value
    per_target = (
        {name: regression_scores(truth[:, [i]], pred[:, [i]]) for i, name in enumerate(names)} if len(names) > 1 else {}
    )
    out = {
        "task": "regression",
        "n": n,
        "scores": {key: _interval(value, samples[key]) for key, value in headline.items()},
        "per_target": per_target,
    }
    if loss is not None:
        out["loss"] = loss
    return out


def _binary_cross_entropy(logits: np.ndarray, labels: np.ndarray) -> float:
    with np.errstate(over="ignore", invalid="ignore"):
        loss = np.maximum(logits, 0) - logits * labels + np.log1p(np.exp(-np.abs(logits)))
        return float(loss.mean())


@dataclass(frozen=True)
class ValidationScore:
    """Scores an evaluation inside the training loop: (objective, loss, per-row outcome) from the
    model's outputs, where higher objective is better and the per-row outcome (right or not) is
    what a sweep's paired tests compare. `key` names the objective in metrics.jsonl. Regression
    outputs are compared in the model's (standardised) units: `shift`/`scale` map the validation
    targets there."""

    task: str
    shift: tuple[float, ...] = ()
    scale: tuple[float, ...] = ()

    @property
    def key(self) -> str:
        return "eval_acc" if self.task == "single_label" else "eval_score"

    def __call__(self, logits: np.ndarray, labels: np.ndarray) -> tuple[float, float, np.ndarray]:
        if self.task == "single_label":
            from budgetlora.evaluate.metrics import cross_entropy

            correct = logits.argmax(1) == labels
            return float(correct.mean()), cross_entropy(logits, labels), correct
        if self.task == "multi_label":
            truth, pred = labels > POSITIVE, logits > 0
            return macro_f1_of(truth, pred), _binary_cross_entropy(logits, labels), (truth == pred).all(1)
        targets = labels.reshape(len(labels), -1)
        if self.scale:
            targets = (targets - np.asarray(self.shift)) / np.asarray(self.scale)
        outputs = logits.reshape(len(logits), -1)
        with np.errstate(invalid="ignore", over="ignore"):
            loss = float(((outputs - targets) ** 2).mean())
            spearman = regression_scores(targets, outputs)["spearman"] if np.isfinite(loss) else math.nan
        return (spearman if math.isfinite(spearman) else -1.0), loss, np.zeros(len(labels), dtype=bool)


def validation_score(
    task: str = "single_label", shift: Sequence[float] = (), scale: Sequence[float] = ()
) -> ValidationScore:
    return ValidationScore(task, tuple(shift), tuple(scale))


def paired_bootstrap_pvalue(
    truth: np.ndarray, pred_a: np.ndarray, pred_b: np.ndarray, task: str, resamples: int = 1000, seed: int = 0
) -> float:
    """Two-sided paired bootstrap of a task's objective (multi-label macro-F1, regression
    Spearman) for two runs' answers on the same rows: twice the smaller share of row resamples in
    which one run is not behind the other (with a +1 correction, so it is never exactly 0)."""

    def score(rows: np.ndarray, pred: np.ndarray) -> float:
        if task == "multi_label":
            return macro_f1_of(truth[rows], pred[rows])
        return regression_scores(truth[rows], pred[rows])["spearman"]

    n = len(truth)
    if not n:
        return 1.0
    rng = np.random.default_rng(seed)
    diffs = np.empty(resamples)
    with np.errstate(invalid="ignore", divide="ignore"):
        for b in range(resamples):
            rows = rng.integers(0, n, size=n)
            diffs[b] = score(rows, pred_a) - score(rows, pred_b)
    diffs = diffs[np.isfinite(diffs)]
    if not len(diffs):
        return 1.0
    # A resample where the two score the same supports neither being ahead: it counts on both sides
    # (identical answers give p = 1, as McNemar does, not a tiny p from zero "wins").
    not_behind, not_ahead = np.count_nonzero(diffs >= 0), np.count_nonzero(diffs <= 0)
    return float(min(1.0, 2 * (min(not_behind, not_ahead) + 1) / (len(diffs) + 1)))
