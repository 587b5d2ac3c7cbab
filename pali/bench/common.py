"""Shared pieces of the benchmark suites: environment record, interleaved timing, synthetic batches."""

from __future__ import annotations

import datetime
import math
import os
import platform
import statistics
import subprocess
import time
from collections.abc import Callable
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[2]


def cpu_model() -> str:
    """The CPU's marketing name from /proc/cpuinfo (else `platform.processor()`)."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def git_commit() -> str:
    """HEAD of the repository (with '+dirty' when the work tree has changes), or 'unknown'."""
    try:
        head = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, check=True,
                              cwd=REPO).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], capture_output=True,
                               text=True, check=True, cwd=REPO).stdout.strip()
        return head + ("+dirty" if dirty else "")
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def environment(threads: int) -> dict:
    """Hardware, library versions, commit, date and machine load: recorded next to every result."""
    import ray
    import transformers

    try:
        load = [round(x, 2) for x in os.getloadavg()]
    except OSError:
        load = None
    return {"date": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
            "commit": git_commit(), "cpu": cpu_model(), "cores": os.cpu_count(),
            "gpu": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
            "platform": platform.platform(), "python": platform.python_version(), "torch": torch.__version__,
            "ray": ray.__version__, "transformers": transformers.__version__, "torch_threads": threads,
            "load_avg_at_start": load}


def median(xs: list[float]) -> float:
    """Median of a non-empty list."""
    if not xs:
        raise ValueError("median of no measurements; expected at least one repeat")
    return float(statistics.median(xs))


def time_side_by_side(fns: dict[str, Callable[[], object]], repeats: int, warmup: int = 1,
                      min_time_s: float = 0.0, max_repeats: int = 100) -> dict[str, list[float]]:
    """Wall seconds of each function, run in alternating order (A B, B A, ...) so that load on a shared
    machine hits every side alike. `warmup` untimed rounds first. Returns name -> timings.

    At least `repeats` rounds; more (up to `max_repeats`) when the warm-up says that `repeats` rounds
    would take less than `min_time_s`, so that millisecond-scale steps get a median over enough samples
    to ride out a noisy neighbour (as timeit calibrates its loop count)."""
    if repeats < 1:
        raise ValueError(f"repeats={repeats}; expected >= 1")
    names = list(fns)
    round_s = 0.0
    for _ in range(warmup):
        t = time.perf_counter()
        for n in names:
            fns[n]()
        round_s = time.perf_counter() - t
    if min_time_s > 0 and round_s > 0:
        repeats = max(repeats, min(max_repeats, math.ceil(min_time_s / round_s)))
    out: dict[str, list[float]] = {n: [] for n in names}
    for r in range(repeats):
        for n in (names if r % 2 == 0 else names[::-1]):
            t = time.perf_counter()
            fns[n]()
            out[n].append(time.perf_counter() - t)
    return out


def synthetic_batch(cfg, batch_size: int, prompt_len: int, target_len: int, seed: int = 0,
                    ragged: bool = True) -> dict[str, torch.Tensor]:
    """A deterministic training batch: images, right-padded prompts and ragged targets (0 = pad).

    Prompt lengths cycle between prompt_len and prompt_len // 2, target lengths between target_len and
    target_len // 2, so both sides must handle padding. ragged=False: every token real, every target
    ending in eos (what MFU counts).
    """
    g = torch.Generator().manual_seed(seed)
    v, t = cfg.vision, cfg.text
    ids = torch.randint(3, t.vocab_size, (batch_size, prompt_len), generator=g)
    mask = torch.ones_like(ids)
    labels = torch.randint(3, t.vocab_size, (batch_size, target_len), generator=g)
    for i in range(batch_size):
        if ragged and i % 2:
            mask[i, max(1, prompt_len // 2):] = 0
            labels[i, max(1, target_len // 2):] = 0
        else:
            labels[i, -1] = t.eos_token_id
    return {"pixel_values": torch.randn(batch_size, v.channels, v.image_size, v.image_size, generator=g),
            "input_ids": ids * mask, "attention_mask": mask, "labels": labels}


def batch_tokens(cfg, batch: dict[str, torch.Tensor]) -> tuple[int, int, int]:
    """(visual tokens, real prompt tokens, real target tokens) of a batch."""
    b = batch["input_ids"].shape[0]
    visual = b * cfg.vision.num_tokens if batch.get("pixel_values") is not None else 0
    return visual, int(batch["attention_mask"].sum()), int((batch["labels"] > 0).sum())
