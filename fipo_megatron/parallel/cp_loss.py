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

Normalisation (the only one the trainer uses): global token mean
    L = (sum_{DP x CP x micro-batches} loss_sum) / N,   N = sum_{DP x CP x micro-batches} num_tokens
(kept tokens after the sequence filter, each counted once). The trainer's loss function returns the
raw `loss_sum`; `megatron.schedule.forward_backward` cancels Megatron's own micro-batch and DDP
scaling so the accumulated gradient is d(sum of loss_sum)/dtheta; after the backward pass the
trainer all-reduces N over the DP x CP group (`global_token_count` does it for callers that want a
float; the actor folds it into its one host transfer per step) and scales the gradients by 1/N.
N is known only after the forward (the filter drops responses), which is why the division happens
on the gradients and not inside the loss. Never divide by CP, and reduce counts over DP x CP, not
DP alone: each CP rank holds a disjoint part of every sequence's tokens.
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
                   ref_log_prob: Optional[torch.Tensor] = None, engine_log_prob: Optional[torch.Tensor] = None,
                   validate_values: bool = True) -> PolicyLossOutput:
    """policy_loss on this CP rank's [T/CP] tokens (zigzag order of `layout`), exact across ranks.
    ``engine_log_prob`` and ``validate_values`` as in ``policy_loss``.

    With layout.cp_size == 1 no collective is made (cp_group is ignored). Collectives per call
    (CP > 1), identical on every CP rank whatever the data: one all_gather for the Future-KL (fipo),
    one all-reduce for the filter counts (fipo with a filter), one for seq-mean counts, one for
    the seq_filtered_frac metric (fipo with a filter), and one or two for the per-response ratios of a
    sequence-level rollout importance sampling / mask.
    """
    if layout.cp_size == 1:
        return policy_loss(log_prob, old_log_prob, advantages, response_mask, cfg,
                           cu_seqlens=layout.local_cu_seqlens, ref_log_prob=ref_log_prob,
                           engine_log_prob=engine_log_prob, validate_values=validate_values)

    def fkl(delta: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        return cp_future_kl(delta, mask, cfg.decay_rate, layout, cp_group, start=cfg.future_kl_start,
                            window=cfg.future_kl_window, average=cfg.future_kl_average)

    return policy_loss(log_prob, old_log_prob, advantages, response_mask, cfg, cu_seqlens=layout.local_cu_seqlens,
                       ref_log_prob=ref_log_prob, engine_log_prob=engine_log_prob, future_kl_fn=fkl,
                       seq_sum_fn=cp_seq_sum_fn(cp_group),
                       validate_values=validate_values)


def global_token_count(local_count, group: Optional[dist.ProcessGroup] = None,
                       device: Optional[torch.device] = None) -> float:
    """Sum of a per-rank count (a number or a tensor, e.g. summed over micro-batches) over `group`.

    Pass Megatron's DP x CP group (parallel_state.get_data_parallel_group(with_context_parallel=True))
    and, with NCCL, the current CUDA device.
    """
    t = torch.as_tensor(local_count, dtype=torch.float64).detach().reshape(()).clone().to(device or "cpu")
    if dist.is_initialized():
        dist.all_reduce(t, op=dist.ReduceOp.SUM, group=group)
    return float(t)


__all__ = ["cp_policy_loss", "cp_seq_sum_fn", "global_token_count"]
