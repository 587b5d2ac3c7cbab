"""Held-out answers by question type and caption exact match, from an evaluation's predictions.

Reads `<run>/eval/predictions.jsonl` (written by `jobs.pretrain` / `jobs.evaluate`) and the held-out
shards' `image_labels` (how many kinds of objects each scene has), and prints, for VQA,
how often each kind of question (count, colour with one or two kinds of objects, shape) was answered
right, and for captioning and OCR the exact-match rate (the README's "What to expect" tables)::

    python -m pali.bench.grounding.breakdown runs/pali-tiny/eval/predictions.jsonl --data data/val
"""

from __future__ import annotations

import argparse
import json
from collections import Counter

from pali.data.lexicon import COLOURS, GRAMMARS
from pali.data.pipeline import list_shards
from pali.data.schema import iter_rows


def answer_kind(lang: str, answer: str) -> str:
    """count / colour / shape: what a synthetic VQA answer is about, from its vocabulary."""
    if answer in ("1", "2", "3"):
        return "count"
    gram = GRAMMARS[lang]
    return "colour" if answer in {gram.a_colour(c) for c in COLOURS} else "shape"


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("predictions")
    p.add_argument("--data", nargs="+", default=["data/val"], help="the held-out shards that were evaluated")
    a = p.parse_args(argv)
    kinds = {row["id"]: sum(lab.startswith("shape:") for lab in row["image_labels"] or [])
             for row in iter_rows(list_shards(a.data))}
    right, total = Counter(), Counter()
    for line in open(a.predictions, encoding="utf-8"):
        r = json.loads(line)
        ok = r["prediction"].strip() in [x.strip() for x in r["references"]]
        if r["task"] == "vqa":
            kind = answer_kind(r["lang"], r["references"][0])
            if kind == "colour":  # one kind of object, or two (the model must find the asked shape)
                kind = f"colour, {kinds.get(r['id'], '?')} kind(s) of object"
            key = f"vqa: {kind}"
        else:
            key = r["task"]
        right[key] += ok
        total[key] += 1
    print("| kind | right |\n|---|---|")
    for key in sorted(total):
        print(f"| {key} | {right[key] / total[key]:.0%} ({right[key]}/{total[key]}) |")


if __name__ == "__main__":
    main()
