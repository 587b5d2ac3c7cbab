"""Shard-by-shard materialisation: per-parameter init, a build that never holds the whole model, lazy resume.

One spawn of a 2-rank TP=2 gloo world builds an engine under an allocation meter (a TorchDispatchMode that
tracks every CPU storage created and when it is freed), checks its shards against slicing `create_model`,
takes an AdamW step, writes a sharded training checkpoint and rebuilds from it through `LazyShardedState`,
then does the same with Adafactor (whose factored moments come back per rank under the same layout).
This process then compares the lazy reader with `load_full` and counts the tensors it reads.
"""

from __future__ import annotations

import json
import shutil
import weakref
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
from safetensors.torch import save_file
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

from pali.config import get_preset
from pali.factory import create_model, init_tensor, param_seed
from pali.parallel import Grid, build_engine, slice_for
from pali.train import sharded_checkpoint as ck
from tests.parallel.harness import global_batch, spawn

SEED = 7


class AllocMeter(TorchDispatchMode):
    """Bytes of CPU storages created while active: the largest one and the peak of those alive at once."""

    def __init__(self):
        super().__init__()
        self.live: dict[int, int] = {}  # data_ptr -> nbytes of storages made under the meter, still alive
        self.cur = self.peak = self.largest = 0

    def _freed(self, ptr: int) -> None:
        self.cur -= self.live.pop(ptr, 0)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in tree_leaves(out):
            if not isinstance(t, torch.Tensor) or t.device.type != "cpu":
                continue
            st = t.untyped_storage()
            ptr, n = st.data_ptr(), st.nbytes()
            if n == 0 or ptr in self.live:
                continue
            if any(isinstance(a, torch.Tensor) and a.device.type == "cpu" and a.untyped_storage().data_ptr() == ptr
                   for a in tree_leaves((args, kwargs))):
                continue  # an in-place op or a view of an input made before the meter
            self.live[ptr] = n
            self.cur += n
            self.peak, self.largest = max(self.peak, self.cur), max(self.largest, n)
            weakref.finalize(st, self._freed, ptr)  # storages keep their Python object while alive
        return out


def _bytes(tensors) -> int:
    return sum(t.numel() * t.element_size() for t in tensors)


def _save(path: Path, rank: int, world: int, step: int, engine, opt, named) -> Path:
    """This rank's part of a TP=2 training checkpoint at `path` (rank 0 adds the metadata); all ranks wait."""
    ck.save_shard(path, rank, {"dp": 1, "pp": 1, "tp": 2}, engine.shard_spec(), engine.local_state_dict(), opt,
                  named, meta={"world_size": world, "step": step} if rank == 0 else None)
    dist.barrier()
    return path


def _resume(path: Path, cfg, grid, seed: int, make_opt):
    """(lazy reader, engine, named parameters, optimizer) rebuilt from checkpoint `path` through
    `LazyShardedState`, the optimizer's state restored one parameter at a time."""
    lazy = ck.LazyShardedState(path)
    engine = build_engine(cfg, grid, lazy, seed=seed)
    named = list(engine.named_parameters())
    opt = make_opt(named)
    specs = engine.shard_spec()
    for name, p in named:
        ck.restore_optimizer(opt, [(name, p)], lazy.optim_for([name]), lazy.optim_scalars, specs, slice_for)
    return lazy, engine, named, opt


def _worker(rank: int, world: int, out_dir: str) -> None:
    cfg = get_preset("tiny")
    grid = Grid.init(tp=2)
    with AllocMeter() as meter:
        engine = build_engine(cfg, grid, seed=SEED)
    with AllocMeter() as whole:  # the old path: the whole model at once (proves the meter sees it)
        ref = create_model(cfg, seed=SEED).state_dict()
    specs = engine.shard_spec()
    local = engine.local_state_dict()
    want = slice_for(ref, specs)
    bad = [n for n in specs if not torch.equal(local[n], want[n])]
    assert not bad, f"rank {rank}: shards differ from slicing create_model(seed={SEED}): {bad[:5]}"
    stats = {"peak": meter.peak, "largest": meter.largest, "whole_peak": whole.peak,
             "local": _bytes(local.values()), "total": _bytes(ref.values()),
             "largest_full": max(t.numel() * t.element_size() for t in ref.values())}
    del ref, want

    # One AdamW step so the checkpoint has optimizer state, then a sharded checkpoint from both ranks.
    named = list(engine.named_parameters())
    opt = torch.optim.AdamW([p for _, p in named], lr=1e-3)
    engine.train().train_step(global_batch(cfg))
    opt.step()
    ckpt = _save(Path(out_dir) / "ckpt", rank, world, 1, engine, opt, named)

    # Resume through the lazy reader: same shards, optimizer restored one parameter at a time.
    _, again, named2, opt2 = _resume(ckpt, cfg, grid, SEED + 1,
                                     lambda named: torch.optim.AdamW([p for _, p in named], lr=1e-3))
    now, before = again.local_state_dict(), engine.local_state_dict()
    assert all(torch.equal(now[n], before[n]) for n in specs), "resumed shards differ from the saved ones"
    for (name, p), (_, q) in zip(named, named2, strict=True):
        for key in ("exp_avg", "exp_avg_sq", "step"):
            assert torch.equal(opt.state[p][key].float(), opt2.state[q][key].float()), f"{name}/{key}"

    # Adafactor: its factored second moments (row / column vectors of each TP shard) cannot be resliced, so a
    # resume under the same layout hands each rank its own; the next step must then equal an uninterrupted run.
    from pali.train.config import TrainConfig
    from pali.train.optim import build_optimizer

    tcfg = TrainConfig(optimizer="adafactor", lr=1e-2)
    opt3 = build_optimizer(named2, tcfg)
    for _ in range(2):
        again.train_step(global_batch(cfg))
        opt3.step()
        again.zero_grad()
    ckpt2 = _save(Path(out_dir) / "ckpt-adafactor", rank, world, 2, again, opt3, named2)
    lazy2, third, named3, opt4 = _resume(ckpt2, cfg, grid, SEED + 2, lambda named: build_optimizer(named, tcfg))
    assert ck.restore_layout_bound(opt4, named3, lazy2, rank) > 0
    for (name, p), (_, q) in zip(named2, named3, strict=True):
        assert set(opt3.state[p]) == set(opt4.state[q]), name
        for key, v in opt3.state[p].items():
            assert torch.equal(torch.as_tensor(v).float(), torch.as_tensor(opt4.state[q][key]).float()), f"{name}/{key}"
    for eng, o in ((again, opt3), (third, opt4)):
        eng.train_step(global_batch(cfg))
        o.step()
        eng.zero_grad()
    a, b = again.local_state_dict(), third.local_state_dict()
    assert all(torch.equal(a[n], b[n]) for n in specs), "resumed Adafactor step differs from the uninterrupted one"
    (Path(out_dir) / f"stats{rank}.json").write_text(json.dumps(stats))
    grid.destroy()


@pytest.fixture(scope="module")
def spawned(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("materialise")
    spawn(_worker, 2, str(out))
    return out


def test_create_model_is_per_parameter_init(tiny_config):
    model = create_model(tiny_config, seed=SEED)
    for name, p in model.state_dict().items():
        assert torch.equal(p, init_tensor(tiny_config, name, p.shape, SEED)), name
    half = create_model(tiny_config, seed=SEED, dtype=torch.bfloat16).state_dict()["text.shared.weight"]
    assert torch.equal(half, init_tensor(tiny_config, "text.shared.weight", half.shape, SEED, torch.bfloat16))
    other = init_tensor(tiny_config, "text.shared.weight", half.shape, SEED + 1)
    assert not torch.equal(other, model.state_dict()["text.shared.weight"])
    assert param_seed(0, "a") != param_seed(1, "a") and param_seed(0, "a") != param_seed(0, "b")
    # The distributions are the documented ones (T5 fan-in normal, unit embedding, small projector, ViT 0.02).
    t = tiny_config.text
    wi = init_tensor(tiny_config, "text.encoder.blocks.0.mlp.wi_0.weight", (t.d_ff, t.d_model), SEED)
    assert wi.std().item() == pytest.approx(t.d_model ** -0.5, rel=0.05)
    assert model.text.shared.weight.std().item() == pytest.approx(1.0, rel=0.05)
    assert model.projector.weight.std().item() == pytest.approx(tiny_config.vision.width ** -0.5, rel=0.05)
    fc = model.vision_tower.blocks[0].mlp.fc1.weight
    assert fc.std().item() == pytest.approx(0.02, rel=0.1)  # trunc_normal_ at its default +-2 bounds
    with pytest.raises(ValueError, match="no initialisation rule for parameter 'vision_tower.odd'"):
        init_tensor(tiny_config, "vision_tower.odd", (3,), SEED)


@pytest.mark.slow
def test_build_never_holds_the_whole_model(spawned):
    for rank in range(2):
        s = json.loads((spawned / f"stats{rank}.json").read_text())
        assert s["whole_peak"] >= s["total"], f"the meter missed create_model's whole model: {s}"
        assert s["largest"] <= s["largest_full"], s
        # Alive at once: this rank's shards plus one full tensor being sliced (and its shard copy).
        assert s["peak"] <= s["local"] + 1.1 * s["largest_full"], s
        assert s["peak"] < 0.8 * s["total"], s


class _CountingOpen:
    """Wraps safetensors.safe_open and records every get_tensor key."""

    reads: list[str] = []

    def __init__(self, real):
        self.real = real

    def __call__(self, *args, **kwargs):
        meter, handle = self, self.real(*args, **kwargs)

        class _Handle:
            def __enter__(self):
                self.f = handle.__enter__()
                return self

            def __exit__(self, *exc):
                return handle.__exit__(*exc)

            def get_tensor(self, key):
                meter.reads.append(key)
                return self.f.get_tensor(key)

            def __getattr__(self, attr):
                return getattr(self.f, attr)

        return _Handle()


@pytest.mark.slow
def test_lazy_state_matches_load_full_and_reads_only_what_is_asked(spawned, monkeypatch, tmp_path):
    ckpt = spawned / "ckpt"
    full = ck.load_full(ckpt)
    counter = _CountingOpen(ck.safe_open)
    counter.reads = []
    monkeypatch.setattr(ck, "safe_open", counter)
    lazy = ck.LazyShardedState(ckpt)
    assert counter.reads == [], "opening must read headers only"
    assert set(lazy) == set(full["model"]) and len(lazy) == len(full["model"]) and "nope" not in lazy
    assert lazy.meta["step"] == 1 and lazy.layout == full["layout"] and lazy.optim_scalars == full["optim_scalars"]
    emb = lazy["text.shared.weight"]  # vocab-split over TP: one chunk from each rank
    assert counter.reads == ["model/text.shared.weight"] * 2 and torch.equal(emb, full["model"]["text.shared.weight"])
    counter.reads = []
    norm = lazy["text.encoder.final_norm.weight"]  # replicated: read once
    assert counter.reads == ["model/text.encoder.final_norm.weight"]
    assert torch.equal(norm, full["model"]["text.encoder.final_norm.weight"])
    for name, t in full["model"].items():
        assert torch.equal(lazy[name], t), name
    counter.reads = []
    names = ["text.lm_head.weight", "projector.bias"]
    optim = lazy.optim_for(names)
    assert sorted(set(counter.reads)) == sorted(f"optim/{n}/{k}" for n in names for k in ("exp_avg", "exp_avg_sq"))
    assert set(optim) == set(names)
    for name in names:
        assert set(optim[name]) == set(full["optim"][name])
        assert all(torch.equal(optim[name][k], full["optim"][name][k]) for k in optim[name])
    assert set(ck.load_optim_for(ckpt, full["optim"])) == set(full["optim"])
    assert torch.equal(lazy.rng_state(1), full["rng"][1]) and lazy.rng_state(5) is None
    with pytest.raises(KeyError, match="'text.nope' is not in checkpoint"):
        lazy["text.nope"]
    save_file(full["model"], str(tmp_path / "init.safetensors"))
    # An init state (one safetensors file, local or on object storage): the header up front, then one
    # ranged read per tensor asked for.
    from pali.storage import TensorFile

    one = TensorFile(tmp_path / "init.safetensors")
    opened = []

    class Counting:
        def __init__(self, fs):
            self.fs = fs

        def open_input_file(self, path):
            opened.append(path)
            return self.fs.open_input_file(path)

    one._fs = Counting(one._fs)
    assert set(one) == set(full["model"]) and "nope" not in one and opened == []
    assert torch.equal(one["projector.weight"], full["model"]["projector.weight"]) and len(opened) == 1
    cut = tmp_path / "cut.safetensors"
    cut.write_bytes((tmp_path / "init.safetensors").read_bytes()[:-4])
    with pytest.raises(ValueError, match="truncated"):
        TensorFile(cut)
    broken = shutil.copytree(ckpt, tmp_path / "broken")
    (broken / "rank-00001.json").unlink()
    with pytest.raises(FileNotFoundError, match="incomplete"):
        ck.LazyShardedState(broken)
