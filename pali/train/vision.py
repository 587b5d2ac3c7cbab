"""Classification pretraining of the vision tower, before the main phase (PaLI's ViT is JFT-pretrained).

PaLI never trains its ViT from scratch on captions: the tower is first trained to classify images
(JFT-3B), then kept frozen through the main 224 px phase. This stage does the same in miniature for a
model trained from scratch: the tower and a linear head on its mean-pooled tokens learn the shards'
image-level labels (the schema's `image_labels` column, e.g. `shape:star`, `colour:red`, `count:3`,
`text:<the sign's word>`) with a sigmoid cross-entropy per label, as JFT's multi-label training does.
The head is dropped; the tower's weights seed the main phase (`SeededState`), which then keeps the
tower frozen unless told otherwise.

Held-out quality is measured on the evaluation shards' labels: the exact label set right per label
family (the text before `:`).
"""

from __future__ import annotations

import hashlib
import json
import time
from collections.abc import Collection, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from pali.config import PaLIConfig
from pali.storage import ReadOnAccess

LABEL_FIELD = "image_labels"
PREFIX = "vision_tower."


@dataclass
class LabelledImages:
    """Decoded images and their label sets, read from shards."""

    pixels: torch.Tensor
    """float32[N, 3, H, W], normalised as the training pipeline does."""
    labels: list[list[str]] = field(default_factory=list)
    """Each image's labels."""
    malformed: int = 0
    """Rows skipped because the image did not decode."""


def load_labelled(shards: Sequence[str], image_size: int, max_examples: int, opts=None) -> LabelledImages:
    """Up to `max_examples` rows with labels from `shards` (in order), images preprocessed as in training.

    Rows without labels are passed over; rows whose image does not decode are counted and skipped.
    """
    from pali.data.pipeline import preprocess_image
    from pali.data.schema import iter_rows

    images: list[np.ndarray] = []
    labels: list[list[str]] = []
    bad = 0
    for row in iter_rows(shards, opts):  # lazy: stops reading at the limit
        if not row.get(LABEL_FIELD):
            continue
        try:
            images.append(preprocess_image(row["image"], image_size))
        except Exception:  # undecodable image bytes: count and keep going
            bad += 1
            continue
        labels.append(list(row[LABEL_FIELD]))
        if len(labels) >= max_examples:
            break
    pixels = torch.from_numpy(np.stack(images)) if images else torch.empty(0, 3, image_size, image_size)
    return LabelledImages(pixels, labels, bad)


def multi_hot(labels: list[list[str]], vocab: Sequence[str]) -> torch.Tensor:
    """float32[N, len(vocab)]; labels outside `vocab` are ignored."""
    index = {v: i for i, v in enumerate(vocab)}
    out = torch.zeros(len(labels), len(vocab))
    for r, row in enumerate(labels):
        for lab in row:
            if lab in index:
                out[r, index[lab]] = 1.0
    return out


def family_accuracy(logits: torch.Tensor, target: torch.Tensor, vocab: Sequence[str]) -> dict[str, float]:
    """Fraction of images whose whole label set is right, per label family (`shape` of `shape:star`) and
    over all labels (`all`)."""
    pred = logits > 0
    truth = target > 0.5
    out = {"all": float((pred == truth).all(1).float().mean())}
    families = sorted({v.split(":", 1)[0] for v in vocab})
    for fam in families:
        cols = [i for i, v in enumerate(vocab) if v.split(":", 1)[0] == fam]
        out[fam] = float((pred[:, cols] == truth[:, cols]).all(1).float().mean())
    return out


def build_tower(mcfg: PaLIConfig, seed: int) -> nn.Module:
    """The vision tower alone, initialised exactly as in `create_model(mcfg, seed=seed)`."""
    from pali.factory import init_tensor
    from pali.models.vit import ViT

    tower = ViT(mcfg.vision)
    with torch.no_grad():
        for name, t in tower.state_dict(keep_vars=True).items():
            t.copy_(init_tensor(mcfg, PREFIX + name, t.shape, seed))
    return tower


@dataclass
class VisionStageConfig:
    """What the stage trains on and for how long."""

    steps: int = 3000
    """Optimizer steps (0: no stage)."""
    batch: int = 32
    """Images per step."""
    lr: float = 1e-3
    """Peak lr of AdamW (linear warmup over `warmup`, then inverse-sqrt decay)."""
    warmup: int = 100
    """Warmup steps."""
    max_examples: int = 4096
    """Labelled training images read from the training shards."""
    eval_examples: int = 512
    """Labelled held-out images read from the evaluation shards."""
    seed: int = 0
    """Seed of the tower's init (the run's seed) and of the batch order."""
    read: Any = None
    """How to read the shards (`pali.data.schema.ReadOptions`: the run's column map and default language)."""

    def fingerprint(self, mcfg: PaLIConfig, shards: Sequence[str]) -> str:
        """Hash of everything the stage's result depends on (a cached result is reused only on a match)."""
        key = json.dumps({"stage": self.__dict__, "vision": mcfg.vision.__dict__, "shards": list(shards)},
                         sort_keys=True, default=str)
        return hashlib.sha256(key.encode()).hexdigest()[:16]


def pretrain_vision(mcfg: PaLIConfig, shards: Sequence[str], eval_shards: Sequence[str],
                    scfg: VisionStageConfig, device: str = "cpu", threads: int | None = None,
                    log=print) -> tuple[dict[str, torch.Tensor] | None, dict[str, Any]]:
    """Train the tower on the shards' image labels.

    Returns (the tower's weights named as in `PaLI.state_dict()`, a report), or (None, report with
    `skipped` saying why) when the training shards carry no labels.
    """
    if threads:
        torch.set_num_threads(threads)
    t0 = time.time()
    train = load_labelled(shards, mcfg.vision.image_size, scfg.max_examples, scfg.read)
    if not train.labels:
        return None, {"skipped": f"no row of the {len(shards)} training shards has {LABEL_FIELD}"}
    vocab = sorted({lab for row in train.labels for lab in row})
    held = load_labelled(eval_shards, mcfg.vision.image_size, scfg.eval_examples, scfg.read) if eval_shards else None
    y = multi_hot(train.labels, vocab)
    dev = torch.device(device)
    tower = build_tower(mcfg, scfg.seed).to(dev)
    head = nn.Linear(mcfg.vision.width, len(vocab)).to(dev)  # default init: a zero head starves the tower
    opt = torch.optim.AdamW([*tower.parameters(), *head.parameters()], lr=scfg.lr, weight_decay=1e-4)
    warm = max(1, scfg.warmup)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min((s + 1) / warm, (warm / (s + 1)) ** 0.5))
    gen = torch.Generator().manual_seed(scfg.seed)
    log_at = {max(1, scfg.steps * k // 4) for k in range(1, 5)}
    losses: list[float] = []
    tower.train()
    for step in range(1, scfg.steps + 1):
        idx = torch.randint(0, len(train.labels), (min(scfg.batch, len(train.labels)),), generator=gen)
        logits = head(tower(train.pixels[idx].to(dev)).mean(1))
        loss = F.binary_cross_entropy_with_logits(logits, y[idx].to(dev))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
        losses.append(loss.item())
        if step in log_at:
            log(f"[pali] vision pretraining step {step}/{scfg.steps}: loss {np.mean(losses[-50:]):.3f} "
                f"({time.time() - t0:.0f} s)")
    report: dict[str, Any] = {"steps": scfg.steps, "train_images": len(train.labels), "labels": len(vocab),
                              "label_families": sorted({v.split(':', 1)[0] for v in vocab}),
                              "first_loss": float(np.mean(losses[:10])) if losses else None,
                              "final_loss": float(np.mean(losses[-50:])) if losses else None,
                              "malformed_rows": train.malformed, "seconds": None}
    tower.eval()
    if held is not None and held.labels:
        with torch.no_grad():
            logits = torch.cat([head(tower(held.pixels[i:i + 256].to(dev)).mean(1)).cpu()
                                for i in range(0, len(held.labels), 256)])
        report["heldout_images"] = len(held.labels)
        report["heldout_exact_set"] = family_accuracy(logits, multi_hot(held.labels, vocab), vocab)
    report["seconds"] = round(time.time() - t0, 1)
    state = {PREFIX + k: v.detach().cpu().contiguous() for k, v in tower.state_dict().items()}
    return state, report


class SeededState(ReadOnAccess):
    """Every tensor of `create_model(cfg, seed=seed)`, with the ones in `overlay` replaced.

    A `full_state` for `build_engine`: the tower comes from the vision stage, everything else is the
    seeded init, generated one tensor at a time on access (`init_tensor`).
    """

    def __init__(self, cfg: PaLIConfig, seed: int, overlay: Mapping[str, torch.Tensor]):
        from pali.factory import create_model

        self.cfg, self.seed, self.overlay = cfg, seed, overlay
        self._shapes = {k: tuple(v.shape) for k, v in create_model(cfg, device="meta").state_dict().items()}
        unknown = [k for k in overlay.keys() if k not in self._shapes]
        if unknown:
            raise KeyError(f"{len(unknown)} overlay tensors are not in the model, e.g. {unknown[:3]}")
        for k in overlay.keys():
            if tuple(overlay[k].shape) != self._shapes[k]:
                raise ValueError(f"overlay tensor {k} has shape {tuple(overlay[k].shape)}; the model's is "
                                 f"{self._shapes[k]} (was the tower pretrained at another geometry?)")

    @property
    def names(self) -> Collection[str]:
        return self._shapes

    def __getitem__(self, name: str) -> torch.Tensor:
        from pali.factory import init_tensor

        if name in self.overlay:
            return self.overlay[name]
        return init_tensor(self.cfg, name, self._shapes[name], self.seed)
