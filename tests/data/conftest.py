"""Fixtures of the data tests: a small synthetic corpus and a tokenizer trained on it."""

from __future__ import annotations

import pytest


@pytest.fixture(scope="session")
def synthetic_dir(tmp_path_factory):
    """60 synthetic examples (all ten languages) in three parquet shards."""
    from pali.data.synthetic import write_synthetic_shards

    out = tmp_path_factory.mktemp("synthetic")
    write_synthetic_shards(str(out), 60, seed=0, examples_per_shard=20)
    return out


@pytest.fixture(scope="session")
def data_tokenizer(synthetic_dir):
    """Tokenizer of the tiny preset's size trained on the synthetic shards' text."""
    from pali.data.pipeline import list_shards, train_tokenizer_from_shards

    return train_tokenizer_from_shards(list_shards([str(synthetic_dir)]), 2048)
