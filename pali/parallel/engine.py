"""The training engine: PaLI on a DP x PP x TP grid, one `train_step` per global batch.

`build_engine` builds the model on the meta device, applies the TP plan, keeps this rank's pipeline
stage, materialises only this rank's shard (sliced from a full state dict, or from the same seeded init
as `create_model(cfg, seed=seed)`, so every layout starts from identical weights), and wraps the stage
in DDP (or FSDP2) over the data-parallel group. A rank holds at most one full tensor at a time while it
materialises (`materialise_shards`), so a model larger than one process's memory is built shard by shard.
"""

from __future__ import annotations

import contextlib
import functools
import json
import math
from collections.abc import Iterator, Mapping
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import nn
from torch.utils.checkpoint import checkpoint

from pali.config import PaLIConfig
from pali.factory import init_tensor
from pali.models.chunked_loss import chunked_cross_entropy
from pali.models.flex_attention import set_attention_backend
from pali.models.pali import real_targets
from pali.models.t5 import check_labels, check_token_ids, real_length
from pali.parallel.grid import Grid
from pali.parallel.stages import (
    SHARED_ACROSS_STAGES,
    FullStage,
    TokenLoss,
    build_stage_model,
    iter_blocks,
    stage_io_meta,
    stage_module,
)
from pali.parallel.tp_plan import ShardSpec, merge_shards, slice_for

BATCH_KEYS = ("pixel_values", "input_ids", "attention_mask", "labels")


@dataclass
class StepResult:
    """What one `train_step` returns (identical on every rank of a replica)."""

    loss: float
    """Mean token cross-entropy over all real target tokens of the global batch (all DP ranks)."""
    num_tokens: int
    """Real target tokens in the global batch."""
    example_loss_sum: torch.Tensor
    """float[b]: summed token loss of each of this DP rank's examples."""
    example_tokens: torch.Tensor
    """int[b]: real target tokens of each of this DP rank's examples."""


class Engine:
    """One rank's shard of PaLI plus the step logic for its place in the grid. Build with `build_engine`."""

    def __init__(self, cfg: PaLIConfig, grid: Grid, model: nn.Module, specs: dict[str, ShardSpec],
                 module: nn.Module, dp_mode: str, schedule: str, num_microbatches: int,
                 device: torch.device, autocast_dtype: torch.dtype | None, compiled: bool = False,
                 trim: bool = False, chunked_loss: bool = False, attention: str = "sdpa",
                 activation_checkpointing: bool = False, frozen_fp32: dict[str, torch.Tensor] | None = None):
        self.cfg, self.grid, self.model, self.specs = cfg, grid, model, specs
        self.compiled = compiled  # the stage runs through torch.compile (`compile_stage`)
        self.trim = trim  # cut each batch's all-padding tail columns (`trim_padding`)
        self.chunked_loss = chunked_loss  # head + loss in row chunks (`ChunkedLossStage`)
        self.attention = attention  # T5 attention backend ("sdpa" or "flex")
        self.activation_checkpointing = activation_checkpointing
        # The frozen tower's float32 weights (CPU) when the model holds it in bf16 (`build_engine`'s
        # frozen_dtype): what `local_state_dict` returns for it, so checkpoints keep the exact fp32 tower.
        self.frozen_fp32 = frozen_fp32 or {}
        self.module = module  # the stage module, wrapped by DDP / FSDP when dp > 1
        self.dp_mode, self.schedule_name = dp_mode, schedule
        self.num_microbatches, self.device, self.autocast_dtype = num_microbatches, device, autocast_dtype
        self.loss_fn = (RowLoss if chunked_loss else TokenLoss)(cfg.text.pad_token_id, vocab_parallel=grid.tp > 1)
        self._schedules: dict[tuple, object] = {}
        self._shared = [n for n in SHARED_ACROSS_STAGES if n in specs] if grid.pp > 1 else []
        # the trained parameters' dtype (a frozen tower may be held in bf16)
        self.param_dtype = next((p.dtype for p in model.parameters() if p.requires_grad),
                                next(model.parameters()).dtype)
        self.act_dtype = autocast_dtype or self.param_dtype

    # --- parameters -------------------------------------------------------------------------------
    def named_parameters(self) -> Iterator[tuple[str, nn.Parameter]]:
        """(full parameter name as in PaLI.state_dict(), local tensor) for every trainable local parameter."""
        for name, p in self.model.named_parameters():
            if p.requires_grad:
                yield name, p

    def parameters(self) -> list[nn.Parameter]:
        """Local trainable parameters (frozen vision excluded), for the optimizer."""
        return [p for _, p in self.named_parameters()]

    def shard_spec(self) -> dict[str, ShardSpec]:
        """ShardSpec of every local tensor (only the names this stage holds)."""
        return dict(self.specs)

    def zero_grad(self) -> None:
        """Drop the gradients (call between steps: `train_step` accumulates into .grad)."""
        for p in self.model.parameters():
            p.grad = None

    def train(self) -> Engine:
        """Training mode (dropout on)."""
        self.module.train()
        return self

    def eval(self) -> Engine:
        """Evaluation mode."""
        self.module.eval()
        return self

    # --- the step ---------------------------------------------------------------------------------
    def _check_batch(self, batch: Mapping[str, torch.Tensor]) -> int:
        missing = [k for k in BATCH_KEYS if k not in batch]
        if missing:
            raise KeyError(f"batch lacks {missing}; expected keys {list(BATCH_KEYS)} (+ optional image_mask)")
        b = batch["input_ids"].shape[0]
        for k in (*BATCH_KEYS, "image_mask"):
            if k in batch and batch[k].shape[0] != b:
                raise ValueError(f"batch[{k!r}] has {batch[k].shape[0]} rows; expected {b} like input_ids")
        n = self.num_microbatches
        if b < n or (self.grid.pp > 1 and b % n):
            raise ValueError(f"local batch of {b} examples cannot be cut into num_microbatches={n} "
                             + ("equal micro-batches (pipeline stages need equal shapes)" if self.grid.pp > 1
                                else "non-empty micro-batches"))
        if self.compiled or self.chunked_loss:  # checks a compiled graph / the chunked head leave out
            check_token_ids(batch["input_ids"], self.cfg.text.vocab_size, "input_ids")
            check_labels(batch["labels"], self.cfg.text.vocab_size)
        return b

    def _autocast(self):
        if self.autocast_dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(self.device.type, dtype=self.autocast_dtype)

    def train_step(self, batch: Mapping[str, torch.Tensor]) -> StepResult:
        """Forward + backward of this DP rank's share of the global batch over num_microbatches.

        batch: pixel_values float[b,3,H,W], input_ids int[b,S], attention_mask int[b,S], labels int[b,T]
        (pad / -100 ignored), optional image_mask int[b]; the same on every TP/PP rank of a replica.
        Leaves d(global mean token loss)/d(theta) accumulated in the local parameters' .grad.
        """
        return self._step(batch, train=True)

    def eval_step(self, batch: Mapping[str, torch.Tensor]) -> StepResult:
        """Forward only (no gradients touched): the same StepResult as `train_step` for held-out batches."""
        return self._step(batch, train=False)

    def _step(self, batch: Mapping[str, torch.Tensor], train: bool) -> StepResult:
        b = self._check_batch(batch)
        g = self.grid
        pad = self.cfg.text.pad_token_id
        input_ids, attention_mask, labels = batch["input_ids"], batch["attention_mask"], batch["labels"]
        if self.trim:
            input_ids, attention_mask, labels = trim_padding(input_ids, attention_mask, labels, pad,
                                                             trim_multiple(self.device))
        args = [batch["pixel_values"], input_ids, attention_mask,
                batch.get("image_mask", torch.ones(b, dtype=torch.long)), labels]
        args = [a.to(self.device) for a in args]
        labels = args[-1]
        n_tokens = real_targets(labels, pad).sum().reshape(1).to(torch.float64)
        if g.dp > 1:
            dist.all_reduce(n_tokens, group=g.dp_group)
        n_global = int(n_tokens.item())
        self.loss_fn.denominator = max(n_global, 1) / g.dp
        self.loss_fn.records.clear()
        n_mb = self.num_microbatches
        with self._autocast(), torch.set_grad_enabled(train):
            if g.pp == 1:
                self._run_local(args, n_mb, train)
            else:
                self._run_pipeline(args, n_mb, train)
        if not train and self.dp_mode == "fsdp" and g.dp > 1:
            _reshard(self.module)  # FSDP2 keeps the root unsharded after a forward without backward
        if self._shared and train:
            for name in self._shared:
                grad = self.model.get_parameter(name).grad
                if grad is not None:
                    dist.all_reduce(_local(grad), group=g.embed_group)
        # [loss_sum, example_loss_sum (b), example_tokens (b)] from the last stage to the whole replica.
        pack = torch.zeros(1 + 2 * b, dtype=torch.float64, device=self.device)
        if g.is_last_stage:
            recs = self.loss_fn.records[-n_mb:]
            ex_loss = torch.cat([r[0] for r in recs]).to(torch.float64)
            ex_tok = torch.cat([r[1] for r in recs]).to(torch.float64)
            loss_sum = ex_loss.sum().reshape(1)
            if g.dp > 1:
                dist.all_reduce(loss_sum, group=g.dp_group)
            pack = torch.cat([loss_sum, ex_loss, ex_tok])
        if g.pp > 1:
            dist.broadcast(pack, group_src=g.pp - 1, group=g.pp_group)
        pack = pack.cpu()
        return StepResult(loss=float(pack[0]) / max(n_global, 1), num_tokens=n_global,
                          example_loss_sum=pack[1:1 + b].float(), example_tokens=pack[1 + b:].long())

    def _run_local(self, args: list[torch.Tensor], n_mb: int, train: bool) -> None:
        chunks = [a.tensor_split(n_mb) for a in args]
        for i in range(n_mb):
            mb = [c[i] for c in chunks]
            if not train:
                self.loss_fn(self.module(*mb), mb[-1])
                continue
            with self._no_sync(last=i == n_mb - 1):
                logits = self.module(*mb)
                loss = self.loss_fn(logits, mb[-1])
                loss.backward()

    def _no_sync(self, last: bool):
        """Skip the DP gradient reduction on all but the last micro-batch (gradient accumulation)."""
        if self.grid.dp == 1 or last:
            if self.dp_mode == "fsdp" and self.grid.dp > 1:
                self.module.set_requires_gradient_sync(True)
            return contextlib.nullcontext()
        if self.dp_mode == "ddp":
            return self.module.no_sync()
        self.module.set_requires_gradient_sync(False)
        return contextlib.nullcontext()

    def _run_pipeline(self, args: list[torch.Tensor], n_mb: int, train: bool) -> None:
        g = self.grid
        key = (train, n_mb, *(tuple(a.shape) for a in args))  # metadata is static: one stage per shape
        sched = self._schedules.get(key)
        if sched is None:
            from torch.distributed.pipelining import PipelineStage, Schedule1F1B, ScheduleGPipe

            mb = args[0].shape[0] // n_mb
            ins, outs = stage_io_meta(self.cfg, g.pp, g.pp_rank, g.tp, mb, args[1].shape[1], args[-1].shape[1],
                                      tuple(args[0].shape[1:]), self.act_dtype, self.param_dtype)
            stage = PipelineStage(self.module, g.pp_rank, g.pp, self.device, input_args=ins, output_args=outs,
                                  group=g.pp_group)
            # 1F1B needs at least pp micro-batches; with fewer it would be GPipe's order anyway.
            cls = Schedule1F1B if self.schedule_name == "1f1b" and n_mb >= g.pp else ScheduleGPipe
            sched = cls(stage, n_microbatches=n_mb, loss_fn=self.loss_fn, scale_grads=False)
            self._schedules[key] = sched
            # A new stage's first step ends its set-up by clearing FSDP parameters' grads; keep ours.
            stash = [(p, p.grad) for p in self.model.parameters() if p.grad is not None]
            for p, _ in stash:
                p.grad = None
        else:
            stash = []
        run = sched.step if train else sched.eval
        if g.is_first_stage:
            run(*args)
        elif g.is_last_stage:
            run(target=args[-1], losses=[])
        else:
            run()
        for p, grad in stash:
            p.grad = grad if p.grad is None else p.grad + grad

    # --- gradients --------------------------------------------------------------------------------
    @torch.no_grad()
    def clip_grad_norm_(self, max_norm: float) -> float:
        """Scale gradients so their global L2 norm is at most max_norm; returns the norm before clipping.

        The norm is over the full model: TP shards counted once each, TP-replicated tensors (norms, biases
        of row-parallel layers) once, the embedding held by two stages once, DP replicas once.
        """
        g = self.grid
        grads, counted = [], []
        for name, p in self.named_parameters():
            if p.grad is None:
                continue
            grads.append(_local(p.grad))
            if self.specs[name].dim is None and g.tp_rank != 0:
                continue
            if name in self._shared and not g.is_first_stage:  # the copy on stage 0 counts
                continue
            counted.append(grads[-1])
        # One multi-tensor norm kernel per dtype/device group instead of a float64 copy of every gradient
        # (a 1.2B-parameter model's copies alone move ~20 GB per step on a GPU).
        norms = torch._foreach_norm(counted) if counted else []
        sq = (torch.stack(norms).double().pow(2).sum().reshape(1) if norms else
              torch.zeros(1, dtype=torch.float64, device=self.device))
        if g.world > 1:
            dist.all_reduce(sq)
        if self.dp_mode == "ddp":
            sq /= g.dp  # every replica holds the same reduced gradients
        total = math.sqrt(float(sq.item()))
        coef = max_norm / (total + 1e-6)
        if coef < 1.0 and grads:
            torch._foreach_mul_(grads, coef)
        return total

    # --- state ------------------------------------------------------------------------------------
    def local_state_dict(self) -> dict[str, torch.Tensor]:
        """This rank's TP/PP shards as detached CPU tensors (FSDP shards are gathered over DP first); a frozen
        tower held in bf16 is returned as the float32 weights it was built from (`frozen_fp32`)."""
        return {k: self.frozen_fp32[k].clone() if k in self.frozen_fp32 else _full(v).detach().cpu().clone()
                for k, v in self.model.state_dict().items()}

    def full_state_dict(self) -> dict[str, torch.Tensor] | None:
        """The consolidated `PaLI.state_dict()` on global rank 0 (None elsewhere). Collective: every rank calls.

        Replica 0's ranks send their shards to rank 0 point-to-point in an order every rank derives from
        the layout, so no rank needs to know more than the config and the grid.
        """
        g = self.grid
        local = self.local_state_dict()
        if g.world == 1:
            return local
        if g.dp_rank != 0:
            return None
        wire_dtype = next(iter(local.values())).dtype  # one dtype per model on every rank
        received: list[tuple[dict[str, ShardSpec], dict[str, torch.Tensor]]] = []
        have: set[tuple[str, int]] = set()
        for s in range(g.pp):
            for r in range(g.tp):
                src = g.global_rank(0, s, r)
                specs = self.specs if src == g.rank else _layout(self.cfg, g.pp, g.tp, s, r)
                got: dict[str, torch.Tensor] = {}
                for name, spec in specs.items():
                    if (name, spec.tp_rank) in have:
                        continue
                    have.add((name, spec.tp_rank))
                    if src == 0 == g.rank:
                        got[name] = local[name]
                    elif g.rank == 0:
                        shape = list(spec.shape)
                        if spec.dim is not None:
                            shape[spec.dim] //= spec.tp_size
                        buf = torch.empty(shape, dtype=wire_dtype, device=self.device)  # nccl needs GPU
                        dist.recv(buf, src=src)
                        got[name] = buf.cpu()
                    elif g.rank == src:
                        dist.send(local[name].to(self.device).contiguous(), dst=0)
                received.append((specs, got))
        return merge_shards(received) if g.rank == 0 else None


class ChunkedLossStage(FullStage):
    """The whole model as one stage, ending in the per-target loss instead of the logits: (pixels, prompt,
    mask, image_mask, labels) -> float32[N], the cross-entropy of each of the N real targets (row-major).

    The output head and the cross-entropy run in row chunks (`pali.models.chunked_loss`), so the
    float[N, V] logits of mT5's 250k vocabulary never exist at once. Inside the stage's forward, so DDP and
    FSDP2 see the head's weight used as in any layer.
    """

    def forward(self, pixel_values: torch.Tensor, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                image_mask: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        m = self.model
        text = m.text
        keep = real_targets(labels, m.cfg.text.pad_token_id)  # (B, T)
        prompt, dec = text.embed_many(input_ids, text.shift_right(labels))
        enc, enc_mask = m.encode(pixel_values, input_ids, attention_mask, image_mask, input_embeds=prompt)
        h = text.decoder(dec, enc, enc_mask)[keep]  # (N, D)
        if m.cfg.text.tie_word_embeddings:
            return chunked_cross_entropy(h, text.shared.weight, labels[keep], m.cfg.text.d_model ** -0.5)
        return chunked_cross_entropy(h, text.lm_head.weight, labels[keep])


class RowLoss(TokenLoss):
    """`TokenLoss` for a stage that returns per-target losses float[N] (`ChunkedLossStage`)."""

    def __call__(self, row_loss: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """row_loss float[N] (one per real target, row-major), labels int[B, T] -> scalar loss."""
        mask = real_targets(labels, self.pad_id)
        if row_loss.shape[0] != int(mask.sum()):
            raise ValueError(f"{row_loss.shape[0]} per-target losses for {int(mask.sum())} real targets")
        ce = torch.zeros(mask.shape, dtype=row_loss.dtype, device=row_loss.device).masked_scatter(mask, row_loss)
        per_example = ce.sum(1)  # (B,)
        self.records.append((per_example.detach(), mask.sum(1)))
        return per_example.sum() / self.denominator


def _frozen_tower_forward(tower: nn.Module, inference: bool):
    """The frozen vision tower's forward under `torch.inference_mode` (no autograd bookkeeping at all), its
    output copied out as a normal tensor for the trained projector; `torch.no_grad` where FSDP2 shards the
    tower (its unshard hooks write parameters, which inference mode forbids)."""
    forward = tower.forward

    def run(pixel_values: torch.Tensor) -> torch.Tensor:
        if torch.compiler.is_compiling():
            with torch.no_grad():
                return forward(pixel_values)
        with torch.inference_mode() if inference else torch.no_grad():
            out = forward(pixel_values)
        return out.clone() if inference else out
    return run


def trim_multiple(device: torch.device) -> int:
    """Length granularity of `trim_padding` on a device: 8 on GPUs (tensor-core-friendly GEMM shapes, few
    distinct shapes for cuBLAS's heuristics), 1 on CPU (the kernels take any shape at no extra cost)."""
    return 8 if device.type == "cuda" else 1


def trim_padding(input_ids: torch.Tensor, attention_mask: torch.Tensor, labels: torch.Tensor, pad_id: int,
                 multiple: int = 1) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Drop the trailing columns that are padding in every row: prompt columns whose attention_mask is 0
    everywhere, target columns whose labels are pad / -100 everywhere.

    The data pipeline pads every prompt and target to the config's maximum lengths (static shapes for
    Ray Data's batches); a batch's longest prompt or target is usually far shorter (on the generated
    mixture 30 of 48 prompt and 18 of 24 target columns). Attention gives masked keys zero weight and the
    decoder is causal, so cutting those columns changes no real position's output and no loss term, while
    the encoder, the decoder and their attention run over fewer positions. Lengths are rounded up to a
    multiple of `multiple` (capped at the padded length; see `trim_multiple`) and at least 1 is kept.
    """
    s = real_length(attention_mask.ne(0), multiple)
    t = real_length(real_targets(labels, pad_id), multiple)
    return input_ids[:, :s], attention_mask[:, :s], labels[:, :t]


@functools.lru_cache(maxsize=64)
def _layout_cached(cfg_json: str, pp: int, tp: int, pp_rank: int, tp_rank: int) -> dict[str, ShardSpec]:
    return build_stage_model(PaLIConfig.from_dict(json.loads(cfg_json)), pp, tp, pp_rank, tp_rank)[1]


def _layout(cfg: PaLIConfig, pp: int, tp: int, pp_rank: int, tp_rank: int) -> dict[str, ShardSpec]:
    return _layout_cached(cfg.to_json(), pp, tp, pp_rank, tp_rank)


def _local(t: torch.Tensor) -> torch.Tensor:
    """The local shard of a DTensor (FSDP2), or the tensor itself."""
    return t._local_tensor if hasattr(t, "_local_tensor") else t


def _full(t: torch.Tensor) -> torch.Tensor:
    """The whole TP shard of a DTensor sharded over DP (FSDP2), or the tensor itself."""
    return t.full_tensor() if hasattr(t, "full_tensor") else t


def _reshard(module: nn.Module) -> None:
    """Return every FSDP2 unit to its sharded parameters (those the optimizer holds)."""
    from torch.distributed.fsdp import FSDPModule

    for m in module.modules():
        if isinstance(m, FSDPModule):
            m.reshard()


def _checkpoint_blocks(model: nn.Module) -> None:
    """Recompute each transformer block's activations in backward (keeps parameter names unchanged)."""
    for block in iter_blocks(model):
        block.forward = functools.partial(checkpoint, block.forward, use_reentrant=False)


def materialise_shards(cfg: PaLIConfig, specs: Mapping[str, ShardSpec], full_state=None, seed: int = 0,
                       device: torch.device | str = "cpu", like: Mapping[str, torch.Tensor] | None = None
                       ) -> dict[str, torch.Tensor]:
    """This rank's shard of every tensor in `specs`, one full tensor at a time (never the whole model).

    full_state: None (each full tensor is `init_tensor(cfg, name, spec.shape, seed)`), or a mapping with
    `keys()` and `__getitem__` read once per name (a dict, or a lazy reader such as `LazyShardedState`).
    like: name -> tensor whose dtype each shard takes (the meta model's state_dict); float32 otherwise.
    """
    device = torch.device(device)
    if full_state is not None:
        have = set(full_state.keys())
        missing = [n for n in specs if n not in have]
        if missing:
            raise KeyError(f"full state lacks {len(missing)} tensors the shard needs, e.g. {missing[:5]}")
    shards: dict[str, torch.Tensor] = {}
    for name, spec in specs.items():
        full = init_tensor(cfg, name, spec.shape, seed) if full_state is None else full_state[name]
        local = slice_for({name: full}, {name: spec})[name]  # a copy: the full tensor can go now
        del full
        dtype = like[name].dtype if like is not None else torch.float32
        shards[name] = local.to(device=device, dtype=dtype)
        del local
    return shards


def build_engine(cfg: PaLIConfig, grid: Grid, full_state: Mapping[str, torch.Tensor] | None = None,
                 seed: int = 0, dp_mode: str = "ddp", schedule: str = "1f1b", num_microbatches: int = 1,
                 device: torch.device | str = "cpu", autocast_dtype: torch.dtype | None = None,
                 activation_checkpointing: bool = False, compile: bool | None = None, trim_padding: bool = True,
                 chunked_loss: bool | None = None, attention: str | None = None,
                 frozen_dtype: torch.dtype | None = None) -> Engine:
    """This rank's Engine: meta build -> TP plan -> stage cut -> materialise this shard -> DP wrapper.

    full_state: `PaLI.state_dict()`-named full tensors to slice from (a checkpoint, an import), a dict or
    any lazy mapping with `keys()` and `__getitem__` (e.g. `LazyShardedState`); None means the
    deterministic init of `create_model(cfg, seed=seed)`. Either way only one full tensor exists at a time.
    compile: run through `torch.compile` (inductor); see `compile_stage`. None (the default) compiles on
    CUDA, each transformer block on its own, and not on CPU; on CPU `compile=True` compiles the whole stage.
    trim_padding: without pipeline parallelism, cut each batch's all-padding tail columns (`trim_padding`)
    and run the output head at real targets only (`FullStage`). Pipeline stages exchange statically shaped
    activations and a whole compiled stage is traced for fixed shapes, so those keep the padded shapes.
    chunked_loss: end the stage in the per-target loss with the head and cross-entropy in row chunks
    (`ChunkedLossStage`: no [N, V] logits); needs pp = tp = 1. None: on CUDA where it applies.
    attention: T5 attention backend, "sdpa" (dense bias) or "flex" (`pali.models.flex_attention`); flex
    needs pp <= 2 (deeper stages pass the dense bias between them) and no attention dropout. None: flex on
    CUDA where it applies.
    The frozen vision tower (cfg.freeze_vision) runs under `torch.inference_mode` (no_grad under FSDP2).
    frozen_dtype: hold the frozen tower's weights in this dtype (it has no gradients and no optimizer state,
    so bf16 halves its memory and autocast stops casting its weights at every step); checkpoints still get
    its float32 weights (`Engine.frozen_fp32`). Needs autocast in the same dtype and an unsharded tower (not
    FSDP2 over dp > 1). None: bf16 on CUDA with bf16 autocast where it applies, float32 otherwise.
    """
    if dp_mode not in ("ddp", "fsdp"):
        raise ValueError(f"dp_mode={dp_mode!r}; expected 'ddp' or 'fsdp'")
    if schedule not in ("1f1b", "gpipe"):
        raise ValueError(f"schedule={schedule!r}; expected '1f1b' or 'gpipe'")
    if not isinstance(num_microbatches, int) or num_microbatches < 1:
        raise ValueError(f"num_microbatches={num_microbatches!r}; expected a positive integer")
    device = torch.device(device)
    cuda = device.type == "cuda"
    flex_ok = grid.pp <= 2 and cfg.text.dropout_rate == 0
    if attention is None:
        attention = "flex" if cuda and flex_ok else "sdpa"
    if attention == "flex" and not flex_ok:
        raise ValueError(f"attention='flex' needs pp <= 2 and text dropout 0; got pp={grid.pp}, "
                         f"dropout_rate={cfg.text.dropout_rate}")
    chunk_ok = grid.pp == 1 and grid.tp == 1
    if chunked_loss is None:
        chunked_loss = cuda and chunk_ok
    if chunked_loss and not chunk_ok:
        raise ValueError(f"chunked_loss needs pp = tp = 1 (the vocabulary-parallel loss handles tp > 1); "
                         f"got pp={grid.pp}, tp={grid.tp}")
    if compile is None:
        compile = cuda
    per_block = compile and (cuda or (dp_mode == "fsdp" and grid.dp > 1))
    model, specs = build_stage_model(cfg, grid.pp, grid.tp, grid.pp_rank, grid.tp_rank)
    model.load_state_dict(materialise_shards(cfg, specs, full_state, seed, device, model.state_dict()),
                          strict=True, assign=True)
    set_attention_backend(model, attention)
    frozen_fp32 = {}
    if cfg.freeze_vision and hasattr(model, "vision_tower"):
        sharded = dp_mode == "fsdp" and grid.dp > 1
        if frozen_dtype is None and cuda and autocast_dtype == torch.bfloat16 and not sharded:
            frozen_dtype = torch.bfloat16
        if frozen_dtype not in (None, torch.float32):
            if sharded or autocast_dtype != frozen_dtype:
                raise ValueError(f"frozen_dtype={frozen_dtype} needs autocast in that dtype and a tower FSDP2 does "
                                 f"not shard; got autocast_dtype={autocast_dtype}, dp_mode={dp_mode!r}, dp={grid.dp}")
            frozen_fp32 = {n: t.detach().cpu().clone() for n, t in model.state_dict().items()
                           if n.startswith("vision_tower.")}
            model.vision_tower.to(frozen_dtype)
        model.vision_tower.requires_grad_(False)
        model.vision_tower.forward = _frozen_tower_forward(model.vision_tower, inference=not sharded)
    if activation_checkpointing:
        _checkpoint_blocks(model)
    # shapes may change from batch to batch (per-block compile recompiles once shapes vary, then goes dynamic)
    dynamic = trim_padding and grid.pp == 1 and (not compile or per_block)
    if chunked_loss:
        module = ChunkedLossStage(model)
    else:
        module = stage_module(model, grid.pp, grid.pp_rank, autocast_dtype or next(model.parameters()).dtype,
                              packed_head=dynamic)
    if compile:
        compile_stage(module, per_block=per_block)
    if grid.dp > 1:
        module = _wrap_dp(module, grid, dp_mode, device)
    return Engine(cfg, grid, model, specs, module, dp_mode, schedule, num_microbatches, device, autocast_dtype,
                  compiled=compile, trim=dynamic, chunked_loss=chunked_loss, attention=attention,
                  activation_checkpointing=activation_checkpointing, frozen_fp32=frozen_fp32)


def compile_stage(module: nn.Module, per_block: bool = False) -> None:
    """Compile a stage module in place with `torch.compile` (inductor), keeping its parameter names.

    The whole stage forward becomes one graph (embeddings, position biases, every block, the output head),
    and its backward one compiled graph: on CPU this removes most per-operator dispatch and fuses the
    element-wise work around the GEMMs. With FSDP2 each transformer block is compiled on its own instead
    (FSDP's unshard/reshard hooks sit between blocks). Shapes are static in training (the data pipeline pads
    to fixed lengths), so each shape compiles once; the first step pays the compile time (tens of seconds
    for the tiny preset on 2 CPU cores; inductor caches the result on disk for the next run).
    Per block is the default on CUDA: the blocks hold the GEMMs, attention and the fused element-wise work,
    while the stage's data-dependent parts (padding cut, packed head, chunked loss) stay eager around them.
    The loss stays eager: `TokenLoss` records per-example sums for logging.
    """
    if not per_block:
        module.compile()
        return
    for block in iter_blocks(module):
        block.compile()


def _wrap_dp(module: nn.Module, grid: Grid, dp_mode: str, device: torch.device) -> nn.Module:
    if dp_mode == "ddp":
        from torch.nn.parallel import DistributedDataParallel as DDP

        return DDP(module, process_group=grid.dp_group, device_ids=None if device.type == "cpu" else [device])
    from pali.parallel.fsdp import wrap_fsdp

    return wrap_fsdp(module, grid, device)
