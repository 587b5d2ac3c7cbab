"""`evaluate`: checkpoint + shards -> predictions.jsonl, metrics.json, report.md (+ chart).

Order of work, so that bad input fails before any model is loaded:
1. validate tasks, the language filter, the shard list and the checkpoint (config, tensor names and
   shapes, tokenizer) without loading weights;
2. scan the shards (on the driver, or one Ray task each when there are many): examples per
   (task, language), languages present, malformed rows, bad images, unreadable files;
3. connect to / start Ray and stream predictions from the actor pool into `predictions.jsonl` (flushed per batch);
4. score, check that every scanned example was predicted exactly once, write the report.
"""

from __future__ import annotations

import glob
import json
import logging
import os
import time
from collections import Counter
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from pali.eval.examples import EVAL_TASKS, check_langs, check_tasks, count_examples
from pali.eval.inference import InferenceConfig, predict
from pali.eval.metrics import compute_metrics
from pali.eval.report import write_report

log = logging.getLogger(__name__)

SHARD_EXTENSIONS = (".parquet", ".tar")


def list_shard_paths(data_paths: str | Sequence[str]) -> list[str]:
    """Shard files from files, directories, URIs (`pali.data.pipeline.list_shards`), local globs and
    comma-separated lists."""
    from pali.data.pipeline import list_shards

    items = [data_paths] if isinstance(data_paths, str) else list(data_paths)
    expanded: list[str] = []
    for item in items:
        for part in (p.strip() for p in str(item).split(",")):
            if "://" not in part and any(c in part for c in "*?["):
                found = sorted(glob.glob(part))
                if not found:
                    raise FileNotFoundError(f"pattern {part!r} matches no shard files")
                expanded.extend(found)
            elif part:
                expanded.append(part)
    return list_shards(expanded)


def check_checkpoint(checkpoint: str) -> dict[str, Any]:
    """Validate a serving checkpoint without loading its weights; returns its model config dict.

    Raises ValueError naming the checkpoint and what is wrong (missing file, bad config, tensor names
    or shapes that do not match the config, unreadable tokenizer).
    """
    from safetensors import safe_open

    from pali import storage
    from pali.factory import create_model
    from pali.serving_checkpoint import TOKENIZER_FILE, WEIGHTS_FILE, load_config
    from pali.tokenizer import Tokenizer

    ckpt = checkpoint
    try:
        ckpt = storage.local_checkpoint(checkpoint)  # a URI is checked on its cached local copy
        if not ckpt.is_dir():
            raise FileNotFoundError(f"{ckpt} is not a directory")
        cfg = load_config(ckpt)
        with safe_open(str(ckpt / WEIGHTS_FILE), framework="pt") as f:
            shapes = {k: tuple(f.get_slice(k).get_shape()) for k in f.keys()}  # noqa: SIM118
        expected = {k: tuple(v.shape) for k, v in create_model(cfg, device="meta").state_dict().items()}
        missing = sorted(set(expected) - set(shapes))
        unexpected = sorted(set(shapes) - set(expected))
        wrong = [k for k in expected if k in shapes and shapes[k] != expected[k]]
        if missing or unexpected or wrong:
            raise ValueError(f"weights do not match config {cfg.name!r}: missing {missing[:3]}, unexpected "
                             f"{unexpected[:3]}, wrong shapes {wrong[:3]}")
        Tokenizer.load(ckpt / TOKENIZER_FILE)
    except Exception as e:
        raise ValueError(f"checkpoint {str(ckpt)!r} does not load: {type(e).__name__}: {e}; expected a "
                         "serving checkpoint directory (config.json, model.safetensors, tokenizer.model)"
                         ) from e
    return cfg.to_dict()


def ensure_ray() -> None:
    """Use the running Ray instance, or connect to RAY_ADDRESS (as under `ray job submit`), or start one."""
    import ray

    if ray.is_initialized():
        return
    if os.environ.get("RAY_ADDRESS"):
        ray.init(address=os.environ["RAY_ADDRESS"])
    else:
        from cluster.auth import use_in_this_process

        use_in_this_process()  # a cluster this process starts keeps Ray's token authentication on
        # Logical oversubscription: Ray Data deadlocks when actors hold every CPU of a small machine.
        ray.init(num_cpus=max(8, os.cpu_count() or 1), include_dashboard=False)


def _scan_shard(path: str, tasks: tuple[str, ...], langs: tuple[str, ...] | None, opts: Any = None) -> dict[str, Any]:
    from pali.data.schema import read_shard

    try:
        contents = read_shard(path, opts)
    except Exception as e:
        return {"path": path, "error": f"{type(e).__name__}: {e}"}
    counts = count_examples(contents.rows, tasks, langs)
    return {"path": path, "error": None, "malformed": contents.malformed, "reasons": dict(contents.reasons),
            "examples": list(counts["examples"].items()), "langs": dict(counts["langs"]),
            "keys": list(counts["keys"].items()), "bad_images": counts["bad_images"]}


def _duplicate_rows(results: list[dict[str, Any]]) -> str | None:
    """A sentence naming rows that share (id, lang), or None when every row's key is unique."""
    where: dict[tuple[str, str], list[str]] = {}
    for r in results:
        for (row_id, lang), n in r["keys"]:
            where.setdefault((row_id, lang), []).extend([os.path.basename(r["path"])] * n)
    dup = [(k, v) for k, v in where.items() if len(v) > 1]
    if not dup:
        return None
    shown = "; ".join(f"id {i!r} in language {lang!r} ({len(v)} rows: {', '.join(sorted(set(v))[:3])})"
                      for (i, lang), v in dup[:3])
    return (f"{len(dup)} example key(s) occur in more than one row: {shown}. Evaluation identifies an example "
            "by (id, lang, task), so the same image may appear once per language, but ids must be unique within "
            "a language: remove the duplicate rows or give them distinct ids")


def scan_shards(paths: Sequence[str], tasks: Sequence[str], langs: Sequence[str] | None,
                ray_tasks_above: int = 8, opts: Any = None) -> dict[str, Any]:
    """Examples per (task, lang), languages present, malformed rows (and why) and bad images.

    Up to `ray_tasks_above` shards are scanned on the driver (threads; starting Ray workers costs more
    than reading a few shards), more with one Ray task per shard. An unreadable shard, or two rows with the
    same (id, lang), raise ValueError naming them (before any inference starts). `opts`: the readers'
    `pali.data.schema.ReadOptions` (column map, default language).
    """
    args = (tuple(tasks), tuple(langs) if langs else None, opts)
    if len(paths) <= ray_tasks_above:
        from concurrent.futures import ThreadPoolExecutor

        with ThreadPoolExecutor(max_workers=min(4, len(paths))) as pool:
            results = list(pool.map(lambda p: _scan_shard(p, *args), paths))
    else:
        import ray

        scan = ray.remote(num_cpus=0.25)(_scan_shard)
        results = ray.get([scan.remote(p, *args) for p in paths])
    bad = [f"{r['path']}: {r['error']}" for r in results if r["error"]]
    if bad:
        raise ValueError(f"{len(bad)} shard(s) could not be read: {bad[:5]}")
    duplicates = _duplicate_rows(results)
    if duplicates:
        raise ValueError(duplicates)
    examples: Counter[tuple[str, str]] = Counter()
    present: Counter[str] = Counter()
    reasons: Counter[str] = Counter()
    for r in results:
        examples.update({tuple(k): v for k, v in r["examples"]})
        present.update(r["langs"])
        reasons.update(r["reasons"])
    if reasons:
        log.warning("skipping %d malformed rows: %s", sum(reasons.values()), dict(reasons.most_common(5)))
    return {"examples": examples, "langs": present, "malformed": sum(r["malformed"] for r in results),
            "malformed_reasons": dict(reasons), "bad_images": sum(r["bad_images"] for r in results)}


def _resolve_tasks(requested: Sequence[str] | None, examples: Counter, paths: Sequence[str],
                   langs: Sequence[str] | None) -> tuple[str, ...]:
    have = {t for (t, _), n in examples.items() if n}
    where = f"shards {list(paths)[:3]}{' ...' if len(paths) > 3 else ''}"
    if requested is None:
        tasks = tuple(t for t in EVAL_TASKS if t in have)
        if not tasks:
            raise ValueError(f"{where} have no examples with references for any of {list(EVAL_TASKS)}"
                             f"{f' in languages {list(langs)}' if langs else ''}")
        return tasks
    missing = [t for t in requested if t not in have]
    if missing:
        raise ValueError(f"{where} have no references for requested task(s) {missing}"
                         f"{f' in languages {list(langs)}' if langs else ''}; "
                         f"tasks with references: {sorted(have)}")
    return tuple(requested)


def _check_decoding_args(num_beams: int, batch_size: int, max_new_tokens: int) -> None:
    """Raise ValueError naming the first of num_beams, batch_size, max_new_tokens that is not an integer >= 1."""
    if not isinstance(num_beams, int) or num_beams < 1:
        raise ValueError(f"num_beams={num_beams!r}; expected an integer >= 1")
    if not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"batch_size={batch_size!r}; expected an integer >= 1")
    if not isinstance(max_new_tokens, int) or max_new_tokens < 1:
        raise ValueError(f"max_new_tokens={max_new_tokens!r}; expected an integer >= 1")


def _check_langs_present(langs: tuple[str, ...] | None, present: Counter) -> None:
    """Raise ValueError if a language of the filter has no rows in the shards."""
    if langs:
        absent = [lang for lang in langs if not present.get(lang)]
        if absent:
            raise ValueError(f"language filter {absent} matches no rows; the shards hold languages "
                             f"{sorted(present)}")


def _predict_to_file(pred_path: Path, paths: list[str], tasks: tuple[str, ...], langs: tuple[str, ...] | None,
                     cfg: InferenceConfig, opts: Any = None) -> tuple[list[dict[str, Any]], Any]:
    """Stream predictions into `pred_path` (flushed per batch), then read them back; returns the records and
    the pipeline's `DataStats`."""
    from pali.data.pipeline import DataStats

    ensure_ray()
    stats = DataStats()
    written = 0
    with open(pred_path, "w", encoding="utf-8") as f:
        try:
            for rows in predict(paths, tasks, langs, cfg, stats=stats, read_options=opts):
                for row in rows:
                    f.write(json.dumps(row, ensure_ascii=False) + "\n")
                written += len(rows)
                f.flush()
        except Exception as e:
            raise RuntimeError(f"inference failed after {written} predictions (kept in {pred_path}): "
                               f"{type(e).__name__}: {e}") from e
    records = [json.loads(line) for line in pred_path.read_text(encoding="utf-8").splitlines() if line]
    return records, stats


def _run_summary(checkpoint: str, model_cfg: dict[str, Any], paths: list[str], tasks: tuple[str, ...],
                 langs: tuple[str, ...] | None, cfg: InferenceConfig, records: list[dict[str, Any]],
                 scan: dict[str, Any], stats: Any, infer_s: float) -> dict[str, Any]:
    """The metrics' "run" section: what was evaluated, how, and how fast."""
    return {
        "checkpoint": str(checkpoint), "preset": model_cfg.get("name"), "num_shards": len(paths),
        "tasks": list(tasks), "langs": list(langs) if langs else None, "num_beams": cfg.num_beams,
        "max_new_tokens": cfg.max_new_tokens, "batch_size": cfg.batch_size, "num_predictions": len(records),
        "prediction_errors": sum(1 for r in records if r.get("error")), "malformed_rows": scan["malformed"],
        "malformed_reasons": scan["malformed_reasons"],
        "bad_images": scan["bad_images"], "data_stats": stats.get(),
        "wall_s": round(infer_s, 2), "examples_per_s": round(len(records) / max(infer_s, 1e-9), 3),
    }


_REPORT_RUN_KEYS = ("checkpoint", "preset", "num_shards", "tasks", "langs", "num_beams", "num_predictions",
                    "prediction_errors", "wall_s")
"""The entries of the "run" section that report.md shows."""


def _prediction_counts(records: list[dict[str, Any]]) -> tuple[Counter, Counter]:
    """Predictions per (task, lang) and per example key (id, lang, task)."""
    return (Counter((r["task"], r["lang"]) for r in records),
            Counter((r["id"], r["lang"], r["task"]) for r in records))


def _describe(counts: Counter) -> str:
    """"caption in fr: 2, vqa in en: 1" for a Counter of (task, lang)."""
    return ", ".join(f"{task} in {lang}: {n}" for (task, lang), n in sorted(counts.items()))


def _check_predictions(records: list[dict[str, Any]], got: Counter, keys: Counter, expected: Counter,
                       out: Path) -> None:
    """Raise RuntimeError if every prediction failed, or if the predictions are not each scanned example once."""
    failed = [r for r in records if r.get("error")]
    if records and len(failed) == len(records):
        raise RuntimeError(f"every one of the {len(records)} predictions failed (first error: "
                           f"{failed[0]['error']}); outputs kept in {out}")
    duplicates = [k for k, n in keys.items() if n > 1]
    if got != expected or duplicates:
        problems = []
        if expected - got:
            problems.append(f"examples the shards hold that got no prediction ({_describe(expected - got)})")
        if got - expected:
            problems.append(f"predictions for examples the scan did not find ({_describe(got - expected)})")
        if duplicates:
            shown = ", ".join(f"(id {i!r}, lang {lang!r}, task {t!r})" for i, lang, t in duplicates[:3])
            problems.append(f"{len(duplicates)} example(s) predicted more than once: {shown}")
        raise RuntimeError(f"the {sum(got.values())} predictions do not match the {sum(expected.values())} "
                           f"examples of the shards: {'; '.join(problems)}. An example is identified by (id, lang, "
                           f"task); this usually means the shards changed during the run, or an inference actor "
                           f"was restarted and redid a batch: rerun the evaluation. Outputs kept in {out}")


def evaluate(checkpoint: str, data_paths: str | Sequence[str], tasks: Sequence[str] | None = None,
             langs: Sequence[str] | None = None, num_beams: int = 1, out_dir: str = "eval_out",
             max_new_tokens: int = 32, batch_size: int = 16, num_actors: int | None = None,
             use_gpu: bool | None = None, dtype: str | None = None, column_map: str | dict[str, str] | None = None,
             default_lang: str | None = None) -> dict[str, Any]:
    """Evaluate a serving checkpoint on shards; writes predictions.jsonl, metrics.json, report.md.

    tasks: subset of ("caption", "vqa", "ocr"); None = every task the shards have references for
    (an explicitly requested task without references is an error). langs: BCP-47 filter, None = all.
    column_map / default_lang: how the readers name the columns and the language of rows without one
    (`pali.data.schema.ReadOptions`). An example is identified by (id, lang, task).
    Returns the metrics dict (see `pali.eval.metrics.compute_metrics`) with a "run" section added.
    """
    if tasks is not None:
        tasks = check_tasks(tasks)
    langs = check_langs(langs)
    from pali.data.schema import ReadOptions

    opts = ReadOptions.make(column_map, default_lang)
    _check_decoding_args(num_beams, batch_size, max_new_tokens)
    paths = list_shard_paths(data_paths)
    model_cfg = check_checkpoint(checkpoint)

    t0 = time.time()
    scan = scan_shards(paths, tasks or EVAL_TASKS, langs, opts=opts)
    _check_langs_present(langs, scan["langs"])
    tasks = _resolve_tasks(tasks, scan["examples"], paths, langs)
    expected = Counter({k: v for k, v in scan["examples"].items() if k[0] in tasks})

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    cfg = InferenceConfig(checkpoint=checkpoint, num_beams=num_beams, max_new_tokens=max_new_tokens,
                          batch_size=batch_size, num_actors=num_actors, use_gpu=use_gpu, dtype=dtype)
    records, stats = _predict_to_file(out / "predictions.jsonl", paths, tasks, langs, cfg, opts)
    infer_s = time.time() - t0

    metrics = compute_metrics(records)
    got, keys = _prediction_counts(records)
    metrics["run"] = _run_summary(checkpoint, model_cfg, paths, tasks, langs, cfg, records, scan, stats, infer_s)
    write_report(metrics, out, {k: metrics["run"][k] for k in _REPORT_RUN_KEYS})
    _check_predictions(records, got, keys, expected, out)
    log.info("evaluation done: %d predictions in %.1f s, outputs in %s", len(records), infer_s, out)
    return metrics
