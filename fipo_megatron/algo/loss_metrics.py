"""Metrics of ``policy_loss`` (the paper's and the official FIPO code's), reducible exactly.

All token metrics are over the response tokens (before the sequence filter), as in the official code.
Mean-type metrics come as (sum, count) pairs; extrema come separately with the identity element
(+inf for a min, -inf for a max) when there is no token to take them over. The scalars stay on the
device as one float64 tensor (:class:`MetricTensors`); they reach the host when read, and a trainer
combines a whole mini-batch's on the device first (one transfer per optimizer step).

Names:
  pg_clipfrac          fraction of tokens with l2 > l1 (the PPO clip is active)
  pg_clipfrac_lower    fraction of tokens with A < 0 and lc > l3 (the dual clip is active)
  ppo_kl               mean of -delta (the paper's policy KL)
  kl_penalty           mean k3 KL to the reference (only when kl_coef > 0)
  neg_adv_ratio_frac_{2_3,3_4,4_c}  among A < 0 tokens, the fraction with r in [2,3), [3,4), [4,c)
  neg_is_max / neg_is_p995, pos_is_min / pos_is_p005   ratio extrema / quantiles for A < 0 / A > 0
  fipo only: future_kl_{mean,min,max}, influence_weight_{mean,min,max} (after all clamps),
  influence_weight_raw_{mean,min,max} (exp(FutureKL); the mean is inf when FutureKL > 88 somewhere,
  min / max are taken in float64 and overflow only above 709),
  influence_frac_upper / influence_frac_lower (weight within 1e-7 of a bound),
  seq_filtered_frac (fraction of sequences with >= 1 response token that the filter dropped).
  With rollout importance sampling (``algo.rollout_correction``): rollout_is_weight_mean (after
  truncation), rollout_is_truncated_frac (tokens whose weight was cut to C), rollout_is_raw_weight_{min,max}
  (before truncation); with the rollout mask: rollout_mask_dropped_frac (response tokens it removed).

Masked reductions use float 0/1 masks and arithmetic rather than torch.where / boolean indexing,
which are ~10x slower on CPU (only the ratio tails select values, for kthvalue); the metrics are a
sizeable part of the loss's cost. The FIPO-only metrics avoid bool comparisons too (several times slower
than arithmetic on CPU), with exactly the same results: the influence-bound fractions count with
``masked_count_compare`` (clamp + dot), FutureKL's mean, min and max come from one masked copy (one sum,
one aminmax), the raw-weight sum and the sum of delta are taken by policy_loss from tensors it already
has, and pg_clipfrac_lower reuses the sequence filter's per-sequence counts.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable

import torch

from fipo_megatron.algo.rollout_correction import RolloutCorrection
from fipo_megatron.algo.tensor_utils import count_true, host_reads_are_free, masked_count_compare

__all__ = ["TokenTerms", "InfluenceTerms", "MetricTensors", "combine_metric_tensors", "compute_metrics", "host_metrics",
           "masked_quantile"]

BOUND_TOLERANCE = 1e-7  # the official code's tolerance for "at the influence bound"


@dataclass
class TokenTerms:
    """Detached per-token quantities of one ``policy_loss`` call, every loss kind (negative_adv /
    positive_adv are already restricted to response tokens)."""

    resp: torch.Tensor
    resp_f: torch.Tensor  # resp as 0.0 / 1.0 of ratio's dtype
    negative_adv: torch.Tensor
    positive_adv: torch.Tensor
    delta: torch.Tensor
    ratio: torch.Tensor
    loss_unclipped: torch.Tensor
    loss_clipped: torch.Tensor
    dual_clipped: torch.Tensor
    num_dual_clipped: torch.Tensor | None  # count_true(dual_clipped) when the loss already has it
    clip_ratio_c: float
    kl_penalty: torch.Tensor | None
    filtered: torch.Tensor | None  # per-sequence flags of the sequence filter (fipo with a filter)
    resp_counts: torch.Tensor  # per-sequence response-token counts (this rank's)


@dataclass
class InfluenceTerms:
    """FIPO's influence weights of one ``policy_loss`` call (detached), with the by-products the metrics
    reuse instead of recomputing."""

    future_kl: torch.Tensor
    weight: torch.Tensor  # after all clamps (and the safety rule)
    raw_weight_sum: torch.Tensor  # exp(future_kl) summed over response tokens, taken before the in-place clamp
    weight_finite: bool  # known to hold no NaN / inf anywhere (also outside the response)
    monotone: bool  # weight = clamp(exp(future_kl), *bounds) everywhere (the safety rule changed no token)
    bounds: tuple[float, float]  # (lower, upper) clamp of exp(future_kl)
    resp_delta_sum: torch.Tensor | None  # (delta * resp_f).sum() when the loss had it (M = response mask)


def masked_quantile(values: torch.Tensor, q: float) -> torch.Tensor:
    """Quantile with linear interpolation (torch.quantile's default) of a 1-D non-empty tensor, via
    kthvalue (O(n), no size limit)."""
    n = values.numel()
    pos = q * (n - 1)
    lo = int(pos)
    v_lo = torch.kthvalue(values, lo + 1).values
    if pos == lo:
        return v_lo
    v_hi = torch.kthvalue(values, lo + 2).values
    return v_lo + (pos - lo) * (v_hi - v_lo)


_EMPTY = {"min": float("inf"), "max": float("-inf")}
_FAR = 1e30  # added to masked-out values before a min (subtracted before a max); |values| << _FAR


class _Collector:
    """Accumulates metric tensors, then moves them all to the host with one transfer."""

    def __init__(self, resp: torch.Tensor, resp_f: torch.Tensor, resp_counts: torch.Tensor):
        self.resp = resp
        self.resp_f = resp_f
        self.n_resp = resp_counts.sum()
        self._far_mask = None
        self.scratch: torch.Tensor | None = None
        self._means: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
        self._extrema: dict[str, tuple[str, torch.Tensor, torch.Tensor]] = {}

    def mean(self, name: str, total: torch.Tensor, count: torch.Tensor) -> None:
        self._means[name] = (total, count)

    def token_mean(self, name: str, values: torch.Tensor) -> None:
        """Mean over response tokens of finite float values, or the fraction of response tokens where a
        bool tensor is True."""
        if values.dtype == torch.bool:
            self.mean(name, count_true(values & self.resp), self.n_resp)
        else:
            self.mean(name, (values * self.resp_f).sum(), self.n_resp)

    @property
    def _far(self) -> torch.Tensor:
        if self._far_mask is None:
            self._far_mask = (1.0 - self.resp_f) * _FAR
        return self._far_mask

    def token_sum_and_extrema(self, name: str, values: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``token_mean`` and ``token_extrema`` of the same values from one masked copy: with
        y = values * mask (exactly the values on response tokens, +-0 elsewhere) the min over y is the
        min over response tokens whenever it is < 0 or every token is a response token (likewise the max
        when > 0); only otherwise are the slower masked extrema needed."""
        masked = torch.mul(values, self.resp_f)
        self.scratch = masked  # free after this call: later token-sized temporaries may reuse it
        self.mean(f"{name}_mean", masked.sum(), self.n_resp)
        if masked.numel() == 0 or not host_reads_are_free(masked):
            return self.token_extrema(name, values)
        low, high = torch.aminmax(masked)
        low_ok, high_ok, n_resp = torch.stack([low < 0, high > 0, self.n_resp == masked.numel()]).tolist()
        if not ((low_ok or n_resp) and (high_ok or n_resp)):
            return self.token_extrema(name, values)
        self._extrema[f"{name}_min"] = ("min", low, self.n_resp)
        self._extrema[f"{name}_max"] = ("max", high, self.n_resp)
        return low, high

    def token_dot(self, values: torch.Tensor) -> torch.Tensor:
        """Sum over response tokens of float values as one dot product with the mask (no temporary;
        equal to (values * mask).sum() up to float rounding; inf * 0 gives NaN as that does)."""
        return torch.dot(values.reshape(-1), self.resp_f.reshape(-1))

    def token_extrema(self, name: str, values: torch.Tensor,
                      monotone_map: Callable[[torch.Tensor], torch.Tensor] | None = None
                      ) -> tuple[torch.Tensor, torch.Tensor]:
        """min and max over response tokens of finite float values (|values| < 1e30), recorded after
        ``monotone_map`` (an increasing function, e.g. exp of log-values) when given."""
        low, high = (values + self._far).min(), (values - self._far).max()
        if monotone_map is not None:
            low, high = monotone_map(low), monotone_map(high)
        self._extrema[f"{name}_min"] = ("min", low, self.n_resp)
        self._extrema[f"{name}_max"] = ("max", high, self.n_resp)
        return low, high

    def extremum(self, name: str, kind: str, value: torch.Tensor, count) -> None:
        self._extrema[name] = (kind, value, count)

    def finish(self) -> "MetricTensors":
        names = list(self._means) + list(self._extrema)
        kinds = ["mean"] * len(self._means) + [kind for kind, _, _ in self._extrema.values()]
        parts = [t for pair in self._means.values() for t in pair]
        parts += [t for _, value, count in self._extrema.values() for t in (value, count)]
        values = torch.stack([torch.as_tensor(t).detach().reshape(()).to(torch.float64) for t in parts]) if parts \
            else torch.zeros(0, dtype=torch.float64)
        return MetricTensors(tuple(names), tuple(kinds), values.reshape(-1, 2))


@dataclass(frozen=True)
class MetricTensors:
    """One loss call's metrics, still on the loss's device (no host transfer yet).

    ``values[i] = (sum, count)`` for a mean-type metric (``kinds[i] == "mean"``) and (value, count) for an
    extremum (``"min"`` / ``"max"``); float64 (exact for every float32 value and count). Several calls'
    tensors with the same names combine on the device (:func:`combine_metric_tensors`), so a trainer
    moves a whole mini-batch's metrics to the host with ONE transfer.
    """

    names: tuple[str, ...]
    kinds: tuple[str, ...]
    values: torch.Tensor

    def to_host(self) -> tuple[dict, dict, dict, dict]:
        """(metrics, metric_sums, metric_mins, metric_maxs) as Python floats (one device sync)."""
        return host_metrics(self.names, self.kinds, self.values.tolist())


def combine_metric_tensors(parts: list[MetricTensors]) -> MetricTensors:
    """Sum the (sum, count) pairs and take min / max of the extrema of several calls, on the device.
    All parts must carry the same metric names (the same loss config)."""
    first = parts[0]
    for p in parts[1:]:
        if p.names != first.names:
            raise ValueError(f"metric names differ between loss calls: {first.names} vs {p.names}")
    stacked = torch.stack([p.values for p in parts])  # [calls, metrics, 2]
    sums = stacked.sum(0)
    empty = stacked[..., 1] <= 0  # an extremum with no token carries no value
    lows = torch.where(empty, torch.full_like(stacked[..., 0], float("inf")), stacked[..., 0]).amin(0)
    highs = torch.where(empty, torch.full_like(stacked[..., 0], float("-inf")), stacked[..., 0]).amax(0)
    kinds = torch.tensor([{"mean": 0, "min": 1, "max": 2}[k] for k in first.kinds], device=stacked.device)
    value = torch.where(kinds == 1, lows, torch.where(kinds == 2, highs, sums[:, 0]))
    return MetricTensors(first.names, first.kinds, torch.stack([value, sums[:, 1]], dim=-1))


def host_metrics(names, kinds, rows) -> tuple[dict, dict, dict, dict]:
    """(metrics, sums, mins, maxs) from host rows ``[(sum or value, count), ...]`` (see MetricTensors)."""
    sums, mins, maxs, metrics = {}, {}, {}, {}
    for name, kind, (value, count) in zip(names, kinds, rows):
        if kind == "mean":
            sums[name] = (float(value), float(count))
            continue
        (mins if kind == "min" else maxs)[name] = float(value) if count > 0 else _EMPTY[kind]
        metrics[name] = float(value) if count > 0 else 0.0
    metrics.update({name: (s / c if c > 0 else 0.0) for name, (s, c) in sums.items()})
    return metrics, sums, mins, maxs


def compute_metrics(t: TokenTerms, f: InfluenceTerms | None,
                    seq_sum: Callable[[torch.Tensor], torch.Tensor],
                    correction: RolloutCorrection | None = None) -> MetricTensors:
    """The metrics of one ``policy_loss`` call (module docstring), on the device. ``f`` is None except for
    fipo; ``seq_sum`` sums per-sequence values over the ranks holding parts of each sequence (CP);
    ``correction``: the rollout importance sampling / mask, when configured."""
    out = _Collector(t.resp, t.resp_f, t.resp_counts)
    if correction is not None:
        _rollout_correction_metrics(out, correction)
    out.token_mean("pg_clipfrac", t.loss_clipped > t.loss_unclipped)
    num_dual = count_true(t.dual_clipped) if t.num_dual_clipped is None else t.num_dual_clipped
    out.mean("pg_clipfrac_lower", num_dual, out.n_resp)
    # mean of -delta: -(sum of delta * mask) equals the sum of (-delta) * mask bit for bit.
    resp_delta_sum = f.resp_delta_sum if f is not None and f.resp_delta_sum is not None else None
    if resp_delta_sum is None:
        resp_delta_sum = (t.delta * out.resp_f).sum()
    out.mean("ppo_kl", -resp_delta_sum, out.n_resp)
    if t.kl_penalty is not None:
        out.token_mean("kl_penalty", t.kl_penalty)

    n_negative = count_true(t.negative_adv)
    for name, low, high in (("2_3", 2.0, 3.0), ("3_4", 3.0, 4.0), ("4_c", 4.0, t.clip_ratio_c)):
        in_bucket = (t.ratio >= low) & (t.ratio < high) & t.negative_adv
        out.mean(f"neg_adv_ratio_frac_{name}", count_true(in_bucket), n_negative)
    if host_reads_are_free(t.ratio):
        _ratio_extrema(out, t.ratio[t.negative_adv], "neg", "max", 0.995)
        _ratio_extrema(out, t.ratio[t.positive_adv], "pos", "min", 0.005)
    else:  # boolean indexing would read the selection's size on the host
        _ratio_extrema_sorted(out, t.ratio, t.negative_adv, "neg", "max", 0.995)
        _ratio_extrema_sorted(out, t.ratio, t.positive_adv, "pos", "min", 0.005)

    if f is not None:
        lower, upper = f.bounds
        fkl_min, fkl_max = out.token_sum_and_extrema("future_kl", f.future_kl)
        out.mean("influence_weight_mean", out.token_dot(f.weight), out.n_resp)
        if not f.monotone:
            out.token_extrema("influence_weight", f.weight)
        else:  # the weight is clamp(exp(FutureKL)), monotone: map FutureKL's extrema
            out.extremum("influence_weight_min", "min", torch.exp(fkl_min).clamp(lower, upper), out.n_resp)
            out.extremum("influence_weight_max", "max", torch.exp(fkl_max).clamp(lower, upper), out.n_resp)
        # exp(FutureKL) overflows float32 above 88; a NaN (inf * 0 at a masked-out token) means overflow too.
        raw_sum = torch.nan_to_num(f.raw_weight_sum, nan=float("inf"))
        out.mean("influence_weight_raw_mean", raw_sum, out.n_resp)
        out.extremum("influence_weight_raw_min", "min", torch.exp(fkl_min.double()), out.n_resp)
        out.extremum("influence_weight_raw_max", "max", torch.exp(fkl_max.double()), out.n_resp)
        scratch = out.scratch
        _bound_fraction(out, "influence_frac_upper", f.weight, "ge", upper - BOUND_TOLERANCE, f.weight_finite, scratch)
        _bound_fraction(out, "influence_frac_lower", f.weight, "le", lower + BOUND_TOLERANCE, f.weight_finite, scratch)
        _filter_metric(out, t, seq_sum)
    return out.finish()


def _rollout_correction_metrics(out: _Collector, c: RolloutCorrection) -> None:
    """rollout_is_* (truncated importance sampling) and rollout_mask_dropped_frac (masked IS)."""
    if c.raw_log_weight is not None:
        out.token_mean("rollout_is_weight_mean", c.weight)
        out.token_mean("rollout_is_truncated_frac", c.raw_log_weight > math.log(c.is_threshold))
        out.token_extrema("rollout_is_raw_weight", c.raw_log_weight, monotone_map=lambda v: torch.exp(v.double()))
    if c.keep is not None:
        out.mean("rollout_mask_dropped_frac", out.n_resp - count_true(c.keep & out.resp), out.n_resp)


def _bound_fraction(out: _Collector, name: str, weight: torch.Tensor, op: str, threshold: float,
                    weight_finite: bool, scratch: torch.Tensor | None) -> None:
    """Fraction of response tokens with weight >= (op "ge") or <= (op "le") threshold, counted with
    arithmetic (``masked_count_compare``) instead of a bool comparison where that is exact."""
    count = masked_count_compare(weight, op, threshold, out.resp_f, scratch)
    # A NaN weight (only possible at a masked-out token, from a future_kl_fn) makes the count NaN.
    if count is not None and not weight_finite and not host_reads_are_free(count):
        count = None  # checking it for NaN would be a device sync: compare instead
    if count is None or (not weight_finite and not bool(torch.isfinite(count))):
        out.token_mean(name, weight >= threshold if op == "ge" else weight <= threshold)
    else:
        out.mean(name, count, out.n_resp)


def _ratio_extrema(out: _Collector, ratios: torch.Tensor, prefix: str, kind: str, q: float) -> None:
    """neg_is_max / neg_is_p995 or pos_is_min / pos_is_p005 (the official code's ratio tails)."""
    count = ratios.new_tensor(float(ratios.numel()))
    if ratios.numel() == 0:
        value = quantile = ratios.new_zeros(())
    else:
        value = ratios.max() if kind == "max" else ratios.min()
        quantile = masked_quantile(ratios, q)
    out.extremum(f"{prefix}_is_{kind}", kind, value, count)
    out.extremum(f"{prefix}_is_p{round(q * 1000):03d}", kind, quantile, count)


def _ratio_extrema_sorted(out: _Collector, ratio: torch.Tensor, select: torch.Tensor, prefix: str, kind: str,
                          q: float) -> None:
    """:func:`_ratio_extrema` of ``ratio[select]`` without reading the selection's size on the host: the
    selected values sort first (the others become +inf), and the quantile's two order statistics are
    gathered at device-side positions (the same linear interpolation as :func:`masked_quantile`)."""
    flat, sel = ratio.reshape(-1), select.reshape(-1)
    count = count_true(sel).to(torch.float64)
    ordered = torch.sort(torch.where(sel, flat, torch.full_like(flat, float("inf")))).values
    last = (count - 1).clamp(min=0)
    pos = q * last  # float64, like masked_quantile's Python arithmetic
    lo = pos.floor()
    hi = torch.minimum(lo + 1, last)
    v_lo, v_hi = ordered[lo.long()], ordered[hi.long()]
    quantile = torch.where(pos == lo, v_lo, v_lo + (pos - lo).to(ratio.dtype) * (v_hi - v_lo))
    value = ordered[last.long()] if kind == "max" else ordered[0]
    empty = count == 0
    zero = torch.zeros((), dtype=ratio.dtype, device=ratio.device)
    out.extremum(f"{prefix}_is_{kind}", kind, torch.where(empty, zero, value), count)
    out.extremum(f"{prefix}_is_p{round(q * 1000):03d}", kind, torch.where(empty, zero, quantile), count)


def _filter_metric(out: _Collector, t: TokenTerms, seq_sum: Callable[[torch.Tensor], torch.Tensor]) -> None:
    """seq_filtered_frac as (sum, count) over sequences with response tokens; under CP each rank
    counts a sequence in proportion to its share of the sequence's tokens, so ranks sum exactly."""
    if t.filtered is None:
        zero = t.ratio.new_zeros(())
        out.mean("seq_filtered_frac", zero, zero)
        return
    local = t.resp_counts
    total = seq_sum(local)
    share = torch.where(total > 0, local / torch.where(total > 0, total, torch.ones_like(total)), 0.0)
    out.mean("seq_filtered_frac", (share * t.filtered).sum(), share.sum())
