"""Write training shards: the synthetic multilingual corpus, or a converted COCO / VQAv2 dataset.

    python -m jobs.make_shards --out data/train --examples 20000 --seed 0
    python -m jobs.make_shards --out data/heldout --examples 1000 --seed 1 --langs en fr ar
    python -m jobs.make_shards --out data/coco --from-coco captions_train2017.json --images train2017 --lang en
    python -m jobs.make_shards --out data/vqa --from-vqa questions.json annotations.json --images train2014

`--out` may be a local directory or a pyarrow-filesystem URI (s3://bucket/prefix). `--tokenizer-vocab N`
also trains a sentencepiece tokenizer on the written shards and saves it as `tokenizer.model` (local
`--out` only). Prints a JSON summary on stdout.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

from pali.data.convert import convert_coco_captions, convert_vqa
from pali.data.lexicon import GRAMMARS
from pali.data.pipeline import train_tokenizer_from_shards
from pali.data.synthetic import write_synthetic_shards


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """Command-line options (see the module docstring)."""
    p = argparse.ArgumentParser(prog="python -m jobs.make_shards", description=__doc__.split("\n")[0])
    p.add_argument("--out", required=True, help="output directory or URI")
    p.add_argument("--format", default="parquet", choices=("parquet", "webdataset"), help="shard format")
    p.add_argument("--examples-per-shard", type=int, default=256, help="rows per shard")
    g = p.add_argument_group("synthetic corpus (default)")
    g.add_argument("--examples", type=int, default=10_000, help="number of synthetic examples")
    g.add_argument("--langs", nargs="+", default=None, metavar="LANG",
                   help=f"languages (default: all of {' '.join(GRAMMARS)})")
    g.add_argument("--seed", type=int, default=0, help="corpus seed (use another seed for held-out data)")
    g.add_argument("--image-size", type=int, default=64, help="rendered image side in pixels")
    g.add_argument("--workers", type=int, default=1, help="generator processes")
    r = p.add_argument_group("real datasets")
    r.add_argument("--from-coco", metavar="CAPTIONS.json", help="convert a COCO-format caption dataset")
    r.add_argument("--from-vqa", nargs=2, metavar=("QUESTIONS.json", "ANNOTATIONS.json"),
                   help="convert a VQAv2-format dataset")
    r.add_argument("--images", metavar="DIR", help="image directory of --from-coco / --from-vqa")
    r.add_argument("--lang", default="en", help="language of the converted text (BCP-47)")
    r.add_argument("--max-side", type=int, default=None, help="re-encode images larger than this (px)")
    p.add_argument("--tokenizer-vocab", type=int, default=None, metavar="N",
                   help="also train a tokenizer with N pieces on the shards -> OUT/tokenizer.model")
    args = p.parse_args(argv)
    if args.from_coco and args.from_vqa:
        p.error("--from-coco and --from-vqa are exclusive; convert them into separate --out directories")
    if (args.from_coco or args.from_vqa) and not args.images:
        p.error("--images DIR is required with --from-coco / --from-vqa")
    if args.langs:
        bad = [x for x in args.langs if x not in GRAMMARS]
        if bad:
            p.error(f"no synthetic grammar for --langs {bad}; expected some of {list(GRAMMARS)}")
    return args


def main(argv: list[str] | None = None) -> dict:
    """Run the job; returns (and prints) the summary."""
    args = parse_args(argv)
    t0 = time.time()
    if args.from_coco:
        rep = convert_coco_captions(args.from_coco, args.images, args.out, lang=args.lang, fmt=args.format,
                                    examples_per_shard=args.examples_per_shard, max_side=args.max_side)
        summary = {"source": "coco", **rep.to_dict()}
        paths = rep.paths
    elif args.from_vqa:
        rep = convert_vqa(args.from_vqa[0], args.from_vqa[1], args.images, args.out, lang=args.lang,
                          fmt=args.format, examples_per_shard=args.examples_per_shard, max_side=args.max_side)
        summary = {"source": "vqa", **rep.to_dict()}
        paths = rep.paths
    else:
        paths = write_synthetic_shards(args.out, args.examples, langs=args.langs, seed=args.seed,
                                       examples_per_shard=args.examples_per_shard, fmt=args.format,
                                       image_size=args.image_size, num_workers=args.workers)
        summary = {"source": "synthetic", "shards": len(paths), "rows": args.examples, "seed": args.seed}
    if args.tokenizer_vocab:
        if "://" in args.out:
            raise SystemExit("--tokenizer-vocab needs a local --out directory")
        if not paths:
            raise SystemExit("no shards were written; cannot train a tokenizer")
        tok_path = os.path.join(args.out, "tokenizer.model")
        tok = train_tokenizer_from_shards(paths, args.tokenizer_vocab, tok_path)
        summary["tokenizer"] = {"path": tok_path, "vocab_size": tok.vocab_size}
    summary["out"] = args.out
    summary["seconds"] = round(time.time() - t0, 2)
    print(json.dumps(summary, ensure_ascii=False))
    return summary


if __name__ == "__main__":
    main(sys.argv[1:])
