"""DAPO dynamic sampling: keep only prompt groups whose metric has non-zero spread.

A group is the n responses of one prompt; groups where every response scored the same (all correct or
all wrong) give zero advantage and are dropped. Generation batches are added until ``target_num_groups``
groups are kept (the extra ones of the last batch are trimmed), up to ``max_num_gen_batches``.

    sampler = DynamicSampler(target_num_groups=512, max_num_gen_batches=10)
    while not sampler.full:
        sampler.add(generate_groups())        # list of groups; a group = list of per-sample dicts
    batch = sampler.pop()                     # the kept groups, then the sampler resets
"""

from __future__ import annotations

import math
from typing import Any, Callable, Sequence

__all__ = ["DynamicSampler", "DynamicSamplingError", "group_has_spread"]


class DynamicSamplingError(RuntimeError):
    """Raised when max_num_gen_batches generation batches did not yield enough groups."""


def group_has_spread(values: Sequence[float]) -> bool:
    """True iff the values are not all equal (std > 0); a group of fewer than 2 values has none."""
    values = [float(v) for v in values]
    if any(not math.isfinite(v) for v in values):
        raise ValueError(f"group metric values must be finite, got {values}")
    return len(values) >= 2 and max(values) > min(values)


class DynamicSampler:
    """Accumulates groups with metric spread across generation batches.

    Args:
        target_num_groups: groups per train batch (prompts, not responses).
        max_num_gen_batches: generation batches allowed per train batch; 0 or None = unbounded.
        metric: the key read from each sample dict (DAPO filters on "acc"; "score" is the other choice).
        values_fn: optional ``group -> list of floats`` for group objects that are not lists of dicts
            (it replaces ``metric``).
        enabled: False keeps every group (no filter; one generation batch fills a batch of the same size).
        on_exhausted: what happens when max_num_gen_batches batches did not fill the train batch:
            "error" (default, like verl's DAPO trainer) raises DynamicSamplingError; "partial" sets
            ``exhausted`` and lets ``pop(partial=True)`` return the groups kept so far.
    """

    def __init__(self, target_num_groups: int, max_num_gen_batches: int | None = 10, metric: str = "acc",
                 values_fn: Callable[[Any], Sequence[float]] | None = None, *, enabled: bool = True,
                 on_exhausted: str = "error"):
        if isinstance(target_num_groups, bool) or not isinstance(target_num_groups, int) or target_num_groups < 1:
            raise ValueError(f"target_num_groups must be an int >= 1, got {target_num_groups!r}")
        if max_num_gen_batches is not None and (isinstance(max_num_gen_batches, bool)
                                                or not isinstance(max_num_gen_batches, int) or max_num_gen_batches < 0):
            raise ValueError(f"max_num_gen_batches must be None or an int >= 0, got {max_num_gen_batches!r}")
        if on_exhausted not in ("error", "partial"):
            raise ValueError(f"on_exhausted must be 'error' or 'partial', got {on_exhausted!r}")
        self.enabled = bool(enabled)
        self.on_exhausted = on_exhausted
        self.target_num_groups = target_num_groups
        self.max_num_gen_batches = max_num_gen_batches or None
        self.metric = metric
        self._values_fn = values_fn or (lambda group: [sample[metric] for sample in group])
        self.last_stats: dict[str, float] = {}
        self.reset()

    def reset(self) -> None:
        """Start a new train batch."""
        self._kept: list[Any] = []
        self.num_gen_batches = 0
        self.num_groups_seen = 0
        self.num_groups_dropped = 0
        self.exhausted = False

    @property
    def full(self) -> bool:
        return len(self._kept) >= self.target_num_groups

    @property
    def num_kept(self) -> int:
        return len(self._kept)

    def add(self, groups: Sequence[Any]) -> bool:
        """Adds one generation batch of groups; returns ``full``.

        Raises DynamicSamplingError when this batch exceeds max_num_gen_batches while the batch is still
        not full (the counts are in the message), and RuntimeError when called on a full sampler.
        """
        if self.done:
            raise RuntimeError("DynamicSampler is full or exhausted; call pop() before adding more groups")
        if not self.enabled:
            keep = [True] * len(groups)
        else:  # may raise: state unchanged
            keep = [group_has_spread(self._values_fn(group)) for group in groups]
        self.num_gen_batches += 1
        self.num_groups_seen += len(keep)
        self.num_groups_dropped += keep.count(False)
        self._kept.extend(group for group, ok in zip(groups, keep) if ok)
        if not self.full and self.max_num_gen_batches is not None and self.num_gen_batches >= self.max_num_gen_batches:
            self.exhausted = True
            if self.on_exhausted == "partial":
                return False
            raise DynamicSamplingError(
                f"dynamic sampling: {self.num_gen_batches} generation batches (max_num_gen_batches="
                f"{self.max_num_gen_batches}) kept only {len(self._kept)} of {self.target_num_groups} groups "
                f"({self.num_groups_dropped} of {self.num_groups_seen} groups had no '{self.metric}' spread); "
                "raise max_num_gen_batches or the generation batch size")
        return self.full

    @property
    def done(self) -> bool:
        """No more generation batches are wanted: full, or exhausted in "partial" mode."""
        return self.full or self.exhausted

    def pop(self, partial: bool = False) -> list[Any]:
        """The first target_num_groups kept groups (extra ones are trimmed); resets the sampler
        (the counts of the finished batch stay in ``last_stats``). ``partial=True`` also accepts an
        exhausted, not full, sampler and returns what it kept."""
        if not self.full and not (partial and self.exhausted):
            raise RuntimeError(f"DynamicSampler has {len(self._kept)} of {self.target_num_groups} groups; not full")
        batch = self._kept[: self.target_num_groups]
        self.last_stats = self.stats()
        self.reset()
        return batch

    def stats(self) -> dict[str, float]:
        """Counts for logging (the paper's figure 4(b) plots num_gen_batches)."""
        return {"num_gen_batches": float(self.num_gen_batches), "num_groups_kept": float(len(self._kept)),
                "exhausted": float(self.exhausted),
                "num_groups_seen": float(self.num_groups_seen), "num_groups_dropped": float(self.num_groups_dropped)}
