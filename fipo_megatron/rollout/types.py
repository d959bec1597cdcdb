"""Plain data types of the rollout contract (see docs/DESIGN.md, "rollout").

No engine is imported here: the trainer, the tests and every adapter share these types.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional


class EngineError(RuntimeError):
    """A rollout engine failed. The message names the engine and, for servers, the URL."""


@dataclass
class SamplingParams:
    """How to sample. One `generate` call returns len(prompts) * n outputs, grouped by prompt.

    - temperature: 0.0 means greedy; the reported log-probs never depend on it (see engines).
    - top_p: 1.0 disables nucleus filtering. top_k: -1 (or 0) disables top-k.
    - max_new_tokens: upper bound on response tokens (the stop token counts as one).
    - stop_token_ids: extra stop tokens, added to the model's EOS token(s).
    - seed: makes sampling reproducible where the engine supports it (None = engine default).
    """

    n: int = 1
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = -1
    max_new_tokens: int = 256
    stop_token_ids: list[int] = field(default_factory=list)
    seed: Optional[int] = None

    def __post_init__(self) -> None:
        if self.n < 1:
            raise ValueError(f"SamplingParams.n must be >= 1, got {self.n}")
        if self.temperature < 0:
            raise ValueError(f"SamplingParams.temperature must be >= 0, got {self.temperature}")
        if not 0.0 < self.top_p <= 1.0:
            raise ValueError(f"SamplingParams.top_p must be in (0, 1], got {self.top_p}")
        if self.top_k < -1:
            raise ValueError(f"SamplingParams.top_k must be -1 (off), 0 (off) or > 0, got {self.top_k}")
        if self.max_new_tokens < 1:
            raise ValueError(f"SamplingParams.max_new_tokens must be >= 1, got {self.max_new_tokens}")
        self.stop_token_ids = [int(t) for t in self.stop_token_ids]

    @property
    def top_k_or_none(self) -> Optional[int]:
        """top_k as a positive int, or None when disabled (-1 or 0)."""
        return self.top_k if self.top_k > 0 else None


@dataclass
class GenerationOutput:
    """One sampled response.

    - prompt_ids: the prompt exactly as given.
    - response_ids: generated tokens; when generation stopped on an EOS/stop token that token is
      the LAST element (the trainer trains on it), like vLLM's and SGLang's output token ids.
    - response_logprobs: one float per response token: log p(token | prefix) under the engine's
      UNMODIFIED model distribution (log_softmax of the logits, temperature 1, no top-p/top-k),
      i.e. what the trainer's old/new log-prob recomputation computes.
    - finish_reason: "stop" if an EOS/stop token ended it, else "length".
    """

    prompt_ids: list[int]
    response_ids: list[int]
    response_logprobs: list[float]
    finish_reason: str

    def __post_init__(self) -> None:
        if len(self.response_ids) != len(self.response_logprobs):
            raise ValueError(
                f"GenerationOutput: {len(self.response_ids)} response ids but "
                f"{len(self.response_logprobs)} log-probs"
            )
        if self.finish_reason not in ("stop", "length"):
            raise ValueError(f"GenerationOutput.finish_reason must be 'stop' or 'length', got {self.finish_reason!r}")
