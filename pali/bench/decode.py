"""Suite `decode`: batched greedy and beam search with our KV cache against Hugging Face `generate`.

Same imported weights (`to_hf` export loaded into the HF-assembled model), same prompts and images, same
thread count; the output token ids are checked identical before timing. Both sides run the vision tower
and the encoder inside the timed call.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import partial

import torch

import pali
from pali.bench.common import median, synthetic_batch, time_side_by_side
from pali.bench.hf_reference import hf_reference, strip_hf
from pali.bench.profile import kernel_floor, measured_ceiling, speedup_ceiling, step_breakdown


@dataclass
class DecodeBenchConfig:
    """Sizes of the decoding comparison."""

    presets: tuple[str, ...] = ("tiny", "small")
    """Model presets to measure."""
    batch_size: int = 8
    """Prompts per generate call."""
    prompt_len: int = 16
    """Prompt tokens (odd rows are half padding)."""
    max_new_tokens: int = 24
    """Tokens generated per prompt (random weights rarely stop early)."""
    num_beams: tuple[int, ...] = (1, 4)
    """1 = greedy; > 1 = beam search."""
    repeats: int = 5
    """Timed calls per side (median reported)."""
    min_time_s: float = 3.0
    """More rounds than `repeats` (up to 100) when `repeats` would time less than this (both sides)."""
    profile: bool = True
    """Profile one extra greedy call per side (share of CPU time in GEMM kernels) and measure each side's
    kernel floor (`pali.bench.profile.kernel_floor`), which gives the speed-up ceiling."""


def run_decode(cfg: DecodeBenchConfig) -> list[dict]:
    """One result row per (preset, num_beams): seconds per call, new tokens/s for both sides, ratio."""
    rows = []
    for preset in cfg.presets:
        model = pali.create_model(preset, seed=0).eval()
        ref = hf_reference(model).eval()
        batch = synthetic_batch(model.cfg, cfg.batch_size, cfg.prompt_len, 2)
        inputs = {k: batch[k] for k in ("pixel_values", "input_ids", "attention_mask")}
        for beams in cfg.num_beams:
            kw = dict(max_new_tokens=cfg.max_new_tokens, num_beams=beams)
            with torch.no_grad():
                ours = model.generate(**inputs, **kw)
                theirs = strip_hf(ref.generate(**inputs, **kw, do_sample=False), model.cfg.text.eos_token_id,
                                  model.cfg.text.pad_token_id)
            if not torch.equal(ours, theirs):
                raise AssertionError(f"{preset} num_beams={beams}: generated tokens differ from HF generate:\n"
                                     f"ours {ours.tolist()}\nhf   {theirs.tolist()}")
            calls = {"ours": partial(model.generate, **inputs, **kw),
                     "hf": partial(ref.generate, **inputs, **kw, do_sample=False)}
            with torch.no_grad():
                times = time_side_by_side(calls, cfg.repeats, warmup=1, min_time_s=cfg.min_time_s)
            prof, floor = {}, {}
            if cfg.profile and beams == 1:
                with torch.no_grad():
                    prof = {n: step_breakdown(f) for n, f in calls.items()}
                    floor = {n: kernel_floor(f, cfg.repeats) for n, f in calls.items()}
            new_tokens = int((ours != model.cfg.text.pad_token_id).sum())
            t_ours, t_hf = median(times["ours"]), median(times["hf"])
            rows.append({"preset": preset, "mode": "greedy" if beams == 1 else f"beam {beams}",
                         "num_beams": beams, "batch_size": cfg.batch_size, "max_new_tokens": cfg.max_new_tokens,
                         "tokens_identical": True, "new_tokens": new_tokens,
                         "call_s_ours": t_ours, "call_s_hf": t_hf,
                         "tokens_per_s_ours": new_tokens / t_ours, "tokens_per_s_hf": new_tokens / t_hf,
                         "speedup": t_hf / t_ours, "times_ours": times["ours"], "times_hf": times["hf"],
                         "profile": prof, "kernel_floor": floor,
                         "ceiling": measured_ceiling(t_hf, floor["hf"]) if floor else None,
                         "ceiling_profiled": speedup_ceiling(prof["hf"]) if prof else None})
    return rows
