"""Stream full HF-named tensors out of a LIVE Megatron GPTModel at any TP/PP (rollout weight sync).

`iter_hf_tensors_from_model(model_chunks, hf_config=None)` is collective: every rank of the model
(all TP and PP ranks of a data-parallel replica; replicas work independently) must iterate it to
the end in step. It yields `(hf_name, full_tensor)` one tensor at a time on EVERY rank, in HF order
(embed_tokens, layer 0 ... L-1, norm, lm_head when untied), using the rules of `mapping.py`:

1. ownership: each rank reports which items it holds (embedding: first stage; layer i: the stage
   whose `TransformerLayer.layer_number - 1 == i`; final norm / output layer: last stage), with
   an all_gather_object over the PP group, so uneven pipeline splits work too;
2. TP gather on the owning stage: all_gather over the TP group, then concatenate on the rule's
   split dim (qkv rows = whole KV groups, o_proj / down_proj input dim, vocab rows), fc1 from the
   per-rank [gate_r; up_r] halves into [gate; up];
3. broadcast of the full Megatron tensor from the owning stage over the PP group;
4. the rule's `to_hf` (qkv de-interleave, fc1 split, padded vocab rows dropped).
Tied embeddings: the last stage's output_layer copy is never exported; embed_tokens is yielded once.
"""
from __future__ import annotations

from typing import Any, Iterator

import torch
import torch.distributed as dist

from .mapping import (EMBED_KEY, FINAL_NORM_KEY, LAYER_PREFIX, LAYER_RULES, OUTPUT_KEY, QwenDims,
                      fc1_tp_shards_to_global, global_rules, live_param_suffix)


def _unwrap(model: torch.nn.Module) -> torch.nn.Module:
    from fipo_megatron.megatron.qwen import unwrap_model

    return unwrap_model(model)


def _local_items(chunks: list[torch.nn.Module]) -> dict[tuple, torch.Tensor]:
    """{(checkpoint key, global layer or None): local parameter} held by this rank."""
    items: dict[tuple, torch.Tensor] = {}
    for chunk in chunks:
        m = _unwrap(chunk)
        layer_numbers = [layer.layer_number - 1 for layer in m.decoder.layers] if hasattr(m, "decoder") else []
        for name, p in m.named_parameters():
            if name.startswith(LAYER_PREFIX):
                local_idx, rest = name[len(LAYER_PREFIX):].split(".", 1)
                items[(live_param_suffix(rest), layer_numbers[int(local_idx)])] = p
            elif name == OUTPUT_KEY and getattr(m, "share_embeddings_and_output_weights", False):
                continue  # tied: the last stage's copy of the embedding is not exported
            elif name in (EMBED_KEY, FINAL_NORM_KEY, OUTPUT_KEY):
                items[(name, None)] = p
            else:
                raise ValueError(f"parameter '{name}' has no HF mapping (see fipo_megatron/convert/mapping.py)")
    return items


def _tp_gather(t: torch.Tensor, rule, group, tp: int) -> torch.Tensor:
    t = t.detach().contiguous()
    if rule.tp_dim is None or tp == 1:
        return t  # consumers copy each tensor as it streams by (no optimizer step mid-sync)
    parts = [torch.empty_like(t) for _ in range(tp)]
    dist.all_gather(parts, t, group=group)
    if rule.kind == "fc1":
        return fc1_tp_shards_to_global(parts)
    return torch.cat(parts, dim=rule.tp_dim)


def iter_hf_tensors_from_model(model_chunks: Any, hf_config: Any = None) -> Iterator[tuple[str, torch.Tensor]]:
    """Yield (hf_name, full tensor) from a live model on every rank (collective; see module doc)."""
    from megatron.core import parallel_state as ps

    chunks = list(model_chunks) if isinstance(model_chunks, (list, tuple)) else [model_chunks]
    if hf_config is None:
        hf_config = getattr(_unwrap(chunks[0]), "hf_config", None)
        if hf_config is None:
            raise ValueError("pass hf_config: the model carries no hf_config attribute")
    dims = QwenDims.from_hf_config(hf_config)
    tp, tp_group = ps.get_tensor_model_parallel_world_size(), ps.get_tensor_model_parallel_group()
    pp, pp_group = ps.get_pipeline_model_parallel_world_size(), ps.get_pipeline_model_parallel_group()

    local = _local_items(chunks)
    dev = next(iter(local.values())).device if local else torch.device("cpu")
    report = {k: (str(v.dtype), tuple(v.shape)) for k, v in local.items()}
    reports: list[dict] = [report]
    if pp > 1:
        reports = [None] * pp  # type: ignore[list-item]
        dist.all_gather_object(reports, report, group=pp_group)
    owner: dict[tuple, int] = {}
    for stage, rep in enumerate(reports):
        for k in rep:
            owner.setdefault(k, stage)

    rules = {r.mcore_key: r for r in global_rules(dims, dims.vocab_size)}  # only to_hf is used
    rules.update({r.mcore_key: r for r in LAYER_RULES})
    order: list[tuple] = [(EMBED_KEY, None)]
    order += [(r.mcore_key, i) for i in range(dims.num_layers) for r in LAYER_RULES]
    order.append((FINAL_NORM_KEY, None))
    if not dims.tie_word_embeddings:
        order.append((OUTPUT_KEY, None))
    for key in order:
        if key not in owner:
            where = f" of layer {key[1]}" if key[1] is not None else ""
            raise ValueError(f"no pipeline stage holds {key[0]}{where}")
        rule = rules[key[0]]
        stage = owner[key]
        if key in local:
            p = local[key]
            if getattr(p, "tensor_model_parallel", False) and tp > 1 and p.partition_dim != rule.tp_dim:
                raise ValueError(f"{key[0]}: Megatron splits it on dim {p.partition_dim}, "
                                 f"the mapping says {rule.tp_dim}")
            full = _tp_gather(p, rule, tp_group, tp)
        else:
            dtype_s, shape = reports[stage][key]
            shape = list(shape)
            if rule.tp_dim is not None:
                shape[rule.tp_dim] *= tp
            full = torch.empty(shape, dtype=getattr(torch, dtype_s.replace("torch.", "")),
                               device=dev)  # NCCL broadcasts need it on this rank's GPU
        if pp > 1:
            full = full.contiguous()
            dist.broadcast(full, src=dist.get_global_rank(pp_group, stage), group=pp_group)
        yield from zip(rule.hf(key[1]), rule.to_hf(full, dims))
