"""Group advantages, the length-weighted advantage metric, and DAPO dynamic sampling."""

import math
import statistics

import pytest
import torch

from fipo_megatron.algo.advantages import broadcast_to_tokens, group_advantages, length_weighted_mean_advantage
from fipo_megatron.algo.sampling import DynamicSampler, DynamicSamplingError


def naive_group_advantages(rewards, n, eps=1e-6):
    out = []
    for start in range(0, len(rewards), n):
        group = rewards[start:start + n]
        mean = sum(group) / n
        std = statistics.stdev(group)  # unbiased (n - 1), like torch.std
        out.extend((r - mean) / (std + eps) for r in group)
    return out


def test_group_advantages_match_naive_loop():
    gen = torch.Generator().manual_seed(0)
    rewards = torch.randint(0, 2, (5 * 4,), generator=gen).double() * 2 - 1
    rewards[:4] = 1.0  # one group with no spread -> advantages 0
    rewards[4:8] = torch.tensor([0.3, -1.0, 1.0, 0.5], dtype=torch.float64)
    got = group_advantages(rewards, 4)
    expected = naive_group_advantages(rewards.tolist(), 4)
    assert got.shape == rewards.shape and got.dtype == torch.float64
    for a, b in zip(got.tolist(), expected):
        assert a == pytest.approx(b, rel=1e-12, abs=1e-12)
    assert got[:4].abs().max() == 0
    grid = group_advantages(rewards.float().reshape(5, 4), 4)
    torch.testing.assert_close(grid.flatten(), got.float(), rtol=1e-6, atol=1e-6)


def test_group_advantages_bad_input():
    with pytest.raises(ValueError, match="multiple"):
        group_advantages(torch.zeros(7), 4)
    with pytest.raises(ValueError, match="n"):
        group_advantages(torch.zeros(4), 1)
    with pytest.raises(ValueError, match="n=3"):
        group_advantages(torch.zeros(2, 3), 4)
    with pytest.raises(ValueError, match="NaN"):
        group_advantages(torch.tensor([1.0, float("nan")]), 2)


def test_broadcast_to_tokens():
    mask = torch.tensor([[1, 1, 0], [0, 0, 0], [1, 1, 1]])
    out = broadcast_to_tokens(torch.tensor([2.0, -1.0, 0.5]), mask)
    assert out.tolist() == [[2.0, 2.0, 0.0], [0.0, 0.0, 0.0], [0.5, 0.5, 0.5]]
    with pytest.raises(ValueError):
        broadcast_to_tokens(torch.zeros(2), mask)


def test_length_weighted_mean_advantage():
    adv = [1.0, -0.5, 2.0, 0.0]
    lengths = [10, 30, 5, 0]
    expected = sum(a * n for a, n in zip(adv, lengths)) / sum(lengths)
    assert length_weighted_mean_advantage(torch.tensor(adv), torch.tensor(lengths)) == pytest.approx(expected)
    assert length_weighted_mean_advantage(torch.tensor([1.0]), torch.tensor([0])) == 0.0
    with pytest.raises(ValueError, match="lengths"):
        length_weighted_mean_advantage(torch.tensor([1.0]), torch.tensor([-1]))
    with pytest.raises(ValueError):
        length_weighted_mean_advantage(torch.tensor([1.0, 2.0]), torch.tensor([1]))


def group(*accs, prompt=0):
    return [{"acc": a, "prompt": prompt} for a in accs]


def test_dynamic_sampler_keeps_groups_with_spread_and_trims():
    sampler = DynamicSampler(target_num_groups=3, max_num_gen_batches=5)
    assert not sampler.add([group(1, 1, prompt=0), group(0, 1, prompt=1), group(0, 0, prompt=2)])
    assert sampler.num_kept == 1 and sampler.num_gen_batches == 1
    assert sampler.add([group(1, 0, prompt=3), group(1, 1, prompt=4), group(0, 1, 1, prompt=5),
                        group(1, 0, prompt=6)])
    batch = sampler.pop()
    assert [g[0]["prompt"] for g in batch] == [1, 3, 5]
    assert sampler.last_stats["num_gen_batches"] == 2 and sampler.last_stats["num_groups_dropped"] == 3
    assert sampler.num_kept == 0 and sampler.num_gen_batches == 0


def test_dynamic_sampler_raises_with_counts_when_out_of_batches():
    sampler = DynamicSampler(target_num_groups=4, max_num_gen_batches=2)
    sampler.add([group(1, 0), group(1, 1)])
    with pytest.raises(DynamicSamplingError, match=r"2 generation batches.*kept only 2 of 4"):
        sampler.add([group(0, 1), group(0, 0)])


def test_dynamic_sampler_partial_mode_returns_what_it_kept():
    sampler = DynamicSampler(target_num_groups=4, max_num_gen_batches=2, on_exhausted="partial")
    assert not sampler.add([group(1, 0, prompt=0), group(1, 1, prompt=1)])
    assert not sampler.done
    assert not sampler.add([group(0, 1, prompt=2), group(0, 0, prompt=3)])
    assert sampler.done and sampler.exhausted and not sampler.full
    with pytest.raises(RuntimeError, match="exhausted"):
        sampler.add([group(0, 1)])
    with pytest.raises(RuntimeError, match="not full"):
        sampler.pop()
    assert [g[0]["prompt"] for g in sampler.pop(partial=True)] == [0, 2]
    assert sampler.last_stats["exhausted"] == 1.0 and not sampler.exhausted


def test_dynamic_sampler_disabled_keeps_every_group():
    sampler = DynamicSampler(target_num_groups=3, max_num_gen_batches=None, enabled=False)
    assert not sampler.add([group(1, 1, prompt=0), group(0, 0, prompt=1)])
    assert sampler.add([group(1, 1, prompt=2), group(0, 1, prompt=3)])
    assert [g[0]["prompt"] for g in sampler.pop()] == [0, 1, 2]
    with pytest.raises(ValueError, match="on_exhausted"):
        DynamicSampler(2, on_exhausted="ignore")


@pytest.mark.parametrize("limit", [0, None])
def test_dynamic_sampler_unbounded(limit):
    sampler = DynamicSampler(target_num_groups=2, max_num_gen_batches=limit)
    for _ in range(50):
        sampler.add([group(1, 1)])
    assert sampler.add([group(0, 1), group(1, 0), group(0, 1)])
    assert len(sampler.pop()) == 2


def test_dynamic_sampler_generic_groups_and_errors():
    sampler = DynamicSampler(target_num_groups=1, values_fn=lambda g: g["scores"])
    assert sampler.add([{"scores": [0.5, 0.5]}, {"scores": [0.1, 0.7]}])
    assert sampler.pop() == [{"scores": [0.1, 0.7]}]
    with pytest.raises(RuntimeError, match="not full"):
        sampler.pop()
    with pytest.raises(ValueError, match="finite"):
        DynamicSampler(target_num_groups=1).add([group(math.nan, 1)])
    with pytest.raises(ValueError, match="target_num_groups"):
        DynamicSampler(target_num_groups=0)
    full = DynamicSampler(target_num_groups=1)
    full.add([group(0, 1)])
    with pytest.raises(RuntimeError, match="full"):
        full.add([group(0, 1)])
