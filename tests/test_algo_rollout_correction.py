"""Truncated / masked importance sampling against the rollout engine (``algo.rollout_correction``).

Reference: ``test_algo_losses.reference_loss``, a float64 per-token loop that computes rho = pi_old /
pi_engine, its per-response product and geometric mean, the truncated weight and the mask by their
definitions (it shares no code with the package).
"""

import dataclasses
import math

import pytest
import torch
from test_algo_losses import (LENGTHS, assert_matches_reference, cu_of, make_batch, packed_sequences,
                              reference_loss, row_sequences, run, to_packed)

from fipo_megatron.algo.losses import PolicyLossConfig, policy_loss

WIDTH = 30
CORRECTIONS = [
    dict(rollout_is="token"),
    dict(rollout_is="token", rollout_is_threshold=1.5, kind="dapo"),
    dict(rollout_is="sequence", rollout_is_threshold=3.0),
    dict(rollout_mask="token", rollout_mask_threshold=1.5),
    dict(rollout_mask="sequence", rollout_mask_threshold=4.0, rollout_mask_threshold_lower=0.5),
    dict(rollout_mask="geometric", rollout_mask_threshold=1.1),
    dict(rollout_is="token", rollout_mask="geometric", rollout_mask_threshold=1.1,
         loss_agg_mode="seq-mean-token-mean"),
    dict(rollout_is="sequence", rollout_mask="token", kind="grpo", kl_coef=0.1),
]


def engine_log_probs(old, seed, scale=0.25):
    """The engine's log-probs: the trainer's old ones plus a mismatch of typical size ``scale``."""
    g = torch.Generator().manual_seed(seed)
    return old + scale * torch.randn(old.shape, generator=g)


def make_inputs(seed):
    log_prob, old, adv, mask = make_batch(LENGTHS, WIDTH, seed=seed)
    return log_prob, old, adv, mask, engine_log_probs(old, seed + 100)


@pytest.mark.parametrize("variant", CORRECTIONS, ids=lambda v: "-".join(f"{k}={v[k]}" for k in v))
def test_corrections_match_float64_reference_rows_and_packed(variant):
    cfg = PolicyLossConfig(**variant)
    log_prob, old, adv, mask, engine = make_inputs(seed=len(str(variant)))
    ref_lp = old - 0.1 if cfg.kl_coef > 0 else None
    extra = {} if ref_lp is None else {"ref_log_prob": ref_lp}
    ref = reference_loss(log_prob, old, adv, mask, row_sequences(len(LENGTHS), WIDTH), cfg, engine_log_prob=engine,
                         **extra)
    out, grad = run(log_prob, old, adv, mask, cfg, engine_log_prob=engine, **extra)
    assert_matches_reference(out, grad, ref, mask)

    packed = [to_packed(t, LENGTHS) for t in (log_prob, old, adv, mask, engine)]
    packed_extra = {} if ref_lp is None else {"ref_log_prob": to_packed(ref_lp, LENGTHS)}
    cu = cu_of(LENGTHS)
    ref_p = reference_loss(*packed[:4], packed_sequences(cu.tolist()), cfg, engine_log_prob=packed[4],
                           **packed_extra)
    out_p, grad_p = run(*packed[:4], cfg, cu_seqlens=cu, engine_log_prob=packed[4], **packed_extra)
    assert_matches_reference(out_p, grad_p, ref_p, packed[3])


def test_the_corrections_act_on_this_data():
    """The reference cases are not vacuous: each correction changes the loss or the kept tokens."""
    log_prob, old, adv, mask, engine = make_inputs(seed=5)
    base = policy_loss(log_prob, old, adv, mask, PolicyLossConfig())
    for variant in CORRECTIONS:
        cfg = PolicyLossConfig(**{k: v for k, v in variant.items() if k.startswith("rollout")})
        out = policy_loss(log_prob, old, adv, mask, cfg, engine_log_prob=engine)
        changed = (not torch.equal(out.loss_mask, base.loss_mask)) or abs(float(out.loss_sum - base.loss_sum)) > 1e-4
        assert changed, variant


@pytest.mark.parametrize("variant", CORRECTIONS, ids=lambda v: "-".join(f"{k}={v[k]}" for k in v))
@pytest.mark.parametrize("packed", [False, True], ids=["rows", "packed"])
def test_no_change_when_engine_and_trainer_agree(variant, packed):
    """pi_engine == pi_old: the same loss, gradient, mask, Future-KL and metrics as with the corrections off."""
    cfg = PolicyLossConfig(**variant)
    off = dataclasses.replace(cfg, rollout_is="none", rollout_mask="none")
    log_prob, old, adv, mask, _ = make_inputs(seed=11)
    ref_lp = old - 0.1
    kw = {}
    if packed:
        log_prob, old, adv, mask, ref_lp = (to_packed(t, LENGTHS) for t in (log_prob, old, adv, mask, ref_lp))
        kw["cu_seqlens"] = cu_of(LENGTHS)
    with_ref = {"ref_log_prob": ref_lp} if cfg.kl_coef > 0 else {}
    out_on, grad_on = run(log_prob, old, adv, mask, cfg, engine_log_prob=old.clone(), **kw, **with_ref)
    out_off, grad_off = run(log_prob, old, adv, mask, off, **kw, **with_ref)
    assert torch.equal(out_on.loss_sum, out_off.loss_sum) and torch.equal(out_on.num_tokens, out_off.num_tokens)
    assert torch.equal(grad_on, grad_off)
    assert torch.equal(out_on.loss_mask, out_off.loss_mask)
    assert torch.equal(out_on.future_kl, out_off.future_kl)
    assert torch.equal(out_on.influence_weights, out_off.influence_weights)
    for name, value in out_off.metrics.items():
        assert out_on.metrics[name] == value, name
    extra = {k: v for k, v in out_on.metrics.items() if k not in out_off.metrics}
    if cfg.rollout_is != "none":
        assert extra["rollout_is_weight_mean"] == 1.0 and extra["rollout_is_truncated_frac"] == 0.0
        assert extra["rollout_is_raw_weight_min"] == 1.0 == extra["rollout_is_raw_weight_max"]
    if cfg.rollout_mask != "none":
        assert extra["rollout_mask_dropped_frac"] == 0.0


def test_future_kl_and_influence_use_the_trainers_old_log_probs():
    """However far the engine is off, FutureKL and the influence weights are those of the trainer's pi_old."""
    log_prob, old, adv, mask, _ = make_inputs(seed=3)
    engine = engine_log_probs(old, 7, scale=2.0)
    cfg = PolicyLossConfig(rollout_is="token", rollout_mask="token", rollout_mask_threshold=50.0)
    out = policy_loss(log_prob, old, adv, mask, cfg, engine_log_prob=engine)
    plain = policy_loss(log_prob, old, adv, mask, PolicyLossConfig())
    assert torch.equal(out.future_kl, plain.future_kl)
    assert torch.equal(out.influence_weights, plain.influence_weights)
    assert not torch.equal(out.loss_sum, plain.loss_sum)


def test_metrics_match_a_naive_count():
    log_prob, old, adv, mask, engine = make_inputs(seed=21)
    cfg = PolicyLossConfig(rollout_is="token", rollout_is_threshold=1.2, rollout_mask="token",
                           rollout_mask_threshold=1.4, rollout_mask_threshold_lower=0.8)
    m = policy_loss(log_prob, old, adv, mask, cfg, engine_log_prob=engine).metrics
    rho = [math.exp(float(old[i, j] - engine[i, j])) for i in range(len(LENGTHS)) for j in range(WIDTH)
           if bool(mask[i, j])]
    assert m["rollout_is_truncated_frac"] == pytest.approx(sum(r > 1.2 for r in rho) / len(rho))
    assert m["rollout_is_weight_mean"] == pytest.approx(sum(min(r, 1.2) for r in rho) / len(rho), rel=1e-5)
    assert m["rollout_is_raw_weight_max"] == pytest.approx(max(rho), rel=1e-5)
    assert m["rollout_is_raw_weight_min"] == pytest.approx(min(rho), rel=1e-5)
    assert m["rollout_mask_dropped_frac"] == pytest.approx(sum(not 0.8 <= r <= 1.4 for r in rho) / len(rho))
    assert 0 < m["rollout_is_truncated_frac"] < 1 and 0 < m["rollout_mask_dropped_frac"] < 1


def test_bad_settings_and_missing_engine_log_probs_raise_clearly():
    log_prob, old, adv, mask, engine = make_inputs(seed=1)
    with pytest.raises(ValueError, match="engine_log_prob"):
        policy_loss(log_prob, old, adv, mask, PolicyLossConfig(rollout_is="token"))
    with pytest.raises(ValueError, match="engine_log_prob has shape"):
        policy_loss(log_prob, old, adv, mask, PolicyLossConfig(rollout_mask="token"), engine_log_prob=engine[:, :3])
    bad = engine.clone()
    bad[0, 0] = float("nan")
    with pytest.raises(ValueError, match="engine_log_prob contains NaN"):
        policy_loss(log_prob, old, adv, mask, PolicyLossConfig(rollout_is="token"), engine_log_prob=bad)
    for kwargs, flag in ((dict(rollout_is="tokens"), "--rollout-is"),
                         (dict(rollout_is_threshold=0.5), "--rollout-is-threshold"),
                         (dict(rollout_mask="seq"), "--rollout-mask"),
                         (dict(rollout_mask_threshold=float("inf")), "--rollout-mask-threshold"),
                         (dict(rollout_mask_threshold_lower=1.5), "--rollout-mask-threshold-lower")):
        with pytest.raises(ValueError, match=flag):
            PolicyLossConfig(**kwargs)
