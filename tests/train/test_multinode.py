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
from pali.train.metrics import read_metrics

ROOT = Path(__file__).resolve().parents[2]
pytestmark = pytest.mark.slow


def _args(shards: Path, out: Path, steps: int, **extra) -> list[str]:
    args = ["--data", str(shards / "train"), "--eval-data", str(shards / "val"), "--steps", str(steps),
            "--global-batch", "8", "--micro-batch", "4", "--warmup-steps", "2", "--output-dir", str(out),
            "--log-every", "1", "--no-eval"]
    for k, v in extra.items():
        args += [f"--{k.replace('_', '-')}", str(v)]
    return args


def test_pretrain_runs_unchanged_as_a_ray_job(train_shards, tmp_path):
    with LocalCluster(num_workers=0, head_cpus=6, include_dashboard=True) as cluster:
        result = submit_job(cluster.dashboard_url,
                            ["python", "-m", "jobs.pretrain", *_args(train_shards, tmp_path / "job", 2,
                                                                     checkpoint_every=2)],
                            working_dir=str(ROOT), timeout_s=420)
    assert result.succeeded, f"{result.status}\n{result.logs[-4000:]}"
    assert "serving checkpoint" in result.logs
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


def test_elastic_run_shrinks_when_a_node_dies_with_constant_global_batch(train_shards, tmp_path):
    """Two worker nodes, one killed mid-run: the group restarts from the last checkpoint with one worker
    (DP 2 -> 1) and finishes the planned steps with the same global batch. Growth back to two workers is
    left to Ray Train's autoscaling coordinator (it ticks every 20 s), so it is not awaited here."""
    out = tmp_path / "elastic"
    metrics = out / "metrics.jsonl"
    # Workers need a "trainer_slot", which only the worker nodes have: killing one removes a worker.
    with LocalCluster(num_workers=0, head_cpus=4) as cluster:
        for _ in range(2):
            cluster.add_node(num_cpus=1, resources={"trainer_slot": 1})
        cluster.wait_for_nodes(3)
        log = open(tmp_path / "driver.log", "w")
        env = {**os.environ, "RAY_ADDRESS": cluster.address, "OMP_NUM_THREADS": "1"}
        proc = subprocess.Popen(
            [sys.executable, "-m", "jobs.pretrain",
             *_args(train_shards, out, 30, checkpoint_every=3, min_workers=1, max_workers=2, max_failures=6,
                    step_delay=0.3, worker_resources=json.dumps({"trainer_slot": 1}))],
            cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT)
        try:
            _wait(lambda: any(r["step"] >= 4 and r["dp"] == 2 for r in read_metrics(metrics)), 300,
                  "training on 2 workers", proc)
            cluster.remove_node(cluster.workers[0], graceful=False)
            proc.wait(timeout=600)
        finally:
            if proc.poll() is None:
                proc.kill()
            log.close()
    text = (tmp_path / "driver.log").read_text()
    assert proc.returncode == 0, text[-4000:]
    recs = read_metrics(metrics)
    assert recs[-1]["step"] == 30
    dps = [r["dp"] for r in recs]
    assert dps[0] == 2 and dps[-1] == 1, dps  # started on 2 workers, finished on the survivor
    # The optimisation does not change with the group size: every step saw the same global batch.
    assert {r["global_batch"] for r in recs} == {8}
