"""DAPO's soft overlong punishment.

``overlong_penalty(L, max_response_length, overlong_buffer, penalty_factor)``
    = min(-(L - (max_response_length - overlong_buffer)) / overlong_buffer * penalty_factor, 0)

i.e. 0 while L <= max - buffer, then linearly down to -penalty_factor at L == max (and further
below beyond it). A buffer of 0 or None disables the penalty (returns 0.0). The penalty is added to
the response's reward (at its last token) by the trainer and in evaluation.
"""

from __future__ import annotations

__all__ = ["overlong_penalty"]


def overlong_penalty(
    response_length: int,
    max_response_length: int,
    overlong_buffer: int | None,
    penalty_factor: float = 1.0,
) -> float:
    """Return the (non-positive) overlong penalty for a response of ``response_length`` tokens."""
    if not overlong_buffer:
        return 0.0
    if overlong_buffer < 0:
        raise ValueError(f"overlong_buffer must be >= 0, got {overlong_buffer}")
    if overlong_buffer > max_response_length:
        raise ValueError(
            f"overlong_buffer ({overlong_buffer}) must not exceed max_response_length "
            f"({max_response_length})"
        )
    if response_length < 0:
        raise ValueError(f"response_length must be >= 0, got {response_length}")
    expected = max_response_length - overlong_buffer
    return float(min(-(response_length - expected) / overlong_buffer * penalty_factor, 0.0))
