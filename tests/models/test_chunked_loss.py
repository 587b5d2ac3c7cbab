"""The chunked output head + cross-entropy against the full-logits loss it replaces."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from pali.models.chunked_loss import chunk_rows, chunked_cross_entropy


@pytest.mark.parametrize("scale", [None, 0.25])
def test_chunked_cross_entropy_equals_the_full_logits_loss(scale):
    """Per-row losses and the gradients of h and of the head weight equal F.cross_entropy on full logits
    (fp32, 1e-6), for chunks that split the rows unevenly and for one chunk; no-grad gives the same values."""
    g = torch.Generator().manual_seed(0)
    h = torch.randn(11, 16, generator=g, requires_grad=True)
    w = torch.randn(50, 16, generator=g, requires_grad=True)
    target = torch.randint(0, 50, (11,), generator=g)
    weights = torch.rand(11, generator=g)  # a non-uniform upstream gradient
    ref = F.cross_entropy(F.linear(h if scale is None else h * scale, w), target, reduction="none")
    ref_grads = torch.autograd.grad((ref * weights).sum(), (h, w))
    for rows in (4, 11, None):
        got = chunked_cross_entropy(h, w, target, scale, rows=rows)
        torch.testing.assert_close(got, ref, atol=1e-6, rtol=1e-6)
        for a, b in zip(torch.autograd.grad((got * weights).sum(), (h, w)), ref_grads, strict=True):
            torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-6)
    with torch.no_grad():
        torch.testing.assert_close(chunked_cross_entropy(h, w, target, scale, rows=3), ref.detach())
    assert chunk_rows(250_112) == 268 and chunk_rows(10, elements=5) == 1
    with pytest.raises(ValueError, match="float\\[N, D\\]"):
        chunked_cross_entropy(h[None], w, target)
