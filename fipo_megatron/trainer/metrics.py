"""Metric helpers: phase timers, length percentiles, exact (sum, count) reduction across ranks.

Contract:
- :class:`PhaseTimer`: ``with timer("generate"): ...`` accumulates wall seconds per phase;
  :meth:`PhaseTimer.metrics` returns ``{"time/<phase>": seconds}`` and resets.
- :func:`length_stats` -> ``{prefix_mean, prefix_min, prefix_q25, prefix_median, prefix_q75, prefix_max}``.
- :class:`SumCount` accumulates named ``(sum, count)`` pairs (e.g. the loss's ``metric_sums``);
  :meth:`SumCount.reduce` all-reduces them over a process group (SUM of sums and of counts) and
  returns means, so a metric is the exact mean over every token / sequence of every micro-batch on
  every rank, not a mean of means. Names whose count is 0 everywhere are omitted.
"""
from __future__ import annotations

import math
import time
from collections import defaultdict
from contextlib import contextmanager
from typing import Iterable, Mapping, Optional

import numpy as np
import torch
import torch.distributed as dist


class PhaseTimer:
    """Accumulate wall-clock seconds per named phase."""

    def __init__(self) -> None:
        self._acc: dict[str, float] = defaultdict(float)

    @contextmanager
    def __call__(self, phase: str):
        t0 = time.perf_counter()
        try:
            yield
        finally:
            self._acc[phase] += time.perf_counter() - t0

    def metrics(self, reset: bool = True) -> dict[str, float]:
        out = {f"time/{k}": float(v) for k, v in self._acc.items()}
        if reset:
            self._acc.clear()
        return out


def length_stats(lengths: Iterable[float], prefix: str) -> dict[str, float]:
    """Mean and percentiles (min, q25, median, q75, max) of ``lengths`` under ``prefix_*`` names."""
    x = np.asarray(list(lengths), dtype=np.float64)
    if x.size == 0:
        return {}
    q = np.quantile(x, [0.0, 0.25, 0.5, 0.75, 1.0])
    return {f"{prefix}_mean": float(x.mean()), f"{prefix}_min": float(q[0]), f"{prefix}_q25": float(q[1]),
            f"{prefix}_median": float(q[2]), f"{prefix}_q75": float(q[3]), f"{prefix}_max": float(q[4])}


def comm_device() -> torch.device:
    """Where tensors for collectives live: the current GPU under NCCL, else the CPU (gloo)."""
    if torch.cuda.is_available() and dist.is_initialized() and dist.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


class SumCount:
    """Named (sum, count) accumulators, reducible exactly across ranks."""

    def __init__(self) -> None:
        self.sums: dict[str, float] = defaultdict(float)
        self.counts: dict[str, float] = defaultdict(float)

    def add(self, name: str, total: float, count: float = 1.0) -> None:
        self.sums[name] += float(total)
        self.counts[name] += float(count)

    def add_pairs(self, pairs: Mapping[str, tuple], prefix: str = "") -> None:
        """Add a ``{name: (sum, count)}`` dict (tensors or numbers)."""
        for k, (s, c) in pairs.items():
            self.add(prefix + k, float(s), float(c))

    def add_mean(self, name: str, value: float) -> None:
        """A value to average with equal weight per call (e.g. grad norm per optimizer step)."""
        self.add(name, value, 1.0)

    def reduce(self, group: Optional[dist.ProcessGroup] = None, *, all_ranks: bool = True) -> dict[str, float]:
        """Means after summing sums and counts over ``group`` (every rank must call with the same names
        set when ``all_ranks``; names are unioned by gathering them first)."""
        names = sorted(set(self.sums))
        if all_ranks and dist.is_available() and dist.is_initialized() and dist.get_world_size(group) > 1:
            gathered: list = [None] * dist.get_world_size(group)
            dist.all_gather_object(gathered, names, group=group)
            names = sorted(set().union(*gathered))
            t = torch.tensor([[self.sums.get(n, 0.0), self.counts.get(n, 0.0)] for n in names],
                             dtype=torch.float64, device=comm_device()).reshape(-1, 2)
            dist.all_reduce(t, group=group)
            t = t.cpu()
            pairs = {n: (float(t[i, 0]), float(t[i, 1])) for i, n in enumerate(names)}
        else:
            pairs = {n: (self.sums[n], self.counts[n]) for n in names}
        return {n: s / c for n, (s, c) in pairs.items() if c > 0}


def finite_or_raise(metrics: Mapping[str, float], where: str) -> None:
    """Raise ``FloatingPointError`` naming the first non-finite metric."""
    for k, v in metrics.items():
        if isinstance(v, float) and not math.isfinite(v):
            raise FloatingPointError(f"{where}: metric {k} is {v}")
