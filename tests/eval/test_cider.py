"""CIDEr-D against hand-computed values and the reference pycocoevalcap implementation."""

from __future__ import annotations

import math
import random

import pytest
from pycocoevalcap.cider.cider import Cider

from pali.eval.cider import cider_d
from pali.eval.text import tokenize_caption


def _reference(hyps: list[list[str]], refs: list[list[list[str]]]) -> tuple[float, list[float]]:
    gts = {i: [" ".join(r) for r in rs] for i, rs in enumerate(refs)}
    res = {i: [" ".join(h)] for i, h in enumerate(hyps)}
    score, scores = Cider().compute_score(gts, res)
    return float(score), [float(s) for s in scores]


def test_hand_computed_identical_captions():
    # Every n-gram occurs in one image of two: idf = log 2 for all; unigram and bigram cosines are 1,
    # trigram/4-gram vectors are empty (0), no length penalty -> 10 * (1 + 1 + 0 + 0) / 4 = 5.
    score, per_image = cider_d([["a", "b"], ["c", "d"]], [[["a", "b"]], [["c", "d"]]])
    assert per_image == pytest.approx([5.0, 5.0])
    assert score == pytest.approx(5.0)


def test_hand_computed_length_penalty_and_disjoint():
    # Image 0: hypothesis "a b c" vs reference "a b": unigram cos = 2/sqrt(2*3)... computed by hand below.
    hyps = [["a", "b", "c"], ["x"]]
    refs = [[["a", "b"]], [["y", "z"]]]
    w = math.log(2.0)  # every n-gram's idf; "c" never appears in a reference: idf log 2 too
    uni = (2 * w * w) / (math.sqrt(3 * w * w) * math.sqrt(2 * w * w))
    bi = (w * w) / (math.sqrt(2 * w * w) * math.sqrt(w * w))
    penalty = math.exp(-((2 - 1) ** 2) / (2 * 36.0))  # lengths in bigrams: 2 vs 1
    expected0 = 10 * (uni + bi) * penalty / 4
    score, per_image = cider_d(hyps, refs)
    assert per_image[0] == pytest.approx(expected0)
    assert per_image[1] == 0.0  # no shared n-gram
    assert score == pytest.approx(expected0 / 2)


def test_single_image_corpus_scores_zero():
    assert cider_d([["a", "b"]], [[["a", "b"]]])[0] == 0.0


def test_matches_pycocoevalcap_fixed_examples():
    captions = [
        ("a man riding a horse on a beach", ["a man rides a horse along the beach", "a person on a horse",
                                             "man riding horse near the ocean"]),
        ("two dogs play in the snow", ["two dogs playing in snow", "dogs running through the snow together"]),
        ("a plate of food", ["a plate with food on it", "a white plate of pasta", "food on a plate",
                             "a dinner plate", "pasta with sauce on a plate"]),
        ("", ["an empty street at night"]),  # empty prediction
        ("a a a a a a", ["a cat", "a small cat sitting"]),  # clipping matters
        ("the the the", ["the end"]),
    ]
    hyps = [tokenize_caption(h, "en") for h, _ in captions]
    refs = [[tokenize_caption(r, "en") for r in rs] for _, rs in captions]
    ours, ours_per = cider_d(hyps, refs)
    theirs, theirs_per = _reference(hyps, refs)
    assert ours == pytest.approx(theirs, rel=1e-9, abs=1e-12)
    assert ours_per == pytest.approx(theirs_per, rel=1e-9, abs=1e-12)
    assert ours > 0


def test_matches_pycocoevalcap_random_corpus_and_chinese():
    rng = random.Random(0)
    vocab = [f"w{i}" for i in range(12)]
    hyps, refs = [], []
    for _ in range(25):
        hyps.append(rng.choices(vocab, k=rng.randint(0, 9)))
        refs.append([rng.choices(vocab, k=rng.randint(1, 9)) for _ in range(rng.randint(1, 5))])
    ours, ours_per = cider_d(hyps, refs)
    theirs, theirs_per = _reference(hyps, refs)
    assert ours == pytest.approx(theirs, rel=1e-9)
    assert ours_per == pytest.approx(theirs_per, rel=1e-9, abs=1e-12)

    zh = [("一只狗在草地上跑。", ["一只狗在草地上奔跑", "草地上的小狗"]), ("两只猫", ["两只猫在睡觉", "猫"]),
          ("红色的汽车", ["一辆红色的汽车", "停着的红车"])]
    hyps = [tokenize_caption(h, "zh") for h, _ in zh]
    refs = [[tokenize_caption(r, "zh") for r in rs] for _, rs in zh]
    assert cider_d(hyps, refs)[0] == pytest.approx(_reference(hyps, refs)[0], rel=1e-9)


def test_bad_input():
    with pytest.raises(ValueError, match="2 hypotheses but 1"):
        cider_d([["a"], ["b"]], [[["a"]]])
    with pytest.raises(ValueError, match="image 1 has no references"):
        cider_d([["a"], ["b"]], [[["a"]], []])
