import math

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from budgetlora.evaluate.stats import mcnemar_pvalue, mean_std, two_proportion_pvalue, wilson_interval


def nested(n_correct: int, n: int = 1000) -> np.ndarray:
    """Correct on the first n_correct rows: two such runs disagree only one way."""
    out = np.zeros(n, dtype=bool)
    out[:n_correct] = True
    return out


# Wilson interval ---------------------------------------------------------------------------


def test_wilson_matches_run_directory_example() -> None:
    low, high = wilson_interval(6840, 7600)
    assert low == pytest.approx(0.89305, abs=1e-5)
    assert high == pytest.approx(0.90654, abs=1e-5)


def test_wilson_matches_newcombe_1998_examples() -> None:
    # Newcombe (1998), Statistics in Medicine 17:857, Table I, method 3.
    assert wilson_interval(81, 263) == pytest.approx((0.2553, 0.3662), abs=1e-4)
    assert wilson_interval(0, 10) == pytest.approx((0.0, 0.2775), abs=1e-4)
    assert wilson_interval(15, 148) == pytest.approx((0.0624, 0.1605), abs=1e-4)


def test_wilson_rejects_bad_counts() -> None:
    with pytest.raises(ValueError):
        wilson_interval(5, 0)
    with pytest.raises(ValueError):
        wilson_interval(0, -1)
    with pytest.raises(ValueError):
        wilson_interval(11, 10)


@given(n=st.integers(1, 100_000), frac=st.floats(0, 1))
def test_wilson_contains_estimate_and_stays_in_unit_interval(n: int, frac: float) -> None:
    correct = round(frac * n)
    low, high = wilson_interval(correct, n)
    assert 0.0 <= low <= correct / n + 1e-12
    assert correct / n - 1e-12 <= high <= 1.0


def test_wilson_empty_sample_is_uninformative() -> None:
    assert wilson_interval(0, 0) == (0.0, 1.0)


def test_wilson_narrows_with_more_data() -> None:
    small = wilson_interval(90, 100)
    big = wilson_interval(9000, 10000)
    assert big[1] - big[0] < (small[1] - small[0]) / 5


# McNemar -------------------------------------------------------------------------------------


def test_mcnemar_identical_outcomes_is_one() -> None:
    a = nested(900)
    assert mcnemar_pvalue(a, a.copy()) == 1.0


def test_mcnemar_clearly_better_run_is_significant() -> None:
    p = mcnemar_pvalue(nested(900), nested(800))
    assert p < 1e-20


def test_mcnemar_exact_binomial_value() -> None:
    # 10 discordant pairs all favouring a: two-sided exact p = 2 * 0.5**10.
    assert mcnemar_pvalue(nested(910), nested(900)) == pytest.approx(2 / 1024)


def test_mcnemar_small_difference_on_same_rows_is_a_tie() -> None:
    a = nested(905)
    b = nested(900)
    b[950:952] = True  # b also right on two rows a gets wrong: 5 vs 2 discordant
    p = mcnemar_pvalue(a, b)
    assert p == pytest.approx(0.453125)  # binomtest(2, 7): 2 * (1 + 7 + 21) / 128
    assert p >= 0.05


def test_mcnemar_is_symmetric() -> None:
    rng = np.random.default_rng(0)
    a, b = rng.random(500) < 0.9, rng.random(500) < 0.85
    assert mcnemar_pvalue(a, b) == pytest.approx(mcnemar_pvalue(b, a))


def test_mcnemar_pairing_detects_what_unpaired_test_misses() -> None:
    # 910 vs 895 correct: unpaired, a tie; paired with all 15 disagreements one way, not a tie.
    assert mcnemar_pvalue(nested(910), nested(895)) < 0.001
    assert two_proportion_pvalue(910, 1000, 895, 1000) > 0.05


def test_mcnemar_length_mismatch_raises() -> None:
    with pytest.raises(ValueError):
        mcnemar_pvalue(nested(5, 10), nested(5, 11))


# Two-proportion ----------------------------------------------------------------------------


def test_two_proportion_known_value() -> None:
    # pooled p = 0.85, se = sqrt(0.85 * 0.15 * 0.02), z = 0.1 / se = 1.980
    assert two_proportion_pvalue(90, 100, 80, 100) == pytest.approx(0.04767, abs=1e-4)


def test_two_proportion_identical_and_degenerate() -> None:
    assert two_proportion_pvalue(50, 100, 50, 100) == pytest.approx(1.0)
    assert two_proportion_pvalue(100, 100, 200, 200) == 1.0
    assert two_proportion_pvalue(0, 100, 0, 50) == 1.0


def test_two_proportion_small_difference_is_not_significant() -> None:
    assert two_proportion_pvalue(6840, 7600, 6820, 7600) > 0.05
    assert two_proportion_pvalue(6840, 7600, 6500, 7600) < 0.05


# mean_std ----------------------------------------------------------------------------------


def test_mean_std_sample_std() -> None:
    mean, std = mean_std([0.90, 0.91, 0.92])
    assert mean == pytest.approx(0.91)
    assert std == pytest.approx(0.01)


def test_mean_std_single_and_missing() -> None:
    assert mean_std([0.5]) == (0.5, 0.0)
    assert mean_std([1.0, None, math.nan, 3.0]) == (2.0, pytest.approx(math.sqrt(2)))
    with pytest.raises(ValueError):
        mean_std([])
