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

import functools
import time
from dataclasses import dataclass

import torch

import pali
from pali.bench.common import batch_tokens, median, synthetic_batch, time_side_by_side
from pali.bench.hf_reference import hf_reference
from pali.bench.profile import kernel_floor, measured_ceiling, speedup_ceiling, step_breakdown
from pali.models.pali import flops_per_example, real_targets
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
    """Profile one extra step per side (share of CPU time in GEMMs and the optimizer, operator calls) and
    measure each side's kernel floor (`pali.bench.profile.kernel_floor`)."""
    compile_presets: tuple[str, ...] = ("tiny",)
    """Presets also timed with both sides under torch.compile (a cold compile per side: 1-3.5 min each)."""
    pipeline_batch_size: int = 32
    """Examples of the data-pipeline batch comparison (`pipeline_sides`); 0 = skip it."""


def _step_fn(module, opt, batch, loss_fn=None):
    def step() -> None:
        loss = module(**batch).loss if loss_fn is None else loss_fn()
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
    return step


def _adamw(module):
    return torch.optim.AdamW(module.parameters(), lr=1e-4, betas=(0.9, 0.98), eps=1e-8, fused=True)


def trainer_step_loss(model, compiled: bool = False, trim: bool = True):
    """A function batch -> loss computing it as a trainer worker does at pp = 1 (`Engine._step`).

    Eager: the batch's all-padding tail columns cut (`trim_padding`), `FullStage` with the output head at
    real targets only, `TokenLoss`. With `compiled`, or `trim=False` (`--no-trim-padding`): full logits at
    the batch's fixed shapes (compiled: the stage through `compile_stage`). Returns (loss_fn, stage).
    """
    from pali.parallel.engine import compile_stage, trim_padding
    from pali.parallel.stages import FullStage, TokenLoss

    pad = model.cfg.text.pad_token_id
    trim = trim and not compiled
    stage = FullStage(model, packed_head=trim)
    if compiled:
        compile_stage(stage)
    token_loss = TokenLoss(pad, vocab_parallel=False)

    def loss(batch: dict) -> torch.Tensor:
        ids, mask, labels = batch["input_ids"], batch["attention_mask"], batch["labels"]
        image_mask = batch.get("image_mask")
        if image_mask is None:
            image_mask = torch.ones(ids.shape[0], dtype=torch.long)
        if trim:
            ids, mask, labels = trim_padding(ids, mask, labels, pad)
        token_loss.denominator = max(int(real_targets(labels, pad).sum()), 1)
        token_loss.records.clear()
        return token_loss(stage(batch["pixel_values"], ids, mask, image_mask, labels), labels)
    return loss, stage


def trainer_loss(model, batch: dict, compiled: bool = False, trim: bool = True):
    """`trainer_step_loss` bound to one batch: (() -> loss, stage)."""
    fn, stage = trainer_step_loss(model, compiled, trim)
    return functools.partial(fn, batch), stage


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


def pipeline_batch(model_cfg, batch_size: int) -> dict[str, torch.Tensor]:
    """`batch_size` image-text examples exactly as the training data pipeline delivers them: generated
    shards through `process_shard` (task mixture, prompts, tokenizer trained on the shards), padded to
    the preset's fixed `max_text_len` / `max_target_len`."""
    import tempfile

    import numpy as np

    from pali.data.pipeline import DataConfig, process_shard, train_tokenizer_from_shards
    from pali.data.synthetic import write_synthetic_shards

    with tempfile.TemporaryDirectory() as tmp:
        shards = write_synthetic_shards(tmp, 4 * batch_size, image_size=model_cfg.vision.image_size,
                                        examples_per_shard=4 * batch_size)
        tok = train_tokenizer_from_shards(shards, model_cfg.text.vocab_size)
        out = process_shard(DataConfig.for_model(model_cfg), tok, shards[0])
    rows = np.flatnonzero(out["image_mask"] == 1)[:batch_size]  # the HF twin has no text-only mode
    if len(rows) < batch_size:
        raise RuntimeError(f"only {len(rows)} image-text examples generated; wanted {batch_size}")
    return {k: torch.from_numpy(np.ascontiguousarray(out[k][rows]))
            for k in ("pixel_values", "input_ids", "attention_mask", "labels")}


def pipeline_sides(preset: str, batch_size: int, repeats: int, min_time_s: float, tol: float) -> dict:
    """The trainer's step on a data-pipeline batch against HF on the same examples padded to the longest.

    Three sides, alternating: PaLI as the trainer runs it (the batch as the pipeline pads it, tail padding
    cut, output head at real targets), PaLI with `--no-trim-padding` (every padded position), and the HF
    twin on the batch padded to its longest prompt and target (`DataCollatorForSeq2Seq`'s default, what
    an HF Trainer user runs). All three losses must agree.
    """
    from pali.parallel.engine import trim_padding

    model = pali.create_model(preset, seed=0).train()
    padded_model = pali.create_model(preset, seed=0).train()
    ref = hf_reference(model).train()
    batch = pipeline_batch(model.cfg, batch_size)
    pad = model.cfg.text.pad_token_id
    ids, mask, labels = trim_padding(batch["input_ids"], batch["attention_mask"], batch["labels"], pad)
    longest = {**batch, "input_ids": ids, "attention_mask": mask, "labels": labels}
    ours_fn = trainer_loss(model, batch)[0]
    padded_fn = trainer_loss(padded_model, batch, trim=False)[0]
    losses = {"ours": float(ours_fn().detach()), "ours_padded": float(padded_fn().detach()),
              "hf": float(ref(**longest).loss.detach())}
    for k, v in losses.items():
        if abs(v - losses["hf"]) > tol * max(abs(losses["hf"]), 1e-12):
            raise AssertionError(f"{preset} pipeline batch: {k} loss {v:.6f} != HF {losses['hf']:.6f}")
    for m in (model, padded_model, ref):
        m.zero_grad(set_to_none=True)
    fns = {"ours": _step_fn(model, _adamw(model), batch, ours_fn),
           "ours_padded": _step_fn(padded_model, _adamw(padded_model), batch, padded_fn),
           "hf": _step_fn(ref, _adamw(ref), longest)}
    times = time_side_by_side(fns, repeats, warmup=1, min_time_s=min_time_s)
    t = {k: median(v) for k, v in times.items()}
    return {"batch_size": batch_size, "padded_lengths": [batch["input_ids"].shape[1], batch["labels"].shape[1]],
            "longest": [ids.shape[1], labels.shape[1]],
            "real_prompt_tokens": int(mask.sum()), "real_target_tokens": int(real_targets(labels, pad).sum()),
            "losses": losses, "step_s": t, "examples_per_s": {k: batch_size / v for k, v in t.items()},
            "speedup_vs_hf": t["hf"] / t["ours"], "trim_gain": t["ours_padded"] / t["ours"],
            "times": times}


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
        prof = {n: step_breakdown(f) for n, f in fns.items()} if cfg.profile else {}
        floor = {n: kernel_floor(f, cfg.repeats) for n, f in fns.items()} if cfg.profile else {}
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
                     "times_ours": times["ours"], "times_hf": times["hf"], "profile": prof, "kernel_floor": floor,
                     # measured: HF's step over its own kernels replayed alone; profiled: from profiler shares
                     "ceiling": measured_ceiling(t_hf, floor["hf"]) if floor else None,
                     "ceiling_profiled": speedup_ceiling(prof["hf"]) if prof else None})
        if compiled:
            t_oc, t_hc = median(times["ours_compiled"]), median(times["hf_compiled"])
            rows[-1].update({"compiled": {
                "step_s_ours": t_oc, "step_s_hf": t_hc, "examples_per_s_ours": b / t_oc, "examples_per_s_hf": b / t_hc,
                "compile_s_ours": compile_s["ours"], "compile_s_hf": compile_s["hf"],
                "loss_ours": compiled_loss["ours"], "loss_hf": compiled_loss["hf"],
                "speedup_vs_hf_eager": t_hf / t_oc, "speedup_vs_hf_compiled": t_hc / t_oc,
                "speedup_over_own_eager": t_ours / t_oc,
                "times_ours": times["ours_compiled"], "times_hf": times["hf_compiled"]}})
        if cfg.pipeline_batch_size:
            rows[-1]["pipeline"] = pipeline_sides(preset, cfg.pipeline_batch_size, cfg.repeats, cfg.min_time_s,
                                                  cfg.loss_tol)
    return rows
