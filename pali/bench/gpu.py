"""Suite `gpu`: MFU of a ~1B-parameter PaLI (ViT-L/16 + mT5-base) training step in bf16 autocast.

Runs only where CUDA exists; elsewhere it returns a note saying it was skipped. MFU uses
`flops_per_example` and `pali.train.metrics.peak_flops`, as the trainer reports it.
"""

from __future__ import annotations

import time

import torch

import pali
from pali.bench.common import median, synthetic_batch
from pali.config import PaLIConfig, mt5, vit
from pali.models.pali import flops_per_example
from pali.train.metrics import peak_flops


def one_b_config() -> PaLIConfig:
    """~1B parameters: ViT-L/16 at 224 px (0.3B) + mT5-base (0.58B, 250k vocabulary)."""
    return PaLIConfig(name="pali-1b-bench", vision=vit("L/16", 224), text=mt5("base"))


def run_gpu_mfu(repeats: int = 5, batch_size: int = 16, prompt_len: int = 32, target_len: int = 32) -> dict:
    """Examples/s and MFU of the ~1B preset on the first GPU, or {"note": ...} without one."""
    if not torch.cuda.is_available():
        return {"note": "skipped: no CUDA GPU on this machine (MFU of the ~1B preset needs one)"}
    cfg = one_b_config()
    dev = torch.device("cuda")
    model = pali.create_model(cfg, seed=0).to(dev).train()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=True)
    batch = {k: v.to(dev) for k, v in synthetic_batch(cfg, batch_size, prompt_len, target_len).items()}

    def step() -> None:
        with torch.autocast("cuda", dtype=torch.bfloat16):
            loss = model(**batch).loss
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    step()
    times = []
    for _ in range(repeats):
        torch.cuda.synchronize()
        t = time.perf_counter()
        step()
        torch.cuda.synchronize()
        times.append(time.perf_counter() - t)
    eps = batch_size / median(times)
    prompt = float(batch["attention_mask"].sum()) / batch_size
    target = float((batch["labels"] > 0).sum()) / batch_size
    peak = peak_flops(True, 1)
    flops = flops_per_example(cfg, prompt, target)
    return {"preset": cfg.name, "params": model.num_parameters(), "gpu": torch.cuda.get_device_name(0),
            "batch_size": batch_size, "examples_per_s": eps, "flops_per_example": flops, "peak_flops": peak,
            "mfu": flops * eps / peak, "times": times}
