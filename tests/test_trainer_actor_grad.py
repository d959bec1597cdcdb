"""The actor's gradient normalisation: after one mini-batch the gradient is that of the GLOBAL token-mean
loss, sum(loss_sum) / (kept tokens over all micro-batches and DP ranks), whatever the micro-batching.

One gloo launch on 2 processes (tiny Qwen2, Megatron DDP, packed THD, SDPA attention on CPU):
1. At TP=1, CP=2 the actor's reduction group (token counts, metrics) is Megatron's data-parallel group
   WITH context parallelism, i.e. both ranks.
2. At DP=2, then at CP=2 with the same weights: ``Actor.update`` on one mini-batch with the optimizer step
   replaced by a probe that records
   every parameter's (DP-reduced, scaled) gradient. Reference: the unsharded computation on one rank,
   each sample through the bare model alone (no padding, no DDP, no schedule), log-probs by a float64
   log-softmax written here, ``policy_loss`` per sample, loss = sum(loss_sum) / sum(num_tokens), gradient
   by ``torch.autograd.grad``. Checked with one micro-batch per rank and with several uneven ones; at CP=2
   the old log-probs gathered from the CP shards also equal the DP run's.
"""
from __future__ import annotations

import dataclasses

import pytest
import torch

from fipo_megatron.testing.distributed import run_distributed

CFG = dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
           intermediate_size=128, vocab_size=96, rms_norm_eps=1e-6, rope_theta=10000.0,
           tie_word_embeddings=False, max_position_embeddings=64)
V = CFG["vocab_size"]


def _samples():
    from fipo_megatron.parallel.packing import RLSample

    g = torch.Generator().manual_seed(17)
    out = []
    for _ in range(8):
        P, R = int(torch.randint(2, 7, (1,), generator=g)), int(torch.randint(3, 12, (1,), generator=g))
        out.append(RLSample(torch.randint(1, V, (P,), generator=g).tolist(),
                            torch.randint(1, V, (R,), generator=g).tolist(),
                            advantage=float(torch.randn((), generator=g))))
    return out


def _reference_grads(module, samples, loss_cfg):
    """Unsharded float64-log-prob reference: (loss, kept tokens, {name: grad})."""
    from fipo_megatron.algo.losses import policy_loss
    from fipo_megatron.megatron.qwen import forward_logits

    params = dict(module.named_parameters())
    total, kept = 0.0, 0.0
    for s in samples:
        P, R = len(s.prompt_ids), len(s.response_ids)
        tokens = torch.tensor([list(s.prompt_ids) + list(s.response_ids)])
        logits = forward_logits(module, tokens)[0, :, :V].double()
        logp = torch.log_softmax(logits, dim=-1)[P - 1:P + R - 1].gather(1, torch.tensor(s.response_ids)[:, None])
        logp = logp[:, 0][None, :]
        old = torch.tensor([s.old_log_prob], dtype=torch.float64)
        engine = None if s.engine_log_prob is None else torch.tensor([s.engine_log_prob], dtype=torch.float64)
        out = policy_loss(logp, old, torch.full_like(old, s.advantage), torch.ones_like(old, dtype=torch.bool),
                          loss_cfg, engine_log_prob=engine if loss_cfg.corrects_rollout else None)
        total = total + out.loss_sum
        kept += float(out.num_tokens)
    loss = total / kept
    grads = torch.autograd.grad(loss, list(params.values()), allow_unused=True)
    return float(loss), kept, {n: (torch.zeros_like(p) if g is None else g) for (n, p), g in zip(params.items(), grads)}


def _cp_group_part():
    """TP=1, CP=2 on 2 ranks: the actor's group spans both (DP x CP)."""
    import torch.distributed as dist

    from fipo_megatron.megatron.parallel import destroy_parallel, initialize_parallel
    from fipo_megatron.trainer.actor import Actor

    initialize_parallel(1, 1, 2, seed=0)
    ranks = dist.get_process_group_ranks(Actor.dp_group())
    destroy_parallel()
    return sorted(ranks)


def _fill_check(actor, current) -> dict:
    """``fill_log_probs`` at DP=2: each rank fills exactly its shares (the samples it trains on) with the
    log-probs every rank computed (``compute_log_probs``, gathered), and the train-vs-engine metrics equal a
    float64 computation over the whole batch."""
    samples = _samples()
    g = torch.Generator().manual_seed(11)
    for s, lp in zip(samples, current):
        s.engine_log_prob = (lp.double() + 0.05 * torch.randn(lp.shape, generator=g, dtype=torch.float64)).tolist()
    m = actor.fill_log_probs(samples, 4)
    mine = {id(s) for share in actor.shares(samples, 4) for s in share}
    d = torch.cat([torch.tensor(s.engine_log_prob, dtype=torch.float64) - lp.double()
                   for s, lp in zip(samples, current)])
    return {"own_filled": all((s.old_log_prob is not None) == (id(s) in mine) for s in samples),
            "own_count": len(mine),
            "values": max(float((s.old_log_prob - lp).abs().max()) for s, lp in zip(samples, current)
                          if s.old_log_prob is not None),
            "abs_mean": (m["rollout/logprob_abs_diff_mean"], float(d.abs().mean())),
            "abs_max": (m["rollout/logprob_abs_diff_max"], float(d.abs().max())),
            "kl": (m["rollout/engine_train_kl"], float(d.mean()))}


def _worker(rank: int, world: int):
    import torch.distributed as dist

    from fipo_megatron.megatron.parallel import initialize_parallel
    from fipo_megatron.megatron.qwen import unwrap_model
    from fipo_megatron.trainer.actor import Actor, dp_shard
    from fipo_megatron.trainer.args import parse_args

    from fipo_megatron.megatron.parallel import destroy_parallel

    result = {"cp_group_ranks": _cp_group_part()}
    weights = ref = first_current = None
    for cp in (1, 2):  # DP = 2, then CP = 2 (the same samples, weights and reference gradient)
        initialize_parallel(1, 1, cp, seed=0)
        cfg = parse_args(["--max-prompt-length", "8", "--max-response-length", "12",
                          "--max-tokens-per-micro-batch", "256", "--clip-ratio-c", "3", "--safety-threshold", "2",
                          "--future-kl-decay-rate", "4", "--lr", "1e-3", "--min-lr", "1e-3", "--lr-warmup-iters",
                          "0"], validate=False)
        actor = Actor(cfg, CFG)
        module = unwrap_model(actor.model[0])
        with torch.no_grad():  # identical weights on both ranks, and in both layouts
            if weights is None:
                for p in module.parameters():
                    dist.broadcast(p.data, src=0)
                weights = {n: p.detach().clone() for n, p in module.named_parameters()}
            else:
                for n, p in module.named_parameters():
                    p.copy_(weights[n])
        if cp == 1:
            samples = _samples()
            current, _, _ = actor.compute_log_probs(samples)
            g = torch.Generator().manual_seed(3)
            for s, lp in zip(samples, current):  # old log-probs off the current ones: clips, Future-KL, filter active
                s.old_log_prob = (lp.double() + 0.8 * torch.randn(lp.shape, generator=g, dtype=torch.float64)).tolist()
            i = next(i for i, s in enumerate(samples) if s.advantage < 0)  # r = e^2 > c = 3 twice: the filter drops it
            samples[i].old_log_prob[:2] = [float(v) - 2.0 for v in current[i][:2]]
            for s in samples:  # the engine's log-probs: off the old ones by a typical engine/trainer mismatch
                noise = 0.3 * torch.randn(len(s.old_log_prob), generator=g, dtype=torch.float64)
                s.engine_log_prob = (torch.tensor(s.old_log_prob, dtype=torch.float64) + noise).tolist()
            ref = _reference_grads(module, samples, actor.loss_cfg)  # the bare model, one sequence at a time
            ref_corrected = _reference_grads(module, samples, dataclasses.replace(actor.loss_cfg, **CORRECTED))
            first_current = current
            result["fill"] = _fill_check(actor, current)
        else:
            current, _, _ = actor.compute_log_probs(samples)  # CP: the gathered log-probs equal the DP run's
            result["cp_logprob_err"] = max(float((a - b).abs().max()) for a, b in zip(current, first_current))
        ref_loss, ref_kept, ref_grads = ref

        names = [n for n, _ in module.named_parameters()]
        params = [p for _, p in module.named_parameters()]
        recorded = {}

        def probe_step():  # replaces the optimizer step: record the gradient, change nothing
            recorded["grads"] = {n: p.main_grad.detach().clone().double() for n, p in zip(names, params)}
            return False, None, None

        actor.optimizer.step = probe_step
        result["ref_kept"] = ref_kept
        result["num_responses"] = sum(len(s.response_ids) for s in samples)
        scale = max(float(g.abs().max()) for g in ref_grads.values())
        result["ref_scale"] = scale
        for budget in (256, 20):  # one micro-batch per rank, then several uneven ones
            actor.cfg.optim.max_tokens_per_micro_batch = budget
            n_mb = len(actor._micro_batches(dp_shard(samples, actor.dp_size(), actor.dp_rank())))
            metrics = actor.update(samples, len(samples))
            err = max(float((recorded["grads"][n] - ref_grads[n]).abs().max()) for n in names)
            result[(cp, budget)] = dict(n_mb=n_mb, err=err, pg_loss=metrics["actor/pg_loss"])
        # truncated + masked importance sampling against the engine's log-probs, several micro-batches
        plain_cfg, actor.loss_cfg = actor.loss_cfg, dataclasses.replace(actor.loss_cfg, **CORRECTED)
        metrics = actor.update(samples, len(samples))
        actor.loss_cfg = plain_cfg
        err = max(float((recorded["grads"][n] - ref_corrected[2][n]).abs().max()) for n in names)
        result[(cp, "corrected")] = dict(err=err, pg_loss=metrics["actor/pg_loss"], ref_loss=ref_corrected[0],
                                         dropped=metrics["actor/rollout_mask_dropped_frac"],
                                         truncated=metrics["actor/rollout_is_truncated_frac"])
        result["ref_loss"] = ref_loss
        del actor
        destroy_parallel()
    return result


CORRECTED = dict(rollout_is="sequence", rollout_is_threshold=1.5, rollout_mask="token", rollout_mask_threshold=1.5)


@pytest.fixture(scope="module")
def launch():
    return run_distributed(_worker, 2)


def test_actor_reduction_group_is_data_parallel_with_context_parallel(launch):
    for r in launch:
        assert r["cp_group_ranks"] == [0, 1]  # DP=1 x CP=2: token counts and metrics reduce over both ranks


@pytest.mark.parametrize("cp", [1, 2], ids=["dp2", "cp2"])
def test_gradient_is_the_global_token_mean_for_any_micro_batching(launch, cp):
    """DP=2 (cp=1) and CP=2 (the SDPA attention's all-gather CP on CPU): the same reference gradient."""
    for r in launch:
        assert 0 < r["ref_kept"] < r["num_responses"], "the sequence filter should drop something"
        assert r["ref_scale"] > 0
        assert r[(cp, 256)]["n_mb"] == 1 and r[(cp, 20)]["n_mb"] > 1
        for budget in (256, 20):
            res = r[(cp, budget)]
            assert res["err"] <= 1e-5 * r["ref_scale"], (cp, budget, res["err"], r["ref_scale"])
            assert abs(res["pg_loss"] - r["ref_loss"]) <= 1e-5 * max(1.0, abs(r["ref_loss"]))
    assert all(r["cp_logprob_err"] < 1e-5 for r in launch)


def test_fill_log_probs_keeps_each_ranks_share_and_reduces_metrics_exactly(launch):
    for r in launch:
        f = r["fill"]
        assert f["own_filled"] and f["own_count"] == 4   # 8 samples, 2 mini-batches, DP=2: 2 + 2 per rank
        assert f["values"] < 1e-6
        for key in ("abs_mean", "abs_max", "kl"):
            got, want = f[key]
            assert got == pytest.approx(want, rel=1e-6, abs=1e-9), key


@pytest.mark.parametrize("cp", [1, 2], ids=["dp2", "cp2"])
def test_rollout_importance_sampling_reaches_the_gradient(launch, cp):
    """--rollout-is sequence + --rollout-mask token: the actor hands the engine's log-probs to the loss, and
    the gradient equals the unsharded reference's (per-response products across CP shards included)."""
    for r in launch:
        res = r[(cp, "corrected")]
        assert 0 < res["dropped"] < 1 and 0 < res["truncated"] < 1
        assert res["err"] <= 1e-5 * r["ref_scale"], (cp, res["err"])
        assert abs(res["pg_loss"] - res["ref_loss"]) <= 1e-5 * max(1.0, abs(res["ref_loss"]))
        assert abs(res["ref_loss"] - r["ref_loss"]) > 1e-3  # the corrections changed the loss
