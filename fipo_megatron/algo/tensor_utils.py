"""Small tensor helpers shared by the algo modules (chosen for speed on CPU, exact everywhere)."""

from __future__ import annotations

import contextlib
import math

import numpy as np
import torch

__all__ = ["all_finite", "float_mask", "count_true", "host_reads_are_free", "sync_free_branches"]

_FORCE_SYNC_FREE = False


def host_reads_are_free(t: torch.Tensor) -> bool:
    """Whether reading a value of ``t`` on the host (``float(t)``, ``t.tolist()``, a data-dependent ``if``)
    costs nothing: True for CPU tensors. On a GPU each read waits for the device (a sync), so the loss code
    then takes branch-free paths with the same results. :func:`sync_free_branches` forces those paths on
    CPU (tests)."""
    return t.device.type == "cpu" and not _FORCE_SYNC_FREE


@contextlib.contextmanager
def sync_free_branches():
    """Within the block, :func:`host_reads_are_free` answers False everywhere (run the GPU code path on CPU)."""
    global _FORCE_SYNC_FREE
    before, _FORCE_SYNC_FREE = _FORCE_SYNC_FREE, True
    try:
        yield
    finally:
        _FORCE_SYNC_FREE = before


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


_EXACT_FLOAT_SUM_LIMIT = 2**24  # float32 sums of 0 / u terms (u a power of two) are exact below 2^24 terms


def _next_float(value: float, direction: float, dtype: torch.dtype) -> float | None:
    """The float of ``dtype`` next to ``value`` (itself of ``dtype``) towards ``direction``, as a Python
    float (exact), or None for dtypes other than float32 / float64."""
    if dtype == torch.float64:
        return math.nextafter(value, direction)
    if dtype == torch.float32:
        return float(np.nextafter(np.float32(value), np.float32(direction)))
    return None


def masked_count_compare(values: torch.Tensor, op: str, threshold: float, weights_f: torch.Tensor,
                         scratch: torch.Tensor | None = None) -> torch.Tensor | None:
    """Number of elements with weights_f == 1 where ``values >= threshold`` (op "ge") or
    ``values <= threshold`` (op "le"), exactly as the bool comparison (threshold rounded to values'
    dtype) would count them; weights_f is a 0.0 / 1.0 float mask of values' shape and dtype; scratch, if
    given, is a contiguous buffer like values that this overwrites (saves an allocation).

    Comparisons with a bool result are several times slower on CPU than arithmetic, so this uses
    values - t' clamped to [0, u] ("ge") or [-u, 0] ("le"), with t' the float next to t on the failing
    side and u = |t - t'| a power of two: every passing element gives exactly +-u (rounding is monotone,
    so the rounded difference is at least u away from 0), every other one 0 (a NaN stays NaN and shows
    in the result); the dot with the mask sums multiples of u, exactly below 2^24 terms. Returns None (the
    caller then compares) where exactness is
    not guaranteed: dtypes other than float32 / float64, too many elements, a non-finite threshold.
    """
    if op not in ("ge", "le"):
        raise ValueError(f"op must be 'ge' or 'le', got {op!r}")
    if values.numel() >= _EXACT_FLOAT_SUM_LIMIT or values.dtype not in (torch.float32, torch.float64):
        return None
    # The comparison rounds the threshold to values' dtype (round to nearest, as numpy does).
    t = float(np.float32(threshold)) if values.dtype == torch.float32 else float(threshold)
    if not math.isfinite(t):
        return None
    t_next = _next_float(t, -math.inf if op == "ge" else math.inf, values.dtype)
    unit = abs(t - t_next)  # exact: adjacent floats differ by a power of two
    info = torch.finfo(values.dtype)
    if not math.isfinite(t_next) or unit < info.tiny or 2.0 * abs(t) >= info.max:
        return None  # subnormal steps (flush-to-zero) or sums of up to 2^24 steps near overflow
    if scratch is None or scratch.shape != values.shape or scratch.dtype != values.dtype or not scratch.is_contiguous():
        scratch = torch.empty_like(values, memory_format=torch.contiguous_format)
    diff = torch.sub(values, t_next, out=scratch)
    # "ge": passing elements have diff >= u, the others <= 0; "le": passing ones diff <= -u, others >= 0.
    steps = diff.clamp_(0.0, unit) if op == "ge" else diff.clamp_(-unit, 0.0)
    total = torch.dot(steps.reshape(-1), weights_f.reshape(-1))
    return total / (unit if op == "ge" else -unit)
