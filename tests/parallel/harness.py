"""Spawn real gloo process groups on CPU and run a function on every rank (used by the parallel tests)."""

from __future__ import annotations

import os
import tempfile

import torch
import torch.distributed as dist
import torch.multiprocessing as mp


def _entry(rank: int, world: int, store_path: str, fn, args) -> None:
    os.environ["OMP_NUM_THREADS"] = "1"
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{store_path}", rank=rank, world_size=world)
    try:
        fn(rank, world, *args)
        dist.barrier()
    finally:
        dist.destroy_process_group()


def spawn(fn, world: int, *args) -> None:
    """Run fn(rank, world, *args) in `world` fresh processes joined by a gloo group; raises if any fails."""
    with tempfile.TemporaryDirectory() as tmp:
        mp.spawn(_entry, args=(world, os.path.join(tmp, "store"), fn, args), nprocs=world, join=True)


def global_batch(cfg, b: int = 4, s: int = 7, t: int = 6, seed: int = 123) -> dict[str, torch.Tensor]:
    """A deterministic batch with padded prompts, ragged targets and one text-only example."""
    g = torch.Generator().manual_seed(seed)
    v = cfg.vision
    ids = torch.randint(3, cfg.text.vocab_size, (b, s), generator=g)
    mask = torch.ones(b, s, dtype=torch.long)
    for i in range(b):
        mask[i, s - i:] = 0  # example i has i padded prompt positions
    ids = ids * mask
    labels = torch.randint(3, cfg.text.vocab_size, (b, t), generator=g)
    for i, n in enumerate([t, 2, t - 1, 4][:b] + [t] * max(0, b - 4)):
        labels[i, n:] = 0  # ragged targets: DP shards hold different token counts
    image_mask = torch.ones(b, dtype=torch.long)
    image_mask[min(2, b - 1)] = 0
    return {"pixel_values": torch.randn(b, v.channels, v.image_size, v.image_size, generator=g),
            "input_ids": ids, "attention_mask": mask, "labels": labels, "image_mask": image_mask}


def dp_share(batch: dict[str, torch.Tensor], dp: int, dp_rank: int) -> dict[str, torch.Tensor]:
    """Rows of the global batch that replica dp_rank trains on (contiguous, equal shares)."""
    return {k: v.chunk(dp)[dp_rank] for k, v in batch.items()}
