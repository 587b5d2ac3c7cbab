"""Corpus metrics per task and language, and their aggregation into `metrics.json`.

| task    | metrics (all on a 0-100 scale)                                   | headline |
|---------|------------------------------------------------------------------|----------|
| caption | CIDEr-D (x100 of the pycocoevalcap value), BLEU-4, chrF (sacrebleu) | cider    |
| vqa     | VQAv2 soft accuracy, exact match, ANLS (DocVQA's metric)          | accuracy |
| ocr     | ANLS (tau 0.5), exact match                                       | anls     |

Every metric is computed per (task, language) on that language's examples (CIDEr's document
frequencies come from that subset's references). A task's score is the unweighted mean over its
languages (as multilingual benchmarks such as Crossmodal-3600 report); "overall" lists each task's
headline. An empty prediction is scored like any other string, i.e. 0 almost always. Captioning also
reports the mean over the non-English languages and English alone (`cider_non_en`, `cider_en`: the
Crossmodal-3600 table). When the data carries pre-tokenized references (XM3600's `caption/tokenized`),
CIDEr scores against them, as published numbers do (`pali.eval.text.tokenize_reference`).
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import sacrebleu
from sacrebleu.metrics import BLEU, CHRF

from pali.eval.anls import anls, ocr_exact_match
from pali.eval.cider import cider_d
from pali.eval.text import sacrebleu_tokenizer, tokenize_caption, tokenize_reference
from pali.eval.vqa import vqa_accuracy, vqa_exact_match

TASK_METRICS: dict[str, tuple[str, ...]] = {
    "caption": ("cider", "bleu4", "chrf"),
    "vqa": ("accuracy", "exact_match", "anls"),
    "ocr": ("anls", "exact_match"),
}
"""Metric names reported for each task, headline first."""

HEADLINE: dict[str, str] = {task: names[0] for task, names in TASK_METRICS.items()}
"""The metric that stands for a task in tables and charts."""

SIGNATURES: dict[str, str] = {
    "bleu4": f"sacrebleu {sacrebleu.__version__} BLEU case:lc|tok:13a (Han scripts: zh, other character "
             "scripts: char)|smooth:exp",
    "chrf": f"sacrebleu {sacrebleu.__version__} chrF2 char-order:6|word-order:0|case:mixed",
}
"""How the sacrebleu scores were configured (recorded in metrics.json)."""


def _ref_streams(references: Sequence[Sequence[str]]) -> list[list[str | None]]:
    """sacrebleu wants one stream per reference position; shorter reference lists pad with None."""
    width = max(len(r) for r in references)
    return [[refs[k] if k < len(refs) else None for refs in references] for k in range(width)]


def bleu4(predictions: Sequence[str], references: Sequence[Sequence[str]], lang: str) -> tuple[float, str]:
    """Corpus BLEU-4 (0-100) via sacrebleu, lower-cased, tokenizer by language; returns (score, signature)."""
    metric = BLEU(tokenize=sacrebleu_tokenizer(lang), lowercase=True)
    score = metric.corpus_score(list(predictions), _ref_streams(references)).score
    return float(score), str(metric.get_signature())


def chrf(predictions: Sequence[str], references: Sequence[Sequence[str]]) -> tuple[float, str]:
    """Corpus chrF (0-100, char 6-grams, beta 2) via sacrebleu; returns (score, signature)."""
    metric = CHRF()
    score = metric.corpus_score(list(predictions), _ref_streams(references)).score
    return float(score), str(metric.get_signature())


def caption_metrics(predictions: Sequence[str], references: Sequence[Sequence[str]],
                    lang: str, tokenized: Sequence[Sequence[str] | None] | None = None) -> dict[str, float]:
    """CIDEr-D (x100), BLEU-4 and chrF of one language's captions; CIDEr uses an example's `tokenized`
    references (space-separated) when it has them."""
    hyps = [tokenize_caption(p, lang) for p in predictions]
    tokenized = tokenized or [None] * len(references)
    refs = [[tokenize_reference(r, lang) for r in tok] if tok else [tokenize_caption(r, lang) for r in rs]
            for rs, tok in zip(references, tokenized, strict=True)]
    cider, _ = cider_d(hyps, refs)
    bleu, _ = bleu4(predictions, references, lang)
    chrf_score, _ = chrf(predictions, references)
    return {"cider": 100.0 * cider, "bleu4": bleu, "chrf": chrf_score}


def _mean(values: Iterable[float]) -> float:
    values = list(values)
    return sum(values) / len(values) if values else 0.0


def task_metrics(task: str, predictions: Sequence[str], references: Sequence[Sequence[str]],
                 lang: str, tokenized: Sequence[Sequence[str] | None] | None = None) -> dict[str, float]:
    """All metrics of `task` for one language's examples (0-100 scale); `tokenized`: per example the
    pre-tokenized caption references, or None."""
    if task not in TASK_METRICS:
        raise ValueError(f"unknown task {task!r}; expected one of {sorted(TASK_METRICS)}")
    if len(predictions) != len(references):
        raise ValueError(f"{len(predictions)} predictions but {len(references)} reference lists")
    if not predictions:
        return dict.fromkeys(TASK_METRICS[task], 0.0)
    if task == "caption":
        return caption_metrics(predictions, references, lang, tokenized)
    pairs = list(zip(predictions, references, strict=True))
    if task == "vqa":
        return {"accuracy": 100.0 * _mean(vqa_accuracy(p, r) for p, r in pairs),
                "exact_match": 100.0 * _mean(vqa_exact_match(p, r) for p, r in pairs),
                "anls": 100.0 * _mean(anls(p, r) for p, r in pairs)}
    return {"anls": 100.0 * _mean(anls(p, r) for p, r in pairs),
            "exact_match": 100.0 * _mean(ocr_exact_match(p, r) for p, r in pairs)}


def english_split(per_lang: Mapping[str, Mapping[str, float]], metric: str = "cider") -> dict[str, Any]:
    """`<metric>_non_en`: mean over the languages other than English (XM3600's "35-language mean"),
    `<metric>_en`: English alone (None when absent), and how many languages each covers."""
    english = [lang for lang in per_lang if lang.split("-", 1)[0] == "en"]
    others = [per_lang[lang][metric] for lang in per_lang if lang not in english]
    return {f"{metric}_non_en": _mean(others), "num_non_en_langs": len(others),
            f"{metric}_en": _mean(per_lang[lang][metric] for lang in english) if english else None}


def compute_metrics(records: Iterable[Mapping[str, Any]]) -> dict[str, Any]:
    """Aggregate prediction records (`task`, `lang`, `prediction`, `references`) into the metrics.json dict.

    Layout::

        {"overall": {"num_examples", "<task>/<headline>", ...},
         "tasks": {task: {"num_examples", "empty_predictions", <metric>: macro mean over languages,
                          "langs": {lang: {"num_examples", <metric>, ...}}}},
         "langs": {lang: {"num_examples", "<task>/<headline>", ...}},
         "skipped_no_references": int,
         "signatures": {"bleu4": ..., "chrf": ...}}
    """
    groups: dict[str, dict[str, tuple[list[str], list[list[str]], list]]] = defaultdict(dict)
    empty: dict[str, int] = defaultdict(int)
    skipped = 0
    for rec in records:
        task, lang = str(rec["task"]), str(rec["lang"])
        if task not in TASK_METRICS:
            raise ValueError(f"record {rec.get('id')!r} has unknown task {task!r}; expected one of "
                             f"{sorted(TASK_METRICS)}")
        refs = [str(r) for r in (rec.get("references") or [])]
        if not refs:
            skipped += 1
            continue
        prediction = str(rec.get("prediction") or "")
        empty[task] += int(not prediction.strip())
        preds, refs_list, tokenized = groups[task].setdefault(lang, ([], [], []))
        preds.append(prediction)
        refs_list.append(refs)
        tokenized.append([str(r) for r in rec.get("tokenized_references") or []] or None)

    tasks: dict[str, Any] = {}
    langs: dict[str, dict[str, Any]] = defaultdict(lambda: {"num_examples": 0})
    for task in sorted(groups):
        per_lang: dict[str, dict[str, Any]] = {}
        for lang in sorted(groups[task]):
            preds, refs, tokenized = groups[task][lang]
            per_lang[lang] = {"num_examples": len(preds), **task_metrics(task, preds, refs, lang, tokenized)}
            langs[lang]["num_examples"] += len(preds)
            langs[lang][f"{task}/{HEADLINE[task]}"] = per_lang[lang][HEADLINE[task]]
        tasks[task] = {
            "num_examples": sum(v["num_examples"] for v in per_lang.values()),
            "empty_predictions": empty[task],
            **{m: _mean(v[m] for v in per_lang.values()) for m in TASK_METRICS[task]},
            "langs": per_lang,
        }
        if task == "caption":
            tasks[task].update(english_split(per_lang))
    overall: dict[str, Any] = {"num_examples": sum(t["num_examples"] for t in tasks.values())}
    for task, t in tasks.items():
        overall[f"{task}/{HEADLINE[task]}"] = t[HEADLINE[task]]
    return {
        "overall": overall,
        "tasks": tasks,
        "langs": {k: langs[k] for k in sorted(langs)},
        "skipped_no_references": skipped,
        "signatures": SIGNATURES,
    }
