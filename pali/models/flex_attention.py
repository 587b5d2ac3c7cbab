"""T5 attention through FlexAttention: the relative position bias as a `score_mod`, masks as block masks.

T5 adds a learned, bucketed position bias to unscaled scores. As a dense additive mask that bias makes
`F.scaled_dot_product_attention` fall back to its math path on GPUs (scores and probabilities
materialised, float[B, H, Q, K] kept for backward). `torch.nn.attention.flex_attention` instead compiles
one fused kernel in which the bias is read per score (`score_mod`: score + bias[h, q, k], the bias a
captured float[H, Q, K] that receives its gradient) and padding / causality are block masks, so fully
masked key blocks are skipped and nothing of size B x H x Q x K is stored.

A stack (`pali.models.t5.Encoder` / `Decoder`) whose `attention_backend` is "flex" hands its blocks a
`FlexBias` instead of a dense bias; `Attention.forward` dispatches on it. `set_attention_backend` switches
every stack of a model (the training engine does so on GPUs).

On CUDA the kernel is `torch.compile(flex_attention)` (or `flex_attention` traced inside a compiled block).
On CPU torch 2.13 refuses FlexAttention's backward through the public function, so the CPU path runs the
same higher-order operator through dynamo's eager backend (what the public function does without
torch.compile, minus that check): an unfused but differentiable implementation of the same score_mod and
block masks, used to test this path against the dense one (tests/models/test_t5.py).

Difference from the dense path: a query whose keys are all masked (an example with no real token at all)
gets a zero output here and a uniform average over its masked keys there; no real position sees either.
"""

from __future__ import annotations

import functools
import types

import torch
from torch.nn.attention.flex_attention import BlockMask, create_block_mask, flex_attention

BACKENDS = ("sdpa", "flex")


class FlexBias:
    """What a stack passes to its blocks' attention on the flex path: a block mask and an optional position
    bias float[H, Q, K] added to every example's scores."""

    def __init__(self, block_mask: BlockMask, position_bias: torch.Tensor | None = None):
        self.block_mask = block_mask
        self.position_bias = position_bias

    def score_mod(self):
        """score + position_bias[h, q, k], or None without a position bias."""
        bias = self.position_bias
        if bias is None:
            return None

        def add_bias(score, b, h, q_idx, kv_idx):
            return score + bias[h, q_idx, kv_idx]
        return add_bias

    def attend(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        """Unscaled attention of q float[B, H, Q, dk] over k, v float[B, H, K, dk] -> float[B, H, Q, dk]."""
        score_mod = self.score_mod()
        if q.device.type != "cpu":
            if torch.compiler.is_compiling():  # inside a compiled block: dynamo traces it in place
                return flex_attention(q, k, v, score_mod=score_mod, block_mask=self.block_mask, scale=1.0)
            return _compiled_flex(_structure(self.block_mask, score_mod))(q, k, v, score_mod, self.block_mask)
        return _cpu_flex(q, k, v, score_mod, self.block_mask)


def _structure(block_mask: BlockMask, score_mod) -> tuple:
    """Which block-mask entries are None and whether a score_mod is given: one compiled frame each, because
    dynamo's recompile-reason report in torch 2.13 fails on a tensor guard whose source became None."""
    return tuple(x is None for x in block_mask.as_tuple()), score_mod is None


def _own_frame(fn, key: tuple):
    """fn with a code object of its own (dynamo keeps its compiled variants per code object)."""
    return types.FunctionType(fn.__code__.replace(co_name=f"{fn.__name__}_{abs(hash(key))}"), fn.__globals__,
                              closure=fn.__closure__)


@functools.cache
def _compiled_flex(key: tuple):
    def call(q, k, v, score_mod, block_mask):
        return flex_attention(q, k, v, score_mod=score_mod, block_mask=block_mask, scale=1.0)
    return torch.compile(_own_frame(call, key))


def _cpu_flex(q, k, v, score_mod, block_mask: BlockMask) -> torch.Tensor:
    """FlexAttention's operator on CPU with autograd (see the module docstring)."""
    from torch._higher_order_ops.flex_attention import flex_attention as flex_hop
    from torch.nn.attention.flex_attention import _apply_kernel_options, _identity

    opts = _apply_kernel_options(q, k, v, False, None, None)
    mask = block_mask.as_tuple()
    # the eager backend compiles nothing: only the operator's tracing, retraced per shape
    with torch._dynamo.config.patch(recompile_limit=1024, accumulated_recompile_limit=4096):
        out, _, _ = _eager_hop(flex_hop, _structure(block_mask, score_mod))(
            q, k, v, score_mod or _identity, mask, 1.0, opts)
    return out


@functools.cache
def _eager_hop(hop, key: tuple):
    def call(*args):
        return hop(*args)
    return torch.compile(_own_frame(call, key), backend="eager", fullgraph=True)


def padding_block_mask(key_mask: torch.Tensor, q_len: int) -> BlockMask:
    """Block mask letting every query of each example see only its real keys: key_mask int|bool[B, K]."""
    real = key_mask.bool()

    def keep(b, h, q_idx, kv_idx):
        return real[b, kv_idx]
    return create_block_mask(keep, real.shape[0], None, q_len, real.shape[1], device=real.device)


def causal_block_mask(length: int, device: torch.device) -> BlockMask:
    """Block mask of causal self-attention over `length` positions (shared by every example)."""
    def causal(b, h, q_idx, kv_idx):
        return q_idx >= kv_idx
    return create_block_mask(causal, None, None, length, length, device=device)


def encoder_bias(attn, mask: torch.Tensor) -> FlexBias:
    """The encoder's FlexBias: block 0's bidirectional position bias (`attn.compute_bias`), padding mask."""
    s = mask.shape[1]
    return FlexBias(padding_block_mask(mask, s), attn.compute_bias(s, s, device=mask.device)[0])


def decoder_self_bias(attn, length: int, device: torch.device) -> FlexBias:
    """The decoder's teacher-forced self-attention: causal position bias and a causal block mask."""
    return FlexBias(causal_block_mask(length, device), attn.compute_bias(length, length, device=device)[0])


def cross_bias(enc_mask: torch.Tensor, q_len: int) -> FlexBias:
    """Cross-attention: no position bias, the encoder's padding as a block mask."""
    return FlexBias(padding_block_mask(enc_mask, q_len))


def set_attention_backend(module: torch.nn.Module, backend: str) -> None:
    """Set `attention_backend` ("sdpa" or "flex") on every T5 stack under `module`."""
    if backend not in BACKENDS:
        raise ValueError(f"attention backend {backend!r}; expected one of {list(BACKENDS)}")
    for m in module.modules():
        if hasattr(m, "attention_backend"):
            m.attention_backend = backend
