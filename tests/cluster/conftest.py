"""Fixtures for tests that need a Ray cluster of their own (multi-node, job server).

These clusters are separate Ray instances (own temp dir, own ports) started as `ray start`
subprocesses; the test process never `ray.init`s them, so they coexist with the session-scoped
`ray_cluster` fixture of tests/conftest.py in the same pytest process. Drivers run in
subprocesses: `ray job submit` (cluster.jobs.submit_job) or cluster.local_cluster.run_driver.
"""

from __future__ import annotations

import pytest

from cluster.local_cluster import LocalCluster


@pytest.fixture(scope="module")
def ray_head():
    """A single-node `ray start --head` cluster with the dashboard/job server on 127.0.0.1.

    Yields the job server address (`http://127.0.0.1:<port>`) for `ray job submit --address`.
    8 logical CPUs (oversubscribed, like the session `ray_cluster`) so a training job fits.
    Module-scoped: the ~10 s start-up is paid once per test module.
    """
    with LocalCluster(num_workers=0, head_cpus=8, include_dashboard=True) as cluster:
        yield cluster.dashboard_url


@pytest.fixture
def local_cluster():
    """Factory for `LocalCluster`s that are always shut down at the end of the test."""
    started: list[LocalCluster] = []

    def make(**kwargs) -> LocalCluster:
        cluster = LocalCluster(**kwargs).start()
        started.append(cluster)
        return cluster

    yield make
    for cluster in started:
        cluster.shutdown()
