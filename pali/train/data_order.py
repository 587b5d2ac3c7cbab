"""Which examples each data-parallel replica trains on, in what order, and how a resume continues exactly.

The contract:

- **The shard stream.** Epoch e visits the shards in a seeded order (`shard_order(shards, e, seed)`);
  global shard position g = e * n + i names the i-th shard of epoch e. Inside a shard, examples come in
  row order (corrupt rows are counted and skipped by the pipeline, the same ones every time).
- **Dealing.** When the worker group starts, the shards still to train on (`DataState.remaining`: the
  partly read ones first, each with the examples it has already given, then every unread g in order) are
  dealt round-robin to the dp replicas: replica d reads the d-th, (d+dp)-th, ... of them, each with its
  own Ray Data stream (order preserved), `per_rank` examples per step.
- **Checkpoints** record, for every shard a replica has started since the group started, how far it got
  (`DataState`): the cursor below which every shard is done, the done shards above it, and the partly
  read ones with their example counts. A restart — a killed worker, the driver rerun with the same
  command, a larger `--steps`, or a resize to another dp — resumes from that record and deals the rest
  again: every example is trained on exactly once per pass over the data, none is repeated or skipped.
  With one replica the order is exactly the uninterrupted run's, so its weights are too.
- What a restart loses is only what was trained after the last checkpoint (the steps are redone on the
  same examples, from the checkpoint's weights).
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

import numpy as np
import torch
import torch.distributed as dist


def shard_order(shards: list[str], epoch: int, seed: int) -> list[str]:
    """The seeded visiting order of the shards in one epoch."""
    perm = np.random.RandomState(seed + 7919 * epoch).permutation(len(shards))
    return [shards[i] for i in perm]


def shard_at(shards: list[str], g: int, seed: int) -> str:
    """The shard at global position g (epoch g // n, place g % n of that epoch's order)."""
    n = len(shards)
    return shard_order(shards, g // n, seed)[g % n]


class ShardOrder:
    """`shard_at` for many positions: the permutation of the epoch last asked for is kept, so looking up
    a stream of positions costs O(1) each (plus one O(n) permutation per epoch), at any shard count."""

    def __init__(self, shards: list[str], seed: int):
        self.shards, self.seed = shards, seed
        self._epoch, self._perm = -1, np.empty(0, dtype=np.int64)

    def __call__(self, g: int) -> str:
        n = len(self.shards)
        epoch = g // n
        if epoch != self._epoch:
            self._epoch, self._perm = epoch, np.random.RandomState(self.seed + 7919 * epoch).permutation(n)
        return self.shards[int(self._perm[g % n])]


@dataclass
class DataState:
    """How far the run has read the shard stream (saved in every checkpoint's meta as `data_state`)."""

    cursor: int = 0
    """Every shard position g < cursor is fully trained on."""
    done: list[int] = field(default_factory=list)
    """Positions >= cursor that are fully trained on (replicas do not finish their shards in order)."""
    partial: dict[int, int] = field(default_factory=dict)
    """Position -> examples of that shard already trained on (a shard a replica was inside)."""

    def to_dict(self) -> dict:
        """JSON form (keys of `partial` as strings)."""
        return {"cursor": self.cursor, "done": sorted(self.done),
                "partial": {str(g): n for g, n in sorted(self.partial.items())}}

    @classmethod
    def from_dict(cls, d: dict | None) -> DataState:
        """Inverse of `to_dict`; None (a run with no checkpoint) is the start of the stream."""
        if not d:
            return cls()
        return cls(int(d["cursor"]), [int(g) for g in d.get("done", [])],
                   {int(g): int(n) for g, n in d.get("partial", {}).items()})

    def remaining(self) -> Iterator[tuple[int, int]]:
        """(position, examples to skip) of every shard still to read, in stream order; never ends."""
        done = set(self.done)
        for g in itertools.count(self.cursor):
            if g not in done:
                yield g, self.partial.get(g, 0)

    def deal(self, dp: int, replica: int) -> Iterator[tuple[int, int]]:
        """Replica `replica`'s share of `remaining` among `dp` replicas (round-robin)."""
        return itertools.islice(self.remaining(), replica, None, dp)

    def advance(self, reports: list[tuple[list[int], int]]) -> DataState:
        """The state after every replica's report (`ReplicaStream.report`): shards finished since the group
        started, and the one it is inside with its example count (-1: it has not started one)."""
        done = set(self.done)
        partial = dict(self.partial)
        for started, count in reports:
            for g in started[:-1]:
                done.add(g)
                partial.pop(g, None)
            if started:
                partial[started[-1]] = count
        cursor = self.cursor
        while cursor in done:
            done.discard(cursor)
            cursor += 1
        return DataState(cursor, sorted(g for g in done if g >= cursor),
                         {g: n for g, n in partial.items() if g >= cursor and g not in done})


Batch = dict[str, torch.Tensor]


class ReplicaStream:
    """One replica's examples in order, `per_rank` at a time, over its dealt shards (`DataState.deal`).

    `read(paths)` returns an iterator of tensor batches for those shard paths in order, each carrying a
    `shard_index` (index into `paths`) per row: the Ray Data pipeline in training, anything in tests.
    Shards are read `chunk` at a time; the rows a checkpoint says were trained on are dropped.
    """

    def __init__(self, state: DataState, dp: int, replica: int, shards: list[str], seed: int, per_rank: int,
                 read: Callable[[list[str]], Iterator[Batch]], chunk: int = 16):
        self.shards, self.seed, self.n, self.read, self.chunk = shards, seed, per_rank, read, max(1, chunk)
        self._shard_at = ShardOrder(shards, seed)
        self._dealt = state.deal(dp, replica)
        self.started: list[int] = []
        """Positions this replica has trained on (in order) since the group started; the last is current."""
        self.count = 0
        """Examples of the current shard trained on (including those a checkpoint said were done)."""
        self._skip: dict[int, int] = {}
        self._done_before: dict[int, int] = {}
        self._order: list[int] = []  # dealt positions, in order
        self._next = 0  # index in _order of the first position not yet started
        self._buffer: list[tuple[Batch, torch.Tensor]] = []
        self._rows = self._row_source()

    def _row_source(self) -> Iterator[tuple[Batch, torch.Tensor]]:
        """(batch, global position of each row) from one chunk of dealt shards after another."""
        dry = 0
        while True:
            todo = list(itertools.islice(self._dealt, self.chunk))
            positions = torch.tensor([g for g, _ in todo], dtype=torch.long)
            self._skip.update({g: s for g, s in todo if s})
            self._done_before.update({g: s for g, s in todo if s})
            self._order.extend(g for g, _ in todo)
            got = False
            for b in self.read([self._shard_at(g) for g, _ in todo]):
                g = positions[b.pop("shard_index").long()]
                keep = self._keep(g)
                if keep is not None:
                    b, g = {k: v[keep] for k, v in b.items()}, g[keep]
                if len(g):
                    got = True
                    yield b, g
            dry = 0 if got else dry + len(todo)
            if dry >= len(self.shards):  # a whole epoch's worth of shards and not one example
                raise RuntimeError(f"the training shards produced no examples ({len(self.shards)} shards read "
                                   "in a row); check the data's schema and the pipeline's malformed-row counts")

    def _keep(self, g: torch.Tensor) -> torch.Tensor | None:
        """Mask of rows to keep after dropping each partly read shard's first (already trained) examples."""
        if not self._skip:
            return None
        keep = torch.ones(len(g), dtype=torch.bool)
        for i, pos in enumerate(g.tolist()):
            left = self._skip.get(pos, 0)
            if left:
                keep[i] = False
                self._skip[pos] = left - 1
        return keep

    def next(self) -> Batch:
        """The next `per_rank` examples of this replica's stream."""
        have = sum(len(g) for _, g in self._buffer)
        while have < self.n:
            b, g = next(self._rows)
            self._buffer.append((b, g))
            have += len(g)
        keys = list(self._buffer[0][0])
        batch = {k: torch.cat([b[k] for b, _ in self._buffer]) for k in keys}
        g = torch.cat([g for _, g in self._buffer])
        rest = {k: v[self.n:] for k, v in batch.items()}
        self._buffer = [(rest, g[self.n:])] if len(g) > self.n else []
        self._consume(g[: self.n].tolist())
        return {k: v[: self.n] for k, v in batch.items()}

    def _consume(self, positions: list[int]) -> None:
        for pos in positions:
            if not self.started or self.started[-1] != pos:
                # Dealt shards before this one gave nothing more (empty, or all trained on): finished too.
                idx = self._order.index(pos, self._next)
                self.started.extend(self._order[self._next: idx + 1])
                self._next = idx + 1
                self.count = self._done_before.get(pos, 0)
            self.count += 1

    def report(self) -> tuple[list[int], int]:
        """(positions started since the last `compact` (or the group's start), in order: all but the last
        are finished; examples of the last trained on) — what `DataState.advance` takes."""
        return list(self.started), self.count

    def compact(self) -> None:
        """Forget the finished shards once a checkpoint recorded them (`DataState.advance` of this report):
        what the stream keeps stays bounded by the shards in flight, however long the run."""
        cur = len(self.started) and self._next - 1  # index in _order of the shard being read, if any
        self._order = self._order[cur:]
        self._next -= cur
        self.started = self.started[-1:]
        live = set(self._order)
        self._skip = {g: n for g, n in self._skip.items() if g in live}
        self._done_before = {g: n for g, n in self._done_before.items() if g in live}


def gather_reports(stream: ReplicaStream | None, world: int, rank: int) -> list[tuple[list[int], int]]:
    """Every reading rank's `report()`, on every rank (gloo/CPU tensors: works beside nccl too)."""
    mine = stream.report() if stream is not None else None
    length = torch.tensor([len(mine[0]) if mine else 0], dtype=torch.long)
    dist.all_reduce(length, op=dist.ReduceOp.MAX)
    width = int(length.item()) + 2
    buf = torch.zeros((world, width), dtype=torch.long)
    if mine is not None:
        buf[rank, 0], buf[rank, 1] = 1 + len(mine[0]), mine[1]
        buf[rank, 2: 2 + len(mine[0])] = torch.tensor(mine[0], dtype=torch.long)
    dist.all_reduce(buf)
    return [(buf[r, 2: 1 + int(buf[r, 0])].tolist(), int(buf[r, 1])) for r in range(world) if int(buf[r, 0]) > 0]


def plan_chunk(examples_per_replica: int, rows: int | None, num_shards: int) -> int:
    """Shards a replica reads per Ray Data stream: about what the rest of the run needs, at most 64 (each
    queued shard is an input block Ray Data's scheduler walks) and at least 2."""
    per_shard = rows / num_shards if rows else 64
    return max(2, min(64, int(math.ceil(examples_per_replica / max(per_shard, 1))) + 1))
