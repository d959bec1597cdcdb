"""Packing, label alignment, micro-batching and the zigzag CP split (single process)."""
from __future__ import annotations

import pytest
import torch

from fipo_megatron.parallel.cp_shard import make_cp_layout, shard_packed_batch, zigzag_index
from fipo_megatron.parallel.packing import (RLSample, pack_thd, split_into_micro_batches,
                                            unpack_responses)


def _samples():
    return [
        RLSample([5, 6, 7], [8, 9], advantage=0.5, old_log_prob=[-0.1, -0.2]),
        RLSample([11], [12, 13, 14, 15], advantage=-1.0, old_log_prob=[-1.0, -2.0, -3.0, -4.0]),
        RLSample([21, 22, 23, 24, 25], [], advantage=2.0, old_log_prob=[]),
        RLSample([31, 32], [33], advantage=[0.25], old_log_prob=[-0.5]),
    ]


@pytest.mark.parametrize("layout", ["thd1", "thd2", "thd4"])
def test_label_is_the_response_token_everywhere(layout):
    """Independent of the implementation: wherever response_mask is 1, the label is the next
    response token, the old log-prob is that token's, and unpack returns the inputs exactly."""
    samples = _samples()
    cp = int(layout[3:])
    b = pack_thd(samples, cp_size=cp, tp_size=1)
    cu = b.cu_seqlens_padded.tolist()
    assert all((cu[i + 1] - cu[i]) % (2 * cp if cp > 1 else 1) == 0 for i in range(len(samples)))
    assert b.cu_seqlens.tolist() == [0, 5, 10, 15, 18]
    rows = [(b.labels[a:e], b.response_mask[a:e], b.old_log_prob[a:e]) for a, e in zip(cu, cu[1:])]
    for a, e in zip(cu, cu[1:]):
        assert b.position_ids[a:e].tolist() == list(range(e - a))
    for s, (lab, m, old) in zip(samples, rows):
        sel = m.nonzero().flatten()
        assert lab[sel].tolist() == list(s.response_ids)
        assert old[sel].tolist() == pytest.approx(list(s.old_log_prob))
        assert sel.tolist() == list(range(len(s.prompt_ids) - 1, len(s.prompt_ids) - 1 + len(s.response_ids)))
    got = unpack_responses(b.old_log_prob, b)
    assert [g.tolist() for g in got] == [pytest.approx(list(s.old_log_prob)) for s in samples]
    adv = unpack_responses(b.advantages, b)
    assert adv[1].tolist() == [-1.0] * 4 and adv[3].tolist() == [0.25]


def test_thd_labels_never_cross_sequences():
    b = pack_thd(_samples(), cp_size=2)
    cu, cur = b.cu_seqlens_padded.tolist(), b.cu_seqlens.tolist()
    for i in range(len(cu) - 1):
        n = cur[i + 1] - cur[i]
        a = cu[i]
        assert b.tokens[a:a + n].tolist() == list(_samples()[i].prompt_ids) + list(_samples()[i].response_ids)
        assert b.labels[a + n - 1] == 0 and b.response_mask[a + n - 1:cu[i + 1]].sum() == 0


def _manual_zigzag(cu, cp, r):
    """Independent zigzag: torch.chunk each padded sequence into 2CP pieces, take r and 2CP-1-r."""
    out = []
    for a, e in zip(cu, cu[1:]):
        pieces = torch.chunk(torch.arange(a, e), 2 * cp)
        out += [pieces[r], pieces[2 * cp - 1 - r]]
    return torch.cat(out)


@pytest.mark.parametrize("cp", [2, 4])
def test_zigzag_shard_partition_and_labels(cp):
    full = pack_thd(_samples() * 2, cp_size=cp)
    cu = full.cu_seqlens_padded.tolist()
    seen = torch.zeros(cu[-1], dtype=torch.long)
    for r in range(cp):
        idx = zigzag_index(full.cu_seqlens_padded, cp, r)
        assert idx.tolist() == _manual_zigzag(cu, cp, r).tolist()
        seen[idx] += 1
        sh = shard_packed_batch(full, cp, r)
        assert sh.tokens.numel() == cu[-1] // cp
        assert torch.equal(sh.labels, full.labels[idx]) and torch.equal(sh.old_log_prob, full.old_log_prob[idx])
        lay = sh.cp
        assert lay.local_cu_seqlens.tolist() == [c // cp for c in cu]
        # labels were shifted before the split: a local token's label is its global successor
        nxt = (idx + 1).clamp(max=cu[-1] - 1)
        seq_end = full.cu_seqlens[1:][lay.seq_id]
        inside = idx + 1 < seq_end
        assert torch.equal(sh.labels[inside], full.tokens[nxt][inside])
        assert torch.equal(full.tokens[lay.global_index], sh.tokens)
        assert (lay.pos_in_chunk < lay.chunk_lens[lay.seq_id]).all()
        with pytest.raises(ValueError, match="gather"):
            unpack_responses(sh.old_log_prob, sh)
    assert (seen == 1).all()


def test_cp_split_needs_padding():
    with pytest.raises(ValueError, match="multiple of 2\\*CP"):
        make_cp_layout(torch.tensor([0, 6, 10]), 2, 0)
    with pytest.raises(ValueError, match="pad_multiple"):
        shard_packed_batch(pack_thd(_samples(), cp_size=1), 2, 0)


def test_packing_errors():
    with pytest.raises(ValueError, match="empty prompt"):
        pack_thd([RLSample([], [1, 2])])
    with pytest.raises(ValueError, match="old_log_prob has 1 values for 2"):
        pack_thd([RLSample([1], [2, 3], old_log_prob=[0.0])])
    with pytest.raises(ValueError, match="some samples and not others"):
        pack_thd([RLSample([1], [2], old_log_prob=[0.0]), RLSample([1], [2])])


def test_micro_batches_budget_balance_determinism():
    g = torch.Generator().manual_seed(0)
    lens = [int(x) for x in torch.randint(1, 100, (40,), generator=g)]
    mbs = split_into_micro_batches(lens, 300, pad_multiple=4)
    assert sorted(i for mb in mbs for i in mb) == list(range(40))
    loads = [sum(-(-lens[i] // 4) * 4 for i in mb) for mb in mbs]
    assert max(loads) <= 300
    assert len(mbs) <= -(-sum(-(-n // 4) * 4 for n in lens) // 300) + 1   # near the lower bound
    assert max(loads) - min(loads) <= 100                                 # balanced (LPT)
    assert mbs == split_into_micro_batches(lens, 300, pad_multiple=4)
    assert len(split_into_micro_batches(lens, 300, pad_multiple=4, min_num_micro_batches=12)) == 12


def test_micro_batches_sample_cap_brute_force():
    """``max_samples_per_micro_batch`` (--micro-batch-size): checked independently on many random cases:
    every sample exactly once, no bin over the token budget or the count cap, deterministic, and the
    default (None) unchanged."""
    g = torch.Generator().manual_seed(1)
    for case in range(60):
        n = int(torch.randint(1, 30, (1,), generator=g))
        lens = [int(x) for x in torch.randint(1, 60, (n,), generator=g)]
        pad = (1, 2, 4)[case % 3]
        budget = int(torch.randint(64, 400, (1,), generator=g))
        cap = int(torch.randint(1, 6, (1,), generator=g))
        mbs = split_into_micro_batches(lens, budget, pad_multiple=pad, max_samples_per_micro_batch=cap)
        assert sorted(i for mb in mbs for i in mb) == list(range(n))
        padded = [-(-x // pad) * pad for x in lens]
        for mb in mbs:
            assert 1 <= len(mb) <= cap
            cost = sum(padded[i] for i in mb)
            assert cost <= budget
        assert len(mbs) >= -(-n // cap)
        assert mbs == split_into_micro_batches(lens, budget, pad_multiple=pad,
                                               max_samples_per_micro_batch=cap)
        assert (split_into_micro_batches(lens, budget, pad_multiple=pad)
                == split_into_micro_batches(lens, budget, pad_multiple=pad,
                                            max_samples_per_micro_batch=None))
    # the cap binds where the budget alone would pack everything together
    assert split_into_micro_batches([3] * 5, 1000) == [[0, 1, 2, 3, 4]]
    assert [len(mb) for mb in split_into_micro_batches([3] * 5, 1000, max_samples_per_micro_batch=2)] == [2, 2, 1]
    assert split_into_micro_batches([10, 50, 5], 40, allow_oversize=True,
                                    max_samples_per_micro_batch=1) == [[0], [1], [2]]
    with pytest.raises(ValueError, match="max_samples_per_micro_batch must be >= 1"):
        split_into_micro_batches([3, 4], 100, max_samples_per_micro_batch=0)


def test_micro_batches_oversize():
    with pytest.raises(ValueError, match="sample 1 has 50 tokens"):
        split_into_micro_batches([10, 50, 5], 40)
    assert split_into_micro_batches([10, 50, 5], 40, allow_oversize=True) == [[0, 2], [1]]


def test_megatron_views_agree():
    """PackedSeqParams for TE, and megatron's own BSHD CP split == our zigzag on one sequence."""
    from unittest import mock

    from megatron.core import utils as mcore_utils

    b = pack_thd(_samples(), cp_size=2)
    p = b.packed_seq_params()
    assert p.qkv_format == "thd" and p.cu_seqlens_q.dtype == torch.int32
    assert torch.equal(p.cu_seqlens_q_padded, b.cu_seqlens_padded) and p.max_seqlen_q == 8

    class FakeGroup:
        def __init__(self, size, rank):
            self._s, self._r = size, rank

        def size(self):
            return self._s

        def rank(self):
            return self._r

    s = 24
    import inspect

    # megatron-core 0.18+ requires is_hybrid_cp (keyword); 0.16 does not have it
    params = inspect.signature(mcore_utils.get_batch_on_this_cp_rank).parameters
    extra = {"is_hybrid_cp": False} if "is_hybrid_cp" in params else {}
    for cp in (2, 3):
        for r in range(cp):
            with mock.patch.object(torch.distributed, "is_initialized", return_value=True):
                got = mcore_utils.get_batch_on_this_cp_rank({"tokens": torch.arange(s).view(1, s)},
                                                            cp_group=FakeGroup(cp, r), **extra)["tokens"]
            assert got.flatten().tolist() == zigzag_index(torch.tensor([0, s]), cp, r).tolist()
