"""How fast does the tiny ViT alone learn the synthetic scenes? (training-section experiment of README)

Trains `pali.models.vit.ViT` with a linear head on mean-pooled tokens against direct labels (which shapes,
which colours, how many objects) of the synthetic corpus, one thread, and prints held-out exact-set
accuracy every 500 steps. Geometry is the variable that matters::

    python -m pali.bench.grounding.vit_probe                          # 64 px / 8 px (tiny preset)
    python -m pali.bench.grounding.vit_probe --image 48 --patch 16    # one object per patch
"""

from __future__ import annotations

import argparse
import dataclasses
import time

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

import pali
from pali.config import get_preset
from pali.data.lexicon import COLOURS, SHAPES
from pali.data.pipeline import normalize_images
from pali.data.synthetic import render_scene, sample_scene


def scenes(n: int, seed: int, image: int) -> tuple[torch.Tensor, ...]:
    """Images and labels: shape multi-hot [n, 6], colour multi-hot [n, 6], object count - 1 [n]."""
    rng = np.random.default_rng(seed)
    images, shapes, colours, counts = [], [], [], []
    for _ in range(n):
        groups, sign = sample_scene(rng)
        images.append(np.asarray(render_scene(groups, "word" if sign else None, "en", rng, image)))
        shapes.append([float(any(g.shape == s for g in groups)) for s in SHAPES])
        colours.append([float(any(g.colour == c for g in groups)) for c in COLOURS])
        counts.append(sum(g.count for g in groups) - 1)
    return (torch.from_numpy(normalize_images(np.stack(images))), torch.tensor(shapes), torch.tensor(colours),
            torch.tensor(counts))


def train_on_labels(vit: nn.Module, data: tuple[torch.Tensor, ...], steps: int, lr: float = 1e-3,
                    on_step=None) -> nn.Module:
    """Train `vit` and a linear head on mean-pooled tokens against `scenes` labels (batch 32, AdamW, linear
    warmup then inverse-sqrt decay); `on_step(step, logits_fn)` is called after each step. Returns the head."""
    head = nn.Linear(vit.cfg.width, 6 + 6 + 3)
    opt = torch.optim.AdamW([*vit.parameters(), *head.parameters()], lr=lr, weight_decay=0.0)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min((s + 1) / 100, (100 / (s + 1)) ** 0.5))

    def logits(x: torch.Tensor) -> torch.Tensor:
        return head(vit(x).mean(1))

    gen = torch.Generator().manual_seed(0)
    for step in range(1, steps + 1):
        idx = torch.randint(0, len(data[0]), (32,), generator=gen)
        out = logits(data[0][idx])
        loss = (F.binary_cross_entropy_with_logits(out[:, :6], data[1][idx])
                + F.binary_cross_entropy_with_logits(out[:, 6:12], data[2][idx])
                + F.cross_entropy(out[:, 12:], data[3][idx]))
        opt.zero_grad()
        loss.backward()
        opt.step()
        sched.step()
        if on_step is not None:
            on_step(step, logits)
    return head


def tiny_vit(image: int, patch: int, width: int = 96, depth: int = 2) -> nn.Module:
    """The tiny preset's vision tower at this geometry, initialised as `pali.create_model` does."""
    cfg = get_preset("tiny")
    vision = dataclasses.replace(cfg.vision, image_size=image, patch_size=patch, width=width, depth=depth,
                                 mlp_dim=2 * width)
    return pali.create_model(dataclasses.replace(cfg, vision=vision), seed=0).vision_tower


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--image", type=int, default=64)
    p.add_argument("--patch", type=int, default=8)
    p.add_argument("--width", type=int, default=96)
    p.add_argument("--depth", type=int, default=2)
    p.add_argument("--steps", type=int, default=1500)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--examples", type=int, default=4096)
    a = p.parse_args(argv)
    torch.set_num_threads(1)
    torch.manual_seed(0)
    train, test = scenes(a.examples, 0, a.image), scenes(512, 1, a.image)
    start = time.time()

    def report(step: int, logits) -> None:
        if step % 500:
            return
        with torch.no_grad():
            out = torch.cat([logits(test[0][i:i + 128]) for i in range(0, len(test[0]), 128)])
        shape = ((out[:, :6] > 0).float() == test[1]).all(1).float().mean().item()
        colour = ((out[:, 6:12] > 0).float() == test[2]).all(1).float().mean().item()
        count = (out[:, 12:].argmax(1) == test[3]).float().mean().item()
        print(f"step {step}: shape set {shape:.3f}  colour set {colour:.3f}  count {count:.3f}  "
              f"({time.time() - start:.0f} s)", flush=True)

    train_on_labels(tiny_vit(a.image, a.patch, a.width, a.depth), train, a.steps, a.lr, on_step=report)

if __name__ == "__main__":
    main()
