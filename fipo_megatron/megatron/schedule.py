"""Forward/backward over a list of micro-batches with Megatron's pipeline schedules.

`forward_backward(model_chunks, micro_batches, loss_fn, forward_only=...)` wraps
`megatron.core.pipeline_parallel.get_forward_backward_func()` (no pipelining at PP=1, 1F1B at
PP>1; interleaved when there are several chunks).

Micro-batches: the SAME list on every rank of a pipeline, each either
- a `parallel.packing.MicroBatch` (what the trainer uses): the model gets `mb.model_inputs()`,
  `loss_fn` gets the micro-batch itself; on GPU `mb.to(device)` moves it first; or
- a dict of tensors (the first stage reads `tokens` [b, s], `position_ids`, `attention_mask` /
  `packed_seq_params`; the last stage passes the whole dict to `loss_fn`); on GPU its tensor entries
  are moved to the current device. `attention_mask` defaults to a causal mask where the attention
  needs one (see `qwen.forward_logits`).

loss_fn(batch, output) -> (loss, stats): `output` is the last stage's vocab-parallel logits
[b, s, V/tp]; `loss` a scalar tensor; `stats` a dict (floats / detached tensors).

GRADIENT CONTRACT (exact, independent of Megatron's internal scaling): after `forward_backward`
and the gradient reduction in `finalize_model_grads` (run by the schedule when
`optim.build_optimizer` has set it up), the main gradient equals

        d/d(params) of  SUM over DP x CP ranks and micro-batches of `loss`.

How: with `config.calculate_per_token_loss=False` (what `qwen.transformer_config_from_hf`
sets), Megatron multiplies a 2-tuple loss by cp_size / num_microbatches and DDP averages
gradients over the DP x CP group (x 1/dp_cp_size); this wrapper multiplies `loss` by
num_microbatches * dp_cp_size / cp_size before handing it to Megatron, which cancels both.
So a caller that wants grad = d(sum of token losses over the whole mini-batch) / global_token_count
returns `loss = loss_sum_of_this_micro_batch / global_token_count`, with global_token_count
counted over all micro-batches and DP x CP ranks of the mini-batch (e.g. all-reduced first).
The reported stats are NOT scaled.

Returns: on the last pipeline stage the list of per-micro-batch `stats` dicts (in order); other
stages get the same list when `broadcast_stats=True` (default), else an empty list.
"""
from __future__ import annotations

from typing import Any, Callable

import torch
import torch.distributed as dist
from megatron.core import parallel_state as ps
from megatron.core.pipeline_parallel import get_forward_backward_func

from fipo_megatron.megatron.qwen import forward_logits

LossFn = Callable[[dict, torch.Tensor], "tuple[torch.Tensor, dict]"]

__all__ = ["forward_backward", "loss_scale_factor"]


def loss_scale_factor(num_microbatches: int) -> float:
    """The factor applied to each micro-batch loss to cancel Megatron's scaling (see module doc)."""
    dp_cp = ps.get_data_parallel_world_size(with_context_parallel=True)
    cp = ps.get_context_parallel_world_size()
    return float(num_microbatches) * dp_cp / cp


def _to_device(batch):
    """On GPU, move the micro-batch's CPU tensors to the current device (CPU runs: unchanged)."""
    if not torch.cuda.is_available():
        return batch
    import dataclasses

    from megatron.core.packed_seq_params import PackedSeqParams

    dev = torch.device("cuda", torch.cuda.current_device())
    if not isinstance(batch, dict):  # a MicroBatch
        return batch.to(dev, non_blocking=True)
    out = {k: (v.to(dev, non_blocking=True) if isinstance(v, torch.Tensor) else v) for k, v in batch.items()}
    psp = out.get("packed_seq_params")
    if isinstance(psp, PackedSeqParams):  # TE needs the int32 cu_seqlens* on the GPU too
        out["packed_seq_params"] = dataclasses.replace(psp, **{
            f.name: getattr(psp, f.name).to(dev) for f in dataclasses.fields(psp)
            if isinstance(getattr(psp, f.name), torch.Tensor)})
    return out


def _stats_to_cpu(obj):
    """A stats structure with every tensor moved to the CPU (dataclasses, dicts, lists, tuples)."""
    import dataclasses

    if isinstance(obj, torch.Tensor):
        return obj.cpu()
    if isinstance(obj, dict):
        return {k: _stats_to_cpu(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return type(obj)(_stats_to_cpu(v) for v in obj)
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        return dataclasses.replace(obj, **{f.name: _stats_to_cpu(getattr(obj, f.name))
                                           for f in dataclasses.fields(obj)})
    return obj


def _inputs(batch) -> dict:
    """The model inputs of a micro-batch (a dict, or a MicroBatch's ``model_inputs()``)."""
    return batch if isinstance(batch, dict) else batch.model_inputs()


def _model_config(chunk: torch.nn.Module):
    from fipo_megatron.megatron.qwen import unwrap_model

    return unwrap_model(chunk).config


def forward_backward(model_chunks: list[torch.nn.Module], micro_batches: list[dict[str, Any]], loss_fn: LossFn, *,
                     forward_only: bool = False, seq_length: int | None = None, micro_batch_size: int | None = None,
                     broadcast_stats: bool = True) -> list[dict]:
    """Run all micro-batches through the pipeline schedule; see the module docstring."""
    if not micro_batches:
        raise ValueError("forward_backward needs at least one micro-batch")
    for i, mb in enumerate(micro_batches):
        if isinstance(mb, dict) and "tokens" not in mb:
            raise ValueError(f"micro-batch {i} has no 'tokens' entry")
    config = _model_config(model_chunks[0])
    if getattr(config, "calculate_per_token_loss", False):
        raise ValueError("forward_backward expects config.calculate_per_token_loss=False (its loss scaling "
                         "contract relies on it)")
    n_mb = len(micro_batches)
    scale = loss_scale_factor(n_mb)
    if seq_length is None:
        seq_length = max(int(_inputs(mb)["tokens"].shape[1]) for mb in micro_batches)
    if micro_batch_size is None:
        micro_batch_size = int(_inputs(micro_batches[0])["tokens"].shape[0])

    def loss_func(batch, output_tensor):
        loss, stats = loss_fn(batch, output_tensor)
        if not isinstance(loss, torch.Tensor) or loss.numel() != 1:
            raise ValueError("loss_fn must return (scalar loss tensor, stats dict)")
        return loss.reshape(()) * scale, dict(stats)

    def forward_step(data_iterator, model):
        batch = _to_device(next(data_iterator))
        inputs = _inputs(batch)
        output = forward_logits(model, inputs["tokens"], inputs.get("position_ids"), inputs.get("attention_mask"),
                                inputs.get("packed_seq_params"))
        return output, (lambda out, _b=batch: loss_func(_b, out))

    n_chunks = len(model_chunks)
    if n_chunks == 1:
        data_iterator: Any = iter(micro_batches)
    else:
        data_iterator = [iter(micro_batches) for _ in range(n_chunks)]
    fb = get_forward_backward_func()
    stats = fb(forward_step_func=forward_step, data_iterator=data_iterator,
               model=model_chunks,
               num_microbatches=n_mb, seq_length=seq_length, micro_batch_size=micro_batch_size,
               forward_only=forward_only)
    stats = list(stats) if ps.is_pipeline_last_stage(ignore_virtual=True) else []
    if broadcast_stats and ps.get_pipeline_model_parallel_world_size() > 1:
        stats = [_stats_to_cpu(st) for st in stats]  # pickled below: device tensors would name this rank's GPU
        obj = [stats]
        src = ps.get_pipeline_model_parallel_last_rank()
        dist.broadcast_object_list(obj, src=src, group=ps.get_pipeline_model_parallel_group())
        stats = obj[0]
    return stats
