"""A group that is not a multiple of tp*pp, on real gloo processes: whole replicas get a default process group
of their own, and the idle remainder mirrors rank 0's reports."""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from pali.train.subworld import active_world, split_world


def _rank(rank: int, world: int, store: str, out: str) -> None:
    os.environ["OMP_NUM_THREADS"] = "1"
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=world)
    relay = split_world(world, rank, 2, "gloo", "127.0.0.1")
    result: dict = {}
    if rank < active_world(world, 2):
        from pali.parallel import Grid

        grid = Grid.init(pp=1, tp=2)  # over the new default group: 4 ranks, dp = 2
        x = torch.tensor([float(rank)])
        dist.all_reduce(x)
        result = {"world": dist.get_world_size(), "rank": dist.get_rank(), "dp": grid.dp, "sum": float(x)}
        for step in (2, 4):
            relay.publish({"step": step})
            dist.barrier()  # the active ranks report in lockstep, as ray.train.report makes them
        relay.finish()
        grid.destroy()
        dist.destroy_process_group()
    else:
        seen = []
        result = {"initialized": dist.is_initialized(), "mirrored": relay.follow(seen.append), "seen": seen}
    Path(out, f"{rank}.json").write_text(json.dumps(result))


@pytest.mark.slow
def test_five_ranks_with_tp2_train_two_replicas_and_the_fifth_mirrors_the_reports():
    with tempfile.TemporaryDirectory() as tmp:
        mp.spawn(_rank, args=(5, os.path.join(tmp, "store"), tmp), nprocs=5, join=True)
        res = [json.loads(Path(tmp, f"{r}.json").read_text()) for r in range(5)]
    for r in range(4):
        assert res[r] == {"world": 4, "rank": r, "dp": 2, "sum": 6.0}
    assert res[4] == {"initialized": False, "mirrored": 2, "seen": [{"step": 2}, {"step": 4}]}


def test_a_group_smaller_than_one_replica_is_refused():
    assert active_world(12, 8) == 8 and active_world(8, 8) == 8 and active_world(3, 1) == 3
    with pytest.raises(ValueError, match="world size 3 is smaller than tp\\*pp = 4"):
        active_world(3, 4)
