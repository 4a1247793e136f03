"""Small statistics helpers for comparing runs.

Accuracy differences between LoRA configurations are often a fraction of a point, which is
within noise for test sets of a few thousand rows. These helpers let the results table say
whether a difference is real (significant at 5%) instead of ranking runs by noise.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence

import numpy as np


def wilson_interval(correct: int, n: int, z: float = 1.96) -> tuple[float, float]:
    """Wilson score interval for a proportion (95% for z=1.96).

    Wilson rather than the normal (Wald) interval because it stays inside [0, 1] and keeps
    its coverage for accuracies near 100% and for small validation sets.
    """
    if n < 0:
        raise ValueError(f"n must not be negative, got {n}")
    if not 0 <= correct <= n:
        raise ValueError(f"correct must be in [0, n={n}], got {correct}")
    if n == 0:
        # No rows carry no information: the honest interval is all of [0, 1], not an exception
        # in the middle of an evaluation of an empty split.
        return 0.0, 1.0
    p = correct / n
    z2 = z * z
    denom = 1.0 + z2 / n
    center = (p + z2 / (2 * n)) / denom
    half = z * math.sqrt(p * (1 - p) / n + z2 / (4 * n * n)) / denom
    # Clamp: rounding can push the bounds a hair outside [0, 1] at p = 0 or 1.
    return max(0.0, center - half), min(1.0, center + half)


def _as_bool_array(values: Sequence[bool] | np.ndarray, name: str) -> np.ndarray:
    arr = np.asarray(values)
    if arr.ndim != 1:
        raise ValueError(f"{name} must be one-dimensional, got shape {arr.shape}")
    return arr.astype(bool)


def mcnemar_pvalue(correct_a: Sequence[bool] | np.ndarray, correct_b: Sequence[bool] | np.ndarray) -> float:
    """Two-sided exact McNemar test on paired per-row outcomes of two classifiers.

    Paired because both runs are scored on the same test rows: only the rows where exactly one
    run is right carry information, which makes this far more sensitive than comparing two
    accuracies as if they came from independent samples. Exact binomial on the discordant
    pairs, because the chi-square approximation is poor when few rows disagree.
    """
    a = _as_bool_array(correct_a, "correct_a")
    b = _as_bool_array(correct_b, "correct_b")
    if a.shape != b.shape:
        raise ValueError(f"outcome arrays differ in length: {a.shape[0]} vs {b.shape[0]}")
    only_a = int(np.count_nonzero(a & ~b))
    only_b = int(np.count_nonzero(~a & b))
    discordant = only_a + only_b
    if discordant == 0:
        return 1.0
    # Imported here: scipy.stats costs about a second, which every CLI start would otherwise pay.
    from scipy.stats import binomtest

    result = binomtest(min(only_a, only_b), discordant, 0.5, alternative="two-sided")
    return float(min(1.0, result.pvalue))


def two_proportion_pvalue(correct_a: int, n_a: int, correct_b: int, n_b: int) -> float:
    """Two-sided pooled two-proportion z-test.

    The fallback when per-row outcomes are not available for both runs (no
    test_predictions.csv, or different test rows). It ignores the pairing, so it is more
    conservative than McNemar on the same data: it calls more differences ties.
    """
    if n_a <= 0 or n_b <= 0:
        raise ValueError(f"sample sizes must be positive, got {n_a} and {n_b}")
    for correct, n in ((correct_a, n_a), (correct_b, n_b)):
        if not 0 <= correct <= n:
            raise ValueError(f"correct must be in [0, {n}], got {correct}")
    pooled = (correct_a + correct_b) / (n_a + n_b)
    variance = pooled * (1 - pooled) * (1 / n_a + 1 / n_b)
    if variance == 0:
        # Both runs are all right or all wrong: no evidence of any difference.
        return 1.0
    z = (correct_a / n_a - correct_b / n_b) / math.sqrt(variance)
    # Two-sided normal tail: 2 * (1 - Phi(|z|)) = erfc(|z| / sqrt(2)).
    return float(min(1.0, math.erfc(abs(z) / math.sqrt(2))))


def mean_std(values: Iterable[float | None]) -> tuple[float, float]:
    """Mean and sample standard deviation (ddof=1) over repeats, ignoring missing values.

    Sample std because repeats over seeds estimate run-to-run spread; a single value has
    std 0.0 rather than NaN so that tables stay printable.
    """
    arr = np.asarray([float(v) for v in values if v is not None], dtype=float)
    arr = arr[~np.isnan(arr)]
    if arr.size == 0:
        raise ValueError("mean_std needs at least one non-missing value")
    std = float(np.std(arr, ddof=1)) if arr.size > 1 else 0.0
    return float(np.mean(arr)), std


def mcnemar_worse_pvalue(candidate: Sequence[bool] | np.ndarray, leader: Sequence[bool] | np.ndarray) -> float:
    """One-sided exact McNemar test that `candidate` is worse than `leader` on the same rows: the
    probability, if both were equally good, of the candidate winning this few of the discordant
    rows. Small values mean the candidate is significantly behind."""
    a = _as_bool_array(candidate, "candidate")
    b = _as_bool_array(leader, "leader")
    if a.shape != b.shape:
        raise ValueError(f"outcome arrays differ in length: {a.shape[0]} vs {b.shape[0]}")
    only_candidate = int(np.count_nonzero(a & ~b))
    discordant = only_candidate + int(np.count_nonzero(~a & b))
    if discordant == 0:
        return 1.0
    from scipy.stats import binom

    return float(binom.cdf(only_candidate, discordant, 0.5))


def paired_bootstrap_worse_pvalue(
    candidate: Sequence[bool] | np.ndarray, leader: Sequence[bool] | np.ndarray, resamples: int = 2000, seed: int = 0
) -> float:
    """One-sided paired bootstrap: the share of row resamples in which the candidate is at least as
    accurate as the leader (with a +1 correction, so it is never exactly 0)."""
    a = _as_bool_array(candidate, "candidate").astype(np.int8)
    b = _as_bool_array(leader, "leader").astype(np.int8)
    if a.shape != b.shape:
        raise ValueError(f"outcome arrays differ in length: {a.shape[0]} vs {b.shape[0]}")
    if not len(a):
        return 1.0
    rng = np.random.default_rng(seed)
    index = rng.integers(0, len(a), size=(resamples, len(a)))
    diff = (a - b)[index].sum(axis=1)
    return float((np.count_nonzero(diff >= 0) + 1) / (resamples + 1))
