"""The rollout engine interface and the factory that builds one by name.

Contract (docs/DESIGN.md, "rollout"):
- `generate(prompts, params)` -> len(prompts) * params.n outputs, grouped by prompt (prompt 0's n
  samples first). Prompts are token ids; nothing is tokenised or detokenised by the engine.
- `update_weights(named_tensors, version)`: consume a stream of (HF name, full tensor) pairs (any
  subset of the model, any order); after it returns, every later `generate` uses the new weights.
  `version` is recorded and, where the engine supports it, checked.
- `health()` -> True when the engine can serve; never raises.
- `shutdown()` releases the engine (idempotent).

Failures raise `EngineError` (naming the engine and, for servers, the URL). Engines never touch the
trainer's checkpoints: a failed push leaves the checkpoint as it was, and the engine refuses to
generate (health() False) until a later full `update_weights` succeeds.
"""
from __future__ import annotations

from abc import ABC, abstractmethod
from typing import Any, Iterable, Protocol, runtime_checkable

from torch import Tensor

from .types import EngineError, GenerationOutput, SamplingParams

ENGINE_KINDS = ("hf", "sglang", "vllm", "vllm-server")


@runtime_checkable
class RolloutEngine(Protocol):
    """Structural type every engine satisfies (the trainer only uses these four methods)."""

    def generate(self, prompts: list[list[int]], params: SamplingParams) -> list[GenerationOutput]: ...

    def update_weights(self, named_tensors: Iterable[tuple[str, Tensor]], version: int) -> None: ...

    def health(self) -> bool: ...

    def shutdown(self) -> None: ...


class BaseEngine(ABC):
    """Optional base class: input checks and the current weight version."""

    name: str = "engine"

    def __init__(self) -> None:
        self.weight_version: int = 0

    @abstractmethod
    def generate(self, prompts: list[list[int]], params: SamplingParams) -> list[GenerationOutput]: ...

    @abstractmethod
    def update_weights(self, named_tensors: Iterable[tuple[str, Tensor]], version: int) -> None: ...

    @abstractmethod
    def health(self) -> bool: ...

    def shutdown(self) -> None:  # pragma: no cover - trivial default
        return None

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        self.shutdown()

    def _check_prompts(self, prompts: list[list[int]]) -> list[list[int]]:
        if not isinstance(prompts, (list, tuple)):
            raise TypeError(f"{self.name}: prompts must be a list of token-id lists, got {type(prompts).__name__}")
        out = []
        for i, p in enumerate(prompts):
            ids = [int(t) for t in p]
            if not ids:
                raise ValueError(f"{self.name}: prompt {i} is empty")
            out.append(ids)
        return out

    def _check_version(self, version: int) -> int:
        version = int(version)
        if version < self.weight_version:
            raise EngineError(
                f"{self.name}: weight version {version} is older than the served version {self.weight_version}"
            )
        return version


def make_engine(kind: str, **kwargs: Any) -> RolloutEngine:
    """Build an engine by name (a plain registry: the caller chooses the kind, e.g. the trainer's
    ``setup.build_engine``); engine modules (and vLLM/SGLang) are imported only here, lazily.

    - "hf": `HFEngine(model_or_path, ...)` in-process transformers model (CPU default).
    - "sglang": `SGLangEngine(urls, ...)` over one or more SGLang HTTP servers.
    - "vllm": `VLLMEngine(model_path, ...)` in-process `vllm.LLM` (single node).
    - "vllm-server": `VLLMServerEngine(urls, ...)` over vLLM OpenAI-compatible servers.
    """
    kind = kind.lower().replace("_", "-")
    if kind == "hf":
        from .hf_engine import HFEngine

        return HFEngine(**kwargs)
    if kind == "sglang":
        from .sglang_engine import SGLangEngine

        return SGLangEngine(**kwargs)
    if kind == "vllm":
        from .vllm_local import VLLMEngine

        return VLLMEngine(**kwargs)
    if kind == "vllm-server":
        from .vllm_engine import VLLMServerEngine

        return VLLMServerEngine(**kwargs)
    raise ValueError(f"unknown rollout engine kind {kind!r}; expected one of {ENGINE_KINDS}")

