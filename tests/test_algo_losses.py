"""policy_loss against a slow float64 reference: a direct transcription of the issue's 7 steps with
per-token Python loops (it shares no code with fipo_megatron.algo)."""

import dataclasses
import math

import numpy as np
import pytest
import torch

from fipo_megatron.algo.losses import PolicyLossConfig, policy_loss


def reference_loss(log_prob, old_log_prob, advantages, response_mask, sequences, cfg, ref_log_prob=None,
                   force_unit_weight=False, engine_log_prob=None):
    """Returns (loss_sum, num_tokens, grad wrt log_prob, per-token f dict, kept dict, FutureKL dict).

    ``sequences`` is a list of lists of token indices (tuples for [B, L], ints for packed); the token
    order inside a list is the time order.
    """
    lp = log_prob.detach().double().clone().requires_grad_(True)
    old = old_log_prob.detach().double()
    adv = advantages.detach().double()
    mask = response_mask.detach().bool()
    ref = None if ref_log_prob is None else ref_log_prob.detach().double()
    engine = None if engine_log_prob is None else engine_log_prob.detach().double()
    gamma = 2.0 ** (-1.0 / cfg.decay_rate)
    log_c = math.log(cfg.clip_ratio_c)
    fipo = cfg.kind == "fipo" and not force_unit_weight
    high = cfg.clip_ratio_low if cfg.kind == "grpo" else cfg.clip_ratio_high

    total = torch.zeros((), dtype=torch.float64)
    count = 0.0
    weights, kept, future = {}, {}, {}
    for seq in sequences:
        n = len(seq)
        # Step 1.
        delta = [torch.clamp(lp[i] - old[i], -20.0, 20.0) for i in seq]
        ratio = [torch.exp(d) for d in delta]
        # Step 2: participation mask.
        part = []
        for j, i in enumerate(seq):
            ok = bool(mask[i]) and float(delta[j].detach()) <= log_c
            if cfg.future_kl_mask == "negative_advantage":
                ok = bool(mask[i]) and (float(delta[j].detach()) <= log_c or float(adv[i]) >= 0)
            part.append(ok)
        # Step 3: Future-KL by its definition.
        fkl = []
        for t in range(n):
            first = t if cfg.future_kl_start == "current" else t + 1
            last = n if cfg.future_kl_window is None else min(n, t + cfg.future_kl_window)
            num = sum(gamma ** (k - t) * float(delta[k].detach()) for k in range(first, last) if part[k])
            den = sum(gamma ** (k - t) for k in range(first, last) if part[k])
            if cfg.future_kl_average:
                num = num / den if den > 0 else 0.0
            fkl.append(num)
            future[seq[t]] = num
        # Step 4: influence weights.
        f = []
        for t, i in enumerate(seq):
            if not fipo:
                f.append(1.0)
                continue
            w = math.exp(fkl[t])
            eps = cfg.future_kl_clip_ratio
            if eps != 0 and cfg.future_kl_clip_high_only:
                w = min(max(w, 1.0), 1.0 + eps)
            elif eps != 0:
                w = min(max(w, 1.0 - eps), 1.0 + eps)
            else:
                w = min(w, 10.0)
            if float(adv[i]) < 0 and float(ratio[t].detach()) > cfg.safety_threshold:
                w = min(max(w, 0.8), 1.0)
            f.append(w)
            weights[i] = w
        # Step 5b inputs: rho_t = pi_old / pi_engine per response token, and per response.
        is_weight, mis_keep = [1.0] * n, [True] * n
        if engine is not None:
            rho = [math.exp(min(max(float(old[i] - engine[i]), -20.0), 20.0)) if bool(mask[i]) else 1.0 for i in seq]
            seq_rho = math.prod(rho)
            n_resp = sum(1 for i in seq if bool(mask[i]))
            geo_rho = seq_rho ** (1.0 / max(n_resp, 1))
            if cfg.rollout_is != "none":
                is_weight = [min(rho[t] if cfg.rollout_is == "token" else seq_rho, cfg.rollout_is_threshold)
                             for t in range(n)]
            if cfg.rollout_mask != "none":
                upper = cfg.rollout_mask_threshold
                lower = cfg.rollout_mask_threshold_lower or 1.0 / upper
                seq_value = seq_rho if cfg.rollout_mask == "sequence" else geo_rho
                mis_keep = [lower <= (rho[t] if cfg.rollout_mask == "token" else seq_value) <= upper
                            for t in range(n)]
        # Step 5: surrogate with dual clip (times the truncated IS weight of 5b).
        losses, dual = [], 0
        for t, i in enumerate(seq):
            a = float(adv[i]) * f[t]
            r = ratio[t]
            l1 = -a * r
            l2 = -a * torch.clamp(r, 1.0 - cfg.clip_ratio_low, 1.0 + high)
            lc = torch.maximum(l1, l2)
            l3 = torch.tensor(-a * cfg.clip_ratio_c, dtype=torch.float64)
            loss = (torch.minimum(l3, lc) if a < 0 else lc) * is_weight[t]
            if cfg.kl_coef > 0:
                d = torch.clamp(ref[i] - lp[i], -20.0, 20.0)
                loss = loss + cfg.kl_coef * (torch.exp(d) - d - 1.0)
            losses.append(loss)
            if bool(mask[i]) and float(adv[i]) < 0 and float(lc.detach()) > float(l3):
                dual += 1
        # Step 6: sequence filter.
        drop = (cfg.kind == "fipo" and not force_unit_weight and cfg.seq_filter_max_dual_clipped is not None
                and dual > cfg.seq_filter_max_dual_clipped)
        # Step 7: aggregation.
        seq_sum = torch.zeros((), dtype=torch.float64)
        seq_count = 0
        for t, i in enumerate(seq):
            keep = bool(mask[i]) and not drop and mis_keep[t]
            kept[i] = keep
            if keep:
                seq_sum = seq_sum + losses[t]
                seq_count += 1
        if cfg.loss_agg_mode == "token-mean":
            total = total + seq_sum
            count += seq_count
        elif seq_count > 0:
            total = total + seq_sum / seq_count
            count += 1
    if total.requires_grad:
        total.backward()
        grad = lp.grad
    else:
        grad = torch.zeros_like(lp)
    return float(total.detach()), count, grad, weights, kept, future


def row_sequences(batch, length):
    return [[(b, t) for t in range(length)] for b in range(batch)]


def packed_sequences(cu):
    return [list(range(int(a), int(b))) for a, b in zip(cu[:-1], cu[1:])]


# ----------------------------------------------------------------------------------------- inputs


def make_batch(lengths, width, seed, shift_scale=1.2):
    """Right-padded rows: log-probs, old log-probs with some large shifts, per-sequence advantages."""
    gen = torch.Generator().manual_seed(seed)
    rows = len(lengths)
    log_prob = torch.randn(rows, width, generator=gen) * 0.5 - 1.0
    old = log_prob + torch.randn(rows, width, generator=gen) * shift_scale
    adv = torch.randn(rows, 1, generator=gen).expand(rows, width).contiguous()
    if rows > 4:
        adv[4] = 0.0  # a group whose rewards were all equal ...
        old[4, 2] = log_prob[4, 2] - 3.0  # ... with a token beyond the dual-clip threshold
    mask = torch.arange(width)[None, :] < torch.tensor(lengths)[:, None]
    return log_prob, old, adv, mask


def to_packed(tensor, lengths):
    return torch.cat([row[:n] for row, n in zip(tensor, lengths)])


def cu_of(lengths):
    return torch.tensor([0] + list(np.cumsum(lengths)), dtype=torch.int32)


def run(log_prob, old, adv, mask, cfg, **kwargs):
    lp = log_prob.clone().requires_grad_(True)
    out = policy_loss(lp, old, adv, mask, cfg, **kwargs)
    out.loss_sum.backward()
    return out, lp.grad


def assert_matches_reference(out, grad, ref, mask, tol=2e-5):
    ref_sum, ref_count, ref_grad, ref_weights, ref_kept, ref_future = ref
    assert float(out.num_tokens) == pytest.approx(ref_count, abs=1e-9)
    assert out.loss_sum.item() == pytest.approx(ref_sum, rel=tol, abs=tol)
    torch.testing.assert_close(grad.double(), ref_grad, rtol=tol, atol=tol)
    for index, weight in ref_weights.items():
        if bool(mask[index]):
            assert float(out.influence_weights[index]) == pytest.approx(weight, rel=1e-5, abs=1e-6)
    if ref_weights:  # fipo: compare the Future-KL itself, not only the clamped weight
        for index, value in ref_future.items():
            if bool(mask[index]):
                assert float(out.future_kl[index]) == pytest.approx(value, rel=1e-5, abs=1e-5)
    for index, keep in ref_kept.items():
        assert bool(out.loss_mask[index]) == keep


LENGTHS = [12, 0, 1, 30, 25, 30]
FIPO_VARIANTS = [
    dict(),
    dict(future_kl_clip_high_only=False, safety_threshold=3.0),
    dict(future_kl_clip_ratio=0.0, decay_rate=4.0),
    dict(future_kl_mask="negative_advantage", seq_filter_max_dual_clipped=0),
    dict(future_kl_start="next", future_kl_window=5, future_kl_average=True, decay_rate=2.0),
    dict(seq_filter_max_dual_clipped=None, clip_ratio_c=3.0, loss_agg_mode="seq-mean-token-mean"),
]


# ----------------------------------------------------------------------------------------- FIPO


@pytest.mark.parametrize("variant", FIPO_VARIANTS)
def test_fipo_matches_reference_rows_and_packed(variant):
    cfg = PolicyLossConfig(**variant)
    log_prob, old, adv, mask = make_batch(LENGTHS, 30, seed=len(str(variant)))
    ref = reference_loss(log_prob, old, adv, mask, row_sequences(len(LENGTHS), 30), cfg)
    out, grad = run(log_prob, old, adv, mask, cfg)
    assert_matches_reference(out, grad, ref, mask)
    assert out.loss.item() == pytest.approx(ref[0] / max(ref[1], 1), rel=2e-5, abs=2e-5)

    packed = [to_packed(t, LENGTHS) for t in (log_prob, old, adv, mask)]
    cu = cu_of(LENGTHS)
    ref_p = reference_loss(*packed, packed_sequences(cu.tolist()), cfg)
    out_p, grad_p = run(*packed, cfg, cu_seqlens=cu)
    assert_matches_reference(out_p, grad_p, ref_p, packed[3])
    assert out_p.loss_sum.item() == pytest.approx(out.loss_sum.item(), rel=1e-5, abs=1e-6)
    torch.testing.assert_close(grad_p, to_packed(grad, LENGTHS), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(out_p.future_kl, to_packed(out.future_kl, LENGTHS), rtol=1e-5, atol=1e-6)
    for name, value in out.metrics.items():
        assert out_p.metrics[name] == pytest.approx(value, rel=1e-5, abs=1e-6), name


def test_fipo_in_float64_matches_reference_tightly():
    cfg = PolicyLossConfig(safety_threshold=2.0, future_kl_clip_high_only=False)
    log_prob, old, adv, mask = (t.double() if t.is_floating_point() else t for t in make_batch(LENGTHS, 30, seed=3))
    ref = reference_loss(log_prob, old, adv, mask, row_sequences(len(LENGTHS), 30), cfg)
    out, grad = run(log_prob, old, adv, mask, cfg)
    assert_matches_reference(out, grad, ref, mask, tol=1e-6)


def test_reference_exercises_every_branch():
    """The shared inputs hit the clip, the dual clip, the safety rule and the filter (else the
    comparisons above would prove little)."""
    cfg = PolicyLossConfig(safety_threshold=3.0)
    log_prob, old, adv, mask = make_batch(LENGTHS, 30, seed=1)
    out, _ = run(log_prob, old, adv, mask, cfg)
    assert out.metrics["pg_clipfrac"] > 0 and out.metrics["pg_clipfrac_lower"] > 0
    assert 0 < out.metrics["seq_filtered_frac"] < 1
    assert out.metrics["influence_frac_upper"] > 0 and out.metrics["influence_frac_lower"] > 0
    unsafe = mask & (adv < 0) & ((log_prob - old).clamp(-20, 20).exp() > 3.0)
    assert unsafe.any() and (out.influence_weights[unsafe] <= 1.0).all()


def test_sequence_filter_drops_responses_with_too_many_dual_clipped_tokens():
    width = 6
    log_prob = torch.zeros(3, width)
    old = torch.zeros(3, width)
    adv = torch.tensor([[-1.0], [-1.0], [1.0]]).expand(3, width).contiguous()
    mask = torch.ones(3, width, dtype=torch.bool)
    old[0, [1, 4]] = -3.0  # two tokens with r = e^3 > c = 10 and A < 0: dropped
    old[1, 2] = -3.0  # one such token: kept
    old[2, [0, 1, 2]] = -3.0  # positive advantage: never dual-clipped
    out, grad = run(log_prob, old, adv, mask, PolicyLossConfig())
    assert out.loss_mask[0].sum() == 0 and out.loss_mask[1:].all()
    assert float(out.num_tokens) == 2 * width and (grad[0] == 0).all()
    assert out.metrics["seq_filtered_frac"] == pytest.approx(1 / 3)
    out2, _ = run(log_prob, old, adv, mask, PolicyLossConfig(seq_filter_max_dual_clipped=2))
    assert out2.loss_mask.all()
    out3, _ = run(log_prob, old, adv, mask, PolicyLossConfig(kind="dapo"))
    assert out3.loss_mask.all()


# ----------------------------------------------------------------------------------------- DAPO, GRPO


def test_dapo_is_fipo_with_unit_weight_and_no_filter():
    cfg = PolicyLossConfig(kind="dapo")
    log_prob, old, adv, mask = make_batch(LENGTHS, 30, seed=7)
    ref = reference_loss(log_prob, old, adv, mask, row_sequences(len(LENGTHS), 30), cfg, force_unit_weight=True)
    out, grad = run(log_prob, old, adv, mask, cfg)
    assert_matches_reference(out, grad, ref, mask)
    assert (out.influence_weights == 1).all() and torch.equal(out.loss_mask, mask)
    fipo, _ = run(log_prob, old, adv, mask, dataclasses.replace(cfg, kind="fipo"))
    assert fipo.loss_sum.item() != pytest.approx(out.loss_sum.item(), rel=1e-3)


@pytest.mark.parametrize("agg", ["token-mean", "seq-mean-token-mean"])
def test_grpo_symmetric_clip_kl_penalty_and_aggregation(agg):
    cfg = PolicyLossConfig(kind="grpo", kl_coef=0.05, loss_agg_mode=agg, clip_ratio_c=3.0)
    log_prob, old, adv, mask = make_batch(LENGTHS, 30, seed=11)
    ref_lp = log_prob + 0.3 * torch.randn(log_prob.shape, generator=torch.Generator().manual_seed(0))
    ref = reference_loss(log_prob, old, adv, mask, row_sequences(len(LENGTHS), 30), cfg, ref_log_prob=ref_lp)
    out, grad = run(log_prob, old, adv, mask, cfg, ref_log_prob=ref_lp)
    assert_matches_reference(out, grad, ref, mask)
    assert out.metrics["kl_penalty"] > 0
    if agg == "seq-mean-token-mean":
        assert float(out.num_tokens) == sum(1 for n in LENGTHS if n > 0)


# ----------------------------------------------------------------------------------------- edge cases


def test_all_masked_rows_give_zero_loss_without_nan():
    log_prob, old, adv, _ = make_batch([4, 4], 4, seed=2)
    mask = torch.zeros(2, 4, dtype=torch.bool)
    for agg in ("token-mean", "seq-mean-token-mean"):
        for kind in ("fipo", "dapo", "grpo"):
            out, grad = run(log_prob, old, adv, mask, PolicyLossConfig(kind=kind, loss_agg_mode=agg))
            assert out.loss.item() == 0 and float(out.num_tokens) == 0 and (grad == 0).all()
            assert all(np.isfinite(v) for v in out.metrics.values())


def test_extreme_ratios_stay_finite_and_match_reference():
    log_prob, old, adv, mask = make_batch([8, 8, 3], 8, seed=4)
    old[0, :4] = log_prob[0, :4] + 60.0  # ratio e^-20 after the clamp
    old[1, :4] = log_prob[1, :4] - 60.0  # ratio e^20
    adv[1] = -2.0
    cfg = PolicyLossConfig(seq_filter_max_dual_clipped=None)
    out, grad = run(log_prob, old, adv, mask, cfg)
    assert torch.isfinite(out.loss_sum) and torch.isfinite(grad).all()
    assert_matches_reference(out, grad, reference_loss(log_prob, old, adv, mask, row_sequences(3, 8), cfg), mask)


def test_length_one_responses():
    log_prob, old, adv, mask = make_batch([1, 1, 1], 1, seed=5)
    cfg = PolicyLossConfig(safety_threshold=1.5)
    out, grad = run(log_prob, old, adv, mask, cfg)
    assert_matches_reference(out, grad, reference_loss(log_prob, old, adv, mask, row_sequences(3, 1), cfg), mask)
    cu = cu_of([1, 1, 1])
    out_p, grad_p = run(log_prob[:, 0], old[:, 0], adv[:, 0], mask[:, 0], cfg, cu_seqlens=cu)
    assert out_p.loss_sum.item() == pytest.approx(out.loss_sum.item(), rel=1e-6)


@pytest.mark.parametrize("name", ["log_prob", "old_log_prob", "advantages", "ref_log_prob"])
@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_non_finite_inputs_raise_naming_the_tensor(name, bad):
    log_prob, old, adv, mask = make_batch([3, 3], 3, seed=6)
    tensors = dict(log_prob=log_prob, old_log_prob=old, advantages=adv, ref_log_prob=log_prob.clone())
    tensors[name] = tensors[name].clone()
    tensors[name][1, 2] = bad
    cfg = PolicyLossConfig(kind="grpo", kl_coef=0.1)
    with pytest.raises(ValueError, match=name):
        policy_loss(tensors["log_prob"], tensors["old_log_prob"], tensors["advantages"], mask, cfg,
                    ref_log_prob=tensors["ref_log_prob"])


def test_bad_shapes_masks_and_configs_raise():
    log_prob, old, adv, mask = make_batch([3, 3], 3, seed=6)
    cfg = PolicyLossConfig()
    with pytest.raises(ValueError, match="old_log_prob"):
        policy_loss(log_prob, old[:, :2], adv, mask, cfg)
    with pytest.raises(ValueError, match="response_mask"):
        policy_loss(log_prob, old, adv, mask[:1], cfg)
    with pytest.raises(ValueError, match="0 and 1"):
        policy_loss(log_prob, old, adv, mask.float() * 2, cfg)
    with pytest.raises(ValueError, match="ref_log_prob"):
        policy_loss(log_prob, old, adv, mask, PolicyLossConfig(kl_coef=0.1))
    with pytest.raises(ValueError, match="cu_seqlens"):
        policy_loss(log_prob.flatten(), old.flatten(), adv.flatten(), mask.flatten(), cfg)
    with pytest.raises(ValueError, match="outside every sequence"):
        policy_loss(log_prob.flatten(), old.flatten(), adv.flatten(), mask.flatten(), cfg,
                    cu_seqlens=torch.tensor([0, 3, 5]))
    for bad in (dict(kind="ppo"), dict(clip_ratio_c=1.0), dict(future_kl_window=0), dict(decay_rate=-1.0),
                dict(loss_agg_mode="seq-sum"), dict(future_kl_mask="positive"), dict(seq_filter_max_dual_clipped=-1)):
        with pytest.raises(ValueError, match=next(iter(bad))):
            PolicyLossConfig(**bad)


# ----------------------------------------------------------------------------------------- hooks


def test_future_kl_fn_and_seq_sum_fn_hooks_are_called_and_used():
    log_prob, old, adv, mask = make_batch(LENGTHS, 30, seed=8)
    calls = {"fkl": 0, "seq": 0}

    def constant_future_kl(delta, participation):
        calls["fkl"] += 1
        assert participation.dtype == torch.bool and not delta.requires_grad
        return torch.full_like(delta, 0.1)

    def doubled(per_seq):
        calls["seq"] += 1
        return per_seq * 2  # as if a second context-parallel rank held the same counts

    cfg = PolicyLossConfig(loss_agg_mode="seq-mean-token-mean", seq_filter_max_dual_clipped=1)
    out, _ = run(log_prob, old, adv, mask, cfg, future_kl_fn=constant_future_kl, seq_sum_fn=doubled)
    assert calls["fkl"] == 1 and calls["seq"] >= 2
    unsafe = (adv < 0) & ((log_prob - old).clamp(-20, 20).exp() > cfg.safety_threshold)
    expected = torch.where(unsafe, torch.tensor(1.0), torch.tensor(float(np.exp(0.1))))
    torch.testing.assert_close(out.influence_weights[mask], expected[mask])
    plain, _ = run(log_prob, old, adv, mask, cfg, future_kl_fn=constant_future_kl)
    # Doubled global counts: each rank holds half of every sequence, and a sequence is dropped as soon
    # as it has one local dual-clipped token.
    assert float(out.num_tokens) == pytest.approx(0.5 * float(out.loss_mask.any(dim=1).sum()))
    assert out.loss_mask.sum() <= plain.loss_mask.sum()
    with pytest.raises(ValueError, match="future_kl_fn"):
        policy_loss(log_prob, old, adv, mask, cfg, future_kl_fn=lambda d, m: d[:, :3])


# ----------------------------------------------------------------------------------------- metrics


def test_metrics_match_naive_computation():
    cfg = PolicyLossConfig(safety_threshold=3.0)
    log_prob, old, adv, mask = make_batch(LENGTHS, 30, seed=1)
    out, _ = run(log_prob, old, adv, mask, cfg)
    ref = reference_loss(log_prob, old, adv, mask, row_sequences(len(LENGTHS), 30), cfg)
    delta = (log_prob - old).double().clamp(-20, 20)
    r = delta.exp()
    a = adv.double()
    tokens = [(b, t) for b in range(len(LENGTHS)) for t in range(30) if mask[b, t]]
    neg = [i for i in tokens if a[i] < 0]
    pos = [i for i in tokens if a[i] > 0]
    f = ref[3]
    clipped = [i for i in tokens if -a[i] * f[i] * float(r[i].clamp(0.8, 1.28)) > -a[i] * f[i] * float(r[i])]
    assert out.metrics["pg_clipfrac"] == pytest.approx(len(clipped) / len(tokens))
    assert out.metrics["pg_clipfrac_lower"] == pytest.approx(sum(1 for i in neg if r[i] > 10) / len(tokens))
    assert out.metrics["ppo_kl"] == pytest.approx(float(sum(-delta[i] for i in tokens)) / len(tokens), rel=1e-5)
    assert out.metrics["influence_weight_mean"] == pytest.approx(sum(f[i] for i in tokens) / len(tokens), rel=1e-5)
    assert out.metrics["influence_weight_max"] == pytest.approx(max(f[i] for i in tokens), rel=1e-6)
    frac = sum(1 for i in neg if 2 <= r[i] < 3) / len(neg)
    assert out.metrics["neg_adv_ratio_frac_2_3"] == pytest.approx(frac)
    assert out.metrics["neg_is_p995"] == pytest.approx(np.quantile([float(r[i]) for i in neg], 0.995), rel=1e-5)
    assert out.metrics["pos_is_p005"] == pytest.approx(np.quantile([float(r[i]) for i in pos], 0.005), rel=1e-5)
    assert out.metrics["pos_is_min"] == pytest.approx(min(float(r[i]) for i in pos), rel=1e-6)
    dropped = sum(1 for b, n in enumerate(LENGTHS) if n > 0 and not ref[4][(b, 0)])
    assert out.metrics["seq_filtered_frac"] == pytest.approx(dropped / sum(1 for n in LENGTHS if n > 0))


def test_metric_sums_reduce_exactly_over_micro_batches():
    cfg = PolicyLossConfig(safety_threshold=3.0)
    log_prob, old, adv, mask = make_batch(LENGTHS, 30, seed=1)
    full, _ = run(log_prob, old, adv, mask, cfg)
    parts = [run(log_prob[s], old[s], adv[s], mask[s], cfg)[0] for s in (slice(0, 2), slice(2, 6))]
    assert sum(p.loss_sum.item() for p in parts) == pytest.approx(full.loss_sum.item(), rel=1e-5)
    assert sum(float(p.num_tokens) for p in parts) == float(full.num_tokens)
    for name, (total, count) in full.metric_sums.items():
        reduced = [sum(p.metric_sums[name][k] for p in parts) for k in (0, 1)]
        assert reduced[1] == count and reduced[0] == pytest.approx(total, rel=1e-6, abs=1e-9), name
    for name, value in full.metric_mins.items():
        if not name.endswith("p005"):
            assert min(p.metric_mins[name] for p in parts) == pytest.approx(value), name
    for name, value in full.metric_maxs.items():
        if not name.endswith("p995"):
            assert max(p.metric_maxs[name] for p in parts) == pytest.approx(value), name


def test_float_mask_and_low_precision_inputs_match_bool_float32():
    log_prob, old, adv, mask = make_batch(LENGTHS, 30, seed=12)
    cfg = PolicyLossConfig()
    base, grad = run(log_prob, old, adv, mask, cfg)
    as_float, grad_f = run(log_prob, old, adv, mask.float(), cfg)
    assert as_float.loss_sum.item() == base.loss_sum.item() and torch.equal(grad_f, grad)
    half, _ = run(log_prob.bfloat16(), old.bfloat16(), adv, mask, cfg)
    assert half.loss_sum.dtype == torch.float32 and torch.isfinite(half.loss_sum)


# ----------------------------------------------------------------------------------------- fast paths


@pytest.mark.parametrize("variant", FIPO_VARIANTS)
def test_fast_paths_match_reference_and_slow_paths(variant):
    """Small shifts: no token has r > c or r > safety_threshold, so policy_loss skips the participation
    and safety masks. It must match the reference, and the forced slow path (one masked-out token with a
    huge shift, which changes no response-token quantity) bit for bit on the loss and gradient."""
    cfg = PolicyLossConfig(**variant)
    log_prob, old, adv, mask = make_batch(LENGTHS, 30, seed=7, shift_scale=0.05)
    old[4, 2] = log_prob[4, 2] - 0.01  # make_batch's deliberate large shift, made small
    adv[1] = -1.0  # the all-masked row: a negative advantage at its tokens
    assert float((log_prob - old).max()) < math.log(min(cfg.clip_ratio_c, cfg.safety_threshold)) - 0.01
    ref = reference_loss(log_prob, old, adv, mask, row_sequences(len(LENGTHS), 30), cfg)
    out, grad = run(log_prob, old, adv, mask, cfg)
    assert_matches_reference(out, grad, ref, mask)

    slow_lp = log_prob.clone()
    slow_lp[1, 3] = old[1, 3] + 15.0  # masked out (row 1 is empty): r > c and r > safety_threshold there
    slow, slow_grad = run(slow_lp, old, adv, mask, cfg)
    assert slow.loss_sum.item() == out.loss_sum.item() and torch.equal(slow_grad, grad)
    assert torch.equal(slow.future_kl[mask], out.future_kl[mask])
    assert torch.equal(slow.influence_weights[mask], out.influence_weights[mask])
    assert torch.equal(slow.loss_mask, out.loss_mask)
    for name, value in out.metrics.items():
        assert slow.metrics[name] == pytest.approx(value, rel=1e-6, abs=1e-9), name
    for name in ("influence_frac_upper", "influence_frac_lower", "pg_clipfrac_lower"):
        assert slow.metric_sums[name] == out.metric_sums[name], name


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_masked_count_compare_equals_bool_comparison(dtype):
    from fipo_megatron.algo.tensor_utils import masked_count_compare

    gen = torch.Generator().manual_seed(0)
    eps = torch.finfo(dtype).eps
    for threshold in (1.2 - 1e-7, 1.0 + 1e-7, 0.8 + 1e-7, 1e-7, 10.0 - 1e-7, 0.5, 3.0):
        t = torch.tensor(threshold, dtype=dtype)
        near = t * (1 + eps * torch.randint(-4, 5, (400,), generator=gen).to(dtype))
        values = torch.cat([near, t.expand(5), torch.rand(400, generator=gen, dtype=dtype) * 2 * threshold])
        keep = torch.rand(values.shape, generator=gen) < 0.7
        for op in ("ge", "le"):
            expected = torch.count_nonzero(((values >= threshold) if op == "ge" else (values <= threshold)) & keep)
            got = masked_count_compare(values, op, threshold, keep.to(dtype))
            assert got is not None and got.item() == expected.item(), (threshold, op)
    ones = torch.ones(3, dtype=torch.bfloat16)
    assert masked_count_compare(ones, "ge", 1.0, ones) is None


# ----------------------------------------------------------------------------------------- pinned cases


def one_row(deltas, advantage, dtype=torch.float64):
    """One response with the given log-ratios: log_prob = delta, old_log_prob = 0 (so delta is exact)."""
    log_prob = torch.tensor([deltas], dtype=dtype)
    old = torch.zeros_like(log_prob)
    adv = torch.full_like(log_prob, float(advantage))
    return log_prob, old, adv, torch.ones_like(log_prob, dtype=torch.bool)


def test_safety_rule_applies_below_the_dual_clip_threshold():
    """Hand-derived (safety_threshold 3 < clip_ratio_c 10): one A < 0 token with r = 4.5 participates
    (4.5 < c), FutureKL = log 4.5, exp -> 4.5, clamped to [1, 1.2] -> 1.2, then the safety rule
    (A < 0, r > 3) clamps it to [0.8, 1] -> 1.0. Loss = min(-A c, max(-A r, -A clip(r))) = 4.5 = dL/dlogp."""
    cfg = PolicyLossConfig(safety_threshold=3.0)
    log_prob, old, adv, mask = one_row([math.log(4.5)], -1.0)
    out, grad = run(log_prob, old, adv, mask, cfg)
    assert float(out.future_kl[0, 0]) == pytest.approx(math.log(4.5), rel=1e-6)
    assert float(out.influence_weights[0, 0]) == 1.0
    assert out.loss_sum.item() == pytest.approx(4.5, rel=1e-12)
    assert grad[0, 0].item() == pytest.approx(4.5, rel=1e-12)
    assert out.metrics["influence_weight_max"] == 1.0


def test_participation_boundary_delta_equal_to_log_c_participates():
    """delta == log(c) exactly (float64) is inside M (delta <= log c); a later token with delta > log c
    is not. Hand-derived FutureKL (start "current", decay_rate 1): t0 = log c + 0.5 * 0 = log c, t1 = 0."""
    c = 4.0
    cfg = PolicyLossConfig(clip_ratio_c=c, decay_rate=1.0, seq_filter_max_dual_clipped=None)
    log_prob, old, adv, mask = one_row([math.log(c), math.log(c) + 1.0], 1.0)
    assert float(log_prob[0, 0] - old[0, 0]) == math.log(c)  # exactly on the boundary
    out, _ = run(log_prob, old, adv, mask, cfg)
    assert float(out.future_kl[0, 0]) == pytest.approx(math.log(c), rel=1e-6)
    assert float(out.future_kl[0, 1]) == 0.0


def test_dual_clip_boundary_loss_ppo_equal_to_loss_dual_is_not_counted():
    """r == c exactly (float64: exp(log 4) == 4) with A < 0: loss_ppo = -A f r equals loss_dual = -A f c,
    which is NOT dual-clipped (strict >). So pg_clipfrac_lower = 0 and, with a filter that tolerates no
    dual-clipped token, the response is kept; the loss is -A f c with f = clamp(exp(log 4), 1, 1.2) = 1.2."""
    c = 4.0
    cfg = PolicyLossConfig(clip_ratio_c=c, seq_filter_max_dual_clipped=0, safety_threshold=100.0)
    log_prob, old, adv, mask = one_row([math.log(c)], -1.0)
    assert float(torch.exp(log_prob - old)[0, 0]) == c  # the boundary is hit exactly
    out, _ = run(log_prob, old, adv, mask, cfg)
    assert out.metrics["pg_clipfrac_lower"] == 0.0
    assert out.metrics["seq_filtered_frac"] == 0.0
    assert float(out.num_tokens) == 1.0 and bool(out.loss_mask[0, 0])
    assert out.loss_sum.item() == pytest.approx(1.2 * c, rel=1e-12)
    # just above the boundary it is dual-clipped and the response is dropped
    above, *_ = run(*one_row([math.log(c) + 1e-9], -1.0), cfg)
    assert above.metrics["pg_clipfrac_lower"] == 1.0 and float(above.num_tokens) == 0.0


def test_no_clip_mode_influence_bound_fractions_match_reference_weights():
    """future_kl_clip_ratio == 0: the weight is min(exp(FutureKL), 10) with no lower clamp, so the
    'lower bound' is 0 and influence_frac_lower counts weights <= 1e-7; influence_frac_upper counts
    weights >= 10 - 1e-7. Both against the float64 reference's weights."""
    cfg = PolicyLossConfig(future_kl_clip_ratio=0.0, decay_rate=4.0)
    log_prob, old, adv, mask = make_batch(LENGTHS, 30, seed=7)
    out, _ = run(log_prob, old, adv, mask, cfg)
    weights = reference_loss(log_prob, old, adv, mask, row_sequences(len(LENGTHS), 30), cfg)[3]
    tokens = [(b, t) for b in range(len(LENGTHS)) for t in range(30) if mask[b, t]]
    assert any(weights[i] < 0.9 for i in tokens) and any(weights[i] >= 10 for i in tokens)  # both sides occur
    lower = sum(1 for i in tokens if weights[i] <= 1e-7) / len(tokens)
    upper = sum(1 for i in tokens if weights[i] >= 10 - 1e-7) / len(tokens)
    assert out.metrics["influence_frac_lower"] == pytest.approx(lower, abs=1e-12)
    assert out.metrics["influence_frac_upper"] == pytest.approx(upper, abs=1e-12)
    assert out.metrics["influence_weight_min"] == pytest.approx(min(weights[i] for i in tokens), rel=1e-5)


@pytest.mark.parametrize("c", [3.5, 6.0, 25.0])
def test_negative_ratio_buckets_use_clip_ratio_c(c):
    """neg_adv_ratio_frac_{2_3,3_4,4_c}: among A < 0 response tokens, the fraction with r in [2,3),
    [3,4), [4,c), counted in a Python loop over hand-picked ratios (some in [4, 10) beyond c = 6)."""
    ratios = [1.0, 2.5, 3.5, 4.5, 5.5, 7.0, 9.0, 12.0, 30.0, 0.5]
    cfg = PolicyLossConfig(clip_ratio_c=c, seq_filter_max_dual_clipped=None)
    log_prob, old, adv, mask = one_row([math.log(r) for r in ratios], -1.0)
    out, _ = run(log_prob, old, adv, mask, cfg)
    r = torch.exp(log_prob - old)[0].tolist()
    for name, lo, hi in (("2_3", 2.0, 3.0), ("3_4", 3.0, 4.0), ("4_c", 4.0, c)):
        expected = sum(1 for v in r if lo <= v < hi) / len(r)
        assert out.metrics[f"neg_adv_ratio_frac_{name}"] == pytest.approx(expected, abs=1e-12), name


def test_extreme_ratio_metrics_use_the_clamped_delta():
    """|delta| beyond 10 and beyond 20: ppo_kl = mean of -clamp(delta, -20, 20) and neg_is_max = the
    largest clamped ratio over A < 0 tokens, from float64 loops."""
    deltas = [15.0, 25.0, -15.0, -30.0, 0.3, 12.0]
    log_prob, old, adv, mask = one_row(deltas, -1.0)
    out, _ = run(log_prob, old, adv, mask, PolicyLossConfig(seq_filter_max_dual_clipped=None))
    clamped = [min(max(d, -20.0), 20.0) for d in deltas]
    assert out.metrics["ppo_kl"] == pytest.approx(sum(-d for d in clamped) / len(deltas), rel=1e-12)
    assert out.metrics["neg_is_max"] == pytest.approx(math.exp(max(clamped)), rel=1e-12)
    pos = one_row(deltas, 1.0)
    out_pos, _ = run(*pos, PolicyLossConfig(seq_filter_max_dual_clipped=None))
    assert out_pos.metrics["pos_is_min"] == pytest.approx(math.exp(min(clamped)), rel=1e-12)
