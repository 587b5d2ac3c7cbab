"""The run's data on the driver: the default synthetic corpus, the tokenizer, the shard list and the
pipeline settings every replica builds its stream from (`pali.train.data_order` deals the shards)."""

from __future__ import annotations

import math
import os
from pathlib import Path
from typing import Any

from pali import storage
from pali.config import PaLIConfig, get_preset
from pali.train.config import TrainConfig


def model_config(cfg: TrainConfig, vocab_size: int | None = None) -> PaLIConfig:
    """The preset with the run's overrides (and the tokenizer's vocabulary size, rounded up to 128)."""
    if cfg.init_from:
        from pali.serving_checkpoint import load_config

        mcfg = load_config(cfg.init_from)
    else:
        mcfg = get_preset(cfg.preset)
    overrides = dict(cfg.model_overrides)
    if vocab_size is not None and not cfg.init_from:
        overrides.setdefault("text__vocab_size", max(mcfg.text.vocab_size, int(math.ceil(vocab_size / 128) * 128)))
    return mcfg.with_overrides(**overrides) if overrides else mcfg


def count_rows(shards: list[str], sample: int = 16) -> int | None:
    """Rows over the shards, from the parquet footers of at most `sample` of them (spread over the list)
    scaled to the whole list: planning reads a bounded number of files at any shard count. None when
    the sampled shards are not local parquet files."""
    if not shards:
        return 0
    try:
        import pyarrow.parquet as pq

        step = max(1, len(shards) // sample)
        picked = shards[::step][:sample]
        return round(sum(pq.ParquetFile(s).metadata.num_rows for s in picked) * len(shards) / len(picked))
    except Exception:
        return None


def data_config(cfg: TrainConfig, mcfg: PaLIConfig):
    """The Ray Data pipeline's settings for this run (each replica builds its stream from them)."""
    from pali.data.pipeline import DataConfig

    return DataConfig.for_model(mcfg, task_weights=cfg.task_weights or DataConfig().task_weights, seed=cfg.seed,
                                batch_size=cfg.micro_batch, stats_name=f"pali-data-stats-{cfg.name}",
                                column_map=cfg.column_map, default_lang=cfg.default_lang)


def prepare(cfg: TrainConfig) -> tuple[Any, list[str], PaLIConfig]:
    """Tokenizer, training shard list and model config (generating the default data when absent)."""
    from pali.data.pipeline import list_shards, train_tokenizer_from_shards
    from pali.data.schema import ReadOptions
    from pali.tokenizer import Tokenizer

    image_size = max(16, model_config(cfg).vision.image_size)  # drawn at the size the model reads
    # The generated corpus is the same whatever --seed: a seed varies the run, not the data it is compared on.
    for paths, seed, n in ((cfg.data, CORPUS_SEED, 32768), (cfg.eval_data, CORPUS_SEED + 1000, 256)):
        if paths == ["data/train"] or paths == ["data/val"]:
            _ensure_synthetic(paths[0], n, seed, image_size)
    shards = list_shards(cfg.data)
    if cfg.tokenizer:
        tok = Tokenizer.load(cfg.tokenizer)
    elif cfg.init_from:
        tok = Tokenizer.load(storage.join(cfg.init_from, "tokenizer.model"))
    else:
        vocab = get_preset(cfg.preset).with_overrides(**cfg.model_overrides).text.vocab_size
        tok_path = cfg.local_output_dir() / "tokenizer.model"
        tok = Tokenizer.load(tok_path) if tok_path.is_file() else \
            train_tokenizer_from_shards(shards, vocab, out_path=tok_path, seed=cfg.seed,
                                        opts=ReadOptions.make(cfg.column_map, cfg.default_lang))
    mcfg = model_config(cfg, tok.vocab_size)
    if tok.vocab_size > mcfg.text.vocab_size:
        raise ValueError(f"tokenizer has {tok.vocab_size} pieces but the model's vocabulary is "
                         f"{mcfg.text.vocab_size}; expected tokenizer vocab <= model vocab")
    return tok, shards, mcfg


# The quick start's corpus: six languages in five scripts (Latin, Cyrillic, Arabic, Devanagari, Han), so
# the tiny model sees enough of each language to ground its answers within a ~10 minute CPU run.
# `python -m jobs.make_shards` writes all ten languages.
QUICKSTART_LANGS = ("en", "fr", "ru", "ar", "hi", "zh")
CORPUS_SEED = 0
"""Seed of the quick start's generated training corpus (its held-out corpus: + 1000)."""


def _ensure_synthetic(out_dir: str, n: int, seed: int, image_size: int) -> None:
    from pali.data.synthetic import write_synthetic_shards

    if Path(out_dir).is_dir() and any(Path(out_dir).glob("*.parquet")):
        return
    print(f"[pali] generating {n} synthetic {image_size} px examples in {', '.join(QUICKSTART_LANGS)} into "
          f"{out_dir} (seed {seed})")
    write_synthetic_shards(out_dir, num_examples=n, langs=QUICKSTART_LANGS, seed=seed, examples_per_shard=256,
                           image_size=image_size, num_workers=min(4, os.cpu_count() or 1))
