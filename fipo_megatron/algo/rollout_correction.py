"""Training-inference mismatch: truncated and masked importance sampling against the rollout engine.

The responses were sampled by the ENGINE (its kernels, precision and sampler): pi_engine is the behaviour
policy. The loss's ratio r = pi / pi_old uses the trainer's recomputed pi_old, so the update is off-policy
by the engine/trainer gap, per response token t:

    log rho_t = clamp(log pi_old(y_t) - log pi_engine(y_t), -20, 20)

Two corrections, each off by default and independent of the other:

- Truncated importance sampling (``is_level``; Yao et al. 2025, verl / slime "TIS"): the per-token policy
  loss is multiplied by the detached weight w = min(rho, C), where rho is
    token:    rho_t
    sequence: prod over the response's tokens of rho_s (the same weight for every token of the response)
- Masked importance sampling (``mask_level``; verl's rejection sampling, "MIS"): tokens (token), or whole
  responses, whose ratio lies outside [lower, upper] leave the loss (numerator and denominator):
    token:     rho_t
    sequence:  prod_s rho_s
    geometric: exp(mean_s log rho_s) (the per-token geometric mean: insensitive to length)

Only the loss's weighting and mask change: FutureKL keeps the trainer's pi_old (the paper's definition),
and with pi_engine == pi_old (rho = 1) neither correction changes anything (C >= 1, lower <= 1 <= upper).
Under context parallelism each rank holds part of a response: per-response sums go through ``seq_sum_fn``
(an all-reduce over CP), called on every rank whatever the data.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable

import torch

from fipo_megatron.algo.sequences import Sequences

__all__ = ["IS_LEVELS", "MASK_LEVELS", "LOG_RATIO_CLAMP", "RolloutCorrection", "rollout_correction"]

IS_LEVELS = ("none", "token", "sequence")
MASK_LEVELS = ("none", "token", "sequence", "geometric")
LOG_RATIO_CLAMP = 20.0


@dataclass
class RolloutCorrection:
    """What the corrections do to one loss call (all detached, per token).

    weight: min(rho, C) for the truncated-IS weighting (None when it is off);
    raw_log_weight: log rho before truncation (None when off), for the metrics;
    keep: the tokens the mask keeps, a bool tensor (None when the mask is off);
    is_threshold: the truncation C.
    """

    weight: torch.Tensor | None
    raw_log_weight: torch.Tensor | None
    keep: torch.Tensor | None
    is_threshold: float = math.inf


def _per_response(log_ratio: torch.Tensor, seqs: Sequences, seq_sum_fn: Callable | None) -> torch.Tensor:
    """Per-token tensor holding the sum of log rho over the token's whole response (all CP ranks)."""
    total = seqs.sum(log_ratio)
    if seq_sum_fn is not None:
        total = seq_sum_fn(total)
    return seqs.broadcast(total, fill=0.0)


def rollout_correction(old_log_prob: torch.Tensor, engine_log_prob: torch.Tensor, resp: torch.Tensor,
                       resp_f: torch.Tensor, seqs: Sequences, *, is_level: str = "none", is_threshold: float = 2.0,
                       mask_level: str = "none", mask_lower: float = 0.5, mask_upper: float = 2.0,
                       seq_sum_fn: Callable | None = None) -> RolloutCorrection:
    """The corrections of the module docstring for one loss call.

    ``old_log_prob`` / ``engine_log_prob``: per-token log-probs, shape of ``resp`` (the response mask,
    bool) and ``resp_f`` (the same mask as 0.0 / 1.0 in the loss's dtype). ``seqs`` maps tokens to
    responses; ``seq_sum_fn`` sums per-response values over the ranks holding parts of a response.
    """
    if is_level not in IS_LEVELS:
        raise ValueError(f"rollout importance-sampling level must be one of {IS_LEVELS}, got {is_level!r}")
    if mask_level not in MASK_LEVELS:
        raise ValueError(f"rollout mask level must be one of {MASK_LEVELS}, got {mask_level!r}")
    if is_level == "none" and mask_level == "none":
        return RolloutCorrection(None, None, None)
    dtype = resp_f.dtype
    log_ratio = torch.clamp(old_log_prob.detach().to(dtype) - engine_log_prob.detach().to(dtype),
                            -LOG_RATIO_CLAMP, LOG_RATIO_CLAMP) * resp_f
    seq_log_ratio = None
    if is_level == "sequence" or mask_level in ("sequence", "geometric"):
        seq_log_ratio = _per_response(log_ratio, seqs, seq_sum_fn)

    weight = raw = None
    if is_level != "none":
        raw = log_ratio if is_level == "token" else seq_log_ratio
        weight = torch.exp(torch.clamp(raw, max=math.log(is_threshold)))

    keep = None
    if mask_level != "none":
        if mask_level == "token":
            log_r = log_ratio
        elif mask_level == "sequence":
            log_r = seq_log_ratio
        else:
            counts = _per_response(resp_f, seqs, seq_sum_fn)
            log_r = seq_log_ratio / torch.clamp(counts, min=1.0)
        keep = resp & (log_r >= math.log(mask_lower)) & (log_r <= math.log(mask_upper))
    return RolloutCorrection(weight=weight, raw_log_weight=raw, keep=keep, is_threshold=is_threshold)
