"""Torch-native core attention for Megatron-Core's layer spec (used whenever Transformer Engine is absent).

`SDPAttention` has the constructor / forward contract of megatron.core's `DotProductAttention`
(0.16 - 0.20: ``config, layer_number, attn_mask_type, attention_type, attention_dropout=None,
softmax_scale=None, cp_comm_type=None, pg_collection=None``; ``forward(query, key, value,
attention_mask, attn_mask_type=None, attention_bias=None, packed_seq_params=None, **extra)``)
and computes, for every query token i of a sequence and its keys j,

    out_i = sum_j softmax_j(scale * q_i . k_j  over the keys j <= i of the SAME sequence) v_j

with `torch.nn.functional.scaled_dot_product_attention` (SDPA: flash / memory-efficient kernels on
CUDA, the fused flash-style CPU kernel on CPU). Grouped-query attention (Qwen2.5: n query heads
share g key/value heads) uses SDPA's ``enable_gqa=True`` (torch >= 2.5; K/V are never repeated
per query head); older torch repeats K/V (n/g x their memory). Layouts (np / ng = query / K-V
heads of this TP rank, hn = head dim):

BSHD (no `packed_seq_params`): q [s, b, np, hn], k / v [s, b, ng, hn] -> [s, b, np*hn]. With no
  `attention_mask` the causal mask is implicit (``is_causal``: no mask tensor, O(s) memory with
  the fused kernels); a Megatron boolean mask ([b|1, 1, s, s], True = masked) is honoured when given
  (O(s^2) bytes for the mask). Context parallelism needs THD.

THD (``packed_seq_params.qkv_format == 'thd'``): q [t, np, hn], k / v [t, ng, hn] -> [t, np*hn],
  sequences delimited by ``cu_seqlens_q_padded`` (the padded offsets; ``cu_seqlens_q`` = real
  lengths, padding at the end of each sequence). Each sequence attends causally to itself only;
  padding tokens are inert: no real token sees them, and their outputs are exactly zero (as TE's).
  Kernels, in order of preference:
  - CUDA, CP = 1, fp16 / bf16, torch with `torch.nn.attention.varlen.varlen_attn`: one varlen
    flash call over the packed stream, O(t) memory (written for GPUs, not exercised on CPU).
  - otherwise a per-sequence loop of causal SDPA calls on each sequence's real tokens: O(t) for
    q/k/v/out plus the kernel's workspace for ONE sequence at a time (O(L_max) with the fused
    kernels; the math fallback materialises L_max^2 x np scores).

THD with context parallelism CP > 1 (zigzag layout of `parallel.cp_shard`: rank r holds chunks
  r and 2CP-1-r of every sequence; the GLOBAL cu_seqlens go in `packed_seq_params`, as for TE):
  K and V of all ranks are all-gathered over the CP group into the global stream
  (`parallel.cp_gather.all_gather_stream`: autograd-aware, the backward reduce-scatters their
  gradients; Llama-3-style all-gather CP). For each sequence the rank's 2c local queries (c = the
  chunk length) attend to the first min((2CP-r) c, L) global keys of that sequence under the mask
  key_pos <= query_pos (global positions within the sequence, from `CPLayout.seq_pos`), so each
  chunk sees exactly its causal past. Per-rank memory: the gathered K/V, 2 x t_global x ng x hn
  elements each (O(sequence), NOT divided by CP), plus one boolean mask of 2c x (2CP-r) c <=
  L_pad^2 / CP bytes for the sequence being processed, plus the kernel workspace.

RoPE under THD (+CP) is applied by Megatron before this module (`_apply_rotary_pos_emb_thd`): it
splits the local stream by cu_seqlens_padded / CP and gives the two halves of each sequence the
frequencies of chunks r and 2CP-1-r, the same zigzag order, so `max_seqlen_q` must be at least the
longest PADDED sequence (`THDBatch.packed_seq_params` sets it so).
"""
from __future__ import annotations

import contextlib
import inspect
import math
from typing import Any, Optional

import torch
import torch.nn.functional as F
from megatron.core import parallel_state, tensor_parallel
from megatron.core.transformer.enums import AttnMaskType
from megatron.core.transformer.module import MegatronModule

__all__ = ["SDPAttention", "sdpa_supports_gqa", "varlen_attn_fn", "thd_attention"]

_SUPPORTED_CP_COMM = (None, "all_gather", "allgather")


def _torch_version() -> tuple[int, int]:
    parts = torch.__version__.split("+")[0].split(".")
    return int(parts[0]), int("".join(ch for ch in parts[1] if ch.isdigit()) or 0)


def sdpa_supports_gqa() -> bool:
    """SDPA's `enable_gqa` keyword exists from torch 2.5 on."""
    return _torch_version() >= (2, 5)


def varlen_attn_fn():
    """(varlen_attn, keyword args for causal + GQA) when this torch has a causal GQA-capable
    `torch.nn.attention.varlen.varlen_attn` (torch >= 2.9; CUDA-only kernel), else None."""
    try:
        from torch.nn.attention.varlen import varlen_attn
    except ImportError:
        return None
    params = inspect.signature(varlen_attn).parameters
    if "enable_gqa" not in params:
        return None
    if "window_size" in params:
        return varlen_attn, {"window_size": (-1, 0), "enable_gqa": True}
    if "is_causal" in params:
        return varlen_attn, {"is_causal": True, "enable_gqa": True}
    return None


def _sdpa(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, mask: Optional[torch.Tensor], causal: bool,
          scale: float, dropout_p: float) -> torch.Tensor:
    """SDPA on [B, H, L, D] tensors; K/V with fewer heads are shared by groups of query heads."""
    if k.shape[1] != q.shape[1]:
        if sdpa_supports_gqa():
            return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=dropout_p, is_causal=causal,
                                                  scale=scale, enable_gqa=True)
        rep = q.shape[1] // k.shape[1]
        k, v = k.repeat_interleave(rep, dim=1), v.repeat_interleave(rep, dim=1)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=dropout_p, is_causal=causal, scale=scale)


def _bhld(x: torch.Tensor) -> torch.Tensor:
    """[L, H, D] -> [1, H, L, D] (a view)."""
    return x.transpose(0, 1).unsqueeze(0)


class _THDPlan:
    """Python-int segment table and index tensors for one packed batch on one CP rank (cached)."""

    def __init__(self, cu: torch.Tensor, cu_padded: torch.Tensor, cp: int, rank: int, device: torch.device):
        from fipo_megatron.parallel.cp_shard import cp_gather_index, make_cp_layout

        real = [int(x) for x in (cu[1:] - cu[:-1]).tolist()]
        layout = make_cp_layout(cu_padded.cpu(), cp, rank)
        self.cp, self.rank = cp, rank
        self.cu_padded = layout.cu_seqlens_padded.tolist()
        self.num_local = layout.num_local_tokens
        self.max_padded = max((b - a for a, b in zip(self.cu_padded[:-1], self.cu_padded[1:])), default=0)
        self.real_lens = real
        if any(r > b - a or r < 0 for r, a, b in zip(real, self.cu_padded[:-1], self.cu_padded[1:])):
            raise ValueError(f"cu_seqlens {cu.tolist()} do not fit inside cu_seqlens_padded {self.cu_padded}")
        lcu = layout.local_cu_seqlens.tolist()
        self.local_bounds = list(zip(lcu[:-1], lcu[1:]))
        seq_pos = layout.seq_pos
        real_t = torch.as_tensor(real, dtype=torch.long)
        self.real = ((seq_pos < real_t[layout.seq_id]).to(device) if layout.num_seqs
                     else torch.zeros(0, dtype=torch.bool))
        self.seq_pos = seq_pos.to(device)
        # does this rank hold any real (non-padding) query of sequence s? (Python bools: no device syncs)
        first = torch.full((layout.num_seqs,), 1 << 62, dtype=torch.long)
        first = first.scatter_reduce(0, layout.seq_id, seq_pos, reduce="amin")
        self.has_real_query = [f < r for f, r in zip(first.tolist(), real)]
        self.gather_index = cp_gather_index(layout.cu_seqlens_padded, cp).to(device) if cp > 1 else None
        # keys a rank's sequence s needs: up to the end of its later chunk (2CP-1-r), real keys only
        c = layout.chunk_lens.tolist()
        self.kv_len = [min((2 * cp - rank) * cs, r) for cs, r in zip(c, real)]


def _plan_for(psp: Any, cp: int, rank: int, device: torch.device) -> _THDPlan:
    cu = psp.cu_seqlens_q
    cu_padded = psp.cu_seqlens_q_padded if psp.cu_seqlens_q_padded is not None else cu
    key = (cu, cu_padded, cp, rank, str(device))
    cached = getattr(psp, "_fipo_thd_plan", None)
    if cached is not None and all((a is b) if isinstance(a, torch.Tensor) else a == b for a, b in zip(cached[0], key)):
        return cached[1]
    plan = _THDPlan(cu, cu_padded, cp, rank, device)
    try:
        psp._fipo_thd_plan = (key, plan)  # one plan per micro-batch, reused by every layer
    except AttributeError:  # pragma: no cover - a frozen / slotted PackedSeqParams
        pass
    return plan


def thd_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, plan: _THDPlan, *, scale: float,
                  dropout_p: float = 0.0, cp_group=None, allow_varlen: bool = True) -> torch.Tensor:
    """Packed causal attention: q [t, np, hn], k / v [t, ng, hn] (local tokens) -> [t, np, hn]."""
    if q.shape[0] != plan.num_local:
        raise ValueError(f"THD input holds {q.shape[0]} tokens on this rank, but cu_seqlens_padded "
                         f"(total {plan.cu_padded[-1]}) / CP={plan.cp} gives {plan.num_local}")
    if plan.cp > 1:
        from fipo_megatron.parallel.cp_gather import all_gather_stream

        kv = all_gather_stream(torch.stack([k, v], dim=1), plan.gather_index, cp_group)  # [T, 2, ng, hn]
        outs = []
        for s, (a, b) in enumerate(plan.local_bounds):
            n_kv = plan.kv_len[s]
            if b == a:
                continue
            qpos = plan.seq_pos[a:b]
            if n_kv == 0 or not plan.has_real_query[s]:  # only padding queries here: inert
                outs.append(q.new_zeros((b - a,) + tuple(q.shape[1:])))
                continue
            g0 = plan.cu_padded[s]
            ks, vs = kv[g0:g0 + n_kv, 0], kv[g0:g0 + n_kv, 1]
            kpos = torch.arange(n_kv, device=q.device)
            mask = kpos.unsqueeze(0) <= qpos.unsqueeze(1)  # [2c, n_kv], True = attend
            o = _sdpa(_bhld(q[a:b]), _bhld(ks), _bhld(vs), mask=mask, causal=False, scale=scale, dropout_p=dropout_p)
            outs.append(o.squeeze(0).transpose(0, 1))
        out = torch.cat(outs) if outs else q.new_zeros(q.shape)
        return torch.where(plan.real[:, None, None], out, out.new_zeros(()))
    vl = varlen_attn_fn() if (allow_varlen and q.is_cuda and q.dtype in (torch.float16, torch.bfloat16)
                              and dropout_p == 0.0) else None
    if vl is not None:
        fn, kw = vl
        cu = torch.as_tensor(plan.cu_padded, dtype=torch.int32, device=q.device)
        out = fn(q, k, v, cu, cu, plan.max_padded, plan.max_padded, scale=scale, **kw)
        return torch.where(plan.real[:, None, None], out, out.new_zeros(()))
    outs = []
    for s, (a, b) in enumerate(zip(plan.cu_padded[:-1], plan.cu_padded[1:])):
        n = plan.real_lens[s]
        if n:
            o = _sdpa(_bhld(q[a:a + n]), _bhld(k[a:a + n]), _bhld(v[a:a + n]), mask=None, causal=True, scale=scale,
                      dropout_p=dropout_p)
            outs.append(o.squeeze(0).transpose(0, 1))
        if b - a - n:
            outs.append(q.new_zeros((b - a - n,) + tuple(q.shape[1:])))
    return torch.cat(outs) if outs else q.new_zeros(q.shape)


class SDPAttention(MegatronModule):
    """Megatron core attention on torch SDPA (see the module docstring for the math and memory)."""

    def __init__(self, config, layer_number: int, attn_mask_type: AttnMaskType, attention_type: str,
                 attention_dropout: Optional[float] = None, softmax_scale: Optional[float] = None,
                 cp_comm_type: Optional[str] = None, pg_collection: Any = None, **unused: Any):
        super().__init__(config=config)
        if getattr(config, "softmax_type", "vanilla") != "vanilla":
            raise ValueError(f"SDPAttention supports softmax_type='vanilla' only, got {config.softmax_type!r}")
        if getattr(config, "window_size", None) is not None:
            raise ValueError("SDPAttention does not implement sliding-window attention (config.window_size)")
        if cp_comm_type not in _SUPPORTED_CP_COMM:
            raise ValueError(f"SDPAttention implements all-gather context parallelism only; cp_comm_type="
                             f"{cp_comm_type!r} (use None or 'all_gather')")
        self.layer_number = max(1, layer_number)
        self.attn_mask_type = attn_mask_type
        self.attention_type = attention_type
        if pg_collection is not None and hasattr(pg_collection, "tp"):
            tp = pg_collection.tp.size()
            self.cp_group = getattr(pg_collection, "cp", None)
        else:
            tp = parallel_state.get_tensor_model_parallel_world_size()
            self.cp_group = None
        if self.cp_group is None and config.context_parallel_size > 1:
            self.cp_group = parallel_state.get_context_parallel_group()
        cp = self.cp_group.size() if self.cp_group is not None else 1
        if cp != config.context_parallel_size:
            raise ValueError(f"CP group has {cp} ranks but config.context_parallel_size={config.context_parallel_size}")
        self.cp_size = cp
        self.cp_rank = self.cp_group.rank() if self.cp_group is not None else 0
        heads, groups = config.num_attention_heads, config.num_query_groups or config.num_attention_heads
        if heads % tp or groups % tp or heads % groups:
            raise ValueError(f"{heads} heads / {groups} query groups do not split over TP={tp}")
        self.num_heads = heads // tp
        self.num_groups = groups // tp
        self.head_dim = config.kv_channels
        self.softmax_scale = softmax_scale if softmax_scale is not None else 1.0 / math.sqrt(self.head_dim)
        self.dropout_p = float(config.attention_dropout if attention_dropout is None else attention_dropout)

    def _dropout(self) -> tuple[float, Any]:
        p = self.dropout_p if self.training else 0.0
        if p and not self.config.sequence_parallel:
            return p, tensor_parallel.get_cuda_rng_tracker().fork()
        return p, contextlib.nullcontext()

    def _check_heads(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> None:
        if q.shape[-2:] != (self.num_heads, self.head_dim) or k.shape[-2:] != (self.num_groups, self.head_dim) \
                or v.shape != k.shape:
            raise ValueError(f"expected q [..., {self.num_heads}, {self.head_dim}] and k / v [..., {self.num_groups}, "
                             f"{self.head_dim}], got {tuple(q.shape)}, {tuple(k.shape)}, {tuple(v.shape)}")

    def forward(self, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                attention_mask: Optional[torch.Tensor], attn_mask_type: Optional[AttnMaskType] = None,
                attention_bias: Optional[torch.Tensor] = None, packed_seq_params: Any = None,
                **extra: Any) -> torch.Tensor:
        """BSHD [s, b, np, hn] -> [s, b, np*hn]; THD [t, np, hn] -> [t, np*hn] (see the module docstring)."""
        if attention_bias is not None:
            raise ValueError("SDPAttention does not support attention_bias")
        mask_type = attn_mask_type if attn_mask_type is not None else self.attn_mask_type
        if isinstance(mask_type, torch.Tensor):  # Megatron's checkpointed path encodes the enum as a tensor
            mask_type = AttnMaskType(int(mask_type.reshape(-1)[0]))
        self._check_heads(query, key, value)
        p, rng = self._dropout()
        if packed_seq_params is not None:
            return self._forward_thd(query, key, value, packed_seq_params, mask_type, p, rng)
        if self.cp_size > 1:
            raise ValueError("SDPAttention runs context parallelism on packed THD input only: pass "
                             "packed_seq_params (qkv_format='thd') with the global cu_seqlens")
        if query.dim() != 4:
            raise ValueError(f"BSHD query must be [s, b, heads, dim], got {tuple(query.shape)}")
        q, k, v = (x.permute(1, 2, 0, 3) for x in (query, key, value))  # [b, h, s, d]
        if attention_mask is not None:
            if attention_mask.dtype != torch.bool:
                raise ValueError("attention_mask must be boolean (True = masked), as Megatron's local attention")
            mask, causal = ~attention_mask, False
        elif mask_type == AttnMaskType.causal:
            mask, causal = None, True
        elif mask_type == AttnMaskType.no_mask:
            mask, causal = None, False
        else:
            raise ValueError(f"attn_mask_type {mask_type} needs an attention_mask")
        with rng:
            out = _sdpa(q, k, v, mask=mask, causal=causal, scale=self.softmax_scale, dropout_p=p)
        s, b = query.shape[0], query.shape[1]
        return out.permute(2, 0, 1, 3).reshape(s, b, self.num_heads * self.head_dim)

    def _forward_thd(self, query, key, value, psp, mask_type, p, rng) -> torch.Tensor:
        if getattr(psp, "qkv_format", "thd") != "thd":
            raise ValueError(f"packed_seq_params.qkv_format must be 'thd', got {psp.qkv_format!r}")
        if mask_type not in (AttnMaskType.causal, AttnMaskType.padding_causal):
            raise ValueError(f"packed THD attention is causal; got attn_mask_type {mask_type}")
        if getattr(psp, "local_cp_size", None) not in (None, self.cp_size):
            raise ValueError("hierarchical / hybrid context parallelism (local_cp_size) is not supported")
        if psp.cu_seqlens_q is None:
            raise ValueError("packed_seq_params.cu_seqlens_q is required for THD attention")
        for a, b in ((psp.cu_seqlens_q, psp.cu_seqlens_kv), (psp.cu_seqlens_q_padded, psp.cu_seqlens_kv_padded)):
            if b is not None and a is not b and not torch.equal(a.cpu(), b.cpu()):
                raise ValueError("self-attention needs cu_seqlens_q == cu_seqlens_kv (and the padded ones)")
        if query.dim() == 4 and query.shape[1] == 1:
            query, key, value = query.squeeze(1), key.squeeze(1), value.squeeze(1)
        if query.dim() != 3:
            raise ValueError(f"THD query must be [t, heads, dim], got {tuple(query.shape)}")
        plan = _plan_for(psp, self.cp_size, self.cp_rank, query.device)
        with rng:
            out = thd_attention(query, key, value, plan, scale=self.softmax_scale, dropout_p=p, cp_group=self.cp_group)
        return out.reshape(out.shape[0], self.num_heads * self.head_dim)

    def sharded_state_dict(self, prefix: str = "", sharded_offsets: tuple = (), metadata: Optional[dict] = None):
        return {}  # no parameters (vanilla softmax)
