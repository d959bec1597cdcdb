"""Qwen2.5 presets and the Hugging Face config.json -> Megatron `TransformerConfig` mapping.

Every architecture number is read from the HF config (never assumed): hidden_size,
num_hidden_layers, num_attention_heads, num_key_value_heads, intermediate_size, vocab_size,
rms_norm_eps, rope_theta, tie_word_embeddings, max_position_embeddings.
Qwen2 architecture in Megatron terms: RMSNorm, SwiGLU (gated linear unit + SiLU), GQA
(num_query_groups = num_key_value_heads), bias on QKV only, RoPE (base = rope_theta), no dropout.
"""
from __future__ import annotations

import json
import os
from typing import Any, Mapping

import torch
import torch.nn.functional as F
from megatron.core.transformer.transformer_config import TransformerConfig

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

_REQUIRED = ("hidden_size", "num_hidden_layers", "num_attention_heads", "intermediate_size", "vocab_size")


def load_hf_config(hf_config: Any) -> dict[str, Any]:
    """Normalise `hf_config` to a dict of config.json fields.

    Accepts a dict, a `transformers.PretrainedConfig`, a preset name from `QWEN25_PRESETS`,
    a path to a config.json file or to a directory containing one.
    """
    if isinstance(hf_config, Mapping):
        cfg = dict(hf_config)
    elif hasattr(hf_config, "to_dict") and hasattr(hf_config, "hidden_size"):
        cfg = hf_config.to_dict()
    elif isinstance(hf_config, (str, os.PathLike)):
        key = str(hf_config)
        if key in QWEN25_PRESETS:
            cfg = dict(QWEN25_PRESETS[key])
        else:
            path = os.path.join(key, "config.json") if os.path.isdir(key) else key
            if not os.path.isfile(path):
                raise FileNotFoundError(f"no HF config at {path!r} (and {key!r} is not a Qwen2.5 preset: "
                                        f"{sorted(QWEN25_PRESETS)})")
            with open(path) as f:
                cfg = json.load(f)
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


def rope_theta_of(cfg: Mapping[str, Any]) -> float:
    """RoPE base from a config dict (transformers 5 may nest it under rope_parameters)."""
    theta = cfg.get("rope_theta")
    if theta is None and isinstance(cfg.get("rope_parameters"), Mapping):
        theta = cfg["rope_parameters"].get("rope_theta")
    return float(theta if theta is not None else 10000.0)


def padded_vocab_size(vocab_size: int, make_vocab_size_divisible_by: int = 128, tp: int = 1) -> int:
    """Vocabulary padded up to a multiple of make_vocab_size_divisible_by * tp (Megatron-LM rule)."""
    if vocab_size < 1 or make_vocab_size_divisible_by < 1 or tp < 1:
        raise ValueError(f"invalid vocab padding arguments: vocab={vocab_size}, "
                         f"divisible_by={make_vocab_size_divisible_by}, tp={tp}")
    multiple = make_vocab_size_divisible_by * tp
    return ((vocab_size + multiple - 1) // multiple) * multiple


def validate_layout(cfg: Mapping[str, Any], *, tp: int = 1, pp: int = 1, cp: int = 1, vpp: int | None = None) -> None:
    """Raise ValueError naming the field when the TP/PP/CP layout does not fit the model."""
    heads, kv = cfg["num_attention_heads"], cfg["num_key_value_heads"]
    layers = cfg["num_hidden_layers"]
    if cfg["hidden_size"] % heads:
        raise ValueError(f"hidden_size={cfg['hidden_size']} is not divisible by num_attention_heads={heads}")
    if heads % kv:
        raise ValueError(f"num_attention_heads={heads} is not divisible by num_key_value_heads={kv}")
    if kv % tp:
        raise ValueError(f"tensor parallel size {tp} does not divide num_key_value_heads={kv} "
                         f"(megatron-core needs whole KV groups per TP rank; use TP <= {kv} dividing it)")
    if heads % tp:
        raise ValueError(f"tensor parallel size {tp} does not divide num_attention_heads={heads}")
    if cfg["intermediate_size"] % tp:
        raise ValueError(f"tensor parallel size {tp} does not divide intermediate_size={cfg['intermediate_size']}")
    stages = pp * (vpp or 1)
    if layers % stages:
        raise ValueError(f"pipeline parallel size {pp}" + (f" x virtual {vpp}" if vpp else "")
                         + f" does not divide num_hidden_layers={layers}")
    if cp < 1:
        raise ValueError(f"context parallel size must be >= 1, got {cp}")


def transformer_config_from_hf(hf_config: Any, *, tp: int = 1, pp: int = 1, cp: int = 1, vpp: int | None = None,
                               params_dtype: torch.dtype = torch.float32, sequence_parallel: bool | None = None,
                               on_cpu: bool | None = None, **overrides: Any) -> TransformerConfig:
    """Build the Megatron `TransformerConfig` of a Qwen2/Qwen2.5 HF config.

    `params_dtype` float32 / bfloat16 / float16 sets `bf16`/`fp16` accordingly.
    `on_cpu` (default: no CUDA available) applies the CPU flags: use_cpu_initialization, no
    fusions, fp32 pipeline dtype. `sequence_parallel` defaults to (tp > 1 and not on_cpu).
    `overrides` are passed to TransformerConfig last (e.g. recompute_granularity="full").
    """
    cfg = load_hf_config(hf_config)
    validate_layout(cfg, tp=tp, pp=pp, cp=cp, vpp=vpp)
    if on_cpu is None:
        on_cpu = not torch.cuda.is_available()
    if params_dtype not in (torch.float32, torch.bfloat16, torch.float16):
        raise ValueError(f"params_dtype must be float32, bfloat16 or float16, got {params_dtype}")
    if sequence_parallel is None:
        sequence_parallel = tp > 1 and not on_cpu
    kwargs: dict[str, Any] = dict(
        num_layers=cfg["num_hidden_layers"], hidden_size=cfg["hidden_size"],
        num_attention_heads=cfg["num_attention_heads"], num_query_groups=cfg["num_key_value_heads"],
        kv_channels=cfg["hidden_size"] // cfg["num_attention_heads"],
        ffn_hidden_size=cfg["intermediate_size"],
        normalization="RMSNorm", layernorm_epsilon=float(cfg["rms_norm_eps"]),
        gated_linear_unit=True, activation_func=F.silu,
        add_bias_linear=False, add_qkv_bias=True,
        hidden_dropout=0.0, attention_dropout=float(cfg.get("attention_dropout", 0.0) or 0.0),
        init_method_std=float(cfg.get("initializer_range", 0.02)),
        tensor_model_parallel_size=tp, pipeline_model_parallel_size=pp, context_parallel_size=cp,
        virtual_pipeline_model_parallel_size=vpp, sequence_parallel=sequence_parallel,
        params_dtype=params_dtype, bf16=params_dtype == torch.bfloat16, fp16=params_dtype == torch.float16,
        pipeline_dtype=params_dtype, attention_softmax_in_fp32=True,
        # variable_seq_lengths: PP p2p exchanges shapes, so micro-batches may differ in length
        # (the MoE dispatcher setting only satisfies a config check; the model has no experts).
        variable_seq_lengths=True, moe_token_dispatcher_type="alltoall",
        deallocate_pipeline_outputs=not on_cpu,
    )
    if on_cpu:
        kwargs.update(use_cpu_initialization=True, gradient_accumulation_fusion=False,
                      bias_activation_fusion=False, bias_dropout_fusion=False, masked_softmax_fusion=False,
                      apply_rope_fusion=False, persist_layer_norm=False, cross_entropy_loss_fusion=False)
    else:
        from fipo_megatron.megatron.qwen import te_available

        kwargs.update(bias_activation_fusion=True, bias_dropout_fusion=True, apply_rope_fusion=te_available())
    kwargs.update(overrides)
    return TransformerConfig(**kwargs)
