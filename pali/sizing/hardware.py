"""Accelerators the planner knows: memory, dense bf16 peak, and the links between them.

Numbers are the vendors' datasheet values (dense, no sparsity). Bandwidths are per GPU and per direction:
NVLink 4 (H100/H200 SXM) 450 GB/s, NVLink 3 (A100 SXM) 300 GB/s; between nodes one 400 Gb/s NIC per
GPU (H100/H200 clusters, 50 GB/s) or one 200 Gb/s NIC per GPU (A100 clusters, 25 GB/s).
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class GPU:
    """One accelerator type."""

    name: str
    """Short name used on the command line."""
    memory_bytes: float
    """Device memory in bytes (decimal GB as sold: 141 GB, 80 GB)."""
    peak_flops: float
    """Dense bf16 peak, FLOP/s."""
    intra_node_bw: float
    """Bytes/s one GPU sends to its node peers (NVLink, one direction)."""
    inter_node_bw: float
    """Bytes/s one GPU sends to other nodes (its NIC share, one direction)."""


GPUS: dict[str, GPU] = {
    "h200": GPU("h200", 141e9, 989e12, 450e9, 50e9),
    "h100": GPU("h100", 80e9, 989e12, 450e9, 50e9),
    "a100": GPU("a100", 80e9, 312e12, 300e9, 25e9),
}


def get_gpu(name: str) -> GPU:
    """The GPU called `name` (case-insensitive)."""
    key = name.lower()
    if key not in GPUS:
        raise ValueError(f"unknown GPU {name!r}; expected one of {sorted(GPUS)}")
    return GPUS[key]
