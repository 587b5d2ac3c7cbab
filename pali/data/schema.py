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
| `captions_tokenized` | list<string> | the same captions pre-tokenized, space-separated (optional; CIDEr uses them) |
| `answers` | list<string> | every annotator answer (optional; WebDataset: a JSON list) |
| `image_labels` | list<string> | image-level class labels, `family:value` (optional; vision pretraining) |

Readers also take the layouts users bring (`ALIASES`, `ReadOptions`): img2dataset / LAION WebDataset
(`KEY.jpg|jpeg|png|webp`, `KEY.txt`, `KEY.json` metadata with `key`, `language`, ...), Hugging Face
parquet (`image` as a `{bytes, path}` struct, `caption`), any other naming through a column map, and a
default language. `lang` is any registered BCP-47 tag, stored in canonical form (`pali.data.langs`).

Unknown columns are ignored. Rows missing a required field, with a field of the wrong type or with an
unregistered language are counted as malformed and skipped; image bytes are only decoded later
(`pipeline.py`). Shards stream: parquet by row-group slices, tars member by member.
"""

from __future__ import annotations

import io
import json
import os
import tarfile
from collections import Counter
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from typing import Any

import pyarrow as pa
import pyarrow.fs as pafs
import pyarrow.parquet as pq

from pali.data.langs import canonical_lang
from pali.storage import filesystem_for

REQUIRED = ("id", "image", "lang")
STRING_FIELDS = ("text", "question", "answer", "ocr_text", "task")
LIST_FIELDS = ("captions", "answers", "image_labels", "captions_tokenized")
COLUMNS = REQUIRED + STRING_FIELDS + LIST_FIELDS
SHARD_SUFFIXES = {"parquet": ".parquet", "webdataset": ".tar"}

ARROW_SCHEMA = pa.schema([
    ("id", pa.string()), ("image", pa.binary()), ("lang", pa.string()), ("text", pa.string()),
    ("question", pa.string()), ("answer", pa.string()), ("ocr_text", pa.string()), ("task", pa.string()),
    ("captions", pa.list_(pa.string())), ("answers", pa.list_(pa.string())),
    ("image_labels", pa.list_(pa.string())), ("captions_tokenized", pa.list_(pa.string())),
])


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

IMAGE_SUFFIXES: tuple[str, ...] = ("jpg", "jpeg", "png", "webp")
"""WebDataset image members, in order of preference (img2dataset writes `KEY.jpg`)."""

ALIASES: dict[str, tuple[str, ...]] = {
    "id": ("id", "key"),
    "image": ("image", *IMAGE_SUFFIXES),
    "lang": ("lang", "language", "LANGUAGE"),
    "text": ("text", "txt", "caption"),
}
"""Source names read for a schema column when the column map names none (first present wins):
the project's own names, img2dataset's members (`KEY.jpg`, `KEY.txt`, `KEY.json` with `key`,
`language`/`LANGUAGE`) and Hugging Face's `caption`."""


@dataclass(frozen=True)
class ReadOptions:
    """How a reader maps a source's names onto the schema, and the language of rows that carry none."""

    column_map: tuple[tuple[str, str], ...] = ()
    """(schema column, source column or JSON key) pairs that override `ALIASES`."""
    default_lang: str | None = None
    """Canonical language of rows without one (None: such rows are malformed)."""

    @classmethod
    def make(cls, column_map: str | dict[str, str] | None = None, default_lang: str | None = None) -> ReadOptions:
        """Validated options from `KEY=COLUMN[,...]` text or a dict, and a BCP-47 default language."""
        return cls(tuple(sorted(parse_column_map(column_map).items())),
                   canonical_lang(default_lang) if default_lang else None)

    def sources(self, column: str) -> tuple[str, ...]:
        """The source names tried for `column`, in order."""
        mapped = dict(self.column_map).get(column)
        return (mapped,) if mapped else ALIASES.get(column, (column,))


def parse_column_map(spec: str | dict[str, str] | None) -> dict[str, str]:
    """`"text=caption_en,lang=LANGUAGE"` (or a dict) -> {"text": "caption_en", "lang": "LANGUAGE"}.

    Keys must be schema columns; ValueError naming the bad entry otherwise.
    """
    if not spec:
        return {}
    if isinstance(spec, dict):
        items = list(spec.items())
    else:
        items = []
        for part in (p.strip() for p in str(spec).split(",")):
            if not part:
                continue
            key, sep, value = part.partition("=")
            if not sep or not key.strip() or not value.strip():
                raise ValueError(f"column map entry {part!r} is not KEY=COLUMN; expected e.g. "
                                 "'text=caption_en,lang=LANGUAGE'")
            items.append((key.strip(), value.strip()))
    bad = [k for k, _ in items if k not in COLUMNS]
    if bad:
        raise ValueError(f"column map keys {bad} are not schema columns; expected some of {list(COLUMNS)}")
    return {str(k): str(v) for k, v in items}


@dataclass
class ShardContents:
    """Valid rows of one shard plus how many rows were malformed (and why)."""

    rows: list[dict[str, Any]]
    malformed: int = 0
    reasons: Counter = field(default_factory=Counter)
    """Malformed rows by reason (`no image`, `unregistered language 'xx'`, ...)."""


def _as_list(v: Any) -> Any:
    if isinstance(v, bytes | bytearray):
        v = v.decode("utf-8")
    if isinstance(v, str):
        v = json.loads(v) if v.strip() else None
    if isinstance(v, list):  # VQA-style [{"answer": "x"}, ...] too
        v = [x.get("answer") if isinstance(x, dict) else x for x in v]
    return v


def _as_text(v: Any) -> Any:
    if isinstance(v, bytes | bytearray):
        return bytes(v).decode("utf-8")
    if isinstance(v, int | float) and not isinstance(v, bool):
        return str(v)
    return v


def _as_image(v: Any) -> Any:
    if isinstance(v, dict):  # Hugging Face's Image feature: {"bytes": ..., "path": ...}
        v = v.get("bytes")
    return bytes(v) if isinstance(v, bytearray | memoryview) else v


def resolve_row(source: dict[str, Any], opts: ReadOptions, fallback_id: str) -> tuple[dict[str, Any] | None, str]:
    """A schema row from one source record (parquet row or WebDataset sample), or (None, why it is malformed)."""
    row: dict[str, Any] = {}
    for column in COLUMNS:
        value = next((source[s] for s in opts.sources(column) if source.get(s) is not None), None)
        try:
            if column == "image":
                value = _as_image(value)
            elif column in LIST_FIELDS:
                value = _as_list(value)
            else:
                value = _as_text(value)
        except (UnicodeDecodeError, json.JSONDecodeError, AttributeError):
            return None, f"undecodable {column}"
        row[column] = value
    if row["id"] is None and not any(s in source for s in opts.sources("id")):
        row["id"] = fallback_id  # a layout without ids (img2dataset, Hugging Face): the key / file:row
    if row["lang"] is None or row["lang"] == "":
        row["lang"] = opts.default_lang
    if not isinstance(row["image"], bytes) or not row["image"]:
        return None, "no image"
    if not isinstance(row["lang"], str):
        return None, "no language"
    try:
        row["lang"] = canonical_lang(row["lang"])
    except ValueError:
        return None, f"unregistered language {row['lang']!r}"
    if not isinstance(row["id"], str) or not row["id"]:
        return None, "no id"
    for k in STRING_FIELDS:
        if row[k] is not None and not isinstance(row[k], str):
            return None, f"{k} is not a string"
    for k in LIST_FIELDS:
        v = row[k]
        if v is not None and not (isinstance(v, list) and all(isinstance(x, str) for x in v)):
            return None, f"{k} is not a list of strings"
    return row, ""


def _parquet_records(fs: pafs.FileSystem, p: str, opts: ReadOptions, batch_rows: int) -> Iterator[tuple[dict, str]]:
    stem = os.path.basename(p).rsplit(".", 1)[0]
    with fs.open_input_file(p) as f:
        pf = pq.ParquetFile(f)
        wanted = {s for c in COLUMNS for s in opts.sources(c)}
        names = [n for n in pf.schema_arrow.names if n in wanted]
        k = 0
        for batch in pf.iter_batches(batch_size=batch_rows, columns=names):  # one row group slice at a time
            for record in batch.to_pylist():
                yield record, f"{stem}:{k}"
                k += 1


def _wds_record(sample: dict[str, Any]) -> dict[str, Any]:
    """Flatten one WebDataset sample: the JSON metadata's keys, then each member by suffix (members win)."""
    record: dict[str, Any] = {}
    meta = sample.get("json")
    if meta is not None:
        try:
            parsed = json.loads(meta)
        except (UnicodeDecodeError, json.JSONDecodeError):
            parsed = None
        if isinstance(parsed, dict):
            record.update(parsed)
    for suffix, data in sample.items():
        if suffix.startswith("__") or suffix == "json":
            continue
        if suffix in IMAGE_SUFFIXES or suffix == "image":
            record[suffix] = data
        else:
            try:
                record[suffix] = data.decode("utf-8")
            except UnicodeDecodeError:
                record[suffix] = data  # fails validation -> counted as malformed
    return record


def _tar_records(fs: pafs.FileSystem, p: str) -> Iterator[tuple[dict, str]]:
    from webdataset.tariterators import group_by_keys, tar_file_iterator

    with fs.open_input_stream(p) as f:  # sequential: local files and object stores alike stream
        members = ({**m, "__url__": p} for m in tar_file_iterator(f))
        for sample in group_by_keys(members):  # consecutive members sharing a key form one sample
            key = sample["__key__"]
            yield _wds_record(sample), key


def iter_shard(path: str, opts: ReadOptions | None = None, batch_rows: int = 256
               ) -> Iterator[tuple[dict[str, Any] | None, str]]:
    """Stream one parquet (`.parquet`, by row-group slices) or WebDataset (`.tar`, member by member) shard:
    (schema row, "") per valid row and (None, reason) per malformed one.

    Raises OSError/ArrowException/ValueError when the file itself is unreadable, possibly after yielding
    the rows before the damage.
    """
    opts = opts or ReadOptions()
    fs, p = filesystem_for(path)
    if p.endswith(".parquet"):
        records = _parquet_records(fs, p, opts, batch_rows)
    elif p.endswith(".tar"):
        records = _tar_records(fs, p)
    else:
        raise ValueError(f"unknown shard type {path!r}; expected a .parquet or .tar file")
    for record, fallback_id in records:
        row, why = resolve_row(record, opts, fallback_id)
        yield (row, "") if row is not None else (None, why)


def read_shard(path: str, opts: ReadOptions | None = None) -> ShardContents:
    """Every row of one shard (see `iter_shard`) in memory: valid rows, malformed count and reasons."""
    out = ShardContents(rows=[])
    for row, why in iter_shard(path, opts):
        if row is not None:
            out.rows.append(row)
        else:
            out.malformed += 1
            out.reasons[why] += 1
    return out


def iter_rows(paths: Iterable[str], opts: ReadOptions | None = None) -> Iterator[dict[str, Any]]:
    """Every valid row of `paths` in order, streamed (no Ray; for tokenizer training and tests)."""
    for path in paths:
        for row, _ in iter_shard(path, opts):
            if row is not None:
                yield row
