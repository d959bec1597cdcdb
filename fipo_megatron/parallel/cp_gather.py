"""Autograd-aware all-gather of a CP-sharded token stream (Llama-3-style all-gather context parallelism).

`all_gather_stream(local, gather_index, group)` turns every CP rank's local tokens [T/CP, ...]
(zigzag order, see `cp_shard`) into the full GLOBAL stream [T, ...] on every rank:

    forward:  buf = all_gather(local) (rank-major, [T, ...]);  out = buf[gather_index]
    backward: gbuf[gather_index] = grad_out (a permutation, so a scatter);  grad_local =
              reduce_scatter(gbuf, SUM)[this rank's block]

i.e. the gradient of token g on this rank is the SUM over CP ranks of d(loss_r)/d(token g): the
attention of every rank that read this rank's keys / values contributes. `gather_index` is
`cp_shard.cp_gather_index(cu_seqlens_padded, CP)` (the only place that knows the zigzag order).

Memory per rank: the gathered buffer and the permuted output, 2 x T x (features) elements during
the forward (the buffer is freed on return; autograd saves only the index), the same in the
backward. Traffic: (CP-1)/CP x T x features per rank and direction.
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.distributed as dist


def _all_gather_into(out: torch.Tensor, x: torch.Tensor, group) -> None:
    fn = getattr(dist, "all_gather_into_tensor", None)
    if fn is not None:
        fn(out, x, group=group)
    else:  # pragma: no cover - torch without all_gather_into_tensor
        dist.all_gather(list(out.chunk(dist.get_world_size(group))), x, group=group)


def _reduce_scatter_into(out: torch.Tensor, x: torch.Tensor, group) -> None:
    fn = getattr(dist, "reduce_scatter_single", None) or getattr(dist, "reduce_scatter_tensor", None)
    try:
        fn(out, x, group=group)
    except (RuntimeError, NotImplementedError, TypeError):  # backends without reduce-scatter (old gloo)
        x = x.clone()
        dist.all_reduce(x, group=group)
        out.copy_(x.chunk(dist.get_world_size(group))[dist.get_rank(group)])


class _AllGatherStream(torch.autograd.Function):
    @staticmethod
    def forward(ctx, local: torch.Tensor, gather_index: torch.Tensor, group) -> torch.Tensor:
        world = dist.get_world_size(group)
        local = local.contiguous()
        buf = local.new_empty((world * local.shape[0],) + tuple(local.shape[1:]))
        _all_gather_into(buf, local, group)
        ctx.group, ctx.world, ctx.local_shape = group, world, local.shape
        ctx.save_for_backward(gather_index)
        return buf.index_select(0, gather_index)

    @staticmethod
    def backward(ctx, grad_out: torch.Tensor):
        (gather_index,) = ctx.saved_tensors
        gbuf = torch.empty_like(grad_out)
        gbuf.index_copy_(0, gather_index, grad_out.contiguous())
        grad_local = grad_out.new_empty(ctx.local_shape)
        _reduce_scatter_into(grad_local, gbuf, ctx.group)
        return grad_local, None, None


def all_gather_stream(local: torch.Tensor, gather_index: torch.Tensor,
                      group: Optional[dist.ProcessGroup] = None) -> torch.Tensor:
    """[T/CP, ...] local tokens of every CP rank -> [T, ...] global stream (differentiable; see module doc).

    Every rank must pass the same number of local tokens (T/CP) and the same `gather_index` ([T]
    int64, on `local`'s device). A group of size 1 returns `local[gather_index]` without communication.
    """
    world = dist.get_world_size(group) if dist.is_initialized() else 1
    if gather_index.dim() != 1 or gather_index.numel() != world * local.shape[0]:
        raise ValueError(f"gather_index has {gather_index.numel()} entries; the CP group of {world} ranks "
                         f"with {local.shape[0]} local tokens each gathers {world * local.shape[0]}")
    if world == 1:
        return local.index_select(0, gather_index)
    return _AllGatherStream.apply(local, gather_index, group)


__all__ = ["all_gather_stream"]
