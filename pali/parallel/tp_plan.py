"""The tensor-parallel plan (plain data keyed by module path), shard specs, and resharding helpers.

`TP_PLAN` maps fnmatch patterns over `PaLI.named_modules()` paths to a style:

| style      | layer swapped in                       | weight split      | math                               |
|------------|----------------------------------------|-------------------|------------------------------------|
| `colwise`  | fairscale `ColumnParallelLinear`       | dim 0 (outputs)   | Y_i = X A_i, no gather             |
| `rowwise`  | fairscale `RowParallelLinear`          | dim 1 (inputs)    | Y = sum_i X_i A_i (all-reduce)     |
| `vocab`    | fairscale `VocabParallelEmbedding`     | dim 0 (vocab)     | rows outside the shard give 0, sum |
| `heads`    | `nn.Embedding` with H/tp columns       | dim 1 (heads)     | bias of this rank's heads only     |

`colwise` on `text.lm_head` leaves vocab-parallel logits that fairscale's `vocab_parallel_cross_entropy`
consumes. Everything unmatched (norms, patch embedding, position embeddings, projector) is replicated
across TP ranks; its gradient is the same on every TP rank because every column-parallel input
all-reduces its gradient in backward.

The plan is applied to an unmodified `PaLI` built on the meta device; parameters are materialised later
from a full state dict with `slice_for`.
"""

from __future__ import annotations

import fnmatch
from collections.abc import Iterable, Mapping
from dataclasses import dataclass

import torch
from fairscale.nn.model_parallel.layers import ColumnParallelLinear, RowParallelLinear, VocabParallelEmbedding
from torch import nn

from pali.config import PaLIConfig

_QKV = ("q", "k", "v")
TP_PLAN: dict[str, str] = {
    **{f"vision_tower.blocks.*.attn.{n}": "colwise" for n in _QKV},
    "vision_tower.blocks.*.attn.o": "rowwise",
    "vision_tower.blocks.*.mlp.fc1": "colwise",
    "vision_tower.blocks.*.mlp.fc2": "rowwise",
    "text.shared": "vocab",
    **{f"text.*.blocks.*.{a}.{n}": "colwise" for a in ("self_attn", "cross_attn") for n in _QKV},
    **{f"text.*.blocks.*.{a}.o": "rowwise" for a in ("self_attn", "cross_attn")},
    "text.*.blocks.*.self_attn.relative_attention_bias": "heads",
    **{f"text.*.blocks.*.mlp.{n}": "colwise" for n in ("wi", "wi_0", "wi_1")},
    "text.*.blocks.*.mlp.wo": "rowwise",
    "text.lm_head": "colwise",
}
"""Module-path pattern -> TP style for PaLI (the first matching pattern wins)."""

# (parameter suffix -> split dim) for each style; a missing suffix is replicated.
_SPLIT_DIMS: dict[str, dict[str, int]] = {
    "colwise": {"weight": 0, "bias": 0},
    "rowwise": {"weight": 1},
    "vocab": {"weight": 0},
    "heads": {"weight": 1},
}


@dataclass(frozen=True)
class ShardSpec:
    """How one local tensor relates to the full tensor of the same name in `PaLI.state_dict()`."""

    shape: tuple[int, ...]
    """Full (unsharded) shape."""
    dim: int | None
    """Dimension split evenly across TP ranks, or None when every TP rank holds the whole tensor."""
    tp_rank: int = 0
    """Which of the tp_size contiguous chunks this rank holds."""
    tp_size: int = 1
    """Number of chunks."""

    def to_dict(self) -> dict:
        """JSON form (for checkpoint metadata)."""
        return {"shape": list(self.shape), "dim": self.dim, "tp_rank": self.tp_rank, "tp_size": self.tp_size}

    @classmethod
    def from_dict(cls, d: Mapping) -> ShardSpec:
        """Inverse of `to_dict`."""
        return cls(tuple(d["shape"]), d["dim"], int(d["tp_rank"]), int(d["tp_size"]))


def plan_style(path: str, plan: Mapping[str, str] = TP_PLAN) -> str | None:
    """The TP style of a module path under `plan`, or None when the module is replicated."""
    for pattern, style in plan.items():
        if fnmatch.fnmatchcase(path, pattern):
            return style
    return None


def check_tp(cfg: PaLIConfig, tp: int) -> None:
    """Raise ValueError naming the size that `tp` does not divide (heads, widths, vocabulary)."""
    if tp == 1:
        return
    v, t = cfg.vision, cfg.text
    checks = {"vision.num_heads": v.num_heads, "vision.mlp_dim": v.mlp_dim, "text.num_heads": t.num_heads,
              "text.d_ff": t.d_ff, "text.vocab_size": t.vocab_size}
    for name, value in checks.items():
        if value % tp:
            raise ValueError(f"{name}={value} is not divisible by tp={tp}; tensor parallelism splits it "
                             f"evenly across TP ranks")
    if t.tie_word_embeddings:
        raise ValueError("tie_word_embeddings=True (T5 v1.0 tied head) is not supported with tp > 1; "
                         "use tp=1 or an untied (mT5 / T5 v1.1) config")


def _split(n: int, tp: int, what: str) -> int:
    if n % tp:
        raise ValueError(f"{what} has size {n}, not divisible by tp={tp}")
    return n // tp


def _meta_param(*shape: int, like: torch.Tensor) -> nn.Parameter:
    return nn.Parameter(torch.empty(*shape, device="meta", dtype=like.dtype), requires_grad=like.requires_grad)


def _swap(module: nn.Module, style: str, tp: int, tp_rank: int, path: str) -> nn.Module:
    """A meta-device TP replacement of `module` (fairscale layers built without their eager init)."""
    if style in ("colwise", "rowwise"):
        if not isinstance(module, nn.Linear):
            raise TypeError(f"{path} is {type(module).__name__}; style {style!r} expects nn.Linear")
        cls = ColumnParallelLinear if style == "colwise" else RowParallelLinear
        new = cls.__new__(cls)
        nn.Module.__init__(new)
        new.in_features, new.out_features = module.in_features, module.out_features
        new.master_weight = None
        if style == "colwise":
            new.gather_output = False
            new.output_size_per_partition = _split(module.out_features, tp, path)
            new.weight = _meta_param(new.output_size_per_partition, module.in_features, like=module.weight)
            bias_size = new.output_size_per_partition
        else:
            new.input_is_parallel = True
            new.input_size_per_partition = _split(module.in_features, tp, path)
            new.weight = _meta_param(module.out_features, new.input_size_per_partition, like=module.weight)
            bias_size = module.out_features
        if module.bias is not None:
            new.bias = _meta_param(bias_size, like=module.bias)
        else:
            new.register_parameter("bias", None)
        return new
    if style == "vocab":
        if not isinstance(module, nn.Embedding):
            raise TypeError(f"{path} is {type(module).__name__}; style 'vocab' expects nn.Embedding")
        new = VocabParallelEmbedding.__new__(VocabParallelEmbedding)
        nn.Module.__init__(new)
        per = _split(module.num_embeddings, tp, path)
        new.num_embeddings, new.embedding_dim = module.num_embeddings, module.embedding_dim
        new.padding_idx, new.max_norm, new.norm_type = None, None, 2.0
        new.scale_grad_by_freq, new.sparse, new._weight = False, False, None
        new.vocab_start_index, new.vocab_end_index = tp_rank * per, (tp_rank + 1) * per
        new.num_embeddings_per_partition = per
        new.weight = _meta_param(per, module.embedding_dim, like=module.weight)
        return new
    if style == "heads":
        if not isinstance(module, nn.Embedding):
            raise TypeError(f"{path} is {type(module).__name__}; style 'heads' expects nn.Embedding")
        new = nn.Embedding(module.num_embeddings, _split(module.embedding_dim, tp, path), device="meta")
        new.weight.requires_grad_(module.weight.requires_grad)
        return new
    raise ValueError(f"unknown TP style {style!r} for {path}; expected one of {sorted(_SPLIT_DIMS)}")


def apply_tp_plan(model: nn.Module, tp: int, tp_rank: int, plan: Mapping[str, str] = TP_PLAN
                  ) -> dict[str, str]:
    """Swap the planned modules of a meta-device model for TP layers in place. Returns {path: style}.

    Every pattern must match at least one module, so a renamed layer cannot silently stay replicated.
    """
    if any(not p.is_meta for p in model.parameters()):
        raise ValueError("apply_tp_plan expects a model built on the meta device (create_model(cfg, 'meta'))")
    applied: dict[str, str] = {}
    used: set[str] = set()
    for path, module in list(model.named_modules()):
        for pattern, style in plan.items():
            if fnmatch.fnmatchcase(path, pattern):
                used.add(pattern)
                applied[path] = style
                parent_path, _, child = path.rpartition(".")
                parent = model.get_submodule(parent_path) if parent_path else model
                if tp > 1:
                    setattr(parent, child, _swap(module, style, tp, tp_rank, path))
                break
    unused = [p for p in plan if p not in used and not _optional_pattern(p, model)]
    if unused:
        raise ValueError(f"TP plan patterns {unused} match no module of {type(model).__name__}")
    return applied


def _optional_pattern(pattern: str, model: nn.Module) -> bool:
    # The gated (wi_0/wi_1) and ReLU (wi) feed-forwards are alternatives; an untied model has lm_head.
    return pattern.endswith(("mlp.wi", "mlp.wi_0", "mlp.wi_1")) or pattern == "text.lm_head"


def shard_specs(model: nn.Module, applied: Mapping[str, str], full_shapes: Mapping[str, torch.Size],
                tp: int, tp_rank: int) -> dict[str, ShardSpec]:
    """ShardSpec of every state_dict entry of a (possibly pruned) TP model."""
    specs: dict[str, ShardSpec] = {}
    for name in model.state_dict():
        path, _, leaf = name.rpartition(".")
        style = applied.get(path)
        dim = _SPLIT_DIMS[style].get(leaf) if style is not None and tp > 1 else None
        specs[name] = ShardSpec(tuple(full_shapes[name]), dim, tp_rank if dim is not None else 0,
                                tp if dim is not None else 1)
    return specs


def slice_for(full: Mapping[str, torch.Tensor], specs: Mapping[str, ShardSpec]) -> dict[str, torch.Tensor]:
    """This rank's shard of every tensor in `specs`, taken from full tensors (the inverse of merge_shards)."""
    missing = [n for n in specs if n not in full]
    if missing:
        raise KeyError(f"full state lacks {len(missing)} tensors the shard needs, e.g. {missing[:5]}")
    out: dict[str, torch.Tensor] = {}
    for name, spec in specs.items():
        t = full[name]
        if tuple(t.shape) != tuple(spec.shape):
            raise ValueError(f"{name} is {tuple(t.shape)}; expected the full shape {spec.shape}")
        if spec.dim is not None:
            t = t.chunk(spec.tp_size, dim=spec.dim)[spec.tp_rank]
        out[name] = t.clone(memory_format=torch.contiguous_format)  # never a view of the caller's tensor
    return out


def merge_shards(shards: Iterable[tuple[Mapping[str, ShardSpec], Mapping[str, torch.Tensor]]]
                 ) -> dict[str, torch.Tensor]:
    """Full tensors from the (spec_dict, tensors_dict) pairs of any layout's ranks.

    Works for weights and for same-shaped state (gradients, Adam moments). Replicated tensors (TP copies,
    DP replicas, the embedding held by two pipeline stages) are taken once; a TP-split tensor needs every
    one of its tp_size chunks. Raises ValueError naming a tensor with missing chunks or a bad shape.
    """
    pieces: dict[str, dict[int, torch.Tensor]] = {}
    spec_of: dict[str, ShardSpec] = {}
    for specs, tensors in shards:
        for name, t in tensors.items():
            if name not in specs:
                raise KeyError(f"{name} has no ShardSpec; pass the spec dict of the rank that wrote it")
            spec = specs[name]
            known = spec_of.setdefault(name, spec)
            if (known.shape, known.dim, known.tp_size) != (spec.shape, spec.dim, spec.tp_size):
                raise ValueError(f"{name}: shards disagree on the layout ({known} vs {spec})")
            pieces.setdefault(name, {}).setdefault(spec.tp_rank, t)
    out: dict[str, torch.Tensor] = {}
    for name, parts in pieces.items():
        spec = spec_of[name]
        if spec.dim is None:
            full = parts[0]
        else:
            absent = sorted(set(range(spec.tp_size)) - set(parts))
            if absent:
                raise ValueError(f"{name}: TP chunks {absent} of {spec.tp_size} are missing")
            full = torch.cat([parts[r] for r in range(spec.tp_size)], dim=spec.dim)
        if tuple(full.shape) != tuple(spec.shape):
            raise ValueError(f"{name}: merged shape {tuple(full.shape)} differs from the full shape {spec.shape}")
        out[name] = full
    return out
