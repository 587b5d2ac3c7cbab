"""The Ray Data pipeline end to end on the local test cluster."""

from __future__ import annotations

import json
import threading

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from pali.data.pipeline import (
    DataConfig,
    build_dataset,
    build_eval_dataset,
    collate,
    iter_batches,
    list_shards,
    process_shard,
    split_for_ranks,
)
from pali.data.schema import read_shard, write_shard
from pali.data.tasks import supported_tasks

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def shards(synthetic_dir, tmp_path_factory):
    """Three synthetic parquet shards, one WebDataset copy of one of them, a shard with bad rows and an
    unreadable file."""
    d = tmp_path_factory.mktemp("mixed")
    good = list_shards(str(synthetic_dir))
    rows = read_shard(good[0]).rows
    wds_rows = [{**r, "id": r["id"] + "-wds"} for r in rows[:10]]
    write_shard(wds_rows, str(d / "copy.tar"), "webdataset")
    ok = {**rows[0], "id": "ok-row"}
    bad_img = {**rows[1], "id": "bad-image", "image": b"\x89PNG\r\n\x1a\n truncated"}
    table = pa.Table.from_pylist([ok, bad_img, {**rows[2], "id": "no-lang", "lang": None}])
    pq.write_table(table, d / "corrupt.parquet")
    (d / "broken.parquet").write_bytes(b"PAR1 this is not parquet")
    write_shard([{**bad_img, "id": "bad-2"}, {**rows[3], "id": "unregistered", "lang": "xx"}],
                str(d / "allbad.tar"), "webdataset")  # a shard without one usable row
    return good + [str(d / "copy.tar"), str(d / "corrupt.parquet"), str(d / "allbad.tar"),
                   str(d / "broken.parquet")]


def _consume(it, out: list, cfg: DataConfig) -> None:
    for b in iter_batches(it, cfg.batch_size, drop_last=False):
        out.append(b)


def test_two_consumers_disjoint_and_counts(ray_cluster, shards, data_tokenizer):
    cfg = DataConfig(image_size=32, max_text_len=40, max_target_len=20, batch_size=4)
    ds = build_dataset(cfg, data_tokenizer, shards=shards)
    its = split_for_ranks(ds, 2)
    outs: list[list] = [[], []]
    threads = [threading.Thread(target=_consume, args=(it, out, cfg)) for it, out in zip(its, outs, strict=True)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=120)
    ids = [[i for b in out for i in b["id"]] for out in outs]
    assert ids[0] and ids[1] and set(ids[0]).isdisjoint(ids[1])
    total = 60 + 10 + 1  # synthetic + WebDataset copy + the one good row of the corrupt shard
    assert total - 1 <= len(ids[0]) + len(ids[1]) <= total and len(ids[0]) == len(ids[1])
    stats = ds.pali_stats.get()
    assert stats["bad_shards"] == 1 and stats["malformed_rows"] == 2 and stats["bad_images"] == 2
    assert stats["examples"] == total and stats["rows"] == total + 2 and stats["images"] <= total
    both = ids[0] + ids[1]
    assert "bad-image" not in both and len(set(both)) == len(both)
    assert "ok-row" in both or len(both) == total - 1  # equal=True may drop this one tail row
    b = outs[0][0]
    assert b["pixel_values"].shape == (4, 3, 32, 32) and b["input_ids"].shape == (4, 40)
    assert b["labels"].shape == (4, 20) and b["image_mask"].shape == (4,)
    assert str(b["input_ids"].dtype) == "torch.int64" and str(b["pixel_values"].dtype) == "torch.float32"
    by_path = {i: {r["id"] for r in read_shard(p).rows} for i, p in enumerate(shards[:-1])}
    for out in outs:
        for b in out:
            assert ((b["labels"] == 1).sum(1) == 1).all() and ((b["input_ids"] == 1).sum(1) == 1).all()
            assert (b["attention_mask"] == (b["input_ids"] != 0)).all()
            assert int(b["input_ids"].max()) < data_tokenizer.vocab_size
            for k, i in enumerate(b["id"]):
                assert i in by_path[int(b["shard_index"][k])]
                text_only = b["task"][k] == "span_corruption"
                assert int(b["image_mask"][k]) == (0 if text_only else 1)
                px = b["pixel_values"][k]
                assert (px.abs().sum() == 0) == text_only and -1.0 <= float(px.min()) <= float(px.max()) <= 1.0


def test_eval_dataset_deterministic_no_tail_dropped(ray_cluster, synthetic_dir, data_tokenizer):
    from ray.data import DataContext

    ctx = DataContext.get_current()
    old = ctx.execution_options.preserve_order
    ctx.execution_options.preserve_order = True
    try:
        shards = list_shards(str(synthetic_dir))
        tasks = ("caption", "vqa", "ocr")
        cfg = DataConfig(image_size=32, langs=["fr", "ar", "zh"])
        runs = []
        for _ in range(2):
            ds = build_eval_dataset(cfg, data_tokenizer, tasks=tasks, shards=shards)
            runs.append([b for b in ds.iter_batches(batch_size=7, batch_format="numpy")])
        rows = [r for p in shards for r in read_shard(p).rows if r["lang"] in cfg.langs]
        expected = [(r["id"], t) for r in rows for t in tasks if t in supported_tasks(r)]
        got = [(i, t) for b in runs[0] for i, t in zip(b["id"], b["task"], strict=True)]
        assert got == expected  # shard order, every (row, task), nothing dropped
        assert all((a["input_ids"] == b["input_ids"]).all() for a, b in zip(*runs, strict=True))
        stats = ds.pali_stats.get()
        assert stats["filtered_lang"] == 60 - len(rows)
        batch = collate(runs[0][0])
        by_id = {r["id"]: r for r in rows}
        for i, t, refs, prompt in zip(batch["id"], batch["task"], batch["references"], batch["prompt"],
                                      strict=True):
            r = by_id[i]
            want = {"caption": [r["text"]], "vqa": [r["answer"]], "ocr": [r["ocr_text"]]}[t]
            assert refs == want and prompt.endswith(":" if t != "vqa" else r["question"])
        assert json.loads(runs[0][0]["references"][0])
    finally:
        ctx.execution_options.preserve_order = old


def test_config_validation(data_tokenizer):
    with pytest.raises(ValueError, match="unknown tasks \\['captioning'\\]"):
        DataConfig(task_weights={"captioning": 1.0}).validate()
    with pytest.raises(ValueError, match="unsupported languages \\['xx'\\]"):
        DataConfig(langs=["xx"]).validate()
    with pytest.raises(ValueError, match="batch_size=0"):
        DataConfig(batch_size=0).validate()
    with pytest.raises(ValueError, match="no shard paths"):
        build_dataset(DataConfig(), data_tokenizer)
    assert np.isclose(sum(DataConfig().task_weights.values()), 1.0)


def test_process_shard_gives_the_pipeline_rows_without_ray(ray_cluster, synthetic_dir, data_tokenizer):
    """`process_shard` (one process, no Ray) yields exactly the examples `build_dataset` delivers."""
    cfg = DataConfig(image_size=32, max_text_len=40, max_target_len=20, batch_size=4)
    shard = list_shards(str(synthetic_dir))[0]
    local = process_shard(cfg, data_tokenizer, shard)
    rows = build_dataset(cfg, data_tokenizer, shards=[shard]).take_all()
    assert len(local["id"]) == len(rows) == 20
    by_id = {r["id"]: r for r in rows}
    for i, ex_id in enumerate(local["id"]):
        r = by_id[ex_id]
        for col in ("input_ids", "attention_mask", "labels", "image_mask", "pixel_values"):
            assert np.array_equal(local[col][i], r[col]), (ex_id, col)
        assert local["task"][i] == r["task"]
    assert local["input_ids"].shape == (20, 40) and local["labels"].shape == (20, 20)
