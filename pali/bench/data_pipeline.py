"""The trainer's data streams against what its training step consumes.

    python -m pali.bench.data_pipeline                       # 2000 synthetic examples, 2 replicas, 3 repeats
    python -m pali.bench.data_pipeline --data data/train --replicas 2 --repeats 5 --batch-size 32

The trainer does not read one shared stream: each data-parallel replica reads its own deterministic share
of the shards through its own Ray Data stream (`pali.train.data_order.ReplicaStream` over
`pali.train.loop.shard_reader`, as `build_feeder` builds them). This benchmark builds the same streams, with
the default recipe's data settings (`pali.train.prepare.data_config`: task mixture, prompts, padding), and
prints a markdown table (median over repeats) of the examples/s and images/s all replicas' streams deliver
together, measured at the consumer (first-batch latency included, Ray start-up excluded) and at the
producer (`DataStats`), next to the examples/s the replicas' training steps consume, plus hardware,
commit and date.
"""

from __future__ import annotations

import argparse
import dataclasses
import statistics
import tempfile
import time
import uuid
from typing import Any


def trainer_data_config(preset: str, global_batch: int, replicas: int):
    """(model config, the trainer's `DataConfig`) of the default recipe at this preset, global batch and dp."""
    from pali.train.config import TrainConfig
    from pali.train.prepare import data_config, model_config

    cfg = TrainConfig(preset=preset, global_batch=global_batch, micro_batch=max(1, global_batch // replicas),
                      workers=replicas)
    cfg.validate()
    mcfg = model_config(cfg)
    return mcfg, data_config(cfg, mcfg)


def replica_streams(dcfg, tok, shards: list[str], replicas: int, per_rank: int, examples_per_replica: int,
                    seed: int = 0, only: int | None = None) -> list:
    """The trainer's per-replica streams at the start of a run (`ReplicaStream`, one Ray Data stream per
    replica reading its dealt shards in order), sized for `examples_per_replica` as the trainer sizes them;
    `only` builds that replica's alone."""
    from pali.data.prompts import TASKS
    from pali.train.data_order import DataState, ReplicaStream, plan_chunk
    from pali.train.loop import shard_reader
    from pali.train.prepare import count_rows

    read = shard_reader(dcfg, tok, per_rank, TASKS)
    chunk = plan_chunk(examples_per_replica, count_rows(shards), len(shards))
    which = range(replicas) if only is None else [only]
    return [ReplicaStream(DataState(), replicas, d, shards, seed, per_rank, read, chunk=chunk) for d in which]


def close_streams(streams: list) -> None:
    """Stop the streams' Ray Data iterators now (a stream and its reader form a cycle that only the garbage
    collector would break, possibly after Ray has shut down)."""
    for s in streams:
        s._rows.close()


def measure_streams(dcfg, tok, shards: list[str], replicas: int, per_rank: int, batches: int) -> dict[str, float]:
    """One pass of `batches` batches from every replica's stream, taken in turn as the replicas' steps take
    them: consumer-side rates over all replicas (first-batch latency included), the first-batch latency
    and the producer-side rates of `DataStats` (first to last produced batch, all replicas' pipelines)."""
    from pali.data.pipeline import DataStats

    dcfg = dataclasses.replace(dcfg, stats_name=f"pali-bench-data-{uuid.uuid4().hex[:8]}")
    streams = replica_streams(dcfg, tok, shards, replicas, per_rank, batches * per_rank)
    n = images = 0
    t0 = time.perf_counter()
    first = None
    for _ in range(batches):
        for s in streams:
            b = s.next()
            first = first if first is not None else time.perf_counter() - t0
            n += len(b["input_ids"])
            images += int(b["image_mask"].sum())
    dt = time.perf_counter() - t0
    close_streams(streams)
    stats = DataStats(dcfg.stats_name).get()
    return {"examples_per_s": n / dt, "images_per_s": images / dt, "first_batch_s": first or 0.0,
            "producer_examples_per_s": stats["examples_per_s"], "producer_images_per_s": stats["images_per_s"]}


def step_fn(mcfg, freeze_vision: bool = True, seed: int = 0, reduce_grads=None):
    """A function batch -> None running one trainer step on it: the trainer's loss at pp = 1 with
    all-padding tail columns cut and the head at real targets, backward, `reduce_grads(params)` (a data-
    parallel worker's all-reduce; None: one process), AdamW step."""
    import torch

    import pali
    from pali.bench.train import trainer_step_loss

    model = pali.create_model(mcfg, seed=seed).train()
    if freeze_vision:  # the default recipe's main phase: the vision stage's tower stays frozen
        model.freeze_vision()
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-4)
    loss_fn = trainer_step_loss(model)[0]

    def step(batch: dict[str, Any]) -> None:
        loss_fn(batch).backward()
        if reduce_grads is not None:
            reduce_grads(params)
        opt.step()
        opt.zero_grad(set_to_none=True)

    return step


def measure_training(mcfg, dcfg, tok, shards: list[str], replicas: int, per_rank: int, steps: int,
                     freeze_vision: bool = True) -> float:
    """Examples/s the replicas' training steps consume: `replicas` x `per_rank` / the median time of the
    trainer's step on one replica's batch (one process, as each worker runs it on its own core)."""
    stream = replica_streams(dcfg, tok, shards, replicas, per_rank, per_rank, only=0)[0]
    batch = stream.next()
    close_streams([stream])
    step = step_fn(mcfg, freeze_vision)
    times = []
    for _ in range(steps + 2):
        t = time.perf_counter()
        step(batch)
        times.append(time.perf_counter() - t)
    return replicas * per_rank / statistics.median(times[2:])


def main(argv: list[str] | None = None) -> None:
    """Run the benchmark and print the table."""
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--data", help="shard directory (default: generate --examples synthetic examples)")
    p.add_argument("--examples", type=int, default=2000)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--batch-size", type=int, default=32, help="global batch (examples per step over all replicas)")
    p.add_argument("--replicas", type=int, default=2, help="data-parallel replicas, each with its own stream")
    p.add_argument("--num-cpus", type=int, default=8, help="logical CPUs of the local Ray instance")
    p.add_argument("--train-steps", type=int, default=10)
    args = p.parse_args(argv)
    if args.batch_size % args.replicas:
        p.error(f"--batch-size {args.batch_size} does not split over --replicas {args.replicas}")

    import ray
    import torch

    from pali.bench.common import environment
    from pali.data.pipeline import list_shards, train_tokenizer_from_shards
    from pali.data.synthetic import write_synthetic_shards

    torch.set_num_threads(1)
    env = environment(1)  # load average at start
    per_rank = args.batch_size // args.replicas
    with tempfile.TemporaryDirectory() as tmp:
        mcfg, dcfg = trainer_data_config("tiny", args.batch_size, args.replicas)
        shards = list_shards(args.data) if args.data else write_synthetic_shards(
            tmp, args.examples, num_workers=2, examples_per_shard=128, image_size=mcfg.vision.image_size)
        tok = train_tokenizer_from_shards(shards, mcfg.text.vocab_size)
        mcfg = mcfg.with_overrides(text__vocab_size=max(mcfg.text.vocab_size, tok.vocab_size))
        from cluster.auth import use_in_this_process

        use_in_this_process()
        ray.init(address="local", num_cpus=args.num_cpus, include_dashboard=False, log_to_driver=False,
                 runtime_env={"env_vars": {"OMP_NUM_THREADS": "1"}})
        from pali.train.prepare import count_rows

        batches = max(1, (count_rows(shards) or args.examples) // args.batch_size - 1)
        measure_streams(dcfg, tok, shards, args.replicas, per_rank, 1)  # untimed: starts Ray's worker processes
        runs = [measure_streams(dcfg, tok, shards, args.replicas, per_rank, batches) for _ in range(args.repeats)]
        train = measure_training(mcfg, dcfg, tok, shards, args.replicas, per_rank, args.train_steps)
        ray.shutdown()
    med = {k: statistics.median(r[k] for r in runs) for k in runs[0]}
    print(f"# data pipeline benchmark ({env['date']})")
    print(f"hardware: {env['cpu']}, {env['cores']} cores; python {env['python']}; ray {env['ray']}; "
          f"commit {env['commit']}; load average at start {env['load_avg_at_start']}")
    print(f"data: {len(shards)} shards; image {dcfg.image_size}px; {args.replicas} replica streams x {per_rank} "
          f"examples per step (global batch {args.batch_size}); {args.repeats} repeats (median); Ray "
          f"num_cpus={args.num_cpus}\n")
    print("| measure | examples/s | images/s |")
    print("|---|---|---|")
    print(f"| {args.replicas} replica streams, consumer side (incl. {med['first_batch_s']:.1f} s to first batch) | "
          f"{med['examples_per_s']:.0f} | {med['images_per_s']:.0f} |")
    print(f"| the same, producer side (DataStats) | {med['producer_examples_per_s']:.0f} | "
          f"{med['producer_images_per_s']:.0f} |")
    print(f"| {args.replicas} tiny-preset training steps of {per_rank} (1 process, 1 thread each) | {train:.0f} | - |")
    verdict = "keep up" if med["examples_per_s"] >= train else "are the bottleneck"
    print(f"\nthe streams {verdict}: {med['examples_per_s'] / train:.1f}x the consumption rate")


if __name__ == "__main__":
    main()
