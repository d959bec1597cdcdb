"""Context-parallel (CP) sharding of packed THD batches: the ONLY place with CP offset arithmetic.

Zigzag (load-balanced) split, per sequence
------------------------------------------
Sequence s has padded length Lp_s (a multiple of 2*CP, see `packing.pack_thd`) and occupies
global stream positions [cu_p[s], cu_p[s+1]). It is cut into 2*CP chunks of c_s = Lp_s / (2*CP)
tokens; chunk j covers sequence positions [j*c_s, (j+1)*c_s). CP rank r keeps chunks r and
2*CP-1-r. The local stream is, for s = 0..S-1 in order: [chunk r of s, chunk 2CP-1-r of s], so
sequence s occupies local positions [cu_p[s]/CP, cu_p[s+1]/CP) and every rank holds T/CP tokens.

What this matches: Transformer Engine's `thd_get_partitioned_indices(cu_seqlens_padded,
total_tokens, cp_size, cp_rank)` (used by megatron.core.utils.get_thd_batch_on_this_cp_rank):
its kernel maps local token i of sequence s (local offset cu_p[s]/CP, local length 2*c_s) to
global index cu_p[s] + i + c_s * (r if i < c_s else 2CP-2-r), i.e. first half = chunk r, second
half = chunk 2CP-1-r, i.e. exactly the order above; and, for the BSHD path, megatron's
`get_batch_on_this_cp_rank` (view as 2CP chunks, index_select [r, 2CP-1-r]). TE's CP attention
takes the GLOBAL cu_seqlens / cu_seqlens_padded in PackedSeqParams and performs this split
internally, so the sharded batch keeps the global cu_seqlens.

Labels are shifted in `packing` before this split, so each local token carries its own label.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Optional

import torch
import torch.distributed as dist

from .packing import THDBatch


@dataclass
class CPLayout:
    """Where this rank's tokens sit in the global packed stream.

    cu_seqlens_padded: [S+1] int64, global padded offsets.   chunk_lens: [S] int64, c_s.
    local_cu_seqlens: [S+1] int32, per-SEQUENCE local segments (cu_p / CP; both chunks of s).
    local_chunk_cu_seqlens: [2S+1] int32, per-CHUNK local segments (chunk r of s, then 2CP-1-r).
    global_index: [T/CP] int64, global stream index of every local token.
    seq_id, chunk_id, pos_in_chunk: [T/CP] int64 for every local token.
    """
    cp_size: int
    cp_rank: int
    cu_seqlens_padded: torch.Tensor
    chunk_lens: torch.Tensor
    local_cu_seqlens: torch.Tensor
    local_chunk_cu_seqlens: torch.Tensor
    global_index: torch.Tensor
    seq_id: torch.Tensor
    chunk_id: torch.Tensor
    pos_in_chunk: torch.Tensor

    @property
    def num_seqs(self) -> int:
        return int(self.chunk_lens.numel())

    @property
    def num_local_tokens(self) -> int:
        return int(self.global_index.numel())

    @property
    def seq_pos(self) -> torch.Tensor:
        """[T/CP] int64: each local token's position within its own (padded) sequence."""
        return self.chunk_id * self.chunk_lens[self.seq_id] + self.pos_in_chunk


def chunks_of_rank(cp_size: int, cp_rank: int) -> tuple[int, int]:
    return cp_rank, 2 * cp_size - 1 - cp_rank


def make_cp_layout(cu_seqlens_padded: torch.Tensor, cp_size: int, cp_rank: int) -> CPLayout:
    """Layout of rank `cp_rank` for a packed stream with the given padded offsets."""
    if cp_size < 1 or not 0 <= cp_rank < cp_size:
        raise ValueError(f"bad cp_size={cp_size} / cp_rank={cp_rank}")
    cu = torch.as_tensor(cu_seqlens_padded).to(torch.long).reshape(-1)
    lens = cu[1:] - cu[:-1]
    S = int(lens.numel())
    if cp_size == 1:
        idx = torch.arange(int(cu[-1]) if S else 0)
        seq = torch.repeat_interleave(torch.arange(S), lens)
        pos = idx - cu[:-1][seq] if S else idx
        return CPLayout(1, 0, cu, lens.clone(), cu.to(torch.int32), cu.to(torch.int32), idx, seq,
                        torch.zeros_like(idx), pos)
    nch = 2 * cp_size
    if S and bool((lens % nch != 0).any()):
        bad = int(torch.nonzero(lens % nch != 0)[0])
        raise ValueError(f"sequence {bad} has padded length {int(lens[bad])}, not a multiple of 2*CP={nch}; "
                         "pack with packing.pack_thd(cp_size=...)")
    c = lens // nch
    lo, hi = chunks_of_rank(cp_size, cp_rank)
    seq = torch.repeat_interleave(torch.arange(S), 2 * c)            # [T/CP]
    local_cu = torch.zeros(S + 1, dtype=torch.long)
    local_cu[1:] = torch.cumsum(2 * c, 0)
    i = torch.arange(int(local_cu[-1]))
    within = i - local_cu[:-1][seq]                                  # 0 .. 2c_s-1
    second = within >= c[seq]
    chunk = torch.where(second, torch.full_like(seq, hi), torch.full_like(seq, lo))
    pos = within - c[seq] * second.long()
    gidx = cu[:-1][seq] + chunk * c[seq] + pos
    chunk_cu = torch.zeros(2 * S + 1, dtype=torch.long)
    chunk_cu[1:] = torch.cumsum(c.repeat_interleave(2), 0)
    return CPLayout(cp_size, cp_rank, cu, c, local_cu.to(torch.int32), chunk_cu.to(torch.int32), gidx, seq, chunk,
                    pos)


def zigzag_index(cu_seqlens_padded: torch.Tensor, cp_size: int, cp_rank: int) -> torch.Tensor:
    """Global indices of rank `cp_rank`'s tokens (same as TE's thd_get_partitioned_indices)."""
    return make_cp_layout(cu_seqlens_padded, cp_size, cp_rank).global_index


def shard_packed_batch(batch: THDBatch, cp_size: int, cp_rank: int) -> THDBatch:
    """This rank's part of a (full) THD batch: every per-token tensor index-selected, `cp` set.

    cu_seqlens / cu_seqlens_padded stay global (TE's CP attention wants them so); the local
    per-sequence segments for the loss are `batch.cp.local_cu_seqlens`.
    """
    if batch.cp is not None:
        raise ValueError("batch is already sharded")
    if cp_size > 1 and batch.pad_multiple % (2 * cp_size) != 0:
        raise ValueError(f"batch was packed for pad_multiple={batch.pad_multiple}, which CP={cp_size} cannot split")
    layout = make_cp_layout(batch.cu_seqlens_padded, cp_size, cp_rank)
    local = {k: v.index_select(0, layout.global_index) for k, v in batch.token_tensors().items()}
    return dataclasses.replace(batch, cp=layout, **local)


def cp_gather_index(cu_seqlens_padded: torch.Tensor, cp_size: int) -> torch.Tensor:
    """[T] int64 permutation: row of the rank-major all-gather buffer (rank 0's T/CP local tokens,
    then rank 1's, ...) that holds global stream token g. `buffer[index]` is the global stream."""
    cu_seqlens_padded = torch.as_tensor(cu_seqlens_padded).cpu()
    if cp_size == 1:
        return torch.arange(int(cu_seqlens_padded[-1]))
    order = torch.cat([zigzag_index(cu_seqlens_padded, cp_size, r) for r in range(cp_size)])
    inv = torch.empty_like(order)
    inv[order] = torch.arange(order.numel())
    return inv


def gather_from_cp(local: torch.Tensor, layout: CPLayout, group: Optional[dist.ProcessGroup] = None) -> torch.Tensor:
    """Inverse of the split (tests / metrics / old-log-prob bookkeeping only: O(T) traffic).

    `local`: [T/CP, ...] this rank's values in local order. Returns the global [T, ...] stream on
    every rank (all_gather over the CP group, then each rank's block placed at its global indices).
    """
    if layout.cp_size == 1:
        return local
    world = dist.get_world_size(group)
    if world != layout.cp_size:
        raise ValueError(f"CP group has {world} ranks, layout says {layout.cp_size}")
    parts = [torch.empty_like(local) for _ in range(world)]
    dist.all_gather(parts, local.contiguous(), group=group)
    index = cp_gather_index(layout.cu_seqlens_padded, layout.cp_size).to(local.device)
    return torch.cat(parts).index_select(0, index)


def gather_responses(local: torch.Tensor, batch: THDBatch, group: Optional[dist.ProcessGroup] = None) -> list:
    """Per-sample response values (e.g. old log-probs) from a sharded batch's per-token output.

    all_gather over CP (O(T), once per rollout step for old / ref log-probs and metrics; never
    inside the loss), then `packing.unpack_responses`. Returns the same list on every CP rank.
    """
    from .packing import unpack_responses

    full = gather_from_cp(local.reshape(-1), batch.cp, group) if batch.cp is not None else local.reshape(-1)
    return unpack_responses(full, batch)


__all__ = ["CPLayout", "make_cp_layout", "zigzag_index", "chunks_of_rank", "shard_packed_batch", "cp_gather_index",
           "gather_from_cp", "gather_responses"]
