"""PaLI task prompts, shared by training, evaluation and serving.

| task | prompt | target |
|---|---|---|
| caption | `Generate the alt_text in {lang} at 0:` | the caption |
| split_caption | `Generate the alt_text in {lang} at {k}: <first k words>` | the remaining words |
| ocr | `Generate the ocr_text in {lang}:` | the text written in the image |
| vqa | `Answer in {lang}: {question}` | the answer |
| vqg | `Generate a question in {lang} for {answer}:` | the question |
| span_corruption | (none: the input is the corrupted text, no image) | `<extra_id_0> span ...` |

Templates are English with the target language code, as in PaLI (Chen et al. 2022, sec. 3.3). The
language is any registered BCP-47 tag, written in its canonical form (`canonical_lang`, from
`pali.data.langs`): prompts, training rows, evaluation and the HTTP API all validate through it.
"""

from __future__ import annotations

from pali.data.langs import canonical_lang

TASKS: tuple[str, ...] = ("caption", "split_caption", "ocr", "vqa", "vqg", "span_corruption")
"""Every task of the training mixture."""

SERVING_TASKS: tuple[str, ...] = ("caption", "vqa", "ocr")
"""Tasks the HTTP API exposes (plus `raw`, which takes a prompt verbatim)."""

SYNTHETIC_LANGS: tuple[str, ...] = ("en", "fr", "de", "es", "ru", "ar", "hi", "zh", "ja", "ko")
"""Languages of the synthetic corpus: Latin, Cyrillic, Arabic, Devanagari, Han, Kana and Hangul scripts."""

XM3600_LANGS: tuple[str, ...] = (
    "ar", "bn", "cs", "da", "de", "el", "en", "es", "fa", "fi", "fil", "fr", "he", "hi", "hr", "hu", "id",
    "it", "ja", "ko", "mi", "nl", "no", "pl", "pt", "quz", "ro", "ru", "sv", "sw", "te", "th", "tr", "uk",
    "vi", "zh",
)
"""The 36 languages of Crossmodal-3600 (canonical tags; the dataset writes Hebrew as `iw`)."""

COMMON_LANGS: tuple[str, ...] = SYNTHETIC_LANGS + (
    "it", "pt", "nl", "pl", "tr", "uk", "vi", "id", "th", "he", "fa", "bn", "ta", "sw", "el",
    "sv", "cs", "ro", "hu", "fi", "da", "no", "ms", "ur", "te", "mr", "zh-Hant",
)
"""Widely used languages whose prompt templates every trained tokenizer includes (other languages' are
added from the shards' rows); the order is fixed so tokenizers stay reproducible."""

SUPPORTED_LANGS: tuple[str, ...] = COMMON_LANGS + tuple(x for x in XM3600_LANGS if x not in COMMON_LANGS)
"""Well-known languages (common ones plus all of Crossmodal-3600's), listed by the API's discovery
endpoint. Not a limit: every registered BCP-47 tag is accepted (`canonical_lang`)."""


def check_lang(lang: str) -> str:
    """The canonical form of `lang` (any registered BCP-47 tag), else ValueError naming it."""
    return canonical_lang(lang)


def check_task(task: str, allowed: tuple[str, ...] = TASKS) -> str:
    """Return `task` if in `allowed`, else raise ValueError naming it and the allowed tasks."""
    if task not in allowed:
        raise ValueError(f"unknown task {task!r}; expected one of {list(allowed)}")
    return task


def build_prompt(task: str, lang: str, question: str | None = None, position: int = 0, *,
                 answer: str | None = None) -> str:
    """The PaLI prompt of `task` in language `lang`.

    `question` is required for vqa, `answer` (or, positionally, `question`) for vqg. `position` is the
    split point of split_caption (in words, or characters for scripts without spaces; 0 for plain
    captioning; the caller appends the caption's first `position` words after the colon, see
    `pali.data.tasks.split_words`); `lang` is any registered BCP-47 tag and appears in canonical form.
    span_corruption has no prompt (returns "").
    """
    check_task(task)
    lang = canonical_lang(lang)
    if position < 0:
        raise ValueError(f"split position {position}; expected >= 0")
    if task in ("caption", "split_caption"):
        return f"Generate the alt_text in {lang} at {position}:"
    if task == "ocr":
        return f"Generate the ocr_text in {lang}:"
    if task == "vqa":
        if not question:
            raise ValueError("task 'vqa' needs a question; got none")
        return f"Answer in {lang}: {question}"
    if task == "vqg":
        answer = answer or question  # callers of the positional contract pass the answer as `question`
        if not answer:
            raise ValueError("task 'vqg' needs an answer; got none")
        return f"Generate a question in {lang} for {answer}:"
    return ""


def prompt_templates(langs: tuple[str, ...] = COMMON_LANGS) -> list[str]:
    """Every prompt skeleton in each of `langs` (text to include when training a tokenizer)."""
    out = []
    for lang in langs:
        out += [build_prompt("caption", lang), build_prompt("split_caption", lang, position=3),
                build_prompt("ocr", lang), build_prompt("vqa", lang, question="?"),
                build_prompt("vqg", lang, answer="1")]
    return out
