"""load_reward_fn: built-ins, dotted paths, clear errors; the optional math-verify scorer."""

import sys
import types

import pytest

from fipo_megatron.rewards import as_score_dict, compute_score, load_reward_fn


def _module(monkeypatch, name, **attrs):
    mod = types.ModuleType(name)
    for k, v in attrs.items():
        setattr(mod, k, v)
    monkeypatch.setitem(sys.modules, name, mod)
    return mod


@pytest.mark.parametrize("spec", [None, "", "math_dapo", " math_dapo "])
def test_default_is_math_dapo(spec):
    assert load_reward_fn(spec) is compute_score


def test_dotted_paths(monkeypatch):
    def my_reward(solution, gt):
        return 1.0 if gt in solution else 0.0

    class Holder:
        @staticmethod
        def method(solution, gt):
            return {"score": 2.0}

    _module(monkeypatch, "fipo_test_pkg_x", my_reward=my_reward, Holder=Holder, not_callable=3)
    assert load_reward_fn("fipo_test_pkg_x:my_reward") is my_reward
    assert load_reward_fn("fipo_test_pkg_x.my_reward") is my_reward
    assert load_reward_fn("fipo_test_pkg_x:Holder.method")("a", "b") == {"score": 2.0}
    assert load_reward_fn("fipo_megatron.rewards.math_dapo.compute_score") is compute_score
    assert load_reward_fn("fipo_megatron.rewards.math_dapo:compute_score") is compute_score


@pytest.mark.parametrize(
    "spec, match",
    [
        ("no_such_module_fipo:fn", "cannot import module 'no_such_module_fipo'"),
        ("no_such_module_fipo.fn", "cannot import"),
        ("fipo_test_pkg_y:missing", "no attribute path 'missing'"),
        ("fipo_test_pkg_y.missing", "no attribute path 'missing'"),
        ("fipo_test_pkg_y:value", "non-callable int"),
        ("justaname", "not a built-in"),
        ("a:b:c", "expected"),
    ],
)
def test_clear_errors(monkeypatch, spec, match):
    _module(monkeypatch, "fipo_test_pkg_y", value=5)
    with pytest.raises(ValueError, match=match):
        load_reward_fn(spec)


def test_math_verify_missing_is_a_clear_import_error(monkeypatch):
    monkeypatch.setitem(sys.modules, "math_verify", None)  # makes `import math_verify` fail
    with pytest.raises(ImportError, match="math-verify"):
        load_reward_fn("math_verify")


def test_math_verify_scorer_with_a_stub_package(monkeypatch):
    # a stand-in for math_verify: parse -> float(text) when possible; verify -> equality of numbers
    def parse(text):
        text = text.strip("$")
        table = {"\\frac{1}{2}": 0.5}
        if text in table:
            return [table[text]]
        try:
            return [float(text)]
        except ValueError:
            return []

    _module(monkeypatch, "math_verify", parse=parse, verify=lambda gold, ans: gold[0] == ans[0])
    fn = load_reward_fn("math_verify")
    assert fn("Answer: 0.5", "\\frac{1}{2}")["acc"] is True       # strict scorer says no
    assert compute_score("Answer: 0.5", "\\frac{1}{2}")["acc"] is False
    assert fn("Answer: 0.25", "\\frac{1}{2}") == {"score": -1.0, "acc": False, "pred": "0.25"}
    assert fn("no answer", "1")["acc"] is False
    assert fn("Answer: $7$", "7")["acc"] is True                    # strict equality still counts


def test_as_score_dict():
    assert as_score_dict(1) == {"score": 1.0, "acc": True, "pred": ""}
    assert as_score_dict(-0.5) == {"score": -0.5, "acc": False, "pred": ""}
    assert as_score_dict({"score": 1, "pred": "x", "extra": 3}) == {"score": 1.0, "acc": True, "pred": "x", "extra": 3}
    assert as_score_dict({"score": 1.0, "acc": False})["acc"] is False
    with pytest.raises(ValueError, match="without 'score'"):
        as_score_dict({"acc": True})
    with pytest.raises(ValueError, match="non-numeric"):
        as_score_dict({"score": "1"})
    with pytest.raises(ValueError, match="must return"):
        as_score_dict("1")
