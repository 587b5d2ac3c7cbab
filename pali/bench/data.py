"""Suite `data`: Ray Data pipeline throughput against what one training worker consumes, and the
fraction of step time a worker waits for data when both run at once.

Reuses the data engineer's `pali/bench/data_pipeline.py` for the pipeline pass (consumer and producer
side) and the tiny-preset consumption rate; adds the wait fraction of a real training loop fed by the
pipeline (time blocked in `next(batch)` / total step time, first batch excluded as start-up).
"""

from __future__ import annotations

import tempfile
import time
from dataclasses import dataclass

import torch

import pali
from pali.bench.common import median
from pali.config import get_preset


@dataclass
class DataBenchConfig:
    """Sizes of the data-pipeline benchmark."""

    preset: str = "tiny"
    """Model whose image size, text lengths and training step are used."""
    examples: int = 768
    """Synthetic examples written for the run."""
    batch_size: int = 32
    """Examples per training batch."""
    repeats: int = 3
    """Pipeline passes and fed-training runs (median reported)."""
    train_steps: int = 10
    """Steps of the consumption-rate measurement and of each fed-training run."""
    num_cpus: int = 8
    """Logical CPUs of the local Ray instance (oversubscribed on purpose, see docs/design.md)."""


def _fed_training(model, opt, cfg, tok, shards, batch_size: int, steps: int) -> dict[str, float]:
    """Train `steps` steps on batches pulled from a fresh pipeline; seconds waiting vs computing."""
    from pali.bench.train import trainer_step_loss
    from pali.data.pipeline import build_dataset, iter_batches

    loss_fn = trainer_step_loss(model)[0]  # the trainer's step: padding cut, output head at real targets
    ds = build_dataset(cfg, tok, shards=shards)
    it = iter(iter_batches(ds, batch_size))
    wait = compute = 0.0
    n = 0
    t = time.perf_counter()
    next(it)  # start-up: Ray Data plans and launches its tasks
    first = time.perf_counter() - t
    for _ in range(steps):
        t0 = time.perf_counter()
        try:
            batch = next(it)
        except StopIteration:
            break
        t1 = time.perf_counter()
        loss_fn(batch).backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        wait += t1 - t0
        compute += time.perf_counter() - t1
        n += 1
    del it, ds
    if n == 0:
        raise RuntimeError(f"the pipeline produced no full batch of {batch_size}; write more examples")
    return {"wait_frac": wait / (wait + compute), "wait_s": wait, "compute_s": compute, "steps": n,
            "first_batch_s": first, "fed_examples_per_s": n * batch_size / (wait + compute)}


def run_data(cfg: DataBenchConfig) -> dict:
    """Pipeline examples/s and images/s (median of `repeats` passes), the training worker's consumption
    rate, their ratio, and the wait fraction of pipeline-fed training."""
    import ray

    from pali.bench.data_pipeline import measure_pipeline, measure_training
    from pali.data.pipeline import DataConfig, train_tokenizer_from_shards
    from pali.data.synthetic import write_synthetic_shards
    model_cfg = get_preset(cfg.preset)
    with tempfile.TemporaryDirectory() as tmp:
        shards = write_synthetic_shards(tmp, cfg.examples, num_workers=1, examples_per_shard=128,
                                        image_size=model_cfg.vision.image_size)
        tok = train_tokenizer_from_shards(shards, model_cfg.text.vocab_size)
        dcfg = DataConfig.for_model(model_cfg, batch_size=cfg.batch_size)
        started = not ray.is_initialized()
        if started:
            from cluster.auth import use_in_this_process

            use_in_this_process()
            ray.init(num_cpus=cfg.num_cpus, include_dashboard=False, log_to_driver=False,
                     runtime_env={"env_vars": {"OMP_NUM_THREADS": "1"}})
        try:
            passes = [measure_pipeline(dcfg, tok, shards) for _ in range(cfg.repeats)]
            consume = measure_training(dcfg, tok, shards, cfg.train_steps)
            model = pali.create_model(model_cfg.with_overrides(text__vocab_size=tok.vocab_size), seed=0).train()
            opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
            fed = [_fed_training(model, opt, dcfg, tok, shards, cfg.batch_size, cfg.train_steps)
                   for _ in range(cfg.repeats)]
        finally:
            if started:
                ray.shutdown()
    pipe = {k: median([p[k] for p in passes]) for k in passes[0]}
    out = {"preset": cfg.preset, "examples": cfg.examples, "batch_size": cfg.batch_size,
           "image_size": dcfg.image_size, "pipeline_examples_per_s": pipe["examples_per_s"],
           "pipeline_images_per_s": pipe["images_per_s"], "pipeline_first_batch_s": pipe["first_batch_s"],
           "producer_examples_per_s": pipe["producer_examples_per_s"],
           "producer_images_per_s": pipe["producer_images_per_s"],
           "consumption_examples_per_s": consume,
           "ratio": pipe["examples_per_s"] / consume if consume else None,
           "wait_frac": median([f["wait_frac"] for f in fed]),
           "fed_examples_per_s": median([f["fed_examples_per_s"] for f in fed]),
           "fed_first_batch_s": median([f["first_batch_s"] for f in fed]),
           "passes": passes, "fed_runs": fed}
    return out
