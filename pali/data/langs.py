"""Languages: any registered BCP-47 tag, in its canonical form, and how its script splits text.

A language of the mixture, the prompts, evaluation and serving is any tag of the IANA language subtag
registry (validated with `langcodes`), written in its canonical form: case normalised (`zh-hant` ->
`zh-Hant`, `EN-us` -> `en-US`), `_` read as `-`, a suppressed script dropped (`en-Latn` -> `en`) and
deprecated subtags replaced (`iw` -> `he`). So `EN` and `en` rows are one language.

Split-captioning and CIDEr count characters, not words, for languages whose script writes no spaces
between words; the script is the tag's own (`ja-Latn`: words) or the one the language is most likely
written in (CLDR likely subtags: `th` -> Thai, `yue` -> Hant).
"""

from __future__ import annotations

import functools

import langcodes

CHARACTER_SCRIPTS: frozenset[str] = frozenset({
    "Hani", "Hans", "Hant", "Hira", "Kana", "Hrkt", "Jpan", "Thai", "Laoo", "Khmr", "Mymr", "Tibt",
})
"""ISO 15924 scripts written without spaces between words (Han, Kana, Thai, Lao, Khmer, Myanmar, Tibetan)."""

MANY_LANGS: tuple[str, ...] = (
    "af", "am", "ar", "az", "be", "bg", "bn", "bo", "bs", "ca", "ceb", "co", "cs", "cy", "da", "de", "el", "en",
    "eo", "es", "et", "eu", "fa", "fi", "fil", "fr", "fy", "ga", "gd", "gl", "gu", "ha", "haw", "he", "hi", "hmn",
    "hr", "ht", "hu", "hy", "id", "ig", "is", "it", "ja", "jv", "ka", "kk", "km", "kn", "ko", "ku", "ky", "la",
    "lb", "lo", "lt", "lv", "mg", "mi", "mk", "ml", "mn", "mr", "ms", "mt", "my", "ne", "nl", "no", "ny", "or",
    "pa", "pl", "ps", "pt", "quz", "ro", "ru", "rw", "sd", "si", "sk", "sl", "sm", "sn", "so", "sq", "sr", "st",
    "su", "sv", "sw", "ta", "te", "tg", "th", "tk", "tr", "tt", "ug", "uk", "ur", "uz", "vi", "xh", "yi", "yo",
    "yue", "zh", "zh-Hant", "zu",
)
"""112 languages in 17 scripts (Latin, Cyrillic, Arabic, Indic, Han, Kana, Hangul, Thai, Lao, Khmer, Myanmar,
Tibetan, Ethiopic, Georgian, Armenian, Hebrew, Greek): WebLI-scale coverage, for tests and examples."""

NOT_A_LANGUAGE: frozenset[str] = frozenset({"und", "mul", "mis", "zxx"})
"""Registered codes that name no language of a text (undetermined, multiple, uncoded, no linguistic
content): refused like unregistered tags."""


@functools.lru_cache(maxsize=4096)
def canonical_lang(tag: str) -> str:
    """The canonical form of a registered BCP-47 language tag; ValueError naming `tag` otherwise.

    `canonical_lang("zh-hant") == "zh-Hant"`, `canonical_lang("iw") == "he"`; `"xx"`, `""` and `"und"`
    raise. Cached: safe to call once per row.
    """
    if not isinstance(tag, str) or not tag.strip():
        raise ValueError(f"unsupported language {tag!r}: expected a BCP-47 language tag such as 'en', "
                         "'zh-Hant' or 'quz'")
    text = tag.strip().replace("_", "-")
    try:
        valid = langcodes.tag_is_valid(text)
        canonical = langcodes.standardize_tag(text) if valid else ""
    except (ValueError, langcodes.LanguageTagError):
        valid = False
    if valid and canonical.split("-", 1)[0] in NOT_A_LANGUAGE:
        raise ValueError(f"unsupported language {tag!r}: the code names no language of a text; expected a "
                         "language's tag such as 'en', 'zh-Hant' or 'quz'")
    if not valid:
        raise ValueError(f"unsupported language {tag!r}: not a registered BCP-47 language tag (IANA language "
                         "subtag registry); expected e.g. 'en', 'fr', 'zh-Hant', 'fil', 'quz'")
    return canonical


def is_valid_lang(tag: str) -> bool:
    """True when `canonical_lang(tag)` succeeds."""
    try:
        canonical_lang(tag)
        return True
    except ValueError:
        return False


@functools.lru_cache(maxsize=4096)
def lang_script(lang: str) -> str:
    """ISO 15924 script of a (valid) tag: its own script subtag, else the language's likely one."""
    return langcodes.Language.get(canonical_lang(lang)).maximize().script or "Zyyy"


def splits_by_character(lang: str) -> bool:
    """True when `lang`'s script writes no spaces between words (split-captioning and CIDEr use characters)."""
    return lang_script(lang) in CHARACTER_SCRIPTS


def is_han(lang: str) -> bool:
    """True for languages written in Han characters alone (Chinese varieties: sacrebleu's "zh" tokenizer)."""
    return lang_script(lang) in ("Hani", "Hans", "Hant")


def split_units(text: str, lang: str) -> tuple[list[str], str]:
    """The units split-captioning counts (characters or words) and the joiner that puts them back together."""
    if splits_by_character(lang):
        return list(text), ""
    return text.split(), " "


def autonym(lang: str) -> str:
    """The language's name in itself ("français", "ไทย"), or the tag when the CLDR has none."""
    try:
        return langcodes.Language.get(canonical_lang(lang)).autonym()
    except Exception:  # language_data missing or the tag has no name data
        return lang
