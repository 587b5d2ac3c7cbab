"""Suite `train`: one forward + backward + AdamW step of PaLI against the Hugging Face-assembled twin.

Both sides get the same config, the weights (exported with `to_hf`), the batch, the optimizer (fused
AdamW, as the trainer and Hugging Face Trainer both default to) and the thread count; the losses are
checked equal before anything is timed, and the steps alternate. Ours is a trainer worker's step at
pp = 1 (`trainer_loss`: all-padding tail columns cut, the output head at real targets only). MFU is computed from
`flops_per_example` and `pali.train.metrics.peak_flops` exactly as the trainer logs it.

For the presets in `compile_presets` both sides are also timed under `torch.compile` (inductor), in the
same alternation: ours as the trainer's `--compile` runs it (`compile_stage` on the stage module, the loss
eager), Hugging Face's as `torch.compile(model)`, each on its own copy of the weights with its own
optimizer. The first (compiling) step of each is timed apart, and the compiled losses are checked against
the eager ones first.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import torch

import pali
from pali.bench.common import batch_tokens, median, synthetic_batch, time_side_by_side
from pali.bench.hf_reference import hf_reference
from pali.bench.profile import speedup_ceiling, step_breakdown
from pali.models.pali import flops_per_example
from pali.train.metrics import PEAK_FLOPS, peak_flops


@dataclass
class TrainBenchConfig:
    """Sizes of the train-step comparison."""

    presets: tuple[str, ...] = ("tiny", "small")
    """Model presets to measure."""
    batch_size: int = 8
    """Examples per step."""
    prompt_len: int = 16
    """Prompt tokens (odd rows are half padding)."""
    target_len: int = 16
    """Target tokens (odd rows are half padding)."""
    repeats: int = 5
    """Timed steps per side (median reported)."""
    min_time_s: float = 3.0
    """More rounds than `repeats` (up to 100) when `repeats` would time less than this (both sides)."""
    loss_tol: float = 1e-4
    """Largest relative loss difference accepted before timing."""
    profile: bool = True
    """Profile one extra step per side: share of CPU time in GEMMs and the optimizer, operator calls."""
    compile_presets: tuple[str, ...] = ("tiny",)
    """Presets also timed with both sides under torch.compile (a cold compile per side: 1-3.5 min each)."""


def _step_fn(module, opt, batch, loss_fn=None):
    def step() -> None:
        loss = module(**batch).loss if loss_fn is None else loss_fn()
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
    return step


def _adamw(module):
    return torch.optim.AdamW(module.parameters(), lr=1e-4, betas=(0.9, 0.98), eps=1e-8, fused=True)


def trainer_loss(model, batch: dict, compiled: bool = False):
    """A closure computing the batch's loss as a trainer worker does at pp = 1 (`Engine._step`).

    Eager: the batch's all-padding tail columns cut (`trim_padding`), `FullStage` with the output head at
    real targets only, `TokenLoss`. With `compiled`: the stage through `compile_stage`, full logits, fixed
    shapes. Returns (loss_fn, stage).
    """
    from pali.parallel.engine import compile_stage, trim_padding
    from pali.parallel.stages import FullStage, TokenLoss, real_targets

    pad = model.cfg.text.pad_token_id
    stage = FullStage(model, packed_head=not compiled)
    if compiled:
        compile_stage(stage)
    token_loss = TokenLoss(pad, vocab_parallel=False)
    image_mask = torch.ones(batch["input_ids"].shape[0], dtype=torch.long)

    def loss() -> torch.Tensor:
        ids, mask, labels = batch["input_ids"], batch["attention_mask"], batch["labels"]
        if not compiled:
            ids, mask, labels = trim_padding(ids, mask, labels, pad)
        token_loss.denominator = max(int(real_targets(labels, pad).sum()), 1)
        token_loss.records.clear()
        return token_loss(stage(batch["pixel_values"], ids, mask, image_mask, labels), labels)
    return loss, stage


def _compiled_sides(preset: str, batch: dict, want: dict[str, float], tol: float) -> tuple[dict, dict, dict]:
    """Step functions of both sides under torch.compile, their compile (first-step) seconds and first losses."""
    model = pali.create_model(preset, seed=0).train()
    ref = hf_reference(model).train()
    ours_loss, stage = trainer_loss(model, batch, compiled=True)  # what a worker runs with --compile (pp = 1)
    compiled_ref = torch.compile(ref)
    losses, compile_s = {}, {}
    for name, fn in (("ours", ours_loss), ("hf", lambda: compiled_ref(**batch).loss)):
        t = time.perf_counter()
        loss = fn()
        loss.backward()  # the backward graph compiles here too
        compile_s[name] = time.perf_counter() - t
        losses[name] = float(loss.detach())
        rel = abs(losses[name] - want[name]) / max(abs(want[name]), 1e-12)
        if rel > tol:
            raise AssertionError(f"{preset}: compiled {name} loss {losses[name]:.6f} != eager {want[name]:.6f}")
    model.zero_grad(set_to_none=True)
    ref.zero_grad(set_to_none=True)
    fns = {"ours_compiled": _step_fn(stage, _adamw(model), batch, ours_loss),
           "hf_compiled": _step_fn(compiled_ref, _adamw(ref), batch)}
    return fns, compile_s, losses


def run_train(cfg: TrainBenchConfig) -> list[dict]:
    """One result row per preset: examples/s, tokens/s for both sides, their ratio, loss check, MFU."""
    rows = []
    for preset in cfg.presets:
        model = pali.create_model(preset, seed=0).train()
        ref = hf_reference(model).train()
        batch = synthetic_batch(model.cfg, cfg.batch_size, cfg.prompt_len, cfg.target_len)
        ours_fn = trainer_loss(model, batch)[0]  # the trainer's step: trimmed batch, head at real targets
        ours_loss, hf_loss = float(ours_fn().detach()), float(ref(**batch).loss.detach())
        rel = abs(ours_loss - hf_loss) / max(abs(hf_loss), 1e-12)
        if rel > cfg.loss_tol:
            raise AssertionError(f"{preset}: PaLI loss {ours_loss:.6f} != HF-assembled loss {hf_loss:.6f} "
                                 f"(relative {rel:.2e} > {cfg.loss_tol}); the comparison would be meaningless")
        model.zero_grad(set_to_none=True)
        ref.zero_grad(set_to_none=True)
        # Fused AdamW on both sides: the trainer's optimizer (`pali.train.optim`) and Hugging Face Trainer's
        # default (`adamw_torch_fused` with torch >= 2.8).
        opts = {n: _adamw(m) for n, m in (("ours", model), ("hf", ref))}
        fns = {"ours": _step_fn(model, opts["ours"], batch, ours_fn), "hf": _step_fn(ref, opts["hf"], batch)}
        compiled, compile_s, compiled_loss = ({}, {}, {})
        if preset in cfg.compile_presets:
            compiled, compile_s, compiled_loss = _compiled_sides(preset, batch, {"ours": ours_loss, "hf": hf_loss},
                                                                 cfg.loss_tol)
        times = time_side_by_side({**fns, **compiled}, cfg.repeats, warmup=1, min_time_s=cfg.min_time_s)
        prof = {n: step_breakdown(f) for n, f in (("ours", _step_fn(model, opts["ours"], batch, ours_fn)),
                                                  ("hf", _step_fn(ref, opts["hf"], batch)))} if cfg.profile else {}
        visual, prompt, target = batch_tokens(model.cfg, batch)
        tokens = visual + prompt + target
        t_ours, t_hf = median(times["ours"]), median(times["hf"])
        b = cfg.batch_size
        flops = flops_per_example(model.cfg, prompt / b, target / b)  # real (unpadded) lengths, as the trainer
        eps = b / t_ours
        rows.append({"preset": preset, "params": model.num_parameters(), "batch_size": b,
                     "tokens_per_step": tokens, "loss_ours": ours_loss, "loss_hf": hf_loss, "loss_rel_diff": rel,
                     "step_s_ours": t_ours, "step_s_hf": t_hf,
                     "examples_per_s_ours": eps, "examples_per_s_hf": b / t_hf,
                     "tokens_per_s_ours": tokens / t_ours, "tokens_per_s_hf": tokens / t_hf,
                     "speedup": t_hf / t_ours,
                     "flops_per_example": flops,
                     "mfu_as_trainer_reports": flops * eps / peak_flops(False, 1),
                     # the same against the peak of the threads actually used (the trainer divides by all cores)
                     "mfu_of_used_threads": flops * eps / (PEAK_FLOPS["cpu_core"] * torch.get_num_threads()),
                     "hf_attn_implementation": ref.t5.config._attn_implementation,
                     "times_ours": times["ours"], "times_hf": times["hf"], "profile": prof,
                     "ceiling": speedup_ceiling(prof["hf"]) if prof else None})
        if compiled:
            t_oc, t_hc = median(times["ours_compiled"]), median(times["hf_compiled"])
            rows[-1].update({"compiled": {
                "step_s_ours": t_oc, "step_s_hf": t_hc, "examples_per_s_ours": b / t_oc, "examples_per_s_hf": b / t_hc,
                "compile_s_ours": compile_s["ours"], "compile_s_hf": compile_s["hf"],
                "loss_ours": compiled_loss["ours"], "loss_hf": compiled_loss["hf"],
                "speedup_vs_hf_eager": t_hf / t_oc, "speedup_vs_hf_compiled": t_hc / t_oc,
                "speedup_over_own_eager": t_ours / t_oc,
                "times_ours": times["ours_compiled"], "times_hf": times["hf_compiled"]}})
    return rows

