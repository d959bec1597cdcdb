"""Model facts shared by every package, importable without Megatron or torch.

- `qwen25`: the published Qwen2.5 ``config.json`` numbers (`QWEN25_PRESETS`), the recipe names
  that refer to them (`PRESET_ALIASES`) and `load_hf_config` (dict / path / PretrainedConfig /
  preset name -> normalised config.json dict).
- `rules`: Megatron's vocabulary padding (`padded_vocab_size`) and the model-shape divisibility
  rules of a TP/PP layout (`layout_problems`).

`plan/`, `megatron/` and `convert/` all read these; none keeps its own copy.
"""
from fipo_megatron.models.qwen25 import (
    PRESET_ALIASES, QWEN25_PRESETS, load_hf_config, resolve_preset, rope_theta_of,
)
from fipo_megatron.models.rules import layout_problems, padded_vocab_size

__all__ = [
    "PRESET_ALIASES", "QWEN25_PRESETS", "layout_problems", "load_hf_config", "padded_vocab_size",
    "resolve_preset", "rope_theta_of",
]
