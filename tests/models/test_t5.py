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
