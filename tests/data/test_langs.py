"""Any registered BCP-47 language: canonical tags, prompts, and script-driven splitting."""

from __future__ import annotations

import pytest

from pali.data.langs import MANY_LANGS, canonical_lang, lang_script, splits_by_character
from pali.data.prompts import XM3600_LANGS, build_prompt
from pali.data.tasks import check_langs, split_words, supported_tasks
from pali.eval.text import sacrebleu_tokenizer, tokenize_caption


def test_every_registered_tag_is_a_language_in_canonical_form():
    assert len(MANY_LANGS) >= 100 and len(set(MANY_LANGS)) == len(MANY_LANGS)
    assert [canonical_lang(x) for x in MANY_LANGS] == list(MANY_LANGS)
    assert [canonical_lang(x) for x in XM3600_LANGS] == list(XM3600_LANGS) and len(XM3600_LANGS) == 36
    assert canonical_lang("zh-hant") == "zh-Hant" and canonical_lang("EN_us") == "en-US"
    assert canonical_lang("iw") == "he" and canonical_lang("en-Latn") == "en"  # deprecated / suppressed script
    for bad in ("xx", "", "english", "a-b-c", "und"):
        with pytest.raises(ValueError, match=f"unsupported language {bad!r}"):
            canonical_lang(bad)
    assert build_prompt("caption", "quz") == "Generate the alt_text in quz at 0:"
    assert build_prompt("vqa", "zh-hant", question="?") == "Answer in zh-Hant: ?"
    with pytest.raises(ValueError, match="'xx'"):
        build_prompt("ocr", "xx")
    assert check_langs(["FR", "fr", "haw"]) == ("fr", "haw")
    with pytest.raises(ValueError, match=r"\['qq1'\]"):
        check_langs(["en", "qq1"])


@pytest.mark.parametrize("lang,text,units", [
    ("th", "แมวสีดำ", 7), ("lo", "ແມວດຳ", 5), ("km", "ឆ្មា", 4), ("my", "ကြောင်", 6), ("bo", "ཞིམི", 4),
    ("yue", "一隻貓", 3), ("ja", "黒い猫", 3), ("zh-Hant", "一隻貓", 3),
    ("ko", "검은 고양이", 2), ("ja-Latn", "kuroi neko", 2), ("fil", "isang itim na pusa", 4), ("am", "ጥቁር ድመት", 2),
])
def test_splitting_follows_the_script(lang, text, units):
    by_char = units == len(text)
    assert splits_by_character(lang) is by_char, lang_script(lang)
    parts, joiner = split_words(text, lang)
    assert len(parts) == units and joiner.join(parts) == text
    assert len(tokenize_caption(text, lang)) == units - text.count(" ") * by_char
    assert "split_caption" in supported_tasks({"lang": lang, "text": text})
    assert sacrebleu_tokenizer(lang) == ("zh" if lang in ("yue", "zh-Hant") else "char" if by_char else "13a")
