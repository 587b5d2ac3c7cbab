"""Pipelines deeper than two stages: encoder and decoder blocks spread over several stages each.

pp stages = ceil(pp/2) encoder-side stages then floor(pp/2) decoder-side stages. Stage 0 holds the vision
tower, the projector, the token embedding and the first encoder blocks; the first decoder-side stage holds
the token embedding again (its gradient is summed with stage 0's over `Grid.embed_group`) and the first
decoder blocks; the last stage holds the final norm and the head. Blocks are spread as evenly as
`torch.tensor_split` spreads them. A stage keeps the names of `PaLI.state_dict()`: blocks it does not own
are replaced by parameter-free placeholders.

What travels (per micro-batch of mb examples, S = visual + prompt tokens, T target tokens):
  encoder side: x float[mb,S,D], position bias + mask float[mb,H/tp,S,S], mask int[mb,S], decoder ids int[mb,T]
  -> decoder side: encoder states float[mb,S,D], mask int[mb,S], decoder ids int[mb,T]
  decoder side: x float[mb,T,D], encoder states float[mb,S,D], self bias float[1,H/tp,T,T], mask int[mb,S]
The position biases travel (instead of being recomputed) so their gradients reach the
`relative_attention_bias` of block 0 on the stage that owns it.
"""

from __future__ import annotations

import torch
from torch import nn

from pali.config import PaLIConfig
from pali.models.pali import PaLI
from pali.models.t5 import padding_bias


def first_decoder_stage(pp: int) -> int:
    """Index of the first decoder-side stage (the second holder of the token embedding)."""
    return (pp + 1) // 2


def block_ranges(cfg: PaLIConfig, pp: int, pp_rank: int) -> tuple[str, range]:
    """("encoder" | "decoder", the block indices) that stage pp_rank runs."""
    k = first_decoder_stage(pp)
    side, n, i, stages = (("encoder", cfg.text.num_layers, pp_rank, k) if pp_rank < k
                          else ("decoder", cfg.text.num_decoder_layers, pp_rank - k, pp - k))
    if n < stages:
        raise ValueError(f"pp={pp} puts {stages} stages on the {side} but it has only {n} blocks; "
                         f"expected at most {2 * min(cfg.text.num_layers, cfg.text.num_decoder_layers)} stages")
    chunk = torch.arange(n).tensor_split(stages)[i]
    return side, range(int(chunk[0]), int(chunk[-1]) + 1)


class _Absent(nn.Module):
    """Placeholder for a block another stage owns (keeps the block indices, holds no parameters)."""

    def forward(self, *args, **kwargs):
        raise RuntimeError("this block lives on another pipeline stage")


def cut(model: PaLI, pp: int, pp_rank: int) -> None:
    """Remove from a meta model everything stage pp_rank of a deep (pp > 2) pipeline does not hold."""
    side, own = block_ranges(model.cfg, pp, pp_rank)
    last = pp_rank == pp - 1
    first_side_stage = pp_rank in (0, first_decoder_stage(pp))
    last_enc = pp_rank == first_decoder_stage(pp) - 1
    text = model.text
    if pp_rank != 0:
        del model.vision_tower, model.projector
    if not first_side_stage:
        del text.shared
    if not last:
        del text.lm_head
    for name in ("encoder", "decoder"):
        stack = getattr(text, name)
        if name != side:
            delattr(text, name)
            continue
        for i in range(len(stack.blocks)):
            if i not in own:
                stack.blocks[i] = _Absent()
        if not (last_enc if side == "encoder" else last):
            del stack.final_norm


class DeepEncoderStage(nn.Module):
    """An encoder-side stage: the first embeds images and prompts; the last applies the final norm."""

    def __init__(self, model: PaLI, pp: int, pp_rank: int, act_dtype: torch.dtype):
        super().__init__()
        self.model, self.act_dtype = model, act_dtype
        self.first, self.last = pp_rank == 0, pp_rank == first_decoder_stage(pp) - 1
        self.own = block_ranges(model.cfg, pp, pp_rank)[1]

    def _embed(self, pixel_values, input_ids, attention_mask, image_mask):
        m = self.model  # the steps of PaLI.encode before the encoder stack
        x = m.text.embed(input_ids)  # (B, S_text, D)
        visual = m.projector(m.vision(pixel_values)).to(x.dtype)  # (B, P, D)
        vmask = torch.ones(visual.shape[:2], dtype=torch.long, device=x.device) * image_mask.long().view(-1, 1)
        real = m.vision_tower.token_mask(pixel_values)  # NaFlex: padded patches are masked, as in PaLI.encode
        if real is not None:
            vmask = vmask * real.long()
        mask = torch.cat([vmask, attention_mask.long()], dim=1)  # (B, S)
        x = torch.cat([visual, x], dim=1)
        enc = m.text.encoder
        return enc.dropout(x), enc.position_bias(mask, x.dtype), mask

    def forward(self, *args: torch.Tensor):
        enc = self.model.text.encoder
        if self.first:
            pixel_values, input_ids, attention_mask, image_mask, labels = args
            x, bias, mask = self._embed(pixel_values, input_ids, attention_mask, image_mask)
            dec_in = self.model.text.shift_right(labels)
        else:
            x, bias, mask, dec_in = args
        for i in self.own:
            x = enc.blocks[i](x, bias.to(x.dtype))
        if self.last:
            return enc.dropout(enc.final_norm(x)).to(self.act_dtype), mask, dec_in
        # p2p sends need contiguous tensors; view_as keeps a pass-through from being its own input
        return x.to(self.act_dtype).contiguous(), bias.contiguous().view_as(bias), mask, dec_in


class DeepDecoderStage(nn.Module):
    """A decoder-side stage: the first embeds the decoder inputs; the last applies the norm and the head."""

    def __init__(self, model: PaLI, pp: int, pp_rank: int, act_dtype: torch.dtype):
        super().__init__()
        self.model, self.act_dtype = model, act_dtype
        self.first, self.last = pp_rank == first_decoder_stage(pp), pp_rank == pp - 1
        self.own = block_ranges(model.cfg, pp, pp_rank)[1]

    def forward(self, *args: torch.Tensor):
        dec = self.model.text.decoder
        if self.first:
            enc, enc_mask, dec_in = args
            x = self.model.text.embed(dec_in)  # (B, T, D)
            t = x.shape[1]
            self_bias = dec.self_bias(t, 0, t, x.device, x.dtype)  # (1, H/tp, T, T)
            x = dec.dropout(x)
        else:
            x, enc, self_bias, enc_mask = args
        cross_bias = padding_bias(enc_mask, x.dtype)
        for i in self.own:
            x = dec.blocks[i](x, self_bias.to(x.dtype), enc, cross_bias)
        if self.last:
            return self.model.text.logits(dec.dropout(dec.final_norm(x))).to(self.act_dtype)
        return (x.to(self.act_dtype).contiguous(), enc.contiguous().view_as(enc),
                self_bias.contiguous().view_as(self_bias), enc_mask)


def io_meta(cfg: PaLIConfig, pp: int, pp_rank: int, tp: int, mb: int, prompt_len: int, target_len: int,
            image_shape: tuple[int, ...], act_dtype: torch.dtype, param_dtype: torch.dtype
            ) -> tuple[tuple[torch.Tensor, ...], tuple[torch.Tensor, ...]]:
    """Meta-device (inputs, outputs) of stage pp_rank for one micro-batch (static pipeline metadata)."""
    def meta(*shape: int, dtype: torch.dtype = torch.long) -> torch.Tensor:
        return torch.empty(shape, dtype=dtype, device="meta", requires_grad=dtype.is_floating_point)

    s, t, d, h = cfg.vision.num_tokens + prompt_len, target_len, cfg.text.d_model, cfg.text.num_heads // tp
    k = first_decoder_stage(pp)

    def boundary(i: int) -> tuple[torch.Tensor, ...]:  # what stage i sends to stage i + 1
        if i < k - 1:
            return meta(mb, s, d, dtype=act_dtype), meta(mb, h, s, s, dtype=param_dtype), meta(mb, s), meta(mb, t)
        if i == k - 1:
            return meta(mb, s, d, dtype=act_dtype), meta(mb, s), meta(mb, t)
        if i < pp - 1:
            return (meta(mb, t, d, dtype=act_dtype), meta(mb, s, d, dtype=act_dtype),
                    meta(1, h, t, t, dtype=param_dtype), meta(mb, s))
        return (meta(mb, t, cfg.text.vocab_size // tp, dtype=act_dtype),)

    if pp_rank == 0:
        pixels = torch.empty((mb, *image_shape), dtype=torch.float32, device="meta")
        inputs = (pixels, meta(mb, prompt_len), meta(mb, prompt_len), meta(mb), meta(mb, t))
    else:
        inputs = boundary(pp_rank - 1)
    return inputs, boundary(pp_rank)
