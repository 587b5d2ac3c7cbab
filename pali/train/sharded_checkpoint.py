"""Sharded training checkpoints: one file pair per rank, resumable under any layout.

A checkpoint directory holds, for every rank r of the world that wrote it,
  rank-r.safetensors   model shard ("model/<name>"), optimizer state ("optim/<name>/<key>"), RNG
  rank-r.json          layout, shard specs, optimizer scalars
and, from rank 0, `meta.json` (step, data position, scheduler, configs) and `tokenizer.model`.
Ray Train uploads each rank's files into one directory and registers it only after every rank has
reported, so a half-written checkpoint never becomes the latest; `is_complete` checks the same on disk.
Loading merges the shards to full tensors and slices them for the reader's own layout: all at once
(`load_full`), or one tensor at a time on access (`LazyShardedState`, `load_optim_for`) so a resuming rank
never holds the whole model.
"""

from __future__ import annotations

import json
import os
from collections.abc import Collection, Iterable
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from pali.storage import ReadOnAccess

META = "meta.json"


def _spec_to_json(spec) -> dict:
    return spec.to_dict() if hasattr(spec, "to_dict") else dict(spec)


def save_shard(out_dir: str | os.PathLike, rank: int, layout: dict, specs: dict, model_state: dict,
               optimizer: torch.optim.Optimizer | None, named_params: list[tuple[str, torch.Tensor]],
               meta: dict | None = None, tokenizer=None) -> None:
    """Write this rank's part of a checkpoint into `out_dir` (a local staging dir Ray then uploads)."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    tensors: dict[str, torch.Tensor] = {f"model/{k}": v.detach().cpu().contiguous() for k, v in model_state.items()}
    scalars: dict[str, dict[str, Any]] = {}
    if optimizer is not None:
        by_id = {id(p): n for n, p in named_params}
        for p, st in optimizer.state.items():
            name = by_id.get(id(p))
            if name is None:
                continue
            for key, val in st.items():
                # FSDP2 shards state over DP: gather it (a collective; every rank iterates in the same order).
                if hasattr(val, "full_tensor"):
                    val = val.full_tensor()
                if torch.is_tensor(val) and val.dim() > 0:
                    tensors[f"optim/{name}/{key}"] = val.detach().cpu().contiguous()
                else:
                    scalars.setdefault(name, {})[key] = float(val)
    tensors["rng/torch"] = torch.get_rng_state()
    save_file(tensors, str(out / f"rank-{rank:05d}.safetensors"))
    info = {"rank": rank, "layout": layout, "specs": {k: _spec_to_json(s) for k, s in specs.items()},
            "optim_scalars": scalars}
    (out / f"rank-{rank:05d}.json").write_text(json.dumps(info))
    if meta is not None:
        if tokenizer is not None:
            tokenizer.save(out / "tokenizer.model")
        (out / META).write_text(json.dumps(meta, indent=2))


def read_meta(ckpt_dir: str | os.PathLike) -> dict:
    """The rank-0 metadata of a checkpoint."""
    return json.loads((Path(ckpt_dir) / META).read_text())


def _safetensors_problem(path: Path) -> str | None:
    """Why a safetensors file is not whole (missing, or shorter/longer than its header says), or None."""
    try:
        size = path.stat().st_size
        with open(path, "rb") as f:
            n = int.from_bytes(f.read(8), "little")
            if n <= 0 or 8 + n > size:
                return f"{path.name} is truncated ({size} bytes, header of {n})"
            header = json.loads(f.read(n))
    except FileNotFoundError:
        return f"{path.name} is missing"
    except (OSError, ValueError) as e:
        return f"{path.name} is unreadable ({type(e).__name__}: {e})"
    end = max((v["data_offsets"][1] for k, v in header.items() if k != "__metadata__"), default=0)
    if size != 8 + n + end:
        return f"{path.name} is truncated ({size} bytes; its header describes {8 + n + end})"
    return None


def incomplete_reason(ckpt_dir: str | os.PathLike) -> str | None:
    """Why a checkpoint cannot be resumed from (a missing meta.json, a missing rank file, a truncated
    tensor file, unparsable JSON), or None when it is complete."""
    d = Path(ckpt_dir)
    if not (d / META).is_file():
        return f"{META} is missing"
    try:
        world = int(read_meta(d)["world_size"])
    except (ValueError, KeyError, json.JSONDecodeError) as e:
        return f"{META} is unreadable ({type(e).__name__})"
    for r in range(world):
        side = d / f"rank-{r:05d}.json"
        try:
            json.loads(side.read_text())
        except FileNotFoundError:
            return f"{side.name} is missing"
        except (OSError, ValueError):
            return f"{side.name} is truncated or unreadable"
        problem = _safetensors_problem(d / f"rank-{r:05d}.safetensors")
        if problem:
            return problem
    return None


def is_complete(ckpt_dir: str | os.PathLike) -> bool:
    """True when meta.json and every rank's files of the writing world are present and whole."""
    return incomplete_reason(ckpt_dir) is None


def latest_complete(run_dir: str | os.PathLike) -> Path | None:
    """The complete checkpoint with the highest step under a Ray Train run directory, or None."""
    root = Path(run_dir)
    if not root.is_dir():
        return None
    best, best_step = None, -1
    for meta in root.glob("**/" + META):
        d = meta.parent
        if is_complete(d):
            step = int(read_meta(d).get("step", -1))
            if step > best_step:
                best, best_step = d, step
    return best


def load_full(ckpt_dir: str | os.PathLike, with_optimizer: bool = True) -> dict[str, Any]:
    """Merge every rank's shards of a checkpoint into full tensors.

    Returns {"meta", "model": {name: full}, "optim": {name: {key: full}}, "optim_scalars", "layout",
    "rng": {rank: state}}. Optimizer tensors whose shape is not the parameter's (e.g. Adafactor's factored
    moments) are kept only when the reader's layout is the writer's (see `optim_same_layout`).
    """
    from pali.parallel import merge_shards
    from pali.parallel.tp_plan import ShardSpec

    d = Path(ckpt_dir)
    if not is_complete(d):
        raise FileNotFoundError(f"checkpoint {d} is incomplete (missing {META} or a rank's shard files)")
    meta = read_meta(d)
    world = int(meta["world_size"])
    model_parts, optim_parts = [], {}
    scalars: dict[str, dict] = {}
    rng = {}
    layout = None
    raw_optim: dict[int, dict[str, torch.Tensor]] = {}
    for r in range(world):
        info = json.loads((d / f"rank-{r:05d}.json").read_text())
        layout = layout or info["layout"]
        tensors = load_file(str(d / f"rank-{r:05d}.safetensors"))
        specs = {k: ShardSpec.from_dict(v) for k, v in info["specs"].items()}
        model = {k[6:]: v for k, v in tensors.items() if k.startswith("model/")}
        model_parts.append((specs, model))
        rng[r] = tensors.get("rng/torch")
        for name, sc in info.get("optim_scalars", {}).items():
            scalars.setdefault(name, sc)
        if with_optimizer:
            raw_optim[r] = {k[6:]: v for k, v in tensors.items() if k.startswith("optim/")}
            per_key: dict[str, dict[str, torch.Tensor]] = {}
            for key, val in raw_optim[r].items():
                name, _, skey = key.rpartition("/")
                if name in specs and tuple(val.shape) == tuple(model[name].shape):
                    per_key.setdefault(skey, {})[name] = val
            for skey, group in per_key.items():
                optim_parts.setdefault(skey, []).append(({n: specs[n] for n in group}, group))
    full_model = merge_shards(model_parts)
    full_optim: dict[str, dict[str, torch.Tensor]] = {}
    for skey, parts in optim_parts.items():
        for name, t in merge_shards(parts).items():
            full_optim.setdefault(name, {})[skey] = t
    return {"meta": meta, "model": full_model, "optim": full_optim, "optim_scalars": scalars,
            "layout": layout, "rng": rng, "raw_optim": raw_optim}


def restore_optimizer(optimizer: torch.optim.Optimizer, named_params: list[tuple[str, torch.Tensor]],
                      full_optim: dict[str, dict[str, torch.Tensor]], scalars: dict[str, dict],
                      specs: dict, slice_for) -> int:
    """Load merged optimizer state into `optimizer`, sliced for this rank's shards. Returns tensors restored."""
    n = 0
    for name, p in named_params:
        if name not in full_optim and name not in scalars:
            continue
        state: dict[str, Any] = {}
        for key, full in full_optim.get(name, {}).items():
            local = slice_for({name: full}, {name: specs[name]})[name].to(p.dtype)
            if hasattr(p, "device_mesh"):  # FSDP2 parameter: shard the state the same way over DP
                from torch.distributed.tensor import distribute_tensor

                state[key] = distribute_tensor(local.to(p.device_mesh.device_type), p.device_mesh, p.placements)
            else:
                state[key] = local.to(p.device).clone()
            n += 1
        for key, val in scalars.get(name, {}).items():
            state[key] = torch.tensor(val, dtype=torch.float32)
        if state:
            optimizer.state[p] = state
    return n


def restore_layout_bound(optimizer: torch.optim.Optimizer, named_params: list[tuple[str, torch.Tensor]],
                         state: LazyShardedState, rank: int) -> int:
    """Add the layout-bound optimizer state of writer rank `rank` (see `LazyShardedState.layout_bound_optim`)
    to `optimizer`, and that rank's own scalars (Adafactor's per-shard RMS), over the first rank's that
    `restore_optimizer` used; call after it, only when the layout is the writer's. Returns tensors restored.
    FSDP2 (DTensor) parameters are skipped: their state is sharded over DP, not per rank."""
    plain = [(n, p) for n, p in named_params if not hasattr(p, "device_mesh")]
    extra = state.layout_bound_optim(rank, [n for n, _ in plain])
    own = state._rank_scalars.get(rank, {})
    n = 0
    for name, p in plain:
        for key, val in own.get(name, {}).items():
            optimizer.state.setdefault(p, {})[key] = torch.tensor(val, dtype=torch.float32)
        for key, t in extra.get(name, {}).items():
            optimizer.state.setdefault(p, {})[key] = t.to(p.device)
            n += 1
    return n


def _rank_file(d: Path, r: int) -> Path:
    return d / f"rank-{r:05d}.safetensors"


def _local_shape(spec) -> tuple[int, ...]:
    shape = list(spec.shape)
    if spec.dim is not None:
        shape[spec.dim] //= spec.tp_size
    return tuple(shape)


class LazyShardedState(ReadOnAccess):
    """A checkpoint's model as a read-on-access mapping: name -> full tensor (TP chunks merged).

    Opening reads only the JSON files and the safetensors headers; `state[name]` reads just that tensor's
    chunks (one per TP rank, replicas skipped) with `safe_open(...).get_tensor`, so `build_engine(cfg,
    grid, LazyShardedState(d))` holds at most one full tensor at a time. Also exposes the checkpoint's
    `meta`, writer `layout`, `optim_scalars`, `rng_state(rank)` and `optim_for(names)`.
    """

    def __init__(self, ckpt_dir: str | os.PathLike):
        from pali.parallel.tp_plan import ShardSpec

        d = Path(ckpt_dir)
        if not is_complete(d):
            raise FileNotFoundError(f"checkpoint {d} is incomplete (missing {META} or a rank's shard files)")
        self.dir = d
        self.meta: dict = read_meta(d)
        """The rank-0 metadata (step, data position, configs)."""
        self.world = int(self.meta["world_size"])
        self.layout: dict | None = None
        """The writer's layout ({"dp", "pp", "tp", ...})."""
        self.optim_scalars: dict[str, dict] = {}
        """name -> {key: float}: scalar optimizer state (e.g. Adam's step)."""
        # name -> {tp_rank: (writer rank, spec)}: the first rank holding each chunk (replicas skipped).
        self._model: dict[str, dict[int, tuple[int, Any]]] = {}
        # name -> key -> {tp_rank: (writer rank, spec)} for optimizer tensors shaped like the shard.
        self._optim: dict[str, dict[str, dict[int, tuple[int, Any]]]] = {}
        # writer rank -> name -> [key] for optimizer tensors not shaped like the shard (Adafactor's factored
        # second moments): they cannot be merged or resliced, only handed back to the same rank of the
        # same layout.
        self._layout_bound: dict[int, dict[str, list[str]]] = {}
        self._rank_scalars: dict[int, dict[str, dict]] = {}  # writer rank -> its own scalar state
        for r in range(self.world):
            info = json.loads((d / f"rank-{r:05d}.json").read_text())
            self.layout = self.layout or info["layout"]
            specs = {k: ShardSpec.from_dict(v) for k, v in info["specs"].items()}
            for name, sc in info.get("optim_scalars", {}).items():
                self.optim_scalars.setdefault(name, sc)
            self._rank_scalars[r] = info.get("optim_scalars", {})
            with safe_open(str(_rank_file(d, r)), framework="pt") as f:
                for key in f.keys():
                    if key.startswith("model/"):
                        name = key[6:]
                        self._model.setdefault(name, {}).setdefault(specs[name].tp_rank, (r, specs[name]))
                    elif key.startswith("optim/"):
                        name, _, skey = key[6:].rpartition("/")
                        if name in specs and tuple(f.get_slice(key).get_shape()) == _local_shape(specs[name]):
                            spec = specs[name]
                            self._optim.setdefault(name, {}).setdefault(skey, {}).setdefault(spec.tp_rank,
                                                                                              (r, spec))
                        elif name in specs:
                            self._layout_bound.setdefault(r, {}).setdefault(name, []).append(skey)

    def _read(self, key: str, name: str, chunks: dict[int, tuple[int, Any]]) -> torch.Tensor:
        from pali.parallel import merge_shards

        parts = []
        for _, (r, spec) in sorted(chunks.items()):
            with safe_open(str(_rank_file(self.dir, r)), framework="pt") as f:
                parts.append(({name: spec}, {name: f.get_tensor(key)}))
        return merge_shards(parts)[name]

    @property
    def names(self) -> Collection[str]:
        return self._model

    def __getitem__(self, name: str) -> torch.Tensor:
        """The full tensor `name` (as in `PaLI.state_dict()`), read from disk now."""
        if name not in self._model:
            raise KeyError(f"{name!r} is not in checkpoint {self.dir} (it holds {len(self._model)} tensors)")
        return self._read(f"model/{name}", name, self._model[name])

    def optim_for(self, names: Iterable[str]) -> dict[str, dict[str, torch.Tensor]]:
        """{name: {key: full tensor}} of the optimizer state of just `names` (others are not read)."""
        out: dict[str, dict[str, torch.Tensor]] = {}
        for name in names:
            for skey, chunks in self._optim.get(name, {}).items():
                out.setdefault(name, {})[skey] = self._read(f"optim/{name}/{skey}", name, chunks)
        return out

    def layout_bound_optim(self, rank: int, names: Iterable[str]) -> dict[str, dict[str, torch.Tensor]]:
        """{name: {key: tensor}} of the optimizer state writer rank `rank` holds that is not shaped like its
        shard (e.g. Adafactor's `exp_avg_sq_row` / `exp_avg_sq_col`). Valid only for the same rank of the
        same layout; empty for ranks the checkpoint does not have."""
        held = self._layout_bound.get(rank, {})
        wanted = [n for n in names if n in held]
        if not wanted:
            return {}
        with safe_open(str(_rank_file(self.dir, rank)), framework="pt") as f:
            return {n: {k: f.get_tensor(f"optim/{n}/{k}") for k in held[n]} for n in wanted}

    def rng_state(self, rank: int) -> torch.Tensor | None:
        """The torch RNG state rank `rank` saved, or None (no such rank or none saved)."""
        if not 0 <= rank < self.world:
            return None
        with safe_open(str(_rank_file(self.dir, rank)), framework="pt") as f:
            return f.get_tensor("rng/torch") if "rng/torch" in f.keys() else None


def load_optim_for(ckpt_dir: str | os.PathLike, names: Iterable[str]) -> dict[str, dict[str, torch.Tensor]]:
    """Merged optimizer state {name: {key: full}} of only `names`, read tensor by tensor.

    The same tensors `load_full(ckpt_dir)["optim"]` holds for those names (shard-shaped state only).
    """
    return LazyShardedState(ckpt_dir).optim_for(names)
