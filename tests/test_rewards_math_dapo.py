"""DAPO-Math scorer: the issue's worked examples and the Minerva normaliser's documented rules."""

import pytest

from fipo_megatron.rewards import compute_score, normalize_final_answer
from fipo_megatron.rewards.math_dapo import INVALID


@pytest.mark.parametrize(
    "solution, gt, correct",
    [
        ("Answer: $42$", "42", True),
        ("Answer: 42.", "42", False),
        ("Answer: \\frac12", "\\frac{1}{2}", True),
        ("Answer: 0.5", "\\frac{1}{2}", False),
    ],
)
def test_issue_examples(solution, gt, correct):
    out = compute_score(solution, gt)
    assert out["acc"] is correct
    assert out["score"] == (1.0 if correct else -1.0)
    assert isinstance(out["pred"], str)


def test_return_contract():
    out = compute_score("reasoning...\nAnswer: 7", "7")
    assert set(out) == {"score", "acc", "pred"}
    assert out == {"score": 1.0, "acc": True, "pred": "7"}


def test_no_answer_line_is_invalid():
    out = compute_score("I think it is 42", "42")
    assert out["pred"] == INVALID and out["acc"] is False and out["score"] == -1.0


def test_last_answer_line_wins_and_is_case_insensitive():
    sol = "Answer: 3\nwait, no.\nANSWER :  5"
    assert compute_score(sol, "5")["acc"] is True
    assert compute_score(sol, "3")["acc"] is False


def test_only_last_300_characters_are_seen():
    early = "Answer: 9\n" + "x" * 300
    assert compute_score(early, "9")["pred"] == INVALID
    # 290 characters of filler leave the whole answer line inside the tail
    late = "y" * 500 + "\nAnswer: 9"
    assert compute_score(late, "9")["acc"] is True
    # exactly 300: "Answer: 5" followed by 295 chars puts the window start inside "Answer"
    assert compute_score("Answer: 5" + "w" * 295, "5")["pred"] == INVALID
    assert compute_score("Answer: 5" + "w" * 291, "5")["pred"] == "5" + "w" * 291
    assert compute_score("Answer: 5" + "w" * 292, "5")["pred"] == INVALID  # 301 chars: "A" is cut


def test_answer_stops_at_newline():
    assert compute_score("Answer: 12\nbecause", "12")["acc"] is True


@pytest.mark.parametrize(
    "raw, expected",
    [
        ("x = 5", "5"),                       # keep the text after the last "="
        ("\\boxed{17}", "17"),
        ("\\text{17}", "17"),
        ("\\textbf{17}", "17"),
        ("\\overline{3}", "3"),
        ("1,000", "1000"),                    # commas dropped in pure integers
        ("1,000.5", "1,000.5"),               # ... but not elsewhere
        ("\\sqrt2", "\\sqrt{2}"),
        ("\\frac34", "\\frac{3}{4}"),
        ("\\frac{3}{4}", "\\frac{3}{4}"),
        ("10 dollars", "10"),                 # removal list
        ("90^\\circ", "90"),
        ("$3$ and more", "3"),                # first $...$ span kept
        ("  7  ", "7"),
        ("\\$5", "5"),
        # Hand-derived from the published rules (issue 13): \boxed{...} is GREEDY up to the last "}",
        # so nested braces survive intact (a lazy match would stop at the first "}": \frac{1{2}}) ...
        ("\\boxed{\\frac{1}{2}}", "\\frac{1}{2}"),
        ("\\boxed{\\sqrt{\\frac{3}{4}}}", "\\sqrt{\\frac{3}{4}}"),
        # ... the $...$ span is LAZY: spaces are removed first ("$1$and$2$"), then only the first
        # span "$1$" is kept (a greedy span would keep "1$and$2" -> "1and2") ...
        ("$1$ and $2$", "1"),
        ("$x$, $y$", "x"),
        # ... and "\text{and}" becomes "," BEFORE \text{} is stripped: "1,2" is a pure integer once the
        # comma is gone, so "12" (without the substitution \text{and} -> "and" gives "1and2").
        ("1\\text{and}2", "12"),
        ("x\\text{and}y", "x,y"),
        ("3,\\text{and}4", "34"),               # ",\text{and}" -> "," first
    ],
)
def test_minerva_normaliser(raw, expected):
    assert normalize_final_answer(raw) == expected


def test_ground_truth_is_normalised_too():
    assert compute_score("Answer: 1000", "1,000")["acc"] is True
    assert compute_score("Answer: \\boxed{8}", "$8$")["acc"] is True


def test_type_errors_are_clear():
    with pytest.raises(TypeError, match="ground_truth"):
        compute_score("Answer: 1", 1)
