"""Shared fixtures: one local Ray cluster per test session (Ray start-up costs ~10 s here)."""

from __future__ import annotations

import os

import pytest

# Every cluster the tests start keeps Ray's token authentication on, as the project's own commands do:
# RAY_AUTH_MODE=token here is inherited by every subprocess (jobs, `python -m serve`, `ray start` nodes,
# drivers, `ray job submit`), and they all find the token where Ray looks (generated if missing).
os.environ["RAY_AUTH_MODE"] = "token"
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
os.environ.setdefault("RAY_DEDUP_LOGS", "0")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# Generous start-up limits: a loaded 2-core machine can take long to register a raylet or its agent.
os.environ.setdefault("RAY_agent_register_timeout_ms", "180000")
os.environ.setdefault("RAY_raylet_start_wait_time_s", "300")


@pytest.fixture(scope="session")
def ray_cluster():
    """A local Ray instance shared by every test that needs one.

    Logical CPUs are oversubscribed (8 on 2 cores) so training workers never starve Ray Data tasks.
    """
    import ray

    from cluster.auth import use_in_this_process

    if not ray.is_initialized():
        use_in_this_process()
        ray.init(address="local", num_cpus=8, include_dashboard=False, log_to_driver=False,
                 runtime_env={"env_vars": {"OMP_NUM_THREADS": "1"}})
    yield ray
    # Serve (if a test started it) is shut down by its own fixture; the cluster goes with the session.
    ray.shutdown()


@pytest.fixture(autouse=True, scope="session")
def _one_torch_thread():
    """One intra-op thread: 2-core machines run several processes at once (Ray workers, data tasks)."""
    import torch

    torch.set_num_threads(1)


@pytest.fixture(scope="session")
def tiny_config():
    """The tiny preset (used by most model tests)."""
    from pali.config import get_preset

    return get_preset("tiny")
