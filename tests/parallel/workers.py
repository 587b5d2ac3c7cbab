"""Per-rank bodies of the equivalence tests: run layouts on a spawned gloo world, write results to disk.

Each layout writes, per rank, `<out>/<layout>/rank<r>.safetensors` (gradients as `grad/<name>`, weights as
`weight/<name>`, Adam moments as `exp_avg/<name>`, `exp_avg_sq/<name>`) and `rank<r>.json` (shard specs,
step result, gradient norms). The parent process merges them with `merge_shards` and compares.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass

import torch
import torch.distributed as dist
from safetensors.torch import save_file

from pali.config import get_preset
from pali.parallel import Grid, build_engine
from tests.parallel.harness import dp_share, global_batch


@dataclass(frozen=True)
class Layout:
    """One parallel layout to run."""

    name: str
    dp: int = 1
    pp: int = 1
    tp: int = 1
    microbatches: int = 1
    schedule: str = "1f1b"
    dp_mode: str = "ddp"
    freeze_vision: bool = False
    activation_checkpointing: bool = False
    adam: bool = False  # take one AdamW step and save weights + moments
    full_state: bool = False  # save engine.full_state_dict() from rank 0
    bf16: bool = False  # bfloat16 autocast (compared loosely)
    repeat: bool = False  # then a step on shorter prompts and the first step again (schedule reuse)
    compile: bool = False  # torch.compile the stage (`build_engine(compile=True)`)

    @property
    def world(self) -> int:
        return self.dp * self.pp * self.tp


def tiny_cfg(freeze_vision: bool = False):
    """The tiny preset as the tests use it."""
    cfg = get_preset("tiny")
    return cfg.with_overrides(freeze_vision=True) if freeze_vision else cfg


def run_layouts(rank: int, world: int, layouts: list[Layout], out_dir: str) -> None:
    """Run every layout of this world size in turn on the same process group."""
    try:  # a wrong grid is refused with the numbers named
        Grid.init(dp=world + 1, pp=1, tp=1)
        raise AssertionError("Grid.init accepted a grid larger than the world")
    except ValueError as e:
        assert f"{world + 1}*1*1" in str(e) and str(world) in str(e), e
    for layout in layouts:
        _run_one(rank, layout, os.path.join(out_dir, layout.name))
        dist.barrier()


def _run_one(rank: int, lay: Layout, out: str) -> None:
    os.makedirs(out, exist_ok=True)
    cfg = tiny_cfg(lay.freeze_vision)
    grid = Grid.init(dp=lay.dp, pp=lay.pp, tp=lay.tp)
    engine = build_engine(cfg, grid, seed=0, dp_mode=lay.dp_mode, schedule=lay.schedule,
                          num_microbatches=lay.microbatches, activation_checkpointing=lay.activation_checkpointing,
                          autocast_dtype=torch.bfloat16 if lay.bf16 else None, compile=lay.compile)
    full = engine.full_state_dict() if lay.full_state else None
    batch = dp_share(global_batch(cfg), grid.dp, grid.dp_rank)
    engine.zero_grad()
    res = engine.train_step(batch)
    tensors = {f"grad/{n}": _whole(p.grad).detach().clone() for n, p in engine.named_parameters()
               if p.grad is not None}
    ev = engine.eval_step(batch)
    still = all(torch.equal(_whole(p.grad), tensors[f"grad/{n}"]) for n, p in engine.named_parameters())
    norm = engine.clip_grad_norm_(1e9)
    clipped = engine.clip_grad_norm_(0.5 * norm)
    after = engine.clip_grad_norm_(1e9)
    repeat = {}
    if lay.repeat:
        assert not lay.adam
        engine.zero_grad()
        short = {**batch, "input_ids": batch["input_ids"][:, :-2], "attention_mask": batch["attention_mask"][:, :-2]}
        repeat["short_loss"] = engine.train_step(short).loss
        engine.zero_grad()
        repeat["repeat_loss"] = engine.train_step(batch).loss
        repeat["repeat_same_grads"] = all(
            torch.allclose(_whole(p.grad), tensors[f"grad/{n}"], atol=1e-6) for n, p in engine.named_parameters())
    if lay.adam:
        for _, p in engine.named_parameters():  # undo the clipping so the optimizer sees the raw gradients
            p.grad.mul_(2.0)
        opt = torch.optim.AdamW(engine.parameters(), lr=1e-3)
        opt.step()
        names = {id(p): n for n, p in engine.named_parameters()}
        for p, st in opt.state.items():
            tensors[f"exp_avg/{names[id(p)]}"] = _whole(st["exp_avg"])
            tensors[f"exp_avg_sq/{names[id(p)]}"] = _whole(st["exp_avg_sq"])
        tensors.update({f"weight/{n}": t for n, t in engine.local_state_dict().items()})
    if full is not None:
        tensors.update({f"full/{n}": t for n, t in full.items()})
    save_file({k: v.contiguous() for k, v in tensors.items()}, os.path.join(out, f"rank{rank}.safetensors"))
    meta = {"specs": {n: s.to_dict() for n, s in engine.shard_spec().items()},
            "trainable": [n for n, _ in engine.named_parameters()],
            "loss": res.loss, "num_tokens": res.num_tokens, "dp_rank": grid.dp_rank,
            "eval_loss": ev.loss, "eval_left_grads_alone": still,
            "example_loss_sum": res.example_loss_sum.tolist(), "example_tokens": res.example_tokens.tolist(),
            "norm": norm, "norm_before_clip": clipped, "norm_after_clip": after,
            "full_state_is_none": full is None, **repeat}
    with open(os.path.join(out, f"rank{rank}.json"), "w") as f:
        json.dump(meta, f)
    grid.destroy()


def _whole(t: torch.Tensor) -> torch.Tensor:
    """The TP shard of a tensor that FSDP2 also shards over DP (a DTensor), or the tensor itself."""
    return t.full_tensor() if hasattr(t, "full_tensor") else t
