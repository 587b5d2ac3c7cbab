"""Suite `train`: one forward + backward + AdamW step of PaLI against the Hugging Face-assembled twin.

Both sides get the same config, the weights (exported with `to_hf`), the batch, the optimizer (fused
AdamW, as the trainer and Hugging Face Trainer both default to) and the thread count; the losses are
checked equal before anything is timed, and the steps alternate. MFU is computed from
`flops_per_example` and `pali.train.metrics.peak_flops` exactly as the trainer logs it.
"""

from __future__ import annotations

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


def _step_fn(module, opt, batch):
    def step() -> None:
        loss = module(**batch).loss
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
    return step


def run_train(cfg: TrainBenchConfig) -> list[dict]:
    """One result row per preset: examples/s, tokens/s for both sides, their ratio, loss check, MFU."""
    rows = []
    for preset in cfg.presets:
        model = pali.create_model(preset, seed=0).train()
        ref = hf_reference(model).train()
        batch = synthetic_batch(model.cfg, cfg.batch_size, cfg.prompt_len, cfg.target_len)
        ours_loss, hf_loss = float(model(**batch).loss.detach()), float(ref(**batch).loss.detach())
        rel = abs(ours_loss - hf_loss) / max(abs(hf_loss), 1e-12)
        if rel > cfg.loss_tol:
            raise AssertionError(f"{preset}: PaLI loss {ours_loss:.6f} != HF-assembled loss {hf_loss:.6f} "
                                 f"(relative {rel:.2e} > {cfg.loss_tol}); the comparison would be meaningless")
        model.zero_grad(set_to_none=True)
        ref.zero_grad(set_to_none=True)
        # Fused AdamW on both sides: the trainer's optimizer (`pali.train.optim`) and Hugging Face Trainer's
        # default (`adamw_torch_fused` with torch >= 2.8).
        opts = {n: torch.optim.AdamW(m.parameters(), lr=1e-4, betas=(0.9, 0.98), eps=1e-8, fused=True)
                for n, m in (("ours", model), ("hf", ref))}
        times = time_side_by_side({"ours": _step_fn(model, opts["ours"], batch),
                                   "hf": _step_fn(ref, opts["hf"], batch)}, cfg.repeats, warmup=1,
                                  min_time_s=cfg.min_time_s)
        prof = {n: step_breakdown(f) for n, f in (("ours", _step_fn(model, opts["ours"], batch)),
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
    return rows

