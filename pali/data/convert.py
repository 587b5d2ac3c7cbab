"""Converters from real datasets to shards: COCO captions (one file per language), VQAv2, and any layout
the readers take (img2dataset WebDataset, Hugging Face parquet) rewritten into the project's own.

Images are copied as their original encoded bytes (or re-encoded as JPEG when `max_side` is given and
the image is larger). Missing or undecodable image files and annotation entries without the needed
fields are counted and skipped, never fatal.
"""

from __future__ import annotations

import io
import json
import os
import re
from collections import Counter, defaultdict
from dataclasses import dataclass, field
from typing import Any

from PIL import Image

from pali.data.prompts import check_lang
from pali.data.schema import ReadOptions, ShardWriter, iter_shard


@dataclass
class ConvertReport:
    """What a conversion wrote and skipped."""

    paths: list[str] = field(default_factory=list)
    """Shards written."""
    rows: int = 0
    """Rows written."""
    skipped: Counter = field(default_factory=Counter)
    """Skipped entries by reason (missing_image, bad_image, malformed_annotation, ...)."""

    def to_dict(self) -> dict[str, Any]:
        """JSON-friendly summary."""
        return {"shards": len(self.paths), "rows": self.rows, "skipped": {k: v for k, v in self.skipped.items() if v}}


def _load_json(path: str, what: str) -> Any:
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{what} file {path!r} does not exist")
    with open(path, encoding="utf-8") as f:
        return json.load(f)


def _image_bytes(path: str, max_side: int | None, report: ConvertReport) -> bytes | None:
    if not os.path.isfile(path):
        report.skipped["missing_image"] += 1
        return None
    with open(path, "rb") as f:
        data = f.read()
    try:
        img = Image.open(io.BytesIO(data))
        img.load()
    except Exception:
        report.skipped["bad_image"] += 1
        return None
    if max_side and max(img.size) > max_side:
        img.thumbnail((max_side, max_side), Image.Resampling.BICUBIC)
        buf = io.BytesIO()
        img.convert("RGB").save(buf, format="JPEG", quality=90)
        data = buf.getvalue()
    return data


def convert_coco_captions(captions_json: str, images_dir: str, out_dir: str, lang: str = "en",
                          fmt: str = "parquet", examples_per_shard: int = 256, max_side: int | None = None,
                          prefix: str = "coco", shard_prefix: str | None = None) -> ConvertReport:
    """COCO-format captions (`images` + `annotations` with `image_id`, `caption`) -> one row per image.

    `text` is the first caption, `captions` all of them (evaluation references). Ids are
    `{prefix}-{image_id}` whatever the language, so caption files of one image set in several languages
    (COCO-35L) give rows with the same id in each language (examples are keyed by (id, lang, task));
    `shard_prefix` (default `prefix`) names the shard files, so several languages can share `out_dir`.
    """
    lang = check_lang(lang)
    data = _load_json(captions_json, "COCO captions")
    if not isinstance(data, dict) or not isinstance(data.get("images"), list) \
            or not isinstance(data.get("annotations"), list):
        raise ValueError(f"{captions_json!r} is not COCO captions JSON; expected keys 'images' and 'annotations'")
    report = ConvertReport()
    caps: dict[Any, list[str]] = defaultdict(list)
    for a in data["annotations"]:
        if isinstance(a, dict) and isinstance(a.get("caption"), str) and a.get("image_id") is not None \
                and a["caption"].strip():
            caps[a["image_id"]].append(" ".join(a["caption"].split()))
        else:
            report.skipped["malformed_annotation"] += 1
    writer = ShardWriter(out_dir, shard_prefix or prefix, examples_per_shard, fmt)
    for im in sorted(data["images"], key=lambda d: str(d.get("id")) if isinstance(d, dict) else ""):
        if not isinstance(im, dict) or "id" not in im or not isinstance(im.get("file_name"), str):
            report.skipped["malformed_image_entry"] += 1
            continue
        if not caps.get(im["id"]):
            report.skipped["no_caption"] += 1
            continue
        image = _image_bytes(os.path.join(images_dir, im["file_name"]), max_side, report)
        if image is None:
            continue
        writer.add({"id": f"{prefix}-{im['id']}", "image": image, "lang": lang, "text": caps[im["id"]][0],
                    "captions": caps[im["id"]], "task": None})
        report.rows += 1
    report.paths = writer.close()
    return report


def _index_images(images_dir: str) -> dict[int, str]:
    # VQAv2 names images COCO_train2014_000000123456.jpg; plain 123456.jpg works too.
    index: dict[int, str] = {}
    for root, _, files in os.walk(images_dir):
        for name in sorted(files):
            m = re.search(r"(\d+)\.(jpe?g|png)$", name, re.IGNORECASE)
            if m:
                index.setdefault(int(m.group(1)), os.path.join(root, name))
    return index


def convert_vqa(questions_json: str, annotations_json: str, images_dir: str, out_dir: str, lang: str = "en",
                fmt: str = "parquet", examples_per_shard: int = 256, max_side: int | None = None,
                prefix: str = "vqa") -> ConvertReport:
    """VQAv2-format questions + annotations -> one row per question.

    `answer` is `multiple_choice_answer` (else the most common annotator answer), `answers` all ten
    annotator answers (VQA-accuracy references); `text` is empty (no caption).
    """
    lang = check_lang(lang)
    qs = _load_json(questions_json, "VQA questions")
    ans = _load_json(annotations_json, "VQA annotations")
    if not isinstance(qs, dict) or not isinstance(qs.get("questions"), list):
        raise ValueError(f"{questions_json!r} is not VQA questions JSON; expected a 'questions' list")
    if not isinstance(ans, dict) or not isinstance(ans.get("annotations"), list):
        raise ValueError(f"{annotations_json!r} is not VQA annotations JSON; expected an 'annotations' list")
    report = ConvertReport()
    by_qid: dict[Any, dict] = {}
    for a in ans["annotations"]:
        if isinstance(a, dict) and "question_id" in a:
            by_qid[a["question_id"]] = a
        else:
            report.skipped["malformed_annotation"] += 1
    images = _index_images(images_dir)
    last: tuple[int | None, bytes | None] = (None, None)  # questions are grouped by image: keep one in memory
    writer = ShardWriter(out_dir, prefix, examples_per_shard, fmt)
    questions = [q for q in qs["questions"] if isinstance(q, dict)]
    if len(questions) < len(qs["questions"]):
        report.skipped["malformed_question"] += len(qs["questions"]) - len(questions)
    for q in sorted(questions, key=lambda q: (str(q.get("image_id")), str(q.get("question_id")))):
        a = by_qid.get(q.get("question_id"))
        if a is None or not isinstance(q.get("question"), str) or not isinstance(q.get("image_id"), int):
            report.skipped["malformed_question"] += 1
            continue
        answers = [x["answer"] for x in a.get("answers", [])
                   if isinstance(x, dict) and isinstance(x.get("answer"), str)]
        answer = a.get("multiple_choice_answer") or (Counter(answers).most_common(1)[0][0] if answers else None)
        if not isinstance(answer, str) or not answer:
            report.skipped["no_answer"] += 1
            continue
        iid = q["image_id"]
        if last[0] != iid:
            path = images.get(iid)
            if path is None:
                report.skipped["missing_image"] += 1
                last = (iid, None)
            else:
                last = (iid, _image_bytes(path, max_side, report))
        if last[1] is None:
            report.skipped["question_without_image"] += 1
            continue
        writer.add({"id": f"{prefix}-{q['question_id']}", "image": last[1], "lang": lang, "text": "",
                    "question": q["question"], "answer": answer, "answers": answers or [answer]})
        report.rows += 1
    report.paths = writer.close()
    return report


def rewrite_shards(paths: list[str], out_dir: str, opts: ReadOptions | None = None, fmt: str = "parquet",
                   examples_per_shard: int = 256, prefix: str = "shard") -> ConvertReport:
    """Read shards in any layout the readers take (with `opts`' column map and default language) and write
    their valid rows in the project's own layout; malformed rows are counted by reason, unreadable files
    as `bad_shard`."""
    report = ConvertReport()
    writer = ShardWriter(out_dir, prefix, examples_per_shard, fmt)
    for path in paths:
        try:
            for row, why in iter_shard(path, opts):
                if row is None:
                    report.skipped[f"malformed: {why}"] += 1
                    continue
                writer.add(row)
                report.rows += 1
        except Exception:
            report.skipped["bad_shard"] += 1
    report.paths = writer.close()
    return report
