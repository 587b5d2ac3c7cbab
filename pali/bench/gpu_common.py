"""Shared pieces of the GPU suite (`pali.bench.gpu`): what it measures (`GpuCheckConfig`), the ~1B bench
preset, the one-rank process group, all-real batches and random weights made on the device."""

from __future__ import annotations

import os
import tempfile
from dataclasses import dataclass, field

import torch
import torch.distributed as dist

import pali
from pali.bench.common import synthetic_batch
from pali.config import PaLIConfig, get_preset, mt5, vit


def one_b_config() -> PaLIConfig:
    """~1B parameters: ViT-L/16 at 224 px (0.3B) + mT5-base (0.58B, 250k vocabulary)."""
    return PaLIConfig(name="pali-1b-bench", vision=vit("L/16", 224), text=mt5("base"))


def bench_config(name: str) -> PaLIConfig:
    """A preset by name, plus `1b` (`one_b_config`)."""
    return one_b_config() if name == "1b" else get_preset(name)


@dataclass
class GpuCheckConfig:
    """What `run_gpu` measures."""

    device: str = "cuda"
    """cuda (nccl, bf16 autocast) or cpu (gloo, float32 only: a smoke run of the same code)."""
    mfu_runs: list[tuple[str, int, bool]] = field(default_factory=lambda: [
        ("small", 64, False), ("base", 64, False), ("1b", 64, False), ("1b", 0, False),
        ("pali-3b", 32, False), ("pali-3b", 64, False), ("pali-3b", 0, False), ("pali-3b", 128, True)])
    """(preset, batch size, activation checkpointing) of each MFU row; batch 0 = the micro-batch `jobs.plan`
    recommends for one H200 (`planner_batch`)."""
    prompt_len: int = 32
    """Prompt tokens per example in the MFU and decode rows (all real, no padding)."""
    target_len: int = 32
    """Target tokens per example in the MFU rows."""
    repeats: int = 6
    """Timed steps per MFU row (after 2 warm-up steps); the median is reported."""
    train_steps: int = 100
    """Steps of the tiny fixed-batch training run."""
    decode_preset: str = "pali-3b"
    """Preset of the decode rows."""
    decode_batches: tuple[int, ...] = (1, 8, 32)
    """Batch sizes of the decode rows."""
    max_new_tokens: int = 32
    """Tokens generated per decode row."""
    sections: tuple[str, ...] = ("ceiling", "parity", "train", "mfu", "profile", "decode", "decode_graph",
                                 "static_decode", "attention", "compile", "ray")
    """Which sections run."""
    attention_run: tuple[str, int] = ("pali-3b", 32)
    """(preset, batch size) of the FlexAttention vs dense-bias SDPA comparison."""
    compile_run: tuple[str, int] = ("1b", 32)
    """(preset, batch size) of the per-block compiled vs eager training step comparison."""
    ray_steps: int = 1000
    """Training steps of the run through Ray (`jobs.pretrain --use-gpu`, tiny preset), then served over HTTP."""
    out_dir: str = "benchmarks/results/gpu"
    """Where the Ray section leaves its job's logs (`ray/`)."""
    command: str = "python -m pali.bench.gpu"
    """The command line recorded with the results."""
    profile_run: tuple[str, int, bool] = ("pali-3b", 64, False)
    """(preset, batch size, activation checkpointing) of the profiled step."""
    static_decode_run: tuple[str, int, int] = ("small", 8, 32)
    """(preset, batch size, max_new_tokens) of the static-shape vs growing-cache decoding comparison."""



def init_single_process_group(device: torch.device) -> str:
    """A one-rank default process group on `device` (nccl + gloo on CUDA, gloo on CPU); returns the backend."""
    # As Ray Train's workers do with --use-gpu: nccl for CUDA tensors, gloo for the CPU-side bookkeeping.
    backend = "cpu:gloo,cuda:nccl" if device.type == "cuda" else "gloo"
    if not dist.is_initialized():
        store = os.path.join(tempfile.mkdtemp(prefix="pali-gpu-"), "store")  # no ports, no environment
        kw = {"device_id": device} if device.type == "cuda" else {}
        dist.init_process_group(backend, init_method=f"file://{store}", rank=0, world_size=1, **kw)
    return backend


def sync(device: torch.device) -> None:
    """Wait for the device's queued work (CUDA); nothing on CPU."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def full_batch(cfg: PaLIConfig, b: int, prompt_len: int, target_len: int, device, seed: int = 0) -> dict:
    """`synthetic_batch` with every prompt and target token real (MFU counts real tokens only), on `device`."""
    batch = synthetic_batch(cfg, b, prompt_len, target_len, seed=seed, ragged=False)
    return {k: v.to(device) for k, v in batch.items()}


class RandomState:
    """A lazy full state (`keys()` / `__getitem__`) of random weights made on the device: big presets are
    built in seconds instead of the CPU-side seeded init (the values do not change a step's speed)."""

    def __init__(self, cfg: PaLIConfig, device: torch.device, seed: int = 0):
        meta = pali.create_model(cfg, device="meta")
        self.shapes = {k: tuple(v.shape) for k, v in meta.state_dict().items()}
        self.device = device
        self.gen = torch.Generator(device=device).manual_seed(seed)

    def keys(self):
        return self.shapes.keys()

    def __getitem__(self, name: str) -> torch.Tensor:
        shape = self.shapes[name]
        if "norm" in name and name.endswith(".weight") and len(shape) == 1:
            return torch.ones(shape, device=self.device)
        if name.endswith(".bias"):
            return torch.zeros(shape, device=self.device)
        return torch.randn(shape, device=self.device, generator=self.gen) * 0.02

