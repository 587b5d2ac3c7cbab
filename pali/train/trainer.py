"""Driver side of pretraining: `fit` runs (or resumes) the Ray Train `TorchTrainer` of a run.

Around it: `prepare` (data, tokenizer, model config), `vision_stage`, `resources` (backend, resource
checks) and `consolidation` (init weights, the serving checkpoint), one module each.

The driver hands the workers the shard list and the pipeline's settings; each data-parallel replica
reads its own deterministic share of the shards, resuming from the data state of the checkpoint it
restarts from (`pali.train.data_order`: no example repeated or skipped across restarts and resizes).
"""

from __future__ import annotations

import os
from pathlib import Path

import pyarrow.fs as pafs

from pali import storage
from pali.train.config import TrainConfig
from pali.train.consolidation import init_state
from pali.train.prepare import count_rows, data_config, prepare
from pali.train.resources import torch_backend
from pali.train.vision_stage import vision_stage


def run_dir(cfg: TrainConfig) -> Path | str:
    """Where Ray Train keeps this run's checkpoints (a URI when they are on object storage)."""
    base = storage_path(cfg)
    return storage.join(base, cfg.name) if storage.is_uri(base) else Path(base) / cfg.name


def storage_path(cfg: TrainConfig) -> str:
    """Ray Train storage path (absolute local dir or a URI); default `<output_dir>/ray`."""
    if cfg.storage_path:
        return cfg.storage_path if storage.is_uri(cfg.storage_path) else str(Path(cfg.storage_path).resolve())
    if storage.is_uri(cfg.output_dir):
        return storage.join(cfg.output_dir, "ray")
    return str((Path(cfg.output_dir) / "ray").resolve())


DRIVER_FILES = ("tokenizer.model", "vision")
"""What the driver keeps in the output dir between reruns (mirrored locally when it is on object storage)."""


def pull_driver_files(cfg: TrainConfig) -> None:
    """Copy the driver's files of an earlier attempt from an object-storage output into the local mirror."""
    if not storage.is_uri(cfg.output_dir):
        return
    local = cfg.local_output_dir()
    local.mkdir(parents=True, exist_ok=True)
    for name in DRIVER_FILES:
        src = storage.join(cfg.output_dir, name)
        fs, p = storage.filesystem_for(src)
        info = fs.get_file_info(p)
        if info.type == pafs.FileType.File:
            (local / name).write_bytes(storage.read_bytes(src))
        elif info.type == pafs.FileType.Directory:
            storage.download_dir(src, local / name)


def push_driver_files(cfg: TrainConfig) -> None:
    """Copy the driver's files to an object-storage output (a no-op for local outputs)."""
    if not storage.is_uri(cfg.output_dir):
        return
    for name in DRIVER_FILES:
        storage.upload(cfg.local_output_dir() / name, storage.join(cfg.output_dir, name))


def worker_env(threads_per_worker: int) -> dict[str, str]:
    """Environment of the training workers: thread count, object-storage settings and `PALI_*` variables
    (step hooks, cache dir) of the driver's environment."""
    env = {k: v for k, v in os.environ.items() if k.startswith("PALI_")}
    return {**env, **storage.storage_env(), "OMP_NUM_THREADS": str(threads_per_worker)}


def fit(cfg: TrainConfig, threads_per_worker: int = 1):
    """Run (or resume) training on the current Ray cluster; returns (ray Result, model config, tokenizer)."""
    from ray.train import CheckpointConfig, FailureConfig, LoggingConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchConfig, TorchTrainer

    from pali.train.loop import train_loop_per_worker

    cfg.validate()
    # Workers run in their own working directory: hand them absolute paths.
    if not storage.is_uri(cfg.output_dir):
        cfg.output_dir = str(Path(cfg.output_dir).resolve())
    pull_driver_files(cfg)
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
    push_driver_files(cfg)
    workers: int | tuple[int, int] = cfg.workers
    if cfg.elastic:
        workers = cfg.worker_range()
    resources = {"CPU": cfg.cpus_per_worker, **cfg.worker_resources}
    if cfg.use_gpu:
        resources["GPU"] = 1
    scaling = ScalingConfig(num_workers=workers, use_gpu=cfg.use_gpu, resources_per_worker=resources,
                            elastic_resize_monitor_interval_s=5.0)
    # A URI's filesystem is built here, from this process's settings (AWS_ENDPOINT_URL, ...), and handed to
    # Ray Train, so its controller and workers reach the same storage however their environment looks.
    where = storage_path(cfg)
    fs_kw = {}
    if storage.is_uri(where):
        fs, where = storage.filesystem_for(where)
        fs_kw["storage_filesystem"] = fs
    run = RunConfig(name=cfg.name, storage_path=where, **fs_kw,
                    failure_config=FailureConfig(max_failures=cfg.max_failures),
                    checkpoint_config=CheckpointConfig(num_to_keep=cfg.keep_checkpoints),
                    # Ray Train's per-report INFO lines stay in its log files; the console shows the run's own.
                    logging_config=LoggingConfig(log_level="WARNING"),
                    worker_runtime_env={"env_vars": worker_env(threads_per_worker)})
    loop_config = {"train": cfg.to_dict(), "model": mcfg.to_dict(), "tokenizer_bytes": tok.model_proto,
                   "init_state_path": init_state_path, "vision_weights": vision_ref,
                   "threads_per_worker": threads_per_worker, "shards": shards, "rows": count_rows(shards),
                   "data_config": data_config(cfg, mcfg), "run_dir": str(run_dir(cfg))}
    trainer = TorchTrainer(train_loop_per_worker, train_loop_config=loop_config,
                           torch_config=TorchConfig(backend=torch_backend(cfg.use_gpu)),
                           scaling_config=scaling, run_config=run)
    result = trainer.fit()
    return result, mcfg, tok


