"""Rollout engines behind one interface (docs/DESIGN.md, "rollout").

`make_engine("hf" | "sglang" | "vllm" | "vllm-server", **kwargs)` builds one; engine modules and
vLLM/SGLang are imported lazily, so importing this package needs only torch.
"""
from .base import BaseEngine, RolloutEngine, make_engine
from .types import EngineError, GenerationOutput, SamplingParams
from .weight_sync import DEFAULT_BUCKET_BYTES, NcclSyncConfig, PushStats, bucketize, push_weights

__all__ = [
    "BaseEngine",
    "DEFAULT_BUCKET_BYTES",
    "EngineError",
    "GenerationOutput",
    "NcclSyncConfig",
    "PushStats",
    "RolloutEngine",
    "SamplingParams",
    "bucketize",
    "make_engine",
    "push_weights",
]
