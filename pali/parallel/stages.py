"""Pipeline stage cuts, the stage modules, and the token loss shared by every layout.

A stage model is an unmodified `PaLI` built on the meta device, with the TP plan applied and the
submodules of other stages deleted, so parameter names stay those of `PaLI.state_dict()`.

Cuts (`STAGE_PARTS`): pp=1 holds everything; pp=2 is vision + projector + encoder | decoder + head;
pp > 2 spreads the encoder blocks over ceil(pp/2) stages and the decoder blocks over the rest
(`pali.parallel.deep`). `text.shared` (the token embedding) is used on both sides (prompt and decoder
inputs), so stage 0 and the first decoder-side stage hold a copy and the engine all-reduces its gradient
over `Grid.embed_group`, as Megatron does for tied embeddings.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from fairscale.nn.model_parallel.cross_entropy import vocab_parallel_cross_entropy
from torch import nn

from pali.config import PaLIConfig
from pali.factory import create_model
from pali.models.pali import PaLI, real_targets
from pali.parallel import deep
from pali.parallel.deep import first_decoder_stage
from pali.parallel.tp_plan import TP_PLAN, ShardSpec, apply_tp_plan, check_tp, shard_specs

_ALL_PARTS = ("vision_tower", "projector", "text.shared", "text.encoder", "text.decoder", "text.lm_head")
MAX_PP = 8


def _deep_parts(pp: int) -> list[tuple[str, ...]]:
    k = first_decoder_stage(pp)
    parts = [("vision_tower", "projector", "text.shared", "text.encoder")] + [("text.encoder",)] * (k - 1)
    for i in range(k, pp):
        parts.append(("text.shared",) * (i == k) + ("text.decoder",) + ("text.lm_head",) * (i == pp - 1))
    return parts


STAGE_PARTS: dict[int, list[tuple[str, ...]]] = {
    1: [_ALL_PARTS],
    2: [("vision_tower", "projector", "text.shared", "text.encoder"),
        ("text.shared", "text.decoder", "text.lm_head")],
    **{pp: _deep_parts(pp) for pp in range(3, MAX_PP + 1)},
}
"""Pipeline degree -> the top-level parts each stage holds (pp > 2 also splits the block lists, see
`pali.parallel.deep`; the config must have at least ceil(pp/2) encoder and floor(pp/2) decoder blocks)."""

SHARED_ACROSS_STAGES = ("text.shared.weight",)


def iter_blocks(module: nn.Module):
    """Every transformer block (an item of a `.blocks` ModuleList) under `module`, in module order."""
    for name, mod in module.named_modules():
        if name.endswith(".blocks"):
            yield from mod
"""Parameters held by two stages (0 and the first decoder-side one); gradients summed over Grid.embed_group."""


def check_pp(pp: int) -> None:
    """Raise ValueError for a pipeline degree without a defined cut."""
    if pp not in STAGE_PARTS:
        raise ValueError(f"pp={pp} has no stage cut; supported pipeline degrees are {sorted(STAGE_PARTS)} "
                         "(vision+projector+encoder | decoder+head, blocks spread when pp > 2)")


def build_stage_model(cfg: PaLIConfig, pp: int = 1, tp: int = 1, pp_rank: int = 0, tp_rank: int = 0
                      ) -> tuple[PaLI, dict[str, ShardSpec]]:
    """Meta-device PaLI with the TP plan applied and the other stages' parts removed, and its specs.

    Needs no process group, so any rank can compute any other rank's layout (resharding, gathering).
    """
    check_pp(pp)
    check_tp(cfg, tp)
    if not 0 <= pp_rank < pp or not 0 <= tp_rank < tp:
        raise ValueError(f"position pp_rank={pp_rank}, tp_rank={tp_rank} is outside pp={pp}, tp={tp}")
    model = create_model(cfg, device="meta")
    full_shapes = {k: v.shape for k, v in model.state_dict().items()}
    applied = apply_tp_plan(model, tp, tp_rank, TP_PLAN)
    if pp > 2:
        deep.cut(model, pp, pp_rank)
        return model, shard_specs(model, applied, full_shapes, tp, tp_rank)
    keep = STAGE_PARTS[pp][pp_rank]
    for part in _ALL_PARTS:
        parent_path, _, child = part.rpartition(".")
        parent = model.get_submodule(parent_path) if parent_path else model
        if part not in keep and hasattr(parent, child):
            delattr(parent, child)
    return model, shard_specs(model, applied, full_shapes, tp, tp_rank)


def layout_specs(cfg: PaLIConfig, pp: int = 1, tp: int = 1, pp_rank: int = 0, tp_rank: int = 0
                 ) -> dict[str, ShardSpec]:
    """The ShardSpec dict a rank at (pp_rank, tp_rank) of a (pp, tp) layout holds (for resharding)."""
    return build_stage_model(cfg, pp, tp, pp_rank, tp_rank)[1]


def _logits(model: PaLI, h: torch.Tensor) -> torch.Tensor:
    """Decoder hidden float[B, T, D] -> logits float[B, T, V/tp] (vocab-parallel when the head is TP)."""
    return model.text.logits(h)


class FullStage(nn.Module):
    """The whole model as one stage: (pixels, prompt, mask, image_mask, labels) -> logits.

    packed_head (the default): the output head runs only at real target positions and the logits come
    out packed, float[N, V/tp] for the N real targets in row-major order (`TokenLoss` takes both forms).
    Padded target positions then cost neither the [D, V] head GEMMs (forward and backward) nor the
    log-softmax over the vocabulary. The packed shape depends on the data, so a compiled stage
    (`compile_stage`, static shapes) keeps the full float[B, T, V/tp] logits.
    """

    def __init__(self, model: PaLI, packed_head: bool = True):
        super().__init__()
        self.model = model
        self.packed_head = packed_head

    def forward(self, pixel_values: torch.Tensor, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                image_mask: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """Logits float[N, V/tp] (packed head) or float[B, T, V/tp] for teacher-forced targets."""
        dec_in = self.model.text.shift_right(labels)  # (B, T)
        keep = real_targets(labels, self.model.cfg.text.pad_token_id) if self.packed_head else None
        return self.model.teacher_forced(pixel_values, input_ids, attention_mask, image_mask, dec_in, keep)[0]


class EncoderStage(nn.Module):
    """First of two stages: returns (encoder states float[B,S,D], their mask int[B,S], decoder ids int[B,T]).

    The encoder states leave in `act_dtype` (the autocast dtype, else the parameter dtype), which the
    static pipeline metadata promises to the next stage.
    """

    def __init__(self, model: PaLI, act_dtype: torch.dtype = torch.float32):
        super().__init__()
        self.model = model
        self.act_dtype = act_dtype

    def forward(self, pixel_values: torch.Tensor, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                image_mask: torch.Tensor, labels: torch.Tensor
                ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        enc, enc_mask = self.model.encode(pixel_values, input_ids, attention_mask, image_mask)
        return enc.to(self.act_dtype), enc_mask, self.model.text.shift_right(labels)


class DecoderStage(nn.Module):
    """Last of two stages: (encoder states, mask, decoder ids) -> logits float[B, T, V/tp] in `act_dtype`."""

    def __init__(self, model: PaLI, act_dtype: torch.dtype = torch.float32):
        super().__init__()
        self.model = model
        self.act_dtype = act_dtype

    def forward(self, enc: torch.Tensor, enc_mask: torch.Tensor, dec_in: torch.Tensor) -> torch.Tensor:
        h = self.model.text.decoder(self.model.text.embed(dec_in), enc, enc_mask)
        return _logits(self.model, h).to(self.act_dtype)


def stage_module(model: PaLI, pp: int, pp_rank: int, act_dtype: torch.dtype = torch.float32,
                 packed_head: bool = True) -> nn.Module:
    """The nn.Module that runs this rank's stage (packed_head: see `FullStage`; pipeline stages exchange
    static shapes and always return full logits)."""
    if pp == 1:
        return FullStage(model, packed_head)
    if pp > 2:
        cls = deep.DeepEncoderStage if pp_rank < first_decoder_stage(pp) else deep.DeepDecoderStage
        return cls(model, pp, pp_rank, act_dtype)
    return EncoderStage(model, act_dtype) if pp_rank == 0 else DecoderStage(model, act_dtype)


def stage_io_meta(cfg: PaLIConfig, pp: int, pp_rank: int, tp: int, mb: int, prompt_len: int, target_len: int,
                  image_shape: tuple[int, ...], act_dtype: torch.dtype, param_dtype: torch.dtype = torch.float32
                  ) -> tuple[tuple[torch.Tensor, ...], tuple[torch.Tensor, ...]]:
    """Meta-device (inputs, outputs) of a pipeline stage for one micro-batch of `mb` examples.

    Given to `PipelineStage` so it never runs its dynamic shape inference, which feeds uninitialised
    integer tensors (token ids) to the later stage.
    """
    if pp > 2:
        return deep.io_meta(cfg, pp, pp_rank, tp, mb, prompt_len, target_len, image_shape, act_dtype,
                            param_dtype)
    def meta(*shape: int, dtype: torch.dtype = torch.long) -> torch.Tensor:
        return torch.empty(shape, dtype=dtype, device="meta", requires_grad=dtype.is_floating_point)

    s_enc = cfg.vision.num_tokens + prompt_len
    stage0_out = (meta(mb, s_enc, cfg.text.d_model, dtype=act_dtype), meta(mb, s_enc), meta(mb, target_len))
    if pp_rank == 0:
        pixels = torch.empty((mb, *image_shape), dtype=torch.float32, device="meta")
        inputs = (pixels, meta(mb, prompt_len), meta(mb, prompt_len), meta(mb), meta(mb, target_len))
        return inputs, stage0_out
    return stage0_out, (meta(mb, target_len, cfg.text.vocab_size // tp, dtype=act_dtype),)


class TokenLoss:
    """Summed token cross-entropy divided by a per-step denominator (global token count / dp).

    Called once per micro-batch (by the pipeline schedule on the last stage, or by the engine). With the
    denominator N_global / dp and DDP's gradient averaging over dp, the gradients equal those of the mean
    over all real target tokens of the global batch, however it is split into replicas and micro-batches.
    Per-example sums are recorded (detached) for logging.
    """

    def __init__(self, pad_id: int, vocab_parallel: bool):
        self.pad_id = pad_id
        self.vocab_parallel = vocab_parallel
        self.denominator = 1.0
        self.records: list[tuple[torch.Tensor, torch.Tensor]] = []

    def __call__(self, logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """logits float[B, T, V/tp] or packed float[N, V/tp] (one row per real target, row-major, as
        `FullStage` returns them), labels int[B, T] (pad / -100 ignored) -> scalar loss."""
        mask = real_targets(labels, self.pad_id)  # (B, T)
        packed = logits.dim() == 2
        target = labels[mask] if packed else labels.masked_fill(~mask, 0)  # (N,) | (B, T)
        if packed and logits.shape[0] != target.shape[0]:
            raise ValueError(f"packed logits have {logits.shape[0]} rows for {target.shape[0]} real targets")
        if self.vocab_parallel:
            # fairscale subtracts the row max from its input in place; nothing else reads the logits after
            ce = vocab_parallel_cross_entropy(logits.float(), target)  # same shape as target
        else:
            ce = F.cross_entropy(logits.float().reshape(-1, logits.shape[-1]), target.flatten(), reduction="none")
            ce = ce.view_as(target)
        if packed:  # back to (B, T), zeros at padding, for the per-example sums
            ce = torch.zeros(mask.shape, dtype=ce.dtype, device=ce.device).masked_scatter(mask, ce)
        else:
            ce = ce.masked_fill(~mask, 0.0)
        per_example = ce.sum(1)  # (B,)
        self.records.append((per_example.detach(), mask.sum(1)))
        return per_example.sum() / self.denominator
