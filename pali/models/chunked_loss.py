"""Output head + token cross-entropy in row chunks: the [N, V] logits never exist at once.

mT5's head maps every target position to 250k logits; a PaLI-3B step at batch 64 x 32 targets would hold
2048 x 250k fp32 log-probabilities (2 GB) for backward, plus the bf16 logits and their gradient. Here the
head and the loss run on `chunk_rows(V)` rows at a time under non-reentrant activation checkpointing
(`torch.utils.checkpoint`): forward keeps only each chunk's input rows (views of h) and returns the per-row
loss; backward recomputes one chunk's logits at a time, so the transient memory is one chunk's logits and
their gradient. The price is the head's forward run again in backward (+2*d*V FLOPs per target, counted as
hardware FLOPs by `pali.models.pali.hardware_flops_per_example`, not as model FLOPs).

Same loss and gradients as `F.cross_entropy(F.linear(h, W).float(), target)` (tests/models/test_chunked_loss.py).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

CHUNK_ELEMENTS = 1 << 26
"""Logits per chunk (64 M: 256 MB in fp32), so a chunk of mT5's 250k vocabulary is 268 rows."""


def chunk_rows(vocab_size: int, elements: int | None = None) -> int:
    """Rows (target positions) per chunk for a vocabulary of `vocab_size` logits (`CHUNK_ELEMENTS` each)."""
    return max(1, (elements or CHUNK_ELEMENTS) // max(vocab_size, 1))


def _chunk_loss(h: torch.Tensor, weight: torch.Tensor, target: torch.Tensor, scale: float | None) -> torch.Tensor:
    logits = F.linear(h if scale is None else h * scale, weight)  # (rows, V), autocast dtype
    return F.cross_entropy(logits.float(), target, reduction="none")  # (rows,) fp32


def chunked_cross_entropy(h: torch.Tensor, weight: torch.Tensor, target: torch.Tensor, scale: float | None = None,
                          rows: int | None = None) -> torch.Tensor:
    """Per-row cross-entropy float32[N] of logits `(h * scale) @ weight.T` against target int[N].

    h: float[N, D] head inputs (one row per real target); weight: float[V, D] (the lm_head, or the tied
    embedding with scale d_model**-0.5); rows: rows per chunk (default `chunk_rows(V)`).
    """
    if h.dim() != 2 or target.shape != h.shape[:1]:
        raise ValueError(f"h must be float[N, D] with target int[N]; got {tuple(h.shape)} and {tuple(target.shape)}")
    rows = rows or chunk_rows(weight.shape[0])
    if h.shape[0] <= rows:
        parts = [(h, target)]
    else:
        parts = list(zip(h.split(rows), target.split(rows), strict=True))
    grad = torch.is_grad_enabled() and (h.requires_grad or weight.requires_grad)
    out = [checkpoint(_chunk_loss, hc, weight, tc, scale, use_reentrant=False) if grad
           else _chunk_loss(hc, weight, tc, scale) for hc, tc in parts]
    return out[0] if len(out) == 1 else torch.cat(out)
