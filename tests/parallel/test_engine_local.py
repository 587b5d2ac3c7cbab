"""Grid validation and the engine on a one-process gloo world (no spawn: fast)."""

from __future__ import annotations

import pytest
import torch
import torch.distributed as dist

from pali.factory import create_model
from pali.parallel import Grid, build_engine
from tests.parallel.harness import global_batch


def test_grid_needs_a_process_group():
    if dist.is_initialized():
        pytest.skip("default group present")
    with pytest.raises(RuntimeError, match="init_process_group"):
        Grid.init()


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


def _pad_columns(batch: dict[str, torch.Tensor], prompt: int, target: int) -> dict[str, torch.Tensor]:
    """The batch with `prompt` / `target` more all-padding columns, as the data pipeline's fixed lengths add."""
    def pad(t: torch.Tensor, n: int) -> torch.Tensor:
        return torch.cat([t, torch.zeros(t.shape[0], n, dtype=t.dtype)], 1)
    return {**batch, "input_ids": pad(batch["input_ids"], prompt),
            "attention_mask": pad(batch["attention_mask"], prompt), "labels": pad(batch["labels"], target)}


def test_trim_padding_cuts_only_all_padding_tail_columns():
    from pali.parallel.engine import trim_multiple, trim_padding

    assert (trim_multiple(torch.device("cpu")), trim_multiple(torch.device("cuda", 0))) == (1, 8)
    ids = torch.tensor([[5, 6, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0], [0, 7, 8, 9, 0, 0, 0, 0, 0, 0, 0, 0]])
    mask = (ids != 0).long()  # row 1 is left-padded: its leading pad column stays
    labels = torch.tensor([[4, 0, 0, 0, 0, 0, 0, 0, 0], [3, 3, -100, -100, 9, 0, 0, 0, 0]])
    i, m, lab = trim_padding(ids, mask, labels, pad_id=0, multiple=2)
    assert i.tolist() == ids[:, :4].tolist() and m.tolist() == mask[:, :4].tolist()
    assert lab.tolist() == labels[:, :6].tolist()  # the real target at column 4 keeps -100 before it
    i, m, lab = trim_padding(ids, mask, labels, pad_id=0, multiple=8)
    assert (i.shape[1], lab.shape[1]) == (8, 8)
    i, m, lab = trim_padding(ids, mask, labels, pad_id=0, multiple=64)  # never longer than the padded batch
    assert (i.shape[1], lab.shape[1]) == (12, 9)
    i, m, lab = trim_padding(ids * 0, mask * 0, labels * 0, pad_id=0, multiple=1)  # nothing real: keep one
    assert (i.shape[1], m.shape[1], lab.shape[1]) == (1, 1, 1)


def test_trimmed_batches_and_packed_head_match_the_padded_step(world1, tiny_config):
    """The default engine (all-padding tail columns cut, output head at real targets only) gives the loss,
    per-example sums and gradients of the engine that runs every padded position, and its stage really
    sees the shorter batch and returns one logit row per real target, also for a micro-batch without any."""
    grid = Grid.init()
    trimmed = build_engine(tiny_config, grid, seed=0, num_microbatches=2)
    padded = build_engine(tiny_config, grid, seed=0, num_microbatches=2, trim_padding=False)
    assert trimmed.trim and not padded.trim
    seen = []
    trimmed.module.register_forward_hook(lambda mod, args, out: seen.append(
        (args[1].shape[1], args[-1].shape[1], tuple(out.shape), int((args[-1] != 0).sum()))))
    batch = _pad_columns(global_batch(tiny_config), prompt=13, target=12)  # lengths 20 and 18
    no_targets = {**batch, "labels": batch["labels"].clone()}
    no_targets["labels"][:2] = 0  # the first micro-batch has no real target at all
    for b, lengths in ((batch, (7, 6)), (no_targets, (7, 5))):  # the longest prompt and target (CPU: exact)
        seen.clear()
        want, got = padded.train_step(b), trimmed.train_step(b)
        assert got.loss == pytest.approx(want.loss, rel=1e-6) and got.num_tokens == want.num_tokens
        torch.testing.assert_close(got.example_loss_sum, want.example_loss_sum, atol=1e-5, rtol=1e-6)
        assert torch.equal(got.example_tokens, want.example_tokens)
        ref = dict(padded.named_parameters())
        for name, p in trimmed.named_parameters():
            torch.testing.assert_close(p.grad, ref[name].grad, atol=1e-5, rtol=1e-5, msg=name)
        for prompt_len, target_len, out_shape, real in seen:
            assert (prompt_len, target_len) == lengths
            assert out_shape == (real, tiny_config.text.vocab_size)
        trimmed.zero_grad()
        padded.zero_grad()
    assert seen[0][3] == 0
    ev_t, ev_p = trimmed.eval_step(batch), padded.eval_step(batch)
    assert ev_t.loss == pytest.approx(ev_p.loss, rel=1e-6)
    grid.destroy()


def test_token_loss_refuses_packed_logits_of_the_wrong_length():
    from pali.parallel.stages import TokenLoss

    labels = torch.tensor([[5, 6, 0], [7, 0, 0]])
    loss = TokenLoss(pad_id=0, vocab_parallel=False)
    assert loss(torch.zeros(3, 10), labels).item() == pytest.approx(3 * torch.log(torch.tensor(10.0)).item())
    with pytest.raises(ValueError, match="packed logits have 4 rows for 3 real targets"):
        loss(torch.zeros(4, 10), labels)


@pytest.mark.parametrize("frozen", [False, True])
def test_chunked_loss_and_flex_attention_engine_equals_the_reference(world1, tiny_config, monkeypatch, frozen):
    """The GPU defaults on CPU: the chunked head + loss (`ChunkedLossStage`, chunks of 5 rows), FlexAttention
    for T5 and, with the tower frozen, its forward under inference_mode, give the reference model's loss,
    per-example sums and every gradient (fp32, 1e-5)."""
    from pali.models import chunked_loss

    monkeypatch.setattr(chunked_loss, "CHUNK_ELEMENTS", 5 * tiny_config.text.vocab_size)
    cfg = tiny_config.with_overrides(freeze_vision=frozen)
    grid = Grid.init()
    engine = build_engine(cfg, grid, seed=0, num_microbatches=2, chunked_loss=True, attention="flex")
    assert engine.chunked_loss and engine.attention == "flex" and not engine.compiled
    batch = global_batch(cfg)
    res = engine.train_step(batch)
    ref = create_model(cfg, seed=0)
    out = ref(batch["pixel_values"], batch["input_ids"], batch["attention_mask"], labels=batch["labels"],
              image_mask=batch["image_mask"])
    out.loss.backward()
    assert res.loss == pytest.approx(out.loss.item(), rel=1e-6) and res.num_tokens == int(out.num_tokens)
    want = dict(ref.named_parameters())
    names = [n for n, _ in engine.named_parameters()]
    assert any(n.startswith("vision_tower.") for n in names) != frozen
    for name, p in engine.named_parameters():
        torch.testing.assert_close(p.grad, want[name].grad, atol=1e-5, rtol=1e-5, msg=name)
    grid.destroy()
