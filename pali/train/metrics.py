"""Per-step training metrics: metrics.jsonl, TensorBoard scalars and a PNG of the loss curves.

Written by global rank 0 only. Ray's `train.report` is a ~2 s barrier here, so per-step numbers go to
files and Ray only sees checkpoints (docs/design.md "Ray facts that bite").
"""

from __future__ import annotations

import json
import os
import time
from collections import defaultdict
from pathlib import Path
from typing import Any

# Dense peak FLOP/s used for the MFU estimate. CPU: 2 FMA units x 8 fp32 lanes x 2 FLOPs per core-cycle
# at ~2.5 GHz (AVX2); a rough figure, stated as such in the README.
PEAK_FLOPS = {"h100": 989e12, "h200": 989e12, "a100": 312e12, "cpu_core": 80e9}


def peak_flops(use_gpu: bool, num_workers: int) -> float:
    """Peak FLOP/s of the hardware the run uses (GPU name from torch, else CPU cores)."""
    if use_gpu:
        import torch

        name = torch.cuda.get_device_name(0).lower() if torch.cuda.is_available() else "h100"
        key = next((k for k in ("h200", "h100", "a100") if k in name), "h100")
        return PEAK_FLOPS[key] * num_workers
    return PEAK_FLOPS["cpu_core"] * (os.cpu_count() or 1)


class MetricsLogger:
    """Appends step records to metrics.jsonl and TensorBoard; draws loss curves on close."""

    def __init__(self, out_dir: str | os.PathLike, enabled: bool = True):
        self.enabled = enabled
        self.out = Path(out_dir)
        self.tb = None
        if not enabled:
            return
        self.out.mkdir(parents=True, exist_ok=True)
        self.path = self.out / "metrics.jsonl"
        try:
            from torch.utils.tensorboard import SummaryWriter

            self.tb = SummaryWriter(str(self.out / "tensorboard"))
        except Exception as e:  # TensorBoard is optional at run time; the jsonl is the record
            print(f"[pali] TensorBoard disabled: {e}")

    def log(self, step: int, record: dict[str, Any]) -> None:
        """Write one record (numbers only go to TensorBoard)."""
        if not self.enabled:
            return
        rec = {"step": step, "time": time.time(), **record}
        with open(self.path, "a") as f:
            f.write(json.dumps(rec) + "\n")
        if self.tb is not None:
            for k, v in record.items():
                if isinstance(v, (int, float)):
                    self.tb.add_scalar(k, v, step)
            self.tb.flush()

    def close(self) -> None:
        """Flush TensorBoard and draw `loss_curves.png`."""
        if not self.enabled:
            return
        if self.tb is not None:
            self.tb.close()
        plot_loss_curves(self.path, self.out / "loss_curves.png")


def read_metrics(path: str | os.PathLike) -> list[dict]:
    """Records of a metrics.jsonl (later records of a resumed step replace earlier ones)."""
    by_step: dict[int, dict] = {}
    p = Path(path)
    if not p.is_file():
        return []
    for line in p.read_text().splitlines():
        if line.strip():
            rec = json.loads(line)
            by_step[rec["step"]] = rec
    return [by_step[s] for s in sorted(by_step)]


def plot_loss_curves(metrics_path: str | os.PathLike, out_png: str | os.PathLike) -> Path | None:
    """PNG with the overall and per-task training loss against step."""
    recs = read_metrics(metrics_path)
    if not recs:
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    series: dict[str, list[tuple[int, float]]] = defaultdict(list)
    for r in recs:
        for k, v in r.items():
            if (k == "loss" or k.startswith("loss/")) and isinstance(v, (int, float)):
                series[k].append((r["step"], v))
    fig, ax = plt.subplots(figsize=(8, 4.5))
    for k, pts in sorted(series.items()):
        xs, ys = zip(*pts, strict=True)
        ax.plot(xs, ys, label=k, linewidth=2.0 if k == "loss" else 1.0)
    ax.set_xlabel("step")
    ax.set_ylabel("token cross-entropy")
    ax.set_yscale("log")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    ax.set_title("PaLI training loss")
    fig.tight_layout()
    fig.savefig(out_png, dpi=100)
    plt.close(fig)
    return Path(out_png)
