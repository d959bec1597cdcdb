"""`megatron.attention.SDPAttention` against a float64 attention loop written here (no SDPA in the
reference): causal BSHD, packed THD with uneven, padded sequences and grouped-query attention, and
context parallelism (zigzag shards on 2 and 4 gloo ranks, incl. a sequence shorter than 2 x CP
chunks), forward values and the gradients of q, k and v.

The full tiny-Qwen2 model at several (CP, TP) layouts is in test_megatron_attention_model.py.
"""
from __future__ import annotations

import math
from types import SimpleNamespace

import pytest
import torch

from fipo_megatron.testing.distributed import run_distributed

HEADS, GROUPS, DIM = 4, 2, 8


class _Group:
    """Stand-in for a process group of one rank (what the module reads: size / rank)."""

    def size(self) -> int:
        return 1

    def rank(self) -> int:
        return 0


def make_attention(cp_group=None, cp: int = 1, **kw):
    from megatron.core.transformer.enums import AttnMaskType
    from megatron.core.transformer.transformer_config import TransformerConfig

    from fipo_megatron.megatron.attention import SDPAttention

    cfg = TransformerConfig(num_layers=1, hidden_size=HEADS * DIM, num_attention_heads=HEADS, num_query_groups=GROUPS,
                            context_parallel_size=cp, use_cpu_initialization=True, attention_dropout=0.0,
                            hidden_dropout=0.0)
    pgs = SimpleNamespace(tp=_Group(), cp=cp_group if cp_group is not None else _Group())
    return SDPAttention(config=cfg, layer_number=1, attn_mask_type=AttnMaskType.causal, attention_type="self",
                        pg_collection=pgs, **kw)


def naive_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """One causal sequence, explicit loops over heads and queries: q [L, H, D], k / v [L, G, D]."""
    L, H, D = q.shape
    rep = H // k.shape[1]
    rows = []
    for i in range(L):
        heads = []
        for h in range(H):
            kh, vh = k[: i + 1, h // rep], v[: i + 1, h // rep]
            w = torch.softmax((kh @ q[i, h]) / math.sqrt(D), dim=0)
            heads.append(w @ vh)
        rows.append(torch.stack(heads))
    return torch.stack(rows)


def naive_packed(q, k, v, cu: list[int], cu_padded: list[int]) -> torch.Tensor:
    """Per-sequence naive attention on the real tokens; padding rows are zero."""
    out = torch.zeros_like(q)
    for s in range(len(cu) - 1):
        a, n = cu_padded[s], cu[s + 1] - cu[s]
        out[a:a + n] = naive_attention(q[a:a + n], k[a:a + n], v[a:a + n])
    return out


def packed_case(lengths: list[int], multiple: int, seed: int = 0):
    padded = [-(-n // multiple) * multiple for n in lengths]
    cu = [0] + torch.cumsum(torch.tensor(lengths), 0).tolist()
    cup = [0] + torch.cumsum(torch.tensor(padded), 0).tolist()
    g = torch.Generator().manual_seed(seed)
    T = cup[-1]
    q = torch.randn(T, HEADS, DIM, generator=g, dtype=torch.float64)
    k = torch.randn(T, GROUPS, DIM, generator=g, dtype=torch.float64)
    v = torch.randn(T, GROUPS, DIM, generator=g, dtype=torch.float64)
    w = torch.randn(T, HEADS, DIM, generator=g, dtype=torch.float64)  # loss weights: loss = sum(out * w)
    return cu, cup, q, k, v, w


def psp(cu: list[int], cup: list[int]):
    from megatron.core.packed_seq_params import PackedSeqParams

    cu_t, cup_t = torch.tensor(cu, dtype=torch.int32), torch.tensor(cup, dtype=torch.int32)
    m = max(b - a for a, b in zip(cup[:-1], cup[1:]))
    return PackedSeqParams(qkv_format="thd", cu_seqlens_q=cu_t, cu_seqlens_kv=cu_t, cu_seqlens_q_padded=cup_t,
                           cu_seqlens_kv_padded=cup_t, max_seqlen_q=m, max_seqlen_kv=m)


def _grads(fn, *xs):
    xs = [x.detach().clone().requires_grad_(True) for x in xs]
    out = fn(*xs)
    return out, xs


def test_thd_matches_naive_loop_with_gqa_and_padding():
    cu, cup, q, k, v, w = packed_case([5, 1, 9, 3], multiple=4)
    attn = make_attention()
    params = psp(cu, cup)
    out, (gq, gk, gv) = _grads(lambda a, b, c: attn(a, b, c, None, packed_seq_params=params), q, k, v)
    assert out.shape == (cup[-1], HEADS * DIM)
    (out.reshape(q.shape) * w).sum().backward()
    ref, (rq, rk, rv) = _grads(lambda a, b, c: naive_packed(a, b, c, cu, cup), q, k, v)
    (ref * w).sum().backward()
    torch.testing.assert_close(out.reshape(q.shape), ref, rtol=1e-10, atol=1e-12)
    for a, b in ((gq, rq), (gk, rk), (gv, rv)):
        torch.testing.assert_close(a.grad, b.grad, rtol=1e-10, atol=1e-12)
    # padding is inert: changing padding q/k/v changes no output, and padding outputs are zero
    pad = torch.ones(cup[-1], dtype=torch.bool)
    for s in range(len(cu) - 1):
        pad[cup[s]:cup[s] + cu[s + 1] - cu[s]] = False
    assert pad.any()
    q2, k2, v2 = q.clone(), k.clone(), v.clone()
    for t in (q2, k2, v2):
        t[pad] = 1e3
    out2 = attn(q2, k2, v2, None, packed_seq_params=params)
    assert torch.equal(out2, out.detach())
    assert torch.count_nonzero(out.detach()[pad]) == 0


def test_bshd_causal_with_and_without_mask():
    g = torch.Generator().manual_seed(1)
    s, b = 7, 2
    q = torch.randn(s, b, HEADS, DIM, generator=g, dtype=torch.float64)
    k = torch.randn(s, b, GROUPS, DIM, generator=g, dtype=torch.float64)
    v = torch.randn(s, b, GROUPS, DIM, generator=g, dtype=torch.float64)
    attn = make_attention()
    ref = torch.stack([naive_attention(q[:, i], k[:, i], v[:, i]) for i in range(b)], dim=1).reshape(s, b, -1)
    mask = torch.triu(torch.ones(s, s, dtype=torch.bool), diagonal=1)[None, None]
    torch.testing.assert_close(attn(q, k, v, None), ref, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(attn(q, k, v, mask), ref, rtol=1e-10, atol=1e-12)


def test_bad_inputs_raise():
    cu, cup, q, k, v, _ = packed_case([5, 3], multiple=2)
    attn = make_attention()
    with pytest.raises(ValueError, match="tokens on this rank"):
        attn(q[:-2], k[:-2], v[:-2], None, packed_seq_params=psp(cu, cup))
    with pytest.raises(ValueError, match="do not fit"):
        attn(q, k, v, None, packed_seq_params=psp([0, 7, 8], cup))
    with pytest.raises(ValueError, match="expected q"):
        attn(q, q, q, None, packed_seq_params=psp(cu, cup))
    with pytest.raises(ValueError, match="all-gather"):
        make_attention(cp_comm_type="p2p")
    with pytest.raises(ValueError, match="boolean"):
        attn(q[:, None], k[:, None], v[:, None], torch.zeros(1, 1, 8, 8))


# ------------------------------------------------------------------ context parallelism (gloo ranks)
CP_LENGTHS = [13, 3, 8, 21, 1]  # 3 and 1 are shorter than 2 x CP chunks at CP=4 (whole chunks of padding)


def cp_case(cp: int, rank: int, group):
    """This rank's output and q/k/v gradients for the CP=`cp` case (run on every rank of `group`)."""
    from fipo_megatron.parallel.cp_shard import make_cp_layout

    cu, cup, q, k, v, w = packed_case(CP_LENGTHS, multiple=2 * cp, seed=cp)
    idx = make_cp_layout(torch.tensor(cup), cp, rank).global_index
    attn = make_attention(cp_group=group, cp=cp)
    out, (gq, gk, gv) = _grads(lambda a, b, c: attn(a, b, c, None, packed_seq_params=psp(cu, cup)),
                               q[idx], k[idx], v[idx])
    (out.reshape(-1, HEADS, DIM) * w[idx]).sum().backward()
    return idx, out.detach().reshape(-1, HEADS, DIM), gq.grad, gk.grad, gv.grad


def check_cp_case(cp: int, results: list) -> None:
    cu, cup, q, k, v, w = packed_case(CP_LENGTHS, multiple=2 * cp, seed=cp)
    ref, (rq, rk, rv) = _grads(lambda a, b, c: naive_packed(a, b, c, cu, cup), q, k, v)
    (ref * w).sum().backward()
    seen = torch.zeros(cup[-1], dtype=torch.long)
    assert len(results) == cp
    for idx, out, gq, gk, gv in results:
        seen[idx] += 1
        torch.testing.assert_close(out, ref.detach()[idx], rtol=1e-10, atol=1e-12)
        torch.testing.assert_close(gq, rq.grad[idx], rtol=1e-10, atol=1e-12)
        torch.testing.assert_close(gk, rk.grad[idx], rtol=1e-10, atol=1e-12)  # summed over all ranks' queries
        torch.testing.assert_close(gv, rv.grad[idx], rtol=1e-10, atol=1e-12)
    assert torch.equal(seen, torch.ones_like(seen))  # the shards tile the stream


def _cp_worker(rank: int, world: int):
    import torch.distributed as dist

    pairs = [dist.new_group([0, 1]), dist.new_group([2, 3])]
    return {4: cp_case(4, rank, dist.group.WORLD), 2: cp_case(2, rank % 2, pairs[rank // 2])}


def test_cp_zigzag_matches_naive_loop():
    """CP=4 on 4 gloo ranks and CP=2 on two pairs of them, in one launch."""
    results = run_distributed(_cp_worker, 4)
    check_cp_case(4, [r[4] for r in results])
    check_cp_case(2, [r[2] for r in results[:2]])
    check_cp_case(2, [r[2] for r in results[2:]])
