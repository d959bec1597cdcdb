"""HF Qwen2 <-> Megatron-Core checkpoint conversion (`fipo-convert`) and the ONE name/layout mapping.

Public API:
- `mapping`: `QwenDims`, `padded_vocab`, the rule table, `iter_hf_tensors(source, hf_config=None)`.
- `iter_hf_tensors_from_model(model_chunks, hf_config=None)` (live model, any TP/PP; collective).
- `iter_hf_tensors_from_checkpoint(mcore_dir, hf_config=None)`.
- `convert_hf_to_mcore(hf_dir, out, tp, pp, ...)`, `convert_mcore_to_hf(mcore_dir, out, hf_dir, ...)`,
  `reshard(mcore_dir, out, tp, pp, ...)`; all validate first and write atomically.
- `ConversionError`: every invalid input.
Heavy imports (megatron) are deferred to the functions that need them.
"""
from __future__ import annotations

from .mapping import QwenDims, iter_hf_tensors, padded_vocab
from .validate import ConversionError


def __getattr__(name):
    if name == "iter_hf_tensors_from_model":
        from .live import iter_hf_tensors_from_model

        return iter_hf_tensors_from_model
    if name in ("iter_hf_tensors_from_checkpoint", "convert_mcore_to_hf"):
        from . import mcore_to_hf

        return getattr(mcore_to_hf, name)
    if name == "convert_hf_to_mcore":
        from .hf_to_mcore import convert_hf_to_mcore

        return convert_hf_to_mcore
    if name == "reshard_checkpoint":
        from .reshard import reshard_checkpoint

        return reshard_checkpoint
    raise AttributeError(name)


__all__ = ["QwenDims", "padded_vocab", "iter_hf_tensors", "ConversionError", "iter_hf_tensors_from_model",
           "iter_hf_tensors_from_checkpoint", "convert_hf_to_mcore", "convert_mcore_to_hf", "reshard_checkpoint"]
