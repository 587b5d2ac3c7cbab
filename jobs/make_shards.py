"""Write shards: the synthetic multilingual corpus, a converted dataset or benchmark, or user shards rewritten.

    python -m jobs.make_shards --out data/train --examples 20000 --seed 0
    python -m jobs.make_shards --out data/heldout --examples 1000 --seed 1 --langs en fr ar
    python -m jobs.make_shards --out data/coco --from-coco captions_train2017.json --images train2017 --lang en
    python -m jobs.make_shards --out data/coco35 --from-coco en.json fr.json --images val2017 --lang en fr
    python -m jobs.make_shards --out data/vqa --from-vqa questions.json annotations.json --images train2014
    python -m jobs.make_shards --out data/xm3600 --from-xm3600 captions.jsonl --images xm3600/images
    python -m jobs.make_shards --out data/textvqa --from-textvqa TextVQA_0.5.1_val.json --images train_images
    python -m jobs.make_shards --out data/docvqa --from-docvqa val_v1.0.json --images val
    python -m jobs.make_shards --out data/mine --from-shards laion/ --column-map text=caption_en --default-lang en

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

from pali.data.benchmarks import convert_docvqa, convert_textvqa, convert_xm3600
from pali.data.convert import ConvertReport, convert_coco_captions, convert_vqa, rewrite_shards
from pali.data.lexicon import GRAMMARS
from pali.data.pipeline import list_shards, train_tokenizer_from_shards
from pali.data.schema import ReadOptions
from pali.data.synthetic import write_synthetic_shards

SOURCES = ("from_coco", "from_vqa", "from_xm3600", "from_textvqa", "from_docvqa", "from_shards")
"""The converter options; at most one per run (none: the synthetic corpus)."""


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
    r.add_argument("--from-coco", nargs="+", metavar="CAPTIONS.json",
                   help="convert COCO-format caption files (one per language of --lang; same image ids allowed)")
    r.add_argument("--from-vqa", nargs=2, metavar=("QUESTIONS.json", "ANNOTATIONS.json"),
                   help="convert a VQAv2-format dataset")
    r.add_argument("--from-xm3600", metavar="CAPTIONS.jsonl", help="convert Crossmodal-3600 (every language)")
    r.add_argument("--from-textvqa", metavar="TEXTVQA.json", help="convert TextVQA (VQA accuracy, 10 answers)")
    r.add_argument("--from-docvqa", metavar="DOCVQA.json", help="convert DocVQA (scored by ANLS)")
    r.add_argument("--from-shards", nargs="+", metavar="PATH",
                   help="rewrite shards of any readable layout (img2dataset tars, Hugging Face parquet) in the "
                        "project's own, with --column-map / --default-lang")
    r.add_argument("--images", metavar="DIR", help="image directory of the converters")
    r.add_argument("--lang", nargs="+", default=["en"], metavar="LANG",
                   help="language of the converted text (BCP-47; with --from-coco one per caption file)")
    r.add_argument("--column-map", default=None, metavar="KEY=COLUMN[,...]",
                   help="--from-shards: read schema column KEY from source column / JSON key COLUMN")
    r.add_argument("--default-lang", default=None, metavar="CODE",
                   help="--from-shards: language of rows that carry none (default: such rows are malformed)")
    r.add_argument("--max-side", type=int, default=None, help="re-encode images larger than this (px)")
    p.add_argument("--tokenizer-vocab", type=int, default=None, metavar="N",
                   help="also train a tokenizer with N pieces on the shards -> OUT/tokenizer.model")
    args = p.parse_args(argv)
    given = [name for name in SOURCES if getattr(args, name)]
    flags = ["--" + n.replace("_", "-") for n in given]
    if len(given) > 1:
        p.error(f"{' and '.join(flags)} are exclusive; convert them into separate --out directories")
    if given and given[0] != "from_shards" and not args.images:
        p.error(f"--images DIR is required with {flags[0]}")
    if args.from_coco and len(args.lang) not in (1, len(args.from_coco)):
        p.error(f"{len(args.from_coco)} caption files but {len(args.lang)} --lang codes; give one code, or one "
                "per file in the same order")
    if len(args.lang) > 1 and not args.from_coco:
        p.error(f"--lang takes one code here; got {args.lang}")
    try:
        args.read_options = ReadOptions.make(args.column_map, args.default_lang)
        from pali.data.langs import canonical_lang

        args.lang = [canonical_lang(x) for x in args.lang]
    except ValueError as e:
        p.error(str(e))
    if args.langs:
        bad = [x for x in args.langs if x not in GRAMMARS]
        if bad:
            p.error(f"no synthetic grammar for --langs {bad}; expected some of {list(GRAMMARS)}")
    return args


def main(argv: list[str] | None = None) -> dict:
    """Run the job; returns (and prints) the summary."""
    args = parse_args(argv)
    t0 = time.time()
    common = {"fmt": args.format, "examples_per_shard": args.examples_per_shard}
    rep: ConvertReport | None = None
    if args.from_coco:
        rep = ConvertReport()
        langs = args.lang * len(args.from_coco) if len(args.lang) == 1 else args.lang
        for captions, lang in zip(args.from_coco, langs, strict=True):
            one = convert_coco_captions(captions, args.images, args.out, lang=lang, max_side=args.max_side,
                                        shard_prefix=f"coco-{lang}" if len(args.from_coco) > 1 else None, **common)
            rep.paths += one.paths
            rep.rows += one.rows
            rep.skipped.update(one.skipped)
        source = "coco"
    elif args.from_vqa:
        rep = convert_vqa(args.from_vqa[0], args.from_vqa[1], args.images, args.out, lang=args.lang[0],
                          max_side=args.max_side, **common)
        source = "vqa"
    elif args.from_xm3600:
        rep = convert_xm3600(args.from_xm3600, args.images, args.out, max_side=args.max_side, **common)
        source = "xm3600"
    elif args.from_textvqa:
        rep = convert_textvqa(args.from_textvqa, args.images, args.out, lang=args.lang[0], max_side=args.max_side,
                              **common)
        source = "textvqa"
    elif args.from_docvqa:
        rep = convert_docvqa(args.from_docvqa, args.images, args.out, lang=args.lang[0], max_side=args.max_side,
                             **common)
        source = "docvqa"
    elif args.from_shards:
        rep = rewrite_shards(list_shards(args.from_shards), args.out, args.read_options, **common)
        source = "shards"
    if rep is not None:
        summary = {"source": source, **rep.to_dict()}
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
