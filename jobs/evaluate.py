"""Evaluate a serving checkpoint on shards: captioning (CIDEr-D, BLEU-4, chrF), VQA accuracy, OCR ANLS.

    python -m jobs.evaluate --checkpoint CKPT --data SHARDS [--tasks caption,vqa,ocr] [--langs en,fr]
        [--column-map text=caption_en,lang=LANGUAGE] [--default-lang en]
        [--num-beams N] [--max-new-tokens N] [--batch-size N] [--num-actors N] --out DIR

Writes DIR/predictions.jsonl (incrementally), DIR/metrics.json, DIR/report.md and DIR/per_language.png.
Connects to the running Ray cluster (RAY_ADDRESS, as under `ray job submit`) or starts a local one.
Exit status 2 on bad input (the message names the bad value), 1 when inference fails.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys

from pali.eval.report import format_table
from pali.eval.runner import evaluate

__all__ = ["evaluate", "format_table", "main", "parse_args"]


def _csv(value: str) -> list[str]:
    return [v.strip() for v in value.split(",") if v.strip()]


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """Command-line options (see the module docstring)."""
    p = argparse.ArgumentParser(prog="python -m jobs.evaluate", description=__doc__.split("\n")[0])
    p.add_argument("--checkpoint", required=True, help="serving checkpoint directory")
    p.add_argument("--data", required=True, nargs="+",
                   help="shards: .parquet/.tar files, directories, globs or URIs (comma lists allowed)")
    p.add_argument("--tasks", type=_csv, default=None,
                   help="comma list of caption,vqa,ocr (default: every task the shards have references for)")
    p.add_argument("--langs", type=_csv, default=None,
                   help="comma list of BCP-47 tags, any registered one (default: all)")
    p.add_argument("--column-map", default=None, metavar="KEY=COLUMN[,...]",
                   help="read schema column KEY from source column / JSON key COLUMN "
                        "(e.g. text=caption_en,lang=LANGUAGE)")
    p.add_argument("--default-lang", default=None, metavar="CODE",
                   help="BCP-47 language of rows that carry none (default: such rows are malformed)")
    p.add_argument("--num-beams", type=int, default=1, help="beam width (1 = greedy)")
    p.add_argument("--max-new-tokens", type=int, default=32, help="longest generated text in tokens")
    p.add_argument("--batch-size", type=int, default=16, help="examples per generate call")
    p.add_argument("--num-actors", type=int, default=None, help="model copies (default: one per GPU, else 1)")
    p.add_argument("--dtype", choices=["float32", "bfloat16", "float16"], default=None,
                   help="inference dtype (default: bfloat16 on GPU, float32 on CPU)")
    p.add_argument("--cpu", action="store_true", help="run on CPU actors even when the cluster has GPUs")
    p.add_argument("--out", required=True, help="output directory")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    """Run the evaluation; prints the per-language table and the output paths."""
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    args = parse_args(argv)
    try:
        metrics = evaluate(args.checkpoint, args.data, tasks=args.tasks, langs=args.langs,
                           num_beams=args.num_beams, out_dir=args.out, max_new_tokens=args.max_new_tokens,
                           batch_size=args.batch_size, num_actors=args.num_actors,
                           use_gpu=False if args.cpu else None, dtype=args.dtype, column_map=args.column_map,
                           default_lang=args.default_lang)
    except (ValueError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except RuntimeError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    print(format_table(metrics))
    print(json.dumps({"overall": metrics["overall"], "out": args.out}, ensure_ascii=False))
    return 0


if __name__ == "__main__":
    sys.exit(main())
