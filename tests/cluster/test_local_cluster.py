"""The local multi-node cluster: a head and worker nodes on this machine, each a real Ray node."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import uuid
from pathlib import Path

import pytest

from cluster.local_cluster import LocalCluster, run_driver
from cluster.procs import pids_with_marker

ROOT = Path(__file__).resolve().parents[2]

WHERE = r"""
import json, ray
ray.init()
@ray.remote(num_cpus=0.1)
def where():
    return ray.get_runtime_context().get_node_id()
names = ["head", "worker-1", "worker-2"]
ids = ray.get([where.options(resources={"node:" + n: 0.01}).remote() for n in names])
print("NODES " + json.dumps({"ids": dict(zip(names, ids)), "cpus": ray.cluster_resources()["CPU"]}))
"""


def _no_processes_left(cluster: LocalCluster, names: list[str]) -> bool:
    return not any(pids_with_marker(f"{cluster.dir}:{name}") for name in names)


@pytest.mark.slow
def test_multi_node_cluster_runs_tasks_on_each_node_and_loses_one(local_cluster):
    cluster = local_cluster(num_workers=2, cpus_per_node=2, head_cpus=1)
    table = {row["name"]: row for row in cluster.node_table() if row["alive"]}
    assert set(table) == {"head", "worker-1", "worker-2"}
    assert [table[n]["resources"]["CPU"] for n in ("head", "worker-1", "worker-2")] == [1, 2, 2]

    out = run_driver(cluster.address, WHERE, timeout_s=180).stdout
    report = json.loads(next(line for line in out.splitlines() if line.startswith("NODES "))[6:])
    ids = report["ids"]
    assert len(set(ids.values())) == 3, f"tasks did not land on three distinct nodes: {ids}"
    assert ids == {name: table[name]["node_id"] for name in ids}, "a task ran on the wrong node"
    assert report["cpus"] == 5

    removed = cluster.remove_node(0)  # worker-1 leaves (SIGTERM: it deregisters at once)
    assert removed.name == "worker-1" and not removed.is_running()
    alive = {row["name"] for row in cluster.node_table() if row["alive"]}
    assert alive == {"head", "worker-2"}
    assert [w.name for w in cluster.workers] == ["worker-2"]
    assert _no_processes_left(cluster, ["worker-1"])

    with pytest.raises(ValueError, match="unknown node 'worker-9'"):
        cluster.remove_node("worker-9")
    with pytest.raises(ValueError, match="cannot remove the head"):
        cluster.remove_node("head")

    cluster_dir = cluster.dir
    cluster.shutdown()
    assert _no_processes_left(cluster, ["head", "worker-1", "worker-2"])
    assert not os.path.exists(cluster_dir)


@pytest.mark.slow
def test_cli_up_add_kill_down():
    cluster_dir = f"/tmp/plc-cli-{uuid.uuid4().hex[:8]}"

    def cli(*args: str) -> str:
        res = subprocess.run([sys.executable, "-m", "cluster.local_cluster", "--dir", cluster_dir, *args],
                             cwd=ROOT, capture_output=True, text=True, timeout=240)
        assert res.returncode == 0, f"{args}: {res.stdout}\n{res.stderr}"
        return res.stdout

    try:
        out = cli("up", "--workers", "0", "--head-cpus", "1", "--cpus-per-node", "1")
        assert "head" in out and "RAY_ADDRESS=" in out
        assert "added worker-1" in cli("add-node")
        status = cli("status")
        assert "worker-1" in status and status.count(" True ") >= 2
        cluster = LocalCluster.attach(cluster_dir)
        assert {r["name"] for r in cluster.node_table() if r["alive"]} == {"head", "worker-1"}
        assert "removed worker-1" in cli("remove-node", "worker-1", "--kill")  # a crash: SIGKILL
        assert _no_processes_left(cluster, ["worker-1"])
        assert [n.name for n in LocalCluster.attach(cluster_dir).nodes] == ["head"]  # state.json updated
        assert "stopped" in cli("down")
        assert _no_processes_left(cluster, ["head"]) and not os.path.exists(cluster_dir)
    finally:
        if os.path.exists(os.path.join(cluster_dir, "state.json")):
            LocalCluster.attach(cluster_dir).shutdown()


def test_bad_arguments_are_rejected():
    with pytest.raises(ValueError, match="num_workers is -1"):
        LocalCluster(num_workers=-1)
    with pytest.raises(ValueError, match="object_store_mb is 10"):
        LocalCluster(object_store_mb=10)
    with pytest.raises(ValueError, match="longer than"):
        LocalCluster(dir="/tmp/" + "x" * 60)
    with pytest.raises(FileNotFoundError, match="no local cluster"):
        LocalCluster.attach("/tmp/plc-does-not-exist")


class _HeadThatDiesAfterStarting(LocalCluster):
    """The first head launch prints Ray's start-up banner, writes a GCS address and exits, as a `ray start
    --block` does when one of its processes (the dashboard, say) dies just after start-up."""

    def __init__(self, **kwargs):
        super().__init__(**kwargs)
        self.launches = 0

    def _node_command(self, num_cpus, resources, extra):
        self.launches += 1
        if self.launches > 1:
            return super()._node_command(num_cpus, resources, extra)
        address_file = os.path.join(self.dir, "ray", "ray_current_cluster")
        fake = (f"import os; os.makedirs({os.path.dirname(address_file)!r}, exist_ok=True); "
                f"open({address_file!r}, 'w').write('127.0.0.1:9'); "
                "print('Ray runtime started.', flush=True); raise SystemExit(3)")
        return [sys.executable, "-c", fake]


@pytest.mark.slow
def test_a_head_that_exits_after_start_up_is_retried_cleanly(capfd):
    """A head whose `ray start` exits after printing "Ray runtime started." fails its attempt at once (not
    after the start-up timeout), and the retry waits for its own banner and reads its own GCS address, not
    the dead attempt's (the log is appended to across attempts)."""
    cluster = _HeadThatDiesAfterStarting(num_workers=0, head_cpus=1, include_dashboard=True,
                                         startup_timeout_s=120)
    try:
        cluster.start()
        assert cluster.address != "127.0.0.1:9" and cluster.head.is_running()
        assert cluster.launches == 2
        err = capfd.readouterr().err
        assert "head start attempt 1 failed" in err and "exited with code 3" in err
        run_driver(cluster.address, "import ray; ray.init(); assert ray.cluster_resources()['CPU'] == 1")
    finally:
        cluster.shutdown()
