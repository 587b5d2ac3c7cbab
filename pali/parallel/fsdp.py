"""FSDP2 (`fully_shard`) over the data-parallel group, the optional alternative to DDP (dp_mode="fsdp").

Each transformer block is its own FSDP unit (except the T5 blocks owning the relative position bias), then
the stage module as the root. Parameters become DTensors
sharded over the DP mesh; TP (fairscale) and PP compose with it because FSDP2 unshards to plain tensors
before each block's forward and backward.
"""

from __future__ import annotations

import torch
from torch import nn

from pali.parallel.grid import Grid
from pali.parallel.stages import iter_blocks


def wrap_fsdp(module: nn.Module, grid: Grid, device: torch.device) -> nn.Module:
    """Shard `module` (a stage module) with FSDP2 over grid.dp_group; returns the same module, now FSDP."""
    from torch.distributed.device_mesh import DeviceMesh
    from torch.distributed.fsdp import fully_shard

    mesh = DeviceMesh.from_group(grid.dp_group, device_type=device.type)
    for block in iter_blocks(module):
        # The T5 stack reads block 0's relative_attention_bias outside block 0's forward, so that
        # block stays in the root unit (unsharded for the whole stage forward).
        if not any(n.endswith("relative_attention_bias") for n, _ in block.named_modules()):
            fully_shard(block, mesh=mesh)
    fully_shard(module, mesh=mesh)
    return module
