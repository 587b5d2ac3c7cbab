"""The per-worker training loop that Ray Train runs on every rank of the DP x PP x TP grid.

Only the first rank of each model replica (tp_rank == pp_rank == 0) reads data: its own Ray Data stream
over the shards dealt to its replica (`pali.train.data_order`); it broadcasts each batch to the other ranks
of its replica, so TP/PP ranks see the same examples.
"""

from __future__ import annotations

import contextlib
import tempfile
import time
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist

from pali.config import PaLIConfig
from pali.models import naflex
from pali.train.config import TrainConfig

BATCH_KEYS = ("pixel_values", "input_ids", "attention_mask", "labels", "image_mask", "task_id")


def batch_shapes(mcfg: PaLIConfig, n: int) -> dict[str, tuple[tuple[int, ...], torch.dtype]]:
    """Shapes and dtypes of one rank's batch of n examples (what non-reading ranks allocate)."""
    v, s = mcfg.vision, mcfg.vision.image_size
    pixels = naflex.packed_shape(v.channels, v.patch_size, v.max_num_patches) if v.naflex else (v.channels, s, s)
    return {"pixel_values": ((n, *pixels), torch.float32),
            "input_ids": ((n, mcfg.max_text_len), torch.long),
            "attention_mask": ((n, mcfg.max_text_len), torch.long),
            "labels": ((n, mcfg.max_target_len), torch.long),
            "image_mask": ((n,), torch.long),
            "task_id": ((n,), torch.long)}


def to_tensors(batch: dict[str, np.ndarray], tasks: tuple[str, ...]) -> dict[str, torch.Tensor]:
    """A numpy batch from Ray Data as torch tensors (task names -> ids)."""
    out = {k: torch.from_numpy(np.array(batch[k])) for k in BATCH_KEYS[:4]}
    out["pixel_values"] = out["pixel_values"].float()
    for k in ("input_ids", "attention_mask", "labels"):
        out[k] = out[k].long()
    n = out["input_ids"].shape[0]
    out["image_mask"] = torch.from_numpy(np.array(batch["image_mask"])).long().view(n) if "image_mask" in batch \
        else torch.ones(n, dtype=torch.long)
    index = {t: i for i, t in enumerate(tasks)}
    out["task_id"] = torch.tensor([index.get(str(t), len(tasks)) for t in batch.get("task", [""] * n)])
    out["shard_index"] = torch.from_numpy(np.array(batch["shard_index"])).long() if "shard_index" in batch \
        else torch.zeros(n, dtype=torch.long)
    return out


def shard_reader(dcfg, tokenizer, per_rank: int, tasks: tuple[str, ...]):
    """`read(paths)` for `ReplicaStream`: the Ray Data pipeline over `paths`, in order, as tensor batches."""
    import ray.data

    from pali.data.pipeline import build_dataset

    ctx = ray.data.DataContext.get_current()
    ctx.execution_options.preserve_order = True  # the examples' order is part of the resume contract
    ctx.enable_progress_bars = False  # the trainer's own bar is the progress display

    def read(paths: list[str]):
        ds = build_dataset(dcfg, tokenizer, paths)
        for b in ds.iter_batches(batch_size=per_rank, batch_format="numpy", prefetch_batches=2):
            t = to_tensors(b, tasks)
            yield {k: t[k] for k in (*BATCH_KEYS, "shard_index")}

    return read


class ReplicaFeeder:
    """Yields this replica's batches: the reading rank takes them from its stream, the others receive them."""

    def __init__(self, stream, mcfg: PaLIConfig, per_rank: int, group, src: int):
        self.stream, self.mcfg, self.n, self.group, self.src = stream, mcfg, per_rank, group, src

    def next(self) -> dict[str, torch.Tensor]:
        """The next batch of `per_rank` examples (identical on every rank of the replica)."""
        if self.stream is not None:
            b = self.stream.next()
        else:
            b = {k: torch.empty(shape, dtype=dt) for k, (shape, dt) in batch_shapes(self.mcfg, self.n).items()}
        if self.group is not None:
            for k in BATCH_KEYS:
                dist.broadcast(b[k], src=self.src, group=self.group)
        return b


def resume_checkpoint(ckpt, run_dir: str | None, stack: contextlib.ExitStack,
                      events: Path | None = None) -> str | None:
    """The directory to resume from: Ray's latest checkpoint if it is complete, else the newest complete
    one under `run_dir`; None when there is no checkpoint.

    Ray's checkpoint is opened once, in `stack` (on remote storage that is a download), and stays open
    while the tensors are read. A checkpoint with a missing or truncated file is never resumed from; the
    worker's log (and `events`, the run's `events.log`) says which and why.
    """
    from pali.train import sharded_checkpoint as ck

    if ckpt is None:
        return None
    d = stack.enter_context(ckpt.as_directory())
    problem = ck.incomplete_reason(d)
    if problem is None:
        return d
    fallback = ck.latest_complete(run_dir) if run_dir and "://" not in run_dir else None
    line = (f"[pali] not resuming from checkpoint {d}: {problem}; "
            + (f"using {fallback} instead" if fallback else "no complete checkpoint to use instead"))
    log_event(events, line)
    if fallback is None:
        raise RuntimeError(f"the latest checkpoint is incomplete ({problem}) and no complete one exists under "
                           f"{run_dir}; delete the run directory to start over")
    return str(fallback)


def log_event(events: Path | None, line: str) -> None:
    """Print `line` to the worker's log and append it, timestamped, to the run's `events.log` (if given)."""
    print(line, flush=True)
    if events is not None:
        events.parent.mkdir(parents=True, exist_ok=True)
        with open(events, "a") as f:
            f.write(f"{time.strftime('%Y-%m-%dT%H:%M:%S')} {line}\n")


def restore_training_state(loaded, engine, opt, sched, named, grid, rank: int, start_step: int,
                           optimizer: str) -> None:
    """Optimizer state (resliced for this rank's layout), the schedule's position and the RNG of a checkpoint."""
    from pali.parallel import slice_for
    from pali.train import sharded_checkpoint as ck

    same_layout = loaded.layout and all(loaded.layout.get(k) == v for k, v in
                                        {"dp": grid.dp, "pp": grid.pp, "tp": grid.tp}.items())
    specs = engine.shard_spec()
    for name, p in named:  # one parameter's full optimizer state at a time
        ck.restore_optimizer(opt, [(name, p)], loaded.optim_for([name]), loaded.optim_scalars, specs, slice_for)
    if same_layout:  # state that cannot be resliced (Adafactor's factored moments) comes back as saved
        ck.restore_layout_bound(opt, named, loaded, rank)
    elif optimizer == "adafactor":
        print("[pali] the layout changed: Adafactor's factored second moments restart (they cannot be "
              "resliced; AdamW state reshards exactly)")
    with warnings.catch_warnings():  # fast-forward the schedule; no optimizer step is missing
        warnings.simplefilter("ignore")
        for _ in range(start_step):
            sched.step()
    rng = loaded.rng_state(rank)
    if same_layout and rng is not None:
        torch.set_rng_state(rng)


def build_feeder(config: dict, cfg: TrainConfig, mcfg: PaLIConfig, grid, world: int, per_rank: int,
                 start_step: int, data_state):
    """(this replica's stream on its reading rank, else None; the feeder every rank of the replica uses)."""
    from pali.data.prompts import TASKS
    from pali.tokenizer import Tokenizer
    from pali.train.data_order import ReplicaStream, plan_chunk

    mp = cfg.tp * cfg.pp
    groups = _replica_groups(world, mp)
    stream = None
    if grid.tp_rank == 0 and grid.pp_rank == 0:
        tok = Tokenizer.from_proto(config["tokenizer_bytes"])
        shards = config["shards"]
        chunk = plan_chunk(max(cfg.steps - start_step, 1) * per_rank, config.get("rows"), len(shards))
        stream = ReplicaStream(data_state, grid.dp, grid.dp_rank, shards, cfg.seed, per_rank,
                               shard_reader(config["data_config"], tok, per_rank, TASKS), chunk=chunk)
    group = None if groups is None else groups[grid.dp_rank]
    return stream, ReplicaFeeder(stream, mcfg, per_rank, group, grid.dp_rank * mp)


def save_and_report(step: int, loss: float, state, engine, opt, named, grid, world: int, rank: int,
                    cfg: TrainConfig, mcfg: PaLIConfig, tokenizer_bytes: bytes, relay=None) -> None:
    """Write this rank's shard of a checkpoint (rank 0 adds meta.json with the data state) and report it
    (rank 0 first lets idle ranks, if any, report too: see `pali.train.subworld`)."""
    import ray.train
    from ray.train import Checkpoint

    from pali.tokenizer import Tokenizer
    from pali.train import sharded_checkpoint as ck

    meta = None
    if rank == 0:
        meta = {"step": step, "world_size": world, "data_position": state.cursor, "data_state": state.to_dict(),
                "layout": {"dp": grid.dp, "pp": grid.pp, "tp": grid.tp},
                "model": mcfg.to_dict(), "train": cfg.to_dict(), "time": time.time()}
    layout = {"dp": grid.dp, "pp": grid.pp, "tp": grid.tp, "dp_rank": grid.dp_rank, "pp_rank": grid.pp_rank,
              "tp_rank": grid.tp_rank}
    with tempfile.TemporaryDirectory(prefix="pali-ckpt-") as tmp:
        ck.save_shard(tmp, rank, layout, engine.shard_spec(), engine.local_state_dict(), opt, named, meta,
                      Tokenizer.from_proto(tokenizer_bytes) if rank == 0 else None)
        metrics = {"step": step, "loss": loss, "data_position": state.cursor}
        if relay is not None:
            relay.publish(metrics)
        ray.train.report(metrics, checkpoint=Checkpoint.from_directory(tmp))


def _replica_groups(world: int, mp: int):
    """One process group per model replica (ranks sharing a dp index); every rank creates all of them."""
    groups = [dist.new_group(list(range(d * mp, (d + 1) * mp))) for d in range(world // mp)] if mp > 1 else None
    return groups


@dataclass
class _Worker:
    """This rank's place in the run: configs, ranks, layout, device and batch split."""

    config: dict[str, Any]
    cfg: TrainConfig
    mcfg: PaLIConfig
    world: int
    rank: int
    grid: Any
    device: torch.device
    per_rank: int
    n_micro: int
    relay: Any = None
    """The link to idle ranks when the group is not a multiple of tp*pp (`pali.train.subworld`), else None."""

    @property
    def idle(self) -> bool:
        """True on a rank left over after the whole replicas (it trains nothing until the next resize)."""
        return self.rank >= self.world


@dataclass
class _Training:
    """What the steps update: the engine, its optimizer and schedule, and where the run resumes."""

    engine: Any
    opt: Any
    sched: Any
    named: list
    start_step: int
    data_state: Any


def setup_worker(config: dict[str, Any]) -> _Worker:
    """Configs, the DP x PP x TP grid over the Ray Train group, threads, device and the batch split."""
    import ray.train

    from pali.parallel import Grid

    cfg = TrainConfig.from_dict(config["train"])
    mcfg = PaLIConfig.from_dict(config["model"])
    from pali.train.resources import torch_backend
    from pali.train.subworld import active_world, split_world

    ctx = ray.train.get_context()
    group, rank = ctx.get_world_size(), ctx.get_world_rank()
    mp = cfg.tp * cfg.pp
    world = active_world(group, mp)
    relay = split_world(group, rank, mp, torch_backend(cfg.use_gpu), ray.util.get_node_ip_address())
    torch.set_num_threads(max(1, int(config.get("threads_per_worker", 1))))
    device = torch.device("cuda", torch.cuda.current_device()) if cfg.use_gpu else torch.device("cpu")
    if rank >= world:
        return _Worker(config, cfg, mcfg, world, rank, None, device, 0, 0, relay)
    grid = Grid.init(dp=world // mp, pp=cfg.pp, tp=cfg.tp)
    per_rank, n_micro = cfg.microbatches(grid.dp)
    torch.manual_seed(cfg.seed + rank)
    return _Worker(config, cfg, mcfg, world, rank, grid, device, per_rank, n_micro, relay)


def initial_state(w: _Worker, outputs) -> tuple[Any, Any, contextlib.ExitStack]:
    """(read-on-access weights to build the engine from, the checkpoint resumed from or None, the stack
    keeping its directory open): the latest complete checkpoint of this run, else the init checkpoint
    (`init_from`), else the vision stage's tower with a seeded init, else None (a seeded init).

    Tensors are read lazily, one at a time, and sliced for this rank: no process holds the whole model.
    """
    import ray.train

    from pali.train import sharded_checkpoint as ck

    stack = contextlib.ExitStack()
    chosen = resume_checkpoint(ray.train.get_checkpoint(), w.config.get("run_dir"), stack,
                               outputs.local / "events.log" if w.rank == 0 else None)
    if chosen is not None:
        loaded = ck.LazyShardedState(chosen)
        return loaded, loaded, stack
    if w.config.get("init_state_path"):
        from pali.train.consolidation import init_mapping

        return init_mapping(w.config["init_state_path"], w.mcfg), None, stack
    if w.config.get("vision_weights") is not None:  # the vision stage's tower, the seeded init elsewhere
        from safetensors.torch import load

        from pali.train.vision import SeededState

        return SeededState(w.mcfg, w.cfg.seed, load(ray.get(w.config["vision_weights"]))), None, stack
    return None, None, stack


def build_training(w: _Worker, outputs) -> _Training:
    """The engine over this rank's slices, its optimizer and schedule, restored from a checkpoint if any."""
    from pali.parallel import build_engine
    from pali.train.data_order import DataState
    from pali.train.optim import build_optimizer, build_scheduler

    cfg = w.cfg
    full_state, loaded, stack = initial_state(w, outputs)
    start_step, data_state = 0, DataState()
    if loaded is not None:
        start_step = int(loaded.meta["step"])
        data_state = DataState.from_dict(loaded.meta["data_state"]) if "data_state" in loaded.meta else \
            DataState(int(loaded.meta.get("data_position", 0)))  # a checkpoint of an older release
    engine = build_engine(w.mcfg, w.grid, full_state, seed=cfg.seed, dp_mode=cfg.dp_mode, schedule=cfg.pp_schedule,
                          num_microbatches=w.n_micro, device=w.device,
                          autocast_dtype=torch.bfloat16 if cfg.use_gpu else None,
                          activation_checkpointing=cfg.activation_checkpointing,
                          compile=True if cfg.compile else (False if cfg.no_compile else None),
                          trim_padding=cfg.trim_padding)
    named = list(engine.named_parameters())
    opt = build_optimizer(named, cfg)
    sched = build_scheduler(opt, cfg)
    if loaded is not None:
        restore_training_state(loaded, engine, opt, sched, named, w.grid, w.rank, start_step, cfg.optimizer)
    del loaded, full_state
    stack.close()
    return _Training(engine, opt, sched, named, start_step, data_state)


def train_loop_per_worker(config: dict[str, Any]) -> None:
    """Ray Train entry point (runs on every worker): set up, restore, then run the steps."""
    import ray.train

    from pali.train.outputs import RunOutputs

    w = setup_worker(config)
    if w.idle:  # left over after the whole replicas: mirror rank 0's reports (they are collective) until done
        w.relay.follow(ray.train.report)
        return
    outputs = RunOutputs(w.cfg.output_dir, w.rank)
    if w.rank == 0 and w.relay is not None:
        group, mp = ray.train.get_context().get_world_size(), w.cfg.tp * w.cfg.pp
        log_event(outputs.local / "events.log", f"[pali] {group} workers is not a multiple of tp*pp = {mp}: "
                  f"{w.grid.dp} replicas train on ranks 0-{w.world - 1}, ranks {w.world}-{group - 1} stay idle "
                  "until the group is resized")
    t = build_training(w, outputs)
    stream, feeder = build_feeder(config, w.cfg, w.mcfg, w.grid, w.world, w.per_rank, t.start_step, t.data_state)
    run_steps(w, t, stream, feeder, outputs)
    if w.relay is not None:
        w.relay.finish()
    outputs.close()
    w.grid.destroy()


def run_steps(w: _Worker, t: _Training, stream, feeder, outputs) -> None:
    """Steps `start_step .. steps-1`: train, log every `log_every`, checkpoint every `checkpoint_every`."""
    from pali.data.prompts import TASKS
    from pali.models.pali import flops_per_example, hardware_flops_per_example
    from pali.train.data_order import gather_reports
    from pali.train.hooks import StepInfo, load_step_hooks
    from pali.train.metrics import MetricsLogger, peak_flops

    cfg, rank, engine = w.cfg, w.rank, t.engine
    log = MetricsLogger(outputs.local, enabled=(rank == 0))
    tasks = list(TASKS)
    hooks = load_step_hooks()
    peak = peak_flops(cfg.use_gpu, w.world)
    bar = None
    if rank == 0:
        from tqdm import tqdm

        bar = tqdm(total=cfg.steps, initial=t.start_step, desc="pretrain", unit="step", mininterval=2.0)
    acc = _Accumulator(len(tasks))
    engine.train()
    for step in range(t.start_step, cfg.steps):
        for hook in hooks:
            hook(StepInfo(step, rank, w.world, outputs.local))
        t0 = time.perf_counter()
        batch = feeder.next()
        t_data = time.perf_counter() - t0
        inputs = {k: batch[k].to(w.device) for k in ("pixel_values", "input_ids", "attention_mask", "labels",
                                                     "image_mask")}
        res = engine.train_step(inputs)
        gnorm = engine.clip_grad_norm_(cfg.grad_clip) if cfg.grad_clip > 0 else 0.0
        t.opt.step()
        t.sched.step()
        engine.zero_grad()
        dt = time.perf_counter() - t0
        # Per-task sums from this replica's reading rank, summed over the world (others add zeros).
        acc.add(res, batch["task_id"], batch["input_ids"], batch["image_mask"], stream is not None, dt, t_data,
                float(gnorm))
        if bar is not None:
            bar.update(1)
            bar.set_postfix(loss=f"{res.loss:.3f}", refresh=False)
        last = step + 1 == cfg.steps
        if (step + 1) % cfg.log_every == 0 or last:
            rec = acc.reduce(tasks)
            # MFU (model FLOPs: a frozen tower forward only) and HFU (plus recomputation) at the batch's real
            # (unpadded) prompt and target lengths.
            lens = int(rec.pop("_prompt_len")), int(rec.pop("_target_len"))
            rec["mfu"] = flops_per_example(w.mcfg, *lens) * rec["examples_per_s"] / peak
            rec["hfu"] = hardware_flops_per_example(w.mcfg, *lens, engine.activation_checkpointing,
                                                    engine.chunked_loss) * rec["examples_per_s"] / peak
            rec["lr"] = t.sched.get_last_lr()[0]
            rec["dp"] = w.grid.dp
            rec["global_batch"] = w.per_rank * w.grid.dp
            log.log(step + 1, rec)
        if (step + 1) % cfg.checkpoint_every == 0 or last:
            # The checkpoint's data state; the stream then forgets what it records (bounded at any length).
            t.data_state = t.data_state.advance(gather_reports(stream, w.world, rank))
            if stream is not None:
                stream.compact()
            save_and_report(step + 1, float(res.loss), t.data_state, engine, t.opt, t.named, w.grid, w.world,
                            rank, cfg, w.mcfg, w.config["tokenizer_bytes"], w.relay)
            outputs.sync()
    if bar is not None:
        bar.close()
    log.close()


class _Accumulator:
    """Sums of loss / tokens / timings between two log records (all-reduced at log time)."""

    def __init__(self, num_tasks: int):
        self.k = num_tasks
        self.reset()

    def reset(self) -> None:
        self.task = torch.zeros(2 * (self.k + 1), dtype=torch.float64)  # loss sums, then token counts
        self.totals = torch.zeros(5, dtype=torch.float64)  # examples, images, prompt tokens, target tokens, 0
        self.steps = 0
        self.loss_sum = 0.0
        self.time = 0.0
        self.data_time = 0.0
        self.gnorm = 0.0

    def add(self, res, task_id, input_ids, image_mask, reader: bool, dt: float, t_data: float,
            gnorm: float) -> None:
        if reader:
            ls = res.example_loss_sum.detach().double().cpu()
            nt = res.example_tokens.detach().double().cpu()
            tid = task_id.clamp(max=self.k)
            self.task.index_add_(0, tid, ls)
            self.task.index_add_(0, tid + self.k + 1, nt)
            self.totals += torch.tensor([len(tid), float(image_mask.sum()), float((input_ids != 0).sum()),
                                         float(nt.sum()), 0.0], dtype=torch.float64)
        self.steps += 1
        self.loss_sum += float(res.loss)
        self.time += dt
        self.data_time += t_data
        self.gnorm += gnorm

    def reduce(self, tasks: list[str]) -> dict[str, float]:
        buf = torch.cat([self.task, self.totals])
        dist.all_reduce(buf)
        task, totals = buf[: 2 * (self.k + 1)], buf[2 * (self.k + 1):]
        n = max(self.steps, 1)
        rec = {"loss": self.loss_sum / n, "step_time_s": self.time / n, "data_wait_s": self.data_time / n,
               "data_wait_frac": self.data_time / max(self.time, 1e-9), "grad_norm": self.gnorm / n,
               "examples_per_s": float(totals[0]) / max(self.time, 1e-9),
               "images_per_s": float(totals[1]) / max(self.time, 1e-9),
               "tokens_per_s": float(totals[2] + totals[3]) / max(self.time, 1e-9),
               "_prompt_len": float(totals[2] / max(totals[0], 1)),
               "_target_len": float(totals[3] / max(totals[0], 1))}
        for i, name in enumerate(tasks):
            if task[self.k + 1 + i] > 0:
                rec[f"loss/{name}"] = float(task[i] / task[self.k + 1 + i])
        self.reset()
        return rec
