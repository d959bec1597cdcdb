"""Token log-probabilities (and optional entropy) from vocab-parallel logits.

`token_log_probs(logits_shard, labels, true_vocab_size=V)` returns log softmax(logits)[label]
in float32, shaped like `labels`, where `logits_shard` holds this TP rank's slice of the padded
vocabulary (last dim V_pad / tp; rank r holds ids [r * V_shard, (r + 1) * V_shard)). Any leading
layout works ([s, b, V/tp], [b, s, V/tp] or [tokens, V/tp]) as long as `labels` has the leading
shape.

Contract:
- The vocabulary is never gathered: per token, the max and the sum of exp are all-reduced over
  the TP group (MAX, then SUM), and the target logit comes from the rank that owns the label
  (an all-reduce SUM of a value that is 0 on the other ranks): three small [n] all-reduces per chunk.
- Padded vocabulary ids (>= true_vocab_size) are masked to -inf before the softmax, so results
  equal a log-softmax over the true vocabulary only (what vLLM / SGLang compute).
- Memory: tokens are processed in chunks of `chunk_tokens`; only one chunk at a time is copied to
  fp32, and the subtraction / exp / multiply / scatter then run in place on that copy, so at most
  one fp32 [chunk, V/tp] buffer is live at a time (two in the forward with `with_entropy=True`,
  which keeps the fp32 logits beside their exp) and no fp32 [tokens, V/tp] copy is made. The
  backward writes each chunk's gradient straight into the logits-dtype gradient tensor. Nothing of
  size V is saved for backward beyond the input logits themselves (the softmax is recomputed chunk
  by chunk).
- Differentiable w.r.t. `logits_shard`: d logp / d x_j = 1[j == label] - softmax_j, computed
  locally per rank (the global normaliser is saved), returned in the logits dtype. Backward
  needs no communication.
- `with_entropy=True` also returns the entropy of the (true-vocabulary) distribution per token,
  float32 and DETACHED (no gradient flows through it).
- Labels must lie in [0, true_vocab_size): give masked/padding positions a valid id (e.g. 0) and
  mask their results; an out-of-range label is a ValueError where reading values is free (CPU; on a GPU
  that check would be a device sync, so callers check their token ids on the host).
"""
from __future__ import annotations

import torch
import torch.distributed as dist

from fipo_megatron.algo.tensor_utils import host_reads_are_free
from fipo_megatron.models.rules import LOGPROB_CHUNK_TOKENS

__all__ = ["token_log_probs"]


def _default_tp_group():
    from megatron.core import parallel_state as ps

    if ps.model_parallel_is_initialized():
        return ps.get_tensor_model_parallel_group()
    return None


def _group_rank_size(group) -> tuple[int, int]:
    if group is None or not dist.is_initialized():
        return 0, 1
    return dist.get_rank(group), dist.get_world_size(group)


def _masked_fp32(chunk: torch.Tensor, n_valid: int) -> torch.Tensor:
    """A fresh fp32 copy of `chunk` (never aliasing it, so callers may modify it in place) with the
    padded vocabulary columns [n_valid:] set to -inf."""
    x = chunk.to(torch.float32, copy=True)
    if n_valid < x.shape[-1]:
        x[:, n_valid:] = float("-inf")
    return x


def _allreduce(t: torch.Tensor, op, group, size: int) -> torch.Tensor:
    if size > 1:
        dist.all_reduce(t, op=op, group=group)
    return t


class _VocabParallelLogProb(torch.autograd.Function):
    @staticmethod
    def forward(ctx, logits2d, labels1d, n_valid, vocab_start, chunk, group, size, with_entropy):
        n, v = logits2d.shape
        logz = torch.empty(n, dtype=torch.float32, device=logits2d.device)
        logp = torch.empty(n, dtype=torch.float32, device=logits2d.device)
        ent = torch.empty(n, dtype=torch.float32, device=logits2d.device) if with_entropy else None
        local = labels1d - vocab_start
        owned = (local >= 0) & (local < n_valid)
        local = torch.where(owned, local, torch.zeros_like(local))
        for i in range(0, n, chunk):
            j = min(n, i + chunk)
            x = _masked_fp32(logits2d[i:j], n_valid)
            m = x.max(dim=-1).values  # -inf on a rank holding only padded ids; the MAX fixes it
            m = _allreduce(m, dist.ReduceOp.MAX, group, size)
            tgt = x.gather(1, local[i:j, None]).squeeze(1)  # before x is overwritten below
            tgt = torch.where(owned[i:j], tgt, torch.zeros_like(tgt))
            tgt = _allreduce(tgt, dist.ReduceOp.SUM, group, size)
            if with_entropy:  # x is still needed for sum(e * x): exp into a second buffer
                e = torch.sub(x, m[:, None]).exp_()
            else:  # exp(x - m) in place: the only fp32 chunk buffer
                e = x.sub_(m[:, None]).exp_()
            s = _allreduce(e.sum(dim=-1), dist.ReduceOp.SUM, group, size)
            lz = m + torch.log(s)
            logz[i:j] = lz
            logp[i:j] = tgt - lz
            if with_entropy:
                # e * x in place; where x = -inf (padded / masked ids) e = 0 and the product is NaN,
                # which counts as 0 (x = +inf or NaN makes m and s NaN anyway).
                ex = e.mul_(x).nan_to_num_(nan=0.0).sum(dim=-1)
                ex = _allreduce(ex, dist.ReduceOp.SUM, group, size)
                ent[i:j] = lz - ex / s
            del x, e
        ctx.save_for_backward(logits2d, logz, local, owned)
        ctx.n_valid, ctx.chunk = n_valid, chunk
        ctx.mark_non_differentiable(*( [ent] if with_entropy else []))
        return (logp, ent) if with_entropy else (logp,)

    @staticmethod
    def backward(ctx, grad_logp, *unused):
        logits2d, logz, local, owned = ctx.saved_tensors
        grad = torch.empty_like(logits2d)
        n = logits2d.shape[0]
        for i in range(0, n, ctx.chunk):
            j = min(n, i + ctx.chunk)
            g = grad_logp[i:j].float()
            # gx = -softmax * g, built in place in the one fp32 chunk buffer
            gx = _masked_fp32(logits2d[i:j], ctx.n_valid).sub_(logz[i:j, None]).exp_().mul_(-g[:, None])
            hit = g * owned[i:j].float()
            gx.scatter_add_(1, local[i:j, None], hit[:, None])
            grad[i:j].copy_(gx)  # cast straight into the logits-dtype gradient, no temporary
            del gx
        return grad, None, None, None, None, None, None, None


def token_log_probs(logits_shard: torch.Tensor, labels: torch.Tensor, *, true_vocab_size: int, tp_group=None,
                    chunk_tokens: int = LOGPROB_CHUNK_TOKENS, with_entropy: bool = False):
    """log p(label) from vocab-parallel logits; see the module docstring for the full contract.

    Returns a float32 tensor shaped like `labels`, or `(log_probs, entropy)` with
    `with_entropy=True` (entropy detached). `tp_group` defaults to Megatron's TP group (or no
    communication when the parallel state is not initialised).
    """
    if logits_shard.shape[:-1] != labels.shape:
        raise ValueError(f"labels shape {tuple(labels.shape)} does not match logits leading shape "
                         f"{tuple(logits_shard.shape[:-1])}")
    if chunk_tokens < 1:
        raise ValueError(f"chunk_tokens must be >= 1, got {chunk_tokens}")
    if logits_shard.dim() == 3 and not logits_shard.is_contiguous() and logits_shard.transpose(0, 1).is_contiguous():
        # e.g. GPTModel's [b, s, V] output is a transposed view of [s, b, V]: work in memory order
        # instead of letting reshape copy the whole logits.
        res = token_log_probs(logits_shard.transpose(0, 1), labels.transpose(0, 1), true_vocab_size=true_vocab_size,
                              tp_group=tp_group, chunk_tokens=chunk_tokens, with_entropy=with_entropy)
        return tuple(r.transpose(0, 1) for r in res) if with_entropy else res.transpose(0, 1)
    if tp_group is None:
        tp_group = _default_tp_group()
    rank, size = _group_rank_size(tp_group)
    v_shard = logits_shard.shape[-1]
    if v_shard * size < true_vocab_size:
        raise ValueError(f"logits hold {v_shard} x {size} vocabulary ids, fewer than true_vocab_size "
                         f"{true_vocab_size}")
    if labels.numel() > 0 and host_reads_are_free(labels):  # on a GPU a device sync: callers check on the host
        lo, hi = torch.stack(torch.aminmax(labels)).tolist()
        if lo < 0 or hi >= true_vocab_size:
            raise ValueError(f"labels must lie in [0, {true_vocab_size}); got min {lo}, max {hi} "
                             f"(give padding positions a valid id and mask them)")
    vocab_start = rank * v_shard
    n_valid = max(0, min(v_shard, true_vocab_size - vocab_start))
    logits2d = logits_shard.reshape(-1, v_shard)
    labels1d = labels.reshape(-1).long()
    out = _VocabParallelLogProb.apply(logits2d, labels1d, n_valid, vocab_start, int(chunk_tokens), tp_group,
                                      size, bool(with_entropy))
    logp = out[0].view(labels.shape)
    if with_entropy:
        return logp, out[1].view(labels.shape)
    return logp
