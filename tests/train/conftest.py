"""Fixtures for training tests: a small generated corpus shared by the module's runs."""

from __future__ import annotations

import pytest


@pytest.fixture(scope="session")
def train_shards(tmp_path_factory):
    """Four parquet shards of 64 synthetic examples (train) and one (held-out)."""
    from pali.data.synthetic import write_synthetic_shards

    root = tmp_path_factory.mktemp("train-data")
    write_synthetic_shards(str(root / "train"), num_examples=256, seed=0, examples_per_shard=64)
    write_synthetic_shards(str(root / "val"), num_examples=64, seed=1, examples_per_shard=64)
    return root
