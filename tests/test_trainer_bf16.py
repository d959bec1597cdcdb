"""bf16 training starts from the LOADED weights and resumes exactly (Megatron's mixed-precision optimizer).

The bug this pins: Megatron's bf16 optimizer keeps fp32 main copies of the parameters, made when the
optimizer is built (i.e. of the random initialisation). Weights loaded into the model afterwards
(``--load``, the automatic HF conversion) must be copied into those main params; otherwise the first
optimizer step writes the random init (plus the update) back into the model.

One spawned gloo world of 2 processes (DP=2, bf16, tiny Qwen2), for the plain and the distributed
optimizer:
1. weights W (not the actor's own random init) are saved as a model-only checkpoint; a fresh actor
   loads them with ``Actor.load_initial_weights``;
2. ``--lr 0``: two optimizer steps leave every parameter bit-identical to W, every mini-batch is
   on-policy (``actor/ppo_kl`` == 0, ``actor/on_policy_ppo_kl`` == 0) and the update's entropy equals the
   forward-only entropy over the same tokens;
3. the frozen reference (``--kl-coef``) gives exactly the policy's log-probs before any update;
4. the loss receives the model's bf16 logits (no fp32 copy of [tokens, vocab]);
5. resume: steps 1+2 uninterrupted vs step 1, checkpoint, a new actor ``load_checkpoint`` + step 2:
   identical step-2 metrics and bit-identical weights (the fp32 main params come back from the
   optimizer state, not re-derived from the bf16 weights).
"""
from __future__ import annotations

import os

import pytest
import torch

from fipo_megatron.testing.distributed import run_distributed

CFG = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
           intermediate_size=64, vocab_size=40, rms_norm_eps=1e-6, rope_theta=10000.0,
           tie_word_embeddings=False, max_position_embeddings=64)


def _samples():
    from fipo_megatron.testing.samples import random_rl_samples

    return random_rl_samples(8, 40, seed=5, advantages=(1.0, -0.5))


def _argv(root: str, lr: str, *extra: str) -> list[str]:
    return ["--bf16", "--algorithm", "fipo", "--max-prompt-length", "8", "--max-response-length", "8",
            "--max-tokens-per-micro-batch", "24", "--lr", lr, "--min-lr", lr,
            "--lr-warmup-iters", "0", "--weight-decay", "0.1", "--output-dir", os.path.join(root, "out"), *extra]


def _params(actor) -> dict[str, torch.Tensor]:
    from fipo_megatron.megatron.qwen import unwrap_model

    return {k: v.detach().clone() for k, v in unwrap_model(actor.model[0]).state_dict().items()
            if isinstance(v, torch.Tensor) and not k.endswith("_extra_state")}


def _max_diff(a: dict, b: dict) -> float:
    return max(float((a[k].float() - b[k].float()).abs().max()) for k in a)


def _with_old(samples, old):
    for s, o in zip(samples, old):
        s.old_log_prob = o
    return samples


def _worker(rank: int, world: int, root: str) -> dict:
    import torch.distributed as dist

    from fipo_megatron.megatron.checkpoint import save_model_weights
    from fipo_megatron.megatron.parallel import initialize_parallel
    from fipo_megatron.megatron.qwen import unwrap_model
    from fipo_megatron.trainer.actor import Actor
    from fipo_megatron.trainer.args import parse_args

    import fipo_megatron.trainer.actor as actor_mod

    logits_dtypes = set()
    real_token_log_probs = actor_mod.token_log_probs

    def recording(logits, *args, **kwargs):  # the loss must see the model's bf16 logits, not an fp32 copy
        logits_dtypes.add(str(logits.dtype))
        return real_token_log_probs(logits, *args, **kwargs)

    actor_mod.token_log_probs = recording
    initialize_parallel(1, 1, 1, seed=0)
    out: dict = {"logits_dtypes": logits_dtypes}
    for dist_opt in (False, True):
        tag = "distopt" if dist_opt else "plain"
        extra = ["--use-distributed-optimizer"] if dist_opt else []
        init = os.path.join(root, f"init_{tag}")
        # 1. weights W that differ from any actor's random init (an actor built with the same seed)
        writer = Actor(parse_args(_argv(root, "0", *extra), validate=False), CFG)
        with torch.no_grad():
            gen = torch.Generator().manual_seed(11)
            for p in unwrap_model(writer.model[0]).parameters():
                p.add_((torch.randn(p.shape, generator=gen) * 0.3).to(p.dtype))
        save_model_weights(init, writer.model)
        saved = _params(writer)
        del writer

        # 2. lr = 0: weights stay W bit for bit, every mini-batch on-policy
        actor = Actor(parse_args(_argv(root, "0", "--algorithm", "grpo", "--kl-coef", "0.1", *extra),
                                 validate=False), CFG)
        actor.load_initial_weights(init)
        loaded = _params(actor)
        samples = _samples()
        old, ent_sum, ent_cnt = actor.compute_log_probs(samples)
        ref = actor.compute_ref_log_probs(samples)
        for s, r in zip(_with_old(samples, old), ref):
            s.ref_log_prob = r
        m = actor.update(samples, 4)  # 2 mini-batches per DP share -> 2 optimizer steps
        after = _params(actor)
        out[tag] = {
            "load_diff": _max_diff(saved, loaded), "step_diff": _max_diff(loaded, after),
            "ref_diff": max(float((a - b).abs().max()) for a, b in zip(old, ref)),
            "ppo_kl": m["actor/ppo_kl"], "on_policy_ppo_kl": m["actor/on_policy_ppo_kl"],
            "entropy": m["actor/entropy"], "rollout_entropy": ent_sum / ent_cnt,
            "steps": m["actor/num_optimizer_steps"], "bf16": str(next(iter(loaded.values())).dtype),
        }
        del actor

        # 5. resume in bf16 with lr > 0
        ckpt = os.path.join(root, f"ckpt_{tag}")
        cfg = parse_args(_argv(root, "3e-3", *extra), validate=False)
        run = Actor(cfg, CFG)
        run.load_initial_weights(init)
        samples = _with_old(_samples(), old)
        run.update(samples, 4)
        run.save_checkpoint(ckpt, 1, {"step": 1})
        m2 = run.update(samples, 4)
        w2 = _params(run)
        del run
        resumed = Actor(cfg, CFG)
        step, _ = resumed.load_checkpoint(ckpt)
        m2r = resumed.update(_with_old(_samples(), old), 4)
        out[tag].update(resumed_step=step, moved=_max_diff(loaded, w2),
                        resume_weight_diff=_max_diff(w2, _params(resumed)),
                        metric_diff=max(abs(m2[k] - m2r[k]) for k in m2 if not k.startswith("time/")),
                        same_keys=sorted(m2) == sorted(m2r))
        del resumed
        dist.barrier()
    return out


@pytest.mark.timeout(300)
def test_bf16_trains_the_loaded_weights_and_resumes_exactly(tmp_path):
    res = run_distributed(_worker, 2, str(tmp_path))
    assert res[0].pop("logits_dtypes") == {"torch.bfloat16"} and res[1].pop("logits_dtypes") == {"torch.bfloat16"}
    for tag in ("plain", "distopt"):
        r = res[0][tag]
        assert r["bf16"] == "torch.bfloat16", r
        assert r["load_diff"] == 0.0, r
        assert r["steps"] == 2.0, r
        assert r["step_diff"] == 0.0, r          # lr = 0: the optimizer must not write any other weights
        assert r["ref_diff"] == 0.0, r           # the frozen reference = the loaded initial policy
        assert abs(r["ppo_kl"]) < 1e-6 and abs(r["on_policy_ppo_kl"]) < 1e-6, r
        assert r["entropy"] == pytest.approx(r["rollout_entropy"], rel=1e-6), r
        assert r["resumed_step"] == 1 and r["same_keys"], r
        assert r["moved"] > 1e-3, r              # lr > 0 did train
        assert r["resume_weight_diff"] == 0.0 and r["metric_diff"] == 0.0, r
        assert res[1][tag] == r                 # every rank agrees
