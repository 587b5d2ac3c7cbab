"""Language-aware text handling shared by the metrics.

Captions in space-delimited languages are split into words; languages whose script writes no spaces
between words (Han, Kana, Thai, Lao, Khmer, Myanmar, Tibetan: `pali.data.langs.CHARACTER_SCRIPTS`) are
scored on characters, as multilingual captioning benchmarks (Crossmodal-3600, as reported in PaLI) do.
The script comes from the tag (`zh-Latn`: words) or the language's likely script (`yue` -> Hant).
Korean separates words with spaces and is treated as space-delimited.
"""

from __future__ import annotations

import unicodedata

from pali.data.langs import is_han, is_valid_lang, splits_by_character


def primary_lang(lang: str) -> str:
    """The primary subtag of a BCP-47 tag, lower-cased: "zh-Hans" -> "zh", "pt_BR" -> "pt"."""
    return lang.replace("_", "-").split("-", 1)[0].strip().lower()


def is_char_lang(lang: str) -> bool:
    """True for languages scored per character (their script writes no spaces between words)."""
    return is_valid_lang(lang) and splits_by_character(lang)


def _is_punct(ch: str) -> bool:
    # Unicode punctuation (P*) and symbols (S*): ASCII ".,!?" as well as "。、「」" and "฿".
    return unicodedata.category(ch)[0] in "PS"


def tokenize_caption(text: str, lang: str) -> list[str]:
    """Caption tokens for CIDEr: lower-cased, punctuation dropped, NFC-normalised.

    Space-delimited languages: punctuation becomes a space, then whitespace splits words
    ("A dog, running." -> ["a", "dog", "running"]). Character scripts: punctuation and whitespace are
    dropped and every remaining character is a token ("一只狗。" -> ["一", "只", "狗"]).
    """
    text = unicodedata.normalize("NFC", text).lower()
    if is_char_lang(lang):
        return [ch for ch in text if not ch.isspace() and not _is_punct(ch)]
    return "".join(" " if _is_punct(ch) else ch for ch in text).split()


def tokenize_reference(tokenized: str, lang: str) -> list[str]:
    """CIDEr tokens of a pre-tokenized reference (space-separated, e.g. XM3600's `caption/tokenized`).

    The published tokens are put through the same rules as the predictions (`tokenize_caption`:
    lower-case, punctuation dropped; characters for character scripts), so a prediction and its
    references are always tokenized alike; the segmentation and spelling are the benchmark's.
    """
    return tokenize_caption(tokenized, lang)


def sacrebleu_tokenizer(lang: str) -> str:
    """The sacrebleu tokenizer name for a language: "zh" for Han-script languages (Chinese, Cantonese),
    "char" for the other character scripts (Japanese, Thai, Khmer, ...), else "13a".

    None of these needs an extra dependency (sacrebleu's "ja-mecab" / "ko-mecab" would).
    """
    if not is_valid_lang(lang):
        return "13a"
    if is_han(lang):
        return "zh"
    if splits_by_character(lang):
        return "char"
    return "13a"


def normalize_answer_text(text: str) -> str:
    """OCR answer normalisation of the ST-VQA / DocVQA ANLS scripts: lower-case, collapse whitespace."""
    return " ".join(text.lower().split())
