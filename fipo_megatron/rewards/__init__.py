"""Verifiable rewards: the DAPO-Math scorer, DAPO's overlong penalty, and a reward-function loader.

Public names: ``compute_score`` (DAPO-Math, +1/-1), ``normalize_final_answer`` (Minerva),
``overlong_penalty``, ``load_reward_fn`` (built-in name or dotted path), ``as_score_dict``.
"""

from .math_dapo import INVALID, compute_score, extract_answer, normalize_final_answer
from .overlong import overlong_penalty
from .registry import DEFAULT_REWARD, as_score_dict, load_reward_fn

__all__ = [
    "DEFAULT_REWARD",
    "INVALID",
    "as_score_dict",
    "compute_score",
    "extract_answer",
    "load_reward_fn",
    "normalize_final_answer",
    "overlong_penalty",
]
