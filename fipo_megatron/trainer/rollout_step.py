"""One rollout phase: generate -> score -> dynamic sampling -> group-relative advantages.

Runs on the rank that owns the rollout engine (global rank 0); the caller broadcasts the result.

Contract of :func:`collect_rollouts`:
- Draws generation batches of prompts from ``sampler`` (until ``global_batch_size`` groups are in
  hand, with or without dynamic sampling) and asks the engine for
  ``n_samples_per_prompt`` responses each (``SamplingParams(temperature, top_p,
  max_new_tokens=max_response_length, stop=EOS, seed=f(run seed, step, batch))``, so a resumed
  run draws the same samples as an uninterrupted one).
- Scores each response with ``reward_fn(decoded text, ground_truth)`` (:func:`as_score_dict`), adds
  the DAPO overlong penalty to the score (never to ``acc``). A reward function that raises scores
  that response -1 (wrong); the count is the ``reward_errors`` metric and a warning names the first.
- Dynamic sampling (when on): keeps only groups whose accuracy has a spread (not all right, not all
  wrong) and generates more batches until ``global_batch_size`` groups are kept, at most
  ``max_num_gen_batches`` batches (0 = unbounded), through ``algo.sampling.DynamicSampler``. If the
  bound is hit first: ``on_exhausted="error"`` raises ``DynamicSamplingError`` (verl's behaviour);
  ``"partial"`` trains on the groups it has (possibly none; the step then skips the update) and
  reports ``batch/short=1``. The kept groups are cut to ``global_batch_size``.
- Advantages: ``(score - group mean) / (group std + 1e-6)`` per group (algo.group_advantages).
- Metrics: ``reward_mean``, ``accuracy``, ``response_length_*`` (mean and percentiles),
  ``response_clip_ratio`` are over EVERY response generated in the step (the current policy's
  training-set performance, unbiased by the filter); ``batch/*`` describe the kept train batch,
  incl. ``batch/length_weighted_mean_advantage``; ``num_gen_batches``, ``batch/kept_groups``.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable, Optional, Sequence

import numpy as np
import torch

from fipo_megatron.rewards.overlong import overlong_penalty
from fipo_megatron.rewards.registry import as_score_dict
from fipo_megatron.rollout.types import SamplingParams
from fipo_megatron.trainer.metrics import PhaseTimer, length_stats


@dataclass
class Sample:
    """One (prompt, response) of the train batch. ``n`` consecutive samples form a group."""

    prompt_ids: list[int]
    response_ids: list[int]
    engine_log_probs: list[float]
    finish_reason: str
    ground_truth: str
    data_source: str
    prompt_index: int
    score: float = 0.0
    acc: bool = False
    pred: str = ""
    advantage: float = 0.0


@dataclass
class RolloutResult:
    samples: list[Sample] = field(default_factory=list)
    metrics: dict[str, float] = field(default_factory=dict)


def rollout_seed(seed: int, step: int, gen_batch: int) -> int:
    """The engine sampling seed of generation batch ``gen_batch`` of RL step ``step``."""
    return (int(seed) * 1_000_003 + int(step) * 1_009 + int(gen_batch)) % (2**31 - 1)


def score_outputs(items: Sequence[Any], outputs: Sequence[Any], n: int, *, tokenizer: Any,
                  reward_fn: Callable, max_response_length: int, overlong_buffer: int,
                  overlong_penalty_factor: float) -> tuple[list[list[Sample]], list[str]]:
    """Turn engine outputs (grouped by prompt) into scored groups of :class:`Sample`; also returns the reward
    function's exceptions (one line each; those responses are scored -1)."""
    if len(outputs) != len(items) * n:
        raise RuntimeError(f"engine returned {len(outputs)} outputs for {len(items)} prompts x n={n}")
    groups, errors = [], []
    for j, item in enumerate(items):
        group = []
        for out in outputs[j * n:(j + 1) * n]:
            text = tokenizer.decode(list(out.response_ids), skip_special_tokens=True)
            try:
                s = as_score_dict(reward_fn(text, item.ground_truth))
            except Exception as exc:  # noqa: BLE001 - one bad response must not end a long run
                errors.append(f"prompt {item.index}: {type(exc).__name__}: {exc}")
                s = {"score": -1.0, "acc": False, "pred": "[REWARD ERROR]"}
            score = s["score"] + overlong_penalty(len(out.response_ids), max_response_length, overlong_buffer,
                                                  overlong_penalty_factor)
            group.append(Sample(prompt_ids=list(item.prompt_ids), response_ids=list(out.response_ids),
                                engine_log_probs=list(out.response_logprobs), finish_reason=out.finish_reason,
                                ground_truth=item.ground_truth, data_source=item.data_source,
                                prompt_index=int(item.index), score=float(score), acc=bool(s["acc"]),
                                pred=str(s["pred"])))
        groups.append(group)
    return groups, errors


def has_spread(group: Sequence[Sample]) -> bool:
    """DAPO's filter on accuracy: the group is useful iff its samples do not all agree."""
    from fipo_megatron.algo.sampling import group_has_spread

    return group_has_spread([float(s.acc) for s in group])


def assign_advantages(groups: Sequence[Sequence[Sample]]) -> None:
    """Group-relative advantages (r - mean) / (std + 1e-6), written into each sample."""
    from fipo_megatron.algo.advantages import group_advantages

    if not groups:
        return
    n = len(groups[0])
    scores = torch.tensor([[s.score for s in g] for g in groups], dtype=torch.float32)
    adv = group_advantages(scores.reshape(-1), n).reshape(-1).tolist()
    for s, a in zip((s for g in groups for s in g), adv):
        s.advantage = float(a)


def collect_rollouts(engine: Any, sampler: Any, *, step: int, seed: int, tokenizer: Any, reward_fn: Callable,
                     n: int, global_batch_size: int, temperature: float, top_p: float, max_response_length: int,
                     overlong_buffer: int, overlong_penalty_factor: float, dynamic_sampling: bool,
                     max_num_gen_batches: int, on_exhausted: str = "partial",
                     progress: Optional[Callable[[int], Any]] = None,
                     timer: Optional[Any] = None) -> RolloutResult:
    """Generate, score, filter and compute advantages for one RL step (see the module docstring).

    ``timer`` (a :class:`PhaseTimer`) receives the "generate" and "score" phases."""
    from fipo_megatron.algo.sampling import DynamicSampler

    timer = timer or PhaseTimer()
    eos = getattr(tokenizer, "eos_token_id", None)
    filt = DynamicSampler(global_batch_size, max_num_gen_batches if dynamic_sampling else None,
                          values_fn=lambda group: [float(s.acc) for s in group], enabled=dynamic_sampling,
                          on_exhausted=on_exhausted)
    generated: list[list[Sample]] = []
    num_gen = 0
    reward_errors: list[str] = []
    while not filt.done:
        items = sampler.next_batch()
        params = SamplingParams(n=n, temperature=temperature, top_p=top_p, max_new_tokens=max_response_length,
                                stop_token_ids=[eos] if eos is not None else [],
                                seed=rollout_seed(seed, step, num_gen))
        with timer("generate"):
            outputs = engine.generate([list(it.prompt_ids) for it in items], params)
        with timer("score"):
            groups, errors = score_outputs(items, outputs, n, tokenizer=tokenizer, reward_fn=reward_fn,
                                   max_response_length=max_response_length, overlong_buffer=overlong_buffer,
                                   overlong_penalty_factor=overlong_penalty_factor)
        num_gen += 1
        if progress is not None:
            progress(len(outputs))
        reward_errors.extend(errors)
        generated.extend(groups)
        filt.add(groups)  # "error" mode raises DynamicSamplingError when the bound is hit unfilled
    if reward_errors:
        print(f"[fipo] warning: the reward function raised on {len(reward_errors)} response(s) (scored -1); "
              f"first: {reward_errors[0]}", flush=True)
    n_reward_errors = len(reward_errors)
    short = not filt.full
    kept = filt.pop(partial=True)
    assign_advantages(kept)
    samples = [s for g in kept for s in g]

    every = [s for g in generated for s in g]
    m: dict[str, float] = {
        "reward_mean": float(np.mean([s.score for s in every])),
        "accuracy": float(np.mean([s.acc for s in every])),
        "response_clip_ratio": float(np.mean([s.finish_reason == "length" for s in every])),
        "num_gen_batches": float(num_gen),
        "num_generated": float(len(every)),
        "batch/kept_groups": float(len(kept)),
        "batch/kept_group_ratio": float(sum(has_spread(g) for g in generated) / max(len(generated), 1)),
        "batch/solve_all_ratio": float(np.mean([all(s.acc for s in g) for g in generated])),
        "batch/solve_none_ratio": float(np.mean([not any(s.acc for s in g) for g in generated])),
        "batch/short": float(short),
        "reward_errors": float(n_reward_errors),
    }
    m.update(length_stats([len(s.response_ids) for s in every], "response_length"))
    m.update(length_stats([len(s.prompt_ids) for s in every], "prompt_length"))
    if samples:
        m["batch/reward_mean"] = float(np.mean([s.score for s in samples]))
        m["batch/accuracy"] = float(np.mean([s.acc for s in samples]))
        m["batch/response_length_mean"] = float(np.mean([len(s.response_ids) for s in samples]))
        m["batch/length_weighted_mean_advantage"] = _length_weighted_mean_advantage(samples)
        m["batch/advantage_abs_mean"] = float(np.mean([abs(s.advantage) for s in samples]))
    return RolloutResult(samples=samples, metrics=m)


def _length_weighted_mean_advantage(samples: Sequence[Sample]) -> float:
    """sum_i L_i A_i / sum_i L_i over the train batch (the paper's length-weighted mean advantage)."""
    from fipo_megatron.algo.advantages import length_weighted_mean_advantage

    adv = torch.tensor([s.advantage for s in samples], dtype=torch.float32)
    lens = torch.tensor([len(s.response_ids) for s in samples], dtype=torch.float32)
    return float(length_weighted_mean_advantage(adv, lens))
