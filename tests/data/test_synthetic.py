"""Synthetic corpus: determinism per seed, language and script coverage, grammar, rendering."""

from __future__ import annotations

import io
import unicodedata
import warnings

import numpy as np
from PIL import Image

from pali.data import synthetic
from pali.data.lexicon import GRAMMARS, Group
from pali.data.prompts import SUPPORTED_LANGS, SYNTHETIC_LANGS
from pali.data.schema import read_shard
from pali.data.synthetic import make_example, make_texts, write_synthetic_shards


def test_deterministic_per_seed(tmp_path):
    a = write_synthetic_shards(str(tmp_path / "a"), 12, seed=5, examples_per_shard=5)
    b = write_synthetic_shards(str(tmp_path / "b"), 12, seed=5, examples_per_shard=5, num_workers=2)
    c = write_synthetic_shards(str(tmp_path / "c"), 12, seed=6, examples_per_shard=5)
    rows_a = [r for p in a for r in read_shard(p).rows]
    rows_b = [r for p in b for r in read_shard(p).rows]
    rows_c = [r for p in c for r in read_shard(p).rows]
    assert len(a) == 3 and len(rows_a) == 12
    assert rows_a == rows_b  # byte-identical images, identical text, whatever the worker count
    assert sum(x["image"] != y["image"] for x, y in zip(rows_a, rows_c, strict=True)) >= 10
    assert {r["id"] for r in rows_a}.isdisjoint({r["id"] for r in rows_c})  # held-out seed: new ids


def _scripts(text: str) -> set[str]:
    out = set()
    for ch in text:
        if not ch.isalpha():
            continue
        name = unicodedata.name(ch, "")
        for script in ("LATIN", "CYRILLIC", "ARABIC", "DEVANAGARI", "CJK", "HIRAGANA", "KATAKANA", "HANGUL"):
            if name.startswith(script):
                out.add(script)
    return out


def test_language_and_script_coverage():
    assert len(SYNTHETIC_LANGS) >= 10 and set(SYNTHETIC_LANGS) <= set(SUPPORTED_LANGS)
    rows = [make_texts(i, seed=0) for i in range(40)]
    assert {r["lang"] for r in rows} == set(SYNTHETIC_LANGS)
    expected = {"en": {"LATIN"}, "fr": {"LATIN"}, "de": {"LATIN"}, "es": {"LATIN"}, "ru": {"CYRILLIC"},
                "ar": {"ARABIC"}, "hi": {"DEVANAGARI"}, "zh": {"CJK"}, "ko": {"HANGUL"}}
    seen: set[str] = set()
    for r in rows:
        scripts = _scripts(r["text"] + r["question"])
        seen |= scripts
        if r["lang"] in expected:
            assert scripts == expected[r["lang"]], r
        if r["lang"] == "ja":
            assert scripts <= {"CJK", "HIRAGANA", "KATAKANA"} and "HIRAGANA" in scripts
        if r["ocr_text"]:
            assert r["ocr_text"] in GRAMMARS[r["lang"]].ocr_words
    assert {"LATIN", "CYRILLIC", "ARABIC", "DEVANAGARI", "CJK"} <= seen


def test_grammar_agreement():
    g = [Group("star", "green", 1), Group("circle", "red", 2)]
    assert GRAMMARS["en"].caption([Group("circle", "orange", 1)]) == "an orange circle"
    assert GRAMMARS["fr"].caption(g) == "deux cercles rouges et une étoile verte"
    assert GRAMMARS["de"].caption([Group("heart", "blue", 1), Group("diamond", "yellow", 3)]) == \
        "ein blaues Herz und drei gelbe Rauten"
    assert GRAMMARS["es"].caption(g) == "dos círculos rojos y una estrella verde"
    assert GRAMMARS["ru"].caption([Group("star", "red", 2), Group("circle", "blue", 3)]) == \
        "три синих круга и две красные звезды"
    assert GRAMMARS["ar"].caption([Group("circle", "red", 2), Group("square", "blue", 3)]) == \
        "دائرتان حمراوان وثلاثة مربعات زرقاء"
    assert GRAMMARS["hi"].caption([Group("star", "green", 2)]) == "दो हरे तारे"
    assert GRAMMARS["zh"].caption(g) == "两个红色的圆形和一个绿色的星形"
    assert GRAMMARS["ja"].caption(g) == "二つの赤い円と一つの緑の星"
    assert GRAMMARS["ko"].caption(g) == "빨간 원 두 개와 초록색 별 한 개"
    assert GRAMMARS["fr"].q_colour("star", 1) == "de quelle couleur est l'étoile ?"
    assert GRAMMARS["ko"].q_count("heart") == "하트는 몇 개 있어요?"


def test_caption_order_is_fixed_by_the_scene():
    """Groups are named in SHAPES order, whatever order they are given in: the image determines the caption."""
    for lang, gram in GRAMMARS.items():
        a, b = Group("diamond", "blue", 1), Group("circle", "red", 2)
        assert gram.caption([a, b]) == gram.caption([b, a]) == gram.conj.join([gram.np(b), gram.np(a)]), lang


def test_answers_match_scene():
    for i in range(30):
        r = make_texts(i, seed=1)
        gram = GRAMMARS[r["lang"]]
        words = {gram.a_colour(c) for c in synthetic.COLOURS} | {gram.a_shape(s) for s in synthetic.SHAPES}
        assert r["answer"] in words | {"1", "2", "3"}


def test_image_labels_name_what_is_drawn():
    for i in range(40):
        r = make_texts(i, seed=2)
        labels = r["image_labels"]
        families = [lab.split(":", 1)[0] for lab in labels]
        assert families.count("count") == 1 and 1 <= families.count("shape") == families.count("colour") <= 2
        assert (f"text:{r['ocr_text']}" in labels) == bool(r["ocr_text"]) and families.count("text") <= 1
        gram = GRAMMARS[r["lang"]]
        if r["answer"] in {gram.a_colour(c) for c in synthetic.COLOURS}:  # a colour answer is a present colour
            assert any(r["answer"] == gram.a_colour(lab[7:]) for lab in labels if lab.startswith("colour:"))


def test_images_render_and_differ_with_a_sign():
    ex = make_example(2, seed=0, image_size=64)  # example 2 is German with a sign (see seed 0)
    img = Image.open(io.BytesIO(ex["image"]))
    assert img.size == (64, 64) and img.mode == "RGB"
    arr = np.asarray(img)
    assert ex["ocr_text"] == "Ausgang"
    band = arr[46:60, 4:60]  # the sign: white with dark glyphs
    assert (band > 240).all(axis=-1).mean() > 0.4 and (band < 80).all(axis=-1).mean() > 0.03
    assert make_example(2, seed=0, image_size=128)["text"] == ex["text"]


def test_missing_fonts_warn_not_crash(monkeypatch):
    monkeypatch.setattr(synthetic, "_FONT_DIRS", ("/nonexistent",))
    synthetic._find_font_file.cache_clear()
    synthetic.font_for.cache_clear()
    try:
        with warnings.catch_warnings(record=True) as w:
            warnings.simplefilter("always")
            row = next(make_example(i, seed=0) for i in range(5, 50) if make_texts(i)["ocr_text"] and
                       make_texts(i)["lang"] == "ar")
        assert row["image"] and any("fonts-noto" in str(x.message) for x in w)
    finally:
        synthetic._find_font_file.cache_clear()
        synthetic.font_for.cache_clear()
