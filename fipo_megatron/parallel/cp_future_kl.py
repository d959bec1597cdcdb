"""Future-KL under context parallelism by a distributed reverse prefix sum (one collective).

Math (per sequence s; a_k = M_k * delta_k; b_k = M_k for the `average` denominator)
------------------------------------------------------------------------------------
The padded sequence is split into 2*CP chunks of c = c_s tokens (`cp_shard`); chunk j holds
sequence positions [j*c, (j+1)*c). For a local token t in chunk i at offset k (t = i*c + k),
with e_i = (i+1)*c the end of its chunk, the single-rank Future-KL
    FKL_t = sum_{k' in R(t)} g^(k'-t) a_k'      (R(t): k' >= t or k' > t; k' < t + W if windowed)
splits exactly into
    local(t)  = the same sum restricted to k' < e_i  -> algo.future_kl on this rank's chunks
                (each chunk a separate segment: the local layout is [chunk r, chunk 2CP-1-r]);
    remote(t) = g^(e_i - t) * F_i(D),   D = number of remote positions in the range
                (D = L_s - e_i without a window; D = min(W - (e_i - t), L_s - e_i)^+ with one),
    F_i(D) = sum_{u=0}^{D-1} g^u a_{e_i + u}   (the discounted prefix of everything after chunk i).
With the chunk totals T_j = sum_{u<c} g^u a_{j*c+u} and prefixes Q_j(m) = sum_{u<m} g^u a_{j*c+u}:
    F_i(D) = sum_{v=1}^{q} g^((v-1)c) T_{i+v} + g^(q*c) Q_{i+q+1}(D - q*c),     q = D // c.
Without a window D covers every later chunk and F_i = C_i, computed by the reverse scan
C_{2CP-1} = 0, C_i = T_{i+1} + g^c C_{i+1}. Every factor is g^d with d >= 0 (<= 1), computed
in float64, so nothing overflows for any decay rate; the local part is float32 (algo.future_kl).
`average` divides the numerator by the same construction applied to b (0 where it is 0). The
local denominator comes from algo.future_kl in float32: a D_t below ~1e-38 (only with decay_rate
near 1 and > ~120 non-participating positions ahead) reads as 0 here, giving 0 instead of a ratio.

Traffic (per micro-batch, all sequences together): ONE all_gather over the CP group in which
each rank contributes, for each of its 2 chunks of each of the S sequences, F float64 values:
    F = (1 + K) * (2 if average else 1),   K = 0 without a window, K = min(W - 1, c_max - 1) with one
(T_j and the first K prefixes Q_j(1..K); with a window a token's range may end anywhere inside the
first W-1 positions of a later chunk, so totals alone are not enough). Without a window that is
2 or 4 floats per chunk, independent of the sequence length; with W >= c_max it degenerates to the
O(L) traffic of all-gathering the sequence. Chunks holding only prompt or padding have a = b = 0:
they contribute zeros, and every rank always takes part in the collective, so nothing hangs.
"""
from __future__ import annotations

import math
from typing import Optional

import torch
import torch.distributed as dist

from ..algo.future_kl import decay_gamma, future_kl
from .cp_shard import CPLayout


def payload_floats_per_rank(num_seqs: int, max_chunk_len: int, *, window: Optional[int] = None,
                            average: bool = False) -> int:
    """Number of float64 values one rank contributes to the all_gather (see the module docstring)."""
    return num_seqs * 2 * (1 + _num_prefixes(window, max_chunk_len)) * (2 if average else 1)


def _num_prefixes(window: Optional[int], max_chunk_len: int) -> int:
    """K: the chunk prefixes Q(1..K) sent besides each chunk total (0 without a window)."""
    return 0 if window is None else max(0, min(window - 1, max_chunk_len - 1))


def _check_group(layout: CPLayout, group: Optional[dist.ProcessGroup]) -> None:
    if not dist.is_initialized():
        raise RuntimeError("cp_future_kl with CP > 1 needs torch.distributed to be initialised")
    size, rank = dist.get_world_size(group), dist.get_rank(group)
    if size != layout.cp_size or rank != layout.cp_rank:
        raise ValueError(f"CP group is rank {rank} of {size}, layout is rank {layout.cp_rank} of {layout.cp_size}")


def _chunk_stats(x: torch.Tensor, layout: CPLayout, w: torch.Tensor, K: int) -> torch.Tensor:
    """[S, 2, 1+K] float64: per local chunk slot, total T and prefixes Q(1..K) of x (float64)."""
    S = layout.num_seqs
    slot = 2 * layout.seq_id + (layout.chunk_id != layout.cp_rank).long()
    wx = w * x
    out = torch.zeros(2 * S, 1 + K, dtype=torch.float64, device=x.device)
    out[:, 0].index_add_(0, slot, wx)
    if K > 0:
        sel = layout.pos_in_chunk < K
        dense = torch.zeros(2 * S, K, dtype=torch.float64, device=x.device)
        dense[slot[sel], layout.pos_in_chunk[sel]] = wx[sel]
        out[:, 1:] = torch.cumsum(dense, 1)
    return out.view(S, 2, 1 + K)


def _remote(stats: torch.Tensor, layout: CPLayout, log2g: float, window: Optional[int]) -> torch.Tensor:
    """remote(t) for every local token, float64, from the global table stats [S, 2CP, 1+K]."""
    S, nch = stats.shape[0], stats.shape[1]
    c = layout.chunk_lens.to(torch.float64)                       # [S]
    T = stats[:, :, 0]                                             # [S, 2CP]
    seq, i, k = layout.seq_id, layout.chunk_id, layout.pos_in_chunk
    c_tok = layout.chunk_lens[seq]
    to_end = torch.exp2(log2g * (c_tok - k).to(torch.float64))    # g^(e_i - t), exponent >= 1
    if window is None:
        gc = torch.exp2(log2g * c)                                 # g^c
        C = torch.zeros(S, nch, dtype=torch.float64, device=stats.device)
        for j in range(nch - 2, -1, -1):
            C[:, j] = T[:, j + 1] + gc * C[:, j + 1]
        return to_end * C[seq, i]
    # G[s, i, q] = sum_{v=1}^{q} g^((v-1)c) T[s, i+v]
    G = torch.zeros(S, nch, nch, dtype=torch.float64, device=stats.device)
    for q in range(1, nch):
        G[:, : nch - q, q] = G[:, : nch - q, q - 1] + torch.exp2(log2g * (q - 1) * c)[:, None] * T[:, q:]
    Qext = torch.cat([torch.zeros(S, nch, 1, dtype=torch.float64, device=stats.device), stats[:, :, 1:]],
                     dim=2)  # Q(0) = 0
    D = (window - (c_tok - k)).clamp(min=0)
    D = torch.minimum(D, (nch - 1 - i) * c_tok)
    q = torch.div(D, c_tok, rounding_mode="floor")
    rem = D - q * c_tok
    nxt = (i + q + 1).clamp(max=nch - 1)                           # rem == 0 whenever i+q+1 == 2CP
    F = G[seq, i, q] + torch.exp2(log2g * (q * c_tok).to(torch.float64)) * Qext[seq, nxt, rem]
    return torch.where(D > 0, to_end * F, torch.zeros_like(F))


def cp_future_kl(delta_local: torch.Tensor, mask_local: torch.Tensor, decay_rate: float, layout: CPLayout,
                 cp_group: Optional[dist.ProcessGroup] = None, *, start: str = "current",
                 window: Optional[int] = None, average: bool = False) -> torch.Tensor:
    """Future-KL of this CP rank's tokens, equal to algo.future_kl on the full packed stream.

    Args:
        delta_local, mask_local: [T/CP] in the local zigzag order of `layout` (cp_shard); mask =
            response mask * participation mask (0 on prompt and padding).
        decay_rate, start, window, average: as algo.future_kl.
        layout: this rank's CPLayout.  cp_group: the CP process group (Megatron's
            parallel_state.get_context_parallel_group()); None = the default group.
    Returns float32 [T/CP], no autograd graph. Collective: exactly one all_gather per call when
    CP > 1, whatever the data (ranks holding no response tokens take part with zeros).
    """
    n = layout.num_local_tokens
    if delta_local.dim() != 1 or delta_local.shape[0] != n or mask_local.shape != delta_local.shape:
        raise ValueError(f"delta_local and mask_local must be [{n}] (the layout's local tokens), got "
                         f"{tuple(delta_local.shape)} and {tuple(mask_local.shape)}")
    if layout.cp_size == 1:
        return future_kl(delta_local, mask_local, decay_rate, start=start, window=window, average=average,
                         cu_seqlens=layout.local_cu_seqlens)
    _check_group(layout, cp_group)
    log2g = math.log2(decay_gamma(decay_rate))
    with torch.no_grad():
        delta_local = delta_local.detach()
        m = mask_local.detach() != 0
        kw = dict(start=start, window=window, average=False, cu_seqlens=layout.local_chunk_cu_seqlens)
        num = future_kl(delta_local, m, decay_rate, **kw).double()
        a = torch.where(m, delta_local.double(), torch.zeros((), dtype=torch.float64, device=delta_local.device))
        K = 0 if window is None else _num_prefixes(window, int(layout.chunk_lens.max()) if layout.num_seqs else 1)
        w = torch.exp2(log2g * layout.pos_in_chunk.to(torch.float64))
        parts = [_chunk_stats(a, layout, w, K)]
        if average:
            den = future_kl(m.float(), m, decay_rate, **kw).double()
            parts.append(_chunk_stats(m.double(), layout, w, K))
        payload = torch.cat(parts, dim=2).contiguous()             # [S, 2, F]
        gathered = [torch.empty_like(payload) for _ in range(layout.cp_size)]
        dist.all_gather(gathered, payload, group=cp_group)
        S, nch = layout.num_seqs, 2 * layout.cp_size
        table = torch.empty(S, nch, payload.shape[2], dtype=torch.float64, device=payload.device)
        for r, p in enumerate(gathered):
            table[:, r] = p[:, 0]
            table[:, nch - 1 - r] = p[:, 1]
        num = num + _remote(table[:, :, : 1 + K], layout, log2g, window)
        if not average:
            return num.float()
        den = den + _remote(table[:, :, 1 + K:], layout, log2g, window)
        return torch.where(den > 0, num / torch.where(den > 0, den, torch.ones_like(den)),
                           torch.zeros_like(num)).float()


__all__ = ["cp_future_kl", "payload_floats_per_rank"]
