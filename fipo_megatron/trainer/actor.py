"""The Megatron side of RL training: old log-probs (forward only) and the policy update.

Contract:
- :class:`Actor` owns this rank's model chunks (Megatron DDP), optimizer and LR scheduler.
- Samples are :class:`fipo_megatron.parallel.packing.RLSample` (prompt ids, response ids, per-response
  advantage, engine log-probs; old / reference log-probs filled by :meth:`Actor.fill_log_probs`). Every
  rank passes the SAME full train batch; the split happens once, in :meth:`Actor.shares`: each DP rank
  owns its :func:`dp_shard` of every mini-batch, computes those samples' old (and reference) log-probs
  and trains on them; no log-prob crosses DP ranks (only metric sums do).
- Micro-batches are built by a token budget (``max_tokens_per_micro_batch``, dynamic batch size,
  ``parallel.packing.split_into_micro_batches``), optionally capped at ``--micro-batch-size``
  sequences, packed THD streams (``parallel.packing.MicroBatch``: ``PackedSeqParams``, zigzag
  context-parallel split, the exact CP loss ``parallel.cp_loss.cp_policy_loss``), run through
  Megatron's ``get_forward_backward_func`` (``megatron.schedule.forward_backward``). THD serves every
  path: Transformer Engine's attention where installed, ``megatron.attention.SDPAttention`` elsewhere.
- :meth:`Actor.compute_log_probs` (forward only, for checks and tools) returns EVERY sample's response
  log-probs on every rank (DP-sharded compute, all-gathered), plus the entropy (sum, count).
- State (the one place weights enter the actor's models): :meth:`Actor.load_initial_weights` (a
  model-only torch_dist checkpoint: ``--load`` or the automatic HF conversion),
  :meth:`Actor.load_checkpoint` (resume: model, optimizer state INCLUDING the fp32 main params,
  scheduler, RNG, reference source) and :meth:`Actor.save_checkpoint`. After weights are loaded without
  optimizer state, the mixed-precision optimizer's fp32 main params are refreshed from the model
  (``reload_model_params``, as Megatron-LM does); without that the first optimizer step would write the
  optimizer's copy of the random initialisation back into a bf16 model.
- With ``--kl-coef > 0`` the actor also holds ``ref_model``, the frozen initial policy
  (:mod:`fipo_megatron.trainer.reference`: no DDP, no optimizer, no grad, eval mode; filled by the
  load methods above). ``fill_log_probs(..., reference=True)`` / :meth:`Actor.compute_ref_log_probs`
  give its response log-probs; samples carry them as ``ref_log_prob`` and the loss adds
  ``kl_coef * k3`` per token; the update reports ``actor/kl_ref`` (mean k3 over response tokens).
- :meth:`Actor.update` runs ``ppo_epochs`` x (train batch / mini-batch) optimizer steps. Each
  micro-batch returns the loss SUM (``policy_loss(...).loss_sum``); after the backward of a whole
  mini-batch the gradients are divided by the mini-batch's kept-token count summed over all
  micro-batches and all DP (x CP) ranks, so the gradient is exactly that of the global token-mean
  (or global seq-mean-token-mean) loss of the mini-batch, whatever the micro-batching (the schedule
  makes the gradient the plain sum of micro-batch losses). Then gradient clipping (``clip_grad``,
  inside the Megatron optimizer) and the step. Metrics are reduced exactly ((sum, count) pairs,
  min/max) over micro-batches, mini-batches and DP ranks.
"""
from __future__ import annotations

import math
from typing import Any, Optional, Sequence

import torch
import torch.distributed as dist
from megatron.core import parallel_state as ps

from fipo_megatron.algo.loss_metrics import combine_metric_tensors, host_metrics
from fipo_megatron.megatron.logprobs import token_log_probs
from fipo_megatron.megatron.optim import build_optimizer
from fipo_megatron.megatron.qwen import build_model
from fipo_megatron.megatron.schedule import forward_backward
from fipo_megatron.models.rules import sequence_pad_multiple
from fipo_megatron.parallel.cp_loss import cp_policy_loss
from fipo_megatron.parallel.packing import MicroBatch, RLSample, split_into_micro_batches
from fipo_megatron.trainer.config import TrainConfig
from fipo_megatron.trainer.metrics import SumCount, comm_device


def dp_shard(samples: Sequence[Any], dp_size: int, dp_rank: int) -> list[Any]:
    """This DP rank's share: samples sorted by length (longest first), dealt round-robin (token balance);
    order within the share follows the input order."""
    return [samples[i] for i in _dp_indices(samples, dp_size, dp_rank)]


def _dp_indices(samples: Sequence[Any], dp_size: int, dp_rank: int) -> list[int]:
    """Indices (ascending) of :func:`dp_shard`'s share."""
    order = sorted(range(len(samples)), key=lambda i: (-_length(samples[i]), i))
    return sorted(order[dp_rank::dp_size])


def _length(s: Any) -> int:
    return len(s.prompt_ids) + len(s.response_ids)


class Actor:
    def __init__(self, cfg: TrainConfig, hf_config: dict) -> None:
        self.cfg = cfg
        self.hf_config = hf_config
        self.vocab_size = int(hf_config["vocab_size"])
        p, o, d = cfg.parallel, cfg.optim, cfg.data
        # --recompute-activations / --recompute-granularity / -method / -num-layers (Megatron-LM semantics)
        overrides: dict[str, Any] = cfg.recompute_overrides()
        self.model = build_model(hf_config, params_dtype=torch.bfloat16 if p.bf16 else torch.float32,
                                 wrap_ddp=True, use_distributed_optimizer=p.use_distributed_optimizer,
                                 seq_length=cfg.seq_length, **overrides)
        total_steps = max(1, cfg.run.train_iters * o.ppo_epochs * (d.global_batch_size // d.mini_batch_size))
        self.optimizer, self.scheduler = build_optimizer(
            self.model, lr=o.lr, min_lr=o.min_lr, weight_decay=o.weight_decay, adam_beta1=o.adam_beta1,
            adam_beta2=o.adam_beta2, clip_grad=o.clip_grad, use_distributed_optimizer=p.use_distributed_optimizer,
            lr_warmup_steps=o.lr_warmup_iters, lr_schedule="constant", train_steps=total_steps)
        self.ref_model: Optional[list] = None  # frozen initial policy for the KL penalty (trainer.reference)
        self.ref_source: Optional[str] = None  # where its weights were loaded from (the load methods)
        if cfg.loss.kl_coef > 0:
            from fipo_megatron.trainer.reference import build_reference

            self.ref_model = build_reference(cfg, hf_config)
        self.loss_cfg = cfg.loss
        self.pad_id = int(hf_config.get("pad_token_id") or 0)
        if not 0 <= self.pad_id < self.vocab_size:
            self.pad_id = 0

    # ------------------------------------------------------------------ state
    def load_initial_weights(self, path: str) -> None:
        """Start from the model-only torch_dist checkpoint ``path`` (collective): policy weights, then the
        optimizer's fp32 main params from them, then the reference (``--ref-load`` or ``path`` itself)."""
        from fipo_megatron.megatron.checkpoint import load_model_weights

        load_model_weights(path, self.model)
        self.optimizer.reload_model_params()
        self._load_reference(resumed_state=None, policy_init_dir=path)

    def load_checkpoint(self, root: str) -> tuple[int, dict]:
        """Resume from the latest training checkpoint under ``root`` (collective): model, optimizer (its
        state holds the fp32 main params, restored exactly, not re-derived from the bf16 weights), scheduler,
        RNG, reference. Returns (step, trainer state)."""
        from fipo_megatron.megatron.checkpoint import load_checkpoint

        loaded = load_checkpoint(root, self.model, self.optimizer, self.scheduler)
        if loaded is None:
            raise FileNotFoundError(f"{root} holds no training checkpoint")
        step, state = loaded
        self._load_reference(resumed_state=state, policy_init_dir=None)
        return int(step), state

    def save_checkpoint(self, root: str, step: int, trainer_state: dict) -> str:
        """Atomic training checkpoint of ``step`` under ``root`` (collective); records the reference's source."""
        from fipo_megatron.megatron.checkpoint import save_checkpoint

        state = dict(trainer_state)
        if self.ref_source:
            state["reference_init"] = self.ref_source
        return save_checkpoint(root, step, self.model, self.optimizer, self.scheduler, trainer_state=state)

    def _load_reference(self, *, resumed_state: Optional[dict], policy_init_dir: Optional[str]) -> None:
        """Fill the frozen reference (``--kl-coef > 0``) with the run's initial weights (collective)."""
        if self.ref_model is None:
            return
        from fipo_megatron.trainer.reference import load_reference, reference_source

        src = reference_source(self.cfg, resumed_state=resumed_state, policy_init_dir=policy_init_dir)
        load_reference(self.ref_model, src)
        self.ref_source = src

    # ------------------------------------------------------------------ groups
    @staticmethod
    def dp_group():
        return ps.get_data_parallel_group(with_context_parallel=True)

    @staticmethod
    def dp_size() -> int:
        return ps.get_data_parallel_world_size()

    @staticmethod
    def dp_rank() -> int:
        return ps.get_data_parallel_rank()

    # ------------------------------------------------------------------ micro-batches
    def _micro_batches(self, samples: Sequence[RLSample]) -> list[MicroBatch]:
        """Token-budget micro-batches of ``samples``: packed THD streams, this CP rank's zigzag share
        (``parallel.packing.MicroBatch``), checked on the host."""
        tp, cp = ps.get_tensor_model_parallel_world_size(), ps.get_context_parallel_world_size()
        groups = split_into_micro_batches(list(samples), self.cfg.optim.max_tokens_per_micro_batch,
                                          pad_multiple=sequence_pad_multiple(cp, tp),
                                          max_samples_per_micro_batch=self.cfg.max_samples_per_micro_batch)
        cp_group = ps.get_context_parallel_group() if cp > 1 else None
        mbs = [MicroBatch.pack(samples, idx, cp_size=cp, cp_rank=ps.get_context_parallel_rank(), tp_size=tp,
                               pad_token_id=self.pad_id, cp_group=cp_group) for idx in groups]
        for mb in mbs:
            _check_on_host(mb, self.vocab_size, engine=self.loss_cfg.corrects_rollout)
        return mbs

    def _policy_loss(self, logp: torch.Tensor, mb: MicroBatch):
        """FIPO/DAPO/GRPO loss of this CP rank's packed tokens of one micro-batch (exact under CP)."""
        li = mb.loss_inputs()
        ref = li.get("ref_log_prob") if self.loss_cfg.kl_coef > 0 else None
        if self.loss_cfg.kl_coef > 0 and ref is None:
            raise ValueError("kl_coef > 0 needs every sample's ref_log_prob "
                             "(Actor.fill_log_probs(reference=True))")
        engine = li.get("engine_log_prob") if self.loss_cfg.corrects_rollout else None
        if self.loss_cfg.corrects_rollout and engine is None:
            raise ValueError("--rollout-is / --rollout-mask need the rollout engine's log-probs of every sample "
                             "(RLSample.engine_log_prob)")
        # Padding / prompt positions carry no loss; zero them so that whatever the attention kernel
        # leaves there (TE's THD path does not define padded outputs) cannot trip a NaN.
        mask = li["response_mask"].reshape(logp.shape).bool()
        logp = torch.where(mask, logp, torch.zeros((), dtype=logp.dtype, device=logp.device))
        return cp_policy_loss(logp.reshape(-1), li["old_log_prob"].reshape(-1), li["advantages"].reshape(-1),
                              li["response_mask"].reshape(-1), self.loss_cfg, li["cp_layout"], mb.cp_group,
                              ref_log_prob=None if ref is None else ref.reshape(-1),
                              engine_log_prob=None if engine is None else engine.reshape(-1),
                              validate_values=False)  # checked on the host (_check_on_host)

    # ------------------------------------------------------------------ forward only
    def shares(self, samples: Sequence[RLSample], samples_per_mini_batch: int) -> list[list[RLSample]]:
        """This DP rank's share (:func:`dp_shard`) of every mini-batch of ``samples`` (mini-batch j =
        samples[j*k:(j+1)*k]); a mini-batch with fewer samples than DP ranks is skipped. The one split of a
        step: old / reference log-probs and the update use the same shares."""
        dp, rank = self.dp_size(), self.dp_rank()
        minis = [samples[i:i + samples_per_mini_batch] for i in range(0, len(samples), samples_per_mini_batch)]
        return [dp_shard(mini, dp, rank) if len(mini) >= dp else [] for mini in minis]

    @torch.no_grad()
    def fill_log_probs(self, samples: Sequence[RLSample], samples_per_mini_batch: int, *,
                       reference: bool = False) -> dict[str, float]:
        """Old (or, with ``reference``, frozen-reference) log-probs of this rank's :meth:`shares`, stored on
        those samples (``old_log_prob`` / ``ref_log_prob``). No log-prob leaves the rank. Returns the
        rollout metrics, reduced over DP as (sum, count) pairs and maxima: ``rollout/entropy`` and the
        train-vs-engine mismatch ``rollout/logprob_abs_diff_mean|max``, ``rollout/engine_train_kl``
        (mean of engine - train log-prob; samples without engine log-probs are left out); none for the
        reference."""
        if reference and (self.ref_model is None or self.ref_source is None):
            raise RuntimeError("no loaded reference model: it is kept only with --kl-coef > 0 and filled by the "
                               "Actor's load methods")
        local = [s for share in self.shares(samples, samples_per_mini_batch) for s in share]
        lps, ent_sum, ent_cnt = (self._local_log_probs(local, self.ref_model if reference else self.model, reference)
                                 if local else ([], 0.0, 0.0))
        acc, worst = SumCount(), 0.0
        for s, lp in zip(local, lps):
            if reference:
                s.ref_log_prob = lp
                continue
            s.old_log_prob = lp
            if s.engine_log_prob is not None and len(s.engine_log_prob) == len(lp):
                d = torch.as_tensor(s.engine_log_prob, dtype=torch.float64) - lp.double()
                acc.add("rollout/logprob_abs_diff_mean", float(d.abs().sum()), d.numel())
                acc.add("rollout/engine_train_kl", float(d.sum()), d.numel())
                worst = max(worst, float(d.abs().max()) if d.numel() else 0.0)
        if reference:
            return {}
        acc.add("rollout/entropy", ent_sum, ent_cnt)
        out = acc.reduce(ps.get_data_parallel_group())
        out.update(_reduce_extrema({}, {"rollout/logprob_abs_diff_max": worst}, ps.get_data_parallel_group()))
        return out

    @torch.no_grad()
    def compute_log_probs(self, samples: Sequence[RLSample]) -> tuple[list[torch.Tensor], float, float]:
        """Every sample's response log-probs under the current weights (DP-sharded compute, gathered to every
        rank: for checks and tools; the training loop uses :meth:`fill_log_probs`, which keeps them local),
        plus (entropy sum, token count) over all samples."""
        return self._gathered_log_probs(samples, self.model)

    @torch.no_grad()
    def compute_ref_log_probs(self, samples: Sequence[RLSample]) -> list[torch.Tensor]:
        """Every sample's response log-probs under the frozen reference (the initial weights), same
        sharding and gathering as :meth:`compute_log_probs`. Needs ``--kl-coef > 0`` and loaded weights."""
        if self.ref_model is None:
            raise RuntimeError("no reference model: it is kept only with --kl-coef > 0")
        if self.ref_source is None:
            raise RuntimeError("the reference model's weights were never loaded (Actor.load_initial_weights / "
                               "Actor.load_checkpoint load them)")
        return self._gathered_log_probs(samples, self.ref_model, reference=True)[0]

    def _gathered_log_probs(self, samples: Sequence[RLSample], model: list,
                            reference: bool = False) -> tuple[list[torch.Tensor], float, float]:
        dp, rank = self.dp_size(), self.dp_rank()
        mine = _dp_indices(samples, dp, rank)
        local_lp, ent_sum, count = (self._local_log_probs([samples[i] for i in mine], model, reference) if mine
                                    else ([], 0.0, 0.0))
        if dp > 1:
            box: list = [None] * dp
            dist.all_gather_object(box, (mine, [t.tolist() for t in local_lp], ent_sum, count),
                                   group=ps.get_data_parallel_group())
        else:
            box = [(mine, local_lp, ent_sum, count)]
        out: list[Optional[torch.Tensor]] = [None] * len(samples)
        ent_sum = count = 0.0
        for idx, lps, e, c in box:
            for i, lp in zip(idx, lps):
                out[i] = torch.as_tensor(lp, dtype=torch.float32)
            ent_sum += e
            count += c
        return out, ent_sum, count  # type: ignore[return-value]

    def _local_log_probs(self, samples: Sequence[RLSample], model: list,
                         reference: bool = False) -> tuple[list[torch.Tensor], float, float]:
        """This replica's samples' response log-probs under ``model`` (+ entropy, skipped for the reference)."""
        for chunk in model:
            chunk.eval()
        mbs = self._micro_batches(samples)

        def loss_fn(mb, logits):  # everything stays on the device: one host transfer after the schedule
            li = mb.loss_inputs()
            mask = li["response_mask"]
            if reference:
                logp = token_log_probs(logits, li["labels"], true_vocab_size=self.vocab_size)
                ent_sum = mask.new_zeros((), dtype=torch.float32)
            else:
                logp, ent = token_log_probs(logits, li["labels"], true_vocab_size=self.vocab_size, with_entropy=True)
                ent_sum = (ent * mask).sum()
            return logits.new_zeros(()), {"log_probs": logp.detach().float(),
                                          "entropy": torch.stack([ent_sum.float(), mask.sum().float()])}

        stats = forward_backward(model, mbs, loss_fn, forward_only=True)
        flat = torch.cat([torch.cat([st["log_probs"].reshape(-1).to(torch.float64), st["entropy"].double()])
                          for st in stats]).cpu()  # the one device -> host transfer
        out: list[Optional[torch.Tensor]] = [None] * len(samples)
        ent_sum = count = 0.0
        offset = 0
        for mb, st in zip(mbs, stats):
            n = st["log_probs"].numel()
            local = flat[offset:offset + n].float()
            e, c = flat[offset + n:offset + n + 2].tolist()
            offset += n + 2
            per_sample = [r.cpu() for r in mb.responses(local.to(comm_device()))]  # CP: all-gathered
            for i, lp in zip(mb.indices, per_sample):
                out[i] = lp.clone()
            ent_sum += e
            count += c
        if ps.get_context_parallel_world_size() > 1:  # entropy sums are per CP shard
            t = torch.tensor([ent_sum, count], dtype=torch.float64, device=comm_device())
            dist.all_reduce(t, group=ps.get_context_parallel_group())
            ent_sum, count = float(t[0]), float(t[1])
        if not reference:  # the reference stays in eval mode for good
            for chunk in model:
                chunk.train()
        return out, ent_sum, count  # type: ignore[return-value]

    # ------------------------------------------------------------------ update
    def update(self, samples: Sequence[RLSample], samples_per_mini_batch: int) -> dict[str, float]:
        """PPO epochs over ``samples`` (the FULL train batch, identical on every rank, grouped by prompt).

        Mini-batch j = samples[j*k:(j+1)*k] (k = ``samples_per_mini_batch``); each DP rank trains on its
        :meth:`shares` (whose ``old_log_prob`` :meth:`fill_log_probs` filled). Returns the reduced metrics
        (``actor/*``), among them
        ``actor/on_policy_ppo_kl``: the ppo_kl of the first mini-batch of the first epoch, which runs on
        the weights that computed the old log-probs and must be ~0 (a health check of weight loading
        and numerics; ``actor/ppo_kl`` averages over every mini-batch).
        """
        acc = SumCount()
        mins: dict[str, float] = {}
        maxs: dict[str, float] = {}
        n_steps = n_skipped = 0
        shares = self.shares(samples, samples_per_mini_batch)
        for _ in range(self.cfg.optim.ppo_epochs):
            for share in shares:
                if not share:  # fewer samples than DP ranks
                    n_skipped += 1
                    continue
                lr, grad_norm = self._optimizer_step(share, acc, mins, maxs, on_policy=n_steps == 0)
                n_steps += 1
                if grad_norm is not None:
                    acc.add_mean("actor/grad_norm", grad_norm)  # the same on every rank
                acc.add_mean("actor/lr", lr)
        metrics = acc.reduce(self.dp_group())
        metrics.update(_reduce_extrema(mins, maxs, self.dp_group()))
        metrics["actor/num_optimizer_steps"] = float(n_steps)
        metrics["actor/num_skipped_mini_batches"] = float(n_skipped)
        return metrics

    def _optimizer_step(self, local: Sequence[RLSample], acc: SumCount, mins: dict[str, float],
                        maxs: dict[str, float], on_policy: bool = False) -> tuple[float, Optional[float]]:
        """One optimizer step on this rank's ``local`` samples; adds the micro-batches' metrics (``actor/*``)
        to ``acc`` / ``mins`` / ``maxs``. Returns (lr used, grad norm or None).

        The micro-batches' losses and metrics stay on the device; after the backward they are combined
        there and read with ONE host transfer (together with the global token count), before the
        optimizer step: a non-finite loss stops the run with nothing applied."""
        for chunk in self.model:
            chunk.zero_grad_buffer()
        self.optimizer.zero_grad()
        lr = float(self.optimizer.param_groups[0]["lr"])
        mbs = self._micro_batches(local)

        def loss_fn(mb, logits):
            li = mb.loss_inputs()
            logp, ent = token_log_probs(logits, li["labels"], true_vocab_size=self.vocab_size, with_entropy=True)
            out = self._policy_loss(logp, mb)
            mask = li["response_mask"]
            own = torch.stack([(ent * mask).sum().double(), mask.sum().double(),
                               out.loss_sum.detach().double(), out.num_tokens.double()])
            return out.loss_sum, {"metrics": out.metric_tensors, "own": own}

        stats = forward_backward(self.model, mbs, loss_fn, forward_only=False)
        combined = combine_metric_tensors([st["metrics"] for st in stats])
        own = torch.stack([st["own"] for st in stats]).sum(0)
        n_tok = own[3:4].to(comm_device(), copy=True)  # reduced in place; own keeps the local count
        if dist.is_initialized():
            dist.all_reduce(n_tok, group=self.dp_group())
        host = torch.cat([n_tok.cpu().reshape(-1), own.cpu(), combined.values.cpu().reshape(-1)]).tolist()
        n_tok_global, (ent_sum, ent_cnt, loss_sum, loss_cnt) = host[0], host[1:5]
        if not math.isfinite(loss_sum):
            raise FloatingPointError(f"the policy loss of this mini-batch is {loss_sum} (non-finite log-probs from "
                                     "the model?); no optimizer step was taken")
        _, sums, mb_mins, mb_maxs = host_metrics(combined.names, combined.kinds,
                                                 [host[5 + 2 * i:7 + 2 * i] for i in range(len(combined.names))])
        for chunk in self.model:
            chunk.scale_gradients(1.0 / n_tok_global if n_tok_global > 0 else 0.0)
        ok, grad_norm, _ = self.optimizer.step()
        if ok:
            self.scheduler.step(increment=1)
        sums["entropy"] = (ent_sum, ent_cnt)
        sums["pg_loss"] = (loss_sum, loss_cnt)
        if "kl_penalty" in sums:  # mean k3 KL to the frozen reference over response tokens
            sums["kl_ref"] = sums["kl_penalty"]
        if on_policy:
            sums["on_policy_ppo_kl"] = sums["ppo_kl"]
        acc.add_pairs(sums, "actor/")
        for k, v in mb_mins.items():
            mins["actor/" + k] = min(mins.get("actor/" + k, math.inf), v)
        for k, v in mb_maxs.items():
            maxs["actor/" + k] = max(maxs.get("actor/" + k, -math.inf), v)
        return lr, None if grad_norm is None else float(grad_norm)

    # ------------------------------------------------------------------ weights
    def hf_tensors(self):
        """Stream of (HF name, full tensor) built from the live model (collective: every rank iterates)."""
        from fipo_megatron.convert.live import iter_hf_tensors_from_model

        return iter_hf_tensors_from_model(self.model)


def _check_on_host(mb: MicroBatch, vocab_size: int, engine: bool = False) -> None:
    """Check a micro-batch's inputs while they are still on the host (free), so that the loss needs no
    device reads: token ids in [0, vocab), finite old / reference (and, with ``engine``, the rollout
    engine's) log-probs and advantages, 0/1 masks."""
    li = {"tokens": mb.batch.tokens, **mb.loss_inputs()}
    for name in ("tokens", "labels"):
        t = li[name]
        if t.numel() and (int(t.min()) < 0 or int(t.max()) >= vocab_size):
            raise ValueError(f"{name} hold ids outside [0, {vocab_size}): min {int(t.min())}, max {int(t.max())}")
    for name in ("advantages", "old_log_prob", "ref_log_prob") + (("engine_log_prob",) if engine else ()):
        if name in li and not bool(torch.isfinite(li[name]).all()):
            raise ValueError(f"{name} contains NaN or inf")
    mask = li["response_mask"]
    if mask.dtype != torch.bool and not bool(((mask == 0) | (mask == 1)).all()):
        raise ValueError("response_mask must contain only 0 and 1")


def _reduce_extrema(mins: dict[str, float], maxs: dict[str, float], group) -> dict[str, float]:
    """MIN / MAX all-reduce of named extrema (names unioned across ranks); infinities -> dropped."""
    out: dict[str, float] = {}
    for table, op, ident in ((mins, dist.ReduceOp.MIN, math.inf), (maxs, dist.ReduceOp.MAX, -math.inf)):
        names = sorted(table)
        if dist.is_initialized() and dist.get_world_size(group) > 1:
            gathered: list = [None] * dist.get_world_size(group)
            dist.all_gather_object(gathered, names, group=group)
            names = sorted(set().union(*gathered))
            t = torch.tensor([table.get(n, ident) for n in names], dtype=torch.float64, device=comm_device())
            if names:
                dist.all_reduce(t, op=op, group=group)
            vals = t.cpu().tolist()
        else:
            vals = [table[n] for n in names]
        out.update({n: v for n, v in zip(names, vals) if math.isfinite(v)})
    return out
