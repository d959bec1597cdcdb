"""CP x DP invariance of the full policy loss and of d(loss)/d(log_prob) under gloo.

`loss_part` runs inside the shared launches of test_parallel_cp_distributed.py; `check_loss` compares.

Reference: one process, all samples in one THD pack (CP = 1, DP = 1, one micro-batch),
loss = loss_sum / num_tokens. Distributed: samples dealt to DP ranks, split into several
micro-batches by token budget, packed for CP, sharded, `cp_policy_loss` per micro-batch,
backward of loss_sum, then gradients / N with N = global_token_count over DP x CP (the trainer's
normalisation, see cp_loss). Layouts: world 2 = CP2xDP1 and CP1xDP2; world 4 = CP4xDP1 and CP2xDP2.
"""
from __future__ import annotations

import pytest
import torch
import torch.distributed as dist

from fipo_megatron.algo.losses import PolicyLossConfig, policy_loss
from fipo_megatron.parallel.cp_loss import cp_policy_loss, global_token_count
from fipo_megatron.parallel.cp_shard import gather_from_cp, gather_responses, shard_packed_batch
from fipo_megatron.parallel.packing import RLSample, pack_thd, split_into_micro_batches, unpack_responses

CONFIGS = [
    dict(),                                                                   # FIPO defaults (filter on)
    dict(future_kl_start="next", future_kl_window=5, future_kl_average=True,
         future_kl_mask="negative_advantage", decay_rate=8.0),
    dict(decay_rate=256.0, future_kl_clip_ratio=0.0, loss_agg_mode="seq-mean-token-mean"),
    dict(kind="dapo"),
    # the engine's log-probs ride in the ref_log_prob field here (kl_coef is 0 in every config)
    dict(rollout_is="sequence", rollout_is_threshold=1.5, rollout_mask="geometric", rollout_mask_threshold=1.02),
]


def make_samples(seed: int, n: int = 10):
    """Samples with current log-probs; spikes (ratio ~ e^3 > c) make some responses dual-clipped."""
    g = torch.Generator().manual_seed(seed)
    out, cur = [], []
    for i in range(n):
        P = int(torch.randint(1, 14, (1,), generator=g))
        R = 0 if i == 3 else int(torch.randint(3, 45, (1,), generator=g))
        old = -torch.rand(R, generator=g) * 2
        spikes = (torch.rand(R, generator=g) < 0.1).float() * 3.5
        if i == 0:  # negative advantage and two dual-clipped tokens: the filter must drop it
            spikes[:2] = 3.5
        lp = old + torch.randn(R, generator=g) * 0.3 + spikes
        adv = (0.3 + float(torch.rand(1, generator=g))) * (-1.0 if i % 2 == 0 else 1.0)
        engine = old + torch.randn(R, generator=g) * 0.1
        out.append(RLSample(prompt_ids=list(range(1, P + 1)), response_ids=list(range(7, 7 + R)),
                            advantage=adv, old_log_prob=old.tolist(), engine_log_prob=lp.tolist(),
                            ref_log_prob=engine.tolist()))
        cur.append(lp)
    return out


def reference(samples, cfg_kwargs):
    """CP = 1, single pack: (loss, per-sample grads of loss w.r.t. the response log-probs, kept count,
    response count, metric (sum, count) pairs)."""
    batch = pack_thd(samples)
    lp = batch.engine_log_prob.clone().requires_grad_(True)  # current log-probs at label positions
    cfg = PolicyLossConfig(**cfg_kwargs)
    out = policy_loss(lp, batch.old_log_prob, batch.advantages, batch.response_mask, cfg,
                      cu_seqlens=batch.cu_seqlens_padded,
                      engine_log_prob=batch.ref_log_prob if cfg.corrects_rollout else None)
    loss = out.loss_sum / out.num_tokens
    loss.backward()
    return float(loss.detach()), [g.clone() for g in unpack_responses(lp.grad, batch)], float(out.num_tokens), \
        float(batch.response_mask.sum()), out.metric_sums


def loss_part(rank, world, layouts, seed):
    results = []
    for cp, dp in layouts:
        # every rank creates every group, in the same order (Megatron order: CP ranks contiguous)
        cp_groups = [dist.new_group(list(range(d * cp, (d + 1) * cp))) for d in range(dp)]
        dp_cp_group = dist.new_group(list(range(world)))
        dp_rank, cp_rank = rank // cp, rank % cp
        samples = make_samples(seed)
        mine = list(range(dp_rank, len(samples), dp))
        mbs = split_into_micro_batches([samples[i] for i in mine], 64, pad_multiple=2 * cp if cp > 1 else 1,
                                       allow_oversize=True)
        for cfg_kwargs in CONFIGS:
            cfg = PolicyLossConfig(**cfg_kwargs)
            loss_sum, count, grads, leaves, metric_sums = 0.0, 0.0, {}, [], {}
            for mb in mbs:
                full = pack_thd([samples[mine[j]] for j in mb], cp_size=cp)
                b = shard_packed_batch(full, cp, cp_rank)
                lp = b.engine_log_prob.clone().requires_grad_(True)
                out = cp_policy_loss(lp, b.old_log_prob, b.advantages, b.response_mask, cfg, b.cp,
                                     cp_groups[dp_rank],
                                     engine_log_prob=b.ref_log_prob if cfg.corrects_rollout else None)
                ls, n_int = out.loss_sum, out.num_tokens
                ls.backward()
                loss_sum += float(ls.detach())
                count += float(n_int)
                for name, (total, n) in out.metric_sums.items():  # summed over micro-batches here, ranks later
                    acc = metric_sums.setdefault(name, [0.0, 0.0])
                    acc[0] += total
                    acc[1] += n
                leaves.append((full, b, lp, mb))
            N = global_token_count(count, dp_cp_group)
            for k, (full, b, lp, mb) in enumerate(leaves):
                if k % 2:  # both inverse paths: gather + unpack with the full batch, or with the shard
                    per_sample = unpack_responses(gather_from_cp(lp.grad / N, b.cp, cp_groups[dp_rank]), full)
                else:
                    per_sample = gather_responses(lp.grad / N, b, cp_groups[dp_rank])
                for j, gi in zip(mb, per_sample):
                    grads[mine[j]] = gi
            results.append(dict(cp=cp, dp=dp, loss_sum=loss_sum, N=N, grads=grads, n_mb=len(mbs),
                                metric_sums=metric_sums))
        if dp == 1:
            results.append(prompt_only_part(cp, cp_rank, cp_groups[0]))
    return results


def _lonely_sample():
    """30 prompt tokens, 1 response token: its label position 29 lies in the last chunk (rank 0)."""
    return RLSample(list(range(1, 31)), [40], advantage=-1.0, old_log_prob=[-1.0], engine_log_prob=[-0.4])


def prompt_only_part(cp, cp_rank, group):
    """A micro-batch where every rank but 0 holds only prompt / padding: no hang, zero share."""
    b = shard_packed_batch(pack_thd([_lonely_sample(), RLSample([1, 2, 3], [])] * 2, cp_size=cp), cp, cp_rank)
    lp = b.engine_log_prob.clone().requires_grad_(True)
    out = cp_policy_loss(lp, b.old_log_prob, b.advantages, b.response_mask, PolicyLossConfig(), b.cp, group)
    out.loss_sum.backward()
    return dict(prompt_only=True, cp=cp, loss_sum=float(out.loss_sum.detach()), n=float(out.num_tokens),
                grad=float(lp.grad.abs().max()), resp=float(b.response_mask.sum()))


def check_loss(results, seed):
    lonely = [[r for r in res if r.get("prompt_only")] for res in results]
    results = [[r for r in res if not r.get("prompt_only")] for res in results]
    ref_b = pack_thd([_lonely_sample(), RLSample([1, 2, 3], [])] * 2)
    ref = policy_loss(ref_b.engine_log_prob, ref_b.old_log_prob, ref_b.advantages, ref_b.response_mask,
                      PolicyLossConfig(), cu_seqlens=ref_b.cu_seqlens_padded)
    for k in range(len(lonely[0])):
        per_rank = [lon[k] for lon in lonely]
        assert per_rank[0]["resp"] == 2 and per_rank[0]["n"] == 2
        for r in per_rank[1:]:
            assert r["resp"] == 0 and r["n"] == 0 and r["loss_sum"] == 0 and r["grad"] == 0
        assert per_rank[0]["loss_sum"] == pytest.approx(float(ref.loss_sum), rel=1e-6)
    samples = make_samples(seed)
    for k, cfg_kwargs in enumerate(CONFIGS):
        ref_loss, ref_grads, ref_count, resp_count, ref_sums = reference(samples, cfg_kwargs)
        if cfg_kwargs.get("kind", "fipo") == "fipo" and k == 0:
            assert 0 < ref_count < resp_count, "test data must make the sequence filter drop something"
            assert ref_sums["seq_filtered_frac"][0] > 0
        if "rollout_is" in cfg_kwargs:  # the sequence-level corrections act (they need the CP sums)
            assert 0 < ref_sums["rollout_is_truncated_frac"][0] < ref_sums["rollout_is_truncated_frac"][1]
            assert 0 < ref_sums["rollout_mask_dropped_frac"][0] < ref_sums["rollout_mask_dropped_frac"][1]
        layouts = sorted({(r["cp"], r["dp"]) for res in results for r in res})
        for li, (cp, dp) in enumerate(layouts):
            per_rank = [res[li * len(CONFIGS) + k] for res in results]
            assert all((r["cp"], r["dp"]) == (cp, dp) for r in per_rank)
            N = per_rank[0]["N"]
            assert N == pytest.approx(ref_count, rel=1e-6), f"{cfg_kwargs} CP{cp}xDP{dp}: token count"
            loss = sum(r["loss_sum"] for r in per_rank) / N
            assert loss == pytest.approx(ref_loss, rel=2e-5, abs=1e-7), f"{cfg_kwargs} CP{cp}xDP{dp}: loss"
            assert any(r["n_mb"] > 1 for r in per_rank), "test must use several micro-batches"
            check_metric_sums(per_rank, ref_sums, f"{cfg_kwargs} CP{cp}xDP{dp}")
            for i, ref_g in enumerate(ref_grads):
                got = per_rank[(i % dp) * cp]["grads"][i]  # CP rank 0 of the owning DP rank
                torch.testing.assert_close(got, ref_g, rtol=2e-5, atol=1e-8,
                                           msg=lambda m: f"{cfg_kwargs} CP{cp}xDP{dp} sample {i}: {m}")
                for c in range(1, cp):  # every CP rank gathered the same gradient
                    torch.testing.assert_close(per_rank[(i % dp) * cp + c]["grads"][i], got)


def check_metric_sums(per_rank, ref_sums, where):
    """Every mean-type metric's (sum, count), summed over micro-batches and all DP x CP ranks, equals the
    unsharded CP = 1 computation's pair (counts of tokens / sequences to rounding, sums to float32
    summation-order error). seq_filtered_frac in particular needs the CP all-reduce of per-sequence
    token counts to count each sequence once."""
    assert set(per_rank[0]["metric_sums"]) == set(ref_sums), where
    for name, (ref_total, ref_count) in ref_sums.items():
        total = sum(r["metric_sums"][name][0] for r in per_rank)
        count = sum(r["metric_sums"][name][1] for r in per_rank)
        assert count == pytest.approx(ref_count, rel=1e-6, abs=1e-6), f"{where} {name}: count"
        assert total == pytest.approx(ref_total, rel=2e-5, abs=1e-5), f"{where} {name}: sum"
