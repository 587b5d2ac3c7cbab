"""The PaLI task mixture: turn one shard row into (prompt, target) for a task, and token ids.

Pure Python (no Ray): the pipeline calls these inside `map_batches`, evaluation and tests call them
directly. Which tasks a row supports depends on its fields (caption text, question/answer, ocr_text).
"""

from __future__ import annotations

import zlib
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from pali.data.langs import canonical_lang, split_units, splits_by_character
from pali.data.prompts import TASKS, build_prompt
from pali.tokenizer import Tokenizer

TEXT_ONLY_TASKS = frozenset({"span_corruption"})


@dataclass
class Example:
    """One task instance of a row before padding."""

    task: str
    prompt: str
    """Prompt text (for span corruption: the corrupted text with sentinels)."""
    target: str
    """Target text (for span corruption: sentinels and the dropped spans)."""
    references: list[str]
    """Every acceptable target (all captions / all answers), for evaluation."""
    input_ids: list[int] | None = None
    """Pre-tokenized prompt (span corruption works on tokens); None = tokenize `prompt`."""
    label_ids: list[int] | None = None
    """Pre-tokenized target without eos; None = tokenize `target`."""
    tokenized_references: list[str] | None = None
    """`references` pre-tokenized, space-separated (a benchmark's own tokenization, e.g. XM3600's
    `caption/tokenized`); None = the metrics tokenize `references` themselves."""

    @property
    def uses_image(self) -> bool:
        """False for text-only tasks (the model masks the visual tokens out)."""
        return self.task not in TEXT_ONLY_TASKS


def row_rng(seed: int, row_id: str, salt: int = 0) -> np.random.Generator:
    """A generator that depends only on (seed, row id, salt): the mixture is reproducible per row."""
    return np.random.default_rng([seed, zlib.crc32(row_id.encode("utf-8")), salt])


def split_words(text: str, lang: str) -> tuple[list[str], str]:
    """Units split-captioning counts (characters when the language's script writes no spaces between words,
    else words) and their joiner (`pali.data.langs.split_units`)."""
    return split_units(text, lang)


def supported_tasks(row: Mapping[str, Any]) -> list[str]:
    """Tasks the row's fields allow, in `TASKS` order."""
    text = row.get("text") or ""
    out = []
    if text.strip():
        out.append("caption")
        if len(split_words(text.strip(), row["lang"])[0]) >= 2:
            out.append("split_caption")
    if row.get("ocr_text"):
        out.append("ocr")
    if row.get("question") and row.get("answer"):
        out += ["vqa", "vqg"]
    if len(text.split()) >= 2 or (splits_by_character(row["lang"]) and len(text) >= 2):
        out.append("span_corruption")
    forced = row.get("task")
    if forced:
        out = [t for t in out if t == forced]
    return out


def choose_task(row: Mapping[str, Any], weights: Mapping[str, float], rng: np.random.Generator) -> str | None:
    """Sample a task among those the row supports, proportionally to `weights` (None if none applies)."""
    cands = [t for t in supported_tasks(row) if weights.get(t, 0.0) > 0]
    if not cands:
        return None
    p = np.array([weights[t] for t in cands], dtype=np.float64)
    return cands[int(rng.choice(len(cands), p=p / p.sum()))]


def span_corrupt(ids: Sequence[int], tokenizer: Tokenizer, rng: np.random.Generator,
                 noise_density: float = 0.15, mean_span: float = 3.0) -> tuple[list[int], list[int]]:
    """T5 span corruption on token ids: (input with sentinels, target `<extra_id_0> span0 <extra_id_1> ...`).

    About `noise_density` of the tokens are dropped in spans of mean length `mean_span`; needs >= 2 ids.
    """
    n = len(ids)
    if n < 2:
        raise ValueError(f"span corruption needs >= 2 tokens; got {n}")
    num_noise = min(max(1, round(n * noise_density)), n - 1)
    num_spans = max(1, min(round(num_noise / mean_span), num_noise, n - num_noise,
                           tokenizer.num_sentinels))

    # noise spans have length >= 1; the kept runs between them >= 1, the two outer runs may be empty
    cuts = np.sort(rng.choice(np.arange(1, num_noise), size=num_spans - 1, replace=False)) \
        if num_spans > 1 else np.array([], dtype=np.int64)
    noise = np.diff(np.concatenate([[0], cuts, [num_noise]])).tolist()
    free = n - num_noise - (num_spans - 1)
    keep = np.diff(np.concatenate([[0], np.sort(rng.integers(0, free + 1, size=num_spans)), [free]])).tolist()
    keep = [k + (1 if 0 < j < num_spans else 0) for j, k in enumerate(keep)]
    inp: list[int] = []
    tgt: list[int] = []
    pos = 0
    for k in range(num_spans):
        inp += list(ids[pos: pos + keep[k]])
        pos += keep[k]
        s = tokenizer.sentinel_id(k)
        inp.append(s)
        tgt.append(s)
        tgt += list(ids[pos: pos + noise[k]])
        pos += noise[k]
    inp += list(ids[pos:])
    return inp, tgt


def _json_list(v: Any) -> list[str]:
    if v is None:
        return []
    if isinstance(v, str):
        import json

        v = json.loads(v) if v else []
    return [str(x) for x in v]


def make_example(row: Mapping[str, Any], task: str, tokenizer: Tokenizer, rng: np.random.Generator) -> Example:
    """Build `task` for `row` (a schema row; `captions`/`answers` may be lists or JSON strings)."""
    lang = row["lang"]
    text = (row.get("text") or "").strip()
    if task == "caption":
        refs = _json_list(row.get("captions")) or [text]
        target = text if not row.get("captions") else refs[int(rng.integers(len(refs)))]
        tokenized = _json_list(row.get("captions_tokenized"))
        return Example(task, build_prompt("caption", lang), target, refs,
                       tokenized_references=tokenized if len(tokenized) == len(refs) else None)
    if task == "split_caption":
        units, joiner = split_words(text, lang)
        k = int(rng.integers(1, len(units)))
        prefix, rest = joiner.join(units[:k]), joiner.join(units[k:])
        return Example(task, f"{build_prompt('split_caption', lang, position=k)} {prefix}", rest, [rest])
    if task == "ocr":
        return Example(task, build_prompt("ocr", lang), row["ocr_text"], [row["ocr_text"]])
    if task == "vqa":
        refs = _json_list(row.get("answers")) or [row["answer"]]
        return Example(task, build_prompt("vqa", lang, question=row["question"]), row["answer"], refs)
    if task == "vqg":
        return Example(task, build_prompt("vqg", lang, answer=row["answer"]), row["question"], [row["question"]])
    if task == "span_corruption":
        ids = tokenizer.encode(text, add_eos=False)
        if len(ids) < 2:  # nothing to corrupt: plain captioning instead
            return make_example(row, "caption", tokenizer, rng)
        inp, tgt = span_corrupt(ids, tokenizer, rng)
        target = tokenizer.decode(tgt)
        return Example(task, tokenizer.decode(inp), target, [target], input_ids=inp, label_ids=tgt)
    raise ValueError(f"unknown task {task!r}; expected one of {list(TASKS)}")


def pad_ids(ids: Sequence[int], length: int, eos_id: int = 1) -> np.ndarray:
    """ids + eos, truncated to `length` (keeping the eos last) and right-padded with 0 -> int64[length]."""
    ids = list(ids)[: length - 1] + [eos_id]
    out = np.zeros(length, dtype=np.int64)
    out[: len(ids)] = ids
    return out


def tokenize_examples(examples: Sequence[Example], tokenizer: Tokenizer, max_text_len: int,
                      max_target_len: int) -> dict[str, np.ndarray]:
    """Padded arrays for a list of examples: input_ids/attention_mask int64[B, S], labels int64[B, T]."""
    prompt_ids = tokenizer.encode_batch([e.prompt for e in examples], add_eos=False)
    target_ids = tokenizer.encode_batch([e.target for e in examples], add_eos=False)
    b = len(examples)
    input_ids = np.zeros((b, max_text_len), dtype=np.int64)  # (B, S)
    labels = np.zeros((b, max_target_len), dtype=np.int64)  # (B, T)
    for i, e in enumerate(examples):
        input_ids[i] = pad_ids(e.input_ids if e.input_ids is not None else prompt_ids[i], max_text_len)
        labels[i] = pad_ids(e.label_ids if e.label_ids is not None else target_ids[i], max_target_len)
    return {"input_ids": input_ids, "attention_mask": (input_ids != 0).astype(np.int64), "labels": labels}


def default_task_weights() -> dict[str, float]:
    """PaLI-like mixture over every task (captioning-heavy, as WebLI alt-text dominates PaLI's mix)."""
    return {"caption": 0.25, "split_caption": 0.15, "ocr": 0.15, "vqa": 0.25, "vqg": 0.1, "span_corruption": 0.1}


def check_weights(weights: Mapping[str, float]) -> dict[str, float]:
    """Validate a task-weight mapping: known tasks, non-negative, not all zero."""
    bad = [t for t in weights if t not in TASKS]
    if bad:
        raise ValueError(f"unknown tasks {bad} in task_weights; expected some of {list(TASKS)}")
    neg = {t: w for t, w in weights.items() if w < 0}
    if neg:
        raise ValueError(f"negative task weights {neg}; expected >= 0")
    if not any(w > 0 for w in weights.values()):
        raise ValueError(f"task_weights {dict(weights)} are all zero; expected at least one > 0")
    return dict(weights)


def check_langs(langs: Sequence[str] | None) -> tuple[str, ...] | None:
    """A language filter in canonical form (None = every language); an unregistered tag raises ValueError
    naming it."""
    if langs is None:
        return None
    bad = []
    out = []
    for lang in langs:
        try:
            out.append(canonical_lang(lang))
        except ValueError:
            bad.append(lang)
    if bad:
        raise ValueError(f"unsupported languages {bad}: not registered BCP-47 language tags; expected tags "
                         "such as 'en', 'zh-Hant', 'quz'")
    return tuple(dict.fromkeys(out))
