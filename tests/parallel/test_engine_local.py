"""Grid validation and the engine on a one-process gloo world (no spawn: fast)."""

from __future__ import annotations

import pytest
import torch
import torch.distributed as dist

from pali.checkpoint import create_model
from pali.parallel import Grid, build_engine
from tests.parallel.harness import global_batch


def test_grid_needs_a_process_group():
    if dist.is_initialized():
        pytest.skip("default group present")
    with pytest.raises(RuntimeError, match="init_process_group"):
        Grid.init()


@pytest.fixture(scope="module")
def world1(tmp_path_factory):
    """A one-rank gloo process group in this process (torn down after the module)."""
    if dist.is_initialized():
        pytest.skip("a default process group already exists in this process")
    store = tmp_path_factory.mktemp("store") / "store"
    dist.init_process_group("gloo", init_method=f"file://{store}", rank=0, world_size=1)
    yield
    dist.destroy_process_group()


def test_grid_validates_degrees_by_name(world1):
    with pytest.raises(ValueError, match=r"dp\*pp\*tp = 2\*1\*1 = 2 but the world size is 1"):
        Grid.init(dp=2, pp=1, tp=1)
    with pytest.raises(ValueError, match="not a multiple of pp\\*tp"):
        Grid.init(pp=2)
    with pytest.raises(ValueError, match="tp=0"):
        Grid.init(tp=0)
    grid = Grid.init()
    assert (grid.dp, grid.pp, grid.tp, grid.rank) == (1, 1, 1, 0) and grid.is_first_stage and grid.is_last_stage
    again = Grid.init(dp=1, pp=1, tp=1)  # rebuilding replaces the previous grid
    assert again.tp_rank == 0
    again.destroy()


def test_microbatches_and_state_in_one_process(world1, tiny_config):
    """Gradient accumulation over 3 uneven micro-batches equals one pass over the batch."""
    grid = Grid.init()
    torch.manual_seed(1234)
    before = torch.rand(3)
    torch.manual_seed(1234)
    engine = build_engine(tiny_config, grid, seed=0, num_microbatches=3)
    assert torch.equal(torch.rand(3), before), "build_engine must not reseed the caller's RNG"
    batch = global_batch(tiny_config)
    res = engine.train_step(batch)
    ref = create_model(tiny_config, seed=0)
    out = ref(batch["pixel_values"], batch["input_ids"], batch["attention_mask"], labels=batch["labels"],
              image_mask=batch["image_mask"])
    out.loss.backward()
    assert res.loss == pytest.approx(out.loss.item(), rel=1e-6) and res.num_tokens == int(out.num_tokens)
    assert res.example_tokens.tolist() == (batch["labels"] != 0).sum(1).tolist()
    want = dict(ref.named_parameters())
    for name, p in engine.named_parameters():
        torch.testing.assert_close(p.grad, want[name].grad, atol=1e-5, rtol=1e-5, msg=name)
    full = engine.full_state_dict()
    assert all(torch.equal(full[n], t) for n, t in ref.state_dict().items())
    engine.zero_grad()
    assert all(p.grad is None for p in engine.parameters())
    with pytest.raises(KeyError, match="labels"):
        engine.train_step({k: v for k, v in batch.items() if k != "labels"})
    with pytest.raises(ValueError, match="num_microbatches=3"):
        engine.train_step({k: v[:2] for k, v in batch.items()})
    with pytest.raises(ValueError, match="dp_mode='zero'"):
        build_engine(tiny_config, grid, dp_mode="zero")
    grid.destroy()


def test_frozen_vision_has_no_trainable_vision_params(world1, tiny_config):
    grid = Grid.init()
    cfg = tiny_config.with_overrides(freeze_vision=True)
    engine = build_engine(cfg, grid, full_state=create_model(tiny_config, seed=3).state_dict(),
                          activation_checkpointing=True)
    assert not any(n.startswith("vision_tower.") for n, _ in engine.named_parameters())
    assert any(n.startswith("vision_tower.") for n in engine.local_state_dict())
    engine.train_step(global_batch(cfg))
    assert all(p.grad is not None for p in engine.parameters())
    grid.destroy()


@pytest.mark.slow
def test_compiled_engine_matches_eager_without_recompiling(world1, tiny_config):
    """build_engine(compile=True): the eager engine's loss and gradients over updated weights, one graph for
    every step, and bad token ids still refused by name (the compiled graph leaves those checks out)."""
    from torch._dynamo.utils import counters

    # One block per stack: the same code paths as the tiny preset, a shorter cold compile (~1 min on 2 cores).
    cfg = tiny_config.with_overrides(vision__depth=1, text__num_layers=1, text__num_decoder_layers=1)
    grid = Grid.init()
    torch._dynamo.reset()
    counters.clear()
    engines = [build_engine(cfg, grid, seed=0, num_microbatches=2, compile=c) for c in (False, True)]
    assert engines[1].compiled and not engines[0].compiled
    batch = global_batch(cfg)
    for _ in range(2):
        eager, comp = (e.train_step(batch) for e in engines)
        assert comp.loss == pytest.approx(eager.loss, rel=1e-5)
        assert torch.allclose(comp.example_loss_sum, eager.example_loss_sum, rtol=1e-5)
        got = dict(engines[1].named_parameters())
        for name, p in engines[0].named_parameters():
            torch.testing.assert_close(got[name].grad, p.grad, atol=1e-5, rtol=1e-4, msg=name)
        with torch.no_grad():  # the same SGD step on both: the next step runs the graph on new weights
            for e in engines:
                for p in e.parameters():
                    p -= 0.5 * p.grad
                e.zero_grad()
    assert counters["stats"]["unique_graphs"] == 1, dict(counters["stats"])
    bad = {**batch, "input_ids": batch["input_ids"].clone()}
    bad["input_ids"][0, 0] = cfg.text.vocab_size
    with pytest.raises(ValueError, match=f"input_ids must lie in \\[0, {cfg.text.vocab_size}\\)"):
        engines[1].train_step(bad)
    bad = {**batch, "labels": batch["labels"].clone()}
    bad["labels"][1, 0] = -5
    with pytest.raises(ValueError, match="labels must lie in"):
        engines[1].train_step(bad)
    grid.destroy()
