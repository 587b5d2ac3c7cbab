"""The trainer's optimisation recipe for the one-process grounding probes (full_probe.py, binding_probe.py)."""

from __future__ import annotations

from collections.abc import Callable

import torch

from pali.train.config import TrainConfig
from pali.train.optim import build_optimizer, build_scheduler

INPUTS = ("pixel_values", "input_ids", "attention_mask", "labels")
"""The batch entries the model is called with."""


def train(model: torch.nn.Module, tc: TrainConfig, next_batch: Callable[[int], dict],
          evaluate: Callable[[int], None], eval_every: int) -> None:
    """`tc.steps` steps with the trainer's optimizer and schedule (`pali.train.optim`) and its gradient
    clipping (`tc.grad_clip`); `next_batch(step)` gives the step's batch, and `evaluate(steps_done)` runs
    every `eval_every` steps."""
    opt = build_optimizer(model.named_parameters(), tc)
    sched = build_scheduler(opt, tc)
    for step in range(tc.steps):
        b = next_batch(step)
        model(**{k: b[k] for k in INPUTS}).loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), tc.grad_clip)
        opt.step()
        sched.step()
        opt.zero_grad()
        if (step + 1) % eval_every == 0:
            evaluate(step + 1)
