"""Rank functions for the measured-memory test (module level so torch.multiprocessing can pickle them)."""

from __future__ import annotations

import json
import os
import time

import torch

from pali.config import PaLIConfig
from pali.sizing.measure import SavedActivationMeter, fsdp_unsharded_grad_bytes, state_bytes
from tests.parallel.harness import dp_share, global_batch


def measure_layouts(rank: int, world: int, cfg_json: str, layouts: list[dict], batch_kw: dict, out_dir: str) -> None:
    """Train two real steps per layout; record this rank's state bytes and peak saved-activation bytes."""
    from pali.parallel import Grid, build_engine

    cfg = PaLIConfig.from_dict(json.loads(cfg_json))
    batch = global_batch(cfg, **batch_kw)
    # Every target real: the planner sizes for that worst case (at pp = 1 the output head runs at real
    # targets only, so a ragged batch saves less than the formula counts).
    batch["labels"] = batch["labels"].masked_fill(batch["labels"] == 0, 5)
    results = []
    for lay in layouts:
        t0 = time.time()
        grid = Grid.init(dp=lay["dp"], pp=lay["pp"], tp=lay["tp"])
        engine = build_engine(cfg, grid, seed=0, dp_mode=lay["dp_mode"], num_microbatches=lay["microbatches"],
                              activation_checkpointing=lay["checkpointing"])
        opt = torch.optim.AdamW(engine.parameters(), lr=1e-4)
        local = dp_share(batch, grid.dp, grid.dp_rank)
        engine.train_step(local)  # step 1 creates the optimizer state
        opt.step()
        engine.zero_grad()
        meter = SavedActivationMeter()
        accumulated = _watch_fsdp_grads(engine) if lay["dp_mode"] == "fsdp" else []
        with meter:
            res = engine.train_step(local)
        assert meter.live == 0, f"{meter.live} saved bytes still alive after backward"
        opt.step()
        st = state_bytes(engine.model, opt)
        results.append({"name": lay["name"], "seconds": round(time.time() - t0, 2), "rank": rank,
                        "pp_rank": grid.pp_rank, "params": st.params,
                        "grads": st.grads, "optimizer": st.optimizer, "activations": meter.peak,
                        "fsdp_unsharded_grads": max(accumulated, default=0),
                        "loss": res.loss})
        engine.zero_grad()
        del engine, opt
    with open(os.path.join(out_dir, f"rank{rank}.json"), "w") as f:
        json.dump(results, f)


def _watch_fsdp_grads(engine) -> list[int]:
    """Record FSDP2's unsharded gradient bytes each time the loss runs (after the previous micro-batch's
    backward, while gradient sync is off)."""
    seen: list[int] = []
    loss_fn = engine.loss_fn

    class Watched:
        def __getattr__(self, name):
            return getattr(loss_fn, name)

        def __setattr__(self, name, value):
            setattr(loss_fn, name, value)

        def __call__(self, logits, labels):
            seen.append(fsdp_unsharded_grad_bytes(engine.module))
            return loss_fn(logits, labels)

    engine.loss_fn = Watched()
    return seen
