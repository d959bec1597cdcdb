"""Count host reads of tensor values (each one a device sync on a GPU), on any device.

``with HostReadCounter() as c: ...`` counts calls that need a tensor's VALUE on the host: ``item``,
``tolist``, ``float()`` / ``int()`` / ``bool()`` / ``index()`` of a tensor, ``numpy``, ``cpu``, ``nonzero``,
``masked_select`` and indexing with a boolean mask (whose result size depends on the values). On CPU
these are free, which is why the counter exists: CPU tests use it to show that code would not sync a
GPU. ``c.calls`` lists the function names in call order; ``with c.paused(): ...`` stops counting
inside (e.g. while a batch is still being built on the host, before it would move to the device).
"""
from __future__ import annotations

import contextlib

import torch
from torch.overrides import TorchFunctionMode

_READS = {torch.Tensor.item, torch.Tensor.tolist, torch.Tensor.__float__, torch.Tensor.__int__,
          torch.Tensor.__bool__, torch.Tensor.__index__, torch.Tensor.numpy, torch.Tensor.cpu,
          torch.Tensor.nonzero, torch.nonzero, torch.masked_select, torch.Tensor.masked_select}


def _bool_index(args) -> bool:
    if len(args) < 2:
        return False
    index = args[1] if isinstance(args[1], tuple) else (args[1],)
    return any(isinstance(i, torch.Tensor) and i.dtype == torch.bool for i in index)


class HostReadCounter(TorchFunctionMode):
    def __init__(self) -> None:
        super().__init__()
        self.calls: list[str] = []
        self._paused = False

    @contextlib.contextmanager
    def paused(self):
        before, self._paused = self._paused, True
        try:
            yield
        finally:
            self._paused = before

    @property
    def count(self) -> int:
        return len(self.calls)

    def __torch_function__(self, func, types, args=(), kwargs=None):
        if self._paused:
            pass
        elif func in _READS or (func is torch.Tensor.__getitem__ and _bool_index(args)):
            self.calls.append(getattr(func, "__name__", str(func)))
        return func(*args, **(kwargs or {}))
