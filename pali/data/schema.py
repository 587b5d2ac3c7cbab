"""Shard schema, writers and a tolerant reader for parquet and WebDataset shards.

Columns (parquet) / member suffixes (WebDataset `KEY.SUFFIX`, same names):

| column | type | meaning |
|---|---|---|
| `id` | string | unique example id (required) |
| `image` | binary | encoded JPEG/PNG (required) |
| `lang` | string | BCP-47 language of the text (required) |
| `text` | string | alt-text / caption ("" when the row has none) |
| `question`, `answer` | string | one VQA pair (optional) |
| `ocr_text` | string | the text written in the image (optional) |
| `task` | string | restricts the row to one task of the mixture (optional) |
| `captions` | list<string> | every reference caption (optional; WebDataset: a JSON list) |
| `answers` | list<string> | every annotator answer (optional; WebDataset: a JSON list) |
| `image_labels` | list<string> | image-level class labels, `family:value` (optional; vision pretraining) |

Unknown columns are ignored. Rows missing a required field or with a field of the wrong type are
counted as malformed and skipped; image bytes are only decoded later (`pipeline.py`).
"""

from __future__ import annotations

import io
import json
import os
import tarfile
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from typing import Any

import pyarrow as pa
import pyarrow.fs as pafs
import pyarrow.parquet as pq

REQUIRED = ("id", "image", "lang")
STRING_FIELDS = ("text", "question", "answer", "ocr_text", "task")
LIST_FIELDS = ("captions", "answers", "image_labels")
COLUMNS = REQUIRED + STRING_FIELDS + LIST_FIELDS
SHARD_SUFFIXES = {"parquet": ".parquet", "webdataset": ".tar"}

ARROW_SCHEMA = pa.schema([
    ("id", pa.string()), ("image", pa.binary()), ("lang", pa.string()), ("text", pa.string()),
    ("question", pa.string()), ("answer", pa.string()), ("ocr_text", pa.string()), ("task", pa.string()),
    ("captions", pa.list_(pa.string())), ("answers", pa.list_(pa.string())),
    ("image_labels", pa.list_(pa.string())),
])


def filesystem_for(path: str) -> tuple[pafs.FileSystem, str]:
    """(pyarrow filesystem, path inside it) for a local path or a URI such as s3://bucket/key."""
    if "://" in path:
        return pafs.FileSystem.from_uri(path)
    return pafs.LocalFileSystem(), os.path.abspath(path)


def _open_write(path: str):
    fs, p = filesystem_for(path)
    parent = os.path.dirname(p)
    if parent:
        fs.create_dir(parent, recursive=True)
    return fs.open_output_stream(p)


def normalize_row(row: dict[str, Any]) -> dict[str, Any]:
    """A schema row: required fields as given, missing strings as None, lists as list[str] or None."""
    out: dict[str, Any] = {k: row.get(k) for k in COLUMNS}
    for k in LIST_FIELDS:
        if out[k] is not None:
            out[k] = [str(x) for x in out[k]]
    return out


def write_parquet_shard(rows: list[dict[str, Any]], path: str) -> str:
    """Write `rows` (dicts with schema keys) as one parquet file; returns `path`."""
    table = pa.Table.from_pylist([normalize_row(r) for r in rows], schema=ARROW_SCHEMA)
    with _open_write(path) as f:
        pq.write_table(table, f, compression="zstd")
    return path


def _wds_key(i: int, example_id: str) -> str:
    # WebDataset splits a member name at the first dot of its basename: keep dots and slashes out.
    safe = "".join(c if c.isalnum() or c in "-_" else "_" for c in example_id)[:80]
    return f"{i:06d}_{safe}"


def write_webdataset_shard(rows: list[dict[str, Any]], path: str) -> str:
    """Write `rows` as a WebDataset tar: members `KEY.image`, `KEY.id`, `KEY.lang`, `KEY.text`, ... ."""
    with _open_write(path) as out, tarfile.open(fileobj=out, mode="w|") as tar:
        for i, row in enumerate(rows):
            row = normalize_row(row)
            key = _wds_key(i, str(row["id"]))
            for k in COLUMNS:
                v = row[k]
                if v is None:
                    continue
                data = v if k == "image" else (json.dumps(v, ensure_ascii=False) if k in LIST_FIELDS else v)
                if isinstance(data, str):
                    data = data.encode("utf-8")
                info = tarfile.TarInfo(f"{key}.{k}")
                info.size = len(data)
                info.mtime = 0  # reproducible archives
                tar.addfile(info, io.BytesIO(data))
    return path


def write_shard(rows: list[dict[str, Any]], path: str, fmt: str) -> str:
    """Write one shard in `fmt` ("parquet" or "webdataset")."""
    if fmt == "parquet":
        return write_parquet_shard(rows, path)
    if fmt == "webdataset":
        return write_webdataset_shard(rows, path)
    raise ValueError(f"unknown shard format {fmt!r}; expected one of {sorted(SHARD_SUFFIXES)}")


class ShardWriter:
    """Buffers rows and writes `{prefix}-{index:05d}.{parquet|tar}` every `rows_per_shard` rows."""

    def __init__(self, out_dir: str, prefix: str = "shard", rows_per_shard: int = 256, fmt: str = "parquet"):
        if fmt not in SHARD_SUFFIXES:
            raise ValueError(f"unknown shard format {fmt!r}; expected one of {sorted(SHARD_SUFFIXES)}")
        if rows_per_shard < 1:
            raise ValueError(f"rows_per_shard={rows_per_shard}; expected >= 1")
        self.out_dir, self.prefix, self.rows_per_shard, self.fmt = out_dir, prefix, rows_per_shard, fmt
        self.paths: list[str] = []
        self._rows: list[dict[str, Any]] = []

    def add(self, row: dict[str, Any]) -> None:
        """Queue one row; writes a shard when the buffer is full."""
        self._rows.append(row)
        if len(self._rows) >= self.rows_per_shard:
            self.flush()

    def flush(self) -> None:
        """Write the buffered rows (if any) as the next shard."""
        if not self._rows:
            return
        name = f"{self.prefix}-{len(self.paths):05d}{SHARD_SUFFIXES[self.fmt]}"
        path = f"{self.out_dir.rstrip('/')}/{name}"
        self.paths.append(write_shard(self._rows, path, self.fmt))
        self._rows = []

    def close(self) -> list[str]:
        """Flush and return every path written."""
        self.flush()
        return list(self.paths)


# --- reading -----------------------------------------------------------------------------------------

@dataclass
class ShardContents:
    """Valid rows of one shard plus how many rows were malformed."""

    rows: list[dict[str, Any]]
    malformed: int = 0


def _valid(row: dict[str, Any]) -> bool:
    if not isinstance(row.get("id"), str) or not row["id"]:
        return False
    if not isinstance(row.get("image"), bytes | bytearray) or not row["image"]:
        return False
    if not isinstance(row.get("lang"), str) or not row["lang"]:
        return False
    for k in STRING_FIELDS:
        if row.get(k) is not None and not isinstance(row[k], str):
            return False
    for k in LIST_FIELDS:
        v = row.get(k)
        if v is not None and not (isinstance(v, list) and all(isinstance(x, str) for x in v)):
            return False
    return True


def _read_parquet(fs: pafs.FileSystem, p: str) -> Iterator[dict[str, Any]]:
    with fs.open_input_file(p) as f:
        table = pq.read_table(f)
    names = [c for c in COLUMNS if c in table.column_names]
    yield from table.select(names).to_pylist()


def _read_tar(fs: pafs.FileSystem, p: str) -> Iterator[dict[str, Any]]:
    with fs.open_input_file(p) as f:
        data = f.read()
    samples: dict[str, dict[str, Any]] = {}
    with tarfile.open(fileobj=io.BytesIO(data), mode="r:*") as tar:
        for m in tar:
            if not m.isfile():
                continue
            base = os.path.basename(m.name)
            key, _, suffix = base.partition(".")
            key = os.path.join(os.path.dirname(m.name), key)
            if suffix not in COLUMNS:
                continue
            raw = tar.extractfile(m).read()
            sample = samples.setdefault(key, {})
            if suffix == "image":
                sample[suffix] = raw
                continue
            try:
                text = raw.decode("utf-8")
                sample[suffix] = json.loads(text) if suffix in LIST_FIELDS else text
            except (UnicodeDecodeError, json.JSONDecodeError):
                sample[suffix] = raw  # fails validation -> counted as malformed
    yield from samples.values()


def read_shard(path: str) -> ShardContents:
    """Read one parquet (`.parquet`) or WebDataset (`.tar`) shard from a local path or URI.

    Raises OSError/ArrowException when the file itself is unreadable (the pipeline counts that as a bad
    shard); malformed rows inside a readable file are counted in `malformed` and left out.
    """
    fs, p = filesystem_for(path)
    if p.endswith(".parquet"):
        it = _read_parquet(fs, p)
    elif p.endswith(".tar"):
        it = _read_tar(fs, p)
    else:
        raise ValueError(f"unknown shard type {path!r}; expected a .parquet or .tar file")
    out = ShardContents(rows=[])
    for row in it:
        if _valid(row):
            if isinstance(row["image"], bytearray):
                row["image"] = bytes(row["image"])
            out.rows.append(normalize_row(row))
        else:
            out.malformed += 1
    return out


def iter_rows(paths: Iterable[str]) -> Iterator[dict[str, Any]]:
    """Every valid row of `paths` in order (no Ray; for tokenizer training and tests)."""
    for path in paths:
        yield from read_shard(path).rows
