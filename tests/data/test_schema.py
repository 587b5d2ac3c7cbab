"""Shard schema round trips (parquet and WebDataset), malformed rows, shard listing."""

from __future__ import annotations

import io
import tarfile

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import webdataset as wds
from PIL import Image

from pali.data.pipeline import list_shards
from pali.data.schema import ShardWriter, read_shard, write_shard


def _png(colour=(255, 0, 0)) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (8, 8), colour).save(buf, format="PNG")
    return buf.getvalue()


ROWS = [
    {"id": "a.1/x", "image": _png(), "lang": "en", "text": "a red square", "question": "what colour?",
     "answer": "red", "ocr_text": None, "task": None, "captions": ["a red square", "red box"], "answers": None,
     "image_labels": ["colour:red", "shape:square"], "captions_tokenized": None},
    {"id": "b", "image": _png((0, 0, 255)), "lang": "ar", "text": "مربع أزرق", "question": None, "answer": None,
     "ocr_text": "قف", "task": "ocr", "captions": None, "answers": ["أزرق", "أزرق"], "image_labels": None,
     "captions_tokenized": None},
    {"id": "c", "image": _png((0, 255, 0)), "lang": "zh", "text": "", "question": None, "answer": None,
     "ocr_text": None, "task": None, "captions": None, "answers": None, "image_labels": None,
     "captions_tokenized": ["a b"]},
]


@pytest.mark.parametrize("fmt,suffix", [("parquet", ".parquet"), ("webdataset", ".tar")])
def test_round_trip(tmp_path, fmt, suffix):
    path = write_shard(ROWS, str(tmp_path / f"s{suffix}"), fmt)
    got = read_shard(path)
    assert got.malformed == 0
    assert got.rows == ROWS


def test_webdataset_readable_by_webdataset_library(tmp_path):
    path = write_shard(ROWS, str(tmp_path / "s.tar"), "webdataset")
    samples = list(wds.WebDataset(path, shardshuffle=False))
    assert [s["id"].decode() for s in samples] == [r["id"] for r in ROWS]
    assert samples[1]["text"].decode() == "مربع أزرق" and samples[0]["image"] == ROWS[0]["image"]


def test_malformed_rows_counted(tmp_path):
    table = pa.table({"id": ["ok", "no-image", None, "bad-lang"], "image": [_png(), None, _png(), _png()],
                      "lang": ["en", "en", "en", None], "text": ["x", "y", "z", "w"], "extra": [1, 2, 3, 4]})
    pq.write_table(table, tmp_path / "m.parquet")
    got = read_shard(str(tmp_path / "m.parquet"))
    assert [r["id"] for r in got.rows] == ["ok"] and got.malformed == 3
    assert "extra" not in got.rows[0]  # unknown columns are ignored
    with tarfile.open(tmp_path / "m.tar", "w") as tar:
        for name, data in [("k1.id", b"k1"), ("k1.lang", b"en"), ("k2.id", b"k2"), ("k2.lang", b"en"),
                           ("k2.image", _png()), ("k2.text", b"\xff\xfe")]:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    got = read_shard(str(tmp_path / "m.tar"))
    assert got.rows == [] and got.malformed == 2  # k1 has no image, k2 has non-UTF-8 text


def test_shard_writer_and_listing(tmp_path):
    w = ShardWriter(str(tmp_path / "out"), "p", rows_per_shard=2, fmt="webdataset")
    for r in ROWS:
        w.add(r)
    paths = w.close()
    assert [p.rsplit("/", 1)[1] for p in paths] == ["p-00000.tar", "p-00001.tar"]
    write_shard(ROWS, str(tmp_path / "out" / "sub" / "z.parquet"), "parquet")
    (tmp_path / "out" / "notes.txt").write_text("ignored")
    listed = list_shards([str(tmp_path / "out")])
    assert listed == sorted(listed) and len(listed) == 3
    uri = list_shards(f"file://{tmp_path}/out")
    assert all(u.startswith("file://") for u in uri) and len(uri) == 3
    assert read_shard(uri[0]).rows == ROWS[:2]
    with pytest.raises(FileNotFoundError, match="nope"):
        list_shards([str(tmp_path / "nope")])
    with pytest.raises(ValueError, match="notes.txt"):
        list_shards([str(tmp_path / "out" / "notes.txt")])
    with pytest.raises(ValueError, match="'csv'"):
        ShardWriter(str(tmp_path), fmt="csv")
