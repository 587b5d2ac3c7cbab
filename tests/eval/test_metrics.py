"""Tokenization, the sacrebleu metrics and the per-task / per-language aggregation."""

from __future__ import annotations

import math

import pytest

from pali.eval.metrics import bleu4, chrf, compute_metrics, task_metrics
from pali.eval.text import sacrebleu_tokenizer, tokenize_caption


def test_tokenize_caption_by_language():
    assert tokenize_caption("A dog, running!", "en") == ["a", "dog", "running"]
    assert tokenize_caption("Ein Hund läuft.", "de-DE") == ["ein", "hund", "läuft"]
    assert tokenize_caption("고양이가 잔다.", "ko") == ["고양이가", "잔다"]
    assert tokenize_caption("一只狗。", "zh-Hans") == ["一", "只", "狗"]
    assert tokenize_caption("犬が 走る", "ja") == ["犬", "が", "走", "る"]
    assert tokenize_caption("แมว ดำ", "th") == ["แ", "ม", "ว", "ด", "ำ"]
    assert sacrebleu_tokenizer("zh-Hant") == "zh"
    assert sacrebleu_tokenizer("ja") == "char"
    assert sacrebleu_tokenizer("ko") == "13a"


def test_bleu_hand_computed():
    # Every n-gram precision is 1; hypothesis 4 words vs reference 5: BP = exp(1 - 5/4).
    expected = 100 * math.exp(-0.25)
    assert bleu4(["a b c d"], [["a b c d e"]], "en")[0] == pytest.approx(expected, abs=1e-6)
    # The same in Chinese only works with character tokenization.
    assert bleu4(["猫坐在垫"], [["猫坐在垫子"]], "zh")[0] == pytest.approx(expected, abs=1e-6)
    assert bleu4(["A B C D"], [["a b c d e", "x"]], "en")[0] == pytest.approx(expected, abs=1e-6)
    assert bleu4(["q r s t"], [["a b c d"]], "en")[0] == 0.0


def test_chrf_hand_computed():
    # n=1: P 1, R 2/3; n=2: P 1, R 1/2; longer orders absent. avg P 1, avg R 7/12;
    # F2 = 5 P R / (4 P + R) = 35/55.
    assert chrf(["ab"], [["abc"]])[0] == pytest.approx(100 * 35 / 55, abs=1e-6)
    assert chrf(["same text"], [["same text"]])[0] == pytest.approx(100.0)


def test_task_metrics_and_empty_predictions():
    assert task_metrics("vqa", [], [], "en") == {"accuracy": 0.0, "exact_match": 0.0, "anls": 0.0}
    ocr = task_metrics("ocr", ["", "exit"], [["exit"], ["exit"]], "en")
    assert ocr == {"anls": 50.0, "exact_match": 50.0}
    with pytest.raises(ValueError, match="unknown task 'retrieval'"):
        task_metrics("retrieval", [], [], "en")


def test_compute_metrics_per_task_and_language():
    records = [
        {"task": "caption", "lang": "en", "prediction": "a b", "references": ["a b"]},
        {"task": "caption", "lang": "en", "prediction": "c d", "references": ["c d"]},
        {"task": "caption", "lang": "zh", "prediction": "", "references": ["猫", "狗"]},
        {"task": "caption", "lang": "zh", "prediction": "鸟", "references": ["鸟"]},
        {"task": "vqa", "lang": "en", "prediction": "two", "references": ["2"]},
        {"task": "vqa", "lang": "fr", "prediction": "non", "references": ["oui"]},
        {"task": "ocr", "lang": "en", "prediction": "hallo", "references": ["hello"]},
        {"task": "ocr", "lang": "en", "prediction": "x", "references": []},
    ]
    m = compute_metrics(records)
    assert m["skipped_no_references"] == 1
    assert m["tasks"]["caption"]["langs"]["en"]["cider"] == pytest.approx(500.0)  # see test_cider
    zh_cider = m["tasks"]["caption"]["langs"]["zh"]["cider"]
    assert m["tasks"]["caption"]["cider"] == pytest.approx((500.0 + zh_cider) / 2)  # macro over langs
    assert m["tasks"]["caption"]["empty_predictions"] == 1
    assert m["tasks"]["vqa"]["accuracy"] == pytest.approx(50.0)  # en 100, fr 0
    assert m["tasks"]["ocr"]["anls"] == pytest.approx(80.0)
    assert m["langs"]["en"] == pytest.approx({"num_examples": 4, "caption/cider": 500.0,
                                              "vqa/accuracy": 100.0, "ocr/anls": 80.0})
    assert m["overall"]["num_examples"] == 7
    assert m["overall"]["vqa/accuracy"] == pytest.approx(50.0)
    with pytest.raises(ValueError, match="unknown task 'vqg'"):
        compute_metrics([{"task": "vqg", "lang": "en", "prediction": "", "references": ["x"]}])
