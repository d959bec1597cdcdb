"""The DAPO-Math verifiable reward, exactly as DAPO and FIPO use it.

Contract of :func:`compute_score` (solution text, ground-truth text) -> dict:

1. keep only the last 300 characters of the solution (the longest MATH-500 answer is 159);
2. the prediction is the LAST match of ``(?i)Answer\\s*:\\s*([^\\n]+)`` in that tail, else
   ``"[INVALID]"``;
3. prediction and ground truth are both normalised with the Minerva normaliser
   (Lewkowycz et al. 2022, appendix D), :func:`normalize_final_answer`;
4. correct iff the two normalised strings are equal; ``score`` is +1.0 / -1.0.

Returns ``{"score": float, "acc": bool, "pred": str}`` where ``pred`` is the normalised prediction.
"""

from __future__ import annotations

import re

__all__ = [
    "ANSWER_PATTERN",
    "INVALID",
    "SOLUTION_TAIL_CHARS",
    "compute_score",
    "extract_answer",
    "normalize_final_answer",
]

ANSWER_PATTERN = r"(?i)Answer\s*:\s*([^\n]+)"
INVALID = "[INVALID]"
SOLUTION_TAIL_CHARS = 300

_ANSWER_RE = re.compile(ANSWER_PATTERN)

# Minerva's published substitution list (applied in order, plain string replacement).
SUBSTITUTIONS: tuple[tuple[str, str], ...] = (
    ("an ", ""),
    ("a ", ""),
    (".$", "$"),
    ("\\$", ""),
    ("\\ ", ""),
    (" ", ""),
    ("mbox", "text"),
    (",\\text{and}", ","),
    ("\\text{and}", ","),
    ("\\text{m}", "\\text{}"),
)

# Minerva's published removal list (applied in order, plain string removal), as DAPO/verl ship it
# (lm-eval's copy additionally removes "ft"; DAPO's does not, so neither do we).
REMOVED_EXPRESSIONS: tuple[str, ...] = (
    "square",
    "ways",
    "integers",
    "dollars",
    "mph",
    "inches",
    "hours",
    "km",
    "units",
    "\\ldots",
    "sue",
    "points",
    "feet",
    "minutes",
    "digits",
    "cents",
    "degrees",
    "cm",
    "gm",
    "pounds",
    "meters",
    "meals",
    "edges",
    "students",
    "childrentickets",
    "multiples",
    "\\text{s}",
    "\\text{.}",
    "\\text{\ns}",
    "\\text{}^2",
    "\\text{}^3",
    "\\text{\n}",
    "\\text{}",
    "\\mathrm{th}",
    "^\\circ",
    "^{\\circ}",
    "\\;",
    ",\\!",
    "{,}",
    '"',
    "\\dots",
)


def normalize_final_answer(final_answer: str) -> str:
    """Minerva normalisation of a final answer string (pure function, never raises on str input).

    Keeps the text after the last ``=``, applies :data:`SUBSTITUTIONS` then
    :data:`REMOVED_EXPRESSIONS`, keeps the first ``$...$`` span, strips ``\\text{}``, ``\\textbf{}``,
    ``\\overline{}``, ``\\boxed{}``, rewrites the shorthands ``\\fracab`` -> ``\\frac{a}{b}`` and
    ``\\sqrta`` -> ``\\sqrt{a}``, drops ``$``, drops commas in pure integers, and strips whitespace.
    """
    if not isinstance(final_answer, str):
        raise TypeError(f"normalize_final_answer expects str, got {type(final_answer).__name__}")
    s = final_answer.split("=")[-1]
    for before, after in SUBSTITUTIONS:
        s = s.replace(before, after)
    for expr in REMOVED_EXPRESSIONS:
        s = s.replace(expr, "")

    s = re.sub(r"(.*?)(\$)(.*?)(\$)(.*)", "$\\3$", s)
    s = re.sub(r"(\\text\{)(.*?)(\})", "\\2", s)
    s = re.sub(r"(\\textbf\{)(.*?)(\})", "\\2", s)
    s = re.sub(r"(\\overline\{)(.*?)(\})", "\\2", s)
    s = re.sub(r"(\\boxed\{)(.*)(\})", "\\2", s)

    # Shorthand TeX: \fracab -> \frac{a}{b}, \fracabc -> \frac{a}{b}c, \sqrta -> \sqrt{a}.
    s = re.sub(r"(frac)([^{])(.)", "frac{\\2}{\\3}", s)
    s = re.sub(r"(sqrt)([^{])", "sqrt{\\2}", s)
    s = s.replace("$", "")

    if s.replace(",", "").isdigit():
        s = s.replace(",", "")
    return s.strip()


def extract_answer(solution: str) -> str:
    """Raw (un-normalised) text of the last ``Answer:`` line of ``solution``, or ``"[INVALID]"``.

    Applies to the whole string given; :func:`compute_score` passes only the last 300 characters.
    """
    matches = _ANSWER_RE.findall(solution)
    return matches[-1] if matches else INVALID


def compute_score(solution: str, ground_truth: str) -> dict:
    """Score one response: ``{"score": +1.0|-1.0, "acc": bool, "pred": normalised prediction}``."""
    if not isinstance(solution, str):
        raise TypeError(f"compute_score: solution must be str, got {type(solution).__name__}")
    if not isinstance(ground_truth, str):
        raise TypeError(f"compute_score: ground_truth must be str, got {type(ground_truth).__name__}")
    tail = solution[-SOLUTION_TAIL_CHARS:]
    pred = normalize_final_answer(extract_answer(tail))
    gt = normalize_final_answer(ground_truth)
    correct = pred == gt
    return {"score": 1.0 if correct else -1.0, "acc": bool(correct), "pred": pred}
