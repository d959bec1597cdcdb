"""DAPO overlong penalty: zero before the buffer, linear to -factor at the limit."""

import pytest

from fipo_megatron.rewards import overlong_penalty


def reference(length, max_len, buffer, factor):
    # written out piecewise, independent of the implementation's min() form
    start = max_len - buffer
    if length <= start:
        return 0.0
    return -factor * (length - start) / buffer


@pytest.mark.parametrize("length", [0, 10, 767, 768, 769, 800, 896, 1023, 1024, 1100])
@pytest.mark.parametrize("factor", [1.0, 0.5])
def test_matches_piecewise_reference(length, factor):
    assert overlong_penalty(length, 1024, 256, factor) == pytest.approx(reference(length, 1024, 256, factor))


def test_anchor_points():
    assert overlong_penalty(4096, 4096, 1024) == pytest.approx(-1.0)
    assert overlong_penalty(3072, 4096, 1024) == 0.0
    assert overlong_penalty(3584, 4096, 1024, 2.0) == pytest.approx(-1.0)


@pytest.mark.parametrize("buffer", [0, None])
def test_disabled(buffer):
    assert overlong_penalty(10_000, 100, buffer) == 0.0


def test_bad_arguments():
    with pytest.raises(ValueError, match="overlong_buffer"):
        overlong_penalty(1, 10, 20)
    with pytest.raises(ValueError, match="overlong_buffer"):
        overlong_penalty(1, 10, -1)
