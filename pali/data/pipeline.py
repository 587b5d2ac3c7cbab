"""The Ray Data pipeline: shards -> read -> decode/resize/normalise -> task mixture -> tokenize -> padding.

```
from_items(shard list) --map_batches(read one shard, batch_size=1)--> raw rows (+ shard_index)
                        --map_batches(decode + mixture + tokenize)--> fixed-size numpy examples
```
Reading is a `map_batches` over the shard list rather than `read_parquet`: it handles parquet and
WebDataset alike, counts unreadable files instead of failing, tags every row with its shard index, and
every operator runs with a small fractional `num_cpus` (Ray's `read_parquet` always plans a 1-CPU
ListFiles task, which deadlocks 2-core machines).

Skipped rows are counted in a `DataStats` actor (`ds.pali_stats` on the returned dataset, or the one
passed in / named by `DataConfig.stats_name`): `rows`, `bad_shards`, `malformed_rows`, `bad_images`,
`filtered_lang`, `no_task`, `examples`, `images`, plus producer-side `images_per_s` / `examples_per_s`.
"""

from __future__ import annotations

import io
import json
import os
import time
import uuid
import warnings
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.fs as pafs
from PIL import Image

from pali import storage
from pali.data.prompts import COMMON_LANGS, TASKS, check_task, prompt_templates
from pali.data.schema import SHARD_SUFFIXES, ReadOptions, filesystem_for, iter_rows, iter_shard
from pali.data.tasks import (
    check_langs,
    check_weights,
    choose_task,
    default_task_weights,
    make_example,
    row_rng,
    supported_tasks,
    tokenize_examples,
)
from pali.models import naflex
from pali.tokenizer import Tokenizer

_RAW_STRING_COLS = ("id", "lang", "text", "question", "answer", "ocr_text", "task", "captions", "answers",
                    "captions_tokenized")
_RAW_JSON_COLS = ("captions", "answers", "captions_tokenized")
_RAW_SCHEMA = pa.schema([(c, pa.string()) for c in _RAW_STRING_COLS]
                        + [("image", pa.binary()), ("shard_index", pa.int64())])


@dataclass
class DataConfig:
    """What the pipeline reads and how it shapes examples."""

    paths: list[str] = field(default_factory=list)
    """Shard files, directories of shards, or pyarrow-filesystem URIs (s3://, gs://)."""
    image_size: int = 64
    """Square side in pixels the images are resized to (the model's `vision.image_size`)."""
    max_text_len: int = 48
    """Prompt length in tokens (eos included); longer prompts are truncated, shorter padded with 0."""
    max_target_len: int = 24
    """Target length in tokens (eos included)."""
    task_weights: dict[str, float] = field(default_factory=default_task_weights)
    """Mixture weights per task (see `pali.data.prompts.TASKS`); rows pick among the tasks they support."""
    seed: int = 0
    """Seed of the task mixture, split points and span corruption (per row, order independent)."""
    batch_size: int = 8
    """Examples per batch per data-parallel rank."""
    langs: list[str] | None = None
    """Keep only rows in these languages (None = all)."""
    image_mean: tuple[float, float, float] = (0.5, 0.5, 0.5)
    """Per-channel mean subtracted after scaling pixels to [0, 1]."""
    image_std: tuple[float, float, float] = (0.5, 0.5, 0.5)
    """Per-channel std the pixels are divided by (0.5/0.5 maps to [-1, 1], as SigLIP)."""
    num_cpus_per_task: float = 0.25
    """Logical CPUs each Ray Data task reserves (small, so 2-core machines never deadlock)."""
    map_batch_size: int = 64
    """Rows per `map_batches` call of the decode/tokenize operator."""
    local_shuffle_buffer: int = 0
    """Rows of the per-rank local shuffle buffer in `iter_batches` (0 = no shuffle)."""
    stats_name: str | None = None
    """Key of this pipeline's `DataStats` counters (reuse it to read them elsewhere); None = a fresh key."""
    naflex_patch_size: int = 0
    """NaFlex tower's patch size: images keep their aspect ratio as packed patches (`pali.models.naflex`,
    float32[1 + max_num_patches, p*p*3]); 0 = resize to an image_size square."""
    max_num_patches: int = 256
    """NaFlex patch budget per image (the model's `vision.max_num_patches`)."""
    column_map: dict[str, str] | str | None = None
    """Schema column -> source column / JSON key (`{"text": "caption_en"}` or `"text=caption_en,lang=LANGUAGE"`),
    for shards with other names (see `pali.data.schema.ALIASES` for the names read without one)."""
    default_lang: str | None = None
    """BCP-47 language of rows that carry none (None: such rows are malformed)."""
    read_block_rows: int = 256
    """Rows per block the read step emits: a shard streams through in blocks, never whole."""

    @classmethod
    def for_model(cls, model_cfg: Any, **kw: Any) -> DataConfig:
        """Image size and text lengths from a `PaLIConfig`, other fields from `kw`."""
        v = model_cfg.vision
        return cls(image_size=v.image_size, max_text_len=model_cfg.max_text_len,
                   max_target_len=model_cfg.max_target_len, naflex_patch_size=v.patch_size if v.naflex else 0,
                   max_num_patches=v.max_num_patches, **kw)

    def validate(self) -> None:
        """Raise ValueError naming the first bad field."""
        check_weights(self.task_weights)
        check_langs(self.langs)
        self.read_options()
        for name in ("image_size", "max_text_len", "max_target_len", "batch_size", "map_batch_size",
                     "read_block_rows"):
            if getattr(self, name) < 1:
                raise ValueError(f"DataConfig.{name}={getattr(self, name)}; expected >= 1")
        if not 0 < self.num_cpus_per_task <= 8:
            raise ValueError(f"DataConfig.num_cpus_per_task={self.num_cpus_per_task}; expected in (0, 8]")

    def read_options(self) -> ReadOptions:
        """The readers' column map and default language (validated)."""
        return ReadOptions.make(self.column_map, self.default_lang)


# --- shards ------------------------------------------------------------------------------------------

def list_shards(paths: str | Sequence[str]) -> list[str]:
    """Every `.parquet` / `.tar` shard under `paths` (files, directories, URIs), sorted and de-duplicated."""
    if isinstance(paths, str):
        paths = [paths]
    if not paths:
        raise ValueError("no shard paths given; expected files, directories or URIs of .parquet/.tar shards")
    suffixes = tuple(SHARD_SUFFIXES.values())
    found: set[str] = set()
    for path in paths:
        fs, p = filesystem_for(path)
        scheme = path.split("://", 1)[0] + "://" if "://" in path else ""
        info = fs.get_file_info(p)
        if info.type == pafs.FileType.NotFound:
            raise FileNotFoundError(f"shard path {path!r} does not exist")
        if info.type == pafs.FileType.Directory:
            for f in fs.get_file_info(pafs.FileSelector(p, recursive=True)):
                if f.type == pafs.FileType.File and f.path.endswith(suffixes):
                    found.add(scheme + f.path if scheme else f.path)
        elif p.endswith(suffixes):
            found.add(path if scheme else p)
        else:
            raise ValueError(f"{path!r} is not a shard; expected a .parquet or .tar file or a directory")
    if not found:
        raise ValueError(f"no .parquet or .tar shards under {list(paths)}")
    return sorted(found)


# --- images ------------------------------------------------------------------------------------------

def resize_rgb(img: Image.Image, image_size: int) -> np.ndarray:
    """uint8[image_size, image_size, 3]: the image in RGB, bicubic-resized to a square."""
    img = img.convert("RGB")
    if img.size != (image_size, image_size):
        img = img.resize((image_size, image_size), Image.Resampling.BICUBIC)
    return np.asarray(img)


def normalize_images(images: np.ndarray, mean: Sequence[float] = (0.5, 0.5, 0.5),
                     std: Sequence[float] = (0.5, 0.5, 0.5)) -> np.ndarray:
    """float32[..., 3, H, W] from uint8[..., H, W, 3]: (x / 255 - mean) / std, channels first; one image or
    a whole batch (element-wise, so a batch equals its images done one by one, bit for bit)."""
    arr = images.astype(np.float32) / 255.0  # (..., H, W, 3)
    arr = (arr - np.asarray(mean, np.float32)) / np.asarray(std, np.float32)
    return np.ascontiguousarray(np.moveaxis(arr, -1, -3))  # (..., 3, H, W)


def preprocess_image(image: bytes | Image.Image, image_size: int, mean: Sequence[float] = (0.5, 0.5, 0.5),
                     std: Sequence[float] = (0.5, 0.5, 0.5)) -> np.ndarray:
    """Decode (if bytes), convert to RGB, resize to a square and normalise -> float32[3, H, W].

    Raises on undecodable bytes (PIL's UnidentifiedImageError / OSError); serving uses the same
    `resize_rgb` and `normalize_images`, batched.
    """
    img = Image.open(io.BytesIO(image)) if isinstance(image, bytes | bytearray | memoryview) else image
    img.load()
    return normalize_images(resize_rgb(img, image_size), mean, std)


# --- counters ----------------------------------------------------------------------------------------

_STATS_ACTOR = "pali_data_stats"
_ACTOR_CACHE: dict[str, Any] = {}


class DataStats:
    """Handle to the counters of one pipeline: rows read, skipped and produced (safe to pass into tasks).

    All pipelines of a Ray cluster share one zero-CPU actor (`pali_data_stats`, created on first use)
    holding a counter set per key: `DataStats()` gets a fresh key, `DataStats("train")` the named one
    (so training workers can read the driver's counters with `DataStats("train").get()`).
    """

    def __init__(self, name: str | None = None):
        import ray

        @ray.remote(num_cpus=0)
        class _Counters:
            def __init__(self):
                self.counts: dict[str, dict[str, int]] = {}
                self.span: dict[str, tuple[float, float]] = {}

            def add(self, key: str, counts: dict[str, int], t: float) -> None:
                c = self.counts.setdefault(key, {})
                for k, v in counts.items():
                    c[k] = c.get(k, 0) + int(v)
                first, last = self.span.get(key, (t, t))
                self.span[key] = (min(first, t), max(last, t))

            def get(self, key: str) -> dict[str, Any]:
                out: dict[str, Any] = dict(self.counts.get(key, {}))
                first, last = self.span.get(key, (0.0, 0.0))
                span = last - first
                out["examples_per_s"] = out.get("examples", 0) / span if span > 0 else 0.0
                out["images_per_s"] = out.get("images", 0) / span if span > 0 else 0.0
                return out

        self.key = name or uuid.uuid4().hex
        if not ray.is_initialized():
            if not os.environ.get("RAY_ADDRESS"):
                from cluster.auth import use_in_this_process

                use_in_this_process()  # a local cluster keeps Ray's token authentication on
            ray.init()  # what Ray Data would do on first use anyway
        job = ray.get_runtime_context().get_job_id()
        if _ACTOR_CACHE.get("job") != job:
            # A named actor dies with its creator's last handle: keep one for this process's lifetime.
            # Soft-pinned to this node (the driver's, usually the head) so it outlives worker nodes.
            from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

            here = NodeAffinitySchedulingStrategy(node_id=ray.get_runtime_context().get_node_id(), soft=True)
            _ACTOR_CACHE.update(job=job, actor=_Counters.options(name=_STATS_ACTOR, namespace="pali",
                                                                 get_if_exists=True,
                                                                 scheduling_strategy=here).remote())
        self._actor = _ACTOR_CACHE["actor"]

    def add(self, **counts: int) -> None:
        """Add counts; waits for the actor, so totals are complete once the data has been consumed.

        Counters are bookkeeping: if the actor is gone (its node died mid-run), the counts are dropped with
        a warning and the data keeps flowing.
        """
        import ray

        try:
            ray.get(self._actor.add.remote(self.key, counts, time.time()))
        except (ray.exceptions.RayActorError, ray.exceptions.ActorUnavailableError) as e:
            warnings.warn(f"data counters unavailable ({type(e).__name__}); {counts} not counted", stacklevel=2)

    def get(self) -> dict[str, Any]:
        """Current totals: rows, bad_shards, malformed_rows, bad_images, filtered_lang, no_task, examples,
        images, plus examples_per_s / images_per_s between the first and last producing batch."""
        import ray

        return ray.get(self._actor.get.remote(self.key))


# --- operators ---------------------------------------------------------------------------------------

def _read_op(langs: tuple[str, ...] | None, stats: DataStats | None, opts: ReadOptions, block_rows: int = 256):
    def empty() -> dict[str, list]:
        return {c: [] for c in _RAW_SCHEMA.names}

    def read(batch: dict[str, np.ndarray]) -> Iterator[pa.Table]:
        # A generator: each yielded table is one output block, so a shard streams through in blocks of
        # `block_rows` rows instead of being held whole by one task.
        counts = {"rows": 0, "bad_shards": 0, "malformed_rows": 0, "filtered_lang": 0}
        cols = empty()
        for path, shard_index in zip(batch["path"], batch["shard_index"], strict=True):
            try:
                for row, _ in iter_shard(str(path), opts, block_rows):
                    if row is None:
                        counts["malformed_rows"] += 1
                        continue
                    counts["rows"] += 1
                    if langs is not None and row["lang"] not in langs:
                        counts["filtered_lang"] += 1
                        continue
                    for c in _RAW_STRING_COLS:
                        v = row.get(c)
                        cols[c].append(json.dumps(v, ensure_ascii=False) if c in _RAW_JSON_COLS and v
                                       else (v or ""))
                    cols["image"].append(row["image"])
                    cols["shard_index"].append(int(shard_index))
                    if len(cols["id"]) >= block_rows:
                        yield pa.Table.from_pydict(cols, schema=_RAW_SCHEMA)
                        cols = empty()
            except Exception:  # unreadable / truncated file: count it, keep the run going
                counts["bad_shards"] += 1
        if stats is not None:
            stats.add(**counts)
        yield pa.Table.from_pydict(cols, schema=_RAW_SCHEMA)

    return read


def _process_op(cfg: DataConfig, tokenizer: Tokenizer, stats: DataStats | None,
                eval_tasks: tuple[str, ...] | None):
    weights = dict(cfg.task_weights)

    def process(batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        n = len(batch["id"])
        examples, pixels, meta = [], [], []
        counts = {"bad_images": 0, "no_task": 0, "malformed_rows": 0}
        for i in range(n):
            row = {c: (batch[c][i] or None) for c in _RAW_STRING_COLS}
            try:
                pix = preprocess_image(batch["image"][i], cfg.image_size, cfg.image_mean, cfg.image_std) \
                    if not cfg.naflex_patch_size else naflex.preprocess(  # aspect ratio kept, within the budget
                        batch["image"][i], cfg.naflex_patch_size, cfg.max_num_patches, cfg.image_mean, cfg.image_std)
            except Exception:  # undecodable / truncated image
                counts["bad_images"] += 1
                continue
            if eval_tasks is None:
                task = choose_task(row, weights, row_rng(cfg.seed, row["id"]))
                tasks = [task] if task else []
            else:
                tasks = [t for t in eval_tasks if t in supported_tasks(row)]
            if not tasks:
                counts["no_task"] += 1
                continue
            for t in tasks:
                try:
                    ex = make_example(row, t, tokenizer, row_rng(cfg.seed, row["id"], 1 + TASKS.index(t)))
                except Exception:  # e.g. text the task cannot use: skip the row, never the run
                    counts["malformed_rows"] += 1
                    continue
                examples.append(ex)
                pixels.append(pix if ex.uses_image else naflex.blank_like(pix))
                meta.append((row["lang"], row["id"], int(batch["shard_index"][i])))
        s = cfg.image_size
        shape = naflex.packed_shape(3, cfg.naflex_patch_size, cfg.max_num_patches) if cfg.naflex_patch_size \
            else (3, s, s)
        out: dict[str, np.ndarray] = {
            "pixel_values": np.stack(pixels) if pixels else np.zeros((0, *shape), np.float32),  # (B,3,H,W)
            **tokenize_examples(examples, tokenizer, cfg.max_text_len, cfg.max_target_len),
            "image_mask": np.array([int(e.uses_image) for e in examples], dtype=np.int64),  # (B,)
            "task": np.array([e.task for e in examples], dtype=object),
            "lang": np.array([m[0] for m in meta], dtype=object),
            "id": np.array([m[1] for m in meta], dtype=object),
            "shard_index": np.array([m[2] for m in meta], dtype=np.int64),
        }
        if eval_tasks is not None:
            out["prompt"] = np.array([e.prompt for e in examples], dtype=object)
            out["references"] = np.array([json.dumps(e.references, ensure_ascii=False) for e in examples],
                                         dtype=object)
            out["tokenized_references"] = np.array(
                [json.dumps(e.tokenized_references or [], ensure_ascii=False) for e in examples], dtype=object)
        if stats is not None:
            stats.add(**counts, examples=len(examples), images=int(out["image_mask"].sum()))
        return out

    return process


def _build(cfg: DataConfig, tokenizer: Tokenizer, shards: Sequence[str] | None, stats: DataStats | None,
           eval_tasks: tuple[str, ...] | None):
    import ray

    cfg.validate()
    shards = list(shards) if shards is not None else list_shards(cfg.paths)
    if not shards:
        raise ValueError("no shards to read; expected a non-empty shard list or DataConfig.paths")
    stats = stats or DataStats(cfg.stats_name)
    langs = check_langs(cfg.langs)
    items = [{"path": p, "shard_index": i} for i, p in enumerate(shards)]
    ds = ray.data.from_items(items, override_num_blocks=len(items))
    ds = ds.map_batches(_read_op(langs, stats, cfg.read_options(), cfg.read_block_rows), batch_size=1,
                        batch_format="numpy",
                        num_cpus=cfg.num_cpus_per_task, **storage.remote_args())
    ds = ds.map_batches(_process_op(cfg, tokenizer, stats, eval_tasks), batch_size=cfg.map_batch_size,
                        batch_format="numpy", num_cpus=cfg.num_cpus_per_task)
    ds.pali_stats = stats  # the counters travel with this Dataset object (not with derived ones)
    return ds


def build_dataset(cfg: DataConfig, tokenizer: Tokenizer, shards: Sequence[str] | None = None,
                  stats: DataStats | None = None):
    """Training examples as a `ray.data.Dataset` (one task per row, drawn from `cfg.task_weights`).

    Columns: pixel_values float32[3,H,W], input_ids / attention_mask int64[max_text_len], labels
    int64[max_target_len] (target + eos, 0-padded), image_mask int64 (0 = text-only), task, lang, id
    (strings), shard_index int64 (index into `shards`, default `list_shards(cfg.paths)`).
    Skip counters: `ds.pali_stats.get()`.
    """
    return _build(cfg, tokenizer, shards, stats, None)


def build_eval_dataset(cfg: DataConfig, tokenizer: Tokenizer, tasks: Sequence[str] = ("caption",),
                       shards: Sequence[str] | None = None, stats: DataStats | None = None):
    """Evaluation examples: one per (row, task in `tasks` the row supports), deterministic, no tail dropped.

    Columns as `build_dataset` plus `prompt` (string) and `references` (JSON list of strings: every
    caption / answer / OCR text; decode with `json.loads` or `collate`). Do not `streaming_split` it
    with `equal=True` (that drops rows): use `ds.split(n)` or batch inference.
    """
    tasks = tuple(check_task(t) for t in tasks)
    if not tasks:
        raise ValueError(f"no eval tasks given; expected some of {list(TASKS)}")
    return _build(cfg, tokenizer, shards, stats, tasks)


def process_shard(cfg: DataConfig, tokenizer: Tokenizer, path: str) -> dict[str, np.ndarray]:
    """One shard through the training pipeline's read and process steps in this process (no Ray): the
    examples exactly as `build_dataset` delivers them (padded to the config's fixed lengths), for
    inspection and benchmarks."""
    cfg.validate()
    tables = _read_op(check_langs(cfg.langs), None, cfg.read_options(), cfg.read_block_rows)(
        {"path": np.array([path], dtype=object), "shard_index": np.array([0], dtype=np.int64)})
    table = pa.concat_tables(list(tables))
    rows = {c: np.array(table.column(c).to_pylist(), dtype=object) for c in table.column_names}
    rows["shard_index"] = rows["shard_index"].astype(np.int64)
    return _process_op(cfg, tokenizer, None, None)(rows)


# --- consumers ---------------------------------------------------------------------------------------

def collate(batch: dict[str, np.ndarray]) -> dict[str, Any]:
    """Numpy batch -> torch tensors for numeric columns; string columns as list[str];
    `references` as list[list[str]]."""
    import torch

    out: dict[str, Any] = {}
    for k, v in batch.items():
        v = np.asarray(v) if not isinstance(v, np.ndarray) else v
        if k in ("references", "tokenized_references"):
            out[k] = [json.loads(x) if isinstance(x, str) else [str(y) for y in x] for x in v]
        elif v.dtype == object or v.dtype.kind in "US":
            out[k] = [str(x) for x in v]
        else:
            out[k] = torch.from_numpy(np.array(v, copy=True))  # Ray hands out read-only views
    return out


def split_for_ranks(ds, n: int) -> list:
    """`n` equal streaming shards of `ds` (one `DataIterator` per data-parallel rank; may drop < n rows)."""
    if n < 1:
        raise ValueError(f"number of data-parallel ranks {n}; expected >= 1")
    return ds.streaming_split(n, equal=True)


def iter_batches(it, batch_size: int, drop_last: bool = True, local_shuffle_buffer: int = 0,
                 seed: int | None = None) -> Iterator[dict[str, Any]]:
    """Collated fixed-size batches from a Dataset or DataIterator (see `collate`)."""
    kw: dict[str, Any] = {}
    if local_shuffle_buffer:
        kw = {"local_shuffle_buffer_size": local_shuffle_buffer, "local_shuffle_seed": seed}
    for batch in it.iter_batches(batch_size=batch_size, batch_format="numpy", drop_last=drop_last, **kw):
        yield collate(batch)


# --- tokenizer from shards ---------------------------------------------------------------------------

def shard_texts(shards: Sequence[str], max_rows: int = 20_000, opts: ReadOptions | None = None) -> Iterator[str]:
    """Text of the shards (captions, questions, answers, OCR text) plus the prompt templates of the common
    languages (`pali.data.prompts.COMMON_LANGS`) and of every other language the rows are in."""
    templates = prompt_templates()
    for _ in range(5):  # prompts are in every example: weight them up
        yield from templates
    seen: dict[str, None] = {}
    for k, row in enumerate(iter_rows(shards, opts)):
        if k >= max_rows:
            break
        seen.setdefault(row["lang"])
        for key in ("text", "question", "answer", "ocr_text"):
            if row.get(key):
                yield row[key]
        for key in ("captions", "answers"):
            yield from row.get(key) or []
    others = tuple(lang for lang in seen if lang not in COMMON_LANGS)
    for _ in range(5 if others else 0):
        yield from prompt_templates(others)


def train_tokenizer_from_shards(shards: Sequence[str], vocab_size: int, out_path: str | os.PathLike | None = None,
                                max_rows: int = 20_000, seed: int = 0, opts: ReadOptions | None = None) -> Tokenizer:
    """Train a unigram tokenizer (`Tokenizer.train`) on the text of `shards` and the prompt templates
    (`opts`: the readers' column map and default language)."""
    return Tokenizer.train(shard_texts(shards, max_rows, opts), vocab_size, out_path=out_path, seed=seed)
