"""VQAv2 normalisation and soft accuracy against hand-computed values."""

from __future__ import annotations

import pytest

from pali.eval.vqa import normalize_vqa_answer, vqa_accuracy, vqa_exact_match


@pytest.mark.parametrize("raw, normalized", [
    ("Two dogs.", "2 dogs"),          # number word, period, case
    ("the Cat", "cat"),               # article
    ("an apple", "apple"),
    ("dont", "don't"),                # contraction restored
    ("3.5", "3.5"),                   # decimal point kept
    ("yes!", "yes"),                  # '!' touching nothing -> space, then split
    ("1,000", "1000"),                # digit comma digit: punctuation deleted
    ("left-hand", "left hand"),       # '-' not next to a space -> space
    ("red , white", "red white"),     # ',' next to a space -> deleted
    ("  none\tat all\n", "0 at all"),
])
def test_normalization(raw, normalized):
    assert normalize_vqa_answer(raw) == normalized


def test_soft_score_ten_answers():
    # 3 of 10 annotators said "2": the 3 subsets without one of them have 2 matches (2/3), the 7 others
    # have 3 (1.0): (3 * 2/3 + 7 * 1) / 10 = 0.9.
    answers = ["2", "2", "2"] + ["3"] * 7
    assert vqa_accuracy("two", answers) == pytest.approx(0.9)
    # 2 of 10: (2 * 1/3 + 8 * 2/3) / 10 = 0.6.
    assert vqa_accuracy("Two.", ["2", "2"] + ["3"] * 8) == pytest.approx(0.6)
    # 1 of 10: (1 * 0 + 9 * 1/3) / 10 = 0.3.
    assert vqa_accuracy("2", ["2"] + ["3"] * 9) == pytest.approx(0.3)
    assert vqa_accuracy("3", ["2"] + ["3"] * 9) == pytest.approx(1.0)
    assert vqa_accuracy("4", ["2"] + ["3"] * 9) == 0.0
    assert vqa_accuracy("", ["2"] * 10) == 0.0


def test_few_answers_fall_back_to_match_any():
    assert vqa_accuracy("The dog", ["dog"]) == 1.0
    assert vqa_accuracy("cat", ["dog", "puppy"]) == 0.0
    assert vqa_accuracy("puppy", ["dog", "puppy"]) == 1.0


def test_exact_match():
    assert vqa_exact_match("Yes.", ["yes"] * 10) == 1.0
    assert vqa_exact_match("no", ["yes", "maybe"]) == 0.0
    with pytest.raises(ValueError, match="at least one reference"):
        vqa_exact_match("no", [])
    with pytest.raises(ValueError, match="at least one reference"):
        vqa_accuracy("no", [])
