"""Process-group and Megatron `parallel_state` initialisation (torchrun environment).

`initialize_parallel(tp, pp, cp, seed)`:
- if `torch.distributed` is not initialised, reads the torchrun variables (RANK, WORLD_SIZE,
  LOCAL_RANK, MASTER_ADDR, MASTER_PORT; a missing one is an error naming it, except that a
  single process without them runs as world size 1 on 127.0.0.1) and initialises the default
  group with nccl when a GPU is present, gloo otherwise (or `backend`);
- on CPU, enables `cpu_compat` (the only place that patches CUDA assumptions);
- validates the layout (world size divisible by tp*pp*cp) and calls
  `parallel_state.initialize_model_parallel`;
- seeds python/numpy/torch and Megatron's model-parallel RNG tracker
  (`model_parallel_cuda_manual_seed(seed)`: identical across DP, offset per TP rank).
  The seed is offset by 100 * pipeline rank, as Megatron-LM does, so PP stages initialise
  differently.

`destroy_parallel()` tears down Megatron's groups (and the default group if we created it).
Accessors return sizes/ranks/groups of the current layout.
"""
from __future__ import annotations

import os
import random
from datetime import timedelta

import numpy as np
import torch
import torch.distributed as dist
from megatron.core import parallel_state as ps
from megatron.core import tensor_parallel

_CREATED_DEFAULT_GROUP = False


def _env_int(name: str, default: int | None = None) -> int:
    val = os.environ.get(name)
    if val is None:
        if default is None:
            raise RuntimeError(f"environment variable {name} is not set (launch with torchrun)")
        return default
    try:
        return int(val)
    except ValueError as exc:
        raise RuntimeError(f"environment variable {name}={val!r} is not an integer") from exc


def _init_process_group(backend: str | None, timeout_minutes: int) -> None:
    global _CREATED_DEFAULT_GROUP
    if "WORLD_SIZE" not in os.environ and "RANK" not in os.environ:
        # Single process without torchrun: a 1-rank group on a free local port.
        import socket

        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
        os.environ.setdefault("MASTER_PORT", str(port))
        os.environ.update(RANK="0", WORLD_SIZE="1", LOCAL_RANK="0")
    rank = _env_int("RANK")
    world = _env_int("WORLD_SIZE")
    local_rank = _env_int("LOCAL_RANK", 0)
    for name in ("MASTER_ADDR", "MASTER_PORT"):
        if name not in os.environ:
            raise RuntimeError(f"environment variable {name} is not set (launch with torchrun)")
    if backend is None:
        backend = "nccl" if torch.cuda.is_available() else "gloo"
    if backend == "nccl":
        torch.cuda.set_device(local_rank)
    dist.init_process_group(backend=backend, rank=rank, world_size=world,
                            timeout=timedelta(minutes=timeout_minutes))
    _CREATED_DEFAULT_GROUP = True


def set_seed(seed: int) -> None:
    """Seed python, numpy, torch and Megatron's model-parallel RNG tracker (after init)."""
    random.seed(seed)
    np.random.seed(seed % (2**32))
    torch.manual_seed(seed)
    if not torch.cuda.is_available():
        from fipo_megatron.megatron.cpu_compat import install_cpu_rng_tracker

        install_cpu_rng_tracker()
    tensor_parallel.model_parallel_cuda_manual_seed(seed=seed)


def initialize_parallel(tp: int = 1, pp: int = 1, cp: int = 1, seed: int = 1234, backend: str | None = None,
                        *, vpp: int | None = None, timeout_minutes: int = 30) -> None:
    """Initialise torch.distributed (if needed) and Megatron's parallel groups; seed RNGs.

    Raises ValueError for an invalid layout (sizes < 1, world size not divisible by tp*pp*cp) and
    RuntimeError if Megatron's groups are already initialised with a different layout.
    """
    for name, val in (("tp", tp), ("pp", pp), ("cp", cp)):
        if not isinstance(val, int) or val < 1:
            raise ValueError(f"{name} must be a positive integer, got {val!r}")
    if not torch.cuda.is_available():
        from fipo_megatron.megatron.cpu_compat import enable_cpu_compat

        enable_cpu_compat()
    if not dist.is_initialized():
        _init_process_group(backend, timeout_minutes)
    world = dist.get_world_size()
    mp = tp * pp * cp
    if world % mp != 0:
        raise ValueError(
            f"world size {world} is not divisible by tensor({tp}) x pipeline({pp}) x context({cp})"
            f" parallel size = {mp}")
    if ps.model_parallel_is_initialized():
        cur = (ps.get_tensor_model_parallel_world_size(), ps.get_pipeline_model_parallel_world_size(),
               ps.get_context_parallel_world_size())
        if cur != (tp, pp, cp):
            raise RuntimeError(f"Megatron parallel state already initialised with (tp, pp, cp)={cur}, "
                               f"requested {(tp, pp, cp)}; call destroy_parallel() first")
    else:
        ps.initialize_model_parallel(
            tensor_model_parallel_size=tp, pipeline_model_parallel_size=pp,
            virtual_pipeline_model_parallel_size=vpp, context_parallel_size=cp,
            distributed_timeout_minutes=timeout_minutes)
    set_seed(seed + 100 * ps.get_pipeline_model_parallel_rank())


def destroy_parallel() -> None:
    """Destroy Megatron's groups, and the default process group if `initialize_parallel` made it."""
    global _CREATED_DEFAULT_GROUP
    if ps.model_parallel_is_initialized():
        ps.destroy_model_parallel()
    if _CREATED_DEFAULT_GROUP and dist.is_initialized():
        dist.destroy_process_group()
        _CREATED_DEFAULT_GROUP = False


# ---- accessors -------------------------------------------------------------------------------
def tp_size() -> int:
    return ps.get_tensor_model_parallel_world_size()


def tp_rank() -> int:
    return ps.get_tensor_model_parallel_rank()


def tp_group():
    return ps.get_tensor_model_parallel_group()


def pp_size() -> int:
    return ps.get_pipeline_model_parallel_world_size()


def pp_rank() -> int:
    return ps.get_pipeline_model_parallel_rank()


def pp_group():
    return ps.get_pipeline_model_parallel_group()


def is_first_stage() -> bool:
    return ps.is_pipeline_first_stage(ignore_virtual=True)


def is_last_stage() -> bool:
    return ps.is_pipeline_last_stage(ignore_virtual=True)


def cp_size() -> int:
    return ps.get_context_parallel_world_size()


def cp_rank() -> int:
    return ps.get_context_parallel_rank()


def cp_group():
    return ps.get_context_parallel_group()


def dp_size(with_cp: bool = False) -> int:
    """Data-parallel size; `with_cp=True` gives the DP x CP size (the gradient-reduction group)."""
    return ps.get_data_parallel_world_size(with_context_parallel=with_cp)


def dp_rank(with_cp: bool = False) -> int:
    return ps.get_data_parallel_rank(with_context_parallel=with_cp)


def dp_group(with_cp: bool = False):
    return ps.get_data_parallel_group(with_context_parallel=with_cp)
