"""Vision tower: shapes, class token, input checks, position-embedding interpolation."""

from __future__ import annotations

import copy

import pytest
import torch

from pali.config import VisionConfig
from pali.models.vit import ViT, interpolate_pos_embed


def small_cfg(**kw) -> VisionConfig:
    return VisionConfig(**{"image_size": 32, "patch_size": 8, "width": 32, "depth": 1, "mlp_dim": 64,
                           "num_heads": 2, **kw})


@pytest.mark.parametrize("class_token", [False, True])
def test_output_shape(class_token):
    torch.manual_seed(0)
    tower = ViT(small_cfg(class_token=class_token)).eval()
    out = tower(torch.randn(2, 3, 32, 32))
    assert out.shape == (2, 16 + int(class_token), 32)
    assert tower.cfg.num_tokens == 16 + int(class_token)


def test_final_norm_applied():
    torch.manual_seed(0)
    tower = ViT(small_cfg()).eval()
    out = tower(torch.randn(1, 3, 32, 32))
    # LayerNorm with unit weight and zero bias: every token has mean 0 and variance 1.
    assert torch.allclose(out.mean(-1), torch.zeros(1, 16), atol=1e-5)
    assert torch.allclose(out.var(-1, unbiased=False), torch.ones(1, 16), atol=1e-3)


@pytest.mark.parametrize("shape, expected", [((1, 3, 24, 24), "3x32x32"), ((1, 1, 32, 32), "3x32x32"),
                                             ((3, 32, 32), "3x32x32")])
def test_bad_image_shape_names_expected(shape, expected):
    tower = ViT(small_cfg())
    with pytest.raises(ValueError, match=expected):
        tower(torch.randn(*shape))


def test_interpolation_identity_and_constant():
    pos = torch.randn(1, 1 + 16, 8)
    assert torch.equal(interpolate_pos_embed(pos, True, 4), pos)
    # Bicubic weights sum to one: a constant embedding stays constant at any size; the class token is kept.
    const = torch.cat([torch.randn(1, 1, 8), torch.full((1, 16, 8), 0.25)], 1)
    big = interpolate_pos_embed(const, True, 8)
    assert big.shape == (1, 1 + 64, 8)
    assert torch.equal(big[:, :1], const[:, :1])
    assert torch.allclose(big[:, 1:], torch.full((1, 64, 8), 0.25), atol=1e-6)


def test_interpolation_rejects_non_square():
    with pytest.raises(ValueError, match="square"):
        interpolate_pos_embed(torch.randn(1, 15, 8), False, 4)


@pytest.mark.parametrize("class_token", [False, True])
def test_set_image_size(class_token):
    torch.manual_seed(0)
    tower = ViT(small_cfg(class_token=class_token)).eval()
    torch.nn.init.normal_(tower.pos_embed)
    low = torch.randn(1, 3, 32, 32)
    hi = copy.deepcopy(tower)
    hi.set_image_size(64)  # 32 -> 64 px, like 224 -> 448
    assert hi.cfg.image_size == 64 and hi.pos_embed.shape == (1, 64 + int(class_token), 32)
    out = hi(torch.nn.functional.interpolate(low, size=64))
    assert out.shape == (1, 64 + int(class_token), 32) and torch.isfinite(out).all()
    with pytest.raises(ValueError, match="3x64x64"):
        hi(low)  # the old size is now the wrong one
    off = int(class_token)
    assert torch.equal(hi.pos_embed[:, :off], tower.pos_embed[:, :off])  # class token position kept
    assert not torch.allclose(hi.pos_embed[:, off:off + 4], tower.pos_embed[:, off:off + 4])
    with pytest.raises(ValueError, match="multiple of the patch size 8"):
        hi.set_image_size(60)


def test_set_image_size_keeps_frozen_state():
    tower = ViT(small_cfg())
    tower.requires_grad_(False)
    tower.set_image_size(48)
    assert not tower.pos_embed.requires_grad


def test_patch_embedding_as_a_matmul_equals_the_convolution():
    """`embed_patches` (one GEMM over flattened patches) is the stride = kernel conv, values and gradients."""
    torch.manual_seed(0)
    tower = ViT(small_cfg(image_size=24, patch_size=8))
    x = torch.randn(3, 3, 24, 24)
    got = tower.embed_patches(x)
    want = tower.patch_embed(x).flatten(2).transpose(1, 2)  # (B, N, W), patches row-major
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
    g = torch.randn_like(want)
    dw_got, db_got = torch.autograd.grad(got, (tower.patch_embed.weight, tower.patch_embed.bias), g)
    dw_want, db_want = torch.autograd.grad(tower.patch_embed(x).flatten(2).transpose(1, 2),
                                           (tower.patch_embed.weight, tower.patch_embed.bias), g)
    torch.testing.assert_close(dw_got, dw_want, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(db_got, db_want, atol=1e-4, rtol=1e-4)
