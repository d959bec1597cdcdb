"""`packing.MicroBatch`: the actor's layout-free unit (THD, CP-sharded when CP > 1)."""
from __future__ import annotations

import torch

from fipo_megatron.testing.distributed import run_distributed


def _samples():
    from fipo_megatron.parallel.packing import RLSample

    return [RLSample([5, 6, 7], [8, 9], advantage=1.5, old_log_prob=[-0.1, -0.2]),
            RLSample([3], [4, 10, 11, 12], advantage=-0.5, old_log_prob=[-1.0, -2.0, -3.0, -4.0]),
            RLSample([13, 14], [15], advantage=0.25, old_log_prob=[-0.5])]


def test_inputs_responses_and_to_cp1():
    from fipo_megatron.parallel.packing import MicroBatch

    samples = _samples()
    mb = MicroBatch.pack(samples, [2, 0], tp_size=2)
    assert mb.indices == [2, 0]
    T = int(mb.batch.cu_seqlens_padded[-1])
    assert T == 4 + 6  # lengths 3 and 5 padded to multiples of TP=2
    mi = mb.model_inputs()
    assert mi["tokens"].shape == mi["position_ids"].shape == (1, T) and mi["attention_mask"] is None
    psp = mi["packed_seq_params"]
    assert psp.qkv_format == "thd" and psp.cu_seqlens_q.tolist() == [0, 3, 8]
    assert psp.cu_seqlens_q_padded.tolist() == [0, 4, 10] and psp.max_seqlen_q == 6
    li = mb.loss_inputs()
    assert set(li) == {"labels", "response_mask", "advantages", "old_log_prob", "cp_layout"}
    assert li["cp_layout"].cp_size == 1 and all(v.shape == (1, T) for k, v in li.items() if k != "cp_layout")
    # labels at the response label positions are the response tokens; old log-probs come back per sample
    got = mb.responses(li["labels"].float())
    assert [g.tolist() for g in got] == [[15.0], [8.0, 9.0]]
    old = mb.responses(li["old_log_prob"][0])
    torch.testing.assert_close(torch.cat(old), torch.tensor([-0.5, -0.1, -0.2]))
    moved = MicroBatch.pack(samples, [0, 1], cp_size=2, cp_rank=1).to("meta")
    tensors = [v for v in vars(moved.batch).values() if isinstance(v, torch.Tensor)]
    tensors += [v for k, v in vars(moved.batch.cp).items() if isinstance(v, torch.Tensor) and k != "local_cu_seqlens"]
    assert tensors and all(t.device.type == "meta" for t in tensors)
    assert moved.batch.cp.local_cu_seqlens.device.type == "cpu"  # the loss reads these offsets on the host


def _cp_worker(rank: int, world: int):
    import torch.distributed as dist

    from fipo_megatron.parallel.packing import MicroBatch

    mb = MicroBatch.pack(_samples(), [0, 1, 2], cp_size=world, cp_rank=rank, cp_group=dist.group.WORLD)
    li = mb.loss_inputs()
    assert li["cp_layout"] is not None and li["labels"].shape[1] == int(mb.batch.cu_seqlens_padded[-1]) // world
    return [r.tolist() for r in mb.responses(li["labels"][0].float())], [r.tolist() for r in mb.responses(
        li["advantages"])]


def test_responses_gather_over_cp2():
    for labels, adv in run_distributed(_cp_worker, 2):
        assert labels == [[8.0, 9.0], [4.0, 10.0, 11.0, 12.0], [15.0]]
        assert adv == [[1.5, 1.5], [-0.5] * 4, [0.25]]
