"""Deterministic, resumable prompt sampler.

``PromptSampler(dataset, batch_size, seed, shuffle=True, drop_last=True)`` walks the dataset epoch
by epoch. The order of epoch ``e`` is a pure function of ``(seed, e)`` (a ``numpy`` permutation seeded
with ``SeedSequence([seed, e])``; the identity order when ``shuffle=False``), so the whole stream of
batches is fixed by the seed. The state is just ``(epoch, position)``: ``state_dict()`` saved after
batch t and ``load_state_dict()`` into a fresh sampler over the same dataset make the next batch
exactly batch t+1 of the uninterrupted run.

``drop_last=True`` (default): an epoch tail shorter than ``batch_size`` is skipped and the batch is
taken from the next epoch (every batch is full; needs ``batch_size <= len(dataset)``).
``drop_last=False``: the tail is returned as a short batch.
"""

from __future__ import annotations

from typing import Any, Iterator, Sequence

import numpy as np

__all__ = ["PromptSampler"]


class PromptSampler:
    """Infinite iterator of prompt batches (lists of dataset items); see the module docstring."""

    def __init__(self, dataset: Sequence[Any], batch_size: int, seed: int, shuffle: bool = True,
                 drop_last: bool = True):
        n = len(dataset)
        if n == 0:
            raise ValueError("PromptSampler: the dataset is empty")
        if not isinstance(batch_size, int) or batch_size < 1:
            raise ValueError(f"PromptSampler: batch_size must be a positive int, got {batch_size!r}")
        if drop_last and batch_size > n:
            raise ValueError(
                f"PromptSampler: batch_size={batch_size} is larger than the dataset ({n} prompts) "
                "with drop_last=True"
            )
        self.dataset = dataset
        self.batch_size = batch_size
        self.seed = int(seed)
        self.shuffle = bool(shuffle)
        self.drop_last = bool(drop_last)
        self.epoch = 0
        self.position = 0
        self.consumed = 0  # prompts handed out so far (for logging)
        self._order_epoch = -1
        self._order: np.ndarray | None = None

    def __len__(self) -> int:
        """Batches per epoch."""
        n = len(self.dataset)
        return n // self.batch_size if self.drop_last else -(-n // self.batch_size)

    def epoch_order(self, epoch: int) -> np.ndarray:
        """Index order of ``epoch`` (cached for the current epoch)."""
        if epoch != self._order_epoch:
            n = len(self.dataset)
            if self.shuffle:
                rng = np.random.default_rng(np.random.SeedSequence([self.seed, epoch]))
                self._order = rng.permutation(n)
            else:
                self._order = np.arange(n)
            self._order_epoch = epoch
        assert self._order is not None
        return self._order

    def next_indices(self) -> list[int]:
        """Dataset indices of the next batch (advances the state)."""
        n = len(self.dataset)
        remaining = n - self.position
        if remaining <= 0 or (self.drop_last and remaining < self.batch_size):
            self.epoch += 1
            self.position = 0
        order = self.epoch_order(self.epoch)
        idx = order[self.position : self.position + self.batch_size].tolist()
        self.position += len(idx)
        self.consumed += len(idx)
        return idx

    def next_batch(self) -> list[Any]:
        """The next batch of dataset items (advances the state)."""
        return [self.dataset[i] for i in self.next_indices()]

    def __iter__(self) -> Iterator[list[Any]]:
        return self

    def __next__(self) -> list[Any]:
        return self.next_batch()

    def state_dict(self) -> dict[str, Any]:
        """Plain-Python state (JSON/torch.save friendly)."""
        return {
            "epoch": self.epoch,
            "position": self.position,
            "consumed": self.consumed,
            "seed": self.seed,
            "batch_size": self.batch_size,
            "shuffle": self.shuffle,
            "drop_last": self.drop_last,
            "dataset_len": len(self.dataset),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore ``state``; ``ValueError`` if it was saved for a different dataset size, seed,
        batch size or shuffle/drop_last setting (the batch stream would silently differ)."""
        for key in ("epoch", "position"):
            if key not in state:
                raise ValueError(f"PromptSampler.load_state_dict: state has no {key!r}")
        mine = self.state_dict()
        for key in ("seed", "batch_size", "shuffle", "drop_last", "dataset_len"):
            if key in state and state[key] != mine[key]:
                raise ValueError(
                    f"PromptSampler.load_state_dict: saved {key}={state[key]!r} but this sampler has "
                    f"{key}={mine[key]!r}; the resumed batches would differ"
                )
        epoch, position = int(state["epoch"]), int(state["position"])
        if epoch < 0 or not 0 <= position <= len(self.dataset):
            raise ValueError(f"PromptSampler.load_state_dict: invalid epoch/position {epoch}/{position}")
        self.epoch, self.position = epoch, position
        self.consumed = int(state.get("consumed", 0))
