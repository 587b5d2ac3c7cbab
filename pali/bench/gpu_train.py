"""The GPU suite's training sections (`pali.bench.gpu`): the matmul ceiling, engine parity against a float32
CPU reference, the tiny fixed-batch run with its checkpoint round trip, MFU / HFU rows, the profile of one
step, and the side-by-side train-step ratios (FlexAttention vs dense-bias SDPA, compiled vs eager)."""

from __future__ import annotations

import json
import tempfile
import time

import torch

import pali
from pali.bench.common import median, synthetic_batch
from pali.bench.gpu_common import GpuCheckConfig, RandomState, bench_config, full_batch, sync
from pali.config import PaLIConfig, get_preset
from pali.models.pali import flops_per_example, hardware_flops_per_example
from pali.train.metrics import peak_flops


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
        sync(device)
        t0 = time.perf_counter()
        r = eng.train_step(batch)
        eng.clip_grad_norm_(tcfg.grad_clip)
        opt.step()
        sched.step()
        eng.zero_grad()
        sync(device)
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
        sync(device)
        t0 = time.perf_counter()
        step_fn()
        sync(device)
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
    sync(device)
    cuda = device.type == "cuda"
    acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
    t0 = time.perf_counter()
    with profile(activities=acts) as prof:
        for _ in range(steps):
            step_fn()
        sync(device)
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
            sync(device)
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
    sync(device)
    row = _ratio_row(device, steps, losses, cfg, b, gc.repeats, "eager", "compiled")
    row["setup_and_compile_s"] = time.perf_counter() - t0
    return row

