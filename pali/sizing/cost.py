"""Compute and communication of one training step: FLOPs per stage, TP / PP / DP bytes per GPU.

FLOPs split `pali.models.pali.flops_per_example` by component (the parts sum to it exactly): model FLOPs
count a frozen vision tower's forward only (a third of its training FLOPs). Executed (hardware) FLOPs add
what runs again in backward (`pali.models.pali.hardware_flops_per_example`): activation checkpointing
runs every trained block's forward twice but its last matmul (`recompute_flops`), and the chunked loss
recomputes the output head's forward (+ a third of the head's).

Collectives move bytes per GPU as a ring does: all-reduce 2(g-1)/g * n, reduce-scatter and all-gather
(g-1)/g * n each.
"""

from __future__ import annotations

from dataclasses import dataclass

from pali.config import PaLIConfig
from pali.sizing.memory import F32, Geometry, Stage


@dataclass
class StageFlops:
    """Training FLOPs of one example in one stage."""

    model: float
    """Model FLOPs (the MFU numerator: 6*N*tokens + attention for trained parts, a frozen tower's forward)."""
    executed: float
    """FLOPs the stage really runs (the HFU numerator: model FLOPs plus recomputation)."""


def block_flops(cfg: PaLIConfig, geo: Geometry) -> dict[str, float]:
    """Training FLOPs of one example in one block of each kind, and in the non-block parts."""
    v, t = cfg.vision, cfg.text
    p, s, tt = v.num_tokens, geo.enc_len(cfg), geo.target_len
    attn = 4 * t.d_model * t.inner_dim
    ff = (3 if t.feed_forward_proj == "gated-gelu" else 2) * t.d_model * t.d_ff
    cross_kv = 2 * t.d_model * t.inner_dim
    return {
        "vit": 6 * (4 * v.width ** 2 + 2 * v.width * v.mlp_dim) * p + 12 * v.width * p * p,
        "enc": 6 * (attn + ff) * s + 12 * t.inner_dim * s * s,
        "dec": (6 * (2 * attn - cross_kv + ff) * tt + 6 * cross_kv * s
                + 12 * t.inner_dim * (tt * tt + tt * s)),
        "vision_embed": 6 * v.channels * v.patch_size ** 2 * v.width * v.num_patches,
        "vision_head": 6 * v.width * t.d_model * p,  # the projector
        "dec_head": 6 * t.d_model * t.vocab_size * tt,
    }


def recompute_flops(cfg: PaLIConfig, geo: Geometry) -> dict[str, float]:
    """FLOPs one checkpointed block of each kind runs again in backward, per example: its forward (a third of
    `block_flops`) but its last matmul, the feed-forward's output projection (torch's non-reentrant
    checkpoint stops once every saved tensor is recomputed, and nothing saves that output)."""
    v, t = cfg.vision, cfg.text
    f = block_flops(cfg, geo)
    s, tt = geo.enc_len(cfg), geo.target_len
    return {"vit": f["vit"] / 3 - 2 * v.mlp_dim * v.width * v.num_tokens,
            "enc": f["enc"] / 3 - 2 * t.d_ff * t.d_model * s,
            "dec": f["dec"] / 3 - 2 * t.d_ff * t.d_model * tt}


def stage_flops(cfg: PaLIConfig, stage: Stage, geo: Geometry, checkpointing: bool,
                recompute_head: bool = False) -> StageFlops:
    """Model and executed training FLOPs of one example in `stage` (recompute_head: the chunked loss)."""
    f = block_flops(cfg, geo)
    frozen = cfg.freeze_vision
    vit_blocks = stage.vit_blocks * f["vit"]
    vit_train = vit_blocks + (f["vision_embed"] if "vision_embed" in stage.parts else 0.0)
    text_blocks = stage.enc_blocks * f["enc"] + stage.dec_blocks * f["dec"]
    rest = sum(f[k] for k in ("vision_head", "dec_head") if k in stage.parts)
    model = (vit_train / 3 if frozen else vit_train) + text_blocks + rest
    extra = 0.0
    if checkpointing:  # a checkpointed block runs its forward again; a frozen tower has no backward to feed
        r = recompute_flops(cfg, geo)
        extra += stage.enc_blocks * r["enc"] + stage.dec_blocks * r["dec"]
        extra += 0.0 if frozen else stage.vit_blocks * r["vit"]
    if recompute_head and "dec_head" in stage.parts:
        extra += f["dec_head"] / 3
    return StageFlops(model, model + extra)


def ring_allreduce(n: float, g: int) -> float:
    """Bytes one GPU sends in a ring all-reduce of n bytes over g ranks."""
    return 2 * (g - 1) / g * n if g > 1 else 0.0


def ring_gather(n: float, g: int) -> float:
    """Bytes one GPU sends in a ring all-gather or reduce-scatter of n (full) bytes over g ranks."""
    return (g - 1) / g * n if g > 1 else 0.0


def tp_bytes(cfg: PaLIConfig, stage: Stage, geo: Geometry, tp: int, mb: int, e: int,
             checkpointing: bool) -> float:
    """Bytes one TP rank sends per micro-batch for the Megatron collectives of `stage`.

    Per block, forward all-reduces after every row-parallel layer (ViT: o, fc2; encoder: o, wo; decoder:
    self o, cross o, wo) and backward all-reduces the input gradient of every column-parallel layer
    (fairscale runs one per layer: q, k, v, fc1 / wi_0, wi_1; decoder cross k, v over S). A frozen tower
    has no backward; checkpointing repeats the forward ones. Plus the vocabulary-parallel embedding
    (forward) and head (backward).
    """
    if tp == 1:
        return 0.0
    v, t = cfg.vision, cfg.text
    p, s, tt = v.num_tokens, geo.enc_len(cfg), geo.target_len
    n_wi = 2 if t.feed_forward_proj == "gated-gelu" else 1
    act = e * mb
    vit_tok = act * p * v.width
    fwd = {"vit": 2 * vit_tok, "enc": 2 * act * s * t.d_model, "dec": 3 * act * tt * t.d_model}
    bwd = {"vit": 0.0 if cfg.freeze_vision else 4 * vit_tok,
           "enc": (3 + n_wi) * act * s * t.d_model,
           "dec": (4 + n_wi) * act * tt * t.d_model + 2 * act * s * t.d_model}
    total = 0.0
    for kind, n in (("vit", stage.vit_blocks), ("enc", stage.enc_blocks), ("dec", stage.dec_blocks)):
        recompute = checkpointing and not (kind == "vit" and cfg.freeze_vision)
        total += n * (fwd[kind] * (2 if recompute else 1) + bwd[kind])
    if "enc_embed" in stage.parts:
        total += F32 * mb * geo.prompt_len * t.d_model
    if "dec_embed" in stage.parts:
        total += F32 * mb * tt * t.d_model
    if "dec_head" in stage.parts:
        total += act * tt * t.d_model + 3 * F32 * mb * tt  # head input grad; loss max / sums
    return ring_allreduce(total, tp)


def boundary_bytes(cfg: PaLIConfig, stages: list[Stage], i: int, geo: Geometry, mb: int, e: int,
                   tp: int = 1) -> float:
    """Float bytes stage i sends to stage i+1 per micro-batch (the backward sends their gradients back),
    plus the integer masks and ids, as `pali.parallel.deep.io_meta` declares them."""
    t = cfg.text
    s, tt = geo.enc_len(cfg), geo.target_len
    if i >= len(stages) - 1:
        return 0.0
    ids = 8 * mb * (s + tt)  # encoder mask and decoder ids
    if stages[i + 1].first_unit == "dec" and stages[i].first_unit != "dec":  # encoder side -> decoder side
        return e * mb * s * t.d_model + ids
    if stages[i].first_unit != "dec":  # inside the encoder: hidden states + the fp32 position bias
        return e * mb * s * t.d_model + F32 * mb * t.num_heads * s * s / tp + ids
    # inside the decoder: hidden states, encoder states, causal self bias [1, H, T, T], mask
    return e * mb * (tt + s) * t.d_model + F32 * t.num_heads * tt * tt / tp + 8 * mb * s

