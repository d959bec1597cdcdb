"""PromptSampler: deterministic epochs, exact resume from state_dict."""

import json

import pytest

from fipo_megatron.data import PromptSampler


def take(sampler, n):
    return [sampler.next_indices() for _ in range(n)]


@pytest.mark.parametrize("shuffle", [True, False])
@pytest.mark.parametrize("drop_last", [True, False])
def test_resume_continues_with_the_same_batches(shuffle, drop_last):
    data = list(range(10))
    full = take(PromptSampler(data, 3, seed=5, shuffle=shuffle, drop_last=drop_last), 12)
    for cut in (1, 3, 4, 7):
        a = PromptSampler(data, 3, seed=5, shuffle=shuffle, drop_last=drop_last)
        head = take(a, cut)
        state = json.loads(json.dumps(a.state_dict()))  # survives serialisation
        b = PromptSampler(data, 3, seed=5, shuffle=shuffle, drop_last=drop_last)
        b.load_state_dict(state)
        assert head + take(b, 12 - cut) == full


def test_epochs_are_permutations_and_differ():
    data = list(range(8))
    s = PromptSampler(data, 4, seed=0)
    batches = take(s, 6)
    epochs = [batches[0] + batches[1], batches[2] + batches[3], batches[4] + batches[5]]
    for e in epochs:
        assert sorted(e) == data
    assert len({tuple(e) for e in epochs}) > 1
    assert s.epoch == 2 and s.consumed == 24


def test_drop_last_skips_tail_and_short_batches_otherwise():
    data = list(range(7))
    s = PromptSampler(data, 3, seed=1, shuffle=False)
    assert take(s, 3) == [[0, 1, 2], [3, 4, 5], [0, 1, 2]]
    s = PromptSampler(data, 3, seed=1, shuffle=False, drop_last=False)
    assert take(s, 4) == [[0, 1, 2], [3, 4, 5], [6], [0, 1, 2]]
    assert len(PromptSampler(data, 3, seed=1)) == 2
    assert len(PromptSampler(data, 3, seed=1, drop_last=False)) == 3


def test_same_seed_same_stream_other_seed_other_stream():
    data = list(range(20))
    assert take(PromptSampler(data, 4, seed=3), 10) == take(PromptSampler(data, 4, seed=3), 10)
    assert take(PromptSampler(data, 4, seed=3), 10) != take(PromptSampler(data, 4, seed=4), 10)


def test_next_batch_returns_items():
    data = ["a", "b", "c"]
    s = PromptSampler(data, 2, seed=0, shuffle=False)
    assert next(s) == ["a", "b"]


def test_errors():
    with pytest.raises(ValueError, match="larger than the dataset"):
        PromptSampler([1, 2], 3, seed=0)
    with pytest.raises(ValueError, match="empty"):
        PromptSampler([], 1, seed=0)
    s = PromptSampler(list(range(10)), 2, seed=0)
    state = s.state_dict()
    for key, val in [("seed", 1), ("batch_size", 5), ("dataset_len", 11), ("shuffle", False)]:
        with pytest.raises(ValueError, match=key):
            PromptSampler(list(range(10)), 2, seed=0).load_state_dict({**state, key: val})
    with pytest.raises(ValueError, match="position"):
        s.load_state_dict({"epoch": 0})
