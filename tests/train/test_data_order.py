"""The data order contract (pali.train.data_order): restarts at any step, at any dp, lose and repeat nothing."""

from __future__ import annotations

import itertools
import json
import random

import torch

from pali.train.data_order import DataState, ReplicaStream, plan_chunk, shard_at

SHARDS = [f"s{i}" for i in range(12)]
ROWS = {s: (0 if i == 5 else 3 + (7 * i) % 11) for i, s in enumerate(SHARDS)}  # s5 is all corrupt rows


def fake_read(rng: random.Random):
    """A pipeline stand-in: rows of the given shards in order, in blocks of random size, id = shard*1000+row."""

    def read(paths):
        rows = [(j, int(p[1:]) * 1000 + r) for j, p in enumerate(paths) for r in range(ROWS[p])]
        while rows:
            k = rng.randint(1, 7)
            block, rows = rows[:k], rows[k:]
            yield {"shard_index": torch.tensor([j for j, _ in block]), "id": torch.tensor([i for _, i in block])}

    return read


def run(plan: list[tuple[int, int]], per_rank: int, seed: int = 3) -> tuple[list[list[int]], DataState]:
    """Train `steps` steps at `dp` for each (steps, dp) of `plan`, restarting from the state between them
    (with a checkpoint every 3 steps inside each group, as the loop compacts its streams); returns the
    ids each step consumed (all replicas, replica order) and the final state."""
    state, steps_ids, rng = DataState(), [], random.Random(seed)
    for steps, dp in plan:
        streams = [ReplicaStream(state, dp, d, SHARDS, seed, per_rank, fake_read(rng), chunk=rng.randint(1, 4))
                   for d in range(dp)]
        for k in range(steps):
            steps_ids.append([i for s in streams for i in s.next()["id"].tolist()])
            if k % 3 == 2:  # a checkpoint inside the group's life: recorded, then forgotten by the streams
                state = state.advance([s.report() for s in streams])
                for s in streams:
                    s.compact()
        state = state.advance([s.report() for s in streams])
        state = DataState.from_dict(state.to_dict())  # what a checkpoint's meta.json carries
    return steps_ids, state


def test_one_replica_resumes_in_the_uninterrupted_order():
    whole, _ = run([(40, 1)], per_rank=4)
    for cut in ([3, 37], [1, 1, 1, 37], [10, 5, 7, 18], [39, 1]):
        pieces, _ = run([(c, 1) for c in cut], per_rank=4)
        assert pieces == whole, cut
    # Crossing epochs: the stream goes on into epoch 1's order, with the same contract.
    assert sum(ROWS.values()) < 40 * 4 and len({i for s in whole for i in s}) == sum(ROWS.values())


def test_resizes_consume_every_example_exactly_once():
    total = sum(ROWS.values())
    for plan in ([(3, 2), (2, 3), (4, 1), (2, 2)], [(1, 3), (1, 1), (3, 2)], [(5, 2)]):
        per_rank = 2
        ids, state = run(plan, per_rank)
        flat = [i for s in ids for i in s]
        assert sum(steps * dp * per_rank for steps, dp in plan) == len(flat) < total  # the global batch is kept
        assert len(flat) == len(set(flat)), plan  # nothing repeated
        # ... and nothing skipped: exactly the rows the state says are done (whole shards, partial prefixes).
        expected = set()
        for g in range(state.cursor):
            expected |= {int(shard_at(SHARDS, g, 3)[1:]) * 1000 + r for r in range(ROWS[shard_at(SHARDS, g, 3)])}
        for g in state.done:
            expected |= {int(shard_at(SHARDS, g, 3)[1:]) * 1000 + r for r in range(ROWS[shard_at(SHARDS, g, 3)])}
        for g, n in state.partial.items():
            expected |= {int(shard_at(SHARDS, g, 3)[1:]) * 1000 + r for r in range(n)}
        assert set(flat) == expected, plan


def test_state_round_trip_and_empty_shards_are_passed_over():
    state = DataState(4, [6, 9], {5: 2, 7: 1})
    assert DataState.from_dict(state.to_dict()) == state and DataState.from_dict(None) == DataState()
    assert [g for g, _ in itertools.islice(state.remaining(), 5)] == [4, 5, 7, 8, 10]
    assert dict(zip(range(3), state.remaining(), strict=False)).get(1) == (5, 2)
    assert [g for g, _ in itertools.islice(state.deal(2, 1), 3)] == [5, 8, 11]
    # Replica reports: finished shards join `done` (and the cursor moves over them), the current one is partial.
    nxt = state.advance([([4, 5], 3), ([7], 4)])
    assert (nxt.cursor, nxt.done, nxt.partial) == (5, [6, 9], {5: 3, 7: 4})
    done = nxt.advance([([5, 7], 6)])  # 5 finished: the cursor runs over 5, 6 (done); 7 is partial
    assert (done.cursor, done.done, done.partial) == (7, [9], {7: 6})
    assert plan_chunk(10, None, 4) == 2 and plan_chunk(10**6, 100, 1) == 64


def test_all_empty_shards_raise_instead_of_looping():
    import pytest

    def empty(paths):
        return iter(())

    stream = ReplicaStream(DataState(), 1, 0, SHARDS, 0, 4, empty, chunk=5)
    with pytest.raises(RuntimeError, match="produced no examples"):
        stream.next()


def test_a_run_over_100k_shards_plans_in_bounded_time_and_memory():
    """Paper scale: 100,000 listed shards, 5,000 steps with a checkpoint every 100. The stream queues one
    chunk of shards at a time, and each checkpoint's record and the stream's own bookkeeping stay the
    size of the shards in flight, not of the run."""
    import time
    import tracemalloc

    shards = [f"s{i}" for i in range(100_000)]

    def read(paths):
        for j, p in enumerate(paths):
            yield {"shard_index": torch.tensor([j, j]), "id": torch.tensor([int(p[1:]) * 10, int(p[1:]) * 10 + 1])}

    t0 = time.perf_counter()
    tracemalloc.start()
    state = DataState()
    chunk = plan_chunk(5_000 * 4, rows=2 * len(shards), num_shards=len(shards))
    stream = ReplicaStream(state, 1, 0, shards, 0, 4, read, chunk=chunk)
    ids, sizes = [], []
    for step in range(1, 5_001):
        ids += stream.next()["id"].tolist()
        if step % 100 == 0:
            state = state.advance([stream.report()])
            stream.compact()
            sizes.append((len(stream.report()[0]), len(stream._order), len(state.to_dict()["done"]),
                          len(state.partial), len(json.dumps(state.to_dict()))))
    _, peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    elapsed = time.perf_counter() - t0
    # The last shard read is whole but not yet known finished: the next one has not started.
    assert (state.cursor, state.partial) == (9_999, {9_999: 2})
    assert len(ids) == len(set(ids)) == 20_000  # every example once, in order
    assert chunk == 64 and max(s[0] for s in sizes) <= 1 and max(s[1] for s in sizes) <= chunk
    assert max(s[2] + s[3] for s in sizes) <= 1 and max(s[4] for s in sizes) < 100  # the checkpoint's record
    assert peak < 8e6, f"planning held {peak / 1e6:.1f} MB"  # the epoch's permutation is 0.8 MB
    assert elapsed < 60, f"{elapsed:.1f} s"
