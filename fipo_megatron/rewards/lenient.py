"""Optional lenient math scorer backed by the ``math-verify`` package (never the default).

Same extraction as the DAPO scorer (last 300 characters, last ``Answer:`` line), but a response is
also correct when ``math_verify.verify(parse(ground_truth), parse(prediction))`` says the two are
mathematically equivalent (so "0.5" matches "\\frac{1}{2}"). Strict Minerva equality still counts.
Install with ``pip install 'fipo_megatron[math-verify]'``; without it, calling the scorer raises
``ImportError`` saying so.
"""

from __future__ import annotations

from .math_dapo import SOLUTION_TAIL_CHARS, INVALID, extract_answer, normalize_final_answer

__all__ = ["compute_score_math_verify"]


def _import_math_verify():
    try:
        import math_verify  # type: ignore[import-not-found]
    except ImportError as exc:  # pragma: no cover - exercised via monkeypatch in tests
        raise ImportError(
            "the lenient reward 'math_verify' needs the optional package math-verify; install it with "
            "`pip install 'fipo_megatron[math-verify]'` (or use the default reward 'math_dapo')"
        ) from exc
    return math_verify


def _parse(mv, text: str):
    """Parse ``text`` with math-verify, trying it bare and inside ``$...$``; [] when nothing parses."""
    for candidate in (text, f"${text}$"):
        try:
            parsed = mv.parse(candidate)
        except Exception:  # noqa: BLE001 - math-verify raises many kinds on odd input
            continue
        if parsed:
            return parsed
    return []


def compute_score_math_verify(solution: str, ground_truth: str) -> dict:
    """``{"score": +1.0|-1.0, "acc": bool, "pred": normalised prediction}`` with equivalence checking."""
    mv = _import_math_verify()
    raw = extract_answer(solution[-SOLUTION_TAIL_CHARS:])
    pred = normalize_final_answer(raw)
    correct = pred == normalize_final_answer(ground_truth)
    if not correct and raw != INVALID:
        gold = _parse(mv, ground_truth)
        answer = _parse(mv, raw)
        if gold and answer:
            try:
                correct = bool(mv.verify(gold, answer))
            except Exception:  # noqa: BLE001
                correct = False
    return {"score": 1.0 if correct else -1.0, "acc": bool(correct), "pred": pred}
