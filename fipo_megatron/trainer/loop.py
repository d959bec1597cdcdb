"""The RL driver loop: rollout -> score -> filter -> advantages -> old (+ ref) log-probs -> updates -> weight sync.

:func:`train` reads top to bottom. Roles: every rank holds its Megatron shard; global rank 0 also
owns the rollout engine, generates and scores the whole train batch and broadcasts it (with the
prompt sampler's state) to every rank; each data-parallel replica then trains on its share of every
mini-batch (``actor.dp_shard``). Weights go back to the engine after every step (a collective
stream of HF-named tensors, bucketed), so the next rollout samples from the updated policy.
"""
from __future__ import annotations

import os
import time
from typing import Any, Optional

import torch
import torch.distributed as dist

from fipo_megatron.trainer.config import TrainConfig
from fipo_megatron.trainer.metrics import PhaseTimer, finite_or_raise


def _broadcast(obj: Any) -> Any:
    box = [obj]
    dist.broadcast_object_list(box, src=0)  # NCCL: staged through the current device by torch itself
    return box[0]


def _to_rl_samples(samples):
    from fipo_megatron.parallel.packing import RLSample

    return [RLSample(s.prompt_ids, s.response_ids, advantage=s.advantage, engine_log_prob=s.engine_log_probs)
            for s in samples]


def run_eval(cfg: TrainConfig, engine, eval_sets: dict, tokenizer, reward_fn, step: int) -> Optional[dict]:
    """Evaluate on every held-out set (rank 0; other ranks return None)."""
    from fipo_megatron.eval.runner import evaluate

    if engine is None or not eval_sets:
        return None
    e, out = cfg.eval, {}
    for name, ds in eval_sets.items():
        items = ds if e.eval_max_prompts is None else [ds[i] for i in range(min(len(ds), e.eval_max_prompts))]
        res = evaluate(engine, items, tokenizer, k=e.eval_samples_per_prompt, temperature=e.eval_temperature,
                       top_p=e.eval_top_p, max_new_tokens=cfg.data.max_response_length, reward_fn=reward_fn,
                       seed=cfg.run.seed + 7919 * step, overlong_buffer=cfg.reward.overlong_buffer,
                       overlong_penalty_factor=cfg.reward.overlong_penalty_factor)
        prefix = "" if len(eval_sets) == 1 else f"{name}/"
        out.update({prefix + k: v for k, v in res.items() if isinstance(v, (int, float))})
    return out


class RolloutError(RuntimeError):
    """The rollout of a step failed on rank 0 (engine error, timeout); raised on every rank."""


STALL_INTERVAL_S = 60.0  # a rollout that made no progress for this long prints a line


def rollout_everywhere(collect, step: int, *, is_rank0: bool, log_info, total: int, detail: str = "",
                       stall_interval_s: float = STALL_INTERVAL_S):
    """Run ``collect(progress)`` on rank 0 and broadcast ``(result, extra)`` to every rank (collective).

    ``collect`` gets a progress callback (responses done); a stall of ``stall_interval_s`` prints a line.
    When it raises, EVERY rank raises: :class:`DynamicSamplingError` for exhausted dynamic sampling,
    :class:`RolloutError` with the engine's error otherwise, so no rank waits in a collective for a
    rank 0 that is gone."""
    from fipo_megatron.algo.sampling import DynamicSamplingError
    from fipo_megatron.trainer.reliability import ProgressWatchdog

    packet = None
    if is_rank0:
        try:
            with ProgressWatchdog(f"rollout {step}", total, log_info, interval_s=stall_interval_s,
                                  detail=detail) as watch:
                packet = collect(watch.tick)
        except DynamicSamplingError as exc:  # every rank must stop, not wait in the broadcast
            packet = (None, ("sampling", f"step {step}: {exc} (or pass --dynamic-sampling-on-exhausted partial)"))
        except Exception as exc:  # noqa: BLE001 - re-raised on every rank below
            packet = (None, ("engine", f"step {step}: rollout failed: {type(exc).__name__}: {exc}"))
    res, extra = _broadcast(packet)
    if res is None:
        kind, msg = extra
        raise (DynamicSamplingError if kind == "sampling" else RolloutError)(msg)
    return res, extra


def train(cfg: TrainConfig) -> dict[str, Any]:
    """Run training to ``cfg.run.train_iters`` steps (resuming if a checkpoint exists). Returns a summary
    (rank 0: first/last eval, last step metrics). Global rank 0 (``RANK`` unset or 0) holds the run lock
    of ``--output-dir`` and ``--save`` (:class:`fipo_megatron.trainer.reliability.RunLock`) throughout."""
    from contextlib import nullcontext

    from fipo_megatron.trainer.reliability import RunLock

    lock = RunLock([cfg.log.output_dir, cfg.checkpoint.save]) if int(os.environ.get("RANK", "0")) == 0 \
        else nullcontext()
    with lock:
        return _train(cfg)


def _train(cfg: TrainConfig) -> dict[str, Any]:
    from fipo_megatron.data import PromptSampler
    from fipo_megatron.megatron.parallel import initialize_parallel
    from fipo_megatron.megatron.qwen import load_hf_config
    from fipo_megatron.rewards.registry import load_reward_fn
    from fipo_megatron.trainer import setup
    from fipo_megatron.trainer.actor import Actor
    from fipo_megatron.trainer.args import to_yaml
    from fipo_megatron.trainer.logger import RunLogger
    from fipo_megatron.trainer.rollout_step import collect_rollouts

    p, d, r, a = cfg.parallel, cfg.data, cfg.rollout, cfg.algo
    initialize_parallel(p.tensor_model_parallel_size, p.pipeline_model_parallel_size, p.context_parallel_size,
                        seed=cfg.run.seed, timeout_minutes=p.distributed_timeout_minutes)
    rank0 = dist.get_rank() == 0
    log = RunLogger(cfg.log.output_dir, enabled=rank0, tensorboard_dir=cfg.log.tensorboard_dir,
                    wandb_project=cfg.log.wandb_project, config=cfg.to_dict(), progress=cfg.log.progress,
                    log_interval=cfg.log.log_interval)
    if rank0:
        with open(os.path.join(cfg.log.output_dir, "config.yaml"), "w") as fh:
            fh.write(to_yaml(cfg))

    # ---- data, reward, model, engine
    tokenizer = setup.load_tokenizer(cfg.model.hf_model_dir)
    train_set = setup.load_datasets(d.train_data, tokenizer, d.max_prompt_length)
    train_set = [x for ds in train_set.values() for x in ds]
    eval_sets = setup.load_datasets(d.eval_data, tokenizer, d.max_prompt_length) if d.eval_data else {}
    sampler = PromptSampler(train_set, cfg.gen_batch_size, seed=cfg.run.seed)
    reward_fn = load_reward_fn(cfg.reward.reward_fn)
    actor = Actor(cfg, load_hf_config(cfg.model.hf_model_dir))
    start_step = setup.restore(cfg, actor, sampler)
    if cfg.checkpoint.save:  # a full or unwritable --save is found now, not at the first save
        setup.check_save_dir(cfg, actor, _broadcast)
    engine = setup.build_engine(cfg, seed=cfg.run.seed)  # other stages' weight senders get a send-only engine
    gen_engine = engine if rank0 else None  # generation and evaluation: rank 0 only
    setup.sync_weights(actor, engine, version=start_step, bucket_mb=r.weight_sync_bucket_mb,
                       per_stage=setup.per_stage_sync(cfg))
    log.truncate_after(start_step)
    log.info(f"start at step {start_step}/{cfg.run.train_iters}: world {dist.get_world_size()}, TP "
             f"{p.tensor_model_parallel_size} PP {p.pipeline_model_parallel_size} CP {p.context_parallel_size} "
             f"DP {actor.dp_size()}, "
             f"{len(train_set)} train prompts, algorithm {cfg.loss.kind}")
    if cfg.loss.corrects_rollout and r.rollout_engine == "sglang" and r.temperature != 1.0:
        log.info(f"WARNING: --rollout-is/--rollout-mask at --temperature {r.temperature}: SGLang reports "
                 "temperature-scaled log-probs unless its server runs with SGLANG_RETURN_ORIGINAL_LOGPROB=1, "
                 "and the trainer's are raw; watch rollout/logprob_abs_diff_mean")

    summary: dict[str, Any] = {"start_step": start_step}
    evaluate_now = cfg.eval.eval_interval > 0 and bool(eval_sets)
    if evaluate_now and start_step == 0:
        with torch.no_grad():
            res = run_eval(cfg, gen_engine, eval_sets, tokenizer, reward_fn, 0)
        if res is not None:
            log.log_eval(0, res)
            summary["first_eval"] = res

    bar = log.bar(cfg.run.train_iters, "train steps", initial=start_step)
    step, last_saved, last_eval = start_step, start_step, start_step
    samples_per_mini_batch = d.mini_batch_size * d.n_samples_per_prompt
    while step < cfg.run.train_iters:
        step += 1
        timer, t_step = PhaseTimer(), time.perf_counter()

        # 1-4. rollout on rank 0: generate, score, dynamic sampling, advantages; then broadcast
        with timer("rollout"):
            def collect(tick, step=step):
                gbar = log.bar(cfg.gen_batch_size * d.n_samples_per_prompt, f"rollout {step}", leave=False)
                try:
                    res = collect_rollouts(gen_engine, sampler, step=step, seed=cfg.run.seed, tokenizer=tokenizer,
                                           reward_fn=reward_fn, n=d.n_samples_per_prompt,
                                           global_batch_size=d.global_batch_size, temperature=r.temperature,
                                           top_p=r.top_p, max_response_length=d.max_response_length,
                                           overlong_buffer=cfg.reward.overlong_buffer,
                                           overlong_penalty_factor=cfg.reward.overlong_penalty_factor,
                                           dynamic_sampling=a.dynamic_sampling,
                                           max_num_gen_batches=a.max_num_gen_batches,
                                           on_exhausted=a.dynamic_sampling_on_exhausted,
                                           progress=lambda n: (gbar.update(n), tick(n)), timer=timer)
                finally:
                    gbar.close()
                return res, sampler.state_dict()

            res, sampler_state = rollout_everywhere(
                collect, step, is_rank0=rank0, log_info=log.info, total=cfg.gen_batch_size * d.n_samples_per_prompt,
                detail=f"engine {r.rollout_engine}" + (f", request timeout {r.rollout_timeout:g} s, 3 retries"
                                                       if r.rollout_engine != "hf" else ""))
            sampler.load_state_dict(sampler_state)
        metrics = dict(res.metrics)

        # 5. old log-probs from Megatron (forward only); train-vs-engine mismatch
        batch = _to_rl_samples(res.samples)
        with timer("old_log_prob"):  # each rank's share of every mini-batch, kept on the rank
            if batch:
                metrics.update(actor.fill_log_probs(batch, samples_per_mini_batch))
        if actor.ref_model is not None and batch:  # --kl-coef > 0: the frozen initial policy's log-probs
            with timer("ref_log_prob"):
                actor.fill_log_probs(batch, samples_per_mini_batch, reference=True)

        # 6. PPO epochs x mini-batches of optimizer steps
        with timer("update"):
            if batch:
                metrics.update(actor.update(batch, samples_per_mini_batch))

        # 7. push the new weights to the rollout engine
        with timer("weight_sync"):
            metrics.update(setup.sync_weights(actor, engine, version=step, bucket_mb=r.weight_sync_bucket_mb,
                                              per_stage=setup.per_stage_sync(cfg)))

        metrics.update(timer.metrics())
        metrics["time/step"] = time.perf_counter() - t_step
        metrics["prompts_consumed"] = float(sampler.consumed)
        finite_or_raise({k: v for k, v in metrics.items() if not k.endswith(("_max", "_min"))}, f"step {step}")
        log.log_step(step, metrics)
        summary["last_metrics"] = metrics
        bar.update(1)

        # 8. evaluation and checkpoints
        if evaluate_now and (step % cfg.eval.eval_interval == 0 or step == cfg.run.train_iters):
            t_eval = time.perf_counter()
            with torch.no_grad():
                ev = run_eval(cfg, gen_engine, eval_sets, tokenizer, reward_fn, step)
            if ev is not None:
                ev["time/eval"] = time.perf_counter() - t_eval
                log.log_eval(step, ev)
                summary["last_eval"] = ev
            last_eval = step
        if cfg.checkpoint.save and ((cfg.checkpoint.save_interval and step % cfg.checkpoint.save_interval == 0)
                                    or step == cfg.run.train_iters):
            t_save = time.perf_counter()
            path = setup.save(cfg, actor, step, sampler)
            log.info(f"saved checkpoint {path} in {time.perf_counter() - t_save:.1f}s")
            last_saved = step
    bar.close()
    summary.update(final_step=step, last_saved=last_saved, last_eval_step=last_eval)
    log.close()
    if engine is not None:
        engine.shutdown()
    return summary
