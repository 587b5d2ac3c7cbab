"""A frozen vision tower held in bf16 (`build_engine(frozen_dtype=...)`, the default on CUDA with bf16
autocast), run here on CPU with CPU bf16 autocast: the step trains, checkpoints keep the float32 tower, and
the planner counts the tower's weights at 2 bytes."""

from __future__ import annotations

import pytest
import torch

from pali.parallel import Grid, build_engine
from pali.sizing.measure import state_bytes
from pali.sizing.memory import Geometry
from pali.sizing.planner import rank_memory
from tests.parallel.harness import global_batch


def test_bf16_frozen_tower_trains_and_saves_float32(world1, tiny_config):
    cfg = tiny_config.with_overrides(freeze_vision=True)
    grid = Grid.init()
    batch = global_batch(cfg)
    kw = dict(seed=0, autocast_dtype=torch.bfloat16, compile=False)
    ref = build_engine(cfg, grid, frozen_dtype=torch.float32, **kw)
    eng = build_engine(cfg, grid, frozen_dtype=torch.bfloat16, **kw)
    assert build_engine(cfg, grid, **kw).model.vision_tower.pos_embed.dtype == torch.float32  # CPU default
    tower = dict(eng.model.vision_tower.named_parameters())
    assert all(p.dtype == torch.bfloat16 and not p.requires_grad for p in tower.values())
    assert eng.param_dtype == torch.float32 and all(p.dtype == torch.float32 for p in eng.parameters())
    a, b = ref.train_step(batch), eng.train_step(batch)
    assert b.loss == pytest.approx(a.loss, rel=2e-2)  # the same step, the tower's weights rounded to bf16
    ga = {n: p.grad for n, p in ref.named_parameters()}
    gb = {n: p.grad for n, p in eng.named_parameters()}
    assert ga.keys() == gb.keys() and all(gb[n] is not None for n in gb)
    cos = torch.nn.functional.cosine_similarity(torch.cat([g.flatten() for g in ga.values()]),
                                                torch.cat([g.flatten() for g in gb.values()]), dim=0)
    assert cos > 0.99
    # checkpoints: the exact float32 tower it was built from, every other tensor as the model holds it
    saved, want = eng.local_state_dict(), ref.local_state_dict()
    assert saved.keys() == want.keys()
    assert all(v.dtype == torch.float32 and torch.equal(v, want[k]) for k, v in saved.items())
    # the planner's parameter bytes under amp: the tower at 2 bytes, the rest at 4, as the engine holds them
    pred = rank_memory(cfg, 1, 1, 1, 0, Geometry(8, 6), 4, 1, precision="amp")
    assert pred.params == state_bytes(eng.model).params
    assert rank_memory(cfg, 1, 1, 1, 0, Geometry(8, 6), 4, 1, precision="fp32").params == \
        state_bytes(ref.model).params


def test_bf16_frozen_tower_needs_autocast(world1, tiny_config):
    cfg = tiny_config.with_overrides(freeze_vision=True)
    with pytest.raises(ValueError, match="needs autocast in that dtype"):
        build_engine(cfg, Grid.init(), seed=0, frozen_dtype=torch.bfloat16)
