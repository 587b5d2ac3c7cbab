"""PaLI: a ViT whose patch tokens (no pooling) are projected and prepended to an mT5 encoder's input.

Reference: Chen et al. 2022, "PaLI: A Jointly-Scaled Multilingual Language-Image Model", section 3.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from pali.config import PaLIConfig
from pali.models.t5 import T5, check_labels
from pali.models.vit import ViT


@dataclass
class PaLIOutput:
    """Forward result."""

    logits: torch.Tensor
    """float[B, T, V] decoder logits."""
    loss: torch.Tensor | None = None
    """Mean cross-entropy over target tokens (labels != pad and != -100) when labels are given."""
    num_tokens: torch.Tensor | None = None
    """Number of target tokens the loss averaged over (for exact averaging across micro-batches)."""
    encoder_hidden_states: torch.Tensor | None = None
    """float[B, S, D] encoder output (visual tokens first)."""


class PaLI(nn.Module):
    """The two-tower vision-language model. `vision`, `projector` and `text` are its three parts."""

    def __init__(self, cfg: PaLIConfig):
        super().__init__()
        self.cfg = cfg
        self.vision_tower = ViT(cfg.vision)
        self.projector = nn.Linear(cfg.vision.width, cfg.text.d_model)  # visual_tokens -> d_model
        self.text = T5(cfg.text)
        if cfg.freeze_vision:
            self.freeze_vision()

    # --- parts ------------------------------------------------------------------------------------
    def vision(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """Vision tower output float[B, N, D_vit] (after its final norm, before the projection)."""
        return self.vision_tower(pixel_values)

    def freeze_vision(self, frozen: bool = True) -> None:
        """Stop (or restart) training the vision tower, as in PaLI's 224 px pretraining phase."""
        self.cfg.freeze_vision = frozen
        self.vision_tower.requires_grad_(not frozen)

    def set_image_size(self, image_size: int) -> None:
        """Run at a new resolution by interpolating the position embeddings (e.g. 224 -> 588 px)."""
        self.vision_tower.set_image_size(image_size)

    def encode(self, pixel_values: torch.Tensor | None, input_ids: torch.Tensor,
               attention_mask: torch.Tensor | None = None, image_mask: torch.Tensor | None = None,
               input_embeds: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """Encoder states float[B, P+S, D] and their mask int[B, P+S] (P = 0 for text-only input).

        image_mask: optional int[B]; 0 marks a text-only example in a mixed batch, whose visual tokens are
        masked out of attention. input_embeds: the prompt's embeddings float[B, S, D] when the caller
        looked them up already (`T5.embed_many`).
        """
        if input_ids.dim() != 2:
            raise ValueError(f"input_ids must be int[B, S]; got shape {tuple(input_ids.shape)}")
        if attention_mask is None:
            attention_mask = torch.ones_like(input_ids)
        elif attention_mask.shape != input_ids.shape:
            raise ValueError(f"attention_mask shape {tuple(attention_mask.shape)} must equal input_ids shape "
                             f"{tuple(input_ids.shape)}")
        x = self.text.embed(input_ids) if input_embeds is None else input_embeds  # (B, S, D)
        mask = attention_mask.long()
        if pixel_values is not None:
            if pixel_values.shape[0] != input_ids.shape[0]:
                raise ValueError(f"{pixel_values.shape[0]} images for {input_ids.shape[0]} prompts; "
                                 "expected one image per prompt")
            visual_tokens = self.projector(self.vision(pixel_values)).to(x.dtype)  # (B, P, D)
            real = self.vision_tower.token_mask(pixel_values)  # NaFlex padding patches: masked out
            vmask = torch.ones(visual_tokens.shape[:2], dtype=torch.long, device=mask.device) if real is None \
                else real.long().to(mask.device)
            if image_mask is not None:
                vmask = vmask * image_mask.long().view(-1, 1)
            x = torch.cat([visual_tokens, x], dim=1)
            mask = torch.cat([vmask, mask], dim=1)
        return self.text.encoder(x, mask), mask

    def teacher_forced(self, pixel_values: torch.Tensor | None, input_ids: torch.Tensor,
                       attention_mask: torch.Tensor | None, image_mask: torch.Tensor | None,
                       decoder_input_ids: torch.Tensor, keep: torch.Tensor | None = None
                       ) -> tuple[torch.Tensor, torch.Tensor]:
        """Logits float[B, T, V] for teacher-forced decoder inputs, and the encoder states float[B, P+S, D].

        Prompt and decoder inputs go through one embedding lookup (`T5.embed_many`): one embedding backward.
        keep: optional bool[B, T]; the output head then runs only at those positions and the logits are
        float[N, V], one row per kept position in row-major order (N = keep.sum()). Training keeps the
        real targets: the head and the loss skip padding, which for mT5's 250k vocabulary is most of the
        decoder's cost per padded position.
        """
        prompt, dec = self.text.embed_many(input_ids, decoder_input_ids)
        enc, enc_mask = self.encode(pixel_values, input_ids, attention_mask, image_mask, input_embeds=prompt)
        h = self.text.decoder(dec, enc, enc_mask)
        return self.text.logits(h if keep is None else h[keep]), enc

    def forward(self, pixel_values: torch.Tensor | None = None, input_ids: torch.Tensor | None = None,
                attention_mask: torch.Tensor | None = None, decoder_input_ids: torch.Tensor | None = None,
                labels: torch.Tensor | None = None, image_mask: torch.Tensor | None = None) -> PaLIOutput:
        """pixel_values float[B,3,H,W] (NaFlex: packed float[B,1+N,p*p*3]) | None, input_ids int[B,S],
        labels int[B,T] -> PaLIOutput.

        Without pixel_values this is plain mT5. Labels equal to pad (0) or -100 are ignored by the loss.
        """
        if input_ids is None:
            raise ValueError("input_ids is required (int[B, S] prompt tokens)")
        if decoder_input_ids is None:
            if labels is None:
                raise ValueError("give decoder_input_ids or labels")
            decoder_input_ids = self.text.shift_right(labels)
        logits, enc = self.teacher_forced(pixel_values, input_ids, attention_mask, image_mask, decoder_input_ids)
        out = PaLIOutput(logits=logits, encoder_hidden_states=enc)
        if labels is not None:
            if not torch.compiler.is_compiling():
                check_labels(labels, self.cfg.text.vocab_size)
            out.loss, out.num_tokens = target_loss(logits, labels, self.cfg.text.pad_token_id)
        return out

    @torch.no_grad()
    def generate(self, pixel_values: torch.Tensor | None = None, input_ids: torch.Tensor | None = None,
                 attention_mask: torch.Tensor | None = None, **kw) -> torch.Tensor:
        """Target token ids int[B, T] (start token excluded, pad after EOS). See `pali.models.generate`."""
        from pali.models.generate import generate

        return generate(self, pixel_values, input_ids, attention_mask, **kw)

    # --- accounting -------------------------------------------------------------------------------
    def num_parameters(self, part: str | None = None) -> int:
        """Parameters of the whole model, or of one part: "vision", "text", "encoder", "decoder"."""
        mod = {None: self, "vision": self.vision_tower, "text": self.text, "encoder": self.text.encoder,
               "decoder": self.text.decoder}[part]
        return sum(p.numel() for p in mod.parameters())

    def flops_per_example(self, prompt_len: int, target_len: int, training: bool = True) -> float:
        """FLOPs of one example; see `flops_per_example`."""
        return flops_per_example(self.cfg, prompt_len, target_len, training)

    def estimate_mfu(self, examples_per_s: float, prompt_len: int, target_len: int, peak_flops: float) -> float:
        """Model FLOPs utilisation of a training run at examples_per_s against a hardware peak (a frozen tower
        counts its forward only; recomputation is not counted: see `hardware_flops_per_example` for HFU)."""
        return self.flops_per_example(prompt_len, target_len) * examples_per_s / peak_flops


def real_targets(labels: torch.Tensor, pad_id: int) -> torch.Tensor:
    """bool[B, T]: the target positions the loss counts (labels neither pad nor -100)."""
    return (labels != pad_id) & (labels != -100)


def target_loss(logits: torch.Tensor, labels: torch.Tensor, pad_id: int = 0
                ) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean token cross-entropy over real targets (`real_targets`), and their count."""
    real = real_targets(labels, pad_id)
    n = real.sum()
    loss = F.cross_entropy(logits.float().flatten(0, 1), labels.masked_fill(~real, -100).flatten(),
                           ignore_index=-100, reduction="sum") / n.clamp(min=1)
    return loss, n


def forward_flops(cfg: PaLIConfig, prompt_len: int, target_len: int) -> dict[str, float]:
    """Forward FLOPs of one example by part: 2*N*tokens for the matmuls plus 4*L*d*len^2 for attention.

    P patches, S = P + prompt tokens, T target tokens. Parts: "vision" (patch embedding + ViT blocks),
    "projector", "encoder", "decoder" (its blocks, cross-attention keys/values over S) and "head"
    (2*d*V*T). Parameter counts exclude embeddings (no matmul). The decoder's cross-attention keys/values
    are projections of the S encoder states, so they are counted over S, not T (2*d*inner per layer and
    token); this matters when S >> T.
    """
    v, t = cfg.vision, cfg.text
    p = v.num_tokens
    s = p + prompt_len
    n_patch = v.channels * v.patch_size ** 2 * v.width
    n_vit = v.depth * (4 * v.width * v.width + 2 * v.width * v.mlp_dim)
    ff = (3 if t.feed_forward_proj == "gated-gelu" else 2) * t.d_model * t.d_ff
    attn = 4 * t.d_model * t.inner_dim
    cross_kv = 2 * t.d_model * t.inner_dim
    n_enc = t.num_layers * (attn + ff)
    n_dec = t.num_decoder_layers * (2 * attn - cross_kv + ff)
    return {
        "vision": 2 * n_patch * v.num_patches + 2 * n_vit * p + 4 * v.depth * v.width * p * p,
        "projector": 2 * v.width * t.d_model * p,
        "encoder": 2 * n_enc * s + 4 * t.num_layers * t.inner_dim * s * s,
        "decoder": (2 * n_dec * target_len + 2 * t.num_decoder_layers * cross_kv * s
                    + 4 * t.num_decoder_layers * t.inner_dim * (target_len ** 2 + target_len * s)),
        "head": 2 * t.d_model * t.vocab_size * target_len,
    }


def flops_per_example(cfg: PaLIConfig, prompt_len: int, target_len: int, training: bool = True) -> float:
    """Model FLOPs of one example: what a training step needs (the MFU numerator, PaLM's appendix B).

    Trained parts count forward + backward (3x their forward: `forward_flops`), a frozen vision tower
    (`cfg.freeze_vision`, PaLI's main phase) its forward only: no backward runs through it. Recomputation
    (activation checkpointing, the chunked loss's head) is not counted; `hardware_flops_per_example` adds
    it. Inference (`training=False`) is the forward of every part.
    Checked against `torch.utils.flop_counter.FlopCounterMode` in tests/models/test_pali.py.
    """
    fwd = forward_flops(cfg, prompt_len, target_len)
    if not training:
        return float(sum(fwd.values()))
    return float(sum(f if part == "vision" and cfg.freeze_vision else 3 * f for part, f in fwd.items()))


def hardware_flops_per_example(cfg: PaLIConfig, prompt_len: int, target_len: int, checkpointing: bool = False,
                               recompute_head: bool = False) -> float:
    """FLOPs the hardware executes per training example (the HFU numerator): model FLOPs plus the forwards
    run again in backward. checkpointing: every trained transformer block (ViT blocks only when trained)
    recomputes its forward but its last matmul; recompute_head: the chunked loss
    (`pali.models.chunked_loss`) recomputes the output head's logits in backward."""
    fwd = forward_flops(cfg, prompt_len, target_len)
    extra = 0.0
    if checkpointing:
        v, t = cfg.vision, cfg.text
        s = v.num_tokens + prompt_len
        # torch's non-reentrant checkpoint stops recomputing once every saved tensor is back, so a block's
        # last matmul (the feed-forward's output projection, whose output nothing saves) is not rerun
        last_ff = 2 * t.d_ff * t.d_model * (t.num_layers * s + t.num_decoder_layers * target_len)
        extra += fwd["encoder"] + fwd["decoder"] - last_ff
        if not cfg.freeze_vision:
            patch = 2 * v.channels * v.patch_size ** 2 * v.width * v.num_patches
            extra += fwd["vision"] - patch - 2 * v.mlp_dim * v.width * v.depth * v.num_tokens
    if recompute_head:
        extra += fwd["head"]
    return flops_per_example(cfg, prompt_len, target_len) + extra
