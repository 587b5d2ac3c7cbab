"""Per-rank memory of PaLI training: parameter counts per stage shard, state bytes, saved activations.

Everything is derived from the config (no model is built), so a 17B plan takes milliseconds. The
parameter counts equal those of `pali.parallel.build_stage_model` exactly (tests/sizing checks it).

Activation formula (bytes autograd keeps for backward, per example; `e` is the activation dtype's size,
4 for fp32 and 2 for bf16 autocast; the residual stream and norm statistics stay fp32 under autocast
because T5's RMSNorm and ViT's LayerNorm compute in fp32; TP divides heads H, inner I = H*d_kv, d_ff F):

    T5 encoder block over S = P + prompt tokens:
        S * (4*4D  [block input, normed x for both norms, second-norm input]
             + c_attn*e*D + c_ff*e*D [norm outputs as the linears save them]
             + 4*e*I/tp [q, k, v, attention output] + 4*e*F/tp [wi_0, wi_1, gelu, gated product]
             + 2*4 [rsqrt]) + attn(S, S)
    T5 decoder block over T targets with cross-attention to S encoder states:
        T * (6*4D + (c_attn + 1 + c_ff)*e*D + 6*e*I/tp + 4*e*F/tp + 3*4) + 2*e*S*I/tp [cross k, v]
        + attn(T, T) + cross(T, S)
    ViT block over P patches (only when the tower is trained):
        P * (2*4D [both LayerNorm inputs] + c*e*D [their outputs; c = 2 fp32, 4 autocast]
             + 4*e*D/tp [q, k, v, attention output] + 2*e*F/tp [fc1 output, GELU] + 4*4) + attn(P, P)
    attn(Q, K): fused kernels (flash / memory-efficient) keep the log-sum-exp, 4*H/tp*Q; torch's math
        path (CPU SDPA when the additive mask needs a gradient: T5 self-attention with its learned
        relative bias) keeps the probabilities, e*H/tp*Q*K.

With fp32 one norm output is shared by all the linears that read it (c = 1); under autocast every
linear keeps its own bf16 cast (c_attn = 3 for q, k, v; c_ff = 2 for wi_0, wi_1; and the encoder states
are cast once per decoder block for k and for v). Per stack: the relative-position bucket indices
(int64, S*S and T*T), the final norm, the encoder states read by the decoder, the token ids, and the
loss's fp32 (log-)softmax over the vocabulary shard, 4*T*V/tp. A frozen vision tower keeps nothing but
the projector's input, P*e*D_vit. T counts every target position as real: the worst case, which a batch
reaches when every target fills the padded length (at pp = 1 the trainer runs the output head at real
targets only and cuts all-padding tail columns, so a ragged batch keeps less).

With activation checkpointing a block keeps only its inputs (block input, plus the stack's shared
position bias and the encoder states, counted once); one block's full activations are recomputed in
backward and live transiently.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from pali.config import PaLIConfig

F32 = 4


# --- pipeline cuts ------------------------------------------------------------------------------------
@dataclass
class Stage:
    """What one pipeline stage holds: block ranges per stack and the non-block parts."""

    vit_blocks: int = 0
    """ViT blocks in this stage."""
    enc_blocks: int = 0
    """T5 encoder blocks in this stage."""
    dec_blocks: int = 0
    """T5 decoder blocks in this stage."""
    parts: set[str] = field(default_factory=set)
    """Non-block parts: vision_embed, vision_head (final norm + projector), enc_embed, enc_head
    (final norm), dec_embed, dec_head (final norm + lm_head + loss), enc_bias0 / dec_bias0 (block 0's
    relative position bias)."""
    first_unit: str = "vit"
    """Kind of this stage's first block ("vit", "enc", "dec")."""


def _split_even(n: int, k: int) -> list[int]:
    return [n // k + (1 if i < n % k else 0) for i in range(k)]


def cut_stages(cfg: PaLIConfig, pp: int) -> list[Stage]:
    """The stages of a pp-way pipeline as `pali.parallel.stages` / `pali.parallel.deep` cut it.

    pp=1 holds everything. Otherwise ceil(pp/2) encoder-side stages (stage 0 also holds the whole
    vision tower, the projector and the token embedding) then floor(pp/2) decoder-side stages (the
    first holds the token embedding again, the last the head); each side's blocks are spread as
    `torch.tensor_split` spreads them (the first stages get one more).
    """
    v, t = cfg.vision, cfg.text
    if not isinstance(pp, int) or pp < 1:
        raise ValueError(f"pp={pp}; expected a positive integer")
    if pp == 1:
        return [Stage(v.depth, t.num_layers, t.num_decoder_layers,
                      {"vision_embed", "vision_head", "enc_embed", "enc_head", "dec_embed", "dec_head",
                       "enc_bias0", "dec_bias0"})]
    n_front = (pp + 1) // 2
    n_back = pp - n_front
    if n_front > t.num_layers or n_back > t.num_decoder_layers:
        raise ValueError(f"pp={pp} needs {n_front} encoder and {n_back} decoder blocks at least; the model has "
                         f"{t.num_layers} and {t.num_decoder_layers}")
    stages: list[Stage] = []
    for i, n in enumerate(_split_even(t.num_layers, n_front)):
        st = Stage(0, n, 0, set(), "enc")
        if i == 0:
            st.vit_blocks, st.first_unit = v.depth, "vit"
            st.parts |= {"vision_embed", "vision_head", "enc_embed", "enc_bias0"}
        if i == n_front - 1:
            st.parts.add("enc_head")
        stages.append(st)
    for i, n in enumerate(_split_even(t.num_decoder_layers, n_back)):
        st = Stage(0, 0, n, set(), "dec")
        if i == 0:
            st.parts |= {"dec_embed", "dec_bias0"}
        if i == n_back - 1:
            st.parts.add("dec_head")
        stages.append(st)
    return stages


# --- parameters -------------------------------------------------------------------------------------
@dataclass
class ParamCount:
    """Parameters of one rank's shard, split by whether they train."""

    trainable: int = 0
    """Parameters with gradients and optimizer state."""
    frozen: int = 0
    """Parameters without (the frozen vision tower)."""

    @property
    def total(self) -> int:
        """trainable + frozen."""
        return self.trainable + self.frozen


def vit_block_params(cfg: PaLIConfig, tp: int) -> int:
    """One ViT block's parameters on one TP rank (q/k/v/fc1 column-split, o/fc2 row-split, norms whole)."""
    d, f = cfg.vision.width, cfg.vision.mlp_dim
    return 3 * (d * d // tp + d // tp) + (d * d // tp + d) + (f * d // tp + f // tp) + (d * f // tp + d) + 4 * d


def t5_block_params(cfg: PaLIConfig, tp: int, decoder: bool, has_bias: bool) -> int:
    """One T5 block's parameters on one TP rank."""
    t = cfg.text
    attn = 4 * t.d_model * t.inner_dim // tp
    ff = (3 if t.feed_forward_proj == "gated-gelu" else 2) * t.d_model * t.d_ff // tp
    n = attn * (2 if decoder else 1) + ff + (3 if decoder else 2) * t.d_model
    return n + (t.relative_attention_num_buckets * t.num_heads // tp if has_bias else 0)


def stage_params(cfg: PaLIConfig, stage: Stage, tp: int, first_dec_block: bool = True) -> ParamCount:
    """Parameters one TP rank of `stage` holds (the token embedding is held by both pipeline ends)."""
    v, t = cfg.vision, cfg.text
    vision = stage.vit_blocks * vit_block_params(cfg, tp)
    if "vision_embed" in stage.parts:
        vision += v.channels * v.patch_size ** 2 * v.width + v.width + v.num_tokens * v.width
        vision += v.width if v.class_token else 0
    if "vision_head" in stage.parts:
        vision += 2 * v.width
    text = 0
    if "vision_head" in stage.parts:
        text += v.width * t.d_model + t.d_model  # projector
    emb = t.vocab_size * t.d_model // tp
    if "enc_embed" in stage.parts or "dec_embed" in stage.parts:
        text += emb
    text += stage.enc_blocks * t5_block_params(cfg, tp, False, False)
    text += stage.dec_blocks * t5_block_params(cfg, tp, True, False)
    for part in ("enc_bias0", "dec_bias0"):
        if part in stage.parts:
            text += t.relative_attention_num_buckets * t.num_heads // tp
    text += t.d_model * (("enc_head" in stage.parts) + ("dec_head" in stage.parts))
    if "dec_head" in stage.parts and not t.tie_word_embeddings:
        text += emb
    if cfg.freeze_vision:
        return ParamCount(trainable=text, frozen=vision)
    return ParamCount(trainable=text + vision)


def total_params(cfg: PaLIConfig) -> int:
    """All parameters of the model (one copy)."""
    return stage_params(cfg, cut_stages(cfg, 1)[0], 1).total


# --- activations ------------------------------------------------------------------------------------
@dataclass
class ActivationModel:
    """How activations are stored: dtype and which attention kernel runs."""

    act_bytes: int = 2
    """Bytes per activation element: 2 under bf16 autocast (GPU), 4 in fp32 (CPU)."""
    fused_attention: bool = True
    """Flash / memory-efficient SDPA for every attention (GPU). False models CPU torch, where
    self-attention with a learned additive bias takes the math path and keeps the probabilities."""

    @property
    def autocast(self) -> bool:
        """Linears keep their own low-precision cast of fp32 inputs."""
        return self.act_bytes < F32


def _attn(cfg: PaLIConfig, am: ActivationModel, tp: int, q: int, k: int, grad_bias: bool, heads: int,
          inner: int) -> float:
    """Saved bytes of one attention's kernel beyond q/k/v/out, per example."""
    h = heads / tp
    if grad_bias and not am.fused_attention:
        return am.act_bytes * h * q * k  # softmax probabilities (math path)
    extra = F32 * h * q  # log-sum-exp
    if grad_bias and am.autocast:
        extra += am.act_bytes * h * q * k  # bias cast to bf16 per block, kept for its gradient
    return extra


def vit_block_act(cfg: PaLIConfig, am: ActivationModel, tp: int) -> float:
    """Saved bytes of one trained ViT block per example."""
    v, e = cfg.vision, am.act_bytes
    p, d, f = v.num_tokens, v.width, v.mlp_dim
    outs = 4 * e * d if am.autocast else 2 * F32 * d  # LayerNorm outputs: 3 casts for q/k/v + 1 for fc1
    per_tok = 2 * F32 * d + outs + 4 * e * d / tp + 2 * e * f / tp + 4 * F32
    return p * per_tok + _attn(cfg, am, tp, p, p, False, v.num_heads, d)


def enc_block_act(cfg: PaLIConfig, am: ActivationModel, tp: int, s: int) -> float:
    """Saved bytes of one T5 encoder block per example over s tokens."""
    t, e = cfg.text, am.act_bytes
    d, i, f = t.d_model, t.inner_dim, t.d_ff
    n_ff = 4 if t.feed_forward_proj == "gated-gelu" else 2
    c_attn, c_ff = (3, 2 if n_ff == 4 else 1) if am.autocast else (1, 1)
    outs = (c_attn + c_ff) * e * d if am.autocast else 2 * F32 * d
    per_tok = 4 * F32 * d + outs + 4 * e * i / tp + n_ff * e * f / tp + 2 * F32
    return s * per_tok + _attn(cfg, am, tp, s, s, True, t.num_heads, i)


def dec_block_act(cfg: PaLIConfig, am: ActivationModel, tp: int, s: int, tt: int) -> float:
    """Saved bytes of one T5 decoder block per example (tt targets, s encoder states)."""
    t, e = cfg.text, am.act_bytes
    d, i, f = t.d_model, t.inner_dim, t.d_ff
    n_ff = 4 if t.feed_forward_proj == "gated-gelu" else 2
    c_attn, c_ff = (3, 2 if n_ff == 4 else 1) if am.autocast else (1, 1)
    outs = (c_attn + 1 + c_ff) * e * d if am.autocast else 3 * F32 * d
    per_tok = 6 * F32 * d + outs + 6 * e * i / tp + n_ff * e * f / tp + 3 * F32
    cross_kv = 2 * e * s * i / tp
    if am.autocast:
        cross_kv += 2 * e * s * d  # the fp32 encoder states cast to bf16 for k and for v
    return (tt * per_tok + cross_kv + _attn(cfg, am, tp, tt, tt, True, t.num_heads, i)
            + _attn(cfg, am, tp, tt, s, False, t.num_heads, i) + (e * s if am.autocast else 0.0))


@dataclass
class Geometry:
    """Sequence lengths of one training example."""

    prompt_len: int
    """Prompt tokens (encoder text input)."""
    target_len: int
    """Target tokens (decoder length)."""

    def enc_len(self, cfg: PaLIConfig) -> int:
        """S = visual tokens + prompt tokens."""
        return cfg.vision.num_tokens + self.prompt_len


def stage_activations(cfg: PaLIConfig, stage: Stage, tp: int, geo: Geometry, am: ActivationModel,
                      checkpointing: bool, mb: int = 1, chunked_loss: bool = False) -> tuple[float, float]:
    """(bytes kept for backward, transient recompute bytes) of one stage for a micro-batch of mb examples.

    chunked_loss: the output head and cross-entropy run in row chunks (`pali.models.chunked_loss`),
    which keep the head input and one fp32 log-sum-exp per target instead of the [T, V] softmax.
    """
    v, t, e = cfg.vision, cfg.text, am.act_bytes
    s, tt, p = geo.enc_len(cfg), geo.target_len, v.num_tokens
    train_vit = not cfg.freeze_vision
    blocks = {"vit": vit_block_act(cfg, am, tp) if train_vit else 0.0,
              "enc": enc_block_act(cfg, am, tp, s), "dec": dec_block_act(cfg, am, tp, s, tt)}
    counts = {"vit": stage.vit_blocks, "enc": stage.enc_blocks, "dec": stage.dec_blocks}
    kept = 0.0
    recompute = 0.0
    for kind, n in counts.items():
        if not n:
            continue
        if checkpointing:
            width, length = (v.width, p) if kind == "vit" else (t.d_model, s if kind == "enc" else tt)
            kept += n * F32 * width * length if (kind != "vit" or train_vit) else 0.0
            recompute = max(recompute, blocks[kind])
        else:
            kept += n * blocks[kind]
    h = t.num_heads / tp
    shared = 0.0  # per micro-batch, not per example
    if stage.enc_blocks:
        if "enc_bias0" in stage.parts:  # deeper stages receive the bias instead of computing it
            shared += 8 * s * s  # int64 bucket indices of the relative position bias
        if checkpointing:
            kept += F32 * h * s * s  # the position bias + padding mask [B, H, S, S], input of every block
    if stage.dec_blocks:
        if "dec_bias0" in stage.parts:
            shared += 8 * tt * tt  # bucket indices
        kept += F32 * s  # cross-attention padding mask
        kept += F32 * s * t.d_model if not am.autocast or checkpointing else 0.0  # encoder states
        if checkpointing:
            shared += F32 * h * tt * tt  # causal position bias [1, H, T, T]
        if checkpointing:
            kept += F32 * h * tt * tt
    if "vision_embed" in stage.parts and train_vit:
        kept += F32 * v.channels * v.image_size ** 2
    if "vision_head" in stage.parts:
        if train_vit:
            kept += F32 * p * (v.width + 2)  # final LayerNorm input and its mean, rstd
        kept += (e if am.autocast else F32) * p * v.width  # projector input
    if "enc_embed" in stage.parts:
        kept += 8 * geo.prompt_len
    if "enc_head" in stage.parts:
        kept += F32 * s * (2 * t.d_model + 1)  # final norm: input, normalised, rsqrt
    if "dec_embed" in stage.parts:
        kept += 8 * tt
    if "dec_head" in stage.parts:
        kept += F32 * tt * (2 * t.d_model + 1) + e * tt * t.d_model  # final norm + lm_head input
        if chunked_loss:
            kept += F32 * tt + 8 * tt  # log-sum-exp per target, targets (the logits are recomputed)
        else:
            kept += F32 * tt * t.vocab_size / tp + 8 * tt  # fp32 (log-)softmax of the loss, targets
    return kept * mb + shared, recompute * mb
