"""The data suite measures the trainer's per-replica streams (`pali.train.data_order`), not one shared stream."""

from __future__ import annotations

import pytest

from pali.bench.data import DataBenchConfig, run_data


@pytest.mark.slow
def test_the_data_suite_times_the_trainers_replica_streams(ray_cluster, tmp_path):
    from pali.bench.data_pipeline import close_streams, replica_streams, trainer_data_config
    from pali.data.pipeline import train_tokenizer_from_shards
    from pali.data.synthetic import write_synthetic_shards

    mcfg, dcfg = trainer_data_config("tiny", 8, 2)
    shards = write_synthetic_shards(str(tmp_path), 64, num_workers=1, examples_per_shard=16,
                                    image_size=mcfg.vision.image_size)
    tok = train_tokenizer_from_shards(shards, mcfg.text.vocab_size)
    streams = replica_streams(dcfg, tok, shards, 2, 4, 8)
    for s in streams:
        assert len(s.next()["input_ids"]) == 4
    # Dealt as the trainer deals them: replica d reads the d-th, (d+2)-th, ... shard of the seeded order.
    assert [s.started[0] for s in streams] == [0, 1]
    close_streams(streams)

    r = run_data(DataBenchConfig(examples=256, batch_size=8, repeats=1, train_steps=2))
    assert (r["replicas"], r["per_rank"]) == (2, 4)
    assert r["pipeline_examples_per_s"] > 0 and r["consumption_examples_per_s"] > 0
    assert r["ratio"] == pytest.approx(r["pipeline_examples_per_s"] / r["consumption_examples_per_s"])
    assert 0 <= r["wait_frac"] < 1
    assert len(r["fed_runs"][0]["replica_wait_fracs"]) == 2
