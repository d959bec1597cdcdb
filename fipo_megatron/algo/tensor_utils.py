"""Small tensor helpers shared by the algo modules (chosen for speed on CPU, exact everywhere)."""

from __future__ import annotations

import torch

__all__ = ["all_finite", "float_mask", "count_true"]


def all_finite(x: torch.Tensor) -> bool:
    """True iff every element is finite; one reduction in the common case (a sum of finite values is
    finite unless it overflows, which the exact fallback then rules out)."""
    return bool(torch.isfinite(x.sum())) or bool(torch.isfinite(x).all())


def float_mask(mask: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """A bool tensor as 0.0 / 1.0 of ``dtype``. Goes through a uint8 view of the same bytes: the direct
    bool -> float conversion is ~5x slower on CPU."""
    if mask.dtype != torch.bool:
        raise ValueError(f"float_mask expects a bool tensor, got {mask.dtype}")
    return mask.view(torch.uint8).to(dtype)


def count_true(mask: torch.Tensor) -> torch.Tensor:
    """Number of True elements (int64 scalar tensor); count_nonzero avoids sum's conversion to int64."""
    return torch.count_nonzero(mask)
