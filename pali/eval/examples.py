"""Which evaluation examples a set of shards holds: one per (row, task the row supports).

Examples themselves are built by the data layer (`pali.data.pipeline.build_eval_dataset`, with
`pali.data.tasks.supported_tasks` / `make_example`: caption references are `captions` or [`text`],
VQA references `answers` or [`answer`], OCR [`ocr_text`]). This module validates the request and
counts the examples up front, so bad input fails before a model is loaded and the run can check that
every example was predicted exactly once.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterable, Sequence
from typing import Any

from pali.data.langs import canonical_lang

EVAL_TASKS: tuple[str, ...] = ("caption", "vqa", "ocr")
"""Tasks the evaluator scores."""


def check_tasks(tasks: Sequence[str]) -> tuple[str, ...]:
    """Validated, de-duplicated tasks; an unknown one raises ValueError naming it."""
    bad = [t for t in tasks if t not in EVAL_TASKS]
    if bad or not tasks:
        raise ValueError(f"unknown or missing evaluation tasks {bad or list(tasks)}; "
                         f"expected some of {list(EVAL_TASKS)}")
    return tuple(dict.fromkeys(tasks))


def check_langs(langs: Sequence[str] | None) -> tuple[str, ...] | None:
    """Validated language filter in canonical form (None = every language); an unregistered tag raises
    ValueError naming it."""
    if langs is None:
        return None
    bad, out = [], []
    for lang in langs:
        try:
            out.append(canonical_lang(lang))
        except ValueError:
            bad.append(lang)
    if bad or not langs:
        raise ValueError(f"unknown language filter {bad or list(langs)}: expected registered BCP-47 tags "
                         "such as 'en', 'zh-Hant', 'quz'")
    return tuple(dict.fromkeys(out))


def _image_ok(data: Any) -> bool:
    from pali.data.pipeline import preprocess_image

    try:
        preprocess_image(data, 8)  # the pipeline's own decode: it skips exactly these rows
        return True
    except Exception:
        return False


def count_examples(rows: Iterable[dict[str, Any]], tasks: Sequence[str], langs: Sequence[str] | None = None,
                   check_images: bool = True) -> dict[str, Any]:
    """Examples per (task, lang) the eval pipeline will produce from `rows`, and why rows yield none.

    Rows come from the readers, so their `lang` is already a canonical registered tag. Returns
    {"examples": Counter[(task, lang)], "langs": Counter[lang] (rows present, before the filter),
    "keys": Counter[(id, lang)] of the rows that yield examples, "bad_images": int}.
    """
    from pali.data.tasks import supported_tasks

    examples: Counter[tuple[str, str]] = Counter()
    present: Counter[str] = Counter()
    keys: Counter[tuple[str, str]] = Counter()
    bad_images = 0
    for row in rows:
        lang = str(row.get("lang") or "")
        present[lang] += 1
        if langs is not None and lang not in langs:
            continue
        have = [t for t in tasks if t in supported_tasks(row)]
        if not have:
            continue
        if check_images and not _image_ok(row.get("image")):
            bad_images += 1
            continue
        keys[(str(row["id"]), lang)] += 1
        for t in have:
            examples[(t, lang)] += 1
    return {"examples": examples, "langs": present, "keys": keys, "bad_images": bad_images}
