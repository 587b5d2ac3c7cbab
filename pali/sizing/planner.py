"""The training planner: enumerate TP x PP x DP layouts, size each rank, time the step, pick one.

Per-GPU memory of pipeline stage s (bytes):
    state       = params + grads + optimizer           (sharded over DP as the DP mode says)
    activations = kept(micro-batch) * in_flight(s)     (1F1B: min(pp - s, m); GPipe: m; no PP: 1)
    buffers     = pipeline send buffers held for backward (+ one gradient buffer)
    transient   = recomputed block (checkpointing) + logits + DDP buckets + FSDP unsharded units (and
                  the unsharded gradients FSDP2 accumulates over micro-batches) + autocast's bf16
                  weight copies + a fixed runtime overhead (CUDA context, NCCL)
A layout fits when the sum stays under (1 - headroom) of the GPU's memory.

Step time = (m + pp - 1) * max_s t_s + t_TP + exposed t_DP, where t_s is stage s's executed FLOPs of one
micro-batch / (tp * peak * MFU); TP collectives are not overlapped, DP ones overlap the backward
(DDP: 2/3 of compute) or the whole step (FSDP).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Literal

from pali.config import PaLIConfig
from pali.models.chunked_loss import chunk_rows
from pali.sizing.cost import boundary_bytes, ring_allreduce, ring_gather, stage_flops, tp_bytes
from pali.sizing.hardware import GPU
from pali.sizing.memory import F32, ActivationModel, Geometry, Stage, cut_stages, stage_activations, stage_params

DPMode = Literal["ddp", "zero1", "fsdp"]
Precision = Literal["amp", "bf16", "fp32"]
RUNNABLE_DP_MODES = ("ddp", "fsdp")
"""DP modes `pali.parallel.build_engine` implements (ZeRO-1 is modelled only)."""


def runnable_pp() -> tuple[int, ...]:
    """Pipeline degrees with a stage cut in `pali.parallel.stages`."""
    try:
        from pali.parallel.stages import STAGE_PARTS
    except ImportError:  # fairscale missing: the planner still works
        return (1, 2)
    return tuple(sorted(STAGE_PARTS))


@dataclass
class Precisions:
    """Bytes per element of each kind of state for a precision recipe."""

    param: int
    """Parameters as the model holds them."""
    grad: int
    """Gradients."""
    optim: int
    """Optimizer state per trainable parameter (AdamW moments, plus fp32 master weights under bf16)."""
    act: int
    """Activations."""

    @classmethod
    def of(cls, precision: Precision) -> Precisions:
        """amp: fp32 weights (a frozen tower's bf16: `rank_memory`) + bf16 autocast (what `--use-gpu`
        trains); bf16: bf16 weights and grads with fp32 master weights in the optimizer; fp32: everything fp32
        (CPU)."""
        if precision == "amp":
            return cls(4, 4, 8, 2)
        if precision == "bf16":
            return cls(2, 2, 12, 2)
        if precision == "fp32":
            return cls(4, 4, 8, 4)
        raise ValueError(f"precision={precision!r}; expected amp, bf16 or fp32")


@dataclass
class RankMemory:
    """Bytes one GPU of a layout holds at its peak (the worst pipeline stage)."""

    params: float = 0.0
    """Parameters (frozen ones included)."""
    grads: float = 0.0
    """Gradients of trainable parameters."""
    optimizer: float = 0.0
    """AdamW state (+ fp32 master weights under bf16)."""
    activations: float = 0.0
    """Tensors saved for backward, all micro-batches in flight."""
    activations_no_ckpt: float = 0.0
    """The same without activation checkpointing (for comparison)."""
    activations_ckpt: float = 0.0
    """The same with activation checkpointing (for comparison)."""
    pipeline_buffers: float = 0.0
    """Stage outputs kept for backward and gradient receive buffers."""
    transient: float = 0.0
    """Recomputed block, logits, DDP buckets, FSDP unsharded units, autocast weight cache, runtime."""
    fsdp_unsharded_grads: float = 0.0
    """Unsharded gradients FSDP2 accumulates between micro-batches (its excess over the shard is in
    `transient`)."""
    stage: int = 0
    """Pipeline stage this peak belongs to."""

    @property
    def state(self) -> float:
        """params + grads + optimizer."""
        return self.params + self.grads + self.optimizer

    @property
    def total(self) -> float:
        """Everything."""
        return self.state + self.activations + self.pipeline_buffers + self.transient


def rank_memory(cfg: PaLIConfig, tp: int, pp: int, dp: int, stage_index: int, geo: Geometry, micro_batch: int,
                num_microbatches: int, dp_mode: DPMode = "ddp", checkpointing: bool = False,
                precision: Precision = "amp", fused_attention: bool = True, schedule: str = "1f1b",
                overhead_bytes: float = 0.0, chunked_loss: bool = False) -> RankMemory:
    """Memory of one GPU at pipeline stage `stage_index` of a (tp, pp, dp) layout.

    chunked_loss: the head and loss run in row chunks of `chunk_rows(V)` targets (`pali.models.chunked_loss`):
    no [T, V] softmax kept, and the transient logits are one chunk's instead of the micro-batch's.
    """
    pr = Precisions.of(precision)
    stages = cut_stages(cfg, pp)
    st = stages[stage_index]
    pc = stage_params(cfg, st, tp)
    shard_all = dp if dp_mode == "fsdp" else 1
    shard_opt = dp if dp_mode in ("fsdp", "zero1") else 1
    mem = RankMemory(stage=stage_index)
    # Under amp the engine holds a frozen tower in bf16 unless FSDP2 shards it (`build_engine`'s frozen_dtype).
    frozen = 2 if precision == "amp" and not (dp_mode == "fsdp" and dp > 1) else pr.param
    mem.params = (pc.trainable * pr.param + pc.frozen * frozen) / shard_all
    mem.grads = pc.trainable * pr.grad / shard_all
    mem.optimizer = pc.trainable * pr.optim / shard_opt
    am = ActivationModel(pr.act, fused_attention)
    if pp == 1:
        in_flight = 1
    elif schedule == "gpipe" or num_microbatches < pp:
        in_flight = num_microbatches
    else:
        in_flight = min(pp - stage_index, num_microbatches)
    kept = {ck: stage_activations(cfg, st, tp, geo, am, ck, micro_batch, chunked_loss) for ck in (False, True)}
    mem.activations_no_ckpt = kept[False][0] * in_flight
    mem.activations_ckpt = kept[True][0] * in_flight
    mem.activations = mem.activations_ckpt if checkpointing else mem.activations_no_ckpt
    out = boundary_bytes(cfg, stages, stage_index, geo, micro_batch, pr.act, tp)
    mem.pipeline_buffers = out * in_flight + out  # outputs kept for backward + their gradient
    t = cfg.text
    transient = kept[True][1] if checkpointing else 0.0
    if "dec_head" in st.parts:
        rows = micro_batch * geo.target_len
        if chunked_loss:  # one chunk's logits, their fp32 copy and the fp32 gradient of the logits
            rows = min(rows, chunk_rows(t.vocab_size))
        transient += rows * t.vocab_size / tp * (pr.act + (F32 if pr.act < F32 else 0) + (F32 if chunked_loss else 0))
    if dp > 1 and dp_mode in ("ddp", "zero1"):
        transient += pc.trainable * pr.grad  # DDP's gradient buckets (a second copy of the gradients)
    if dp > 1 and dp_mode == "fsdp":
        unsharded = _fsdp_unsharded(cfg, st, tp)
        transient += unsharded * pr.param * (dp - 1) / dp
        # FSDP2 without gradient sync (every micro-batch but the last) accumulates *unsharded* gradients
        accumulated = pc.trainable if num_microbatches > 1 else min(unsharded, pc.trainable)
        mem.fsdp_unsharded_grads = accumulated * pr.grad if num_microbatches > 1 else 0.0
        transient += accumulated * pr.grad * (dp - 1) / dp
    if precision == "amp":
        # autocast caches a bf16 copy of every trained fp32 weight for the whole step, and autograd saves it
        # for backward; FSDP2 frees the gathered fp32 weight, not this copy, so it is counted unsharded.
        transient += 2 * pc.trainable
    mem.transient = transient + overhead_bytes
    return mem


def _fsdp_unsharded(cfg: PaLIConfig, st: Stage, tp: int) -> float:
    """Parameters FSDP2 holds unsharded at once: the root unit (everything outside `.blocks` and the T5
    blocks owning the relative bias) for the whole step, plus two blocks (current and prefetched)."""
    from pali.sizing.memory import t5_block_params, vit_block_params

    everything = stage_params(cfg, st, tp).total
    enc, dec = t5_block_params(cfg, tp, False, False), t5_block_params(cfg, tp, True, False)
    vit = vit_block_params(cfg, tp)
    sharded_blocks = (st.vit_blocks * vit + max(0, st.enc_blocks - ("enc_bias0" in st.parts)) * enc
                      + max(0, st.dec_blocks - ("dec_bias0" in st.parts)) * dec)
    biggest = max([n for n, k in ((vit, st.vit_blocks), (enc, st.enc_blocks), (dec, st.dec_blocks)) if k] or [0])
    return everything - sharded_blocks + 2 * biggest


@dataclass
class PlanRequest:
    """What to plan: model, cluster, batch."""

    cfg: PaLIConfig
    """Model config (a preset, possibly overridden)."""
    gpu: GPU
    """Accelerator type."""
    nodes: int = 1
    """Number of nodes."""
    gpus_per_node: int = 8
    """GPUs per node (TP stays inside a node)."""
    global_batch: int = 256
    """Examples per optimizer step."""
    geo: Geometry = field(default_factory=lambda: Geometry(32, 32))
    """Prompt and target lengths."""
    mfu: float = 0.4
    """Assumed fraction of peak the executed FLOPs reach."""
    headroom: float = 0.1
    """Fraction of GPU memory left free (fragmentation, spikes)."""
    overhead_gb: float = 2.0
    """Fixed per-GPU runtime memory (CUDA context, NCCL buffers), GB."""
    precision: Precision = "amp"
    """Mixed-precision recipe."""
    micro_batch: int | None = None
    """Force this micro-batch size (None: the planner chooses)."""
    schedule: str = "1f1b"
    """Pipeline schedule (1f1b or gpipe)."""
    chunked_loss: bool = True
    """Model the engine's chunked output head + loss (`pali.models.chunked_loss`; on GPU at pp = tp = 1)."""

    @property
    def world(self) -> int:
        """Total GPUs."""
        return self.nodes * self.gpus_per_node


@dataclass
class LayoutPlan:
    """One candidate layout, sized and timed."""

    tp: int
    """Tensor-parallel degree."""
    pp: int
    """Pipeline degree."""
    dp: int
    """Data-parallel degree."""
    dp_mode: str
    """ddp, zero1 or fsdp."""
    checkpointing: bool
    """Activation checkpointing per block."""
    micro_batch: int
    """Examples per micro-batch on one rank."""
    num_microbatches: int
    """Micro-batches per step per replica."""
    runnable: bool
    """Whether `pali.parallel` implements this layout today (else it is modelled only)."""
    memory: dict
    """RankMemory of the worst stage as a dict of GB, plus total_gb."""
    fits: bool
    """Total under (1 - headroom) of the GPU."""
    step_time_s: float
    """Predicted seconds per optimizer step."""
    examples_per_s: float
    """global_batch / step_time_s."""
    mfu: float
    """Model FLOPs utilisation this step time implies (model FLOPs / (world * peak * time))."""
    bubble: float
    """Pipeline idle fraction (pp-1)/(m+pp-1)."""
    stage_imbalance: float
    """Slowest stage / mean stage compute (1.0 = balanced)."""
    comm_gb: dict
    """GB sent per GPU per step: tp, pp, dp, total."""
    comm_time_s: dict
    """Seconds of TP, PP and DP communication per step, and the exposed DP part."""
    notes: list = field(default_factory=list)
    """Why a layout is modelled only, etc."""

    def to_dict(self) -> dict:
        """JSON form."""
        return asdict(self)


def _divisors(n: int) -> list[int]:
    return [d for d in range(1, n + 1) if n % d == 0]


def tp_candidates(cfg: PaLIConfig, gpus_per_node: int) -> list[int]:
    """TP degrees inside one node that divide heads, MLP widths and the vocabulary."""
    v, t = cfg.vision, cfg.text
    sizes = (v.num_heads, v.mlp_dim, v.width, t.num_heads, t.d_ff, t.vocab_size)
    return [d for d in _divisors(gpus_per_node) if all(x % d == 0 for x in sizes)]


def pp_candidates(cfg: PaLIConfig, world: int, max_pp: int = 16) -> list[int]:
    """Pipeline degrees the model can be cut into: ceil(pp/2) encoder-side stages need as many encoder
    blocks, floor(pp/2) decoder-side stages as many decoder blocks."""
    t = cfg.text
    return [p for p in range(1, min(world, max_pp) + 1)
            if (p + 1) // 2 <= t.num_layers and p // 2 <= t.num_decoder_layers]


def evaluate(req: PlanRequest, tp: int, pp: int, dp_mode: str, checkpointing: bool,
             micro_batch: int) -> LayoutPlan:
    """Size and time one layout at a given micro-batch size."""
    cfg, gpu, geo = req.cfg, req.gpu, req.geo
    dp = req.world // (tp * pp)
    local = req.global_batch // dp
    m = local // micro_batch
    pr = Precisions.of(req.precision)
    stages = cut_stages(cfg, pp)
    chunked = req.chunked_loss and pp == 1 and tp == 1  # where the engine runs it
    mems = [rank_memory(cfg, tp, pp, dp, i, geo, micro_batch, m, dp_mode, checkpointing, req.precision,
                        True, req.schedule, req.overhead_gb * 1e9, chunked) for i in range(pp)]
    worst = max(mems, key=lambda x: x.total)
    fits = worst.total <= gpu.memory_bytes * (1 - req.headroom)
    # compute
    rate = tp * gpu.peak_flops * req.mfu
    fl = [stage_flops(cfg, st, geo, checkpointing, recompute_head=chunked) for st in stages]
    t_stage = [f.executed * micro_batch / rate for f in fl]
    compute = (m + pp - 1) * max(t_stage) if pp > 1 else m * t_stage[0]
    bubble = (pp - 1) / (m + pp - 1)
    imbalance = max(t_stage) / (sum(t_stage) / pp)
    # communication per GPU per step (worst stage)
    tp_b = max(tp_bytes(cfg, st, geo, tp, micro_batch, pr.act, checkpointing) for st in stages) * m
    pp_b = 2 * m * max(boundary_bytes(cfg, stages, i, geo, micro_batch, pr.act, tp) for i in range(pp))
    dp_b = 0.0
    for st in stages:
        pc = stage_params(cfg, st, tp)
        if dp_mode == "fsdp":  # all-gather before every micro-batch's forward and backward, one reduce-scatter
            b = ring_gather(pc.total * pr.param, dp) * 2 * m + ring_gather(pc.trainable * pr.grad, dp)
        else:
            b = ring_allreduce(pc.trainable * pr.grad, dp)
        dp_b = max(dp_b, b)
    intra = gpu.intra_node_bw
    model_group = tp * pp
    pp_bw = intra if model_group <= req.gpus_per_node else gpu.inter_node_bw
    dp_bw = intra if req.world <= req.gpus_per_node else gpu.inter_node_bw
    t_tp, t_pp, t_dp = tp_b / intra, pp_b / pp_bw, dp_b / dp_bw
    overlap = compute if dp_mode == "fsdp" else compute * 2 / 3
    exposed = max(0.0, t_dp - overlap)
    step = compute + t_tp + exposed
    model_flops = sum(f.model for f in fl) * req.global_batch
    notes = []
    runnable = True
    if pp not in runnable_pp():
        runnable = False
        notes.append(f"pp={pp}: pali.parallel cuts at most pp={max(runnable_pp())} (modelled with the same scheme)")
    if dp_mode not in RUNNABLE_DP_MODES:
        runnable = False
        notes.append("zero1: modelled only (pali.parallel offers ddp and fsdp)")
    gb = 1e9
    memory = {k: v / gb for k, v in asdict(worst).items() if k != "stage"}
    memory.update(state=worst.state / gb, total=worst.total / gb, stage=worst.stage)
    return LayoutPlan(
        tp=tp, pp=pp, dp=dp, dp_mode=dp_mode, checkpointing=checkpointing, micro_batch=micro_batch,
        num_microbatches=m, runnable=runnable, memory=memory, fits=fits, step_time_s=step,
        examples_per_s=req.global_batch / step, mfu=model_flops / (req.world * gpu.peak_flops * step),
        bubble=bubble, stage_imbalance=imbalance,
        comm_gb={"tp": tp_b / gb, "pp": pp_b / gb, "dp": dp_b / gb, "total": (tp_b + pp_b + dp_b) / gb},
        comm_time_s={"tp": t_tp, "pp": t_pp, "dp": t_dp, "dp_exposed": exposed}, notes=notes)


def _micro_batches(req: PlanRequest, pp: int, local: int) -> list[int]:
    """Micro-batch sizes to try, in order of preference (big first; pipelines want >= 4*pp micro-batches)."""
    if req.micro_batch is not None:
        return [req.micro_batch] if local % req.micro_batch == 0 else []
    sizes = sorted(_divisors(local), reverse=True)
    if pp == 1:
        return sizes
    good = [s for s in sizes if local // s >= 4 * pp]
    ok = [s for s in sizes if pp <= local // s < 4 * pp]
    return good + ok[::-1] if good else ok[::-1] + [s for s in sizes if local // s < pp]


def plan(req: PlanRequest) -> list[LayoutPlan]:
    """Every valid (tp, pp, dp, dp_mode, checkpointing) layout, each at its best fitting micro-batch,
    sorted: fitting first, runnable first, fastest, then least communication."""
    if req.global_batch < 1 or req.nodes < 1 or req.gpus_per_node < 1:
        raise ValueError(f"global_batch={req.global_batch}, nodes={req.nodes}, gpus_per_node="
                         f"{req.gpus_per_node}; expected positive integers")
    if not 0 < req.mfu <= 1:
        raise ValueError(f"mfu={req.mfu}; expected a fraction in (0, 1]")
    out: list[LayoutPlan] = []
    for tp in tp_candidates(req.cfg, req.gpus_per_node):
        for pp in pp_candidates(req.cfg, req.world // tp):
            if req.world % (tp * pp):
                continue
            dp = req.world // (tp * pp)
            if req.global_batch % dp:
                continue
            local = req.global_batch // dp
            for dp_mode in ("ddp", "zero1", "fsdp") if dp > 1 else ("ddp",):
                for ck in (False, True):
                    best = None
                    for mb in _micro_batches(req, pp, local):
                        cand = evaluate(req, tp, pp, dp_mode, ck, mb)
                        best = best or cand
                        if cand.fits:
                            best = cand
                            break
                    if best is not None:
                        out.append(best)
    out.sort(key=lambda p: (not p.fits, not p.runnable, round(p.step_time_s, 6), p.comm_gb["total"],
                            p.memory["total"]))
    return out


def recommend(plans: list[LayoutPlan]) -> LayoutPlan | None:
    """The first fitting layout of `plan`'s order (runnable preferred), or None when nothing fits."""
    fitting = [p for p in plans if p.fits]
    return fitting[0] if fitting else None
