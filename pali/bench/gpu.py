"""Suite `gpu`: the whole GPU record of one commit, in one process: `python -m pali.bench.gpu --out DIR`.

Writes DIR/gpu.json and DIR/gpu.md (`to_markdown` of the JSON), opening with date, commit, command and
hardware and the GPU targets (`TARGETS`, judged by `check_targets` or marked unmeasured). Sections:

1. **ceiling**: a measured bf16 matrix-product rate, next to the datasheet peak MFU is quoted against;
2. **parity**: the training `Engine` on the GPU against a float32 CPU reference on the same weights and
   batch: float32 (TF32 off) must agree to 1e-4, bf16 autocast is reported; the engine wrapped in DDP and
   in FSDP2 over a one-rank nccl group must equal the unwrapped one;
3. **train**: the tiny preset trained on a fixed batch with the trainer's optimizer, schedule and gradient
   clipping in bf16 autocast (the loss must fall), then written with the trainer's checkpoint writer and
   read back bit-exactly;
4. **mfu**: examples/s, tokens/s, MFU (model FLOPs: a frozen tower forward only), HFU (plus recomputation)
   and peak memory of the engine's train step with its GPU defaults (FlexAttention, chunked loss, per-block
   compile, bf16 autocast, fused AdamW) for presets up to PaLI-3B, also at the planner's micro-batch;
5. **profile**: GPU time of one step by kernel kind;
6. **decode**: today's (growing KV cache) greedy decoding in bf16 at batch 1, 8 and 32, and cache vs no-cache
   agreement;
7. **decode_graph**: the same rows decoded by `generate_static` (static shapes, a CUDA graph per step), tokens
   checked against today's decoding; the decode targets read these rows;
8. **static_decode**: static-shape vs today's decoding on one small model, whole calls side by side (a ratio);
9. **attention** / **compile**: FlexAttention vs dense-bias SDPA, compiled vs eager, train steps side by side;
10. **ray**: `jobs.pretrain --use-gpu` and `python -m serve` over HTTP (`pali.bench.gpu_ray_check`).

The sections live in `gpu_train` (1-5, 9), `gpu_decode` (6-8) and here (10); shared set-up in `gpu_common`,
the Markdown in `gpu_report`.

Every section records its own error instead of ending the run. `--device cpu --quick` runs the same code
on gloo at toy sizes (CI smoke test); `jobs.benchmark --suite gpu` calls `run_gpu` and adds it to its report.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import sys
import time
import traceback
from pathlib import Path

import torch
import torch.distributed as dist

from pali.bench.gpu_common import GpuCheckConfig, init_single_process_group
from pali.bench.gpu_decode import compare_static_decode, measure_decode, measure_decode_graph
from pali.bench.gpu_report import to_markdown
from pali.bench.gpu_train import (
    check_parity,
    check_train,
    compare_attention,
    compare_compile,
    measure_ceiling,
    profile_step,
    run_mfu,
)

__all__ = ["TARGETS", "GpuCheckConfig", "check_targets", "main", "run_gpu", "to_markdown"]

TARGETS = (  # (name, section, how to read the measured value from the record, goal, comparison)
    ("PaLI-3B MFU at the planner's batch", "mfu", "mfu:pali-3b", 0.45, ">="),
    ("PaLI-3B HFU (executed FLOPs / peak) at the planner's batch", "mfu", "hfu:pali-3b", 0.40, ">="),
    ("~1B preset MFU at the planner's batch", "mfu", "mfu:pali-1b-bench", 0.35, ">="),
    ("PaLI-3B greedy decoding, batch 1, ms per step", "decode_graph", "ms:1", 4.0, "<="),
    ("PaLI-3B greedy decoding, batch 32, ms per step", "decode_graph", "ms:32", 6.0, "<="),
)
"""The GPU targets of issue 23 (one H200, bf16), judged from a record by `check_targets`."""


def _section(results: dict, name: str, fn, *args) -> None:
    """Run one section, store its result (or its error) under `name`, print a one-line summary."""
    t0 = time.perf_counter()
    try:
        results[name] = fn(*args)
    except Exception as e:  # one broken section must not hide the others
        results[name] = {"error": f"{type(e).__name__}: {e}", "traceback": traceback.format_exc(limit=8)}
    results[name]["seconds"] = round(time.perf_counter() - t0, 2)
    print(f"[gpu] {name}: {json.dumps(results[name], default=str)[:600]}", flush=True)
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def run_ray(gc: GpuCheckConfig, device: torch.device) -> dict:
    """The same GPU path through Ray (`pali.bench.gpu_ray_check`): `jobs.pretrain --use-gpu` on the tiny
    preset, then `python -m serve` on its checkpoint, queried over HTTP."""
    from pali.bench import gpu_ray_check as rc

    out = Path(gc.out_dir) / "ray"
    out.mkdir(parents=True, exist_ok=True)
    res = {"command": f"python -m pali.bench.gpu_ray_check --steps {gc.ray_steps}",
           "train": rc.train(out, gc.ray_steps, 1, device.type != "cuda", timeout=900)}
    if res["train"].get("checkpoint"):
        res["serve"] = rc.serve_and_query(res["train"]["checkpoint"], out, 8000, 64, timeout=180)
    if res["train"].get("returncode") != 0 or "error" in res.get("serve", {"error": "no checkpoint"}):
        res["error"] = "the run through Ray failed (see train.stderr_tail / serve.error)"
    return res


def check_targets(res: dict) -> list[dict]:
    """Each of `TARGETS` with its measured value from the record, or unmeasured (no GPU row for it)."""
    out = []
    for name, section, key, goal, op in TARGETS:
        kind, arg = key.split(":")
        value = None
        if kind in ("mfu", "hfu"):
            rows = [r for r in res.get(section, {}).get("rows", [])
                    if r.get("preset") == arg and r.get("planner_batch") and "error" not in r]
            value = rows[0][kind] if rows else None
        else:
            rows = [r for r in res.get(section, {}).get("rows", []) if r.get("batch_size") == int(arg)]
            value = rows[0]["ms_per_step"] if rows else None
        if res.get("device") != "cuda":
            value = None  # the targets are GPU targets: a CPU smoke run measures none of them
        met = None if value is None else (value >= goal if op == ">=" else value <= goal)
        out.append({"target": name, "measured": value, "goal": f"{op} {goal}", "met": met})
    return out


# --- entry points --------------------------------------------------------------------------------------
def run_gpu(gc: GpuCheckConfig | None = None) -> dict:
    """All sections on `gc.device`; {"note": ...} when CUDA is asked for and absent."""
    gc = gc or GpuCheckConfig()
    if gc.device == "cuda" and not torch.cuda.is_available():
        return {"note": "skipped: no CUDA GPU on this machine (the gpu suite needs one; --device cpu smoke-tests it)"}
    device = torch.device(gc.device, 0) if gc.device == "cuda" else torch.device("cpu")
    if device.type == "cuda":
        torch.cuda.set_device(device)
    created = not dist.is_initialized()
    from pali.bench.common import environment

    res: dict = {"device": gc.device, "environment": environment(torch.get_num_threads()),
                 "command": gc.command, "torch": torch.__version__,
                 "cuda": torch.version.cuda if device.type == "cuda" else None,
                 "nccl": ".".join(map(str, torch.cuda.nccl.version())) if device.type == "cuda" else None,
                 "backend": init_single_process_group(device)}
    todo = {"ceiling": (measure_ceiling, device), "parity": (check_parity, device),
            "train": (check_train, device, gc.train_steps), "mfu": (run_mfu, gc, device),
            "profile": (profile_step, device, *gc.profile_run, gc.prompt_len, gc.target_len),
            "decode": (measure_decode, device, gc), "decode_graph": (measure_decode_graph, device, gc),
            "static_decode": (compare_static_decode, device, gc),
            "attention": (compare_attention, device, gc), "compile": (compare_compile, device, gc),
            "ray": (run_ray, gc, device)}
    for name, (fn, *args) in todo.items():
        if name in gc.sections:
            _section(res, name, fn, *args)
    with contextlib.suppress(Exception):
        from pali.parallel import grid

        if grid._CURRENT is not None:
            grid._CURRENT.destroy()
    if created:
        dist.destroy_process_group()
    res["targets"] = check_targets(res)
    return res


QUICK_SKIPS = frozenset({"compile", "ray"})
"""Sections `--quick` leaves out unless named: a cold inductor compile, a Ray job and a Serve application
cost minutes on a small CPU machine."""


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m pali.bench.gpu", description=__doc__.splitlines()[0])
    p.add_argument("--out", default="benchmarks/results/gpu", help="writes gpu.json and gpu.md here")
    p.add_argument("--device", choices=["cuda", "cpu"], default="cuda")
    p.add_argument("--quick", action="store_true", help="toy sizes (tiny preset only): a smoke run")
    p.add_argument("--sections", default=None,
                   help="comma-separated subset of " + ",".join(GpuCheckConfig.sections) + " (default: all; "
                   "with --quick all but " + ",".join(sorted(QUICK_SKIPS)) + ")")
    p.add_argument("--ray-steps", type=int, default=GpuCheckConfig.ray_steps,
                   help="training steps of the run through Ray")
    a = p.parse_args(argv)
    default = tuple(x for x in GpuCheckConfig.sections if not (a.quick and x in QUICK_SKIPS))
    sections = tuple(x for x in a.sections.split(",") if x) if a.sections else default
    unknown = set(sections) - set(GpuCheckConfig.sections)
    if unknown:
        p.error(f"--sections: unknown {sorted(unknown)}; expected some of {list(GpuCheckConfig.sections)}")
    command = "python -m pali.bench.gpu " + " ".join(argv if argv is not None else sys.argv[1:])
    gc = GpuCheckConfig(device=a.device, sections=sections, out_dir=a.out, ray_steps=a.ray_steps,
                        command=command.strip())
    if a.quick:
        gc = GpuCheckConfig(device=a.device, mfu_runs=[("tiny", 8, False), ("tiny", 8, True)], repeats=2,
                            profile_run=("tiny", 8, False), attention_run=("tiny", 8), compile_run=("tiny", 8),
                            train_steps=40, decode_preset="tiny", decode_batches=(1, 4), max_new_tokens=8,
                            static_decode_run=("tiny", 8, 32),
                            prompt_len=12, target_len=8, sections=sections, out_dir=a.out,
                            ray_steps=a.ray_steps, command=command.strip())
    res = run_gpu(gc)
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "gpu.json").write_text(json.dumps(res, indent=2, default=str))
    md = to_markdown(res, title="GPU results")
    (out / "gpu.md").write_text(md + "\n")
    print(md)
    bad = [k for k, v in res.items() if isinstance(v, dict) and "error" in v]
    return 1 if bad else 0


if __name__ == "__main__":
    raise SystemExit(main())
