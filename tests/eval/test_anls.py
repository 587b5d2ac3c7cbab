"""ANLS and the Levenshtein distance against hand-computed values."""

from __future__ import annotations

import pytest

from pali.eval.anls import anls, levenshtein, ocr_exact_match


def test_levenshtein_known_values():
    assert levenshtein("kitten", "sitting") == 3
    assert levenshtein("", "abc") == 3
    assert levenshtein("flaw", "lawn") == 2
    assert levenshtein("猫狗", "猫") == 1


def test_anls_hand_computed():
    assert anls("hallo", ["hello"]) == pytest.approx(0.8)        # 1 edit / 5 chars
    assert anls("STOP ", ["stop"]) == 1.0                         # case and outer space ignored
    assert anls("stpo", ["stop"]) == 0.0                          # 2 / 4 = 0.5 is not < 0.5
    assert anls("abcdefghij", ["abcdefghXY"]) == pytest.approx(0.8)
    assert anls("abc", ["xyz", "abd"]) == pytest.approx(2 / 3)    # best answer counts
    assert anls("", ["exit"]) == 0.0
    assert anls("exits", ["exit"], threshold=0.1) == 0.0          # 1/5 = 0.2 >= 0.1


def test_exact_match_and_errors():
    assert ocr_exact_match("Open  Now", ["open now"]) == 1.0
    assert ocr_exact_match("open", ["opened"]) == 0.0
    with pytest.raises(ValueError, match="at least one reference"):
        anls("x", [])
