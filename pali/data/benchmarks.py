"""Converters from evaluation benchmarks in their published formats to shards: Crossmodal-3600, TextVQA, DocVQA.

- Crossmodal-3600: `captions.jsonl`, one line per image with `image/key` and per language
  `{"caption": [...], "caption/tokenized": [...]}`; images `KEY.jpg` -> one caption row per (image,
  language), scored by CIDEr per language on `caption/tokenized`.
- TextVQA: a `data` list with `question_id`, `question`, `image_id` and 10 `answers`; images
  `IMAGE_ID.jpg` -> one VQA row per question, scored by VQA accuracy over the 10 answers.
- DocVQA: a `data` list with `questionId`, `question`, `image` (a path) and `answers` -> one VQA row per
  question, scored by ANLS (`tasks.vqa.anls`).

Rows keep the benchmark's own ids (`xm3600-KEY`, the same in every language: evaluation identifies an
example by (id, lang, task)). Missing images, unregistered languages and entries without the needed
fields are counted in the report and skipped, as in `pali.data.convert`.
"""

from __future__ import annotations

import json
import os
from collections import Counter
from typing import Any

from pali.data.convert import ConvertReport, _image_bytes, _load_json
from pali.data.langs import canonical_lang
from pali.data.prompts import check_lang
from pali.data.schema import ShardWriter


def _find_image(images_dir: str, name: str, exts: tuple[str, ...] = ("", ".jpg", ".jpeg", ".png")) -> str | None:
    for candidate in (name, os.path.basename(name)):
        for ext in exts:
            path = os.path.join(images_dir, candidate + ext)
            if os.path.isfile(path):
                return path
    return None


def convert_xm3600(captions_jsonl: str, images_dir: str, out_dir: str, fmt: str = "parquet",
                   examples_per_shard: int = 256, max_side: int | None = None, prefix: str = "xm3600",
                   langs: list[str] | None = None) -> ConvertReport:
    """Crossmodal-3600 -> one caption row per (image, language): `captions` every caption of that language,
    `captions_tokenized` the published `caption/tokenized` list (CIDEr scores against it).

    langs: keep only these languages (None = every language of the file).
    """
    if not os.path.isfile(captions_jsonl):
        raise FileNotFoundError(f"XM3600 captions file {captions_jsonl!r} does not exist")
    keep = {canonical_lang(x) for x in langs} if langs else None
    report = ConvertReport()
    writer = ShardWriter(out_dir, prefix, examples_per_shard, fmt)
    with open(captions_jsonl, encoding="utf-8") as f:
        for line in f:
            if not line.strip():
                continue
            try:
                entry = json.loads(line)
            except json.JSONDecodeError:
                report.skipped["malformed_line"] += 1
                continue
            if not isinstance(entry, dict) or not isinstance(entry.get("image/key"), str):
                report.skipped["malformed_line"] += 1
                continue
            key = entry["image/key"]
            path = _find_image(images_dir, key)
            if path is None:
                report.skipped["missing_image"] += 1
                continue
            image = _image_bytes(path, max_side, report)
            if image is None:
                continue
            for tag, value in entry.items():
                if tag == "image/key":
                    continue
                try:
                    lang = canonical_lang(tag)
                except ValueError:
                    report.skipped["unregistered_language"] += 1
                    continue
                if keep is not None and lang not in keep:
                    continue
                caps = value.get("caption") if isinstance(value, dict) else None
                if not isinstance(caps, list) or not caps or not all(isinstance(c, str) and c.strip() for c in caps):
                    report.skipped["no_caption"] += 1
                    continue
                tokenized = value.get("caption/tokenized")
                if not (isinstance(tokenized, list) and len(tokenized) == len(caps)
                        and all(isinstance(t, str) for t in tokenized)):
                    tokenized = None
                writer.add({"id": f"{prefix}-{key}", "image": image, "lang": lang, "text": caps[0],
                            "captions": caps, "captions_tokenized": tokenized, "task": "caption"})
                report.rows += 1
    report.paths = writer.close()
    return report


def _qa_entries(path: str, what: str) -> list[Any]:
    data = _load_json(path, what)
    if not isinstance(data, dict) or not isinstance(data.get("data"), list):
        raise ValueError(f"{path!r} is not {what} JSON; expected an object with a 'data' list")
    return data["data"]


def _convert_qa(entries: list[Any], images_dir: str, out_dir: str, lang: str, fmt: str, examples_per_shard: int,
                max_side: int | None, prefix: str, qid_key: str, image_of) -> ConvertReport:
    lang = check_lang(lang)
    report = ConvertReport()
    writer = ShardWriter(out_dir, prefix, examples_per_shard, fmt)
    last: tuple[str | None, bytes | None] = (None, None)  # consecutive questions on one image read it once
    for e in entries:
        if not isinstance(e, dict) or e.get(qid_key) is None or not isinstance(e.get("question"), str):
            report.skipped["malformed_question"] += 1
            continue
        answers = [a for a in e.get("answers") or [] if isinstance(a, str) and a.strip()]
        if not answers:
            report.skipped["no_answer"] += 1
            continue
        name = image_of(e)
        if not isinstance(name, str):
            report.skipped["malformed_question"] += 1
            continue
        if last[0] != name:
            path = _find_image(images_dir, name)
            if path is None:
                report.skipped["missing_image"] += 1
                last = (name, None)
            else:
                last = (name, _image_bytes(path, max_side, report))
        if last[1] is None:
            report.skipped["question_without_image"] += 1
            continue
        writer.add({"id": f"{prefix}-{e[qid_key]}", "image": last[1], "lang": lang, "text": "",
                    "question": e["question"], "answer": Counter(answers).most_common(1)[0][0],
                    "answers": answers, "task": "vqa"})
        report.rows += 1
    report.paths = writer.close()
    return report


def convert_textvqa(questions_json: str, images_dir: str, out_dir: str, lang: str = "en", fmt: str = "parquet",
                    examples_per_shard: int = 256, max_side: int | None = None,
                    prefix: str = "textvqa") -> ConvertReport:
    """TextVQA -> one VQA row per question: `answer` the most common of the 10 answers, `answers` all of
    them (VQA accuracy); images are `IMAGE_ID.jpg` under `images_dir`."""
    entries = _qa_entries(questions_json, "TextVQA")
    return _convert_qa(entries, images_dir, out_dir, lang, fmt, examples_per_shard, max_side, prefix,
                       "question_id", lambda e: e.get("image_id"))


def convert_docvqa(questions_json: str, images_dir: str, out_dir: str, lang: str = "en", fmt: str = "parquet",
                   examples_per_shard: int = 256, max_side: int | None = None,
                   prefix: str = "docvqa") -> ConvertReport:
    """DocVQA -> one VQA row per question with every accepted answer (scored by ANLS); `image` is a path
    relative to `images_dir` (`documents/xyz.png`; the file name alone is tried too)."""
    entries = _qa_entries(questions_json, "DocVQA")
    return _convert_qa(entries, images_dir, out_dir, lang, fmt, examples_per_shard, max_side, prefix,
                       "questionId", lambda e: e.get("image"))
