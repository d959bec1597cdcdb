"""Group-relative advantages (GRPO / DAPO / FIPO) and the paper's length-weighted advantage metric."""

from __future__ import annotations

import torch

__all__ = ["group_advantages", "broadcast_to_tokens", "length_weighted_mean_advantage"]


def group_advantages(rewards: torch.Tensor, n: int, eps: float = 1e-6) -> torch.Tensor:
    """A_i = (r_i - mean_g) / (std_g + eps) over each group g of the n responses of one prompt.

    ``rewards`` is [P * n] (prompt p's responses at p*n:(p+1)*n, the rollout order) or [P, n]; the
    result has the same shape, float32 (float64 stays float64). std is the unbiased sample standard
    deviation (torch.std, divisor n-1), as in verl's GRPO outcome advantage that DAPO and FIPO use;
    a group of identical rewards gets advantage 0. n must be >= 2 (the unbiased std needs two samples).
    """
    if not isinstance(rewards, torch.Tensor):
        raise ValueError(f"rewards must be a torch.Tensor, got {type(rewards).__name__}")
    if isinstance(n, bool) or not isinstance(n, int) or n < 2:
        raise ValueError(f"n (responses per prompt) must be an int >= 2, got {n!r}")
    if not eps >= 0:
        raise ValueError(f"eps must be >= 0, got {eps}")
    if rewards.dim() == 2:
        if rewards.shape[1] != n:
            raise ValueError(f"rewards is [P, n] with n={rewards.shape[1]}, but n={n} was given")
        grouped = rewards
    elif rewards.dim() == 1:
        if rewards.numel() % n != 0:
            raise ValueError(f"{rewards.numel()} rewards are not a multiple of n={n}")
        grouped = rewards.reshape(-1, n)
    else:
        raise ValueError(f"rewards must be [P*n] or [P, n], got shape {tuple(rewards.shape)}")
    grouped = grouped.to(torch.promote_types(rewards.dtype, torch.float32))
    if not bool(torch.isfinite(grouped).all()):
        raise ValueError("rewards contain NaN or inf")
    mean = grouped.mean(dim=1, keepdim=True)
    std = grouped.std(dim=1, keepdim=True, unbiased=True)
    return ((grouped - mean) / (std + eps)).reshape(rewards.shape)


def broadcast_to_tokens(per_sequence: torch.Tensor, response_mask: torch.Tensor) -> torch.Tensor:
    """[B] per-response values -> [B, L] per-token values (0 where response_mask is 0)."""
    if per_sequence.dim() != 1 or response_mask.dim() != 2 or response_mask.shape[0] != per_sequence.shape[0]:
        raise ValueError(f"expected per_sequence [B] and response_mask [B, L], got "
                         f"{tuple(per_sequence.shape)} and {tuple(response_mask.shape)}")
    mask = response_mask.to(torch.bool)
    return torch.where(mask, per_sequence.unsqueeze(1).to(torch.promote_types(per_sequence.dtype, torch.float32)), 0.0)


def length_weighted_mean_advantage(advantages_per_seq: torch.Tensor, lengths: torch.Tensor) -> float:
    """sum_i A_i * L_i / sum_i L_i (the paper's section 5.2 metric; > 0 when correct responses are longer).

    Returns 0.0 when all lengths are 0.
    """
    adv = torch.as_tensor(advantages_per_seq, dtype=torch.float64)
    lengths = torch.as_tensor(lengths, dtype=torch.float64)
    if adv.dim() != 1 or adv.shape != lengths.shape:
        raise ValueError(f"advantages_per_seq and lengths must both be [B], got {tuple(adv.shape)} and "
                         f"{tuple(lengths.shape)}")
    if bool((lengths < 0).any()):
        raise ValueError("lengths must be >= 0")
    if not bool(torch.isfinite(adv).all()) or not bool(torch.isfinite(lengths).all()):
        raise ValueError("advantages_per_seq and lengths must be finite")
    total = float(lengths.sum())
    return float((adv * lengths).sum()) / total if total > 0 else 0.0
