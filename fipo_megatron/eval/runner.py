"""Evaluation runner: generate k samples per problem with a rollout engine, score, and aggregate.

``evaluate(engine, dataset, tokenizer, *, k, temperature=1.0, top_p=0.7, max_new_tokens, reward_fn)``

- ``engine`` follows the ``RolloutEngine`` contract (docs/DESIGN.md): ``generate(prompts, params)``
  returns ``len(prompts) * n`` outputs grouped by prompt, each with ``response_ids`` and
  ``finish_reason``. Prompts are sent in chunks of ``batch_size`` problems (all at once by default)
  with ``SamplingParams(n=k, temperature, top_p, max_new_tokens[, stop_token_ids][, seed])``.
- ``dataset`` is a sequence of items with ``prompt_ids``, ``ground_truth`` and ``data_source``
  (:class:`fipo_megatron.data.PromptExample`).
- Responses are decoded with ``tokenizer.decode(ids, skip_special_tokens=True)`` and scored with
  ``reward_fn(text, ground_truth)`` (a callable, a :func:`load_reward_fn` spec, or None = math_dapo).
  ``acc`` comes from the scorer; with ``overlong_buffer`` the DAPO overlong penalty is added to the
  reported ``reward_mean`` (never to ``acc``).

Returns a flat dict of floats: ``avg@k``, ``cons@k``, ``pass@k``, ``pass@1`` (plus the same under
their numbered names ``avg@{k}``, ``cons@{k}``, ``pass@{k}``), ``num_problems``, ``num_samples``,
``k``, ``reward_mean``, ``response_length_mean``/``_max``, ``clip_ratio`` (fraction of samples that
stopped on the length limit), ``invalid_ratio`` (no ``Answer:`` line), and for every data source
``"{data_source}/<metric>"`` for the same metrics. ``bootstrap > 0`` adds ``*_ci_low``/``*_ci_high``.
With ``return_details=True`` the dict also holds ``"details"``: one record per problem.
"""

from __future__ import annotations

import time
from typing import Any, Callable, Sequence

import numpy as np

from ..rewards.math_dapo import INVALID
from ..rewards.overlong import overlong_penalty
from ..rewards.registry import as_score_dict, load_reward_fn
from .metrics import aggregate

__all__ = ["evaluate"]

_METRICS = ("avg@k", "cons@k", "pass@k", "pass@1")


def _default_params_factory(**kwargs: Any) -> Any:
    from fipo_megatron.rollout.types import SamplingParams  # lazy: rollout is optional here

    return SamplingParams(**kwargs)


def _summarise(records: list[dict], k: int, *, bootstrap: int, seed: int) -> dict[str, float]:
    out: dict[str, float] = dict(
        aggregate([(r["preds"], r["accs"]) for r in records], k, bootstrap=bootstrap, seed=seed)
    )
    lengths = [n for r in records for n in r["lengths"]]
    out["num_samples"] = len(lengths)
    out["response_length_mean"] = float(np.mean(lengths))
    out["response_length_max"] = float(np.max(lengths))
    out["reward_mean"] = float(np.mean([s for r in records for s in r["scores"]]))
    out["clip_ratio"] = float(np.mean([f == "length" for r in records for f in r["finish_reasons"]]))
    out["invalid_ratio"] = float(np.mean([p == INVALID for r in records for p in r["preds"]]))
    return out


def evaluate(
    engine: Any,
    dataset: Sequence[Any],
    tokenizer: Any,
    *,
    k: int,
    temperature: float = 1.0,
    top_p: float = 0.7,
    max_new_tokens: int,
    reward_fn: Callable[[str, str], Any] | str | None = None,
    batch_size: int | None = None,
    stop_token_ids: list[int] | None = None,
    seed: int | None = None,
    overlong_buffer: int | None = None,
    overlong_penalty_factor: float = 1.0,
    bootstrap: int = 0,
    bootstrap_seed: int = 0,
    return_details: bool = False,
    params_factory: Callable[..., Any] | None = None,
) -> dict[str, Any]:
    """Evaluate ``engine`` on ``dataset`` with ``k`` samples per problem (see the module docstring).

    ``params_factory(**fields)`` builds the sampling parameters (default:
    ``fipo_megatron.rollout.types.SamplingParams``). ``stop_token_ids`` defaults to the
    tokenizer's ``eos_token_id`` when it has one.
    """
    if not isinstance(k, int) or k < 1:
        raise ValueError(f"evaluate: k must be a positive int, got {k!r}")
    if max_new_tokens < 1:
        raise ValueError(f"evaluate: max_new_tokens must be >= 1, got {max_new_tokens}")
    if len(dataset) == 0:
        raise ValueError("evaluate: the dataset is empty")
    if reward_fn is None or isinstance(reward_fn, str):
        reward_fn = load_reward_fn(reward_fn)
    factory = params_factory or _default_params_factory
    if stop_token_ids is None and getattr(tokenizer, "eos_token_id", None) is not None:
        stop_token_ids = [int(tokenizer.eos_token_id)]
    fields: dict[str, Any] = dict(n=k, temperature=temperature, top_p=top_p, max_new_tokens=max_new_tokens)
    if stop_token_ids is not None:
        fields["stop_token_ids"] = list(stop_token_ids)
    if seed is not None:
        fields["seed"] = seed
    params = factory(**fields)

    chunk = batch_size or len(dataset)
    records: list[dict] = []
    t0 = time.perf_counter()
    for start in range(0, len(dataset), chunk):
        items = [dataset[i] for i in range(start, min(start + chunk, len(dataset)))]
        outputs = engine.generate([list(it.prompt_ids) for it in items], params)
        if len(outputs) != len(items) * k:
            raise RuntimeError(
                f"evaluate: engine returned {len(outputs)} outputs for {len(items)} prompts x n={k}; "
                f"expected {len(items) * k} (grouped by prompt)"
            )
        for j, item in enumerate(items):
            rec: dict[str, Any] = {
                "index": getattr(item, "index", start + j),
                "data_source": getattr(item, "data_source", "unknown"),
                "ground_truth": item.ground_truth,
                "preds": [], "accs": [], "scores": [], "lengths": [], "finish_reasons": [],
            }
            for out in outputs[j * k : (j + 1) * k]:
                ids = list(out.response_ids)
                text = tokenizer.decode(ids, skip_special_tokens=True)
                s = as_score_dict(reward_fn(text, item.ground_truth))
                score = s["score"]
                if overlong_buffer:
                    score += overlong_penalty(len(ids), max_new_tokens, overlong_buffer, overlong_penalty_factor)
                rec["preds"].append(s["pred"])
                rec["accs"].append(bool(s["acc"]))
                rec["scores"].append(float(score))
                rec["lengths"].append(len(ids))
                rec["finish_reasons"].append(getattr(out, "finish_reason", None))
            records.append(rec)
    elapsed = time.perf_counter() - t0

    result: dict[str, Any] = _summarise(records, k, bootstrap=bootstrap, seed=bootstrap_seed)
    for name in ("avg", "cons", "pass"):
        result[f"{name}@{k}"] = result[f"{name}@k"]
    sources = list(dict.fromkeys(r["data_source"] for r in records))
    for src in sources:
        sub = _summarise([r for r in records if r["data_source"] == src], k, bootstrap=bootstrap, seed=bootstrap_seed)
        for key, val in sub.items():
            if key != "k":
                result[f"{src}/{key}"] = val
    result["eval_time_s"] = elapsed
    if return_details:
        result["details"] = records
    return result
