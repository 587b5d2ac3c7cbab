"""Shards, the synthetic corpus, converters, the PaLI task mixture and the Ray Data pipeline.

Import the submodules directly (`pali.data.pipeline`, `pali.data.prompts`, ...); the names below are
re-exported for convenience. Nothing here starts Ray until `build_dataset` is called.
"""

from pali.data.langs import canonical_lang
from pali.data.prompts import SERVING_TASKS, SUPPORTED_LANGS, SYNTHETIC_LANGS, TASKS, build_prompt
from pali.data.schema import read_shard, write_shard
from pali.data.synthetic import write_synthetic_shards

__all__ = ["SERVING_TASKS", "SUPPORTED_LANGS", "SYNTHETIC_LANGS", "TASKS", "build_prompt", "canonical_lang",
           "read_shard", "write_shard", "write_synthetic_shards"]
