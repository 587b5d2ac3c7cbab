"""Fixtures for the core model tests: the tiny preset, built once per session with a fixed seed."""

from __future__ import annotations

import copy

import pytest
import torch

from pali import create_model


@pytest.fixture(scope="session")
def tiny_model():
    """The tiny preset in eval mode (shared: tests must not modify it; deep-copy first)."""
    return create_model("tiny", seed=0).eval()


@pytest.fixture(scope="session")
def eos_model(tiny_model):
    """The tiny model with a boosted EOS row in its output head, so some sequences stop early."""
    # The boost that gives a batch of early stops and full-length rows depends on the random init: search it.
    px, ids, mask = _batch(tiny_model.cfg, b=4)
    for boost in (2.0, 3.0, 4.0, 5.0, 6.0, 8.0, 10.0, 12.0, 16.0):
        m = copy.deepcopy(tiny_model).eval()
        with torch.no_grad():
            m.text.lm_head.weight[m.cfg.text.eos_token_id] *= boost
        out = m.generate(px, ids, mask, max_new_tokens=10)
        stopped = int((out == m.cfg.text.eos_token_id).any(1).sum())
        if out.shape[1] == 10 and 1 <= stopped <= 3:
            return m
    raise RuntimeError("no EOS boost gives a mix of early and late stops for this init")


@pytest.fixture(scope="session")
def make_batch():
    """A function building random (pixel_values, input_ids, attention_mask); row 1 padded after 4 tokens."""
    return _batch


def _batch(cfg, b: int = 3, s: int = 7, seed: int = 0, with_image: bool = True):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, cfg.text.vocab_size, (b, s), generator=g)
    mask = torch.ones_like(ids)
    if b > 1:
        mask[1, 4:] = 0
        ids[1, 4:] = cfg.text.pad_token_id
    px = torch.randn(b, cfg.vision.channels, cfg.vision.image_size, cfg.vision.image_size, generator=g) \
        if with_image else None
    return px, ids, mask
