"""Suite `data`: the trainer's per-replica data streams against what its training steps consume, and the
fraction of step time the workers wait for data when both run at once.

The trainer gives each data-parallel replica its own deterministic share of the shards through its own
Ray Data stream (`pali.train.data_order`); this suite measures those streams, not one shared pipeline.
Reuses `pali/bench/data_pipeline.py` for the streams' throughput (all replicas together, consumer and
producer side) and the consumption rate of the replicas' training steps run alone; adds the consumption
rate and wait fraction of a real data-parallel training group fed by the streams: one Ray task per
replica (a training worker's resources) reads its replica's stream, runs the trainer's step and
all-reduces the gradients over gloo as DDP does; the wait is the time blocked in `next(batch)` / total
step time, first batch excluded as start-up.
"""

from __future__ import annotations

import socket
import tempfile
import time
from dataclasses import dataclass

from pali.bench.common import median


@dataclass
class DataBenchConfig:
    """Sizes of the data-pipeline benchmark."""

    preset: str = "tiny"
    """Model whose image size, text lengths and training step are used."""
    examples: int = 768
    """Synthetic examples written for the run."""
    batch_size: int = 32
    """Examples per training step over all replicas (the global batch)."""
    replicas: int = 2
    """Data-parallel replicas, each reading its own stream (the quick start's 2 workers)."""
    repeats: int = 3
    """Stream passes and fed-training runs (median reported)."""
    train_steps: int = 10
    """Steps of the consumption-rate measurement and of each fed-training run."""
    num_cpus: int = 8
    """Logical CPUs of the local Ray instance (oversubscribed on purpose, see docs/design.md)."""
    freeze_vision: bool = True
    """Time the main phase's step, with the vision stage's tower frozen (the default recipe)."""


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _replica_worker(mcfg, dcfg, tok, shards: list[str], replicas: int, replica: int, per_rank: int, steps: int,
                    freeze_vision: bool, port: int) -> dict[str, float]:
    """One training worker: its replica's stream, the trainer's step, gradients all-reduced over gloo."""
    import datetime

    import torch
    import torch.distributed as dist

    from pali.bench.data_pipeline import close_streams, replica_streams, step_fn

    def all_reduce(params) -> None:  # DDP's gradient average, in one bucket (the tiny model's ~5 MB fits DDP's 25)
        grads = [p.grad for p in params if p.grad is not None]
        flat = torch.cat([g.reshape(-1) for g in grads]).div_(replicas)
        dist.all_reduce(flat)
        for g, new in zip(grads, torch.split(flat, [g.numel() for g in grads]), strict=True):
            g.copy_(new.view_as(g))

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=replica, world_size=replicas,
                            timeout=datetime.timedelta(seconds=300))
    try:
        step = step_fn(mcfg, freeze_vision, reduce_grads=all_reduce)
        stream = replica_streams(dcfg, tok, shards, replicas, per_rank, (steps + 1) * per_rank, only=replica)[0]
        t = time.perf_counter()
        step(stream.next())  # start-up: Ray Data plans and launches its tasks; the first step warms up
        first = time.perf_counter() - t
        wait = compute = 0.0
        for _ in range(steps):
            t0 = time.perf_counter()
            batch = stream.next()
            t1 = time.perf_counter()
            step(batch)
            wait += t1 - t0
            compute += time.perf_counter() - t1
        close_streams([stream])
    finally:
        dist.destroy_process_group()
    return {"wait_frac": wait / (wait + compute), "wait_s": wait, "compute_s": compute, "steps": steps,
            "first_batch_s": first}


def _fed_training(mcfg, dcfg, tok, shards: list[str], cfg: DataBenchConfig) -> dict[str, float]:
    """A data-parallel group of `cfg.replicas` Ray tasks trained from their streams; the slowest replica's
    wait (the group steps in lockstep) and the group's examples/s."""
    import ray

    worker = ray.remote(num_cpus=1)(_replica_worker)
    per_rank, port = cfg.batch_size // cfg.replicas, _free_port()
    runs = ray.get([worker.remote(mcfg, dcfg, tok, shards, cfg.replicas, d, per_rank, cfg.train_steps,
                                  cfg.freeze_vision, port) for d in range(cfg.replicas)])
    worst = max(runs, key=lambda r: r["wait_frac"])
    total = max(r["wait_s"] + r["compute_s"] for r in runs)
    return {**worst, "fed_examples_per_s": cfg.train_steps * cfg.batch_size / total,
            "group_consumption_examples_per_s": cfg.train_steps * cfg.batch_size / max(r["compute_s"] for r in runs),
            "replica_wait_fracs": [r["wait_frac"] for r in runs]}


def run_data(cfg: DataBenchConfig) -> dict:
    """The replicas' streams' examples/s and images/s (median of `repeats` passes), two consumption rates
    and the streams' ratio to each, and the wait fraction of a training group fed by the streams.

    `consumption_examples_per_s` (`ratio`): replicas x one process's step alone, the demand of a group whose
    workers each have a core and no all-reduce cost; `group_consumption_examples_per_s` (`ratio_to_group`):
    what the fed group's steps consumed (compute time, all-reduce included, beside the streams' tasks).
    """
    import ray

    from pali.bench.data_pipeline import measure_streams, measure_training, trainer_data_config
    from pali.data.pipeline import train_tokenizer_from_shards
    from pali.data.synthetic import write_synthetic_shards

    if cfg.batch_size % cfg.replicas:
        raise ValueError(f"batch_size {cfg.batch_size} does not split over {cfg.replicas} replicas; expected a "
                         "multiple of replicas")
    per_rank = cfg.batch_size // cfg.replicas
    model_cfg, dcfg = trainer_data_config(cfg.preset, cfg.batch_size, cfg.replicas)
    with tempfile.TemporaryDirectory() as tmp:
        shards = write_synthetic_shards(tmp, cfg.examples, num_workers=1, examples_per_shard=128,
                                        image_size=model_cfg.vision.image_size)
        tok = train_tokenizer_from_shards(shards, model_cfg.text.vocab_size)
        model_cfg = model_cfg.with_overrides(text__vocab_size=max(model_cfg.text.vocab_size, tok.vocab_size))
        started = not ray.is_initialized()
        if started:
            from cluster.auth import use_in_this_process

            use_in_this_process()
            ray.init(address="local", num_cpus=cfg.num_cpus, include_dashboard=False, log_to_driver=False,
                     runtime_env={"env_vars": {"OMP_NUM_THREADS": "1"}})
        try:
            batches = max(1, cfg.examples // cfg.batch_size - 1)  # about one epoch per replica
            measure_streams(dcfg, tok, shards, cfg.replicas, per_rank, 1)  # untimed: starts Ray's worker processes
            passes = [measure_streams(dcfg, tok, shards, cfg.replicas, per_rank, batches) for _ in range(cfg.repeats)]
            consume = measure_training(model_cfg, dcfg, tok, shards, cfg.replicas, per_rank, cfg.train_steps,
                                       cfg.freeze_vision)
            fed = [_fed_training(model_cfg, dcfg, tok, shards, cfg) for _ in range(cfg.repeats)]
        finally:
            if started:
                ray.shutdown()
    pipe = {k: median([p[k] for p in passes]) for k in passes[0]}
    group = median([f["group_consumption_examples_per_s"] for f in fed])
    return {"preset": cfg.preset, "examples": cfg.examples, "batch_size": cfg.batch_size, "replicas": cfg.replicas,
            "per_rank": per_rank, "image_size": dcfg.image_size, "freeze_vision": cfg.freeze_vision,
            "pipeline_examples_per_s": pipe["examples_per_s"], "pipeline_images_per_s": pipe["images_per_s"],
            "pipeline_first_batch_s": pipe["first_batch_s"],
            "producer_examples_per_s": pipe["producer_examples_per_s"],
            "producer_images_per_s": pipe["producer_images_per_s"],
            "consumption_examples_per_s": consume,
            "ratio": pipe["examples_per_s"] / consume if consume else None,
            "group_consumption_examples_per_s": group,
            "ratio_to_group": pipe["examples_per_s"] / group,
            "wait_frac": median([f["wait_frac"] for f in fed]),
            "fed_examples_per_s": median([f["fed_examples_per_s"] for f in fed]),
            "fed_first_batch_s": median([f["first_batch_s"] for f in fed]),
            "passes": passes, "fed_runs": fed}
