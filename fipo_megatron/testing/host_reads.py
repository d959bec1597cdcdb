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
import os
import sys

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


_TORCH_DIR = os.path.dirname(torch.__file__)


def _caller_file() -> str:
    """Source file of the first frame outside torch itself (and outside this module)."""
    frame = sys._getframe(2)
    while frame is not None and (frame.f_code.co_filename.startswith(_TORCH_DIR)
                                 or frame.f_code.co_filename == __file__):
        frame = frame.f_back
    return frame.f_code.co_filename if frame is not None else ""


class HostReadCounter(TorchFunctionMode):
    def __init__(self, data_only: bool = False, ignore_files: tuple[str, ...] = ()) -> None:
        """``data_only``: ignore reads of integer tensors (packing structure such as cu_seqlens, built on
        the host), count only reads of float / bool values (data-dependent). ``ignore_files``: reads made
        directly from source files whose path contains one of these strings are not counted."""
        super().__init__()
        self.data_only = data_only
        self.ignore_files = ignore_files
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
            t = args[0] if args and isinstance(args[0], torch.Tensor) else None
            structural = t is not None and not (t.dtype.is_floating_point or t.dtype == torch.bool)
            if not (self.data_only and structural and func is not torch.Tensor.__getitem__) and \
                    not any(name in _caller_file() for name in self.ignore_files):
                self.calls.append(getattr(func, "__name__", str(func)))
        return func(*args, **(kwargs or {}))
