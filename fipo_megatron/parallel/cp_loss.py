"""The policy loss under context parallelism, and how the trainer must normalise it.

`cp_policy_loss` is `algo.losses.policy_loss` on this CP rank's tokens with
  - future_kl_fn = `cp_future_kl` (exact cross-rank Future-KL, one all_gather per micro-batch),
  - seq_sum_fn   = all-reduce(SUM) over the CP group of the per-sequence vector [S] (dual-clipped
                   counts for the sequence filter, token counts for seq-mean), so the filter sees each
                   response's exact global count,
  - cu_seqlens   = layout.local_cu_seqlens (sequence s = this rank's two chunks of s; the same S on
                   every CP rank, so the per-sequence vectors line up for the all-reduce).
Each kept token lives on exactly one (DP rank, CP rank, micro-batch), so its loss term appears in
exactly one rank's `loss_sum` and is counted once in exactly one rank's `num_tokens`; the
Future-KL, influence weights and filter are detached, hence for every CP:
    sum over ranks and micro-batches of loss_sum  == the CP=1 loss_sum of the same samples,
    d(loss_sum_r) / d(log_prob_r)                 == the CP=1 gradient at rank r's tokens.

Normalisation: global token mean L = (sum_{DP x CP x micro-batches} loss_sum) / N,
N = sum_{DP x CP x micro-batches} num_tokens (kept tokens after the filter, each counted once).
Do not divide by CP anywhere, and reduce counts over DP x CP, not DP alone.

Mode A (recommended; exact with the sequence filter, whose kept count is only known after the
forward): TransformerConfig(calculate_per_token_loss=True) and a loss function returning
`megatron_loss_outputs(out)` = (loss_sum, num_tokens as int, reporting). Megatron then neither
divides by the micro-batch count nor by the count, its DDP sums (not averages) gradients over
DP x CP, and `finalize_model_grads` all-reduces the summed num_tokens over DP x CP and scales the
gradients by 1/N: exactly dL/dtheta. (Integer counts: token-mean only; for seq-mean-token-mean
use mode B.)

Mode B (calculate_per_token_loss=False, N known before the step, e.g. `global_token_count` of the
response masks, which ignores the filter): return the 2-tuple (loss, reporting) with
    loss = loss_sum * num_microbatches * DP / N        (`megatron_loss_outputs(out, global_denominator=N, ...)`)
because Megatron multiplies a 2-tuple loss by CP and divides it by num_microbatches, and its DDP
averages gradients over DP x CP: sum_r loss_sum_r * M*DP/N * CP/M / (DP*CP) = sum_r loss_sum_r / N.
(Megatron's 3-tuple path with calculate_per_token_loss=False divides each micro-batch by its own
local count: a mean of per-micro-batch means, the official code's behaviour, not a global mean.)
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.distributed as dist

from ..algo.losses import PolicyLossConfig, PolicyLossOutput, policy_loss
from .cp_future_kl import cp_future_kl
from .cp_shard import CPLayout


def cp_seq_sum_fn(cp_group: Optional[dist.ProcessGroup]):
    """seq_sum_fn for policy_loss: all-reduce(SUM) of a detached per-sequence vector over CP."""
    def seq_sum(per_seq: torch.Tensor) -> torch.Tensor:
        if per_seq.requires_grad:
            raise ValueError("seq_sum_fn only reduces detached per-sequence counts")
        out = per_seq.detach().clone()
        dist.all_reduce(out, op=dist.ReduceOp.SUM, group=cp_group)
        return out
    return seq_sum


def cp_policy_loss(log_prob: torch.Tensor, old_log_prob: torch.Tensor, advantages: torch.Tensor,
                   response_mask: torch.Tensor, cfg: PolicyLossConfig, layout: CPLayout,
                   cp_group: Optional[dist.ProcessGroup] = None, *,
                   ref_log_prob: Optional[torch.Tensor] = None) -> PolicyLossOutput:
    """policy_loss on this CP rank's [T/CP] tokens (zigzag order of `layout`), exact across ranks.

    With layout.cp_size == 1 no collective is made (cp_group is ignored). Collectives per call
    (CP > 1), identical on every CP rank whatever the data: one all_gather for the Future-KL (fipo),
    one all-reduce for the filter counts (fipo with a filter), one for seq-mean counts, one for
    the seq_filtered_frac metric (fipo with a filter).
    """
    if layout.cp_size == 1:
        return policy_loss(log_prob, old_log_prob, advantages, response_mask, cfg,
                           cu_seqlens=layout.local_cu_seqlens, ref_log_prob=ref_log_prob)

    def fkl(delta: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        return cp_future_kl(delta, mask, cfg.decay_rate, layout, cp_group, start=cfg.future_kl_start,
                            window=cfg.future_kl_window, average=cfg.future_kl_average)

    return policy_loss(log_prob, old_log_prob, advantages, response_mask, cfg, cu_seqlens=layout.local_cu_seqlens,
                       ref_log_prob=ref_log_prob, future_kl_fn=fkl, seq_sum_fn=cp_seq_sum_fn(cp_group))


def global_token_count(local_count, group: Optional[dist.ProcessGroup] = None) -> float:
    """Sum of a per-rank count (a number or a tensor, e.g. summed over micro-batches) over `group`.

    Pass Megatron's DP x CP group (parallel_state.get_data_parallel_group(with_context_parallel=True)).
    """
    t = torch.as_tensor(local_count, dtype=torch.float64).detach().reshape(()).clone()
    if dist.is_initialized():
        dist.all_reduce(t, op=dist.ReduceOp.SUM, group=group)
    return float(t)


def megatron_loss_outputs(out: PolicyLossOutput, *, global_denominator: Optional[float] = None,
                          num_microbatches: Optional[int] = None, dp_size: Optional[int] = None):
    """What a Megatron loss function should return (see the module docstring).

    No arguments: mode A (calculate_per_token_loss=True): (loss_sum, int num_tokens, reporting).
    With global_denominator, num_microbatches, dp_size: mode B: (scaled loss, reporting).
    reporting = {"loss_sum": ..., "num_tokens": ...} (detached; sum both over micro-batches and the
    DP x CP group, then divide, for the logged loss).
    """
    reporting = {"loss_sum": out.loss_sum.detach().clone(), "num_tokens": out.num_tokens.detach().clone()}
    if global_denominator is None:
        n = out.num_tokens.detach()
        if not torch.equal(n, n.round()):
            raise ValueError("calculate_per_token_loss needs integer token counts (token-mean); use mode B")
        return out.loss_sum, n.round().to(torch.int), reporting
    if num_microbatches is None or dp_size is None:
        raise ValueError("mode B needs num_microbatches and dp_size together with global_denominator")
    scale = num_microbatches * dp_size / max(float(global_denominator), 1.0)
    return out.loss_sum * scale, reporting


def all_reduce_metrics(out: PolicyLossOutput, group: Optional[dist.ProcessGroup] = None) -> dict[str, float]:
    """Exact means of the (sum, count) metrics and min / max extrema over `group` (e.g. DP x CP)."""
    names = sorted(out.metric_sums)
    res: dict[str, float] = {}
    if names:
        t = torch.tensor([[float(out.metric_sums[k][0]), float(out.metric_sums[k][1])] for k in names],
                         dtype=torch.float64)
        dist.all_reduce(t, group=group)
        res.update({k: (float(s / c) if c > 0 else 0.0) for k, (s, c) in zip(names, t.tolist())})
    for extrema, op in ((out.metric_mins, dist.ReduceOp.MIN), (out.metric_maxs, dist.ReduceOp.MAX)):
        keys = sorted(extrema)
        if keys:
            t = torch.tensor([float(extrema[k]) for k in keys], dtype=torch.float64)
            dist.all_reduce(t, op=op, group=group)
            res.update({k: (v if abs(v) != float("inf") else 0.0) for k, v in zip(keys, t.tolist())})
    return res


__all__ = ["cp_policy_loss", "cp_seq_sum_fn", "global_token_count", "megatron_loss_outputs", "all_reduce_metrics"]
