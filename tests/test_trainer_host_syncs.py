"""No device syncs per micro-batch: the actor's update reads the device once per optimizer step.

On a GPU every host read of a tensor value (``float(t)``, ``.tolist()``, a data-dependent ``if``) waits
for the device. CPU runs cannot time that, so this counts the reads (``testing.host_reads``) with the
GPU's branch choices forced on (``tensor_utils.sync_free_branches``):
- inside Megatron's schedule (forward, loss, backward of every micro-batch) there are no reads of data
  (float / bool values) at all, for 1 and for 4 micro-batches. Reads of the packing structure (integer
  cu_seqlens, made on the host) remain: the SDPA attention's per-batch plan and Megatron's own THD RoPE;
- a whole ``Actor.update`` (less building the micro-batches on the host) does the same number of reads
  for 1 and for 4 micro-batches per step, and its metrics equal the CPU fast path's (the sync-free
  branches compute the same numbers).
"""
from __future__ import annotations

import os

import pytest
import torch

from fipo_megatron.testing.distributed import run_distributed

CFG = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
           intermediate_size=64, vocab_size=40, rms_norm_eps=1e-6, rope_theta=10000.0,
           tie_word_embeddings=False, max_position_embeddings=64)


def _samples(old):
    from fipo_megatron.testing.samples import random_rl_samples

    out = random_rl_samples(8, 40, seed=9, advantages=(1.0, -0.5))
    if old is not None:
        for s, o in zip(out, old):
            s.old_log_prob = o + 0.05 * torch.sin(torch.arange(len(o), dtype=torch.float32))  # off-policy a bit
    return out


def _worker(rank: int, world: int, root: str) -> dict:
    from fipo_megatron.algo.tensor_utils import sync_free_branches
    from fipo_megatron.megatron.checkpoint import save_model_weights
    from fipo_megatron.megatron.parallel import initialize_parallel
    from fipo_megatron.testing.host_reads import HostReadCounter
    from fipo_megatron.trainer import actor as actor_mod
    from fipo_megatron.trainer.actor import Actor
    from fipo_megatron.trainer.args import parse_args

    initialize_parallel(1, 1, 1, seed=0)
    init = os.path.join(root, "init")
    inner_reads: list[int] = []
    real_fb = actor_mod.forward_backward

    def counted_fb(*args, **kwargs):
        # Megatron's own THD RoPE (the non-fused path) compares cu_seqlens on the host: not ours to change
        with HostReadCounter(data_only=True, ignore_files=("rope_utils.py",)) as c:
            res = real_fb(*args, **kwargs)
        inner_reads.append(c.count)
        return res

    actor_mod.forward_backward = counted_fb
    out = {}
    for budget in ("256", "16"):  # every sample in one micro-batch / about 4 micro-batches
        for sync_free in (False, True):
            cfg = parse_args(["--algorithm", "fipo", "--max-prompt-length", "8", "--max-response-length", "8",
                              "--max-tokens-per-micro-batch", budget, "--lr", "1e-3",
                              "--min-lr", "1e-3", "--lr-warmup-iters", "0", "--output-dir", os.path.join(root, "o")],
                             validate=False)
            actor = Actor(cfg, CFG)
            if not os.path.isdir(init):
                save_model_weights(init, actor.model)
            actor.load_initial_weights(init)
            old, _, _ = actor.compute_log_probs(_samples(None))
            samples = _samples(old)
            n_mb = len(actor._micro_batches(samples))
            inner_reads.clear()
            build = actor._micro_batches

            def built_on_host(local, _build=build):  # batches are made (and checked) on the host
                with whole.paused():
                    return _build(local)

            actor._micro_batches = built_on_host
            with HostReadCounter(data_only=True, ignore_files=("rope_utils.py",)) as whole:
                if sync_free:
                    with sync_free_branches():
                        m = actor.update(samples, len(samples))
                else:
                    m = actor.update(samples, len(samples))
            out[(budget, sync_free)] = {"n_mb": n_mb, "inner": list(inner_reads), "whole": whole.count,
                                        "metrics": m}
    actor_mod.forward_backward = real_fb
    return out


@pytest.mark.timeout(300)
def test_update_reads_the_device_once_per_step_not_per_micro_batch(tmp_path):
    r = run_distributed(_worker, 1, str(tmp_path))[0]
    one, many = r[("256", True)], r[("16", True)]
    assert one["n_mb"] == 1 and many["n_mb"] >= 4, (one["n_mb"], many["n_mb"])
    assert one["inner"] == [0] and many["inner"] == [0], (one["inner"], many["inner"])
    assert one["whole"] == many["whole"], (one["whole"], many["whole"])
    for budget in ("256", "16"):  # the sync-free branches give the CPU fast path's numbers
        fast, free = r[(budget, False)]["metrics"], r[(budget, True)]["metrics"]
        assert sorted(fast) == sorted(free)
        for k in fast:
            if not k.startswith("time/"):
                assert free[k] == pytest.approx(fast[k], rel=1e-6, abs=1e-9), k
    # and the micro-batching does not change the result (exact global token mean)
    for k in ("actor/pg_loss", "actor/ppo_kl", "actor/entropy", "actor/grad_norm"):
        assert many["metrics"][k] == pytest.approx(one["metrics"][k], rel=1e-5), k


CORRECTION = dict(rollout_is="sequence", rollout_is_threshold=1.5, rollout_mask="token", rollout_mask_threshold=1.3)


@pytest.mark.parametrize("kind,safety_threshold,extra", [("fipo", 10.0, {}), ("fipo", 1.5, {}), ("dapo", 10.0, {}),
                                                         ("grpo", 10.0, {}), ("fipo", 10.0, CORRECTION)],
                         ids=["fipo", "fipo-unsafe", "dapo", "grpo", "fipo-rollout-is"])
def test_sync_free_branches_give_bit_identical_loss_and_metrics(kind, safety_threshold, extra):
    """The GPU path (no host reads) and the CPU fast path compute the same numbers, bit for bit, also
    where the ratio quantiles' positions need float64 (many tokens) and the safety rule fires."""
    from fipo_megatron.algo.losses import PolicyLossConfig, policy_loss
    from fipo_megatron.algo.tensor_utils import sync_free_branches
    from fipo_megatron.testing.host_reads import HostReadCounter

    g = torch.Generator().manual_seed(1)
    B, L = 4, 30011
    lp = torch.randn(B, L, generator=g) * 0.5 - 1.0
    old = lp + torch.randn(B, L, generator=g) * 0.4
    adv = torch.randn(B, 1, generator=g).expand(B, L).contiguous()
    mask = torch.rand(B, L, generator=g) > 0.1
    engine = old + torch.randn(B, L, generator=g) * 0.2 if extra else None
    cfg = PolicyLossConfig(kind=kind, safety_threshold=safety_threshold, **extra)
    fast = policy_loss(lp, old, adv, mask, cfg, engine_log_prob=engine)
    with sync_free_branches(), HostReadCounter() as reads:
        free = policy_loss(lp, old, adv, mask, cfg, validate_values=False, engine_log_prob=engine)
    assert reads.count == 0, reads.calls
    assert torch.equal(fast.loss_sum, free.loss_sum) and torch.equal(fast.num_tokens, free.num_tokens)
    assert fast.metrics == free.metrics
    assert fast.metric_mins == free.metric_mins and fast.metric_maxs == free.metric_maxs
