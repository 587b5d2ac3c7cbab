"""Suite `parallel`: per-rank parameter + optimizer memory at TP=1, TP=2 and PP=2, and DP=1 -> 2 scaling.

Runs spawned CPU processes joined by a gloo group (as `tests/parallel/harness.py` does) rather than the
local multi-node Ray cluster: on 2 cores, starting that cluster plus a Ray Train run costs minutes and
every `ray.train.report` ~1.8 s (docs/design.md), which would swamp a step of a few hundred milliseconds.
Memory counts the bytes of the rank's own tensors (trainable parameters and AdamW's `exp_avg` /
`exp_avg_sq`, `step` scalars included) after one real optimizer step.
"""

from __future__ import annotations

import json
import os
import tempfile
import time
from dataclasses import dataclass

import torch

from pali.bench.common import median, synthetic_batch
from pali.config import get_preset


@dataclass
class ParallelBenchConfig:
    """Sizes of the parallel benchmark."""

    preset: str = "tiny"
    """Model preset (heads must divide by TP)."""
    batch_size: int = 8
    """Examples per rank per step for DP scaling; the whole batch for the memory layouts."""
    prompt_len: int = 16
    """Prompt tokens."""
    target_len: int = 16
    """Target tokens."""
    repeats: int = 5
    """Timed steps per DP layout (median reported)."""


def _tensor_bytes(ts) -> int:
    return sum(t.numel() * t.element_size() for t in ts)


def _plain_memory(cfg: ParallelBenchConfig) -> dict:
    """Parameter and AdamW bytes of the whole model after one step (the TP=1, PP=1 layout)."""
    import pali

    model_cfg = get_preset(cfg.preset)
    model = pali.create_model(model_cfg, seed=0).train()
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)
    batch = synthetic_batch(model_cfg, cfg.batch_size, cfg.prompt_len, cfg.target_len)
    model(**batch).loss.backward()
    opt.step()
    return {"rank": 0, "param_bytes": _tensor_bytes(p for p in model.parameters() if p.requires_grad),
            "all_local_bytes": _tensor_bytes(model.state_dict().values()),
            "optimizer_bytes": _tensor_bytes(t for st in opt.state.values() for t in st.values() if torch.is_tensor(t))}


def _job(rank: int, out: str, kind: str, dp: int, pp: int, tp: int, cfg: ParallelBenchConfig) -> None:
    import torch.distributed as dist

    from pali.parallel import Grid, build_engine

    model_cfg = get_preset(cfg.preset)
    grid = Grid.init(dp=dp, pp=pp, tp=tp)
    engine = build_engine(model_cfg, grid, seed=0, num_microbatches=2 if pp > 1 else 1)
    engine.train()
    opt = torch.optim.AdamW(engine.parameters(), lr=1e-4)
    batch = synthetic_batch(model_cfg, cfg.batch_size, cfg.prompt_len, cfg.target_len, seed=grid.dp_rank)

    def step() -> None:
        engine.train_step(batch)
        opt.step()
        engine.zero_grad()

    rec: dict = {"rank": rank}
    if kind == "memory":
        step()
        rec["param_bytes"] = _tensor_bytes(engine.parameters())
        rec["all_local_bytes"] = _tensor_bytes(engine.model.state_dict().values())
        rec["optimizer_bytes"] = _tensor_bytes(t for st in opt.state.values() for t in st.values()
                                               if torch.is_tensor(t))
    else:
        # DP=1 (a plain single-process step on rank 0 while rank 1 waits) and DP=2 alternate, so both see
        # the same machine load; the first round is warm-up.
        import pali

        plain = pali.create_model(model_cfg, seed=0).train() if rank == 0 else None
        plain_opt = torch.optim.AdamW(plain.parameters(), lr=1e-4) if plain is not None else None
        keys = ("pixel_values", "input_ids", "attention_mask", "labels")
        rec["times_dp1"], rec["times_dp2"] = [], []
        for r in range(cfg.repeats + 1):
            dist.barrier()
            if plain is not None:
                t = time.perf_counter()
                plain(**{k: batch[k] for k in keys}).loss.backward()
                plain_opt.step()
                plain_opt.zero_grad(set_to_none=True)
                if r:
                    rec["times_dp1"].append(time.perf_counter() - t)
            dist.barrier()
            t = time.perf_counter()
            step()
            dist.barrier()
            if r:
                rec["times_dp2"].append(time.perf_counter() - t)
    with open(os.path.join(out, f"{kind}-dp{dp}-pp{pp}-tp{tp}-rank{rank}.json"), "w") as f:
        json.dump(rec, f)
    dist.barrier()
    grid.destroy()


def _entry(rank: int, world: int, store: str, out: str, jobs: list, cfg: ParallelBenchConfig) -> None:
    import torch.distributed as dist

    os.environ["OMP_NUM_THREADS"] = "1"
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=world)
    try:
        for job in jobs:  # one process group for every layout of this world size: spawning costs ~20 s here
            _job(rank, out, *job, cfg)
    finally:
        dist.destroy_process_group()


def _spawn(world: int, jobs: list[tuple[str, int, int, int]], cfg: ParallelBenchConfig) -> dict:
    """Run jobs (kind, dp, pp, tp) one after another on `world` spawned ranks; {job: [rank records]}."""
    import torch.multiprocessing as mp

    with tempfile.TemporaryDirectory() as tmp:
        mp.spawn(_entry, args=(world, os.path.join(tmp, "store"), tmp, jobs, cfg), nprocs=world, join=True)
        out = {}
        for kind, dp, pp, tp in jobs:
            out[(kind, dp, pp, tp)] = [json.load(open(os.path.join(tmp, f"{kind}-dp{dp}-pp{pp}-tp{tp}-rank{r}.json")))
                                       for r in range(world)]
        return out


def run_parallel(cfg: ParallelBenchConfig) -> dict:
    """Per-rank memory of TP=1 / TP=2 / PP=2 (max over ranks, and its ratio to TP=1) and DP scaling."""
    runs = _spawn(2, [("memory", 1, 1, 2), ("memory", 1, 2, 1), ("throughput", 2, 1, 1)], cfg)
    runs[("memory", 1, 1, 1)] = [_plain_memory(cfg)]  # TP=PP=DP=1 is the plain model: no process needed
    memory = {}
    for name, (pp, tp) in {"TP=1": (1, 1), "TP=2": (1, 2), "PP=2": (2, 1)}.items():
        ranks = runs[("memory", 1, pp, tp)]
        worst = max(ranks, key=lambda r: r["param_bytes"] + r["optimizer_bytes"])
        memory[name] = {"param_bytes": worst["param_bytes"], "optimizer_bytes": worst["optimizer_bytes"],
                        "per_rank": ranks}
    base = memory["TP=1"]
    for m in memory.values():
        m["param_ratio"] = m["param_bytes"] / base["param_bytes"]
        m["total_ratio"] = (m["param_bytes"] + m["optimizer_bytes"]) / (base["param_bytes"] + base["optimizer_bytes"])
    scaling = {}
    rec = runs[("throughput", 2, 1, 1)][0]
    for dp in (1, 2):
        times = rec[f"times_dp{dp}"]
        step_s = median(times)
        scaling[f"DP={dp}"] = {"step_s": step_s, "examples_per_s": dp * cfg.batch_size / step_s, "times": times}
    speedup = scaling["DP=2"]["examples_per_s"] / scaling["DP=1"]["examples_per_s"]
    return {"preset": cfg.preset, "memory": memory, "dp_scaling": scaling, "dp_speedup": speedup,
            "dp_efficiency": speedup / 2, "backend": "spawned gloo processes (1 thread each)"}
