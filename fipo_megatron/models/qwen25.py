"""Qwen2.5 presets (the published Hugging Face ``config.json`` numbers) and a plain config loader.

The ONE table of Qwen2.5 shapes: `fipo_megatron.plan` derives its `ModelShape` presets from it and
`fipo_megatron.megatron` builds `TransformerConfig`s from it. No Megatron, no torch, no
transformers import.

Preset keys are the Megatron-side names ("0.5B", ..., "32B", "7B-Math", "tiny");
`PRESET_ALIASES` maps the recipe names ("qwen2.5-32b", "qwen2.5-math-7b", "qwen2.5-7b-math", ...,
lower case) onto them.
"""
from __future__ import annotations

import json
import os
from typing import Any, Mapping

_COMMON = dict(model_type="qwen2", architectures=["Qwen2ForCausalLM"], hidden_act="silu",
               attention_dropout=0.0, initializer_range=0.02, bos_token_id=151643, eos_token_id=151643,
               use_sliding_window=False, torch_dtype="bfloat16")


def _preset(hidden, layers, heads, kv, inter, vocab, eps, theta, tie, max_pos, **extra) -> dict:
    return dict(_COMMON, hidden_size=hidden, num_hidden_layers=layers, num_attention_heads=heads,
                num_key_value_heads=kv, intermediate_size=inter, vocab_size=vocab, rms_norm_eps=eps,
                rope_theta=theta, tie_word_embeddings=tie, max_position_embeddings=max_pos, **extra)


#: HF config.json fields of the published Qwen2.5 base models (and a tiny CPU test shape).
QWEN25_PRESETS: dict[str, dict[str, Any]] = {
    "0.5B": _preset(896, 24, 14, 2, 4864, 151936, 1e-6, 1000000.0, True, 32768),
    "1.5B": _preset(1536, 28, 12, 2, 8960, 151936, 1e-6, 1000000.0, True, 131072),
    "3B": _preset(2048, 36, 16, 2, 11008, 151936, 1e-6, 1000000.0, True, 32768),
    "7B": _preset(3584, 28, 28, 4, 18944, 152064, 1e-6, 1000000.0, False, 131072),
    "14B": _preset(5120, 48, 40, 8, 13824, 152064, 1e-5, 1000000.0, False, 131072),
    "32B": _preset(5120, 64, 40, 8, 27648, 152064, 1e-5, 1000000.0, False, 131072),
    # Qwen2.5-Math-7B (the paper's base): RoPE base 10000, 4096 positions.
    "7B-Math": _preset(3584, 28, 28, 4, 18944, 152064, 1e-6, 10000.0, False, 4096),
    # Tiny CPU test shape (random weights); vocab 200 leaves padded rows at any TP.
    "tiny": dict(_preset(64, 4, 4, 2, 128, 200, 1e-6, 1000000.0, False, 256), torch_dtype="float32",
                 bos_token_id=0, eos_token_id=1),
}

#: Recipe / planner names (lower case) -> `QWEN25_PRESETS` key. The first name of a key is its
#: canonical recipe name (the planner reports it); later ones are aliases.
PRESET_ALIASES: dict[str, str] = {
    "qwen2.5-0.5b": "0.5B",
    "qwen2.5-1.5b": "1.5B",
    "qwen2.5-3b": "3B",
    "qwen2.5-7b": "7B",
    "qwen2.5-math-7b": "7B-Math",
    "qwen2.5-14b": "14B",
    "qwen2.5-32b": "32B",
    "qwen2.5-7b-math": "7B-Math",
}

_REQUIRED = ("hidden_size", "num_hidden_layers", "num_attention_heads", "intermediate_size", "vocab_size")


def resolve_preset(name: str) -> str | None:
    """The `QWEN25_PRESETS` key of a preset key (exact) or a recipe name (any case); else None."""
    if name in QWEN25_PRESETS:
        return name
    return PRESET_ALIASES.get(name.lower())


def load_hf_config(hf_config: Any) -> dict[str, Any]:
    """Normalise `hf_config` to a dict of config.json fields (a new dict; the input is not changed).

    Accepts a dict, a `transformers.PretrainedConfig`, a preset key of `QWEN25_PRESETS`, a path to
    a config.json file or to a directory containing one, or a recipe name of `PRESET_ALIASES`.
    Lookup order for strings: exact preset key, then an existing path, then a recipe name (so a
    local directory named like a recipe, e.g. with extended max_position_embeddings, wins).
    Raises FileNotFoundError (no such path / preset), ValueError (missing required fields,
    hidden_act other than silu), TypeError (other input types).

    Defaults filled in: num_key_value_heads = num_attention_heads, rms_norm_eps 1e-6,
    rope_theta 10000 (also read from transformers 5 `rope_parameters`), tie_word_embeddings False,
    max_position_embeddings 32768.
    """
    if isinstance(hf_config, Mapping):
        cfg = dict(hf_config)
    elif hasattr(hf_config, "to_dict") and hasattr(hf_config, "hidden_size"):
        cfg = hf_config.to_dict()
    elif isinstance(hf_config, (str, os.PathLike)):
        cfg = _load_named(str(hf_config))
    else:
        raise TypeError(f"hf_config must be a dict, PretrainedConfig, preset name or path, got {type(hf_config)}")
    missing = [k for k in _REQUIRED if k not in cfg]
    if missing:
        raise ValueError(f"HF config is missing required fields: {missing}")
    cfg.setdefault("num_key_value_heads", cfg["num_attention_heads"])
    cfg.setdefault("rms_norm_eps", 1e-6)
    cfg["rope_theta"] = rope_theta_of(cfg)
    cfg.setdefault("tie_word_embeddings", False)
    cfg.setdefault("max_position_embeddings", 32768)
    if cfg.get("hidden_act", "silu") != "silu":
        raise ValueError(f"hidden_act={cfg['hidden_act']!r} is not supported (Qwen2 uses silu)")
    return cfg


def _load_named(key: str) -> dict[str, Any]:
    if key in QWEN25_PRESETS:
        return dict(QWEN25_PRESETS[key])
    path = os.path.join(key, "config.json") if os.path.isdir(key) else key
    if os.path.isfile(path):
        with open(path) as f:
            return json.load(f)
    preset = resolve_preset(key)
    if preset is not None:
        return dict(QWEN25_PRESETS[preset])
    raise FileNotFoundError(f"no HF config at {path!r} (and {key!r} is not a Qwen2.5 preset: "
                            f"{sorted(QWEN25_PRESETS)} or {sorted(PRESET_ALIASES)})")


def rope_theta_of(cfg: Mapping[str, Any]) -> float:
    """RoPE base from a config dict (transformers 5 may nest it under rope_parameters); 10000 if absent."""
    theta = cfg.get("rope_theta")
    if theta is None and isinstance(cfg.get("rope_parameters"), Mapping):
        theta = cfg["rope_parameters"].get("rope_theta")
    return float(theta if theta is not None else 10000.0)
