"""The two-tower model: forward contract, target-only loss, frozen vision, FLOPs accounting, input errors."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils.flop_counter import FlopCounterMode

from pali import create_model
from pali.models.pali import flops_per_example


def test_forward_contract(tiny_model, make_batch):
    cfg = tiny_model.cfg
    px, ids, mask = make_batch(cfg, b=2)
    labels = torch.randint(3, cfg.text.vocab_size, (2, 5))
    out = tiny_model(pixel_values=px, input_ids=ids, attention_mask=mask, labels=labels)
    assert out.logits.shape == (2, 5, cfg.text.vocab_size)
    assert out.loss.ndim == 0 and int(out.num_tokens) == 10
    # Visual tokens come first in the encoder sequence (no pooling).
    assert out.encoder_hidden_states.shape == (2, cfg.vision.num_tokens + 7, cfg.text.d_model)
    assert tiny_model.vision(px).shape == (2, cfg.vision.num_tokens, cfg.vision.width)
    text_only = tiny_model(input_ids=ids, attention_mask=mask, labels=labels)
    assert text_only.encoder_hidden_states.shape[1] == 7
    assert not torch.allclose(text_only.logits, out.logits)


def test_loss_only_on_target_tokens(tiny_model, make_batch):
    px, ids, mask = make_batch(tiny_model.cfg, b=2)
    labels = torch.tensor([[11, 12, 13, 1, 0, 0], [21, 22, 1, 0, 0, 0]])
    with torch.no_grad():
        out = tiny_model(px, ids, mask, labels=labels)
        # reference: cross-entropy over the 7 real target tokens only
        real = labels != 0
        ref = F.cross_entropy(out.logits[real], labels[real])
        assert int(out.num_tokens) == 7 and torch.allclose(out.loss, ref, atol=1e-6)
        # -100 and pad mean the same; extra padding after the target changes nothing
        same = tiny_model(px, ids, mask, labels=labels.masked_fill(labels == 0, -100)).loss
        assert torch.allclose(same, out.loss, atol=1e-6)
        longer = tiny_model(px, ids, mask, labels=torch.cat([labels, torch.zeros(2, 3, dtype=torch.long)], 1)).loss
        assert torch.allclose(longer, out.loss, atol=1e-5)
        # one example alone gives its own mean
        alone = tiny_model(px[:1], ids[:1], mask[:1], labels=labels[:1, :4]).loss
        assert torch.allclose(alone, F.cross_entropy(out.logits[0, :4], labels[0, :4]), atol=1e-5)


def test_prompt_padding_is_ignored(tiny_model, make_batch):
    px, ids, mask = make_batch(tiny_model.cfg, b=2)
    labels = torch.tensor([[11, 12, 1]])
    with torch.no_grad():
        short = tiny_model(px[1:], ids[1:, :4], mask[1:, :4], labels=labels).logits
        padded = tiny_model(px[1:], ids[1:], mask[1:], labels=labels).logits
    assert torch.allclose(short, padded, atol=1e-5)


def test_frozen_vision_gets_no_grads(tiny_config, make_batch):
    model = create_model(tiny_config.with_overrides(freeze_vision=True), seed=0)
    px, ids, mask = make_batch(model.cfg, b=2)
    model(px, ids, mask, labels=torch.randint(3, 100, (2, 4))).loss.backward()
    assert all(p.grad is None and not p.requires_grad for p in model.vision_tower.parameters())
    assert model.projector.weight.grad is not None and model.projector.weight.grad.abs().sum() > 0
    assert all(p.grad is not None for p in model.text.parameters())
    model.freeze_vision(False)
    model.zero_grad()
    model(px, ids, mask, labels=torch.randint(3, 100, (2, 4))).loss.backward()
    assert model.vision_tower.patch_embed.weight.grad is not None


def test_image_mask_hides_visual_tokens(tiny_model, make_batch):
    """A text-only example in a mixed batch (image_mask 0) gets exactly its text-only logits.

    Relative position bias depends only on distances, so shifting the prompt behind masked visual tokens
    changes nothing.
    """
    px, ids, mask = make_batch(tiny_model.cfg, b=2)
    labels = torch.tensor([[11, 12, 1], [11, 12, 1]])
    with torch.no_grad():
        mixed = tiny_model(px, ids, mask, labels=labels, image_mask=torch.tensor([1, 0])).logits
        text_only = tiny_model(None, ids[1:], mask[1:], labels=labels[1:]).logits
        with_image = tiny_model(px[:1], ids[:1], mask[:1], labels=labels[:1]).logits
    assert torch.allclose(mixed[:1], with_image, atol=1e-5)
    assert torch.allclose(mixed[1:], text_only, atol=1e-5)


def test_set_image_size_changes_expected_size(tiny_config, make_batch):
    model = create_model(copy.deepcopy(tiny_config), seed=0).eval()
    px, ids, mask = make_batch(model.cfg, b=1)
    model.set_image_size(128)  # 48 -> 128 px, like 224 -> 448
    assert model.cfg.vision.image_size == 128
    with pytest.raises(ValueError, match="expected 3x128x128"):
        model(px, ids, mask, labels=torch.tensor([[5, 1]]))
    out = model(torch.randn(1, 3, 128, 128), ids, mask, labels=torch.tensor([[5, 1]]))
    assert out.encoder_hidden_states.shape[1] == (128 // model.cfg.vision.patch_size) ** 2 + 7


@pytest.mark.parametrize("shape, expected", [((2, 3, 32, 32), "expected 3x48x48"), ((2, 1, 48, 48), "expected 3x48x48"),
                                             ((3, 3, 48, 48), "3 images for 2 prompts")])
def test_bad_images_name_expected(tiny_model, make_batch, shape, expected):
    _, ids, mask = make_batch(tiny_model.cfg, b=2)
    with pytest.raises(ValueError, match=expected):
        tiny_model(torch.randn(*shape), ids, mask, labels=torch.tensor([[5, 1], [6, 1]]))


def test_bad_token_ids_and_masks(tiny_model, make_batch):
    px, ids, mask = make_batch(tiny_model.cfg, b=2)
    bad = ids.clone()
    bad[0, 0] = tiny_model.cfg.text.vocab_size
    with pytest.raises(ValueError, match=r"\[0, 2048\)"):
        tiny_model(px, bad, mask, labels=torch.tensor([[5, 1], [6, 1]]))
    with pytest.raises(ValueError, match=r"\[0, 2048\)"):
        tiny_model(px, ids, mask, labels=torch.tensor([[5, 4096], [6, 1]]))
    with pytest.raises(ValueError, match="attention_mask shape"):
        tiny_model(px, ids, mask[:, :3], labels=torch.tensor([[5, 1], [6, 1]]))
    with pytest.raises(ValueError, match="int\\[B, S\\]"):
        tiny_model(px, ids[0], None, labels=torch.tensor([[5, 1]]))
    with pytest.raises(ValueError, match="decoder_input_ids or labels"):
        tiny_model(px, ids, mask)


def _counted_training_flops(model, b: int, s: int, t: int) -> int:
    """Matmul FLOPs of one forward+backward on a random batch (math SDPA, so attention is counted too)."""
    px = torch.randn(b, 3, model.cfg.vision.image_size, model.cfg.vision.image_size)
    ids = torch.randint(3, 2048, (b, s))
    labels = torch.randint(3, 2048, (b, t))
    with FlopCounterMode(display=False) as counter, sdpa_kernel(SDPBackend.MATH):
        model(px, ids, labels=labels).loss.backward()
    return counter.get_total_flops()


def test_flops_per_example_matches_flop_counter(tiny_config):
    """Formula vs counted matmul FLOPs of one forward+backward (no padding: every token is real).

    FlopCounterMode counts mm/bmm/conv ops; the math SDPA backend is forced so attention is counted
    too. The formula says 6*N per token, but the patch convolution needs no input gradient (4*N, not 6*N),
    and norms/softmax/embedding lookups are not matmuls: measured here the formula is ~0.7 % high. 3 %
    catches real mistakes (dropping the cross-attention K/V over S, or the head, moves it by >7 %).
    """
    model = create_model(tiny_config, seed=0)
    b, s, t = 2, 16, 8
    counted = _counted_training_flops(model, b, s, t)
    formula = b * flops_per_example(tiny_config, s, t)
    assert abs(formula / counted - 1) < 0.03, (formula, counted)
    assert model.flops_per_example(s, t, training=False) == pytest.approx(formula / b / 3)
    assert model.estimate_mfu(10.0, s, t, 1e12) == pytest.approx(10.0 * formula / b / 1e12)


def test_flops_per_example_counts_a_frozen_tower_forward_only(tiny_config):
    """MFU counts what a step needs (PaLM's appendix B): a frozen ViT (PaLI's 224 px phase) runs forward only,
    so its training FLOPs are its forward's; the counted FLOPs of a step with the tower frozen agree."""
    from pali.models.pali import forward_flops

    cfg = tiny_config.with_overrides(freeze_vision=True)
    model = create_model(cfg, seed=0)
    model.vision_tower.requires_grad_(False)
    b, s, t = 2, 16, 8
    formula = flops_per_example(cfg, s, t)
    assert abs(b * formula / _counted_training_flops(model, b, s, t) - 1) < 0.03
    vision = forward_flops(cfg, s, t)["vision"]
    assert flops_per_example(tiny_config, s, t) - formula == pytest.approx(2 * vision)


def test_hardware_flops_add_the_recomputed_forwards(tiny_config):
    """HFU's numerator: activation checkpointing runs every trained block's forward again in backward, and
    the chunked loss the head's; counted against FlopCounterMode on a checkpointed step."""
    from pali.models.pali import forward_flops, hardware_flops_per_example
    from pali.parallel.engine import _checkpoint_blocks

    b, s, t = 2, 16, 8
    for frozen in (False, True):
        cfg = tiny_config.with_overrides(freeze_vision=frozen)
        model = create_model(cfg, seed=0)
        model.vision_tower.requires_grad_(not frozen)
        _checkpoint_blocks(model)
        hfu = hardware_flops_per_example(cfg, s, t, checkpointing=True)
        assert abs(b * hfu / _counted_training_flops(model, b, s, t) - 1) < 0.03, frozen
        assert hfu > flops_per_example(cfg, s, t)
        head = forward_flops(cfg, s, t)["head"]
        assert hardware_flops_per_example(cfg, s, t, recompute_head=True) == pytest.approx(
            flops_per_example(cfg, s, t) + head)
