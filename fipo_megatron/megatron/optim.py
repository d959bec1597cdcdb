"""Megatron DDP + (distributed) optimizer + LR scheduler, and one optimizer step.

- `wrap_ddp(model_chunks, use_distributed_optimizer=True)`: Megatron `DistributedDataParallel`
  (fp32 grad reduction, no overlap) around each chunk; grads live in contiguous buffers.
- `build_optimizer(model_chunks, lr=..., ...)` -> `(optimizer, scheduler)`: `get_megatron_optimizer`
  with an `OptimizerConfig` (AdamW: decoupled weight decay; `clip_grad` = global grad-norm clip
  over all TP/PP/DP ranks; bf16/fp16 taken from the model config, fp32 main params) and an
  `OptimizerParamScheduler` counted in OPTIMIZER STEPS (warm-up `lr_warmup_steps` from 0,
  then "constant" / "linear" / "cosine" decay to `min_lr` over `lr_decay_steps`). It also sets
  `config.finalize_model_grads_func` (DP/CP grad reduction, tied-embedding sync across PP) and
  `config.grad_scale_func` (fp16 loss scaling) on the model config, as Megatron-LM does.
- `train_step(model_chunks, optimizer, scheduler, micro_batches, loss_fn)`: zero grad buffers,
  `schedule.forward_backward`, optimizer step (grad clip inside), scheduler step when the update
  was applied. Returns {"stats": per-micro-batch stats, "grad_norm", "lr", "update_successful",
  "num_zeros_in_grad"}. Gradient semantics: see `schedule` (grad = d(sum of returned losses)).
"""
from __future__ import annotations

from typing import Any

import torch
from megatron.core.distributed import DistributedDataParallel, DistributedDataParallelConfig, finalize_model_grads
from megatron.core.optimizer import OptimizerConfig, get_megatron_optimizer
from megatron.core.optimizer_param_scheduler import OptimizerParamScheduler

from fipo_megatron.megatron.qwen import unwrap_model
from fipo_megatron.megatron.schedule import LossFn, forward_backward

__all__ = ["wrap_ddp", "build_optimizer", "train_step"]


def wrap_ddp(model_chunks: list[torch.nn.Module], *, use_distributed_optimizer: bool = True,
             bucket_size: int | None = None) -> list[DistributedDataParallel]:
    """Wrap each chunk in Megatron DDP (idempotent for already wrapped chunks)."""
    out = []
    for i, chunk in enumerate(model_chunks):
        if isinstance(chunk, DistributedDataParallel):
            out.append(chunk)
            continue
        config = unwrap_model(chunk).config
        ddp_config = DistributedDataParallelConfig(
            grad_reduce_in_fp32=True, overlap_grad_reduce=False, overlap_param_gather=False,
            use_distributed_optimizer=use_distributed_optimizer, check_for_nan_in_grad=False,
            bucket_size=bucket_size)
        # Only the first chunk may skip bucketing (Megatron-LM rule for virtual pipelines).
        out.append(DistributedDataParallel(config=config, ddp_config=ddp_config, module=chunk,
                                           disable_bucketing=i > 0))
    return out


def build_optimizer(model_chunks: list[torch.nn.Module], *, lr: float, weight_decay: float = 0.0,
                    adam_beta1: float = 0.9, adam_beta2: float = 0.999, adam_eps: float = 1e-8,
                    clip_grad: float = 1.0, use_distributed_optimizer: bool = True, lr_warmup_steps: int = 0,
                    lr_schedule: str = "constant", min_lr: float = 0.0, lr_decay_steps: int | None = None,
                    train_steps: int | None = None) -> tuple[Any, OptimizerParamScheduler]:
    """Build the Megatron optimizer and LR scheduler for DDP-wrapped `model_chunks` (see module doc)."""
    for i, chunk in enumerate(model_chunks):
        if not isinstance(chunk, DistributedDataParallel):
            raise TypeError(f"model chunk {i} is not wrapped in megatron DistributedDataParallel: "
                            f"build it with build_model(..., wrap_ddp=True) or call optim.wrap_ddp")
        if chunk.ddp_config.use_distributed_optimizer != use_distributed_optimizer:
            raise ValueError(f"model chunk {i} was wrapped with use_distributed_optimizer="
                             f"{chunk.ddp_config.use_distributed_optimizer}, build_optimizer got "
                             f"{use_distributed_optimizer}")
    if lr_schedule not in ("constant", "linear", "cosine"):
        raise ValueError(f"lr_schedule must be 'constant', 'linear' or 'cosine', got {lr_schedule!r}")
    if lr_warmup_steps < 0 or lr < 0 or min_lr < 0:
        raise ValueError(f"invalid lr settings: lr={lr}, min_lr={min_lr}, lr_warmup_steps={lr_warmup_steps}")
    mcfg = unwrap_model(model_chunks[0]).config
    ocfg = OptimizerConfig(
        optimizer="adam", lr=lr, min_lr=min_lr, weight_decay=weight_decay, adam_beta1=adam_beta1,
        adam_beta2=adam_beta2, adam_eps=adam_eps, clip_grad=clip_grad, bf16=mcfg.bf16, fp16=mcfg.fp16,
        params_dtype=mcfg.params_dtype, use_distributed_optimizer=use_distributed_optimizer)
    optimizer = get_megatron_optimizer(config=ocfg, model_chunks=model_chunks)
    decay_steps = lr_decay_steps or train_steps or max(lr_warmup_steps + 1, 1)
    if decay_steps <= lr_warmup_steps and lr_schedule != "constant":
        raise ValueError(f"lr_decay_steps ({decay_steps}) must exceed lr_warmup_steps ({lr_warmup_steps})")
    scheduler = OptimizerParamScheduler(
        optimizer=optimizer, init_lr=0.0 if lr_warmup_steps > 0 else lr, max_lr=lr,
        min_lr=min(min_lr, lr),
        lr_warmup_steps=lr_warmup_steps, lr_decay_steps=max(decay_steps, lr_warmup_steps + 1),
        lr_decay_style=lr_schedule, start_wd=weight_decay, end_wd=weight_decay,
        wd_incr_steps=max(decay_steps, 1), wd_incr_style="constant")
    for chunk in model_chunks:
        cfg = unwrap_model(chunk).config
        cfg.finalize_model_grads_func = finalize_model_grads
        cfg.grad_scale_func = optimizer.scale_loss
    return optimizer, scheduler


def train_step(model_chunks: list[torch.nn.Module], optimizer: Any, scheduler: OptimizerParamScheduler,
               micro_batches: list[dict], loss_fn: LossFn, *, seq_length: int | None = None,
               micro_batch_size: int | None = None) -> dict[str, Any]:
    """One optimizer step over `micro_batches` (zero grads, forward/backward, step, schedule)."""
    for chunk in model_chunks:
        chunk.zero_grad_buffer()
    optimizer.zero_grad()
    lr = float(optimizer.param_groups[0]["lr"])  # the lr this step applies
    stats = forward_backward(model_chunks, micro_batches, loss_fn, forward_only=False, seq_length=seq_length,
                             micro_batch_size=micro_batch_size)
    update_successful, grad_norm, num_zeros = optimizer.step()
    if update_successful:
        scheduler.step(increment=1)
    return {"stats": stats, "grad_norm": None if grad_norm is None else float(grad_norm),
            "lr": lr, "update_successful": bool(update_successful),
            "num_zeros_in_grad": num_zeros}
