"""Planner vs a real run on one device: predicted and measured step time and peak memory, and the gap.

    python -m pali.bench.plan_vs_measured --preset base --gpu h200 --batch 32 --steps 5 --out plan_gap.json
    python -m pali.bench.plan_vs_measured --preset tiny --device cpu --batch 4 --steps 2   # smoke run

On CUDA it trains with bf16 autocast (as `jobs.pretrain --use-gpu`), takes the median step time and
`torch.cuda.max_memory_allocated`, and compares them with `pali.sizing` for a one-GPU layout (precision
amp, fused attention, no runtime overhead since the allocator does not see the CUDA context). On CPU
it compares only the exactly countable part (state + saved activations, fp32). The JSON records
hardware, commit and date.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import statistics
import subprocess
import tempfile
import time

import torch
import torch.distributed as dist

from pali.config import get_preset
from pali.sizing import Geometry, PlanRequest, get_gpu, rank_memory
from pali.sizing.measure import SavedActivationMeter, StateBytes, state_bytes
from pali.sizing.planner import evaluate


def _commit() -> str:
    try:
        return subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                              check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def _parse_args(argv: list[str] | None) -> argparse.Namespace:
    """The command line."""
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", default="base")
    p.add_argument("--gpu", default="h200", help="planner GPU type for the prediction")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--seq", default="32,32", help="PROMPT,TARGET")
    p.add_argument("--steps", type=int, default=5)
    p.add_argument("--mfu", type=float, default=0.4)
    p.add_argument("--checkpointing", action="store_true")
    p.add_argument("--out", default=None, help="write the JSON record here")
    return p.parse_args(argv)


def _timed_steps(engine, opt: torch.optim.Optimizer, batch: dict, steps: int,
                 cuda: bool) -> tuple[list[float], SavedActivationMeter]:
    """Seconds of each of `steps` train steps after one warm-up step; the last step's saved activations metered."""
    times, meter = [], SavedActivationMeter()
    for i in range(steps + 1):
        if cuda:
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        with meter if i == steps else _null():
            engine.train_step(batch)
        opt.step()
        engine.zero_grad()
        if cuda:
            torch.cuda.synchronize()
        if i:  # step 0 warms up (allocator, kernels, optimizer state)
            times.append(time.perf_counter() - t0)
    return times, meter


def _train_and_measure(a: argparse.Namespace, cfg, device: torch.device, prompt: int,
                       target: int) -> tuple[list[float], SavedActivationMeter, StateBytes]:
    """Train on a one-rank process group: step times, saved-activation meter, and state bytes with gradients."""
    from pali.parallel import Grid, build_engine
    from tests.parallel.harness import global_batch

    cuda = device.type == "cuda"
    store = os.path.join(tempfile.mkdtemp(), "store")
    backend = "cpu:gloo,cuda:nccl" if cuda else "gloo"  # as the GPU training workers (pali.train.trainer)
    dist.init_process_group(backend, init_method=f"file://{store}", rank=0, world_size=1)
    try:
        grid = Grid.init()
        engine = build_engine(cfg, grid, seed=0, device=device, autocast_dtype=torch.bfloat16 if cuda else None,
                              activation_checkpointing=a.checkpointing)
        opt = torch.optim.AdamW(engine.parameters(), lr=1e-5)
        batch = global_batch(cfg, b=a.batch, s=prompt, t=target)
        # every target real: the planner's worst case (the trainer's output head runs at real targets only)
        batch["labels"] = batch["labels"].masked_fill(batch["labels"] == 0, 5)
        times, meter = _timed_steps(engine, opt, batch, a.steps, cuda)
        engine.train_step(batch)  # leave gradients in place to count them
        st = state_bytes(engine.model, opt)
    finally:
        dist.destroy_process_group()
    return times, meter, st


def _add_gpu_prediction(rec: dict, a: argparse.Namespace, cfg, geo: Geometry) -> None:
    """Add the planner's step time and peak memory for one GPU, and the gaps to the measured ones."""
    req = PlanRequest(cfg, get_gpu(a.gpu), 1, 1, a.batch, geo, a.mfu, overhead_gb=0.0)
    lp = evaluate(req, 1, 1, "ddp", a.checkpointing, a.batch)
    rec.update(predicted_step_s=lp.step_time_s, step_time_gap=rec["measured_step_s"] / lp.step_time_s - 1,
               implied_mfu=a.mfu * lp.step_time_s / rec["measured_step_s"],
               measured_peak_bytes=torch.cuda.max_memory_allocated(), predicted_peak_bytes=lp.memory["total"] * 1e9)
    rec["memory_gap"] = rec["measured_peak_bytes"] / rec["predicted_peak_bytes"] - 1


def _add_cpu_prediction(rec: dict, a: argparse.Namespace, cfg, geo: Geometry, st: StateBytes,
                        meter: SavedActivationMeter) -> None:
    """Add the planner's fp32 state and saved-activation bytes, and their gap to the measured ones."""
    mem = rank_memory(cfg, 1, 1, 1, 0, geo, a.batch, 1, checkpointing=a.checkpointing, precision="fp32",
                      fused_attention=False)
    rec.update(predicted_state_bytes=mem.state, predicted_saved_activation_bytes=mem.activations,
               memory_gap=(st.total + meter.peak) / (mem.state + mem.activations) - 1)


def main(argv: list[str] | None = None) -> dict:
    """Run the comparison and print / write the JSON record."""
    a = _parse_args(argv)
    prompt, target = (int(x) for x in a.seq.split(","))
    cfg = get_preset(a.preset)
    device = torch.device(a.device)
    cuda = device.type == "cuda"
    times, meter, st = _train_and_measure(a, cfg, device, prompt, target)
    geo = Geometry(prompt, target)
    rec = {"preset": a.preset, "device": torch.cuda.get_device_name() if cuda else "cpu", "batch": a.batch,
           "seq": [prompt, target], "checkpointing": a.checkpointing, "commit": _commit(),
           "date": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
           "measured_step_s": statistics.median(times), "measured_state_bytes": st.total,
           "measured_saved_activation_bytes": meter.peak}
    if cuda:
        _add_gpu_prediction(rec, a, cfg, geo)
    else:
        _add_cpu_prediction(rec, a, cfg, geo, st, meter)
    text = json.dumps(rec, indent=2)
    print(text)
    if a.out:
        with open(a.out, "w") as f:
            f.write(text + "\n")
    return rec


class _null:
    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return None


if __name__ == "__main__":
    main()
