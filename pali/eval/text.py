"""Language-aware text handling shared by the metrics.

Captions in space-delimited languages are split into words; zh, ja and th have no word boundaries, so
multilingual captioning benchmarks (Crossmodal-3600, as reported in PaLI) score them on characters.
Korean separates words with spaces and is treated as space-delimited.
"""

from __future__ import annotations

import unicodedata

CHAR_LANGS: frozenset[str] = frozenset({"zh", "ja", "th"})
"""Primary language subtags scored on characters instead of words."""


def primary_lang(lang: str) -> str:
    """The primary subtag of a BCP-47 tag, lower-cased: "zh-Hans" -> "zh", "pt_BR" -> "pt"."""
    return lang.replace("_", "-").split("-", 1)[0].strip().lower()


def is_char_lang(lang: str) -> bool:
    """True for languages scored per character (zh, ja, th)."""
    return primary_lang(lang) in CHAR_LANGS


def _is_punct(ch: str) -> bool:
    # Unicode punctuation (P*) and symbols (S*): ASCII ".,!?" as well as "。、「」" and "฿".
    return unicodedata.category(ch)[0] in "PS"


def tokenize_caption(text: str, lang: str) -> list[str]:
    """Caption tokens for CIDEr: lower-cased, punctuation dropped, NFC-normalised.

    Space-delimited languages: punctuation becomes a space, then whitespace splits words
    ("A dog, running." -> ["a", "dog", "running"]). zh / ja / th: punctuation and whitespace are
    dropped and every remaining character is a token ("一只狗。" -> ["一", "只", "狗"]).
    """
    text = unicodedata.normalize("NFC", text).lower()
    if is_char_lang(lang):
        return [ch for ch in text if not ch.isspace() and not _is_punct(ch)]
    return "".join(" " if _is_punct(ch) else ch for ch in text).split()


def sacrebleu_tokenizer(lang: str) -> str:
    """The sacrebleu tokenizer name for a language: "zh" for Chinese, "char" for ja / th, else "13a".

    None of these needs an extra dependency (sacrebleu's "ja-mecab" / "ko-mecab" would).
    """
    primary = primary_lang(lang)
    if primary == "zh":
        return "zh"
    if primary in CHAR_LANGS:
        return "char"
    return "13a"


def normalize_answer_text(text: str) -> str:
    """OCR answer normalisation of the ST-VQA / DocVQA ANLS scripts: lower-case, collapse whitespace."""
    return " ".join(text.lower().split())
