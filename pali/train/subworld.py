"""A worker group whose size is not a multiple of tp * pp: whole replicas train, the remainder waits.

Elastic Ray Train may start the group at any size in `[min_workers, max_workers]` (it counts what fits
on the nodes it has, with no notion of model-parallel groups). With `world` workers and `mp = tp * pp`,
the first `world - world % mp` ranks form `world // mp` whole replicas and train on a default process
group of their own; the last `world % mp` ranks are idle until the next resize.

Building that group: while the default group still spans every worker, rank 0 starts a `TCPStore` and
broadcasts its address; every rank then destroys the Ray-made group, and the active ranks build a new
default group over the store (with their ranks unchanged, so rank 0 is still rank 0). fairscale's
model-parallel groups, the replica streams and the checkpoint's `world_size` then see only the active
ranks, exactly as if Ray had started `world - world % mp` workers.

`ray.train.report` is collective over the whole Ray Train group, so an idle rank must report whenever
the active ones do: rank 0 publishes each report's metrics on the store before reporting (`Relay.publish`)
and says when the run is over (`Relay.finish`); idle ranks follow (`Relay.follow`), reporting the same
metrics with no checkpoint. A failing active rank fails the whole group as usual, idle ranks included.
"""

from __future__ import annotations

import json
from datetime import timedelta

import torch.distributed as dist

_KEY = "pali/report/{}"
_TIMEOUT = timedelta(seconds=1800)  # Ray Train's own process-group timeout


def active_world(world: int, mp: int) -> int:
    """How many of `world` ranks form whole replicas of `mp` ranks each."""
    if world < mp:
        raise ValueError(f"world size {world} is smaller than tp*pp = {mp}: no whole model replica fits")
    return world - world % mp


class Relay:
    """Rank 0's reports, mirrored by the idle ranks (see the module docstring)."""

    def __init__(self, store: dist.Store, rank: int):
        self.store, self.rank, self.count = store, rank, 0

    def publish(self, metrics: dict) -> None:
        """On rank 0, before each `ray.train.report`: let the idle ranks make the same call."""
        if self.rank == 0:
            self.store.set(_KEY.format(self.count), json.dumps(metrics))
        self.count += 1

    def finish(self) -> None:
        """On rank 0, after the last report: the idle ranks may return."""
        if self.rank == 0:
            self.store.set(_KEY.format(self.count), "null")

    def follow(self, report) -> int:
        """On an idle rank: call `report(metrics)` for every report rank 0 publishes, until `finish`.
        Returns how many reports were mirrored."""
        while True:
            key = _KEY.format(self.count)
            while True:  # steps between checkpoints can take longer than any store timeout
                try:
                    self.store.wait([key], timedelta(seconds=60))
                    break
                except dist.DistStoreError:
                    continue
            metrics = json.loads(self.store.get(key))
            if metrics is None:
                return self.count
            report(metrics)
            self.count += 1


def split_world(world: int, rank: int, mp: int, backend: str, host: str) -> Relay | None:
    """Make the default process group span only the first `active_world(world, mp)` ranks.

    Called on every rank of the Ray Train group while its default group spans them all; `host` is this
    node's address (rank 0's is the one used). Returns None when every rank is active (nothing changes),
    else the `Relay` linking rank 0 to the idle ranks.
    """
    active = active_world(world, mp)
    if active == world:
        return None
    server = dist.TCPStore(host, 0, None, True, timeout=_TIMEOUT, wait_for_workers=False) if rank == 0 else None
    address = [(host, server.port) if server is not None else None]
    dist.broadcast_object_list(address, src=0)
    dist.destroy_process_group()
    store = server or dist.TCPStore(address[0][0], address[0][1], None, False, timeout=_TIMEOUT)
    if rank < active:
        dist.init_process_group(backend, store=dist.PrefixStore("pali/active", store), rank=rank,
                                world_size=active, timeout=_TIMEOUT)
    return Relay(store, rank)
