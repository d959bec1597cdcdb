"""End to end: RL steps at TP=2 on 2 gloo processes (CPU), checkpoint + resume, weight sync.

One multi-process run (to pay the start-up cost once) does:
1. an uninterrupted 3-step run C (checkpoint at step 2 and at the end);
2. a run B of 2 steps, then the same command with --train-iters 3 (resumes B's step-2 checkpoint):
   B's step-3 metrics must equal C's (the checkpoint holds rollout step, sampler position, RNG,
   optimizer, scheduler);
3. the first step again at TP=1 x DP=2 and at TP=1 x CP=2: identical metrics and gradient norm (global
   token-mean loss; under CP the packed sequences are split over the ranks and attention, Future-KL and
   the loss are exact across them);
4. a direct weight-sync check: after one policy update, the HF engine's log-probs disagree with the
   Megatron model's; after `sync_weights` they agree to fp32 precision;
5. one GRPO step with --kl-coef > 0 (frozen reference, k3 KL metric).
Checks: weights change (final checkpoint exported to HF vs the initial HF weights), metrics finite,
checkpoint written atomically (pointer + directory, no .tmp left), train-vs-engine log-prob mismatch
~0 at every step (the engine serves the synced weights).
"""
from __future__ import annotations

import importlib.util
import json
import math
import os
import subprocess
import sys

import pytest
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def char_reward(solution: str, ground_truth: str) -> dict:
    """A graded reward so a random model gets non-zero advantages: the fraction of digit characters."""
    frac = sum(c.isdigit() for c in solution) / max(1, len(solution))
    return {"score": frac, "acc": frac > 0.25, "pred": solution[-3:]}


def _prepare_module():
    spec = importlib.util.spec_from_file_location("tiny_prepare", os.path.join(ROOT, "examples/tiny-cpu/prepare.py"))
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """A random tiny Qwen2 + char tokenizer (HF dir), the addition data, and its TP=2 Megatron checkpoint."""
    prep = _prepare_module()
    root = tmp_path_factory.mktemp("tiny")
    train_path, eval_path = prep.write_data(str(root))
    tok = prep.build_char_tokenizer(prep.ALPHABET)
    torch.manual_seed(0)
    model = prep.build_model(tok)
    hf_dir = str(root / "hf")
    model.save_pretrained(hf_dir, safe_serialization=True)
    tok.save_pretrained(hf_dir)
    mcore = str(root / "mcore")
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONWARNINGS="ignore")
    for tp, out in ((2, mcore), (1, mcore + "_tp1")):  # the vocabulary padding depends on TP
        subprocess.run([sys.executable, "-m", "fipo_megatron.convert.cli", "hf-to-mcore", "--hf-dir", hf_dir, "--out",
                        out, "--tp", str(tp)], check=True, env=env, capture_output=True, cwd=ROOT)
    return {"root": str(root), "hf": hf_dir, "mcore": mcore, "train": train_path, "eval": eval_path}


def _argv(t: dict, out: str, iters: int, extra=()):
    return ["--config", os.path.join(ROOT, "examples/tiny-cpu/config.yaml"), "--hf-model-dir", t["hf"],
            "--train-data", t["train"], "--eval-data", t["eval"], "--load", t["mcore"], "--output-dir", out,
            "--save", os.path.join(out, "ckpt"), "--save-interval", "2", "--train-iters", str(iters),
            "--global-batch-size", "4", "--mini-batch-size", "2", "--gen-batch-size", "4",
            "--n-samples-per-prompt", "4", "--no-dynamic-sampling", "--reward-fn", "test_trainer_e2e:char_reward",
            "--eval-interval", "3", "--eval-samples-per-prompt", "2", "--eval-max-prompts", "8",
            "--lr", "1e-2", "--min-lr", "1e-2", "--lr-warmup-iters", "0", "--no-progress", *extra]


def _worker(rank: int, world: int, t: dict) -> dict:
    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))  # the reward fn's module
    from fipo_megatron.trainer import parse_args, train

    out_c, out_b = os.path.join(t["root"], "C"), os.path.join(t["root"], "B")
    train(parse_args(_argv(t, out_c, 3), world_size=world))
    train(parse_args(_argv(t, out_b, 2), world_size=world))
    resumed = train(parse_args(_argv(t, out_b, 3), world_size=world))
    sync = _sync_check(t, world)
    # GRPO with the KL penalty: the loop computes the frozen reference's log-probs and the loss uses them;
    # with the rollout importance sampling and mask on (the engine's log-probs reach the loss)
    train(parse_args(_argv(t, os.path.join(t["root"], "K"), 1, ["--algorithm", "grpo", "--kl-coef", "0.1",
                                                                "--rollout-is", "token", "--rollout-mask", "token"]),
                     world_size=world))
    # the same first step at TP=1 x DP=2: the loss is normalised by the GLOBAL token count, so every
    # metric and the gradient norm must equal the TP=2 x DP=1 run's
    from fipo_megatron.megatron.parallel import destroy_parallel

    destroy_parallel()
    t1 = dict(t, mcore=t["mcore"] + "_tp1")
    train(parse_args(_argv(t1, os.path.join(t["root"], "D"), 1, ["--tensor-model-parallel-size", "1"]),
                     world_size=world))
    # ... and at TP=1 x CP=2 (packed sequences split zigzag over 2 ranks, SDPA all-gather CP attention,
    # distributed Future-KL): the same metrics again
    destroy_parallel()
    train(parse_args(_argv(t1, os.path.join(t["root"], "P"), 1, ["--tensor-model-parallel-size", "1",
                                                                 "--context-parallel-size", "2"]), world_size=world))
    return {"resumed_start": resumed["start_step"], "sync": sync}


def _sync_check(t: dict, world: int) -> dict:
    """After an update the engine is stale; after sync_weights its log-probs equal Megatron's."""
    import torch.distributed as dist

    from fipo_megatron.megatron.qwen import load_hf_config
    from fipo_megatron.parallel.packing import RLSample
    from fipo_megatron.rollout.types import SamplingParams
    from fipo_megatron.trainer import parse_args
    from fipo_megatron.trainer.actor import Actor
    from fipo_megatron.trainer.setup import build_engine, sync_weights

    cfg = parse_args(_argv(t, os.path.join(t["root"], "S"), 1), world_size=world)
    actor = Actor(cfg, load_hf_config(t["hf"]))
    actor.load_initial_weights(t["mcore"])
    engine = build_engine(cfg, seed=0)
    prompt = [1, 26, 22, 24, 25, 11, 7, 5, 2, 11, 1, 22, 22, 27, 22, 28, 21, 28, 11]
    gen = None
    if engine is not None:
        gen = engine.generate([prompt], SamplingParams(n=4, max_new_tokens=8, seed=3))
    gen = _bcast(gen)
    samples = [RLSample(g.prompt_ids, g.response_ids, advantage=a) for g, a in zip(gen, [1.0, -1.0, 0.5, -0.5])]
    old, _, _ = actor.compute_log_probs(samples)
    for s, o in zip(samples, old):
        s.old_log_prob = o
    actor.update(samples, len(samples))
    new, _, _ = actor.compute_log_probs(samples)

    def engine_lp():
        if engine is None:
            return None
        res = []
        with torch.no_grad():
            for s in samples:
                ids = torch.tensor([list(s.prompt_ids) + list(s.response_ids)])
                lp = engine.model(ids).logits.float().log_softmax(-1)[0]
                P, R = len(s.prompt_ids), len(s.response_ids)
                res.append(lp[P - 1:P + R - 1].gather(-1, torch.tensor(s.response_ids)[:, None])[:, 0])
        return torch.cat(res)

    before = _bcast(engine_lp())
    sync_weights(actor, engine, version=1, bucket_mb=1)
    after = _bcast(engine_lp())
    meg_old, meg_new = torch.cat(old), torch.cat(new)
    out = {"before": float((before - meg_new).abs().max()), "after": float((after - meg_new).abs().max()),
           "moved": float((meg_new - meg_old).abs().max()), "engine_was_old": float((before - meg_old).abs().max())}
    dist.barrier()
    return out


def _bcast(obj):
    import torch.distributed as dist

    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def _read(path):
    return [json.loads(line) for line in open(path) if line.strip()]


@pytest.mark.timeout(600)
def test_trainer_e2e_tp2_resume_and_weight_sync(tiny):
    from fipo_megatron.convert.mcore_to_hf import iter_hf_tensors_from_checkpoint
    from fipo_megatron.testing.distributed import run_distributed
    from safetensors.torch import load_file

    res = run_distributed(_worker, 2, tiny)[0]
    root = tiny["root"]
    c_steps = _read(os.path.join(root, "C", "metrics.jsonl"))
    b_steps = _read(os.path.join(root, "B", "metrics.jsonl"))
    assert [m["step"] for m in c_steps] == [1, 2, 3]
    assert [m["step"] for m in b_steps] == [1, 2, 3]
    assert res["resumed_start"] == 2

    # metrics finite, required keys present, engine serves the synced weights at every step
    for m in c_steps + b_steps:
        for key in ("reward_mean", "accuracy", "response_length_mean", "actor/pg_loss", "actor/grad_norm",
                    "actor/influence_weight_mean", "actor/entropy", "batch/length_weighted_mean_advantage",
                    "time/generate", "time/update", "time/weight_sync"):
            assert key in m and math.isfinite(m[key]), (key, m.get(key))
        assert m["rollout/logprob_abs_diff_max"] < 1e-4, m["rollout/logprob_abs_diff_max"]
        assert m["actor/num_optimizer_steps"] == 2

    # the resumed run's next step equals the uninterrupted run's
    c3, b3 = c_steps[2], b_steps[2]
    for key in c3:
        if key.startswith("time/") or not isinstance(c3[key], float):
            continue
        assert b3[key] == pytest.approx(c3[key], rel=1e-5, abs=1e-6), key

    # TP=1 x DP=2 and TP=1 x CP=2 reproduce TP=2 x DP=1 (ratio quantiles reduce only approximately
    # across ranks): pg_loss, grad norm, entropy, Future-KL mean, influence weights, rollout, eval...
    for run in ("D", "P"):
        d1 = _read(os.path.join(root, run, "metrics.jsonl"))[0]
        for key in c_steps[0]:
            if key.startswith("time/") or key.endswith(("_p995", "_p005")) or not isinstance(c_steps[0][key], float):
                continue
            assert d1[key] == pytest.approx(c_steps[0][key], rel=1e-4, abs=1e-6), (run, key)
        assert "actor/future_kl_mean" in d1 and "actor/grad_norm" in d1

    # --kl-coef > 0: reference log-probs computed (timed), k3 KL reported; the first mini-batch sees the
    # reference == policy (KL 0), the second one an updated policy (KL > 0)
    k1 = _read(os.path.join(root, "K", "metrics.jsonl"))[0]
    assert k1["time/ref_log_prob"] > 0 and math.isfinite(k1["actor/kl_ref"]) and k1["actor/kl_ref"] > 0
    assert "actor/kl_ref" not in c_steps[0]
    # the HF engine computes what the trainer does (fp32): importance weights ~1, nothing masked
    assert k1["actor/rollout_is_weight_mean"] == pytest.approx(1.0, abs=1e-3)
    assert k1["actor/rollout_mask_dropped_frac"] == 0.0
    assert "actor/rollout_is_weight_mean" not in c_steps[0]

    # evaluations logged before training and at the end
    assert [e["step"] for e in _read(os.path.join(root, "C", "eval.jsonl"))] == [0, 3]

    # checkpoints: pointer to the final step, complete directories, nothing temporary left
    ck = os.path.join(root, "C", "ckpt")
    assert open(os.path.join(ck, "latest_checkpointed_iteration.txt")).read().strip() == "3"
    assert sorted(os.listdir(ck)) == ["iter_0000002", "iter_0000003", "latest_checkpointed_iteration.txt"]
    assert os.path.isfile(os.path.join(ck, "iter_0000003", "trainer_state.pt"))
    state = torch.load(os.path.join(ck, "iter_0000003", "trainer_state.pt"), weights_only=False)
    assert state["step"] == 3 and state["trainer_state"]["sampler"]["consumed"] == 12

    # weights changed: the final checkpoint, exported to HF names, differs from the initial HF weights
    initial = load_file(os.path.join(tiny["hf"], "model.safetensors"))
    from fipo_megatron.convert.validate import load_hf_config

    final = dict(iter_hf_tensors_from_checkpoint(os.path.join(ck, "iter_0000003"), load_hf_config(tiny["hf"])))
    assert set(initial) <= set(final)
    changed = [k for k in initial if not torch.allclose(initial[k], final[k].to(initial[k].dtype))]
    assert len(changed) >= len(initial) // 2, changed

    # direct weight-sync check: stale before the push, equal after
    s = res["sync"]
    assert s["moved"] > 1e-3            # the update changed the Megatron model's log-probs
    assert s["engine_was_old"] < 1e-4   # the engine still served the old weights ...
    assert s["before"] > 1e-3           # ... so it disagreed with the updated model
    assert s["after"] < 1e-5            # after sync_weights it agrees with it
