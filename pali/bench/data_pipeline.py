"""Data pipeline throughput against a tiny-preset training worker's consumption rate.

    python -m pali.bench.data_pipeline                       # 2000 synthetic examples, 3 repeats
    python -m pali.bench.data_pipeline --data data/train --repeats 5 --batch-size 32

Prints a markdown table (median over repeats) of pipeline images/s and examples/s, measured at the
consumer (end to end, Ray start-up excluded) and at the producer (`DataStats`), next to the examples/s a
tiny-preset training step consumes on this machine, plus hardware, commit and date.
"""

from __future__ import annotations

import argparse
import datetime
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time

from pali.config import get_preset
from pali.data.pipeline import (
    DataConfig,
    build_dataset,
    iter_batches,
    list_shards,
    train_tokenizer_from_shards,
)
from pali.data.synthetic import write_synthetic_shards


def _commit() -> str:
    try:
        return subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                              cwd=os.path.dirname(os.path.abspath(__file__)), check=True).stdout.strip()
    except Exception:
        return "unknown"


def measure_pipeline(cfg: DataConfig, tok, shards: list[str]) -> dict[str, float]:
    """One full pass: consumer-side rates (first-batch latency included), first-batch latency and the
    producer-side rates of `DataStats` (first to last produced batch)."""
    ds = build_dataset(cfg, tok, shards=shards)
    n = images = 0
    t0 = time.perf_counter()
    first = None
    for b in iter_batches(ds, cfg.batch_size, drop_last=False):
        first = first if first is not None else time.perf_counter() - t0
        n += len(b["id"])
        images += int(b["image_mask"].sum())
    dt = time.perf_counter() - t0
    stats = ds.pali_stats.get()
    return {"examples_per_s": n / dt, "images_per_s": images / dt, "first_batch_s": first or 0.0,
            "producer_examples_per_s": stats["examples_per_s"], "producer_images_per_s": stats["images_per_s"]}


def measure_training(cfg: DataConfig, tok, shards: list[str], steps: int) -> float | None:
    """Examples/s of a tiny-preset forward+backward+AdamW step on one process, run as a trainer worker runs
    it (all-padding tail columns cut, output head at real targets; None if no model yet)."""
    try:
        import torch

        import pali
        from pali.bench.train import trainer_step_loss

        model = pali.create_model("tiny")
    except Exception as e:  # the model package may not exist yet in a partial checkout
        print(f"(training consumption skipped: {e})", file=sys.stderr)
        return None
    ds = build_dataset(cfg, tok, shards=shards)
    batch = next(iter_batches(ds, cfg.batch_size))
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    loss_fn = trainer_step_loss(model)[0]
    times = []
    for _ in range(steps + 2):
        t = time.perf_counter()
        loss_fn(batch).backward()
        opt.step()
        opt.zero_grad()
        times.append(time.perf_counter() - t)
    return cfg.batch_size / statistics.median(times[2:])


def main(argv: list[str] | None = None) -> None:
    """Run the benchmark and print the table."""
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--data", help="shard directory (default: generate --examples synthetic examples)")
    p.add_argument("--examples", type=int, default=2000)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--num-cpus", type=int, default=8, help="logical CPUs of the local Ray instance")
    p.add_argument("--train-steps", type=int, default=10)
    args = p.parse_args(argv)

    import ray
    import torch

    torch.set_num_threads(1)
    model_cfg = get_preset("tiny")
    with tempfile.TemporaryDirectory() as tmp:
        shards = list_shards(args.data) if args.data else write_synthetic_shards(tmp, args.examples, num_workers=2)
        tok = train_tokenizer_from_shards(shards, model_cfg.text.vocab_size)
        cfg = DataConfig.for_model(model_cfg, batch_size=args.batch_size)
        from cluster.auth import use_in_this_process

        use_in_this_process()
        ray.init(num_cpus=args.num_cpus, include_dashboard=False, log_to_driver=False,
                 runtime_env={"env_vars": {"OMP_NUM_THREADS": "1"}})
        runs = [measure_pipeline(cfg, tok, shards) for _ in range(args.repeats)]
        train = measure_training(cfg, tok, shards, args.train_steps)
        ray.shutdown()
    med = {k: statistics.median(r[k] for r in runs) for k in runs[0]}
    print(f"# data pipeline benchmark ({datetime.datetime.now(datetime.UTC).isoformat(timespec='seconds')})")
    print(f"hardware: {platform.machine()} {platform.processor() or ''} {os.cpu_count()} cores; "
          f"python {platform.python_version()}; ray {ray.__version__}; commit {_commit()}")
    print(f"data: {len(shards)} shards; image {cfg.image_size}px; batch {cfg.batch_size}; "
          f"{args.repeats} repeats (median); Ray num_cpus={args.num_cpus}\n")
    print("| measure | examples/s | images/s |")
    print("|---|---|---|")
    print(f"| pipeline, consumer side (incl. {med['first_batch_s']:.1f} s to first batch) | "
          f"{med['examples_per_s']:.0f} | {med['images_per_s']:.0f} |")
    print(f"| pipeline, producer side (DataStats) | {med['producer_examples_per_s']:.0f} | "
          f"{med['producer_images_per_s']:.0f} |")
    if train is not None:
        print(f"| tiny preset training step (1 process, 1 thread) | {train:.0f} | - |")
        verdict = "keeps up" if med["examples_per_s"] >= train else "is the bottleneck"
        print(f"\npipeline {verdict}: {med['examples_per_s'] / train:.1f}x the consumption rate")


if __name__ == "__main__":
    main()
