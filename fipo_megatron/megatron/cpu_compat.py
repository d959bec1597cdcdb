"""CPU compatibility layer for Megatron-Core (tests and the CPU demo ONLY).

`enable_cpu_compat()` neutralises, in this process only (nothing is patched on disk), the CUDA
assumptions that Megatron-Core 0.16 makes on the code paths fipo_megatron uses. It is called by
`fipo_megatron.megatron.parallel.initialize_parallel` only when `torch.cuda.is_available()` is
False; production GPU code paths never import this module. It is idempotent.

Each assumption covered, and why (see shared/notes/megatron-on-cpu.md for the measurements):

1. `torch.cuda.current_device()` is used for device placement (RoPE `inv_freq`, DDP grad
   buffers, optimizer state, p2p buffers, `device=torch.cuda.current_device()` everywhere):
   replaced by a function returning "cpu".
2. Megatron's RNG tracker (`tensor_parallel.random`) stores CUDA generator states, so
   `model_parallel_cuda_manual_seed` and `get_cuda_rng_tracker().fork()` (used by weight
   initialisation and dropout in TP regions) fail: `CpuRNGStatesTracker` keeps CPU generator
   states (`add` seeds one, `fork` swaps the CPU RNG state in and out) and is installed as the
   module's tracker. `torch.cuda.manual_seed*` become no-ops (they are lazily queued otherwise).
3. `get_default_causal_mask` builds its mask with `device="cuda"`; callers pass an explicit
   boolean causal mask instead (`qwen.causal_attention_mask`). The mode in (4) also rewrites it.
4. The pipeline schedule, p2p communication, DDP and the optimizer call
   `torch.zeros/empty/tensor(..., device="cuda" | torch.cuda.current_device())` and
   `Tensor.cuda()` / `Tensor.to("cuda")`: a `torch.overrides.TorchFunctionMode`
   (`_CudaToCpuMode`, entered once and left active) rewrites any `device=` argument naming CUDA
   to "cpu", makes `Tensor.cuda()` return the tensor itself and `Tensor.to("cuda"...)` stay on
   CPU. `torch.cuda.synchronize`, `current_stream`, `default_stream`, `Stream`, `stream`,
   `Event`, `empty_cache` and `set_device` become no-op stand-ins.
5. The distributed optimizer and grad clipping assert `param.type() == 'torch.cuda.FloatTensor'`
   (or Half/BFloat16): the same mode answers `Tensor.type()` (no arguments) of a CPU float tensor
   with the `torch.cuda.` name. `Tensor.type(dtype)` (with arguments) is left untouched.
6. TransformerConfig flags for CPU (`use_cpu_initialization=True`, no fusions, fp32 params,
   `pipeline_dtype=float32`) are set by `qwen.transformer_config_from_hf`, not here.

Not covered (needs a GPU): Transformer Engine, CUDA graphs. Context parallelism inside attention runs
on CPU through `megatron.attention.SDPAttention` (the local spec's core attention without TE).
"""
from __future__ import annotations

import contextlib
from typing import Any

import torch
from torch.overrides import TorchFunctionMode

_ENABLED = False
_MODE: "TorchFunctionMode | None" = None

_CUDA_TYPE_NAMES = {
    torch.float32: "torch.cuda.FloatTensor",
    torch.float16: "torch.cuda.HalfTensor",
    torch.bfloat16: "torch.cuda.BFloat16Tensor",
    torch.float64: "torch.cuda.DoubleTensor",
}


def _is_cuda_device(dev: Any) -> bool:
    if isinstance(dev, torch.device):
        return dev.type == "cuda"
    if isinstance(dev, str):
        return dev.startswith("cuda")
    return False


def _fix_device(dev: Any) -> Any:
    return "cpu" if _is_cuda_device(dev) else dev


class _CudaToCpuMode(TorchFunctionMode):
    """Rewrites CUDA device arguments to CPU; see the module docstring (items 4 and 5)."""

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is torch.Tensor.cuda:
            return args[0]
        if func is torch.Tensor.type and len(args) == 1 and not kwargs:
            name = _CUDA_TYPE_NAMES.get(args[0].dtype)
            if name is not None and args[0].device.type == "cpu":
                return name
        if "device" in kwargs and _is_cuda_device(kwargs["device"]):
            kwargs = dict(kwargs, device="cpu")
        if func is torch.Tensor.to and len(args) > 1 and _is_cuda_device(args[1]):
            args = (args[0], "cpu") + tuple(args[2:])
        return func(*args, **kwargs)


class CpuRNGStatesTracker:
    """Drop-in for Megatron's `CudaRNGStatesTracker` that keeps CPU generator states.

    `add(name, seed)` stores the state of a CPU generator seeded with `seed`; `fork(name)` swaps
    that state into the global CPU RNG for the duration of the block and stores the advanced state
    back on exit. `get_states()/set_states()` copy states (for checkpoints).
    """

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        self.use_cudagraphable_rng = False
        self.is_inference_rng_tracker = False
        self.reset()

    def is_initialized(self) -> bool:
        return self._is_initialized

    def reset(self) -> None:
        self._is_initialized = False
        self.states_: dict[str, torch.Tensor] = {}
        self.seeds_: set[int] = set()
        self._current_state_name = "default-rng"

    def get_states(self) -> dict[str, torch.Tensor]:
        return {k: v.clone() for k, v in self.states_.items()}

    def set_states(self, states: dict[str, torch.Tensor]) -> None:
        self._is_initialized = True
        self.states_ = {k: v.clone() for k, v in states.items()}

    def add(self, name: str, seed: int) -> None:
        self._is_initialized = True
        if seed in self.seeds_:
            raise Exception(f"seed {seed} already exists")
        if name in self.states_:
            raise Exception(f"rng state {name} already exists")
        self.seeds_.add(seed)
        gen = torch.Generator(device="cpu")
        gen.manual_seed(seed)
        self.states_[name] = gen.get_state()

    @contextlib.contextmanager
    def fork(self, name: str = "model-parallel-rng"):
        if name not in self.states_:
            raise Exception(f"rng state {name} is not added")
        orig = torch.get_rng_state()
        orig_name = self._current_state_name
        torch.set_rng_state(self.states_[name])
        self._current_state_name = name
        try:
            yield
        finally:
            self.states_[name] = torch.get_rng_state()
            torch.set_rng_state(orig)
            self._current_state_name = orig_name


class _NoOpStream:
    def __init__(self, *args: Any, **kwargs: Any) -> None:
        pass

    def wait_stream(self, *args: Any, **kwargs: Any) -> None:
        pass

    def wait_event(self, *args: Any, **kwargs: Any) -> None:
        pass

    def synchronize(self) -> None:
        pass

    def record_event(self, *args: Any, **kwargs: Any) -> "_NoOpEvent":
        return _NoOpEvent()


class _NoOpEvent:
    def __init__(self, *args: Any, **kwargs: Any) -> None:
        pass

    def record(self, *args: Any, **kwargs: Any) -> None:
        pass

    def wait(self, *args: Any, **kwargs: Any) -> None:
        pass

    def synchronize(self) -> None:
        pass

    def query(self) -> bool:
        return True


def install_cpu_rng_tracker() -> None:
    """Install `CpuRNGStatesTracker` as Megatron's global RNG tracker (idempotent)."""
    from megatron.core.tensor_parallel import random as mrandom

    if not isinstance(mrandom._CUDA_RNG_STATE_TRACKER, CpuRNGStatesTracker):
        mrandom._CUDA_RNG_STATE_TRACKER = CpuRNGStatesTracker()
    mrandom._CUDA_RNG_STATE_TRACKER_INITIALIZED = True


def enable_cpu_compat() -> None:
    """Neutralise Megatron's CUDA assumptions in this process (idempotent; CPU only).

    Raises RuntimeError if a GPU is available: GPU runs must never use this layer.
    """
    global _ENABLED, _MODE
    if _ENABLED:
        return
    if torch.cuda.is_available():
        raise RuntimeError("enable_cpu_compat() called on a machine with a GPU; it is for CPU-only runs")
    cuda = torch.cuda
    cuda.current_device = lambda: "cpu"  # type: ignore[assignment]
    cuda.synchronize = lambda *a, **k: None  # type: ignore[assignment]
    cuda.current_stream = lambda *a, **k: _NoOpStream()  # type: ignore[assignment]
    cuda.default_stream = lambda *a, **k: _NoOpStream()  # type: ignore[assignment]
    cuda.Stream = _NoOpStream  # type: ignore[assignment,misc]
    cuda.Event = _NoOpEvent  # type: ignore[assignment,misc]
    cuda.stream = lambda *a, **k: contextlib.nullcontext()  # type: ignore[assignment]
    cuda.empty_cache = lambda *a, **k: None  # type: ignore[assignment]
    cuda.set_device = lambda *a, **k: None  # type: ignore[assignment]
    cuda.manual_seed = lambda *a, **k: None  # type: ignore[assignment]
    cuda.manual_seed_all = lambda *a, **k: None  # type: ignore[assignment]
    install_cpu_rng_tracker()
    _MODE = _CudaToCpuMode()
    _MODE.__enter__()  # stays active for the life of the process
    _ENABLED = True


def cpu_compat_enabled() -> bool:
    """True once `enable_cpu_compat()` has run in this process."""
    return _ENABLED
