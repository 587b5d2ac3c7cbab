"""Driver side of pretraining: data preparation, the Ray Train `TorchTrainer`, consolidation.

The driver hands the workers the shard list and the pipeline's settings; each data-parallel replica
reads its own deterministic share of the shards, resuming from the data state of the checkpoint it
restarts from (`pali.train.data_order`: no example repeated or skipped across restarts and resizes).
"""

from __future__ import annotations

import json
import math
import os
from pathlib import Path
from typing import Any

from pali.config import PaLIConfig, get_preset
from pali.train.config import TrainConfig


def model_config(cfg: TrainConfig, vocab_size: int | None = None) -> PaLIConfig:
    """The preset with the run's overrides (and the tokenizer's vocabulary size, rounded up to 128)."""
    if cfg.init_from:
        from pali.serving_checkpoint import load_config

        mcfg = load_config(cfg.init_from)
    else:
        mcfg = get_preset(cfg.preset)
    overrides = dict(cfg.model_overrides)
    if vocab_size is not None and not cfg.init_from:
        overrides.setdefault("text__vocab_size", max(mcfg.text.vocab_size, int(math.ceil(vocab_size / 128) * 128)))
    return mcfg.with_overrides(**overrides) if overrides else mcfg


def run_dir(cfg: TrainConfig) -> Path:
    """Where Ray Train keeps this run's checkpoints."""
    return Path(storage_path(cfg)) / cfg.name


def storage_path(cfg: TrainConfig) -> str:
    """Ray Train storage path (absolute local dir or a URI)."""
    if cfg.storage_path:
        return cfg.storage_path if "://" in cfg.storage_path else str(Path(cfg.storage_path).resolve())
    return str((Path(cfg.output_dir) / "ray").resolve())


def count_rows(shards: list[str]) -> int | None:
    """Rows over the shards from parquet metadata (None when not all are local parquet)."""
    try:
        import pyarrow.parquet as pq

        return sum(pq.ParquetFile(s).metadata.num_rows for s in shards)
    except Exception:
        return None


def data_config(cfg: TrainConfig, mcfg: PaLIConfig):
    """The Ray Data pipeline's settings for this run (each replica builds its stream from them)."""
    from pali.data.pipeline import DataConfig

    return DataConfig.for_model(mcfg, task_weights=cfg.task_weights or DataConfig().task_weights, seed=cfg.seed,
                                batch_size=cfg.micro_batch, stats_name=f"pali-data-stats-{cfg.name}")


def prepare(cfg: TrainConfig) -> tuple[Any, list[str], PaLIConfig]:
    """Tokenizer, training shard list and model config (generating the default data when absent)."""
    from pali.data.pipeline import list_shards, train_tokenizer_from_shards
    from pali.tokenizer import Tokenizer

    image_size = max(16, model_config(cfg).vision.image_size)  # drawn at the size the model reads
    for paths, seed, n in ((cfg.data, cfg.seed, 32768), (cfg.eval_data, cfg.seed + 1000, 256)):
        if paths == ["data/train"] or paths == ["data/val"]:
            _ensure_synthetic(paths[0], n, seed, image_size)
    shards = list_shards(cfg.data)
    if cfg.tokenizer:
        tok = Tokenizer.load(cfg.tokenizer)
    elif cfg.init_from:
        tok = Tokenizer.load(Path(cfg.init_from) / "tokenizer.model")
    else:
        vocab = get_preset(cfg.preset).with_overrides(**cfg.model_overrides).text.vocab_size
        tok_path = Path(cfg.output_dir) / "tokenizer.model"
        tok = Tokenizer.load(tok_path) if tok_path.is_file() else \
            train_tokenizer_from_shards(shards, vocab, out_path=tok_path, seed=cfg.seed)
    mcfg = model_config(cfg, tok.vocab_size)
    if tok.vocab_size > mcfg.text.vocab_size:
        raise ValueError(f"tokenizer has {tok.vocab_size} pieces but the model's vocabulary is "
                         f"{mcfg.text.vocab_size}; expected tokenizer vocab <= model vocab")
    return tok, shards, mcfg


# The quick start's corpus: six languages in five scripts (Latin, Cyrillic, Arabic, Devanagari, Han), so
# the tiny model sees enough of each language to ground its answers within a ~10 minute CPU run.
# `python -m jobs.make_shards` writes all ten languages.
QUICKSTART_LANGS = ("en", "fr", "ru", "ar", "hi", "zh")


def _ensure_synthetic(out_dir: str, n: int, seed: int, image_size: int) -> None:
    from pali.data.synthetic import write_synthetic_shards

    if Path(out_dir).is_dir() and any(Path(out_dir).glob("*.parquet")):
        return
    print(f"[pali] generating {n} synthetic {image_size} px examples in {', '.join(QUICKSTART_LANGS)} into "
          f"{out_dir} (seed {seed})")
    write_synthetic_shards(out_dir, num_examples=n, langs=QUICKSTART_LANGS, seed=seed, examples_per_shard=256,
                           image_size=image_size, num_workers=min(4, os.cpu_count() or 1))


def torch_backend(use_gpu: bool) -> str:
    """Process-group backend of the workers. On GPUs: nccl for CUDA tensors (gradients, activations, TP/PP
    traffic) and gloo for the CPU-side bookkeeping collectives (metric sums, the data position, the batch
    hand-off within a replica), which nccl alone rejects ("No backend type associated with device type
    cpu"; seen on an H200 before this was mixed)."""
    return "cpu:gloo,cuda:nccl" if use_gpu else "gloo"


def unmet_resources(cfg: TrainConfig, cluster: dict[str, float]) -> str | None:
    """Why a cluster whose resources cannot grow (a local Ray) can never start the smallest worker group
    of `cfg`, or None. Ray Train would otherwise wait for the resources forever."""
    need = cfg.worker_range()[0]
    per = {"CPU": cfg.cpus_per_worker, **cfg.worker_resources, **({"GPU": 1.0} if cfg.use_gpu else {})}
    for name, amount in per.items():
        have = float(cluster.get(name, 0.0))
        if need * amount > have + 1e-9:
            fits = int(have // amount) if amount else 0
            hint = {"GPU": f"pass --workers {fits} (a multiple of tp*pp = {cfg.tp * cfg.pp})" if fits else
                    "drop --use-gpu or run on a machine with GPUs",
                    "CPU": "lower --cpus-per-worker or raise --num-cpus"}.get(name, "fix --worker-resources")
            return (f"{need} workers x {amount:g} {name} need {need * amount:g} {name} but this Ray cluster has "
                    f"{have:g}; {hint}")
    return None


def fit(cfg: TrainConfig, threads_per_worker: int = 1):
    """Run (or resume) training on the current Ray cluster; returns (ray Result, model config, tokenizer)."""
    from ray.train import CheckpointConfig, FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchConfig, TorchTrainer

    from pali.train.loop import train_loop_per_worker

    cfg.validate()
    # Workers run in their own working directory: hand them absolute paths.
    cfg.output_dir = str(Path(cfg.output_dir).resolve())
    tok, shards, mcfg = prepare(cfg)
    init_state_path, vision_ref = None, None
    if cfg.init_from:
        init_state_path = init_state(cfg, mcfg)
        if cfg.vision_pretrain_steps:
            print(f"[pali] starting from {cfg.init_from}: its vision tower is used as is (no vision stage)")
    elif cfg.vision_pretrain_steps:
        import ray

        weights, mcfg = vision_stage(cfg, mcfg, shards, threads=threads_per_worker * (cfg.min_workers or cfg.workers))
        vision_ref = ray.put(weights) if weights is not None else None
    workers: int | tuple[int, int] = cfg.workers
    if cfg.elastic:
        workers = cfg.worker_range()
    resources = {"CPU": cfg.cpus_per_worker, **cfg.worker_resources}
    if cfg.use_gpu:
        resources["GPU"] = 1
    scaling = ScalingConfig(num_workers=workers, use_gpu=cfg.use_gpu, resources_per_worker=resources,
                            elastic_resize_monitor_interval_s=5.0)
    run = RunConfig(name=cfg.name, storage_path=storage_path(cfg),
                    failure_config=FailureConfig(max_failures=cfg.max_failures),
                    checkpoint_config=CheckpointConfig(num_to_keep=cfg.keep_checkpoints),
                    worker_runtime_env={"env_vars": {"OMP_NUM_THREADS": str(threads_per_worker)}})
    loop_config = {"train": cfg.to_dict(), "model": mcfg.to_dict(), "tokenizer_bytes": tok.model_proto,
                   "init_state_path": init_state_path, "vision_weights": vision_ref,
                   "threads_per_worker": threads_per_worker, "shards": shards, "rows": count_rows(shards),
                   "data_config": data_config(cfg, mcfg), "run_dir": str(run_dir(cfg))}
    trainer = TorchTrainer(train_loop_per_worker, train_loop_config=loop_config,
                           torch_config=TorchConfig(backend=torch_backend(cfg.use_gpu)),
                           scaling_config=scaling, run_config=run)
    result = trainer.fit()
    return result, mcfg, tok


def vision_stage(cfg: TrainConfig, mcfg: PaLIConfig, shards: list[str], threads: int = 1
                 ) -> tuple[bytes | None, PaLIConfig]:
    """Run (or reuse) the vision tower's classification pretraining; returns (the tower's weights as
    safetensors bytes, or None when the shards carry no labels; the model config of the main phase).

    The stage runs as one Ray task with a training worker's resources. Its result is kept in
    `<output_dir>/vision/` with a fingerprint of what it depends on, so a rerun or a resumed run reuses it
    (and makes the same freezing decision) instead of training the tower again. With weights, the main
    phase freezes the tower unless `freeze_vision` was given either way.
    """
    import ray

    from pali.data.pipeline import list_shards
    from pali.train.vision import VisionStageConfig

    scfg = VisionStageConfig(steps=cfg.vision_pretrain_steps, seed=cfg.seed)
    try:
        eval_shards = list_shards(cfg.eval_data)
    except (FileNotFoundError, ValueError):
        eval_shards = []
    fingerprint = scfg.fingerprint(mcfg, shards)
    out = Path(cfg.output_dir) / "vision"
    weights_path, report_path = out / "tower.safetensors", out / "report.json"
    report = json.loads(report_path.read_text()) if report_path.is_file() else {}
    weights: bytes | None = None
    if report.get("fingerprint") == fingerprint and (report.get("skipped") or weights_path.is_file()):
        weights = None if report.get("skipped") else weights_path.read_bytes()
        print(f"[pali] vision stage: reusing {out} (same shards, geometry and settings)")
    else:
        print(f"[pali] vision stage: pretraining the tower on the shards' image labels for {scfg.steps} steps")
        resources = {"num_cpus": cfg.cpus_per_worker, "num_gpus": 1 if cfg.use_gpu else 0}
        task = ray.remote(**resources)(_vision_task)
        state_bytes, report = ray.get(task.remote(mcfg, shards, eval_shards, scfg, cfg.use_gpu, threads))
        report["fingerprint"] = fingerprint
        out.mkdir(parents=True, exist_ok=True)
        if state_bytes is not None:  # weights first, then the report that vouches for them
            _write_atomic(weights_path, state_bytes)
            weights = state_bytes
        _write_atomic(report_path, json.dumps(report, indent=2).encode())
    if weights is None:
        print(f"[pali] vision stage skipped: {report.get('skipped')}; the tower trains in the main phase")
        return None, mcfg
    held = report.get("heldout_exact_set")
    acc = ", ".join(f"{k} {v:.0%}" for k, v in held.items()) if held else "no labelled held-out shards"
    print(f"[pali] vision stage: {report['train_images']} images, {report['labels']} labels, "
          f"{report['seconds']:.0f} s; held-out exact label sets: {acc}")
    if "freeze_vision" not in cfg.model_overrides:
        mcfg = mcfg.with_overrides(freeze_vision=True)
    state = ("frozen (PaLI's recipe; --no-freeze-vision trains it)" if mcfg.freeze_vision
             else f"trained at {cfg.vision_lr_mult:g}x lr")
    print(f"[pali] main phase: vision tower {state}")
    return weights, mcfg


def _write_atomic(path: Path, data: bytes) -> None:
    """Write `data` to a temporary sibling and rename it into place: a reader never sees half a file."""
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_bytes(data)
    os.replace(tmp, path)


def _vision_task(mcfg, shards, eval_shards, scfg, use_gpu: bool, threads: int):
    """Ray task body of `vision_stage`: (safetensors bytes or None, report)."""
    from safetensors.torch import save

    from pali.train.vision import pretrain_vision

    threads = max(1, min(threads, os.cpu_count() or 1))
    state, report = pretrain_vision(mcfg, shards, eval_shards, scfg, device="cuda" if use_gpu else "cpu",
                                    threads=threads)
    return (save(state) if state is not None else None), report


def init_state(cfg: TrainConfig, mcfg: PaLIConfig) -> str:
    """Weights file the workers start from when `init_from` is set (no training checkpoint yet).

    A run at another resolution than the init checkpoint (PaLI's high-res phase) gets the position
    embeddings interpolated here, once, so every worker slices the same tensors.
    """
    from safetensors.torch import save_file

    from pali.serving_checkpoint import load_pretrained

    src = Path(cfg.init_from).resolve() / "model.safetensors"
    model, _ = load_pretrained(cfg.init_from)
    if model.cfg.vision.image_size == mcfg.vision.image_size:
        return str(src)
    old = model.cfg.vision.image_size
    model.set_image_size(mcfg.vision.image_size)
    out = Path(cfg.output_dir) / f"init-{mcfg.vision.image_size}px.safetensors"
    out.parent.mkdir(parents=True, exist_ok=True)
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(out))
    print(f"[pali] position embeddings interpolated {old} px -> {mcfg.vision.image_size} px")
    return str(out)


def consolidate(ckpt_dir: str | os.PathLike, out_dir: str | os.PathLike, tokenizer=None) -> Path:
    """Merge a sharded training checkpoint into a serving checkpoint (config.json, model.safetensors,
    tokenizer.model), written atomically."""
    from pali.factory import create_model
    from pali.serving_checkpoint import load_state, save_pretrained
    from pali.tokenizer import Tokenizer
    from pali.train.sharded_checkpoint import load_full

    full = load_full(ckpt_dir, with_optimizer=False)
    mcfg = PaLIConfig.from_dict(full["meta"]["model"])
    model = create_model(mcfg, device="meta")
    load_state(model, full["model"], source=str(ckpt_dir))
    if tokenizer is None:
        tokenizer = Tokenizer.load(Path(ckpt_dir) / "tokenizer.model")
    extra = {"training": {"step": full["meta"]["step"], "layout": full["meta"]["layout"]}}
    return save_pretrained(model, tokenizer, out_dir, extra=extra)


def write_summary(path: str | os.PathLike, summary: dict) -> None:
    """JSON summary of a finished run."""
    Path(path).write_text(json.dumps(summary, indent=2, default=str))
