"""Resolve a reward function from a config string.

``load_reward_fn(spec)`` accepts:

- ``None``, ``""`` or ``"math_dapo"``: :func:`fipo_megatron.rewards.math_dapo.compute_score` (default);
- ``"math_verify"``: the optional lenient scorer (needs the ``math-verify`` package; ImportError if
  it is missing, raised at load time so a run fails before it starts);
- a dotted path ``"pkg.module:function"`` or ``"pkg.module.function"`` (attribute paths after the
  colon may be dotted, e.g. ``"pkg.mod:Class.method"``).

A reward function is called as ``fn(solution: str, ground_truth: str)`` and returns either a dict
with at least ``"score"`` (``"acc"`` and ``"pred"`` optional) or a plain number;
:func:`as_score_dict` turns either into ``{"score": float, "acc": bool, "pred": str}``.
Errors are ``ValueError`` naming the spec and what went wrong.
"""

from __future__ import annotations

import importlib
import numbers
from typing import Any, Callable

__all__ = ["BUILTIN_REWARDS", "DEFAULT_REWARD", "as_score_dict", "load_reward_fn"]

DEFAULT_REWARD = "math_dapo"
BUILTIN_REWARDS = ("math_dapo", "math_verify")

RewardFn = Callable[[str, str], Any]


def _builtin(name: str) -> RewardFn:
    if name == "math_dapo":
        from .math_dapo import compute_score

        return compute_score
    from .lenient import _import_math_verify, compute_score_math_verify

    _import_math_verify()  # fail now, not at the first scored response
    return compute_score_math_verify


def _import_dotted(spec: str) -> Any:
    if ":" in spec:
        module_name, _, attr_path = spec.partition(":")
        if not module_name or not attr_path or ":" in attr_path:
            raise ValueError(f"reward function {spec!r}: expected 'pkg.module:function'")
        try:
            module = importlib.import_module(module_name)
        except ImportError as exc:
            raise ValueError(f"reward function {spec!r}: cannot import module {module_name!r}: {exc}") from exc
    else:
        parts = spec.split(".")
        if len(parts) < 2 or not all(parts):
            raise ValueError(
                f"reward function {spec!r}: not a built-in ({', '.join(BUILTIN_REWARDS)}) and not a "
                "dotted path 'pkg.module:function' or 'pkg.module.function'"
            )
        module, attr_path, errors = None, "", []
        # Longest importable module prefix wins: "a.b.c.fn" tries a.b.c, then a.b, then a.
        for cut in range(len(parts) - 1, 0, -1):
            name = ".".join(parts[:cut])
            try:
                module = importlib.import_module(name)
            except ImportError as exc:
                errors.append(f"{name}: {exc}")
                continue
            attr_path = ".".join(parts[cut:])
            break
        if module is None:
            raise ValueError(f"reward function {spec!r}: cannot import any module prefix ({'; '.join(errors)})")
    obj: Any = module
    for attr in attr_path.split("."):
        try:
            obj = getattr(obj, attr)
        except AttributeError as exc:
            raise ValueError(
                f"reward function {spec!r}: module {module.__name__!r} has no attribute path {attr_path!r}"
            ) from exc
    return obj


def load_reward_fn(spec: str | None = DEFAULT_REWARD) -> RewardFn:
    """Return the reward callable named by ``spec`` (see the module docstring)."""
    if spec is None or (isinstance(spec, str) and spec.strip() == ""):
        spec = DEFAULT_REWARD
    if not isinstance(spec, str):
        raise ValueError(f"reward function spec must be a string, got {type(spec).__name__}")
    spec = spec.strip()
    if spec in BUILTIN_REWARDS:
        return _builtin(spec)
    fn = _import_dotted(spec)
    if not callable(fn):
        raise ValueError(f"reward function {spec!r} resolved to a non-callable {type(fn).__name__}")
    return fn


def as_score_dict(result: Any) -> dict:
    """Normalise a reward function's return value to ``{"score": float, "acc": bool, "pred": str}``.

    A plain number ``x`` gives ``acc = x > 0`` and ``pred = ""``; a dict must hold a numeric
    ``"score"`` (``acc`` defaults to ``score > 0``, ``pred`` to ``""``). Other extra keys are kept.
    """
    if isinstance(result, bool) or isinstance(result, numbers.Real):
        score = float(result)
        return {"score": score, "acc": score > 0, "pred": ""}
    if isinstance(result, dict):
        if "score" not in result:
            raise ValueError(f"reward function returned a dict without 'score': keys {sorted(result)}")
        score = result["score"]
        if isinstance(score, bool) or not isinstance(score, numbers.Real):
            raise ValueError(f"reward function returned a non-numeric score {score!r}")
        out = dict(result)
        out["score"] = float(score)
        out["acc"] = bool(result.get("acc", float(score) > 0))
        out["pred"] = str(result.get("pred", ""))
        return out
    raise ValueError(f"reward function must return a number or a dict with 'score', got {type(result).__name__}")
