"""Pretraining against clusters of its own: `ray job submit`, and elastic resizing on a multi-node cluster.

These clusters are separate `ray start` processes on loopback (cluster.local_cluster); drivers run in
subprocesses, so they coexist with the session's `ray_cluster`.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from cluster.jobs import submit_job
from cluster.local_cluster import LocalCluster

ROOT = Path(__file__).resolve().parents[2]
pytestmark = pytest.mark.slow


SLOW_STEPS = {"PALI_STEP_HOOKS": "pali.testing.faults:slow_steps", "PALI_STEP_DELAY_S": "0.3"}
"""Step hook: 0.3 s per step, so the cluster can resize under a tiny run."""


def _args(shards: Path, out: Path, steps: int, **extra) -> list[str]:
    args = ["--data", str(shards / "train"), "--eval-data", str(shards / "val"), "--steps", str(steps),
            "--global-batch", "8", "--micro-batch", "4", "--warmup-steps", "2", "--output-dir", str(out),
            "--log-every", "1", "--no-eval", "--vision-pretrain-steps", "0"]
    for k, v in extra.items():
        args += [f"--{k.replace('_', '-')}", str(v)]
    return args


def test_pretrain_runs_unchanged_as_a_ray_job(train_shards, tmp_path):
    with LocalCluster(num_workers=0, head_cpus=6, include_dashboard=True) as cluster:
        result = submit_job(cluster.dashboard_url,
                            ["python", "-m", "jobs.pretrain", *_args(train_shards, tmp_path / "job", 2,
                                                                     checkpoint_every=2, vision_pretrain_steps=5)],
                            working_dir=str(ROOT), timeout_s=420)
    assert result.succeeded, f"{result.status}\n{result.logs[-4000:]}"
    assert "serving checkpoint" in result.logs
    assert "vision stage: " in result.logs and "vision tower frozen" in result.logs  # the stage ran as a task
    assert (tmp_path / "job" / "final" / "model.safetensors").is_file()


def _wait(pred, timeout: float, what: str, proc: subprocess.Popen):
    t0 = time.time()
    while time.time() - t0 < timeout:
        if pred():
            return
        if proc.poll() is not None:
            raise AssertionError(f"driver exited ({proc.returncode}) while waiting for {what}")
        time.sleep(1.0)
    raise AssertionError(f"timed out waiting for {what}")


def _dps(metrics: Path) -> list[int]:
    """dp of every record as written (read_metrics keeps only the last record of a step repeated after a
    restart)."""
    return [json.loads(line)["dp"] for line in metrics.read_text().splitlines()] if metrics.exists() else []


def test_elastic_run_grows_and_shrinks_with_constant_global_batch(train_shards, tmp_path):
    """One worker node; a second joins mid-run, then dies. Ray Train's elastic policy restarts the group
    from the last checkpoint on two workers (DP 1 -> 2), then on the survivor (DP 2 -> 1); the step count
    carries on across both restarts and every step keeps the global batch. Growth waits on Ray's
    autoscaling coordinator (it ticks every 20 s) and a death on Ray noticing it, so the run is long and
    the test stops the driver after three steps on the survivor. (That a restarted run reaches its
    planned final step is tested with a killed worker in test_pretrain_ray.py.)"""
    out = tmp_path / "elastic"
    metrics = out / "metrics.jsonl"
    # Workers need a "trainer_slot", which only the worker nodes have: a node joining or dying adds or
    # removes exactly one worker.
    with LocalCluster(num_workers=0, head_cpus=4) as cluster:
        cluster.add_node(num_cpus=1, resources={"trainer_slot": 1})
        cluster.wait_for_nodes(2)
        log = open(tmp_path / "driver.log", "w")
        env = {**os.environ, "RAY_ADDRESS": cluster.address, "OMP_NUM_THREADS": "1", **SLOW_STEPS}
        proc = subprocess.Popen(
            [sys.executable, "-m", "jobs.pretrain",
             *_args(train_shards, out, 3000, checkpoint_every=3, min_workers=1, max_workers=2, max_failures=6,
                    worker_resources=json.dumps({"trainer_slot": 1}))],
            cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT)
        try:
            _wait(lambda: _dps(metrics).count(1) >= 3, 300, "three steps on 1 worker", proc)
            joined = cluster.add_node(num_cpus=1, resources={"trainer_slot": 1})
            _wait(lambda: _dps(metrics).count(2) >= 3, 420, "three steps on 2 workers after a node joined", proc)
            n_grown = len(_dps(metrics))
            cluster.remove_node(joined, graceful=False)
            _wait(lambda: _dps(metrics)[n_grown:].count(1) >= 3, 420,
                  "three steps on the survivor after a node died", proc)
        finally:
            proc.kill()
            proc.wait()
            log.close()
    raw = [json.loads(line) for line in metrics.read_text().splitlines()]
    dps = [r["dp"] for r in raw]
    segments = [d for k, d in enumerate(dps) if k == 0 or d != dps[k - 1]]
    assert segments == [1, 2, 1], dps  # grew once, shrank once
    # Each restart resumed from a checkpoint: its first step follows on from the steps before it.
    for k in (dps.index(2), len(dps) - dps[::-1].index(2)):
        assert 1 < raw[k]["step"] <= raw[k - 1]["step"] + 1, [(r["step"], r["dp"]) for r in raw]
    # The optimisation does not change with the group size: every step saw the same global batch.
    assert {r["global_batch"] for r in raw} == {8}
