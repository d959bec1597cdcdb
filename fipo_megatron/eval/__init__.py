"""Evaluation: avg@k, cons@k, unbiased pass@k, bootstrap CIs (``metrics``) and the engine-driven
``evaluate`` runner (``runner``; imports the rollout types lazily)."""

from .metrics import aggregate, avg_at_k, bootstrap_ci, cons_at_k, majority_vote, pass_at_k, problem_metrics
from .runner import evaluate

__all__ = [
    "aggregate",
    "avg_at_k",
    "bootstrap_ci",
    "cons_at_k",
    "evaluate",
    "majority_vote",
    "pass_at_k",
    "problem_metrics",
]
