"""Qwen2.5 on Megatron-Core: the model builder; presets, loader, vocab padding and layout checks are
re-exported from `qwen_config` (which takes them from the Megatron-free `fipo_megatron.models`).

`build_model(hf_config, ...)` returns a list of model chunks (one per virtual pipeline stage;
currently always one) for the calling rank's TP/PP position, built from Megatron's own
`GPTModel` with the Transformer Engine layer spec when TE is importable (GPU) and otherwise
Megatron's local spec with its core attention replaced by `attention.SDPAttention` (torch SDPA:
causal BSHD, packed THD, all-gather context parallelism). Call `parallel.initialize_parallel` first.

Masks: TE and SDPAttention apply the causal mask themselves (no mask tensor); only Megatron's own
local `DotProductAttention` (``layer_spec(core_attention="local")``) needs an explicit boolean
causal mask ([1, 1, s, s], True = masked), which `forward_logits` then builds.
Logits come back vocab-parallel: [b, s, padded_vocab / tp] on each TP rank. Rows (vocabulary
entries) >= the true vocab size are padding: `mask_padded_vocab_logits` sets them to -inf.
"""
from __future__ import annotations

import importlib.util
from typing import Any

import torch
from megatron.core import parallel_state as ps
from megatron.core.models.gpt import GPTModel
from megatron.core.transformer.transformer_config import TransformerConfig

from fipo_megatron.megatron.qwen_config import (  # noqa: F401  (re-exported API)
    QWEN25_PRESETS, load_hf_config, padded_vocab_size, rope_theta_of, transformer_config_from_hf,
    validate_layout,
)

__all__ = [
    "QWEN25_PRESETS", "load_hf_config", "padded_vocab_size", "transformer_config_from_hf", "validate_layout",
    "te_available", "layer_spec", "build_model", "causal_attention_mask", "forward_logits",
    "mask_padded_vocab_logits", "unwrap_model", "model_hf_config",
]


def te_available() -> bool:
    """True when transformer_engine can be imported (and a GPU is present)."""
    return torch.cuda.is_available() and importlib.util.find_spec("transformer_engine") is not None


def layer_spec(use_te: bool | None = None, core_attention: str = "sdpa"):
    """Megatron layer spec for Qwen2: TE spec when `use_te` (default: TE importable); otherwise the
    local spec (RMSNorm) whose core attention is `attention.SDPAttention` (`core_attention="sdpa"`,
    the default) or Megatron's own `DotProductAttention` (`"local"`: BSHD only, CP=1, needs a mask)."""
    import dataclasses

    from megatron.core.models.gpt.gpt_layer_specs import (
        get_gpt_layer_local_spec, get_gpt_layer_with_transformer_engine_spec,
    )

    if core_attention not in ("sdpa", "local"):
        raise ValueError(f"core_attention must be 'sdpa' or 'local', got {core_attention!r}")
    if use_te is None:
        use_te = te_available()
    if use_te:
        return get_gpt_layer_with_transformer_engine_spec()
    spec = get_gpt_layer_local_spec(normalization="RMSNorm")
    if core_attention == "local":
        return spec
    from fipo_megatron.megatron.attention import SDPAttention

    attn = spec.submodules.self_attention
    attn_sub = dataclasses.replace(attn.submodules, core_attention=SDPAttention)
    layer_sub = dataclasses.replace(spec.submodules, self_attention=dataclasses.replace(attn, submodules=attn_sub))
    return dataclasses.replace(spec, submodules=layer_sub)


def build_model(hf_config: Any, *, params_dtype: torch.dtype = torch.float32, pre_process: bool | None = None,
                post_process: bool | None = None, use_te: bool | None = None, core_attention: str = "sdpa",
                wrap_ddp: bool = False,
                use_distributed_optimizer: bool = True, make_vocab_size_divisible_by: int = 128,
                seq_length: int | None = None, **config_overrides: Any) -> list[torch.nn.Module]:
    """Build this rank's Qwen2 GPTModel chunk(s) for the current parallel layout.

    hf_config: dict / PretrainedConfig / preset name / path (see `load_hf_config`).
    Returns `[model]` (one chunk; virtual pipeline stages are not supported yet). With bf16/fp16
    `params_dtype` the chunk is wrapped in Megatron's `Float16Module`; with `wrap_ddp=True` it is
    wrapped in Megatron `DistributedDataParallel` (see `optim.wrap_ddp`), ready for
    `optim.build_optimizer`. Without TE, `core_attention` picks the attention of the local spec
    ("sdpa": `attention.SDPAttention`, which also runs packed THD and CP > 1; "local": Megatron's
    `DotProductAttention`, BSHD and CP=1 only). Raises ValueError when TP/PP/CP does not fit the model.
    """
    if not ps.model_parallel_is_initialized():
        raise RuntimeError("build_model needs Megatron's parallel state: call initialize_parallel() first")
    cfg = load_hf_config(hf_config)
    tp = ps.get_tensor_model_parallel_world_size()
    pp = ps.get_pipeline_model_parallel_world_size()
    cp = ps.get_context_parallel_world_size()
    if use_te is None:
        use_te = te_available()
    if cp > 1 and not use_te and core_attention == "local":
        raise ValueError("megatron-core's local DotProductAttention supports only context_parallel_size=1; "
                         "use core_attention='sdpa' (the default) or Transformer Engine")
    tcfg: TransformerConfig = transformer_config_from_hf(cfg, tp=tp, pp=pp, cp=cp, params_dtype=params_dtype,
                                                         **config_overrides)
    if pre_process is None:
        pre_process = ps.is_pipeline_first_stage(ignore_virtual=True)
    if post_process is None:
        post_process = ps.is_pipeline_last_stage(ignore_virtual=True)
    model: torch.nn.Module = GPTModel(
        config=tcfg, transformer_layer_spec=layer_spec(use_te, core_attention),
        vocab_size=padded_vocab_size(cfg["vocab_size"], make_vocab_size_divisible_by, tp),
        max_sequence_length=int(seq_length or cfg["max_position_embeddings"]),
        pre_process=pre_process, post_process=post_process, parallel_output=True,
        share_embeddings_and_output_weights=bool(cfg["tie_word_embeddings"]),
        position_embedding_type="rope", rotary_base=rope_theta_of(cfg),
    )
    model.hf_config = cfg  # type: ignore[attr-defined]  # for converters / logprobs (true vocab)
    model.needs_causal_mask = bool(not use_te and core_attention == "local")  # type: ignore[attr-defined]
    from megatron.core import tensor_parallel

    for p in model.parameters():
        # Megatron-LM does this in get_model(): attributes the optimizer and grad clipping read.
        tensor_parallel.set_defaults_if_not_set_tensor_model_parallel_attributes(p)
    if torch.cuda.is_available():
        model.cuda(torch.cuda.current_device())
    if tcfg.fp16 or tcfg.bf16:
        from megatron.core.transformer.module import Float16Module

        model = Float16Module(config=tcfg, module=model)
        model.hf_config = cfg  # type: ignore[attr-defined]
    chunks = [model]
    if wrap_ddp:
        from fipo_megatron.megatron.optim import wrap_ddp as _wrap

        chunks = _wrap(chunks, use_distributed_optimizer=use_distributed_optimizer)
    return chunks


def unwrap_model(model: torch.nn.Module) -> GPTModel:
    """Strip DDP / Float16Module wrappers (anything with a `.module`) down to the GPTModel."""
    while not isinstance(model, GPTModel) and hasattr(model, "module"):
        model = model.module
    return model  # type: ignore[return-value]


def model_hf_config(model: torch.nn.Module) -> dict:
    """The HF config dict `build_model` attached to the model."""
    inner = unwrap_model(model)
    cfg = getattr(inner, "hf_config", None)
    if cfg is None:
        raise ValueError("model was not built by fipo_megatron.megatron.qwen.build_model (no hf_config)")
    return cfg


def causal_attention_mask(seq_len: int, device: torch.device | str | None = None) -> torch.Tensor:
    """Boolean causal mask [1, 1, s, s], True = masked (position j > i), for the local spec."""
    return torch.triu(torch.ones(seq_len, seq_len, dtype=torch.bool, device=device), diagonal=1)[None, None]


def forward_logits(model: torch.nn.Module, tokens: torch.Tensor, position_ids: torch.Tensor | None = None,
                   attention_mask: torch.Tensor | None = None, packed_seq_params: Any = None) -> torch.Tensor:
    """Run one model chunk: tokens [b, s] -> vocab-parallel logits [b, s, V/tp] (last stage) or the
    hidden states (other stages; set the input tensor with `set_input_tensor` first).

    `position_ids` default: arange(s) per row. `attention_mask` default: None (TE and SDPAttention
    mask causally themselves), except for a model with Megatron's local DotProductAttention
    (`build_model(core_attention="local")`, or a model not built by `build_model` without TE),
    which gets a causal boolean mask. With `packed_seq_params` (THD) there is never a mask.
    A bf16 / fp16 model is called with ``fp32_output=False``: its logits stay in the model's dtype
    (Megatron's Float16Module would otherwise upcast the whole [tokens, vocab] output to fp32); the
    log-prob code works in fp32 one chunk of tokens at a time. Keyword arguments only (0.16 - 0.19).
    """
    b, s = tokens.shape
    if position_ids is None:
        position_ids = torch.arange(s, device=tokens.device).unsqueeze(0).expand(b, s)
    needs_mask = getattr(unwrap_model(model), "needs_causal_mask", not te_available())
    if attention_mask is None and packed_seq_params is None and needs_mask:
        attention_mask = causal_attention_mask(s, tokens.device)
    extra = {"fp32_output": False} if _has_float16_wrapper(model) else {}
    return model(input_ids=tokens, position_ids=position_ids, attention_mask=attention_mask,
                 packed_seq_params=packed_seq_params, **extra)


def _has_float16_wrapper(model: torch.nn.Module) -> bool:
    """Whether ``model``'s wrapper chain holds Megatron's Float16Module (bf16 / fp16 training)."""
    from megatron.core.transformer.module import Float16Module

    while True:
        if isinstance(model, Float16Module):
            return True
        if isinstance(model, GPTModel) or not hasattr(model, "module"):
            return False
        model = model.module


def mask_padded_vocab_logits(logits_shard: torch.Tensor, true_vocab_size: int, *, tp_rank: int | None = None,
                             tp_size: int | None = None) -> torch.Tensor:
    """Return `logits_shard` (vocab-parallel, last dim = padded_vocab / tp) with the columns of
    vocabulary ids >= `true_vocab_size` set to -inf (out of place; differentiable).

    TP rank r holds ids [r * V_shard, (r + 1) * V_shard). Defaults come from parallel_state
    (rank 0 / size 1 when it is not initialised).
    """
    if tp_rank is None:
        tp_rank = ps.get_tensor_model_parallel_rank() if ps.model_parallel_is_initialized() else 0
    if tp_size is None:
        tp_size = ps.get_tensor_model_parallel_world_size() if ps.model_parallel_is_initialized() else 1
    v_shard = logits_shard.shape[-1]
    start = tp_rank * v_shard
    if v_shard * tp_size < true_vocab_size:
        raise ValueError(f"logits hold {v_shard} x {tp_size} vocabulary entries, fewer than the true vocab "
                         f"size {true_vocab_size}")
    n_valid = max(0, min(v_shard, true_vocab_size - start))
    if n_valid == v_shard:
        return logits_shard
    ids = torch.arange(v_shard, device=logits_shard.device)
    return logits_shard.masked_fill(ids >= n_valid, float("-inf"))
