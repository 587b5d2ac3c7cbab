"""Crossmodal-3600, TextVQA and DocVQA converters on fixtures in their published formats, and the XM3600
scoring: CIDEr per language on `caption/tokenized`, the mean, the non-English mean and English."""

from __future__ import annotations

import json

import pytest
from PIL import Image

from jobs.make_shards import main as make_shards
from pali.data.pipeline import list_shards
from pali.data.schema import read_shard
from pali.data.tasks import make_example, row_rng
from pali.eval.metrics import compute_metrics
from pali.eval.report import caption_table


def _rows(out_dir):
    return [r for p in list_shards(str(out_dir)) for r in read_shard(p).rows]


def test_xm3600(tmp_path):
    images = tmp_path / "images"
    images.mkdir()
    for key, colour in (("0a1b", (200, 0, 0)), ("0c2d", (0, 0, 200))):
        Image.new("RGB", (24, 24), colour).save(images / f"{key}.jpg")
    lines = [
        {"image/key": "0a1b",
         "en": {"caption": ["A red square.", "Red box"], "caption/tokenized": ["a red square .", "red box"]},
         "iw": {"caption": ["ריבוע אדום"], "caption/tokenized": ["ריבוע אדום"]},
         "zh": {"caption": ["红色的方块"], "caption/tokenized": ["红色 的 方块"]},
         "xx": {"caption": ["?"]}},
        {"image/key": "0c2d", "en": {"caption": ["A blue square."]}, "fil": {"caption": []}},
        {"image/key": "missing", "en": {"caption": ["gone"]}},
    ]
    (tmp_path / "captions.jsonl").write_text("\n".join(json.dumps(x, ensure_ascii=False) for x in lines) + "\n{bad\n")
    out = make_shards(["--out", str(tmp_path / "s"), "--from-xm3600", str(tmp_path / "captions.jsonl"),
                       "--images", str(images)])
    assert out["rows"] == 4 and out["skipped"] == {"unregistered_language": 1, "no_caption": 1, "missing_image": 1,
                                                   "malformed_line": 1}
    rows = {(r["id"], r["lang"]): r for r in _rows(tmp_path / "s")}
    assert set(rows) == {("xm3600-0a1b", "en"), ("xm3600-0a1b", "he"), ("xm3600-0a1b", "zh"), ("xm3600-0c2d", "en")}
    en = rows[("xm3600-0a1b", "en")]
    assert (en["text"], en["captions"], en["captions_tokenized"], en["task"]) == (
        "A red square.", ["A red square.", "Red box"], ["a red square .", "red box"], "caption")
    assert rows[("xm3600-0c2d", "en")]["captions_tokenized"] is None
    assert en["image"] == rows[("xm3600-0a1b", "zh")]["image"]  # one image, a row per language
    ex = make_example(en, "caption", None, row_rng(0, en["id"]))
    assert ex.references == en["captions"] and ex.tokenized_references == en["captions_tokenized"]


def test_xm3600_scoring_on_tokenized_references_and_table():
    def rec(i, lang, pred, refs, tok=None):
        return {"id": f"x{i}", "lang": lang, "task": "caption", "prediction": pred, "references": refs,
                "tokenized_references": tok or []}

    # CIDEr reads the tokenized references when a record has them (here they differ on purpose)
    raw = [rec(0, "en", "a small kitten", ["A cat!"]), rec(1, "en", "a dog", ["A dog."]),
           rec(2, "en", "two birds", ["Two birds"])]
    tok = [rec(0, "en", "a small kitten", ["A cat!"], ["a small kitten"]),
           rec(1, "en", "a dog", ["A dog."], ["a dog ."]), rec(2, "en", "two birds", ["Two birds"], ["two birds"])]
    c_raw = compute_metrics(raw)["tasks"]["caption"]["cider"]
    c_tok = compute_metrics(tok)["tasks"]["caption"]["cider"]
    assert c_tok > c_raw
    assert compute_metrics(tok)["tasks"]["caption"]["bleu4"] == compute_metrics(raw)["tasks"]["caption"]["bleu4"]

    fr = [rec(10 + i, "fr", p, [r]) for i, (p, r) in enumerate([("un chat", "un chat"), ("un chien", "un chat noir"),
                                                                 ("deux", "deux oiseaux")])]
    he = [rec(20 + i, "he", p, [r]) for i, (p, r) in enumerate([("חתול", "חתול"), ("כלב", "כלב שחור"),
                                                                 ("שניים", "שתי ציפורים")])]
    m = compute_metrics(tok + fr + he)
    t = m["tasks"]["caption"]
    per = {lang: v["cider"] for lang, v in t["langs"].items()}
    assert t["cider"] == pytest.approx(sum(per.values()) / 3)
    assert t["cider_non_en"] == pytest.approx((per["fr"] + per["he"]) / 2) and t["num_non_en_langs"] == 2
    assert t["cider_en"] == pytest.approx(per["en"])
    lines = caption_table(m).splitlines()
    assert lines[0].split() == ["lang", "n", "CIDEr"] and [x.split()[0] for x in lines[1:4]] == ["en", "fr", "he"]
    assert lines[4].startswith("mean (3)") and lines[5].startswith("non-en (2)") and lines[6].split()[0] == "en"
    assert float(lines[5].split()[-1]) == pytest.approx(t["cider_non_en"], abs=0.01)


def test_textvqa_and_docvqa(tmp_path):
    images = tmp_path / "img"
    (images / "documents").mkdir(parents=True)
    Image.new("RGB", (30, 20), (250, 250, 0)).save(images / "ab12.jpg")
    Image.new("RGB", (30, 40), (255, 255, 255)).save(images / "documents" / "doc7.png")
    textvqa = {"dataset_name": "textvqa", "data": [
        {"question_id": 5, "question": "what brand is it?", "image_id": "ab12",
         "answers": ["nokia"] * 7 + ["nokia phone"] * 3},
        {"question_id": 6, "question": "what year?", "image_id": "ab12", "answers": []},
        {"question_id": 7, "question": "where?", "image_id": "zz99", "answers": ["here"] * 10}]}
    (tmp_path / "textvqa.json").write_text(json.dumps(textvqa))
    out = make_shards(["--out", str(tmp_path / "t"), "--from-textvqa", str(tmp_path / "textvqa.json"),
                       "--images", str(images)])
    assert out["rows"] == 1 and out["skipped"] == {"no_answer": 1, "missing_image": 1, "question_without_image": 1}
    [row] = _rows(tmp_path / "t")
    assert (row["id"], row["answer"], len(row["answers"]), row["task"]) == ("textvqa-5", "nokia", 10, "vqa")

    docvqa = {"dataset_name": "docvqa", "data": [
        {"questionId": 41, "question": "What is the date?", "image": "documents/doc7.png", "docId": 7,
         "answers": ["1 May 1990", "May 1, 1990"]},
        {"questionId": 42, "question": "Total?", "image": "documents/doc7.png", "answers": ["$12"]},
        {"question": "no id", "image": "documents/doc7.png", "answers": ["x"]}]}
    (tmp_path / "docvqa.json").write_text(json.dumps(docvqa))
    out = make_shards(["--out", str(tmp_path / "d"), "--from-docvqa", str(tmp_path / "docvqa.json"),
                       "--images", str(images)])
    assert out["rows"] == 2 and out["skipped"] == {"malformed_question": 1}
    rows = _rows(tmp_path / "d")
    assert [(r["id"], r["answers"]) for r in rows] == [("docvqa-41", ["1 May 1990", "May 1, 1990"]),
                                                       ("docvqa-42", ["$12"])]
    scores = compute_metrics([{"id": "docvqa-41", "lang": "en", "task": "vqa", "prediction": "1 may 1990.",
                               "references": rows[0]["answers"]}])["tasks"]["vqa"]
    assert scores["anls"] == pytest.approx(100 * (1 - 1 / 11)) and scores["exact_match"] == 100.0
    (tmp_path / "bad.json").write_text("[]")
    with pytest.raises(ValueError, match="not DocVQA JSON"):
        make_shards(["--out", str(tmp_path / "x"), "--from-docvqa", str(tmp_path / "bad.json"),
                     "--images", str(images)])
    with pytest.raises(SystemExit):
        make_shards(["--out", str(tmp_path / "x"), "--from-textvqa", "a.json", "--from-docvqa", "b.json",
                     "--images", str(images)])
