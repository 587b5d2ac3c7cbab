"""mT5 / T5 encoder-decoder in plain PyTorch (T5 v1.1 and v1.0 layouts).

Reference: Raffel et al. 2020 (T5), Xue et al. 2021 (mT5). T5 v1.1 / mT5: RMSNorm with scale only, no
biases, gated-GELU feed-forward, bucketed relative position bias owned by block 0 of each stack and
shared by all blocks, unscaled attention scores, untied output head. T5 v1.0: ReLU feed-forward, output
head tied to the embedding with the decoder output scaled by d_model**-0.5.

Nothing here knows about process groups; `pali/parallel` swaps layers by module path.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from pali.config import TextConfig
from pali.models import flex_attention as flex


class Dropout(nn.Dropout):
    """nn.Dropout that returns its input untouched when it cannot drop anything (eval mode or p = 0):
    no dispatched no-op, which matters at ~10 calls per decoding step."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.dropout(x, self.p, True, self.inplace) if self.training and self.p > 0 else x


class RMSNorm(nn.Module):
    """T5's layer norm: y = x / sqrt(mean(x^2) + eps) * weight (no mean subtraction, no bias)."""

    def __init__(self, dim: int, eps: float = 1e-6):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dtype == torch.float32 and self.weight.dtype == torch.float32:
            # One fused op instead of six (per-op overhead dominates decoding); bit-identical on CPU here.
            return F.rms_norm(x, self.weight.shape, self.weight, self.eps)
        # Variance in fp32 as the reference does, so bf16 runs stay stable.
        var = x.float().pow(2).mean(-1, keepdim=True)
        return self.weight * (x.float() * torch.rsqrt(var + self.eps)).to(x.dtype)


def relative_position_bucket(relative_position: torch.Tensor, bidirectional: bool, num_buckets: int,
                             max_distance: int) -> torch.Tensor:
    """Map key_pos - query_pos to a bucket: exact buckets for small distances, log-spaced beyond.

    Bidirectional (encoder) halves the buckets between the two signs; causal (decoder) only looks back.
    """
    buckets = torch.zeros_like(relative_position)
    if bidirectional:
        num_buckets //= 2
        buckets = buckets + (relative_position > 0).long() * num_buckets
        n = relative_position.abs()
    else:
        n = -torch.clamp(relative_position, max=0)
    max_exact = num_buckets // 2
    is_small = n < max_exact
    large = max_exact + (
        torch.log(n.float().clamp(min=1) / max_exact) / math.log(max_distance / max_exact)
        * (num_buckets - max_exact)
    ).long()
    large = torch.clamp(large, max=num_buckets - 1)
    return buckets + torch.where(is_small, n, large)


class Attention(nn.Module):
    """Multi-head attention without biases and without 1/sqrt(d) scaling (T5).

    `relative_attention_bias` exists only in block 0 of a stack (has_relative_bias=True); the stack
    computes the bias once and passes it to every block.
    """

    def __init__(self, cfg: TextConfig, has_relative_bias: bool = False, bidirectional: bool = True):
        super().__init__()
        self.n_heads, self.d_kv = cfg.num_heads, cfg.d_kv
        inner = cfg.inner_dim
        self.q = nn.Linear(cfg.d_model, inner, bias=False)
        self.k = nn.Linear(cfg.d_model, inner, bias=False)
        self.v = nn.Linear(cfg.d_model, inner, bias=False)
        self.o = nn.Linear(inner, cfg.d_model, bias=False)
        self.bidirectional = bidirectional
        self.num_buckets = cfg.relative_attention_num_buckets
        self.max_distance = cfg.relative_attention_max_distance
        self.dropout = cfg.dropout_rate
        if has_relative_bias:
            self.relative_attention_bias = nn.Embedding(self.num_buckets, cfg.num_heads)

    def compute_bias(self, q_len: int, k_len: int, offset: int = 0,
                     device: torch.device | None = None) -> torch.Tensor:
        """Position bias float[1, H, q_len, k_len] for queries at offset..offset+q_len-1."""
        weight = self.relative_attention_bias.weight
        device = device or weight.device
        q_pos = torch.arange(offset, offset + q_len, device=device)[:, None]
        k_pos = torch.arange(k_len, device=device)[None, :]
        buckets = relative_position_bucket(k_pos - q_pos, self.bidirectional, self.num_buckets,
                                           self.max_distance)
        bias = F.embedding(buckets, weight)  # (q, k, H_local)
        return bias.permute(2, 0, 1).unsqueeze(0)

    def _heads(self, x: torch.Tensor) -> torch.Tensor:
        b, t, _ = x.shape
        if t == 1:  # a decoding step: (B, 1, H*dk) and (B, H, 1, dk) share one memory order, so one view
            return x.view(b, -1, 1, self.d_kv)
        return x.view(b, t, -1, self.d_kv).transpose(1, 2)  # (B, H, T, dk)

    def forward(self, x: torch.Tensor, bias: torch.Tensor | None, kv_input: torch.Tensor | None = None,
                cache: dict | None = None, static_kv: tuple[torch.Tensor, torch.Tensor] | None = None
                ) -> torch.Tensor:
        """x: float[B, T, D]; bias: additive float[B|1, H, T, S] (position bias + mask), a `FlexBias`, or None.

        kv_input: cross-attention source float[B, S, D] (None for self-attention).
        cache: decoder self-attention KV cache dict {"k", "v"} grown in place (incremental decoding).
        static_kv: precomputed cross-attention (k, v), each float[B, H, S, dk].
        """
        q = self._heads(self.q(x))  # (B, H, T, dk)
        if static_kv is not None:
            k, v = static_kv
        else:
            src = x if kv_input is None else kv_input
            k, v = self._heads(self.k(src)), self._heads(self.v(src))
            if cache is not None:
                if "k" in cache:
                    k = torch.cat([cache["k"], k], dim=2)
                    v = torch.cat([cache["v"], v], dim=2)
                cache["k"], cache["v"] = k, v
        if isinstance(bias, flex.FlexBias):  # the stack chose FlexAttention (pali.models.flex_attention)
            out = bias.attend(q, k, v)
        else:
            if bias is not None and bias.dtype != q.dtype:
                bias = bias.to(q.dtype)
            drop = self.dropout if self.training else 0.0
            out = F.scaled_dot_product_attention(q, k, v, attn_mask=bias, dropout_p=drop, scale=1.0)
        b, _, t, _ = out.shape
        return self.o(out.reshape(b, 1, -1) if t == 1 else out.transpose(1, 2).reshape(b, t, -1))

    def project_kv(self, src: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Cross-attention keys and values float[B, H, S, dk] (computed once per generation).

        Made contiguous per head (one copy per generation): the attention kernel reads each head's keys
        and values at every step, and contiguous rows read faster than the projection's (B, S, H, dk) layout
        (`small` preset, 96 one-token calls over 80 keys: 10.8 ms against 14.8 ms).
        """
        return self._heads(self.k(src)).contiguous(), self._heads(self.v(src)).contiguous()


class FeedForward(nn.Module):
    """Gated-GELU (T5 v1.1): wo(gelu_tanh(wi_0 x) * wi_1 x), or ReLU (T5 v1.0): wo(relu(wi x))."""

    def __init__(self, cfg: TextConfig):
        super().__init__()
        self.gated = cfg.feed_forward_proj == "gated-gelu"
        if self.gated:
            self.wi_0 = nn.Linear(cfg.d_model, cfg.d_ff, bias=False)
            self.wi_1 = nn.Linear(cfg.d_model, cfg.d_ff, bias=False)
        else:
            self.wi = nn.Linear(cfg.d_model, cfg.d_ff, bias=False)
        self.wo = nn.Linear(cfg.d_ff, cfg.d_model, bias=False)
        self.dropout = Dropout(cfg.dropout_rate)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.gated:
            h = F.gelu(self.wi_0(x), approximate="tanh") * self.wi_1(x)
        else:
            h = F.relu(self.wi(x))
        return self.wo(self.dropout(h))


class EncoderBlock(nn.Module):
    """Pre-norm self-attention + feed-forward with residuals."""

    def __init__(self, cfg: TextConfig, has_relative_bias: bool):
        super().__init__()
        self.norm1 = RMSNorm(cfg.d_model, cfg.layer_norm_epsilon)
        self.self_attn = Attention(cfg, has_relative_bias, bidirectional=True)
        self.norm2 = RMSNorm(cfg.d_model, cfg.layer_norm_epsilon)
        self.mlp = FeedForward(cfg)
        self.dropout = Dropout(cfg.dropout_rate)

    def forward(self, x: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
        x = x + self.dropout(self.self_attn(self.norm1(x), bias))
        return x + self.dropout(self.mlp(self.norm2(x)))


class DecoderBlock(nn.Module):
    """Pre-norm causal self-attention + cross-attention + feed-forward with residuals."""

    def __init__(self, cfg: TextConfig, has_relative_bias: bool):
        super().__init__()
        self.norm1 = RMSNorm(cfg.d_model, cfg.layer_norm_epsilon)
        self.self_attn = Attention(cfg, has_relative_bias, bidirectional=False)
        self.norm2 = RMSNorm(cfg.d_model, cfg.layer_norm_epsilon)
        self.cross_attn = Attention(cfg)
        self.norm3 = RMSNorm(cfg.d_model, cfg.layer_norm_epsilon)
        self.mlp = FeedForward(cfg)
        self.dropout = Dropout(cfg.dropout_rate)

    def forward(self, x: torch.Tensor, self_bias: torch.Tensor, enc: torch.Tensor | None,
                cross_bias: torch.Tensor | None, cache: dict | None = None,
                cross_kv: tuple[torch.Tensor, torch.Tensor] | None = None) -> torch.Tensor:
        x = x + self.dropout(self.self_attn(self.norm1(x), self_bias, cache=cache))
        x = x + self.dropout(self.cross_attn(self.norm2(x), cross_bias, kv_input=enc, static_kv=cross_kv))
        return x + self.dropout(self.mlp(self.norm3(x)))


def padding_bias(mask: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """Additive mask float[B, 1, 1, S] from int[B, S] (1 = attend, 0 = padding)."""
    return (1.0 - mask[:, None, None, :].to(dtype)) * torch.finfo(dtype).min


def _flex_ok(stack: nn.Module, attn: Attention) -> bool:
    """Whether `stack` runs FlexAttention now (it has no attention dropout; training with dropout stays dense)."""
    return stack.attention_backend == "flex" and not (stack.training and attn.dropout > 0)


class Encoder(nn.Module):
    """Bidirectional T5 encoder stack over already-embedded inputs."""

    attention_backend = "sdpa"
    """"sdpa" (dense additive bias) or "flex" (`pali.models.flex_attention`); see `set_attention_backend`."""

    def __init__(self, cfg: TextConfig):
        super().__init__()
        self.blocks = nn.ModuleList(EncoderBlock(cfg, has_relative_bias=(i == 0))
                                    for i in range(cfg.num_layers))
        self.final_norm = RMSNorm(cfg.d_model, cfg.layer_norm_epsilon)
        self.dropout = Dropout(cfg.dropout_rate)

    def position_bias(self, mask: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        """Relative position bias + padding mask, float[B, H, S, S]."""
        s = mask.shape[1]
        bias = self.blocks[0].self_attn.compute_bias(s, s, device=mask.device).to(dtype)
        return bias + padding_bias(mask, dtype)

    def forward(self, x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """x: float[B, S, D] embedded inputs; mask: int[B, S]. Returns float[B, S, D]."""
        attn = self.blocks[0].self_attn
        bias = flex.encoder_bias(attn, mask) if _flex_ok(self, attn) else self.position_bias(mask, x.dtype)
        x = self.dropout(x)
        for block in self.blocks:
            x = block(x, bias)
        return self.dropout(self.final_norm(x))


class Decoder(nn.Module):
    """Causal T5 decoder stack with cross-attention to the encoder output."""

    attention_backend = "sdpa"
    """"sdpa" or "flex" (teacher-forced passes only; incremental decoding stays dense)."""

    def __init__(self, cfg: TextConfig):
        super().__init__()
        self.blocks = nn.ModuleList(DecoderBlock(cfg, has_relative_bias=(i == 0))
                                    for i in range(cfg.num_decoder_layers))
        self.final_norm = RMSNorm(cfg.d_model, cfg.layer_norm_epsilon)
        self.dropout = Dropout(cfg.dropout_rate)

    def self_bias(self, t: int, offset: int, total: int, device, dtype) -> torch.Tensor:
        """Causal position bias float[1, H, t, total] for queries offset..offset+t-1 over keys 0..total-1."""
        bias = self.blocks[0].self_attn.compute_bias(t, total, offset=offset, device=device).to(dtype)
        q_pos = torch.arange(offset, offset + t, device=device)[:, None]
        k_pos = torch.arange(total, device=device)[None, :]
        causal = torch.where(k_pos <= q_pos, 0.0, torch.finfo(dtype).min).to(dtype)
        return bias + causal

    def forward(self, x: torch.Tensor, enc: torch.Tensor | None, enc_mask: torch.Tensor,
                caches: list[dict] | None = None, cross_kv: list | None = None, offset: int = 0,
                self_attn_bias: torch.Tensor | None = None, cross_attn_bias: torch.Tensor | None = None
                ) -> torch.Tensor:
        """x: float[B, T, D] embedded decoder inputs; enc: float[B, S, D]; enc_mask: int[B, S].

        With `caches` (one dict per block) decoding is incremental: x holds the new positions only,
        starting at `offset`. With `cross_kv` the cross-attention keys/values are precomputed.
        `self_attn_bias` float[1, H, T, offset+T] / `cross_attn_bias` float[B, 1, 1, S] replace the biases
        computed here (incremental decoding computes them once per generation instead of once per step).
        """
        t = x.shape[1]
        attn = self.blocks[0].self_attn
        if (caches is None and cross_kv is None and offset == 0 and self_attn_bias is None
                and cross_attn_bias is None and _flex_ok(self, attn)):
            self_bias, cross_bias = flex.decoder_self_bias(attn, t, x.device), flex.cross_bias(enc_mask, t)
        else:
            self_bias = self_attn_bias if self_attn_bias is not None else \
                self.self_bias(t, offset, offset + t, x.device, x.dtype)
            cross_bias = cross_attn_bias if cross_attn_bias is not None else padding_bias(enc_mask, x.dtype)
        x = self.dropout(x)
        for i, block in enumerate(self.blocks):
            x = block(x, self_bias, enc, cross_bias,
                      cache=None if caches is None else caches[i],
                      cross_kv=None if cross_kv is None else cross_kv[i])
        return self.dropout(self.final_norm(x))


def real_length(real: torch.Tensor, multiple: int = 1) -> int:
    """Length left after cutting the tail columns of bool[B, L] that are False in every row: up to the last
    column holding a real entry, rounded up to `multiple`, at most L and at least 1."""
    idx = real.any(0).nonzero()
    last = int(idx[-1]) + 1 if idx.numel() else 1
    return min(real.shape[1], -(-last // multiple) * multiple)


def check_token_ids(ids: torch.Tensor, vocab_size: int, what: str = "token ids") -> None:
    """Raise a ValueError naming the vocabulary size when any id lies outside [0, vocab_size)."""
    if ids.numel() and (int(ids.min()) < 0 or int(ids.max()) >= vocab_size):
        raise ValueError(f"{what} must lie in [0, {vocab_size}); got min {int(ids.min())}, max {int(ids.max())}")


def check_labels(labels: torch.Tensor, vocab_size: int) -> None:
    """Raise a ValueError when a label is neither in [0, vocab_size) nor -100 (ignored by the loss)."""
    bad = (labels != -100) & ((labels < 0) | (labels >= vocab_size))
    if bool(bad.any()):
        raise ValueError(f"labels must lie in [0, {vocab_size}) or be -100 (ignored); got {labels[bad][0].item()}")


class T5(nn.Module):
    """Encoder-decoder with shared input embedding and an output head (tied for T5 v1.0)."""

    def __init__(self, cfg: TextConfig):
        super().__init__()
        self.cfg = cfg
        self.shared = nn.Embedding(cfg.vocab_size, cfg.d_model)
        self.encoder = Encoder(cfg)
        self.decoder = Decoder(cfg)
        if not cfg.tie_word_embeddings:
            self.lm_head = nn.Linear(cfg.d_model, cfg.vocab_size, bias=False)

    def embed(self, ids: torch.Tensor) -> torch.Tensor:
        """Token embeddings float[B, T, D]; ids out of range raise an error naming the vocabulary size."""
        if not torch.compiler.is_compiling():  # data-dependent; a compiled caller checks eagerly before
            check_token_ids(ids, self.cfg.vocab_size)
        return self.shared(ids)

    def embed_many(self, *ids: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """Embeddings of several id tensors through one lookup: float[*ids_i.shape, D] each.

        A training step embeds the prompt and the decoder input; one lookup means one embedding backward,
        i.e. one dense [vocab, D] gradient to zero-fill and scatter into instead of two plus their sum
        (250k x D floats per lookup for mT5's vocabulary). Each part is copied out to its own storage: a
        view would keep the whole lookup alive until backward wherever autograd saves that part.
        """
        flat = self.embed(torch.cat([i.reshape(-1) for i in ids]))
        return tuple(part.reshape(*i.shape, -1).clone()
                     for i, part in zip(ids, flat.split([i.numel() for i in ids]), strict=True))

    def logits(self, h: torch.Tensor) -> torch.Tensor:
        """Decoder hidden float[..., D] -> logits float[..., V]."""
        if self.cfg.tie_word_embeddings:
            return F.linear(h * self.cfg.d_model ** -0.5, self.shared.weight)
        return self.lm_head(h)

    def shift_right(self, labels: torch.Tensor) -> torch.Tensor:
        """Decoder inputs from labels: start token, then labels[:-1], with -100 mapped to pad."""
        start = torch.full_like(labels[:, :1], self.cfg.decoder_start_token_id)
        shifted = torch.cat([start, labels[:, :-1]], dim=1)
        return shifted.masked_fill(shifted == -100, self.cfg.pad_token_id)
