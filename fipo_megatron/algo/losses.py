"""Policy losses of FIPO, DAPO and GRPO behind one entry point, ``policy_loss``.

FIPO (kind="fipo"), matching the official implementation (verl ``compute_policy_loss_future_kl``):

1. delta = clamp(logp - logp_old, -20, 20), r = exp(delta).
2. Participation mask M = response_mask & (delta <= log c). future_kl_mask="negative_advantage"
   follows the paper's prose instead ("mask tokens with negative advantage that exceed the dual-clip
   threshold"): a token is excluded only when A < 0 AND r > c, i.e. M = mask & (delta <= log c | A >= 0).
3. FutureKL = future_kl(delta, M, decay_rate, start, window, average) (detached).
4. f = exp(FutureKL) clamped to [1, 1+eps] (clip_high_only), [1-eps, 1+eps], or (eps == 0) to <= 10;
   then where A < 0 and r > safety_threshold: f = clamp(f, 0.8, 1.0). f carries no gradient.
5. A~ = A f; l1 = -A~ r; l2 = -A~ clip(r, 1-lo, 1+hi); lc = max(l1, l2); l3 = -A~ c;
   per-token loss = min(l3, lc) where A~ < 0 else lc (dual clip).
6. A sequence with more than ``seq_filter_max_dual_clipped`` tokens where (A < 0 and lc > l3) is
   dropped from the loss mask (numerator and denominator).
7. token-mean: loss_sum = sum(loss * kept), num_tokens = sum(kept), returned separately so that the
   caller divides by the token count of the whole global mini-batch.

5b. Optional (any kind; ``algo.rollout_correction``): the per-token loss of 5 is multiplied by the
   truncated importance weight min(pi_old / pi_engine, C) (rollout_is), and tokens or responses whose
   pi_old / pi_engine lies outside the mask's bounds leave the loss mask (rollout_mask). FutureKL (3)
   keeps the trainer's old log-probs.

kind="dapo": the same with f = 1 and no sequence filter. kind="grpo": symmetric clip
[1-clip_ratio_low, 1+clip_ratio_low], no filter, the same dual clip (as verl's vanilla loss).
Any kind: kl_coef > 0 adds kl_coef * k3(ref || pi) per token, k3 = exp(d) - d - 1 with
d = clamp(ref_log_prob - log_prob, -20, 20).

loss_agg_mode="seq-mean-token-mean": loss_sum = sum over sequences of (sum of the sequence's kept
token losses / its kept token count), num_tokens = number of sequences with >= 1 kept token. With a
context-parallel ``seq_sum_fn`` each rank holds part of a sequence: its token counts come from
``seq_sum_fn`` and each rank's num_tokens counts a sequence in proportion local/global tokens, so
summing loss_sum and num_tokens over all ranks is exact in both modes.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field, fields
from typing import Callable

import torch

from fipo_megatron.algo.future_kl import decay_gamma, future_kl_unchecked
from fipo_megatron.algo.loss_metrics import InfluenceTerms, MetricTensors, TokenTerms, compute_metrics
from fipo_megatron.algo.rollout_correction import IS_LEVELS, MASK_LEVELS, RolloutCorrection, rollout_correction
from fipo_megatron.algo.sequences import Sequences
from fipo_megatron.algo.tensor_utils import all_finite, count_true, float_mask, host_reads_are_free

__all__ = ["PolicyLossConfig", "PolicyLossOutput", "policy_loss"]

KINDS = ("fipo", "dapo", "grpo")
AGG_MODES = ("token-mean", "seq-mean-token-mean")
FKL_MASKS = ("all", "negative_advantage")
DELTA_CLAMP = 20.0
SAFETY_CLAMP = (0.8, 1.0)  # the official code's influence range on unsafe (A < 0, r > threshold) tokens
NO_CLIP_MAX_WEIGHT = 10.0  # the official cap when future_kl_clip_ratio == 0


def _opt(default, flag: str, help: str, **extra):  # noqa: A002 - mirrors argparse
    """A config field whose metadata carries its command-line flag and help (read by the trainer only)."""
    return field(default=default, metadata={"flag": flag, "help": help, **extra})


@dataclass
class PolicyLossConfig:
    """Hyper-parameters of ``policy_loss`` (defaults: the paper's Qwen2.5-32B FIPO run).

    Each field's metadata names its command-line flag and help (inert here; the trainer builds its
    ``--algorithm``, ``--clip-ratio-c``, ... flags and YAML keys from them), so this is the one copy of
    the loss's settings, their defaults and their validation (:meth:`problems`)."""

    kind: str = _opt("fipo", "--algorithm", "Policy loss.", choices=KINDS)
    clip_ratio_low: float = _opt(0.2, "--clip-ratio-low", "PPO clip epsilon below 1.")
    clip_ratio_high: float = _opt(0.28, "--clip-ratio-high", "PPO clip epsilon above 1 (clip-higher).")
    clip_ratio_c: float = _opt(10.0, "--clip-ratio-c", "Dual-clip bound c for negative advantages.")
    decay_rate: float = _opt(32.0, "--future-kl-decay-rate",
                             "Future-KL half-life in tokens: gamma = 2**(-1/decay_rate).")
    future_kl_clip_ratio: float = _opt(0.2, "--future-kl-clip-ratio",
                                       "Influence weights clipped to [1-r, 1+r] (or [1, 1+r] with high-only); "
                                       "0 = no clip (only the overflow guard).")
    future_kl_clip_high_only: bool = _opt(True, "--future-kl-clip-high-only",
                                          "Clip influence weights to [1, 1+r] (32B recipe) instead of [1-r, 1+r].",
                                          negatable=True)
    safety_threshold: float = _opt(10.0, "--safety-threshold",
                                   "Clamp influence weights of negative-advantage tokens whose ratio exceeds this "
                                   "to [0.8, 1].")
    future_kl_start: str = _opt("current", "--future-kl-start", "Future-KL sum starts at the current or next token.",
                                choices=("current", "next"))
    future_kl_window: int | None = _opt(None, "--future-kl-window", "Hard window of the Future-KL sum (tokens).")
    future_kl_average: bool = _opt(False, "--future-kl-average", "Average instead of sum over the future window.")
    future_kl_mask: str = _opt("all", "--future-kl-mask", "Tokens taking part in the Future-KL sum.",
                               choices=FKL_MASKS)
    seq_filter_max_dual_clipped: int | None = _opt(1, "--seq-filter-max-dual-clipped",
                                                   "Drop responses with more dual-clipped tokens than this "
                                                   "(official FIPO code; 'none' disables).")
    kl_coef: float = _opt(0.0, "--kl-coef", "KL-to-reference coefficient (GRPO's k3 penalty, added per response "
                          "token; the paper's recipes use 0). > 0 keeps a frozen reference model with the initial "
                          "weights (see --ref-load): one more copy of the model weights in memory (no gradients or "
                          "optimizer state) and one more forward pass per step.")
    loss_agg_mode: str = _opt("token-mean", "--loss-agg-mode", "Loss aggregation over the mini-batch.",
                              choices=AGG_MODES)
    rollout_is: str = _opt("none", "--rollout-is",
                           "Truncated importance sampling against the rollout engine: weight each token's policy loss "
                           "by min(pi_old / pi_engine, C), the ratio per token or per response (product over its "
                           "tokens); pi_old is the trainer's recomputation (Future-KL keeps using it).",
                           choices=IS_LEVELS)
    rollout_is_threshold: float = _opt(2.0, "--rollout-is-threshold", "Truncation C of --rollout-is (>= 1).")
    rollout_mask: str = _opt("none", "--rollout-mask",
                             "Masked importance sampling: drop tokens (token) or whole responses (sequence: product "
                             "of pi_old / pi_engine; geometric: its per-token geometric mean) whose ratio lies outside "
                             "[--rollout-mask-threshold-lower, --rollout-mask-threshold] from the loss.",
                             choices=MASK_LEVELS)
    rollout_mask_threshold: float = _opt(2.0, "--rollout-mask-threshold", "Upper ratio bound of --rollout-mask (>= 1).")
    rollout_mask_threshold_lower: float | None = _opt(None, "--rollout-mask-threshold-lower",
                                                      "Lower ratio bound of --rollout-mask (<= 1; default "
                                                      "1 / --rollout-mask-threshold).")

    def __post_init__(self):
        bad = self.problems()
        if bad:
            raise ValueError("PolicyLossConfig: " + "; ".join(bad))

    def problems(self) -> list[str]:
        """Every invalid setting, each message naming the field and its flag (empty when valid)."""
        out: list[str] = []
        flags = {f.name: f.metadata["flag"] for f in fields(self)}

        def check(ok: bool, what: str):
            if not ok:
                name = what.split(" ", 1)[0]
                out.append(f"{name} ({flags[name]}) {what.split(' ', 1)[1]}" if name in flags else what)

        check(self.kind in KINDS, f"kind must be one of {KINDS}, got {self.kind!r}")
        check(self.loss_agg_mode in AGG_MODES, f"loss_agg_mode must be one of {AGG_MODES}, got {self.loss_agg_mode!r}")
        check(self.future_kl_mask in FKL_MASKS,
              f"future_kl_mask must be one of {FKL_MASKS}, got {self.future_kl_mask!r}")
        check(self.future_kl_start in ("current", "next"),
              f"future_kl_start must be 'current' or 'next', got {self.future_kl_start!r}")
        for name in ("clip_ratio_low", "clip_ratio_high", "future_kl_clip_ratio", "kl_coef"):
            value = getattr(self, name)
            check(math.isfinite(value) and value >= 0, f"{name} must be finite and >= 0, got {value}")
        check(self.clip_ratio_low < 1, f"clip_ratio_low must be < 1, got {self.clip_ratio_low}")
        check(self.rollout_is in IS_LEVELS, f"rollout_is must be one of {IS_LEVELS}, got {self.rollout_is!r}")
        check(self.rollout_mask in MASK_LEVELS, f"rollout_mask must be one of {MASK_LEVELS}, got {self.rollout_mask!r}")
        check(math.isfinite(self.rollout_is_threshold) and self.rollout_is_threshold >= 1,
              f"rollout_is_threshold must be finite and >= 1, got {self.rollout_is_threshold}")
        check(math.isfinite(self.rollout_mask_threshold) and self.rollout_mask_threshold >= 1,
              f"rollout_mask_threshold must be finite and >= 1, got {self.rollout_mask_threshold}")
        lower = self.rollout_mask_threshold_lower
        check(lower is None or (math.isfinite(lower) and 0 < lower <= 1),
              f"rollout_mask_threshold_lower must be None or in (0, 1], got {lower}")
        check(self.future_kl_clip_ratio <= 1, f"future_kl_clip_ratio must be <= 1, got {self.future_kl_clip_ratio}")
        check(math.isfinite(self.clip_ratio_c) and self.clip_ratio_c > 1,
              f"clip_ratio_c must be finite and > 1, got {self.clip_ratio_c}")
        check(math.isfinite(self.decay_rate) and self.decay_rate > 0,
              f"decay_rate must be finite and > 0, got {self.decay_rate}")
        check(math.isfinite(self.safety_threshold) and self.safety_threshold > 0,
              f"safety_threshold must be finite and > 0, got {self.safety_threshold}")
        window = self.future_kl_window
        check(window is None or (isinstance(window, int) and not isinstance(window, bool) and window >= 1),
              f"future_kl_window must be None or an int >= 1, got {window!r}")
        limit = self.seq_filter_max_dual_clipped
        check(limit is None or (isinstance(limit, int) and not isinstance(limit, bool) and limit >= 0),
              f"seq_filter_max_dual_clipped must be None or an int >= 0, got {limit!r}")
        return out

    @property
    def corrects_rollout(self) -> bool:
        """Whether the loss needs the engine's log-probs (truncated or masked importance sampling)."""
        return self.rollout_is != "none" or self.rollout_mask != "none"

    def rollout_mask_bounds(self) -> tuple[float, float]:
        """(lower, upper) ratio bounds of the rollout mask."""
        upper = self.rollout_mask_threshold
        lower = self.rollout_mask_threshold_lower
        return (1.0 / upper if lower is None else lower), upper

    def influence_bounds(self) -> tuple[float, float]:
        """(lower, upper) clamp range of the influence weight before the safety rule."""
        eps = self.future_kl_clip_ratio
        if eps == 0:
            return 0.0, NO_CLIP_MAX_WEIGHT
        return (1.0 if self.future_kl_clip_high_only else 1.0 - eps), 1.0 + eps


@dataclass
class PolicyLossOutput:
    """``loss_sum`` is differentiable; everything else is detached.

    metric_tensors: the metrics on the loss's device (no host sync inside the loss; a trainer combines
    a mini-batch's with ``loss_metrics.combine_metric_tensors`` and reads them once). The host views,
    computed on first access (one device sync): metrics (every metric as a float); metric_sums ((sum,
    count) of the mean-type metrics, to be summed over micro-batches and ranks and divided at the end);
    metric_mins / metric_maxs (extrema to reduce with min / max; +inf / -inf when this micro-batch has no
    such token, ``metrics`` shows 0.0 then). The ratio quantiles (``*_p995`` in metric_maxs, ``*_p005``
    in metric_mins) reduce only approximately.
    """

    loss_sum: torch.Tensor
    num_tokens: torch.Tensor
    loss: torch.Tensor
    future_kl: torch.Tensor
    influence_weights: torch.Tensor
    loss_mask: torch.Tensor
    metric_tensors: MetricTensors
    _host: tuple | None = field(default=None, repr=False)

    def _host_views(self) -> tuple:
        if self._host is None:
            self._host = self.metric_tensors.to_host()
        return self._host

    @property
    def metrics(self) -> dict[str, float]:
        return self._host_views()[0]

    @property
    def metric_sums(self) -> dict[str, tuple[float, float]]:
        return self._host_views()[1]

    @property
    def metric_mins(self) -> dict[str, float]:
        return self._host_views()[2]

    @property
    def metric_maxs(self) -> dict[str, float]:
        return self._host_views()[3]


def _check_tensor(name: str, value, shape: torch.Size | None, floating: bool = True, values: bool = True) -> None:
    if not isinstance(value, torch.Tensor):
        raise ValueError(f"{name} must be a torch.Tensor, got {type(value).__name__}")
    if shape is not None and value.shape != shape:
        raise ValueError(f"{name} has shape {tuple(value.shape)}, expected {tuple(shape)} (log_prob's shape)")
    if floating:
        if not value.dtype.is_floating_point:
            raise ValueError(f"{name} must be a floating-point tensor, got {value.dtype}")
        if values and not all_finite(value.detach()):
            raise ValueError(f"{name} contains NaN or inf")


def _validate(log_prob, old_log_prob, advantages, response_mask, cfg, cu_seqlens, ref_log_prob, engine_log_prob,
              values: bool = True) -> torch.Tensor:
    """Checks the inputs and returns the response mask as bool; ``values=False`` skips the checks that
    read tensor values (finiteness, 0/1 mask: one device sync each)."""
    if not isinstance(cfg, PolicyLossConfig):
        raise ValueError(f"cfg must be a PolicyLossConfig, got {type(cfg).__name__}")
    _check_tensor("log_prob", log_prob, None, values=values)
    shape = log_prob.shape
    if cu_seqlens is None and log_prob.dim() != 2:
        raise ValueError(f"log_prob must be [B, L] (or 1-D [T] with cu_seqlens), got shape {tuple(shape)}")
    if cu_seqlens is not None and log_prob.dim() != 1:
        raise ValueError(f"with cu_seqlens, log_prob must be 1-D [T], got shape {tuple(shape)}")
    _check_tensor("old_log_prob", old_log_prob, shape, values=values)
    _check_tensor("advantages", advantages, shape, values=values)
    _check_tensor("response_mask", response_mask, shape, floating=False)
    if ref_log_prob is not None:
        _check_tensor("ref_log_prob", ref_log_prob, shape, values=values)
    elif cfg.kl_coef > 0:
        raise ValueError("ref_log_prob is required when kl_coef > 0")
    if engine_log_prob is not None:
        _check_tensor("engine_log_prob", engine_log_prob, shape, values=values)
    elif cfg.corrects_rollout:
        raise ValueError("engine_log_prob (the rollout engine's log-probs) is required with rollout_is / "
                         "rollout_mask (--rollout-is / --rollout-mask)")
    if response_mask.dtype == torch.bool or not values:
        return response_mask != 0
    if not bool(((response_mask == 0) | (response_mask == 1)).all()):
        raise ValueError("response_mask must contain only 0 and 1")
    return response_mask != 0


def _apply(fn: Callable | None, value: torch.Tensor, name: str) -> torch.Tensor:
    """seq_sum_fn hook (identity by default), with its result checked."""
    if fn is None:
        return value
    out = fn(value)
    if not isinstance(out, torch.Tensor) or out.shape != value.shape:
        raise ValueError(f"seq_sum_fn must return a tensor of shape {tuple(value.shape)} for {name}")
    return out


def _clamp_influence(cfg: PolicyLossConfig, raw: torch.Tensor, inplace: bool = False) -> torch.Tensor:
    """Step 4's clamp of exp(FutureKL) (before the safety rule)."""
    lower, upper = cfg.influence_bounds()
    clamp = raw.clamp_ if inplace else raw.clamp
    return clamp(max=upper) if cfg.future_kl_clip_ratio == 0 else clamp(lower, upper)


# delta <= log(threshold) - margin proves exp(delta) < threshold whatever exp's last-bit rounding: the
# margin (a relative 1e-3 on the ratio) is far above any exp implementation's error.
_SAFE_LOG_MARGIN = 1e-3


def _influence_weights(cfg, delta, ratio, adv, negative_adv, resp, resp_f, cu, future_kl_fn) -> InfluenceTerms:
    """Steps 2-4: FutureKL and the influence weight f after all clamps (detached), with what the metrics
    reuse (:class:`loss_metrics.InfluenceTerms`).

    Comparisons with a bool result are slow on CPU, and usually no token has r > c (participation) or
    r > safety_threshold: one max over delta (one host transfer) proves that and skips the token-wise
    masks; otherwise (and always where a host transfer is a device sync) the masks are built token by
    token, with the same results. (No seq_sum_fn call depends on this, so context-parallel ranks may
    take different branches.)
    """
    delta = delta.detach()
    log_c = math.log(cfg.clip_ratio_c)
    fast = host_reads_are_free(delta)
    delta_max = float(delta.max()) if fast and delta.numel() > 0 else (-math.inf if fast else math.inf)
    # delta_max <= log_c (in float64) implies delta <= float32(log_c) for every token: no float32 lies
    # strictly between log_c and its rounding.
    all_participate = delta_max <= log_c
    all_safe = delta_max <= math.log(cfg.safety_threshold) - _SAFE_LOG_MARGIN
    if all_participate:  # M is the response mask
        participates, participates_f = resp, resp_f
    else:
        participates = delta <= log_c
        if cfg.future_kl_mask == "negative_advantage":
            participates = participates | (adv >= 0)
        participates = participates & resp
        participates_f = float_mask(participates, delta.dtype)
    masked_delta, fkl_finite = None, True  # the blockwise sums of finite values are finite
    if future_kl_fn is None:
        # future_kl(delta, participates, ...) without re-deriving M * delta (delta is finite here).
        masked_delta = delta * participates_f
        fkl = future_kl_unchecked(masked_delta, participates, decay_gamma(cfg.decay_rate), start=cfg.future_kl_start,
                                  window=cfg.future_kl_window, average=cfg.future_kl_average, cu=cu)
    else:
        fkl = future_kl_fn(delta, participates)
        if not isinstance(fkl, torch.Tensor) or fkl.shape != delta.shape:
            raise ValueError(f"future_kl_fn must return a tensor of shape {tuple(delta.shape)}")
        fkl = fkl.detach()
        fkl_finite = all_finite(fkl) if fast else False
        if fast and not fkl_finite and not all_finite(torch.where(resp, fkl, 0.0)):  # where: rarely needed
            raise ValueError("future_kl_fn returned NaN or inf")
    fkl = fkl.to(delta.dtype)
    raw = torch.exp(fkl)
    # The metric influence_weight_raw_mean needs only this sum: take it now and clamp in place.
    raw_sum = torch.dot(raw.reshape(-1), resp_f.reshape(-1))
    weight = _clamp_influence(cfg, raw, inplace=True)
    any_unsafe = False
    if not all_safe:
        unsafe = negative_adv & (ratio.detach() > cfg.safety_threshold)
        any_unsafe = int(count_true(unsafe)) > 0 if fast else True
        if any_unsafe:  # usually none: skip the (slow on CPU) torch.where
            weight = torch.where(unsafe, weight.clamp(*SAFETY_CLAMP), weight)
    return InfluenceTerms(future_kl=fkl, weight=weight, raw_weight_sum=raw_sum, weight_finite=fkl_finite,
                          monotone=not any_unsafe, bounds=cfg.influence_bounds(),
                          resp_delta_sum=masked_delta.sum() if all_participate and masked_delta is not None else None)


def policy_loss(log_prob: torch.Tensor, old_log_prob: torch.Tensor, advantages: torch.Tensor,
                response_mask: torch.Tensor, cfg: PolicyLossConfig, *, cu_seqlens: torch.Tensor | None = None,
                ref_log_prob: torch.Tensor | None = None, engine_log_prob: torch.Tensor | None = None,
                future_kl_fn: Callable | None = None, seq_sum_fn: Callable | None = None,
                validate_values: bool = True) -> PolicyLossOutput:
    """FIPO / DAPO / GRPO policy loss (module docstring); see docs/DESIGN.md for the contract.

    Tensors are [B, L] (one response per row) or 1-D [T] with ``cu_seqlens`` (int [S+1]); advantages
    are per token. ``future_kl_fn(delta, mask) -> Tensor`` replaces the default Future-KL (mask is bool);
    ``seq_sum_fn(per_seq[S]) -> [S]`` post-processes per-sequence counts (an all-reduce under CP).
    ``validate_values=False`` skips the input checks that read values (finite inputs, a 0/1 mask inside
    the sequences): a trainer that checked its inputs on the host passes it, and where host reads are
    device syncs (``tensor_utils.host_reads_are_free``) the loss then reads nothing from the device.
    """
    resp = _validate(log_prob, old_log_prob, advantages, response_mask, cfg, cu_seqlens, ref_log_prob,
                     engine_log_prob, values=validate_values)
    seqs = Sequences(log_prob.shape, cu_seqlens, log_prob.device)
    if validate_values and bool(seqs.outside_tokens(resp).any()):
        raise ValueError("response_mask has tokens after cu_seqlens[-1], outside every sequence")
    dtype = torch.promote_types(log_prob.dtype, torch.float32)
    adv = advantages.detach().to(dtype)

    delta = torch.clamp(log_prob.to(dtype) - old_log_prob.to(dtype), -DELTA_CLAMP, DELTA_CLAMP)  # step 1
    ratio = torch.exp(delta)
    negative_adv = adv < 0
    resp_f = float_mask(resp, dtype)
    influence = None
    if cfg.kind == "fipo":
        influence = _influence_weights(cfg, delta, ratio, adv, negative_adv, resp, resp_f, seqs.cu, future_kl_fn)
        fkl, weight = influence.future_kl, influence.weight
        weighted_adv = adv * weight
    else:
        fkl, weight = torch.zeros_like(adv), torch.ones_like(adv)
        weighted_adv = adv

    high = cfg.clip_ratio_low if cfg.kind == "grpo" else cfg.clip_ratio_high  # step 5
    loss_unclipped = -weighted_adv * ratio
    loss_clipped = -weighted_adv * torch.clamp(ratio, 1.0 - cfg.clip_ratio_low, 1.0 + high)
    loss_ppo = torch.maximum(loss_unclipped, loss_clipped)
    loss_dual = -weighted_adv * cfg.clip_ratio_c
    token_loss = torch.where(weighted_adv < 0, torch.minimum(loss_dual, loss_ppo), loss_ppo)
    correction = RolloutCorrection(None, None, None)
    if cfg.corrects_rollout:  # step 5b: truncated / masked importance sampling against the engine
        lower, upper = cfg.rollout_mask_bounds()
        correction = rollout_correction(old_log_prob, engine_log_prob, resp, resp_f, seqs, is_level=cfg.rollout_is,
                                        is_threshold=cfg.rollout_is_threshold, mask_level=cfg.rollout_mask,
                                        mask_lower=lower, mask_upper=upper,
                                        seq_sum_fn=None if seq_sum_fn is None else
                                        (lambda v: _apply(seq_sum_fn, v, "per-response log-ratio sums")))
        if correction.weight is not None:
            token_loss = token_loss * correction.weight
    kl_penalty = None
    if cfg.kl_coef > 0:
        log_ratio_ref = torch.clamp(ref_log_prob.detach().to(dtype) - log_prob.to(dtype), -DELTA_CLAMP, DELTA_CLAMP)
        kl_penalty = torch.exp(log_ratio_ref) - log_ratio_ref - 1.0
        token_loss = token_loss + cfg.kl_coef * kl_penalty

    dual_clipped = negative_adv & (loss_ppo.detach() > loss_dual.detach()) & resp  # step 6
    keep, filtered, num_dual_clipped = (resp if correction.keep is None else correction.keep), None, None
    resp_counts = seqs.count(resp, dtype)
    if cfg.kind == "fipo" and cfg.seq_filter_max_dual_clipped is not None:
        local_dual_counts = seqs.count(dual_clipped, dtype)
        if dual_clipped.numel() < 2**24:  # float sum of integer counts is exact (dual_clipped is within resp)
            num_dual_clipped = local_dual_counts.sum()
        dual_counts = _apply(seq_sum_fn, local_dual_counts, "dual-clipped token counts")
        filtered = dual_counts > cfg.seq_filter_max_dual_clipped
        if not host_reads_are_free(filtered) or bool(filtered.any()):  # usually no sequence is dropped
            keep = keep & ~seqs.broadcast(filtered, fill=False)

    zero = torch.zeros((), dtype=dtype, device=log_prob.device)
    kept_loss = torch.where(keep, token_loss, zero)  # step 7
    if cfg.loss_agg_mode == "token-mean":
        loss_sum = kept_loss.sum()
        num_tokens = count_true(keep).to(dtype)
    else:
        local_counts = seqs.count(keep, dtype)
        global_counts = _apply(seq_sum_fn, local_counts, "kept token counts")
        has_tokens = global_counts > 0
        safe_counts = torch.where(has_tokens, global_counts, torch.ones_like(global_counts))
        loss_sum = (seqs.sum(kept_loss) / safe_counts).sum()
        num_tokens = torch.where(has_tokens, local_counts / safe_counts, zero).sum()
    num_tokens = num_tokens.detach()

    tokens = TokenTerms(resp=resp, resp_f=resp_f, negative_adv=negative_adv & resp, positive_adv=(adv > 0) & resp,
                        delta=delta.detach(), ratio=ratio.detach(), loss_unclipped=loss_unclipped.detach(),
                        loss_clipped=loss_clipped.detach(), dual_clipped=dual_clipped,
                        num_dual_clipped=num_dual_clipped, clip_ratio_c=cfg.clip_ratio_c,
                        kl_penalty=None if kl_penalty is None else kl_penalty.detach(), filtered=filtered,
                        resp_counts=resp_counts)
    metrics = compute_metrics(tokens, influence, seq_sum=lambda v: _apply(seq_sum_fn, v, "response token counts"),
                              correction=correction if cfg.corrects_rollout else None)
    return PolicyLossOutput(loss_sum=loss_sum, num_tokens=num_tokens, loss=loss_sum / num_tokens.clamp(min=1.0),
                            future_kl=fkl.detach().float(), influence_weights=weight.detach(), loss_mask=keep,
                            metric_tensors=metrics)
