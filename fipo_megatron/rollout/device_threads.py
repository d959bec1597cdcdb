"""Helper threads that run on the caller's CUDA device.

The current CUDA device belongs to a host thread (cudaSetDevice), and a new thread starts on device 0.
A weight-send thread of a rank whose GPU is cuda:3 would otherwise put its tensors on cuda:0 and use its
NCCL group (made for cuda:3) from the wrong device. `start_daemon(fn, *args, name=...)` starts a daemon
thread that first sets the caller's current device (when CUDA is in use), then runs `fn(*args)`.
"""
from __future__ import annotations

import threading
from typing import Any, Callable

import torch


def start_daemon(fn: Callable[..., Any], *args: Any, name: str) -> threading.Thread:
    device = torch.cuda.current_device() if torch.cuda.is_available() and torch.cuda.is_initialized() else None

    def run() -> None:
        if device is not None:
            torch.cuda.set_device(device)
        fn(*args)

    thread = threading.Thread(target=run, name=name, daemon=True)
    thread.start()
    return thread
