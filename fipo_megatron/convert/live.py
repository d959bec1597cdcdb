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

`iter_stage_hf_tensors(model_chunks, hf_config=None)` (one weight sender per pipeline stage) uses the
same ownership plan (1) and TP gather (2) + conversion (4) but yields only the items the calling
rank's stage owns, with no pipeline broadcast (3): stage s's first rank sends stage s's layers.
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


class _Plan:
    """Who holds what: every item of the model in HF order, its owning stage, this rank's
    parameters and every stage's (dtype, shape) report. Built collectively over the PP group."""

    def __init__(self, model_chunks: Any, hf_config: Any) -> None:
        from megatron.core import parallel_state as ps

        chunks = list(model_chunks) if isinstance(model_chunks, (list, tuple)) else [model_chunks]
        if hf_config is None:
            hf_config = getattr(_unwrap(chunks[0]), "hf_config", None)
            if hf_config is None:
                raise ValueError("pass hf_config: the model carries no hf_config attribute")
        self.dims = dims = QwenDims.from_hf_config(hf_config)
        self.tp, self.tp_group = ps.get_tensor_model_parallel_world_size(), ps.get_tensor_model_parallel_group()
        self.pp, self.pp_group = ps.get_pipeline_model_parallel_world_size(), ps.get_pipeline_model_parallel_group()
        self.stage = ps.get_pipeline_model_parallel_rank() if self.pp > 1 else 0
        self.local = _local_items(chunks)
        self.device = next(iter(self.local.values())).device if self.local else torch.device("cpu")
        report = {k: (str(v.dtype), tuple(v.shape)) for k, v in self.local.items()}
        self.reports: list[dict] = [report]
        if self.pp > 1:
            self.reports = [None] * self.pp  # type: ignore[list-item]
            dist.all_gather_object(self.reports, report, group=self.pp_group)
        self.owner: dict[tuple, int] = {}
        for stage, rep in enumerate(self.reports):
            for k in rep:
                self.owner.setdefault(k, stage)
        self.rules = {r.mcore_key: r for r in global_rules(dims, dims.vocab_size)}  # only to_hf is used
        self.rules.update({r.mcore_key: r for r in LAYER_RULES})
        order: list[tuple] = [(EMBED_KEY, None)]
        order += [(r.mcore_key, i) for i in range(dims.num_layers) for r in LAYER_RULES]
        order.append((FINAL_NORM_KEY, None))
        if not dims.tie_word_embeddings:
            order.append((OUTPUT_KEY, None))
        for key in order:
            if key not in self.owner:
                where = f" of layer {key[1]}" if key[1] is not None else ""
                raise ValueError(f"no pipeline stage holds {key[0]}{where}")
        self.order = order

    def hf_names(self, stage: int | None = None) -> list[str]:
        """HF names in stream order, of every item or of `stage`'s items only."""
        return [n for key in self.order if stage is None or self.owner[key] == stage
                for n in self.rules[key[0]].hf(key[1])]

    def gathered(self, key: tuple) -> torch.Tensor:
        """This rank's parameter for `key`, full across TP (collective over the TP group)."""
        rule, p = self.rules[key[0]], self.local[key]
        if getattr(p, "tensor_model_parallel", False) and self.tp > 1 and p.partition_dim != rule.tp_dim:
            raise ValueError(f"{key[0]}: Megatron splits it on dim {p.partition_dim}, the mapping says {rule.tp_dim}")
        return _tp_gather(p, rule, self.tp_group, self.tp)

    def to_hf(self, key: tuple, full: torch.Tensor) -> Iterator[tuple[str, torch.Tensor]]:
        rule = self.rules[key[0]]
        return zip(rule.hf(key[1]), rule.to_hf(full, self.dims))


def iter_hf_tensors_from_model(model_chunks: Any, hf_config: Any = None) -> Iterator[tuple[str, torch.Tensor]]:
    """Yield (hf_name, full tensor) from a live model on every rank (collective; see module doc)."""
    plan = _Plan(model_chunks, hf_config)
    for key in plan.order:
        rule = plan.rules[key[0]]
        stage = plan.owner[key]
        if key in plan.local and stage == plan.stage:
            full = plan.gathered(key)
        else:
            dtype_s, shape = plan.reports[stage][key]
            shape = list(shape)
            if rule.tp_dim is not None:
                shape[rule.tp_dim] *= plan.tp
            full = torch.empty(shape, dtype=getattr(torch, dtype_s.replace("torch.", "")),
                               device=plan.device)  # NCCL broadcasts need it on this rank's GPU
        if plan.pp > 1:
            full = full.contiguous()
            dist.broadcast(full, src=dist.get_global_rank(plan.pp_group, stage), group=plan.pp_group)
        yield from plan.to_hf(key, full)


class StageTensors:
    """`iter_stage_hf_tensors(model_chunks, hf_config=None)`: the (hf_name, full tensor) pairs of the items
    THIS pipeline stage owns, TP-gathered, in HF order; no pipeline broadcast. Collective over the
    TP group of this stage (every TP rank iterates it in step; the ownership plan is exchanged over
    the PP group when built, so all stages of a replica build it together). `names` (every stage's
    names by stage: `names_by_stage`) is known before iterating."""

    def __init__(self, model_chunks: Any, hf_config: Any = None) -> None:
        self._plan = _Plan(model_chunks, hf_config)
        self.stage = self._plan.stage
        self.num_stages = self._plan.pp
        self.names = self._plan.hf_names(self.stage)
        self.names_by_stage = [self._plan.hf_names(s) for s in range(self.num_stages)]

    def __iter__(self) -> Iterator[tuple[str, torch.Tensor]]:
        plan = self._plan
        for key in plan.order:
            if plan.owner[key] == plan.stage:
                yield from plan.to_hf(key, plan.gathered(key))


def iter_stage_hf_tensors(model_chunks: Any, hf_config: Any = None) -> StageTensors:
    """This stage's share of the model's HF tensors (see `StageTensors`)."""
    return StageTensors(model_chunks, hf_config)
