"""GRPO's KL penalty: the actor's frozen reference model (``--kl-coef > 0``), on a tiny model at TP=1.

In one spawned gloo worker (Megatron's parallel state never lives in the pytest process):
- the reference is loaded from the run's init source (a model-only checkpoint given as ``--load``)
  by ``setup.restore``; it is frozen (no grad, not DDP, not in the optimizer);
- before any update, reference log-probs == the policy's; after an update the policy's move and the
  reference's do not;
- the loss with ``kl_coef = c`` minus the loss with ``kl_coef = 0`` (same weights, same batch) equals
  ``c * mean k3`` with k3 = exp(ref - logp) - (ref - logp) - 1 computed independently in float64, and
  ``actor/kl_ref`` reports that mean;
- a checkpoint records the reference source; a restart with ``--load CKPT`` (the recipes' resume)
  gets the resumed POLICY but the INITIAL weights as its reference.
"""
from __future__ import annotations

import os

import pytest
import torch

from fipo_megatron.testing.distributed import run_distributed

CFG = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
           intermediate_size=64, vocab_size=40, rms_norm_eps=1e-6, rope_theta=10000.0,
           tie_word_embeddings=False, max_position_embeddings=64)
KL = 0.5


class _Sampler:  # what setup.save / setup.restore need of the prompt sampler
    def state_dict(self):
        return {"consumed": 0}

    def load_state_dict(self, state):
        self.state = state


def _samples():
    from fipo_megatron.testing.samples import random_rl_samples

    return random_rl_samples(6, 40, seed=3)


def _argv(root: str, *extra: str) -> list[str]:
    return ["--algorithm", "grpo", "--kl-coef", str(KL), "--max-prompt-length", "8", "--max-response-length", "8",
            "--max-tokens-per-micro-batch", "32", "--micro-batch-size", "2",
            "--lr", "1e-2", "--min-lr", "1e-2", "--lr-warmup-iters", "0", "--weight-decay", "0",
            "--output-dir", os.path.join(root, "out"), *extra]


def _worker(rank: int, world: int, root: str) -> dict:
    import dataclasses

    from fipo_megatron.megatron.checkpoint import save_model_weights
    from fipo_megatron.megatron.parallel import initialize_parallel
    from fipo_megatron.megatron.qwen import unwrap_model
    from fipo_megatron.trainer import setup
    from fipo_megatron.trainer.actor import Actor
    from fipo_megatron.trainer.args import parse_args

    initialize_parallel(1, 1, 1, seed=0)
    init_dir, ckpt = os.path.join(root, "init"), os.path.join(root, "ckpt")
    cfg = parse_args(_argv(root, "--load", init_dir, "--save", ckpt), validate=False)
    actor = Actor(cfg, CFG)
    save_model_weights(init_dir, actor.model)  # the run's init source (what fipo-convert would have written)
    setup.restore(cfg, actor, _Sampler())
    out: dict = {"ref_source": actor.ref_source}

    ref_params = [p for c in actor.ref_model for p in c.parameters()]
    opt_ids = {id(p) for g in actor.optimizer.param_groups for p in g["params"]}
    out["frozen"] = (not any(p.requires_grad for p in ref_params) and not any(id(p) in opt_ids for p in ref_params)
                     and all(type(c).__name__ != "DistributedDataParallel" for c in actor.ref_model)
                     and not any(c.training for c in actor.ref_model))

    samples = _samples()
    lp0, _, _ = actor.compute_log_probs(samples)
    ref0 = actor.compute_ref_log_probs(samples)
    out["init_diff"] = max(float((a - b).abs().max()) for a, b in zip(lp0, ref0))
    for s, o, r in zip(samples, lp0, ref0):
        s.old_log_prob, s.ref_log_prob = o, r
    m1 = actor.update(samples, len(samples))
    out["kl_ref_step1"] = m1["actor/kl_ref"]

    lp1, _, _ = actor.compute_log_probs(samples)
    ref1 = actor.compute_ref_log_probs(samples)
    out["ref_moved"] = max(float((a - b).abs().max()) for a, b in zip(ref0, ref1))
    out["policy_moved"] = max(float((a - b).abs().max()) for a, b in zip(lp0, lp1))

    # loss at the updated weights with kl_coef = KL, then (same weights restored) with kl_coef = 0
    inner = unwrap_model(actor.model[0])
    saved = {k: v.detach().clone() for k, v in inner.state_dict().items() if isinstance(v, torch.Tensor)}
    for s, o in zip(samples, lp1):
        s.old_log_prob = o
    m_kl = actor.update(samples, len(samples))
    with torch.no_grad():
        for k, v in inner.state_dict().items():
            if k in saved:
                v.copy_(saved[k])
    actor.loss_cfg = dataclasses.replace(actor.loss_cfg, kl_coef=0.0)
    m_0 = actor.update(samples, len(samples))
    d = torch.cat([r.double() for r in ref0]) - torch.cat([p.double() for p in lp1])
    k3 = torch.exp(d) - d - 1.0
    out.update(loss_kl=m_kl["actor/pg_loss"], loss_0=m_0["actor/pg_loss"], kl_ref=m_kl["actor/kl_ref"],
               k3_mean=float(k3.mean()), no_kl_metric="actor/kl_ref" not in m_0)

    # checkpoint at these weights, then restart like the recipes: --load points at the run's own checkpoint
    with torch.no_grad():
        for k, v in inner.state_dict().items():
            if k in saved:
                v.copy_(saved[k])
    actor.loss_cfg = dataclasses.replace(actor.loss_cfg, kl_coef=KL)
    setup.save(cfg, actor, 1, _Sampler())
    cfg2 = parse_args(_argv(root, "--load", ckpt, "--save", ckpt), validate=False)
    actor2 = Actor(cfg2, CFG)
    step = setup.restore(cfg2, actor2, _Sampler())
    lp2, _, _ = actor2.compute_log_probs(samples)
    ref2 = actor2.compute_ref_log_probs(samples)
    out.update(resumed_step=step, resumed_ref_source=actor2.ref_source,
               resumed_policy_diff=max(float((a - b).abs().max()) for a, b in zip(lp1, lp2)),
               resumed_ref_diff=max(float((a - b).abs().max()) for a, b in zip(ref0, ref2)))
    return out


@pytest.mark.timeout(300)
def test_reference_model_is_the_frozen_initial_policy(tmp_path):
    r = run_distributed(_worker, 1, str(tmp_path))[0]
    init_dir = os.path.abspath(os.path.join(tmp_path, "init"))
    assert r["ref_source"] == init_dir and r["frozen"]
    assert r["init_diff"] <= 1e-6                   # reference == initial policy before any update
    assert r["kl_ref_step1"] == pytest.approx(0.0, abs=1e-10)
    assert r["policy_moved"] > 1e-3                 # the update moved the policy ...
    assert r["ref_moved"] == 0.0                    # ... and not the reference
    assert r["k3_mean"] > 1e-6
    # loss(kl_coef = c) - loss(kl_coef = 0) == c * mean k3 (independent float64 k3 on the same tokens)
    assert r["loss_kl"] - r["loss_0"] == pytest.approx(KL * r["k3_mean"], rel=1e-4, abs=1e-8)
    assert r["kl_ref"] == pytest.approx(r["k3_mean"], rel=1e-4, abs=1e-8) and r["no_kl_metric"]
    # resume: the policy comes from the checkpoint, the reference from the recorded initial weights
    assert r["resumed_step"] == 1 and r["resumed_ref_source"] == init_dir
    assert r["resumed_policy_diff"] <= 1e-6 and r["resumed_ref_diff"] == 0.0


def test_reference_source_rules(tmp_path):
    """Pure rules (no process group): --ref-load wins; a resume uses the recorded initial weights; a
    fresh start uses the policy's own init dir; a resume without a record is a clear error."""
    from fipo_megatron.trainer.args import parse_args
    from fipo_megatron.trainer.reference import reference_source

    init, other = tmp_path / "init", tmp_path / "other"
    for d in (init, other):
        d.mkdir()
        (d / "metadata.json").write_text("{}")
    cfg = parse_args(["--kl-coef", "0.1"], validate=False)
    assert reference_source(cfg, resumed_state=None, policy_init_dir=str(init)) == str(init)
    assert reference_source(cfg, resumed_state={"reference_init": str(init)}, policy_init_dir=None) == str(init)
    with pytest.raises(ValueError, match="--ref-load"):
        reference_source(cfg, resumed_state={"step": 3}, policy_init_dir=None)
    with pytest.raises(FileNotFoundError, match="gone"):
        reference_source(cfg, resumed_state={"reference_init": str(tmp_path / "x")}, policy_init_dir=None)
    cfg = parse_args(["--kl-coef", "0.1", "--ref-load", str(other)], validate=False)
    assert reference_source(cfg, resumed_state={"reference_init": str(init)}, policy_init_dir=None) == str(other)
