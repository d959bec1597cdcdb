"""cp_future_kl against an independent float64 naive reference.

The multi-process parts (`fkl_part`, checked by `check_fkl`) run inside the shared gloo launches of
test_parallel_cp_distributed.py (one launch per world size for all CP tests); each rank's output is
scattered back to global positions with the layout's global_index and compared to the reference.
"""
from __future__ import annotations

import itertools

import torch
import torch.distributed as dist

from fipo_megatron.algo.future_kl import future_kl
from fipo_megatron.parallel.cp_future_kl import cp_future_kl, payload_floats_per_rank
from fipo_megatron.parallel.cp_shard import make_cp_layout


# ----------------------------------------------------------------------------- reference
def naive_future_kl(delta, mask, cu, decay_rate, start="current", window=None, average=False):
    """float64 O(L^2) reference, straight from the definition."""
    g = 2.0 ** (-1.0 / decay_rate)
    d = delta.double() * (mask != 0).double()
    m = (mask != 0).double()
    out = torch.zeros(delta.shape[0], dtype=torch.float64)
    for s in range(len(cu) - 1):
        a, b = int(cu[s]), int(cu[s + 1])
        for t in range(a, b):
            lo = t if start == "current" else t + 1
            hi = b if window is None else min(b, t + window)
            if hi <= lo:
                continue
            w = g ** torch.arange(lo - t, hi - t, dtype=torch.float64)
            num = (w * d[lo:hi]).sum()
            if average:
                den = (w * m[lo:hi]).sum()
                out[t] = num / den if den > 0 else 0.0
            else:
                out[t] = num
    return out


def rel_err(x, ref):
    return float((x.double() - ref).norm() / ref.norm().clamp(min=1e-30))


# ----------------------------------------------------------------------------- data
def make_stream(seed, raw_lens, prompt_lens, pad_multiple):
    """A packed stream: padded lengths, delta in ~[-3, 3], mask = response region x participation."""
    gen = torch.Generator().manual_seed(seed)
    plens = [((n + pad_multiple - 1) // pad_multiple) * pad_multiple for n in raw_lens]
    cu = torch.zeros(len(plens) + 1, dtype=torch.int32)
    cu[1:] = torch.cumsum(torch.tensor(plens), 0)
    T = int(cu[-1])
    delta = (torch.randn(T, generator=gen) * 1.5).clamp(-20, 20)
    mask = torch.zeros(T)
    for s, (n, p) in enumerate(zip(raw_lens, prompt_lens)):
        o = int(cu[s])
        part = (torch.rand(n - p, generator=gen) < 0.85).float()
        mask[o + p - 1:o + n - 1] = part     # label positions of the response
    return cu, delta, mask


# every case: (seed, raw lengths, prompt lengths, decay_rate, start, window, average)
_LENS = [([37, 8, 64, 5, 101, 16, 3], [5, 2, 10, 1, 20, 3, 2]),       # mixed, non-multiples of 2CP
         ([16, 32, 8, 24], [4, 4, 2, 6])]                              # multiples of 8 (2CP for CP=4)
_WINDOWS = [None, 1, 3, 6, 17, 200]


def _cases():
    out = []
    for n, (decay, start, window, average) in enumerate(
            itertools.product([1.0, 32.0, 256.0], ["current", "next"], _WINDOWS, [False, True])):
        lens, prompts = _LENS[n % 2]
        out.append((1000 + n, lens, prompts, decay, start, window, average))
    # one long sequence whose only response tokens sit in the last chunk (other ranks: prompt only)
    out.append((7, [31], [30], 32.0, "current", None, False))
    out.append((8, [31, 9], [30, 8], 256.0, "next", 5, True))
    # no response token at all in the micro-batch (every chunk prompt or padding)
    out.append((9, [12, 7], [12, 7], 32.0, "current", None, True))
    return out


def fkl_part(rank, world, cp_size):
    """Every case with CP = cp_size; world = k * cp_size (k CP groups, each its own data)."""
    cases = _cases()
    groups = [dist.new_group(list(range(d * cp_size, (d + 1) * cp_size))) for d in range(world // cp_size)]
    group = groups[rank // cp_size]
    cp_rank = rank % cp_size
    results = []
    for seed, lens, prompts, decay, start, window, average in cases:
        cu, delta, mask = make_stream(seed + 17 * (rank // cp_size), lens, prompts, 2 * cp_size)
        layout = make_cp_layout(cu, cp_size, cp_rank)
        idx = layout.global_index
        out = cp_future_kl(delta[idx], mask[idx], decay, layout, group, start=start, window=window,
                           average=average)
        results.append((idx, out, float(mask[idx].sum())))
    return results


def check_fkl(results, cp_size):
    """Compare the per-rank outputs of fkl_part (one list per rank) with the naive reference."""
    cases, world = _cases(), len(results)
    for case_no, (seed, lens, prompts, decay, start, window, average) in enumerate(cases):
        for dp in range(world // cp_size):
            cu, delta, mask = make_stream(seed + 17 * dp, lens, prompts, 2 * cp_size)
            ref = naive_future_kl(delta, mask, cu, decay, start, window, average)
            got = torch.full_like(ref, float("nan"))
            for r in range(dp * cp_size, (dp + 1) * cp_size):
                idx, out, _ = results[r][case_no]
                got[idx] = out.double()
            assert not torch.isnan(got).any(), "some position is held by no rank"
            if ref.norm() == 0:
                assert got.abs().max() == 0, f"case {case_no}: expected all zeros"
                continue
            single = future_kl(delta, mask, decay, start=start, window=window, average=average, cu_seqlens=cu)
            for name, r in (("naive float64", ref), ("single-process future_kl", single.double())):
                err = rel_err(got, r)
                assert err <= 5e-6, (f"case {case_no} (decay={decay}, start={start}, window={window}, "
                                     f"average={average}, dp={dp}) vs {name}: rel err {err:.2e}")


def check_prompt_only_ranks(res4):
    """In the 31-token / 30-prompt case at CP=4 the only response label (position 29) sits in
    chunk 7 (rank 0): ranks 1..3 hold no response token, still finish (no hang), and see the
    discounted future from rank 0; an all-prompt micro-batch gives exact zeros everywhere."""
    cases = _cases()
    case_no = len(cases) - 3
    for r in (1, 2, 3):
        assert res4[r][case_no][2] == 0
    assert res4[0][case_no][2] == 1
    assert (res4[1][case_no][1] != 0).all()
    for r in range(4):
        assert res4[r][len(cases) - 1][1].abs().max() == 0


def test_payload_is_constant_per_chunk():
    assert payload_floats_per_rank(8, 1000) == 16
    assert payload_floats_per_rank(8, 1000, average=True) == 32
    assert payload_floats_per_rank(8, 1000, window=5) == 8 * 2 * 5
    assert payload_floats_per_rank(8, 10, window=50) == 8 * 2 * 10


def test_single_rank_path_matches_reference():
    """CP = 1 (no process group needed) delegates to algo.future_kl on the packed stream."""
    for seed, lens, prompts, decay, start, window, average in _cases()[:24]:
        cu, delta, mask = make_stream(seed, lens, prompts, 1)
        layout = make_cp_layout(cu, 1, 0)
        out = cp_future_kl(delta, mask, decay, layout, None, start=start, window=window, average=average)
        ref = naive_future_kl(delta, mask, cu, decay, start, window, average)
        assert rel_err(out, ref) <= 5e-6
