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
6. **decode**: KV-cache greedy decoding in bf16 at batch 1, 8 and 32, and cache vs no-cache agreement;
7. **decode_graph**: the hook for graph-captured decoding (`DECODE_GRAPH_HOOK`), unmeasured until it exists;
8. **attention** / **compile**: FlexAttention vs dense-bias SDPA, compiled vs eager, train steps side by side;
9. **ray**: `jobs.pretrain --use-gpu` and `python -m serve` over HTTP (`pali.bench.gpu_ray_check`).

Every section records its own error instead of ending the run. `--device cpu --quick` runs the same code
on gloo at toy sizes (CI smoke test); `jobs.benchmark --suite gpu` calls `run_gpu` and adds it to its report.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import sys
import tempfile
import time
import traceback
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.distributed as dist

import pali
from pali.bench.common import median, synthetic_batch
from pali.bench.gpu_report import to_markdown
from pali.config import PaLIConfig, get_preset, mt5, vit
from pali.models.pali import flops_per_example, hardware_flops_per_example
from pali.train.metrics import peak_flops

TARGETS = (  # (name, section, how to read the measured value from the record, goal, comparison)
    ("PaLI-3B MFU at the planner's batch", "mfu", "mfu:pali-3b", 0.45, ">="),
    ("PaLI-3B HFU (executed FLOPs / peak) at the planner's batch", "mfu", "hfu:pali-3b", 0.40, ">="),
    ("~1B preset MFU at the planner's batch", "mfu", "mfu:pali-1b-bench", 0.35, ">="),
    ("PaLI-3B greedy decoding, batch 1, ms per step", "decode_graph", "ms:1", 4.0, "<="),
    ("PaLI-3B greedy decoding, batch 32, ms per step", "decode_graph", "ms:32", 6.0, "<="),
)
"""The GPU targets of issue 23 (one H200, bf16), judged from a record by `check_targets`."""


def one_b_config() -> PaLIConfig:
    """~1B parameters: ViT-L/16 at 224 px (0.3B) + mT5-base (0.58B, 250k vocabulary)."""
    return PaLIConfig(name="pali-1b-bench", vision=vit("L/16", 224), text=mt5("base"))


def bench_config(name: str) -> PaLIConfig:
    """A preset by name, plus `1b` (`one_b_config`)."""
    return one_b_config() if name == "1b" else get_preset(name)


@dataclass
class GpuCheckConfig:
    """What `run_gpu` measures."""

    device: str = "cuda"
    """cuda (nccl, bf16 autocast) or cpu (gloo, float32 only: a smoke run of the same code)."""
    mfu_runs: list[tuple[str, int, bool]] = field(default_factory=lambda: [
        ("small", 64, False), ("base", 64, False), ("1b", 64, False), ("1b", 0, False),
        ("pali-3b", 32, False), ("pali-3b", 64, False), ("pali-3b", 0, False), ("pali-3b", 128, True)])
    """(preset, batch size, activation checkpointing) of each MFU row; batch 0 = the micro-batch `jobs.plan`
    recommends for one H200 (`planner_batch`)."""
    prompt_len: int = 32
    """Prompt tokens per example in the MFU and decode rows (all real, no padding)."""
    target_len: int = 32
    """Target tokens per example in the MFU rows."""
    repeats: int = 6
    """Timed steps per MFU row (after 2 warm-up steps); the median is reported."""
    train_steps: int = 100
    """Steps of the tiny fixed-batch training run."""
    decode_preset: str = "pali-3b"
    """Preset of the decode rows."""
    decode_batches: tuple[int, ...] = (1, 8, 32)
    """Batch sizes of the decode rows."""
    max_new_tokens: int = 32
    """Tokens generated per decode row."""
    sections: tuple[str, ...] = ("ceiling", "parity", "train", "mfu", "profile", "decode", "decode_graph",
                                 "attention", "compile", "ray")
    """Which sections run."""
    attention_run: tuple[str, int] = ("pali-3b", 32)
    """(preset, batch size) of the FlexAttention vs dense-bias SDPA comparison."""
    compile_run: tuple[str, int] = ("1b", 32)
    """(preset, batch size) of the per-block compiled vs eager training step comparison."""
    ray_steps: int = 1000
    """Training steps of the run through Ray (`jobs.pretrain --use-gpu`, tiny preset), then served over HTTP."""
    out_dir: str = "benchmarks/results/gpu"
    """Where the Ray section leaves its job's logs (`ray/`)."""
    command: str = "python -m pali.bench.gpu"
    """The command line recorded with the results."""
    profile_run: tuple[str, int, bool] = ("pali-3b", 64, False)
    """(preset, batch size, activation checkpointing) of the profiled step."""


# --- helpers -------------------------------------------------------------------------------------------
def init_single_process_group(device: torch.device) -> str:
    """A one-rank default process group on `device` (nccl + gloo on CUDA, gloo on CPU); returns the backend."""
    # As Ray Train's workers do with --use-gpu: nccl for CUDA tensors, gloo for the CPU-side bookkeeping.
    backend = "cpu:gloo,cuda:nccl" if device.type == "cuda" else "gloo"
    if not dist.is_initialized():
        store = os.path.join(tempfile.mkdtemp(prefix="pali-gpu-"), "store")  # no ports, no environment
        kw = {"device_id": device} if device.type == "cuda" else {}
        dist.init_process_group(backend, init_method=f"file://{store}", rank=0, world_size=1, **kw)
    return backend


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def full_batch(cfg: PaLIConfig, b: int, prompt_len: int, target_len: int, device, seed: int = 0) -> dict:
    """`synthetic_batch` with every prompt and target token real (MFU counts real tokens only), on `device`."""
    batch = synthetic_batch(cfg, b, prompt_len, target_len, seed=seed, ragged=False)
    return {k: v.to(device) for k, v in batch.items()}


class RandomState:
    """A lazy full state (`keys()` / `__getitem__`) of random weights made on the device: big presets are
    built in seconds instead of the CPU-side seeded init (the values do not change a step's speed)."""

    def __init__(self, cfg: PaLIConfig, device: torch.device, seed: int = 0):
        meta = pali.create_model(cfg, device="meta")
        self.shapes = {k: tuple(v.shape) for k, v in meta.state_dict().items()}
        self.device = device
        self.gen = torch.Generator(device=device).manual_seed(seed)

    def keys(self):
        return self.shapes.keys()

    def __getitem__(self, name: str) -> torch.Tensor:
        shape = self.shapes[name]
        if "norm" in name and name.endswith(".weight") and len(shape) == 1:
            return torch.ones(shape, device=self.device)
        if name.endswith(".bias"):
            return torch.zeros(shape, device=self.device)
        return torch.randn(shape, device=self.device, generator=self.gen) * 0.02


def _grads(engine) -> dict[str, torch.Tensor]:
    out = {}
    for name, p in engine.named_parameters():
        g = p.grad
        if g is not None:
            out[name] = (g.full_tensor() if hasattr(g, "full_tensor") else g).detach().float().cpu()
    return out


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.double() - b.double()).norm() / b.double().norm().clamp(min=1e-30))


def _grad_errors(got: dict[str, torch.Tensor], ref: dict[str, torch.Tensor]) -> dict:
    """Relative gradient error over all parameters together, and per parameter for those whose gradient is
    not negligible (norm >= 1e-6 of the total). Some gradients are zero in exact arithmetic, e.g. the ViT's
    key biases (a constant added to every score of a softmax row cancels), so their computed values are
    rounding noise that differs between kernels; a relative error of noise against noise means nothing."""
    total = torch.sqrt(sum(r.double().pow(2).sum() for r in ref.values()))
    diff = torch.sqrt(sum((got[n].double() - r.double()).pow(2).sum() for n, r in ref.items()))
    per = sorted(((_rel(got[n], r), n) for n, r in ref.items() if r.double().norm() >= 1e-6 * total),
                 reverse=True)
    return {"global": float(diff / total), "max": per[0][0], "worst": {n: e for e, n in per[:3]},
            "negligible": sorted(n for n, r in ref.items() if r.double().norm() < 1e-6 * total)}


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


# --- sections ------------------------------------------------------------------------------------------
def measure_ceiling(device: torch.device, n: int = 8192, repeats: int = 10) -> dict:
    """Median bf16 matrix-product rate (random operands) and the datasheet peak MFU is quoted against."""
    if device.type != "cuda":
        return {"note": "cpu: no bf16 matrix ceiling measured", "peak_flops": peak_flops(False, 1)}
    a = torch.randn(n, n, device=device, dtype=torch.bfloat16)
    b = torch.randn(n, n, device=device, dtype=torch.bfloat16)
    for _ in range(3):
        a @ b
    times = []
    for _ in range(repeats):
        s, e = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        s.record()
        a @ b
        e.record()
        e.synchronize()
        times.append(s.elapsed_time(e) / 1e3)
    rate = 2 * n ** 3 / median(times)
    return {"gpu": torch.cuda.get_device_name(device), "bf16_matmul_tflops": rate / 1e12,
            "peak_flops": peak_flops(True, 1), "measured_over_peak": rate / peak_flops(True, 1)}


def check_parity(device: torch.device) -> dict:
    """Engine on `device` vs a float32 CPU reference; DDP / FSDP2 (one nccl rank) vs unwrapped."""
    from pali.parallel import Grid, build_engine
    from pali.parallel.engine import _wrap_dp

    tf32 = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    cfg = get_preset("tiny").with_overrides(text__dropout_rate=0.0)
    grid = Grid.init(dp=1, pp=1, tp=1)
    ref = pali.create_model(cfg, seed=0).train()
    batch = synthetic_batch(cfg, 8, 16, 12, seed=1)  # ragged prompts and targets
    out = ref(**batch)
    out.loss.backward()
    ref_loss = float(out.loss.detach())
    ref_grads = {n: p.grad.detach().clone() for n, p in ref.named_parameters() if p.grad is not None}
    state = ref.state_dict()

    def run(autocast, wrap=None):
        eng = build_engine(cfg, grid, state, device=device, autocast_dtype=autocast, num_microbatches=2)
        if wrap is not None:
            eng.module = _wrap_dp(eng.module, grid, wrap, device)
        eng.train()
        res = eng.train_step({k: v.to(device) for k, v in batch.items()})
        return res.loss, _grads(eng)

    res: dict = {"reference_loss": ref_loss}
    loss32, g32 = run(None)
    res["fp32_loss_abs_diff"] = abs(loss32 - ref_loss)
    e32 = _grad_errors(g32, ref_grads)
    res.update(fp32_grad_global_rel_err=e32["global"], fp32_grad_max_rel_err=e32["max"],
               fp32_worst_grads=e32["worst"], negligible_grads=e32["negligible"])
    res["fp32_ok"] = res["fp32_loss_abs_diff"] <= 1e-4 and e32["max"] <= 1e-4
    if device.type == "cuda":
        loss16, g16 = run(torch.bfloat16)
        e16 = _grad_errors(g16, ref_grads)
        res.update(bf16_loss_rel_diff=abs(loss16 - ref_loss) / abs(ref_loss), bf16_grad_global_rel_err=e16["global"],
                   bf16_grad_max_rel_err=e16["max"], bf16_worst_grads=e16["worst"])
    for mode in ("ddp", "fsdp"):
        lw, gw = run(None, mode)
        res[f"{mode}_vs_unwrapped_max_rel_err"] = max(abs(lw - loss32) / abs(loss32), _grad_errors(gw, g32)["max"])
    res["wrapped_ok"] = all(res[f"{m}_vs_unwrapped_max_rel_err"] <= 1e-5 for m in ("ddp", "fsdp"))
    torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = tf32
    return res


def check_train(device: torch.device, steps: int) -> dict:
    """The trainer's optimizer / schedule / clipping on a fixed batch in bf16 autocast; checkpoint round trip."""
    from pali.parallel import Grid, build_engine
    from pali.train import sharded_checkpoint as ck
    from pali.train.config import TrainConfig
    from pali.train.optim import build_optimizer, build_scheduler

    cfg = get_preset("tiny")
    tcfg = TrainConfig(steps=steps, lr=1e-3, warmup_steps=10, use_gpu=device.type == "cuda")
    grid = Grid.init(dp=1, pp=1, tp=1)
    autocast = torch.bfloat16 if device.type == "cuda" else None
    eng = build_engine(cfg, grid, None, seed=0, device=device, autocast_dtype=autocast, num_microbatches=2)
    named = list(eng.named_parameters())
    opt = build_optimizer(named, tcfg)
    sched = build_scheduler(opt, tcfg)
    batch = full_batch(cfg, 32, 16, 12, device, seed=2)
    eng.train()
    losses, times = [], []
    for _ in range(steps):
        _sync(device)
        t0 = time.perf_counter()
        r = eng.train_step(batch)
        eng.clip_grad_norm_(tcfg.grad_clip)
        opt.step()
        sched.step()
        eng.zero_grad()
        _sync(device)
        times.append(time.perf_counter() - t0)
        losses.append(r.loss)
    with tempfile.TemporaryDirectory() as tmp:
        layout = {"dp": 1, "pp": 1, "tp": 1, "dp_rank": 0, "pp_rank": 0, "tp_rank": 0}
        ck.save_shard(tmp, 0, layout, eng.shard_spec(), eng.local_state_dict(), opt, named,
                      {"step": steps, "world_size": 1, "layout": {"dp": 1, "pp": 1, "tp": 1},
                       "model": cfg.to_dict(), "train": tcfg.to_dict(), "time": time.time()})
        full = ck.load_full(tmp)
        state = {k: v.detach().cpu() for k, v in eng.local_state_dict().items()}
        exact = all(torch.equal(full["model"][k], v) for k, v in state.items())
    return {"steps": steps, "first_loss": losses[0], "last_loss": losses[-1],
            "loss_fell": losses[-1] < 0.5 * losses[0], "median_step_s": median(times),
            "optimizer": type(opt).__name__, "fused": bool(opt.defaults.get("fused")),
            "checkpoint_roundtrip_exact": exact}


def measure_mfu(device: torch.device, preset: str, batch_size: int, ac: bool, prompt_len: int,
                target_len: int, repeats: int) -> dict:
    """One MFU row: the engine's train step + clipping + the trainer's AdamW, bf16 autocast on CUDA."""
    cfg = bench_config(preset)
    planned = batch_size == 0
    if planned:
        batch_size = planner_batch(cfg, prompt_len, target_len, ac)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    step_fn, eng, named = _train_step_fn(device, cfg, batch_size, ac, prompt_len, target_len)
    times = []
    for i in range(repeats + 2):
        _sync(device)
        t0 = time.perf_counter()
        step_fn()
        _sync(device)
        if i >= 2:
            times.append(time.perf_counter() - t0)
    step = median(times)
    eps = batch_size / step
    flops = flops_per_example(cfg, prompt_len, target_len)
    hardware = hardware_flops_per_example(cfg, prompt_len, target_len, ac, eng.chunked_loss)
    peak = peak_flops(device.type == "cuda", 1)
    params = sum(p.numel() for p in eng.model.parameters())
    trainable = sum(p.numel() for _, p in named)
    row = {"preset": cfg.name, "params": params, "trainable": trainable, "batch_size": batch_size,
           "planner_batch": planned, "activation_checkpointing": ac, "freeze_vision": cfg.freeze_vision,
           "compiled": eng.compiled, "attention": eng.attention, "chunked_loss": eng.chunked_loss,
           "step_s": step, "examples_per_s": eps,
           "tokens_per_s": eps * (cfg.vision.num_tokens + prompt_len + target_len),
           "flops_per_example": flops, "mfu": flops * eps / peak, "peak_flops": peak,
           "hardware_flops_per_example": hardware, "hfu": hardware * eps / peak}
    if device.type == "cuda":
        row["peak_memory_gib"] = torch.cuda.max_memory_allocated(device) / 2 ** 30
        row.update(planner_row(cfg, batch_size, prompt_len, target_len, ac))
    del eng, named, step_fn
    return row


def _train_step_fn(device: torch.device, cfg: PaLIConfig, batch_size: int, ac: bool, prompt_len: int,
                   target_len: int, **engine_kw):
    """(step(), engine, named parameters): the engine's train step + clipping + the trainer's AdamW on a
    fixed all-real batch, bf16 autocast on CUDA (random weights made on the device there). engine_kw go to
    `build_engine` (compile, attention, chunked_loss; its device defaults otherwise)."""
    from pali.parallel import Grid, build_engine
    from pali.train.config import TrainConfig
    from pali.train.optim import build_optimizer

    grid = Grid.init(dp=1, pp=1, tp=1)
    state = RandomState(cfg, device) if device.type == "cuda" else None
    eng = build_engine(cfg, grid, state, device=device, activation_checkpointing=ac,
                       autocast_dtype=torch.bfloat16 if device.type == "cuda" else None, **engine_kw)
    del state
    named = list(eng.named_parameters())
    opt = build_optimizer(named, TrainConfig(lr=1e-5, use_gpu=device.type == "cuda"))
    batch = full_batch(cfg, batch_size, prompt_len, target_len, device)
    eng.train()

    def step() -> None:
        eng.train_step(batch)
        eng.clip_grad_norm_(1.0)
        opt.step()
        eng.zero_grad()

    return step, eng, named


KERNEL_KINDS = (  # (kind, name fragments), first match wins; CUDA kernel names and CPU aten op names
    ("attention", ("fmha", "flash", "attention", "attn")),
    ("gemm", ("gemm", "xmma", "cutlass", "cublas", "aten::mm", "aten::addmm", "aten::bmm", "matmul",
              "convolution", "conv2d", "convolve")),
    ("optimizer", ("adam", "multi_tensor", "foreach")),
    ("norm / softmax / loss", ("norm", "softmax", "cross_entropy", "nll_loss", "logsumexp")),
    ("copy / cast", ("copy", "cast", "_to_copy", "convert", "cat", "index", "memcpy", "memset")),
    ("collectives", ("nccl", "gloo", "allreduce", "all_reduce")),
)


def kernel_kind(name: str) -> str:
    """The kind of a profiled kernel or operator, by its name (`KERNEL_KINDS`); 'element-wise / other'."""
    low = name.lower()
    return next((kind for kind, frags in KERNEL_KINDS if any(f in low for f in frags)), "element-wise / other")


def profile_step(device: torch.device, preset: str, batch_size: int, ac: bool, prompt_len: int,
                 target_len: int, steps: int = 2) -> dict:
    """Where one training step's time goes: device (CUDA) or self-CPU time by kernel kind, the top kernels,
    and on CUDA how much of the wall time the GPU was busy (the rest is host overhead or syncs)."""
    from torch.profiler import ProfilerActivity, profile

    cfg = bench_config(preset)
    step_fn, eng, named = _train_step_fn(device, cfg, batch_size, ac, prompt_len, target_len)
    for _ in range(2):
        step_fn()
    _sync(device)
    cuda = device.type == "cuda"
    acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
    t0 = time.perf_counter()
    with profile(activities=acts) as prof:
        for _ in range(steps):
            step_fn()
        _sync(device)
    wall = (time.perf_counter() - t0) / steps
    if cuda:  # kernels only: their names carry no "aten::" and they have device time
        events = [(e.key, e.self_device_time_total) for e in prof.key_averages()
                  if e.self_device_time_total > 0 and not e.key.startswith("aten::")]
    else:
        events = [(e.key, e.self_cpu_time_total) for e in prof.key_averages() if e.key.startswith("aten::")]
    total = sum(t for _, t in events) / 1e6 / steps
    kinds: dict[str, float] = {}
    for name, t in events:
        kind = kernel_kind(name)
        kinds[kind] = kinds.get(kind, 0.0) + t / 1e6 / steps
    top = sorted(events, key=lambda e: -e[1])[:12]
    del eng, named, step_fn
    return {"preset": cfg.name, "batch_size": batch_size, "activation_checkpointing": ac, "wall_s": wall,
            "timed_s": total, "busy_fraction": total / wall if cuda else None,
            "by_kind_s": dict(sorted(kinds.items(), key=lambda kv: -kv[1])),
            "top": [{"name": n[:120], "s": t / 1e6 / steps} for n, t in top]}


def planner_batch(cfg: PaLIConfig, prompt_len: int, target_len: int, ac: bool, gpu: str = "h200") -> int:
    """The micro-batch `jobs.plan` recommends for this model on one GPU (global batch 256, 1 x 1 grid)."""
    from pali.sizing import Geometry, PlanRequest, get_gpu
    from pali.sizing.planner import plan

    req = PlanRequest(cfg, get_gpu(gpu), 1, 1, 256, Geometry(prompt_len, target_len), overhead_gb=2.0)
    fits = [p for p in plan(req) if p.fits and p.checkpointing == ac]
    if not fits:
        raise ValueError(f"the planner finds no fitting micro-batch for {cfg.name} on one {gpu} "
                         f"(activation checkpointing {ac})")
    return fits[0].micro_batch


def planner_row(cfg: PaLIConfig, batch_size: int, prompt_len: int, target_len: int, ac: bool,
                gpu: str = "h200", mfu: float = 0.4) -> dict:
    """What `jobs.plan` predicts for this one-GPU run: peak memory, and the step time at `mfu`."""
    try:
        from pali.sizing import Geometry, PlanRequest, get_gpu
        from pali.sizing.planner import evaluate

        req = PlanRequest(cfg, get_gpu(gpu), 1, 1, batch_size, Geometry(prompt_len, target_len), mfu,
                          overhead_gb=0.0)
        lp = evaluate(req, 1, 1, "ddp", ac, batch_size)
    except Exception as e:  # the measurement stands without the prediction
        return {"planner_error": f"{type(e).__name__}: {e}"}
    return {"planner_peak_gib": lp.memory["total"] * 1e9 / 2 ** 30, "planner_step_s_at_hfu_0.4": lp.step_time_s}


def run_mfu(gc: GpuCheckConfig, device: torch.device) -> dict:
    rows = []
    for preset, b, ac in gc.mfu_runs:
        try:
            rows.append(measure_mfu(device, preset, b, ac, gc.prompt_len, gc.target_len, gc.repeats))
        except Exception as e:  # out of memory included: the other rows still run
            rows.append({"preset": preset, "batch_size": b, "activation_checkpointing": ac,
                         "error": f"{type(e).__name__}: {str(e)[:200]}"})
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
        print(f"[gpu]   mfu row: {json.dumps(rows[-1], default=str)[:400]}", flush=True)
    return {"rows": rows}


def measure_decode(device: torch.device, gc: GpuCheckConfig) -> dict:
    """KV-cache greedy decoding tokens/s at each batch size (bf16 weights on CUDA), and on the tiny preset
    the fraction of tokens where the cache and the no-cache decodes agree (float32)."""
    from pali.models.generate import generate

    out: dict = {"preset": gc.decode_preset, "rows": []}
    tiny = pali.create_model("tiny", seed=0).to(device).eval()
    b = full_batch(tiny.cfg, 8, 12, 4, device, seed=3)
    kw = {"pixel_values": b["pixel_values"], "input_ids": b["input_ids"], "attention_mask": b["attention_mask"],
          "max_new_tokens": 16}
    with_cache = generate(tiny, use_cache=True, **kw)
    no_cache = generate(tiny, use_cache=False, **kw)
    n = min(with_cache.shape[1], no_cache.shape[1])
    out["cache_agreement"] = float((with_cache[:, :n] == no_cache[:, :n]).float().mean())
    del tiny
    cfg = bench_config(gc.decode_preset)
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    with torch.device(device):
        model = pali.PaLI(cfg)
    model = model.to(dtype).eval()
    for bs in gc.decode_batches:
        batch = full_batch(cfg, bs, gc.prompt_len, 4, device, seed=4)
        kw = {"pixel_values": batch["pixel_values"].to(dtype), "input_ids": batch["input_ids"],
              "attention_mask": batch["attention_mask"], "max_new_tokens": gc.max_new_tokens}
        generate(model, **kw)  # warm-up
        times, toks = [], 0
        for _ in range(3):
            _sync(device)
            t0 = time.perf_counter()
            ids = generate(model, **kw)
            _sync(device)
            times.append(time.perf_counter() - t0)
            toks = int((ids != cfg.text.pad_token_id).sum())
        t = median(times)
        out["rows"].append({"batch_size": bs, "seconds": t, "new_tokens": toks, "tokens_per_s": toks / t,
                            "ms_per_step": 1e3 * t / max(ids.shape[1], 1)})
    if len(out["rows"]) > 1:
        out["batching_speedup"] = out["rows"][-1]["tokens_per_s"] / out["rows"][0]["tokens_per_s"]
    return out


DECODE_GRAPH_HOOK = "generate_static"
"""Name of the graph-captured decoding entry point `measure_decode_graph` looks for in
`pali.models.generate` (the static-shape slot cache and one-token step, built separately; fill the call in
`measure_decode_graph` when it lands). Until then the section records that it is unmeasured."""


def measure_decode_graph(device: torch.device, gc: GpuCheckConfig) -> dict:
    """Hook: graph-captured greedy decoding (static caches, CUDA graph) of `gc.decode_preset` at each of
    `gc.decode_batches`, tokens checked against today's decoding. Unmeasured until `DECODE_GRAPH_HOOK` exists."""
    from pali.models import generate as gen

    step = getattr(gen, DECODE_GRAPH_HOOK, None)
    if step is None:
        return {"unmeasured": True, "note": f"pali.models.generate.{DECODE_GRAPH_HOOK} does not exist yet: "
                "graph-captured decoding is not built, so its targets are unmeasured"}
    raise NotImplementedError(f"pali.models.generate.{DECODE_GRAPH_HOOK} exists: wire it into "
                              "pali.bench.gpu.measure_decode_graph (same rows as measure_decode)")


def _paired_engines(device: torch.device, preset: str, batch_size: int, prompt_len: int, target_len: int,
                    sides: dict[str, dict]) -> tuple[dict, dict, PaLIConfig]:
    """One training step function per side (same weights, same batch; `build_engine` options per side), each
    side's first-step loss, and the config."""
    cfg = bench_config(preset)
    steps, losses = {}, {}
    for name, kw in sides.items():
        step, eng, _ = _train_step_fn(device, cfg, batch_size, False, prompt_len, target_len, **kw)
        batch = full_batch(cfg, batch_size, prompt_len, target_len, device)
        losses[name] = eng.eval_step(batch).loss
        steps[name] = step
    return steps, losses, cfg


def _ratio_row(device: torch.device, steps: dict, losses: dict, cfg: PaLIConfig, batch_size: int,
               repeats: int, base: str, other: str) -> dict:
    """Median step seconds of both sides timed in alternation, and base / other."""
    from pali.bench.common import time_side_by_side

    def synced(fn):
        def run():
            fn()
            _sync(device)
        return run
    times = time_side_by_side({k: synced(v) for k, v in steps.items()}, repeats, warmup=2)
    med = {k: median(v) for k, v in times.items()}
    return {"preset": cfg.name, "batch_size": batch_size, "step_s": med, "losses": losses,
            "loss_rel_diff": abs(losses[other] - losses[base]) / abs(losses[base]),
            "speedup": med[base] / med[other]}


def compare_attention(device: torch.device, gc: GpuCheckConfig) -> dict:
    """FlexAttention (`pali.models.flex_attention`) against the dense-bias SDPA path in the engine's train
    step, same weights and batch, timed in alternation; eager on both sides so only attention differs."""
    preset, b = gc.attention_run
    steps, losses, cfg = _paired_engines(device, preset, b, gc.prompt_len, gc.target_len,
                                         {"sdpa": {"attention": "sdpa", "compile": False},
                                          "flex": {"attention": "flex", "compile": False}})
    return _ratio_row(device, steps, losses, cfg, b, gc.repeats, "sdpa", "flex")


def compare_compile(device: torch.device, gc: GpuCheckConfig) -> dict:
    """The engine's train step compiled (per block on CUDA, the whole stage on CPU) against eager, same
    weights and batch, timed in alternation after the compiling steps."""
    preset, b = gc.compile_run
    t0 = time.perf_counter()
    steps, losses, cfg = _paired_engines(device, preset, b, gc.prompt_len, gc.target_len,
                                         {"eager": {"compile": False}, "compiled": {"compile": True}})
    steps["compiled"]()  # the cold compile (forward + backward)
    _sync(device)
    row = _ratio_row(device, steps, losses, cfg, b, gc.repeats, "eager", "compiled")
    row["setup_and_compile_s"] = time.perf_counter() - t0
    return row


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
