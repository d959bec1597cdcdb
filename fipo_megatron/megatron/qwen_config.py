"""The Hugging Face config.json -> Megatron `TransformerConfig` mapping for Qwen2/Qwen2.5.

Every architecture number is read from the HF config (never assumed): hidden_size,
num_hidden_layers, num_attention_heads, num_key_value_heads, intermediate_size, vocab_size,
rms_norm_eps, rope_theta, tie_word_embeddings, max_position_embeddings.
Qwen2 architecture in Megatron terms: RMSNorm, SwiGLU (gated linear unit + SiLU), GQA
(num_query_groups = num_key_value_heads), bias on QKV only, RoPE (base = rope_theta), no dropout.

The presets, the config loader, the vocabulary padding and the shape rules live in the
Megatron-free `fipo_megatron.models` (re-exported here for the existing callers).
"""
from __future__ import annotations

from typing import Any, Mapping

import torch
import torch.nn.functional as F
from megatron.core.transformer.transformer_config import TransformerConfig

from fipo_megatron.models.qwen25 import QWEN25_PRESETS, load_hf_config, rope_theta_of  # noqa: F401 (re-exported)
from fipo_megatron.models.rules import layout_problems, padded_vocab_size  # noqa: F401 (re-exported)


def validate_layout(cfg: Mapping[str, Any], *, tp: int = 1, pp: int = 1, cp: int = 1, vpp: int | None = None) -> None:
    """Raise ValueError naming the field(s) when the TP/PP/CP layout does not fit the model.

    `cfg` holds HF config.json fields (see `load_hf_config`). Megatron-side rules on top of
    `models.rules.layout_problems`: hidden_size divisible by num_attention_heads (kv_channels is
    derived from them) and cp >= 1. All problems are joined into one message, "; "-separated.
    """
    heads = cfg["num_attention_heads"]
    problems: list[str] = []
    if cfg["hidden_size"] % heads:
        problems.append(f"hidden_size={cfg['hidden_size']} is not divisible by num_attention_heads={heads}")
    problems += layout_problems(num_attention_heads=heads, num_key_value_heads=cfg["num_key_value_heads"],
                                intermediate_size=cfg["intermediate_size"],
                                num_hidden_layers=cfg["num_hidden_layers"], tp=tp, pp=pp, vpp=vpp)
    if cp < 1:
        problems.append(f"context parallel size must be >= 1, got {cp}")
    if problems:
        raise ValueError("; ".join(problems))


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
