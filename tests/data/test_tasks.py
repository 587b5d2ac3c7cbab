"""Prompts and targets of every task in several languages; the mixture; padding."""

from __future__ import annotations

import numpy as np
import pytest

from pali.data.prompts import SERVING_TASKS, SUPPORTED_LANGS, TASKS, build_prompt
from pali.data.synthetic import make_texts
from pali.data.tasks import (
    choose_task,
    make_example,
    pad_ids,
    row_rng,
    span_corrupt,
    split_words,
    supported_tasks,
    tokenize_examples,
)


def test_prompt_templates():
    assert set(SERVING_TASKS) <= set(TASKS)
    assert build_prompt("caption", "fr") == "Generate the alt_text in fr at 0:"
    assert build_prompt("split_caption", "de", position=3) == "Generate the alt_text in de at 3:"
    assert build_prompt("ocr", "ja") == "Generate the ocr_text in ja:"
    assert build_prompt("vqa", "en", question="how many stars are there?") == \
        "Answer in en: how many stars are there?"
    assert build_prompt("vqg", "ar", answer="2") == "Generate a question in ar for 2:"
    assert build_prompt("span_corruption", "hi") == ""


def test_prompt_errors_name_value_and_choices():
    with pytest.raises(ValueError, match=r"unknown task 'captions'.*'caption'"):
        build_prompt("captions", "en")
    with pytest.raises(ValueError, match=r"unsupported language 'xx'.*'en'"):
        build_prompt("caption", "xx")
    with pytest.raises(ValueError, match="needs a question"):
        build_prompt("vqa", "en")
    assert "zh" in SUPPORTED_LANGS and "ar" in SUPPORTED_LANGS


def _row(lang: str) -> dict:
    for i in range(200):
        r = make_texts(i, seed=0)
        if r["lang"] == lang and r["ocr_text"]:
            return r
    raise AssertionError(lang)


@pytest.mark.parametrize("lang", ["en", "fr", "ru", "ar", "hi", "zh", "ja", "ko"])
def test_every_task_prompt_and_target(lang, data_tokenizer):
    row = _row(lang)
    assert supported_tasks(row) == list(TASKS)
    rng = row_rng(0, row["id"])
    ex = make_example(row, "caption", data_tokenizer, rng)
    assert (ex.prompt, ex.target) == (f"Generate the alt_text in {lang} at 0:", row["text"]) and ex.uses_image
    ex = make_example(row, "split_caption", data_tokenizer, rng)
    head, _, prefix = ex.prompt.partition(": ")
    k = int(head.rsplit(" ", 1)[1])
    units, joiner = split_words(row["text"], lang)
    assert head == f"Generate the alt_text in {lang} at {k}" and 1 <= k < len(units)
    assert prefix == joiner.join(units[:k]) and ex.target == joiner.join(units[k:])
    assert joiner.join([prefix, ex.target]) == row["text"]
    ex = make_example(row, "ocr", data_tokenizer, rng)
    assert (ex.prompt, ex.target) == (f"Generate the ocr_text in {lang}:", row["ocr_text"])
    ex = make_example(row, "vqa", data_tokenizer, rng)
    assert (ex.prompt, ex.target, ex.references) == (f"Answer in {lang}: {row['question']}", row["answer"],
                                                     [row["answer"]])
    ex = make_example(row, "vqg", data_tokenizer, rng)
    assert (ex.prompt, ex.target) == (f"Generate a question in {lang} for {row['answer']}:", row["question"])
    ex = make_example(row, "span_corruption", data_tokenizer, rng)
    assert not ex.uses_image and "<extra_id_0>" in ex.prompt and ex.target.startswith("<extra_id_0>")


def test_span_corruption_reconstructs(data_tokenizer):
    ids = data_tokenizer.encode("три синих круга и две красные звезды и одно сердце", add_eos=False)
    for salt in range(5):
        inp, tgt = span_corrupt(ids, data_tokenizer, row_rng(0, "x", salt))
        sentinels = {data_tokenizer.sentinel_id(k): k for k in range(100)}
        spans: dict[int, list[int]] = {}
        cur = None
        for t in tgt:
            if t in sentinels:
                cur = sentinels[t]
                spans[cur] = []
            else:
                spans[cur].append(t)
        rebuilt = [x for t in inp for x in (spans[sentinels[t]] if t in sentinels else [t])]
        assert rebuilt == ids and 0 < sum(map(len, spans.values())) < len(ids)


def test_mixture_follows_weights_and_row_fields():
    rows = [make_texts(i, seed=0) for i in range(200)]
    only = {"ocr": 1.0}
    picks = [choose_task(r, only, row_rng(0, r["id"])) for r in rows]
    assert all((p == "ocr") == bool(r["ocr_text"]) for p, r in zip(picks, rows, strict=True))
    assert all(p is None for p, r in zip(picks, rows, strict=True) if not r["ocr_text"])
    w = {"caption": 3.0, "vqa": 1.0}
    picks = [choose_task(r, w, row_rng(0, r["id"])) for r in rows]
    assert 0.6 < picks.count("caption") / len(picks) < 0.9 and set(picks) == {"caption", "vqa"}
    assert picks == [choose_task(r, w, row_rng(0, r["id"])) for r in rows]  # reproducible
    forced = {**rows[0], "task": "vqa"}
    assert supported_tasks(forced) == ["vqa"]
    assert supported_tasks({"lang": "en", "text": "", "question": None, "answer": None}) == []


def test_padding_keeps_eos(data_tokenizer):
    assert pad_ids([5, 6, 7], 6).tolist() == [5, 6, 7, 1, 0, 0]
    assert pad_ids(list(range(3, 20)), 4).tolist() == [3, 4, 5, 1]
    row = _row("de")
    exs = [make_example(row, t, data_tokenizer, row_rng(0, "r")) for t in ("caption", "vqa", "span_corruption")]
    out = tokenize_examples(exs, data_tokenizer, max_text_len=12, max_target_len=5)
    assert out["input_ids"].shape == (3, 12) and out["labels"].shape == (3, 5)
    assert out["input_ids"].dtype == np.int64
    assert (out["attention_mask"] == (out["input_ids"] != 0)).all()
    for i in range(3):
        assert 1 in out["labels"][i].tolist() and 1 in out["input_ids"][i].tolist()
    assert data_tokenizer.decode(out["labels"][0]) == exs[0].target[: len(data_tokenizer.decode(out["labels"][0]))]


def test_vqg_answer_positional_and_position_errors():
    assert build_prompt("vqg", "fr", "bleu") == "Generate a question in fr for bleu:"
    with pytest.raises(ValueError, match="needs an answer"):
        build_prompt("vqg", "fr")
    with pytest.raises(ValueError, match="split position -1"):
        build_prompt("split_caption", "fr", position=-1)
