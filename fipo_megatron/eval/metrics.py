"""Evaluation metrics over k samples per problem: avg@k, cons@k, pass@k (unbiased), bootstrap CIs.

Per problem we have n sampled responses, each with a normalised prediction ``pred`` (a string, the
scorer's ``"pred"``) and a correctness flag ``acc``.

- ``avg@k``: mean of ``acc`` over the n samples (exact, no resampling).
- ``cons@k`` (majority vote): the most frequent normalised prediction wins; TIES ARE BROKEN BY THE
  PREDICTION SEEN FIRST (lowest sample index). ``"[INVALID]"`` predictions take part in the vote like
  any other string, but a vote won by ``"[INVALID]"`` is always wrong. Otherwise the vote is correct
  iff some sample carrying the winning prediction has ``acc`` True.
- ``pass@k``: the unbiased estimator 1 - C(n-c, k) / C(n, k) of the chance that at least one of k
  samples drawn without replacement from the n is correct (Chen et al. 2021), computed as the stable
  product 1 - prod_{i=n-c+1}^{n} (1 - k / i); requires k <= n. (The official FIPO eval bootstraps
  pass@k, which is biased low.)

:func:`aggregate` averages the per-problem values over problems (each problem weighs the same) and,
when ``bootstrap > 0``, adds percentile confidence intervals from resampling PROBLEMS with
replacement using a seeded ``numpy`` generator (same seed, same intervals).
"""

from __future__ import annotations

from collections import Counter
from typing import Sequence

import numpy as np

from ..rewards.math_dapo import INVALID

__all__ = [
    "aggregate",
    "avg_at_k",
    "bootstrap_ci",
    "cons_at_k",
    "majority_vote",
    "pass_at_k",
    "problem_metrics",
]


def pass_at_k(n: int, c: int, k: int) -> float:
    """Unbiased pass@k for one problem with ``n`` samples of which ``c`` are correct."""
    if not (isinstance(n, (int, np.integer)) and isinstance(c, (int, np.integer)) and isinstance(k, (int, np.integer))):
        raise TypeError(f"pass_at_k expects integers, got n={n!r}, c={c!r}, k={k!r}")
    if n < 1 or k < 1:
        raise ValueError(f"pass_at_k needs n >= 1 and k >= 1, got n={n}, k={k}")
    if k > n:
        raise ValueError(f"pass_at_k needs k <= n (k={k} samples drawn from n={n})")
    if not 0 <= c <= n:
        raise ValueError(f"pass_at_k needs 0 <= c <= n, got c={c}, n={n}")
    if n - c < k:
        return 1.0
    prod = 1.0
    for i in range(n - c + 1, n + 1):
        prod *= 1.0 - k / i
    return 1.0 - prod


def avg_at_k(accs: Sequence[bool]) -> float:
    """Mean correctness of the samples of one problem."""
    if len(accs) == 0:
        raise ValueError("avg_at_k: no samples")
    return float(sum(bool(a) for a in accs)) / len(accs)


def majority_vote(preds: Sequence[str]) -> str:
    """Most frequent prediction; ties go to the prediction that appears first in ``preds``."""
    if len(preds) == 0:
        raise ValueError("majority_vote: no predictions")
    counts = Counter(preds)
    best = max(counts.values())
    for p in preds:  # first seen among the most frequent
        if counts[p] == best:
            return p
    raise AssertionError("unreachable")


def cons_at_k(preds: Sequence[str], accs: Sequence[bool]) -> float:
    """1.0 if the majority-vote prediction is correct, else 0.0 (see the module docstring)."""
    if len(preds) != len(accs):
        raise ValueError(f"cons_at_k: {len(preds)} predictions but {len(accs)} correctness flags")
    winner = majority_vote(preds)
    if winner == INVALID:
        return 0.0
    return 1.0 if any(bool(a) for p, a in zip(preds, accs) if p == winner) else 0.0


def problem_metrics(preds: Sequence[str], accs: Sequence[bool], k: int) -> dict[str, float]:
    """``{"avg@k", "cons@k", "pass@k", "pass@1"}`` for one problem; needs ``len(accs) >= k``."""
    n = len(accs)
    c = sum(bool(a) for a in accs)
    return {
        "avg@k": avg_at_k(accs),
        "cons@k": cons_at_k(preds, accs),
        "pass@k": pass_at_k(n, c, k),
        "pass@1": pass_at_k(n, c, 1),
    }


def bootstrap_ci(
    values: Sequence[float], *, num_resamples: int = 1000, confidence: float = 0.95, seed: int = 0
) -> tuple[float, float]:
    """Percentile bootstrap interval of the MEAN of ``values`` (resampled with replacement, seeded)."""
    x = np.asarray(values, dtype=np.float64)
    if x.ndim != 1 or x.size == 0:
        raise ValueError("bootstrap_ci: need a non-empty 1-D sequence of values")
    if not 0.0 < confidence < 1.0:
        raise ValueError(f"bootstrap_ci: confidence must be in (0, 1), got {confidence}")
    if num_resamples < 1:
        raise ValueError(f"bootstrap_ci: num_resamples must be >= 1, got {num_resamples}")
    rng = np.random.default_rng(seed)
    idx = rng.integers(0, x.size, size=(num_resamples, x.size))
    means = x[idx].mean(axis=1)
    alpha = (1.0 - confidence) / 2.0
    lo, hi = np.quantile(means, [alpha, 1.0 - alpha])
    return float(lo), float(hi)


def aggregate(
    problems: Sequence[tuple[Sequence[str], Sequence[bool]]],
    k: int,
    *,
    bootstrap: int = 0,
    confidence: float = 0.95,
    seed: int = 0,
) -> dict[str, float]:
    """Mean over problems of :func:`problem_metrics`; ``problems`` = [(preds, accs), ...].

    Returns ``{"avg@k", "cons@k", "pass@k", "pass@1", "num_problems", "k"}``; with ``bootstrap = B > 0``
    also ``"<metric>_ci_low"`` / ``"<metric>_ci_high"`` for the four metrics (B problem resamples,
    the same seed for every metric).
    """
    if len(problems) == 0:
        raise ValueError("aggregate: no problems to evaluate")
    per = []
    for i, (preds, accs) in enumerate(problems):
        if len(accs) < k:
            raise ValueError(f"aggregate: problem {i} has {len(accs)} samples, fewer than k={k}")
        per.append(problem_metrics(preds, accs, k))
    out: dict[str, float] = {}
    for name in ("avg@k", "cons@k", "pass@k", "pass@1"):
        vals = [p[name] for p in per]
        out[name] = float(np.mean(vals))
        if bootstrap > 0:
            lo, hi = bootstrap_ci(vals, num_resamples=bootstrap, confidence=confidence, seed=seed)
            out[f"{name}_ci_low"], out[f"{name}_ci_high"] = lo, hi
    out["num_problems"] = len(per)
    out["k"] = k
    return out
