"""Text model pieces: relative position buckets, RMSNorm, causality, padding invariance, id checks."""

from __future__ import annotations

import pytest
import torch

from pali.config import TextConfig
from pali.models.t5 import T5, RMSNorm, relative_position_bucket


def small_cfg(**kw) -> TextConfig:
    return TextConfig(**{"vocab_size": 64, "d_model": 32, "d_kv": 8, "d_ff": 48, "num_heads": 4, "num_layers": 2,
                         "num_decoder_layers": 2, "relative_attention_max_distance": 20, **kw})


@pytest.mark.parametrize("bidirectional", [True, False])
def test_relative_position_bucket_matches_hf(bidirectional):
    from transformers.models.t5.modeling_t5 import T5Attention

    rel = torch.arange(-150, 150)[None, :] - torch.zeros(1, 1, dtype=torch.long)
    ours = relative_position_bucket(rel, bidirectional, 32, 128)
    ref = T5Attention._relative_position_bucket(rel, bidirectional=bidirectional, num_buckets=32, max_distance=128)
    assert torch.equal(ours, ref)


def test_rmsnorm_formula():
    norm = RMSNorm(6, eps=1e-6)
    with torch.no_grad():
        norm.weight.copy_(torch.arange(1.0, 7.0))
    x = torch.randn(3, 6)
    expected = x / torch.sqrt(x.pow(2).mean(-1, keepdim=True) + 1e-6) * norm.weight
    assert torch.allclose(norm(x), expected, atol=1e-6)


def _run(model: T5, ids, mask, dec):
    enc = model.encoder(model.embed(ids), mask)
    return model.logits(model.decoder(model.embed(dec), enc, mask))


@pytest.mark.parametrize("ffp, tied", [("gated-gelu", False), ("relu", True)])
def test_decoder_is_causal(ffp, tied):
    torch.manual_seed(0)
    model = T5(small_cfg(feed_forward_proj=ffp, tie_word_embeddings=tied)).eval()
    assert hasattr(model, "lm_head") != tied
    ids = torch.randint(2, 64, (2, 6))
    mask = torch.ones_like(ids)
    dec = torch.randint(2, 64, (2, 5))
    dec2 = dec.clone()
    dec2[:, 3:] = 7
    with torch.no_grad():
        a, b = _run(model, ids, mask, dec), _run(model, ids, mask, dec2)
    assert torch.allclose(a[:, :3], b[:, :3], atol=1e-6)
    assert not torch.allclose(a[:, 3:], b[:, 3:])


def test_padding_does_not_change_real_positions():
    torch.manual_seed(0)
    model = T5(small_cfg()).eval()
    ids = torch.randint(2, 64, (1, 5))
    dec = torch.randint(2, 64, (1, 4))
    padded = torch.cat([ids, torch.zeros(1, 3, dtype=torch.long)], 1)
    mask = torch.tensor([[1] * 5 + [0] * 3])
    with torch.no_grad():
        a = _run(model, ids, torch.ones_like(ids), dec)
        b = _run(model, padded, mask, dec)
    assert torch.allclose(a, b, atol=1e-5)


def test_token_ids_out_of_range_name_vocab():
    model = T5(small_cfg())
    with pytest.raises(ValueError, match=r"\[0, 64\).*max 64"):
        model.embed(torch.tensor([[1, 64]]))
    with pytest.raises(ValueError, match=r"min -1"):
        model.embed(torch.tensor([[-1, 3]]))


def test_shift_right():
    model = T5(small_cfg())
    labels = torch.tensor([[5, 6, 1, -100]])
    assert model.shift_right(labels).tolist() == [[0, 5, 6, 1]]


def _flex_vs_dense(model, batch, train: bool, monkeypatch):
    """(loss, grads) of the same model and batch through the dense path and through FlexAttention."""
    from pali.models import flex_attention as flex
    from pali.models.flex_attention import set_attention_backend

    calls = []
    attend = flex.FlexBias.attend
    monkeypatch.setattr(flex.FlexBias, "attend", lambda self, *a: calls.append(1) or attend(self, *a))
    n_attn = sum(1 for m in model.modules() if type(m).__name__ == "Attention")
    out = {}
    for backend in ("sdpa", "flex"):
        set_attention_backend(model, backend)
        model.zero_grad(set_to_none=True)
        res = model(**batch)
        if train:
            res.loss.backward()
        grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
        out[backend] = (res.logits.detach(), res.encoder_hidden_states.detach(), grads)
        assert len(calls) == (n_attn if backend == "flex" else 0)  # every T5 attention took the flex path
    set_attention_backend(model, "sdpa")
    return out


@pytest.mark.parametrize("frozen", [False, True])
def test_flex_attention_equals_the_dense_path(frozen, monkeypatch):
    """PaLI (tiny) with T5's position bias as a FlexAttention score_mod and padding / causality as block
    masks: logits, encoder states and every gradient equal the dense-bias SDPA path within 1e-5 (fp32),
    on a batch with padded prompts, padded targets and a text-only example."""
    from pali import create_model

    cfg = create_model("tiny").cfg.with_overrides(freeze_vision=frozen)
    model = create_model(cfg, seed=0).train()
    g = torch.Generator().manual_seed(1)
    b, s, t = 3, 11, 7
    ids = torch.randint(3, cfg.text.vocab_size, (b, s), generator=g)
    mask = torch.ones_like(ids)
    mask[1, 5:] = 0
    labels = torch.randint(3, cfg.text.vocab_size, (b, t), generator=g)
    labels[2, 4:] = -100
    px = torch.randn(b, 3, cfg.vision.image_size, cfg.vision.image_size, generator=g)
    batch = {"pixel_values": px, "input_ids": ids, "attention_mask": mask, "labels": labels,
             "image_mask": torch.tensor([1, 1, 0])}
    got = _flex_vs_dense(model, batch, train=True, monkeypatch=monkeypatch)
    (l0, e0, g0), (l1, e1, g1) = got["sdpa"], got["flex"]
    real = mask.bool()  # encoder positions that are real tokens (visual tokens of example 2 are masked)
    assert (l1 - l0).abs().max() < 1e-5
    assert (e1[:, cfg.vision.num_tokens:][real] - e0[:, cfg.vision.num_tokens:][real]).abs().max() < 1e-5
    assert set(g0) == set(g1) and len(g0) > 0
    assert ("text.encoder.blocks.0.self_attn.relative_attention_bias.weight" in g1) and \
        ("text.decoder.blocks.0.self_attn.relative_attention_bias.weight" in g1)
    for name, ref in g0.items():
        assert (g1[name] - ref).abs().max() <= 1e-5 * max(1.0, float(ref.abs().max())), name


def test_flex_backend_is_checked_and_incremental_decoding_stays_dense():
    """A bad backend name is refused; generate (KV cache, per-step biases) gives the same tokens either way."""
    from pali import create_model
    from pali.models.flex_attention import set_attention_backend

    model = create_model("tiny", seed=0).eval()
    with pytest.raises(ValueError, match="attention backend 'fast'"):
        set_attention_backend(model, "fast")
    ids = torch.randint(3, model.cfg.text.vocab_size, (2, 6), generator=torch.Generator().manual_seed(0))
    mask = torch.ones_like(ids)
    mask[0, 4:] = 0
    px = torch.randn(2, 3, model.cfg.vision.image_size, model.cfg.vision.image_size)
    dense = model.generate(px, ids, mask, max_new_tokens=6)
    set_attention_backend(model, "flex")
    assert model.text.encoder.attention_backend == "flex"
    assert torch.equal(model.generate(px, ids, mask, max_new_tokens=6), dense)
