"""The layouts users bring: img2dataset WebDataset tars, Hugging Face parquet, column maps, default language,
and shards streamed rather than read whole."""

from __future__ import annotations

import io
import json
import os
import tarfile
import tracemalloc

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image

from jobs.make_shards import main as make_shards
from pali.data.pipeline import DataConfig, _read_op, list_shards
from pali.data.schema import ReadOptions, iter_shard, parse_column_map, read_shard


def _img(fmt: str, colour=(200, 30, 30), size=(12, 10)) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", size, colour).save(buf, format=fmt)
    return buf.getvalue()


def _tar(path, members: list[tuple[str, bytes]]) -> str:
    with tarfile.open(path, "w") as tar:
        for name, data in members:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return str(path)


def _meta(**kw) -> bytes:
    return json.dumps(kw, ensure_ascii=False).encode()


def test_img2dataset_webdataset(tmp_path):
    """`KEY.jpg|jpeg|png|webp`, `KEY.txt`, `KEY.json` as img2dataset / LAION write them."""
    jpg, png, webp = _img("JPEG"), _img("PNG"), _img("WEBP")
    path = _tar(tmp_path / "00000.tar", [
        ("00000/000000000.jpg", jpg), ("00000/000000000.txt", b"a red wall"),
        ("00000/000000000.json", _meta(key="000000000", url="http://x", LANGUAGE="en", status="success")),
        ("00000/000000001.png", png), ("00000/000000001.txt", b"un mur rouge"),
        ("00000/000000001.json", _meta(key="000000001", language="FR")),
        ("00000/000000002.webp", webp), ("00000/000000002.json",
                                         _meta(lang="zh-hant", question="甚麼顏色？", answer="紅",
                                               answers=["紅", "紅色"], captions=["紅牆", "一面紅牆"],
                                               ocr_text="出口")),
        ("00000/000000003.jpeg", jpg), ("00000/000000003.txt", b"no language here"),
        ("00000/000000004.txt", b"no image"), ("00000/000000004.json", _meta(lang="en")),
        ("00000/000000005.jpg", jpg), ("00000/000000005.json", _meta(lang="xx")),
    ])
    got = read_shard(path)
    assert [(r["id"], r["lang"]) for r in got.rows] == [("000000000", "en"), ("000000001", "fr"),
                                                        ("00000/000000002", "zh-Hant")]
    assert [r["image"] for r in got.rows] == [jpg, png, webp]
    assert got.rows[0]["text"] == "a red wall" and got.rows[1]["text"] == "un mur rouge"
    third = got.rows[2]
    assert (third["question"], third["answer"], third["answers"], third["captions"], third["ocr_text"]) == (
        "甚麼顏色？", "紅", ["紅", "紅色"], ["紅牆", "一面紅牆"], "出口")
    assert got.malformed == 3 and got.reasons == {"no language": 1, "no image": 1, "unregistered language 'xx'": 1}
    # --default-lang rescues the row without a language; the others stay malformed
    fixed = read_shard(path, ReadOptions.make(default_lang="en"))
    assert [r["id"] for r in fixed.rows][-1] == "00000/000000003" and fixed.malformed == 2


def test_huggingface_parquet_and_column_map(tmp_path):
    jpg = _img("JPEG")
    table = pa.table({
        "image": pa.array([{"bytes": jpg, "path": "a.jpg"}, {"bytes": jpg, "path": "b.jpg"},
                           {"bytes": None, "path": "c.jpg"}],
                          type=pa.struct([("bytes", pa.binary()), ("path", pa.string())])),
        "caption": ["a dog", "un chien", "gone"], "caption_en": ["EN a dog", "EN a dog", "x"],
        "lang_code": ["en", "fr", "en"],
    })
    pq.write_table(table, tmp_path / "hf.parquet")
    got = read_shard(str(tmp_path / "hf.parquet"))  # no lang column under a known name: all malformed
    assert got.rows == [] and got.reasons == {"no language": 2, "no image": 1}
    got = read_shard(str(tmp_path / "hf.parquet"), ReadOptions.make("lang=lang_code"))
    assert [(r["id"], r["text"], r["lang"]) for r in got.rows] == [("hf:0", "a dog", "en"), ("hf:1", "un chien", "fr")]
    assert got.rows[0]["image"] == jpg and got.malformed == 1
    got = read_shard(str(tmp_path / "hf.parquet"), ReadOptions.make({"text": "caption_en"}, default_lang="de"))
    assert [(r["text"], r["lang"]) for r in got.rows] == [("EN a dog", "de"), ("EN a dog", "de")]
    assert parse_column_map("text=caption_en, lang=LANGUAGE") == {"text": "caption_en", "lang": "LANGUAGE"}
    with pytest.raises(ValueError, match="'caption_en'"):
        parse_column_map("caption_en")
    with pytest.raises(ValueError, match=r"\['txt'\]"):
        parse_column_map("txt=caption")
    with pytest.raises(ValueError, match="'xx'"):
        ReadOptions.make(default_lang="xx")
    # make_shards --from-shards rewrites it into the project's layout, counting what it drops
    out = make_shards(["--out", str(tmp_path / "own"), "--from-shards", str(tmp_path / "hf.parquet"),
                       "--column-map", "lang=lang_code", "--format", "webdataset"])
    assert out["rows"] == 2 and out["skipped"] == {"malformed: no image": 1}
    rows = [r for p in list_shards(str(tmp_path / "own")) for r in read_shard(p).rows]
    assert [(r["id"], r["lang"]) for r in rows] == [("hf:0", "en"), ("hf:1", "fr")]


def test_tars_stream_member_by_member(tmp_path):
    """Reading the first rows of a 24 MB tar allocates a few members' worth, not the file."""
    rng = np.random.default_rng(0)
    members = []
    for i in range(24):
        members += [(f"{i:05d}.jpg", rng.bytes(1 << 20)), (f"{i:05d}.txt", b"noise"),
                    (f"{i:05d}.json", _meta(lang="en"))]
    path = _tar(tmp_path / "big.tar", members)
    assert os.path.getsize(path) > 24 << 20
    tracemalloc.start()
    it = iter_shard(path)
    first = [next(it) for _ in range(2)]
    _, peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    assert [r["id"] for r, _ in first] == ["00000", "00001"]
    assert peak < 6 << 20, f"peak {peak / 2**20:.1f} MiB while reading 2 rows of a 24 MiB tar"


def test_read_step_emits_bounded_blocks(tmp_path):
    """The pipeline's read step yields a shard in blocks of `read_block_rows`, in row order."""
    jpg = _img("JPEG")
    path = _tar(tmp_path / "s.tar", [m for i in range(10) for m in
                                     [(f"{i:03d}.jpg", jpg), (f"{i:03d}.txt", f"row {i}".encode())]])
    cfg = DataConfig(default_lang="sw", read_block_rows=4)
    tables = list(_read_op(None, None, cfg.read_options(), cfg.read_block_rows)(
        {"path": np.array([path], dtype=object), "shard_index": np.array([0])}))
    assert [t.num_rows for t in tables] == [4, 4, 2]
    assert [x for t in tables for x in t.column("text").to_pylist()] == [f"row {i}" for i in range(10)]
    assert set(x for t in tables for x in t.column("lang").to_pylist()) == {"sw"}
