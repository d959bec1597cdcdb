"""Rollout step (generate -> score -> dynamic sampling -> advantages) with a scripted fake engine,
plus the trainer's metric helpers, logger and plot command."""
from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass

import numpy as np
import pytest

from fipo_megatron.rollout.types import GenerationOutput
from fipo_megatron.trainer.logger import RunLogger
from fipo_megatron.trainer.metrics import PhaseTimer, SumCount, length_stats
from fipo_megatron.trainer.rollout_step import collect_rollouts, rollout_seed


@dataclass
class Item:
    index: int
    prompt_ids: list
    ground_truth: str
    data_source: str = "toy"


class ListSampler:
    def __init__(self, items, batch):
        self.items, self.batch, self.pos = items, batch, 0

    def next_batch(self):
        out = [self.items[(self.pos + i) % len(self.items)] for i in range(self.batch)]
        self.pos += self.batch
        return out


class Tok:
    eos_token_id = 0

    def decode(self, ids, skip_special_tokens=True):
        return "".join(chr(ord("a") + i - 1) if i < 27 else str(i - 27) for i in ids if i != 0)


class ScriptedEngine:
    """Prompt p's responses: 'Answer: <digit>' where the digit is right for the first
    `right[p]` of the n samples; one id per char (digits are ids 27..36)."""

    def __init__(self, right):
        self.right, self.calls = right, []

    def generate(self, prompts, params):
        self.calls.append((len(prompts), params.seed, params.max_new_tokens))
        outs = []
        for p in prompts:
            pid, gt = p[0], p[1]
            for j in range(params.n):
                digit = gt if j < self.right[pid] else (gt + 1) % 10
                ids = [1, 14, 19, 23, 5, 18] + [27 + digit, 0]  # "answer" + digit + eos
                outs.append(GenerationOutput(list(p), ids, [-0.5] * len(ids), "stop"))
        return outs


def reward(solution, gt):
    pred = solution[-1:]
    return {"score": 1.0 if pred == gt else -1.0, "acc": pred == gt, "pred": pred}


def _run(right, items, **kw):
    engine = ScriptedEngine(right)
    args = dict(step=3, seed=7, tokenizer=Tok(), reward_fn=reward, n=4, global_batch_size=2, temperature=1.0,
                top_p=1.0, max_response_length=16, overlong_buffer=0, overlong_penalty_factor=1.0,
                dynamic_sampling=True, max_num_gen_batches=5)
    args.update(kw)
    return collect_rollouts(engine, ListSampler(items, 2), **args), engine


def test_dynamic_sampling_keeps_only_groups_with_spread_and_draws_more_batches():
    items = [Item(i, [i, i % 10], str(i % 10)) for i in range(6)]
    right = {0: 4, 1: 0, 2: 2, 3: 4, 4: 1, 5: 3}   # groups 0,1,3 have no spread
    res, engine = _run(right, items)
    assert len(engine.calls) == 3                      # batches {0,1} {2,3} {4,5}: kept 2, 3 ... 4 >= 2
    assert [c[1] for c in engine.calls] == [rollout_seed(7, 3, b) for b in range(3)]
    kept = sorted({s.prompt_index for s in res.samples})
    assert kept == [2, 4]                              # first two groups with spread, in order
    assert len(res.samples) == 8
    # group-relative advantages: (r - mean) / (std_unbiased + 1e-6)
    g2 = [s for s in res.samples if s.prompt_index == 2]
    r = np.array([s.score for s in g2])
    want = (r - r.mean()) / (r.std(ddof=1) + 1e-6)
    assert np.allclose([s.advantage for s in g2], want, atol=1e-5)
    m = res.metrics
    assert m["num_gen_batches"] == 3 and m["num_generated"] == 24
    assert m["accuracy"] == pytest.approx((4 + 0 + 2 + 4 + 1 + 3) / 24)
    assert m["batch/accuracy"] == pytest.approx(3 / 8)
    assert m["batch/kept_groups"] == 2 and m["batch/short"] == 0.0
    assert m["batch/solve_all_ratio"] == pytest.approx(2 / 6) and m["batch/solve_none_ratio"] == pytest.approx(1 / 6)
    assert m["response_length_mean"] == 8 and m["response_length_q25"] == 8


def test_without_dynamic_sampling_one_batch_and_zero_advantage_groups_kept():
    items = [Item(i, [i, 1], "1") for i in range(2)]
    res, engine = _run({0: 4, 1: 0}, items, dynamic_sampling=False)
    assert len(engine.calls) == 1 and len(res.samples) == 8
    assert all(s.advantage == 0 for s in res.samples)


def test_bound_on_generation_batches_trains_on_what_it_has():
    items = [Item(i, [i, 1], "1") for i in range(4)]
    res, engine = _run({0: 4, 1: 0, 2: 2, 3: 4}, items, max_num_gen_batches=1)
    assert len(engine.calls) == 1 and res.metrics["batch/short"] == 1.0 and len(res.samples) == 0


def test_overlong_penalty_added_to_score_not_acc():
    items = [Item(0, [0, 1], "1")]
    res, _ = _run({0: 2}, items, dynamic_sampling=False, global_batch_size=1, max_response_length=8,
                  overlong_buffer=4, overlong_penalty_factor=1.0)
    # length 8 = max: penalty -(8 - 4) / 4 * 1 = -1
    right = [s for s in res.samples if s.acc]
    wrong = [s for s in res.samples if not s.acc]
    assert len(right) == 2 and all(s.score == pytest.approx(1.0 - 1.0) for s in right)
    assert len(wrong) == 2 and all(s.score == pytest.approx(-1.0 - 1.0) for s in wrong)


def test_metric_helpers():
    t = PhaseTimer()
    with t("a"):
        pass
    assert set(t.metrics()) == {"time/a"} and t.metrics() == {}
    s = length_stats([1, 2, 3, 4, 100], "len")
    assert s["len_median"] == 3 and s["len_max"] == 100 and s["len_q25"] == 2 and s["len_mean"] == 22
    sc = SumCount()
    sc.add_pairs({"x": (6.0, 3.0)})
    sc.add_pairs({"x": (4.0, 1.0)})   # exact pooled mean, not a mean of means
    assert sc.reduce() == {"x": 2.5}


def test_logger_jsonl_resume_truncation_and_plot(tmp_path):
    from fipo_megatron.plot import main as plot_main

    log = RunLogger(str(tmp_path), tensorboard_dir="none", progress=False)
    for step in (1, 2, 3):
        log.log_step(step, {"reward_mean": 0.1 * step, "accuracy": 0.2 * step, "response_length_mean": 10.0,
                            "response_length_q25": 9.0, "response_length_q75": 11.0, "actor/ppo_kl": 0.01,
                            "actor/entropy": 0.5, "actor/influence_weight_mean": 1.05})
        log.log_eval(step, {"avg@k": 0.3 + 0.1 * step, "pass@k": 0.9})
    log.truncate_after(2)                      # resumed from the step-2 checkpoint
    rows = [json.loads(x) for x in open(tmp_path / "metrics.jsonl")]
    assert [r["step"] for r in rows] == [1, 2] and rows[1]["accuracy"] == pytest.approx(0.4)
    assert [json.loads(x)["step"] for x in open(tmp_path / "eval.jsonl")] == [1, 2]
    log.close()
    assert plot_main([str(tmp_path), "--out", str(tmp_path / "p")]) == 0
    pngs = sorted(os.listdir(tmp_path / "p"))
    for name in ("accuracy.png", "entropy.png", "influence_weights.png", "kl.png", "response_length.png"):
        assert name in pngs and os.path.getsize(tmp_path / "p" / name) > 1000
    assert plot_main([str(tmp_path / "nothing")]) == 2
    RunLogger(str(tmp_path), tensorboard_dir="none", progress=False).truncate_after(0)  # fresh run: empty files
    assert not os.path.exists(tmp_path / "metrics.jsonl")
    assert math.isfinite(rows[0]["reward_mean"])


def test_without_dynamic_sampling_small_generation_batches_fill_the_train_batch():
    items = [Item(i, [i, 1], "1") for i in range(6)]
    res, engine = _run({i: 2 for i in range(6)}, items, dynamic_sampling=False, global_batch_size=5)
    assert len(engine.calls) == 3 and len(res.samples) == 5 * 4   # 2 + 2 + 2 prompts, cut to 5


def test_a_raising_reward_function_is_counted_not_fatal(capsys):
    items = [Item(i, [i, 1], "1") for i in range(2)]

    def flaky(solution, gt):
        if solution.endswith("2"):
            raise ZeroDivisionError("boom")
        return reward(solution, gt)

    res, _ = _run({0: 2, 1: 4}, items, dynamic_sampling=False, reward_fn=flaky)
    assert res.metrics["reward_errors"] == 2
    assert "raised on 2 response(s)" in capsys.readouterr().out
    assert sum(s.acc for s in res.samples) == 6


def test_bound_on_generation_batches_errors_by_default_in_error_mode():
    from fipo_megatron.algo.sampling import DynamicSamplingError

    items = [Item(i, [i, 1], "1") for i in range(4)]
    with pytest.raises(DynamicSamplingError, match="max_num_gen_batches=1"):
        _run({0: 4, 1: 0, 2: 2, 3: 4}, items, max_num_gen_batches=1, on_exhausted="error")
