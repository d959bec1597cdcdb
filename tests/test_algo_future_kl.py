"""future_kl against float64 references that share no code with the blockwise implementation."""

import math

import numpy as np
import pytest
import torch

from fipo_megatron.algo.future_kl import future_kl

DECAY_RATES = [1, 8, 32, 256]
TOL = 5e-6  # the accuracy target: ||out - ref|| / ||ref||


def dense_reference(delta, mask, decay_rate, start="current", window=None, average=False):
    """Naive O(L^2) float64: an explicit [L, L] weight matrix per row."""
    d = np.asarray(delta, dtype=np.float64)
    m = np.asarray(mask, dtype=np.float64)
    rows, length = d.shape
    gamma = 2.0 ** (-1.0 / decay_rate)
    t = np.arange(length)[:, None]
    k = np.arange(length)[None, :]
    in_range = (k >= t) if start == "current" else (k > t)
    if window is not None:
        in_range &= k < t + window
    weights = np.where(in_range, gamma ** np.clip(k - t, 0, None).astype(np.float64), 0.0)
    num = (m * d) @ weights.T
    if not average:
        return num
    den = m @ weights.T
    return np.where(den > 0, num / np.where(den > 0, den, 1.0), 0.0)


def reverse_loop_reference(delta_row, mask_row, decay_rate, start="current"):
    """O(L) float64 recursion S_t = x_t + gamma S_{t+1} (one row, no window)."""
    gamma = 2.0 ** (-1.0 / decay_rate)
    x = [float(a) * float(b) for a, b in zip(delta_row, mask_row)]
    out = [0.0] * len(x)
    running = 0.0
    for t in range(len(x) - 1, -1, -1):
        after = running  # S_{t+1}
        running = x[t] + gamma * running
        out[t] = running if start == "current" else gamma * after
    return np.array(out)


def rel_err(out, ref):
    ref = np.asarray(ref, dtype=np.float64)
    diff = np.linalg.norm(out.double().numpy() - ref)
    norm = np.linalg.norm(ref)
    return diff / norm if norm > 0 else diff


def random_inputs(rows, length, seed, p_mask=0.8):
    gen = torch.Generator().manual_seed(seed)
    delta = (torch.randn(rows, length, generator=gen) * 2).clamp(-20, 20)
    mask = torch.rand(rows, length, generator=gen) < p_mask
    return delta, mask


@pytest.mark.parametrize("length", [1, 7, 64, 1000])
@pytest.mark.parametrize("decay_rate", DECAY_RATES)
def test_matches_dense_reference(length, decay_rate):
    delta, mask = random_inputs(3, length, seed=length * 7 + decay_rate)
    for start in ("current", "next"):
        out = future_kl(delta, mask, decay_rate, start=start)
        assert out.dtype == torch.float32 and out.shape == delta.shape
        assert rel_err(out, dense_reference(delta, mask, decay_rate, start)) <= TOL


@pytest.mark.parametrize("length", [1, 7, 64, 300])
@pytest.mark.parametrize("decay_rate", DECAY_RATES)
def test_window_and_average_match_dense_reference(length, decay_rate):
    delta, mask = random_inputs(2, length, seed=length + decay_rate, p_mask=0.6)
    for start in ("current", "next"):
        for window in (None, 1, 2, 5, 64, 129, 1000):
            for average in (False, True):
                out = future_kl(delta, mask, decay_rate, start=start, window=window, average=average)
                ref = dense_reference(delta, mask, decay_rate, start, window, average)
                assert rel_err(out, ref) <= TOL, (start, window, average)


@pytest.mark.parametrize("decay_rate", DECAY_RATES)
def test_long_row_matches_linear_reference(decay_rate):
    length = 20480
    delta, mask = random_inputs(2, length, seed=decay_rate)
    for start in ("current", "next"):
        out = future_kl(delta, mask, decay_rate, start=start)
        for row in range(2):
            ref = reverse_loop_reference(delta[row].tolist(), mask[row].tolist(), decay_rate, start)
            assert rel_err(out[row], ref) <= TOL


def test_long_row_window_on_strided_positions():
    length, window, decay_rate = 20480, 3000, 256
    delta, mask = random_inputs(1, length, seed=3)
    out = future_kl(delta, mask, decay_rate, window=window, start="next")
    gamma = 2.0 ** (-1.0 / decay_rate)
    x = (delta * mask).double()[0].numpy()
    positions = list(range(0, length, 97)) + [length - 1]
    ref = []
    for t in positions:
        ks = np.arange(t + 1, min(length, t + window))
        ref.append(float(np.sum(gamma ** (ks - t) * x[ks])))
    assert rel_err(out[0, positions], ref) <= TOL


def test_no_overflow_for_very_long_rows():
    length = 131072
    delta, mask = random_inputs(1, length, seed=11)
    delta[0, -5000:] = 20.0  # a large tail that a gamma^(-t) rescaling would overflow on
    for decay_rate in (1, 256, 1e5):
        out = future_kl(delta, mask, decay_rate)
        assert torch.isfinite(out).all()
        ref = reverse_loop_reference(delta[0].tolist(), mask[0].tolist(), decay_rate)
        assert rel_err(out[0], ref) <= TOL


def test_block_size_does_not_change_the_result():
    delta, mask = random_inputs(3, 777, seed=5)
    base = future_kl(delta, mask, 8.0, block=64)
    for block in (2, 3, 16, 100, 1024):
        torch.testing.assert_close(future_kl(delta, mask, 8.0, block=block), base, rtol=2e-6, atol=2e-6)


def pack(rows, lengths):
    return torch.cat([row[:n] for row, n in zip(rows, lengths)])


@pytest.mark.parametrize("options", [dict(), dict(start="next"), dict(window=4), dict(average=True),
                                     dict(start="next", window=9, average=True)])
def test_packed_equals_rows_and_never_leaks(options):
    lengths = [5, 0, 1, 70, 33, 129, 2]
    delta, mask = random_inputs(len(lengths), max(lengths), seed=9)
    for i, n in enumerate(lengths):
        mask[i, n:] = False  # padding
    cu = torch.tensor([0] + list(np.cumsum(lengths)), dtype=torch.int32)
    packed = future_kl(pack(delta, lengths), pack(mask, lengths), 4.0, cu_seqlens=cu, **options)
    rows = future_kl(delta, mask, 4.0, **options)
    torch.testing.assert_close(packed, pack(rows, lengths), rtol=1e-6, atol=1e-6)
    # Changing a later sequence never changes an earlier one.
    delta2 = delta.clone()
    delta2[3:] += 5.0
    packed2 = future_kl(pack(delta2, lengths), pack(mask, lengths), 4.0, cu_seqlens=cu, **options)
    first = sum(lengths[:3])
    torch.testing.assert_close(packed2[:first], packed[:first], rtol=0, atol=0)


def test_packed_trailing_padding_is_zero_and_finite():
    delta = torch.randn(10)
    mask = torch.ones(10, dtype=torch.bool)
    out = future_kl(delta, mask, 2.0, cu_seqlens=torch.tensor([0, 3, 7]))
    assert torch.isfinite(out).all() and (out[7:] == 0).all()


def test_masked_positions_do_not_contribute_even_if_nan():
    delta, mask = random_inputs(2, 50, seed=1)
    mask[:, 10] = False
    delta_nan = delta.clone()
    delta_nan[:, 10] = float("nan")
    torch.testing.assert_close(future_kl(delta_nan, mask, 8.0), future_kl(delta, mask, 8.0))
    assert rel_err(future_kl(delta, mask.float(), 8.0), dense_reference(delta, mask, 8.0)) <= TOL


def test_average_is_zero_without_participating_tokens():
    delta = torch.randn(2, 6)
    mask = torch.zeros(2, 6, dtype=torch.bool)
    mask[0, 2] = True
    out = future_kl(delta, mask, 1.0, average=True)
    assert out[1].abs().max() == 0 and (out[0, 3:] == 0).all()
    torch.testing.assert_close(out[0, :3], delta[0, 2].expand(3))


def test_result_is_detached():
    delta = torch.randn(2, 9, requires_grad=True)
    out = future_kl(delta, torch.ones(2, 9), 4.0)
    assert not out.requires_grad and out.grad_fn is None


@pytest.mark.parametrize("kwargs, message", [
    (dict(decay_rate=0.0), "decay_rate"),
    (dict(decay_rate=math.inf), "decay_rate"),
    (dict(start="later"), "start"),
    (dict(window=0), "window"),
    (dict(window=2.5), "window"),
])
def test_bad_options_raise(kwargs, message):
    args = dict(decay_rate=8.0)
    args.update(kwargs)
    decay_rate = args.pop("decay_rate")
    with pytest.raises(ValueError, match=message):
        future_kl(torch.zeros(1, 4), torch.ones(1, 4), decay_rate, **args)


def test_bad_inputs_raise():
    with pytest.raises(ValueError, match="mask"):
        future_kl(torch.zeros(2, 4), torch.ones(2, 5), 8.0)
    with pytest.raises(ValueError, match="0 and 1"):
        future_kl(torch.zeros(2, 4), torch.full((2, 4), 0.5), 8.0)
    with pytest.raises(ValueError, match="NaN"):
        future_kl(torch.tensor([[0.0, float("nan")]]), torch.ones(1, 2), 8.0)
    with pytest.raises(ValueError, match="cu_seqlens"):
        future_kl(torch.zeros(6), torch.ones(6), 8.0)
    with pytest.raises(ValueError, match="cu_seqlens"):
        future_kl(torch.zeros(6), torch.ones(6), 8.0, cu_seqlens=torch.tensor([0, 4, 9]))
    with pytest.raises(ValueError, match="non-decreasing"):
        future_kl(torch.zeros(6), torch.ones(6), 8.0, cu_seqlens=torch.tensor([0, 4, 2]))


def test_average_with_one_far_participating_token_is_its_delta_rows_and_packed():
    """Hand-derived: with a single participating token k, the weighted average over R(t) is delta_k
    wherever k is in R(t), whatever gamma^(k - t) is. decay_rate 1 and k - t = 199 put that weight at
    2^-199 ~ 1e-60, below float32's range: the ratio must still come out as delta_k = 2.0."""
    length = 200
    delta = torch.zeros(1, length)
    mask = torch.zeros(1, length, dtype=torch.bool)
    delta[0, -1], mask[0, -1] = 2.0, True
    expected_current = torch.full((1, length), 2.0)
    expected_next = expected_current.clone()
    expected_next[0, -1] = 0.0  # R(t) of the last token is empty with start="next"
    for start, expected in (("current", expected_current), ("next", expected_next)):
        out = future_kl(delta, mask, 1.0, start=start, average=True)
        torch.testing.assert_close(out, expected, rtol=0, atol=1e-6)
    # packed: the same sequence after a short one and before another of the same length class
    other = torch.tensor([0.5, -1.0, 3.0])
    seq_delta = torch.cat([other, delta[0], torch.full((150,), -1.5)])
    seq_mask = torch.cat([torch.tensor([True, False, True]), mask[0], torch.zeros(150, dtype=torch.bool)])
    seq_mask[3 + length + 149] = True  # one participating token at the end of the third sequence
    cu = torch.tensor([0, 3, 3 + length, 3 + length + 150], dtype=torch.int32)
    out = future_kl(seq_delta, seq_mask, 1.0, average=True, cu_seqlens=cu)
    torch.testing.assert_close(out[3:3 + length], expected_current[0], rtol=0, atol=1e-6)
    torch.testing.assert_close(out[3 + length:], torch.full((150,), -1.5), rtol=0, atol=1e-6)
    # first sequence: t=0 averages 0.5 (weight 1) and 3.0 (weight 1/4); t=1, 2: only 3.0
    torch.testing.assert_close(out[:3], torch.tensor([(0.5 + 3.0 / 4) / 1.25, 3.0, 3.0]), rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("length", [9, 64, 200])
def test_window_around_the_sequence_length(length):
    """window = L - 1 drops exactly the last token from t = 0's sum (and nothing else); L and L + 1 are
    the unwindowed sum. Element-wise against the dense float64 reference, with a slow decay so the
    last token's weight is large."""
    delta, mask = random_inputs(2, length, seed=length, p_mask=0.9)
    mask[:, -1] = True
    delta[:, -1] = 3.0
    for start in ("current", "next"):
        for window in (length - 1, length, length + 1):
            if window < 1:
                continue
            for average in (False, True):
                out = future_kl(delta, mask, 256.0, start=start, window=window, average=average)
                ref = dense_reference(delta, mask, 256.0, start, window, average)
                torch.testing.assert_close(out.double(), torch.from_numpy(ref), rtol=1e-5, atol=1e-5,
                                           msg=lambda m: f"{start} window={window} average={average}: {m}")


@pytest.mark.parametrize("options", [dict(), dict(start="next"), dict(window=7), dict(average=True),
                                     dict(start="next", window=30, average=True)])
def test_packed_same_length_class_matches_dense_reference_per_sequence(options):
    """Several sequences of different lengths in one length class (33..64: one padded bucket, the
    shortest first), plus others; every sequence against the dense float64 reference of that sequence
    alone."""
    lengths = [40, 33, 64, 2, 57, 50, 3]
    gen = torch.Generator().manual_seed(21)
    delta = (torch.randn(sum(lengths), generator=gen) * 2).clamp(-20, 20)
    mask = torch.rand(sum(lengths), generator=gen) < 0.7
    cu = torch.tensor([0] + list(np.cumsum(lengths)), dtype=torch.int32)
    out = future_kl(delta, mask, 8.0, cu_seqlens=cu, **options)
    for a, b in zip(cu[:-1].tolist(), cu[1:].tolist()):
        ref = dense_reference(delta[None, a:b], mask[None, a:b], 8.0, options.get("start", "current"),
                              options.get("window"), options.get("average", False))[0]
        torch.testing.assert_close(out[a:b].double(), torch.from_numpy(ref), rtol=1e-5, atol=1e-5)
