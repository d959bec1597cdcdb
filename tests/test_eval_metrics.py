"""avg@k / cons@k / pass@k against brute-force enumeration and hand-computed cases."""

import itertools
import math
from fractions import Fraction

import numpy as np
import pytest

from fipo_megatron.eval import aggregate, avg_at_k, bootstrap_ci, cons_at_k, majority_vote, pass_at_k
from fipo_megatron.rewards.math_dapo import INVALID


def brute_force_pass_at_k(accs, k):
    subsets = list(itertools.combinations(range(len(accs)), k))
    return sum(any(accs[i] for i in s) for s in subsets) / len(subsets)


@pytest.mark.parametrize("n", range(1, 9))
def test_pass_at_k_matches_enumeration_of_all_subsets(n):
    rng = np.random.default_rng(n)
    for c in range(n + 1):
        accs = [True] * c + [False] * (n - c)
        rng.shuffle(accs)
        for k in range(1, n + 1):
            assert pass_at_k(n, c, k) == pytest.approx(brute_force_pass_at_k(accs, k), abs=1e-12)


def test_pass_at_k_large_n_is_stable_and_exact():
    for n, c, k in [(1000, 1, 500), (1000, 3, 10), (2000, 1500, 100), (512, 0, 64), (64, 1, 32)]:
        exact = 1 - Fraction(math.comb(n - c, k), math.comb(n, k))
        assert pass_at_k(n, c, k) == pytest.approx(float(exact), rel=1e-12, abs=1e-15)
    # the anchors' example: 1 correct of 32 with k = 32 must be 1, not the biased ~0.64
    assert pass_at_k(32, 1, 32) == 1.0


def test_pass_at_1_is_mean_accuracy():
    assert pass_at_k(10, 3, 1) == pytest.approx(0.3)


@pytest.mark.parametrize("n, c, k", [(4, 1, 5), (0, 0, 1), (4, 5, 2), (4, -1, 2), (4, 1, 0)])
def test_pass_at_k_rejects_bad_arguments(n, c, k):
    with pytest.raises(ValueError):
        pass_at_k(n, c, k)


def test_majority_vote_ties_go_to_first_seen():
    assert majority_vote(["b", "a", "a", "b"]) == "b"
    assert majority_vote(["a", "b", "b", "a"]) == "a"
    assert majority_vote(["c", "b", "b", "a"]) == "b"


def test_cons_at_k_hand_cases():
    # "5" wins 3-2 and is correct
    assert cons_at_k(["5", "4", "5", "4", "5"], [True, False, True, False, True]) == 1.0
    # "4" wins 3-2 and is wrong, even though a correct answer exists
    assert cons_at_k(["4", "5", "4", "5", "4"], [False, True, False, True, False]) == 0.0
    # tie 2-2: first seen ("5") wins
    assert cons_at_k(["5", "4", "4", "5"], [True, False, False, True]) == 1.0
    assert cons_at_k(["4", "5", "4", "5"], [False, True, False, True]) == 0.0
    # INVALID votes and can win, and then it is wrong
    assert cons_at_k([INVALID, INVALID, "5"], [False, False, True]) == 0.0
    assert cons_at_k([INVALID, "5", "5"], [False, True, True]) == 1.0
    # even if a custom scorer marked the invalid samples correct, an INVALID vote is wrong
    assert cons_at_k([INVALID, INVALID, "5"], [True, True, False]) == 0.0
    # the vote is right iff SOME sample carrying the winning prediction is correct: with a custom
    # scorer acc need not depend on the prediction alone, and "5" (2 votes, one marked correct) wins
    assert cons_at_k(["5", "5", "4"], [True, False, False]) == 1.0
    assert cons_at_k(["5", "4", "5"], [False, True, True]) == 1.0
    with pytest.raises(ValueError, match="2 predictions but 1"):
        cons_at_k(["a", "b"], [True])


def test_avg_at_k():
    assert avg_at_k([True, False, False, True]) == 0.5
    with pytest.raises(ValueError):
        avg_at_k([])


def test_aggregate_means_over_problems():
    problems = [
        (["1", "1", "2", "3"], [True, True, False, False]),   # avg .5, cons 1, pass@2 = 1 - C(2,2)/C(4,2) = 5/6
        (["9", "8", "8", "7"], [False, False, False, False]),  # 0, 0, 0
        (["4", "4", "4", "4"], [True, True, True, True]),      # 1, 1, 1
    ]
    out = aggregate(problems, 2)
    assert out["avg@k"] == pytest.approx((0.5 + 0 + 1) / 3)
    assert out["cons@k"] == pytest.approx(2 / 3)
    assert out["pass@k"] == pytest.approx((5 / 6 + 0 + 1) / 3)
    assert out["pass@1"] == pytest.approx(out["avg@k"])
    assert out["num_problems"] == 3 and out["k"] == 2
    assert "avg@k_ci_low" not in out
    with pytest.raises(ValueError, match="fewer than k=5"):
        aggregate(problems, 5)
    with pytest.raises(ValueError, match="no problems"):
        aggregate([], 1)


def test_bootstrap_is_seeded_and_brackets_the_mean():
    rng = np.random.default_rng(0)
    problems = [([str(i)] * 4, list(rng.random(4) < 0.4)) for i in range(40)]
    a = aggregate(problems, 4, bootstrap=300, seed=7)
    b = aggregate(problems, 4, bootstrap=300, seed=7)
    c = aggregate(problems, 4, bootstrap=300, seed=8)
    assert a == b
    assert a != c
    for m in ("avg@k", "cons@k", "pass@k", "pass@1"):
        assert a[f"{m}_ci_low"] <= a[m] <= a[f"{m}_ci_high"]
    assert a["avg@k_ci_high"] - a["avg@k_ci_low"] > 0


def test_bootstrap_ci_constant_and_wider_with_confidence():
    assert bootstrap_ci([0.25] * 10, num_resamples=50) == (0.25, 0.25)
    vals = np.random.default_rng(1).random(50)
    lo90, hi90 = bootstrap_ci(vals, confidence=0.9, seed=3)
    lo99, hi99 = bootstrap_ci(vals, confidence=0.99, seed=3)
    assert lo99 <= lo90 < hi90 <= hi99
    with pytest.raises(ValueError):
        bootstrap_ci([], num_resamples=10)


def percentile_bootstrap_reference(values, num_resamples, confidence, seed):
    """Hand-written percentile bootstrap: the same seeded draw of problem indices (numpy
    ``default_rng(seed).integers(0, n, (B, n))``, the documented resampling), then means by Python
    loops and the two percentiles by linear interpolation between order statistics."""
    n = len(values)
    idx = np.random.default_rng(seed).integers(0, n, size=(num_resamples, n)).tolist()
    means = sorted(sum(float(values[i]) for i in row) / n for row in idx)

    def percentile(q):
        pos = q * (len(means) - 1)
        lo = int(pos)
        hi = min(lo + 1, len(means) - 1)
        return means[lo] + (pos - lo) * (means[hi] - means[lo])

    alpha = (1.0 - confidence) / 2.0  # equal tails
    return percentile(alpha), percentile(1.0 - alpha)


@pytest.mark.parametrize("confidence", [0.5, 0.9, 0.95])
def test_bootstrap_ci_equals_hand_written_percentile_bootstrap(confidence):
    values = list(np.random.default_rng(4).random(13)) + [5.0]  # the last problem is an outlier
    got = bootstrap_ci(values, num_resamples=400, confidence=confidence, seed=11)
    ref = percentile_bootstrap_reference(values, 400, confidence, 11)
    assert got == pytest.approx(ref, rel=1e-12, abs=1e-12)


def test_bootstrap_ci_of_one_success_in_ten_problems():
    """Hand-derived: the resampled mean of [0]*9 + [1] is Binomial(10, 0.1) / 10, with CDF
    0.349, 0.736, 0.930, 0.987 at 0, 1, 2, 3 successes. A 90% equal-tailed interval takes the 5% and 95%
    quantiles: (0.0, 0.3). (Not halving alpha would give the 10% / 90% quantiles, (0.0, 0.2); never
    drawing the last problem would give (0.0, 0.0).)"""
    lo, hi = bootstrap_ci([0.0] * 9 + [1.0], num_resamples=4000, confidence=0.9, seed=0)
    assert lo == 0.0
    assert hi == pytest.approx(0.3)
    lo, hi = bootstrap_ci([0.0] * 9 + [1.0], num_resamples=4000, confidence=0.5, seed=0)  # 25% / 75%
    assert (lo, hi) == pytest.approx((0.0, 0.2))


def test_aggregate_intervals_are_bootstrap_ci_of_the_per_problem_values():
    problems = [(["1", "1", "2"], [True, True, False]), (["3", "3", "3"], [False, False, False]),
                (["4", "5", "4"], [True, False, True]), (["6", "7", "8"], [False, False, True])]
    out = aggregate(problems, 2, bootstrap=200, confidence=0.8, seed=5)
    avg = [2 / 3, 0.0, 2 / 3, 1 / 3]
    ref = percentile_bootstrap_reference(avg, 200, 0.8, 5)
    assert (out["avg@k_ci_low"], out["avg@k_ci_high"]) == pytest.approx(ref, rel=1e-12, abs=1e-12)
