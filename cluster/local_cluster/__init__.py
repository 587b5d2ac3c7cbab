"""A local multi-node Ray cluster on one machine, for multi-node and elastic tests.

Every node is a real `ray start --block` process (its own raylet, object store, agents), so the
cluster behaves like several machines that happen to share one host: tasks can be pinned to a node
through its custom resource `node:<name>` (`node:head`, `node:worker-1`, ...), and a node can leave
(`remove_node`, gracefully or by SIGKILL) to exercise fault tolerance and elastic resizing.

Isolation from any other Ray instance on the machine (the test session's `ray.init`, other users):
the cluster has its own temp dir (so `ray_current_cluster` is written there, never to /tmp/ray, and a
plain `ray.init()` elsewhere never attaches to it), its own free ports, and each of its processes
carries the environment marker `PALI_LOCAL_CLUSTER_NODE=<dir>:<node>`, so stopping a node signals
exactly that node's processes (never `ray stop`, which kills every Ray process on the host).
This module never calls `ray.init`; connect a driver from another process (see `run_driver`).

Token authentication stays on (`cluster.auth`): every node runs with `RAY_AUTH_MODE=token` and the
token Ray finds (`RAY_AUTH_TOKEN`, `RAY_AUTH_TOKEN_PATH` or `~/.ray/auth_token`, generated if none);
drivers need `RAY_AUTH_MODE=token` and the same token. `auth=False` (CLI: `--no-ray-auth`) turns it
off, with a warning.

CLI::

    python -m cluster.local_cluster up --workers 2 --cpus-per-node 4 [--dashboard]
    python -m cluster.local_cluster status
    python -m cluster.local_cluster add-node --cpus 2
    python -m cluster.local_cluster remove-node worker-1 [--kill]
    python -m cluster.local_cluster down
"""

from __future__ import annotations

import atexit
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import urllib.request
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from cluster import auth
from cluster.procs import MARKER_ENV, free_port, has_marker, pids_with_marker, signal_pid, tail

DEFAULT_DIR = "/tmp/pali-lc"
"""Where the CLI keeps its cluster (Ray temp dir, logs, state.json). Short: Unix sockets live below it."""
BASE_ENV = {
    # No usage stats, no thread oversubscription on 2 cores (token auth: see `cluster.auth`).
    "RAY_USAGE_STATS_ENABLED": "0",
    "OMP_NUM_THREADS": "1",
    "MKL_NUM_THREADS": "1",
    "TOKENIZERS_PARALLELISM": "false",
}
_STARTED_MARK = "Ray runtime started."
_BOOT_ATTEMPTS = 3  # a loaded machine (or a port taken meanwhile) can fail a node's boot
_NODE_RESOURCE = re.compile(r"^node:(head|worker-\d+)$")
_MAX_SOCKET_DIR = 40  # AF_UNIX paths are limited to 107 bytes; Ray adds ~60 below the temp dir.


@dataclass
class LocalNode:
    """One node of a `LocalCluster`: a `ray start --block` process and everything it spawned."""

    name: str
    """Node name: `head` or `worker-<k>` (k counts up and is never reused)."""
    pid: int
    """Pid of the `ray start --block` process (leader of its own session)."""
    num_cpus: int
    """Logical CPUs the node advertises (`--num-cpus`)."""
    resources: dict[str, float]
    """Custom resources (`--resources`), always including `node:<name>: 1`."""
    log_path: str
    """File holding the `ray start` output of this node."""
    is_head: bool = False
    """Whether this is the head node (GCS, dashboard, job server)."""

    @property
    def resource_name(self) -> str:
        """The custom resource that pins a task to this node, e.g. `node:worker-1`."""
        return f"node:{self.name}"

    def is_running(self) -> bool:
        """Whether the node's `ray start` process still exists (and is not a zombie)."""
        try:
            with open(f"/proc/{self.pid}/stat") as f:
                return f.read().split(") ", 1)[1][0] != "Z"
        except (FileNotFoundError, IndexError, ProcessLookupError):
            return False


@dataclass
class _State:
    """What `state.json` holds, so `down`/`status` work from another process."""

    dir: str
    address: str
    dashboard_url: str | None
    next_worker: int
    nodes: list[LocalNode] = field(default_factory=list)
    auth_mode: str = "token"


class LocalCluster:
    """A head plus `num_workers` worker nodes on this machine, each a separate Ray node.

    Example::

        with LocalCluster(num_workers=2, cpus_per_node=4) as cluster:
            run_driver(cluster.address, "import ray; ray.init(); print(ray.nodes())")
            cluster.remove_node(0)          # worker-1 leaves
            cluster.add_node()              # worker-3 joins

    Args:
        num_workers: worker nodes started besides the head.
        cpus_per_node: logical CPUs of each worker (and of the head unless `head_cpus` is given).
        head_cpus: logical CPUs of the head; 0 keeps tasks off the head.
        include_dashboard: start the dashboard and job server (needed by `ray job submit`).
        object_store_mb: object store size per node in MiB (Ray's minimum is 75).
        dir: directory for Ray's temp files, logs and state.json; a fresh `/tmp/plc-*` if None.
        startup_timeout_s: how long a node may take to start and register (each of its three attempts;
            an attempt whose `ray start` exits fails at once).
        env: extra environment variables for every node process (and so for every task).
        keep_dir: keep `dir` (logs) after `shutdown`.
        auth: keep Ray's token authentication on (the default); False turns it off with a warning,
            as does `RAY_AUTH_MODE=disabled` in this process's environment.
    """

    def __init__(
        self,
        num_workers: int = 2,
        cpus_per_node: int = 4,
        *,
        head_cpus: int | None = None,
        include_dashboard: bool = False,
        object_store_mb: int = 100,
        dir: str | None = None,
        startup_timeout_s: float = 300.0,
        env: dict[str, str] | None = None,
        keep_dir: bool = False,
        auth: bool = True,
    ) -> None:
        if num_workers < 0:
            raise ValueError(f"num_workers is {num_workers}; expected >= 0")
        if cpus_per_node < 0 or (head_cpus is not None and head_cpus < 0):
            raise ValueError(f"cpus_per_node={cpus_per_node}, head_cpus={head_cpus}; expected >= 0")
        if object_store_mb < 75:
            raise ValueError(f"object_store_mb is {object_store_mb}; expected >= 75 (Ray's minimum)")
        if dir is not None and len(os.path.abspath(dir)) > _MAX_SOCKET_DIR:
            raise ValueError(f"dir {dir!r} is longer than {_MAX_SOCKET_DIR} characters; "
                             "Ray's Unix socket paths below it would exceed the OS limit")
        self.num_workers = num_workers
        self.cpus_per_node = cpus_per_node
        self.head_cpus = cpus_per_node if head_cpus is None else head_cpus
        self.include_dashboard = include_dashboard
        self.object_store_mb = object_store_mb
        self.startup_timeout_s = startup_timeout_s
        self.env = dict(env or {})
        self.keep_dir = keep_dir
        self.auth = auth
        self.auth_env: dict[str, str] = {}
        """`RAY_AUTH_MODE` of the nodes (set by `start`); drivers must use the same."""
        self._requested_dir = dir
        self.dir: str | None = None
        self.address: str | None = None
        """GCS address `ip:port` (for `ray.init(address=...)` and `ray start --address`)."""
        self.dashboard_url: str | None = None
        """`http://127.0.0.1:<port>` of the dashboard / job server, if `include_dashboard`."""
        self.nodes: list[LocalNode] = []
        self._procs: dict[str, subprocess.Popen] = {}
        self._log_start: dict[str, int] = {}
        self._next_worker = 1

    # ------------------------------------------------------------------ lifecycle
    def start(self) -> LocalCluster:
        """Start the head and the worker nodes; return when every node is registered and alive."""
        if self.nodes:
            raise RuntimeError(f"cluster in {self.dir} is already started")
        if self._requested_dir is None:
            self.dir = tempfile.mkdtemp(prefix="plc-", dir="/tmp")
        else:
            self.dir = os.path.abspath(self._requested_dir)
            if os.path.exists(os.path.join(self.dir, "state.json")):
                raise RuntimeError(f"{self.dir} already holds a cluster (state.json); "
                                   "run `python -m cluster.local_cluster down` first")
            os.makedirs(self.dir, exist_ok=True)
        os.makedirs(os.path.join(self.dir, "logs"), exist_ok=True)
        # This process talks to the GCS too (node_table): it needs the nodes' mode.
        self.auth_env = auth.use_in_this_process(no_auth_flag=not self.auth)
        atexit.register(self._stop_at_exit)  # nodes are in their own sessions: never leak them
        try:
            self._start_head()
            if self.num_workers:
                self.add_nodes(self.num_workers)
        except BaseException:
            self.shutdown()
            raise
        return self

    def __enter__(self) -> LocalCluster:
        return self.start() if not self.nodes else self

    def __exit__(self, *exc: object) -> None:
        self.shutdown()

    def shutdown(self) -> None:
        """Stop every node (workers first, then the head) and remove what the cluster wrote to `dir`."""
        for node in [n for n in self.nodes if not n.is_head] + [n for n in self.nodes if n.is_head]:
            self._stop_node(node, graceful=True)
        self.nodes.clear()
        atexit.unregister(self._stop_at_exit)
        if not self.dir:
            return
        # Remove only what the cluster wrote: `dir` may be a user-chosen directory.
        owned = ["state.json", "state.json.tmp"] + ([] if self.keep_dir else ["ray", "logs"])
        for name in owned:
            path = os.path.join(self.dir, name)
            if os.path.isdir(path):
                shutil.rmtree(path, ignore_errors=True)
            elif os.path.exists(path):
                os.remove(path)
        if not self.keep_dir and os.path.isdir(self.dir) and not os.listdir(self.dir):
            os.rmdir(self.dir)

    def detach(self) -> None:
        """Let the nodes outlive this process (the CLI's `up`); `attach(dir).shutdown()` stops them."""
        self._procs.clear()
        atexit.unregister(self._stop_at_exit)

    def _stop_at_exit(self) -> None:
        if self.nodes:
            self.shutdown()

    # ------------------------------------------------------------------ nodes
    @property
    def head(self) -> LocalNode:
        """The head node."""
        for node in self.nodes:
            if node.is_head:
                return node
        raise RuntimeError("cluster has no head node (not started or shut down)")

    @property
    def workers(self) -> list[LocalNode]:
        """Worker nodes in the order they joined."""
        return [n for n in self.nodes if not n.is_head]

    def add_node(self, num_cpus: int | None = None, resources: dict[str, float] | None = None) -> LocalNode:
        """Start one more worker node (`worker-<k>`) and wait until it is registered."""
        return self.add_nodes(1, num_cpus=num_cpus, resources=resources)[0]

    def add_nodes(self, count: int, num_cpus: int | None = None,
                  resources: dict[str, float] | None = None) -> list[LocalNode]:
        """Start `count` worker nodes one after the other and wait until each is registered.

        Sequential on purpose: on a 2-core machine parallel boots push a raylet past Ray's fixed
        30 s registration wait. A node that fails to boot (a loaded machine) is retried twice.
        """
        if self.address is None:
            raise RuntimeError("start the cluster before adding nodes")
        new = []
        for _ in range(count):
            name = f"worker-{self._next_worker}"
            self._next_worker += 1
            cpus = self.cpus_per_node if num_cpus is None else num_cpus
            for attempt in range(_BOOT_ATTEMPTS):
                # One log monitor per machine (the head's) already tails every node's worker logs.
                args = ["--address", self.address, "--dashboard-agent-listen-port", str(free_port()),
                        "--include-log-monitor", "false"]
                node = self._launch(name, cpus, resources, args, is_head=False)
                try:
                    self._wait_started(node)
                    self._wait_registered([node])
                    break
                except (RuntimeError, TimeoutError) as e:
                    self._discard_attempt(node, attempt, e)
            new.append(node)
            self._save()
        return new

    def remove_node(self, node: int | str | LocalNode, graceful: bool = True,
                    wait_s: float = 30.0) -> LocalNode:
        """Take a worker node out of the cluster, like a machine leaving.

        Args:
            node: index into `workers`, a node name (`"worker-1"`) or the node itself.
            graceful: SIGTERM (the node deregisters at once) if True; SIGKILL of all its processes
                (a crash: the GCS notices after its health-check timeout) if False.
            wait_s: how long to wait for the GCS to mark the node dead (0: do not wait).
        """
        target = self._resolve(node)
        if target.is_head:
            raise ValueError("cannot remove the head node; use shutdown()")
        node_id = self._node_ids().get(target.name)
        self._stop_node(target, graceful=graceful)
        self.nodes.remove(target)
        self._save()
        if wait_s and node_id:
            deadline = time.monotonic() + wait_s
            while time.monotonic() < deadline:
                if not any(n["node_id"] == node_id and n["alive"] for n in self.node_table()):
                    break
                time.sleep(0.3)
            else:
                raise TimeoutError(f"GCS still lists {target.name} ({node_id}) alive after {wait_s}s")
        return target

    def node_table(self) -> list[dict[str, Any]]:
        """Every node the GCS knows: `{name, node_id, alive, address, resources}` (dead ones too)."""
        import ray._raylet

        client = ray._raylet.GcsClient(address=self.address)
        rows = []
        for node_id, info in client.get_all_node_info(timeout=10).items():
            resources = dict(info.resources_total)
            names = [m.group(1) for m in map(_NODE_RESOURCE.match, resources) if m]
            rows.append({
                "name": names[0] if names else None,
                "node_id": node_id.hex() if hasattr(node_id, "hex") else str(node_id),
                "alive": info.state == 0,  # GcsNodeInfo.ALIVE
                "address": info.node_manager_address,
                "resources": {k: v for k, v in resources.items() if not k.startswith("node:__")},
            })
        return rows

    def wait_for_nodes(self, count: int, timeout_s: float = 60.0) -> None:
        """Block until exactly `count` nodes are alive according to the GCS."""
        deadline = time.monotonic() + timeout_s
        alive = -1
        while time.monotonic() < deadline:
            alive = sum(n["alive"] for n in self.node_table())
            if alive == count:
                return
            time.sleep(0.3)
        raise TimeoutError(f"{alive} nodes alive after {timeout_s}s; expected {count}")

    # ------------------------------------------------------------------ CLI state
    @classmethod
    def attach(cls, dir: str = DEFAULT_DIR) -> LocalCluster:
        """Rebuild a handle on a cluster started by another process (from `<dir>/state.json`)."""
        path = os.path.join(dir, "state.json")
        if not os.path.exists(path):
            raise FileNotFoundError(f"no local cluster in {dir} ({path} is missing); start one with `up`")
        raw = json.loads(Path(path).read_text())
        nodes = [LocalNode(**n) for n in raw.pop("nodes")]
        state = _State(nodes=nodes, **raw)
        cluster = cls(num_workers=len(nodes) - 1, dir=state.dir, keep_dir=False, auth=state.auth_mode != "disabled")
        cluster.auth_env = {auth.MODE_ENV: state.auth_mode}
        os.environ.update(cluster.auth_env)  # node_table() talks to the GCS from this process
        cluster.dir, cluster.address, cluster.dashboard_url = state.dir, state.address, state.dashboard_url
        cluster.include_dashboard = state.dashboard_url is not None
        cluster.nodes, cluster._next_worker = nodes, state.next_worker
        return cluster

    def _save(self) -> None:
        state = _State(self.dir, self.address, self.dashboard_url, self._next_worker, self.nodes,
                       self.auth_env.get(auth.MODE_ENV, "token"))
        tmp = os.path.join(self.dir, "state.json.tmp")
        Path(tmp).write_text(json.dumps(asdict(state), indent=1))
        os.replace(tmp, os.path.join(self.dir, "state.json"))

    # ------------------------------------------------------------------ internals
    def _start_head(self) -> None:
        for attempt in range(_BOOT_ATTEMPTS):
            port, dash_port = free_port(), free_port()
            args = [
                "--head", "--port", str(port), "--temp-dir", os.path.join(self.dir, "ray"),
                "--include-dashboard", "true" if self.include_dashboard else "false",
                "--dashboard-host", "127.0.0.1", "--dashboard-port", str(dash_port),
                "--ray-client-server-port", str(free_port()),
                "--dashboard-agent-listen-port", str(free_port()),
            ]
            address_file = os.path.join(self.dir, "ray", "ray_current_cluster")
            if os.path.exists(address_file):  # a failed attempt's address must never be read as this one's
                os.remove(address_file)
            head = self._launch("head", self.head_cpus, None, args, is_head=True)
            try:
                self._wait_started(head)
                self.address = Path(address_file).read_text().strip()
                self._wait_registered([head])
                if self.include_dashboard:
                    self._wait_http(f"http://127.0.0.1:{dash_port}/api/version", head)
                break
            except (RuntimeError, TimeoutError, FileNotFoundError) as e:
                self.address = None
                self._discard_attempt(head, attempt, e)
        if self.include_dashboard:
            self.dashboard_url = f"http://127.0.0.1:{dash_port}"
        self._save()

    def _launch(self, name: str, num_cpus: int, resources: dict[str, float] | None,
                extra: list[str], is_head: bool) -> LocalNode:
        res = {f"node:{name}": 1.0, **(resources or {})}
        log_path = os.path.join(self.dir, "logs", f"{name}.out")
        cmd = self._node_command(num_cpus, res, extra)
        env = {**os.environ, **BASE_ENV, **self.auth_env, **self.env, "RAY_TMPDIR": self.dir,
               MARKER_ENV: self._marker(name)}
        env.pop("RAY_ADDRESS", None)  # a worker joins the address given on its command line only
        # The log is appended to across retries of a node: remember where this launch's output starts,
        # so a retry never mistakes the previous attempt's "Ray runtime started." for its own.
        self._log_start[name] = os.path.getsize(log_path) if os.path.exists(log_path) else 0
        with open(log_path, "ab") as log:
            proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                    env=env, start_new_session=True)
        self._procs[name] = proc
        node = LocalNode(name=name, pid=proc.pid, num_cpus=num_cpus, resources=res,
                         log_path=log_path, is_head=is_head)
        self.nodes.append(node)
        return node

    def _discard_attempt(self, node: LocalNode, attempt: int, error: Exception) -> None:
        """Kill a node whose boot failed and forget it; re-raise `error` after the last attempt."""
        self._stop_node(node, graceful=False)
        self.nodes.remove(node)
        if attempt == _BOOT_ATTEMPTS - 1:
            raise error
        print(f"local cluster: {node.name} start attempt {attempt + 1} failed, retrying: {error}", file=sys.stderr)

    def _node_command(self, num_cpus: int, resources: dict[str, float], extra: list[str]) -> list[str]:
        """The `ray start --block` command line of one node."""
        return [
            sys.executable, "-m", "ray.scripts.scripts", "start", "--block", "--disable-usage-stats",
            "--num-cpus", str(num_cpus), "--num-gpus", "0", "--resources", json.dumps(resources),
            "--object-store-memory", str(self.object_store_mb * 1024 * 1024),
            "--min-worker-port", "0", "--max-worker-port", "0",
            "--node-manager-port", "0", "--object-manager-port", "0", *extra,
        ]

    def _marker(self, name: str) -> str:
        return f"{self.dir}:{name}"

    def _launch_log(self, node: LocalNode) -> str:
        """What this launch of `node` has printed so far (not earlier attempts')."""
        with open(node.log_path, "rb") as f:
            f.seek(self._log_start.get(node.name, 0))
            return f.read().decode(errors="replace")

    def _exited(self, node: LocalNode) -> int | None:
        """The exit code of the node's `ray start --block`, or None while it runs."""
        proc = self._procs.get(node.name)
        return proc.poll() if proc is not None else (None if node.is_running() else -1)

    def _fail_if_exited(self, node: LocalNode, before: str) -> None:
        """Raise a RuntimeError (with the diagnosis) if the node's `ray start --block` has exited."""
        code = self._exited(node)
        if code is not None:
            raise RuntimeError(f"node {node.name} exited with code {code} {before}; {self._diagnosis(node)}")

    def _diagnosis(self, node: LocalNode) -> str:
        """The node's `ray start` output and the last lines of the Ray component logs that name an error."""
        parts = [f"log {node.log_path}:\n{tail(self._launch_log(node))}"]
        logs = Path(self.dir or "", "ray", "session_latest", "logs")
        for name in ("gcs_server.err", "gcs_server.out", "raylet.err", "raylet.out", "dashboard.err",
                     "dashboard.log", "monitor.err"):
            path = logs / name
            if not path.is_file():
                continue
            lines = [ln for ln in path.read_text(errors="replace").splitlines()
                     if any(m in ln for m in (" E ", " F ", "ERROR", "Error", "Traceback", "Check failed"))]
            if lines:
                parts.append(f"{path}:\n{tail(chr(10).join(lines), 15)}")
        return "\n".join(parts)

    def _wait_started(self, node: LocalNode) -> None:
        deadline = time.monotonic() + self.startup_timeout_s
        while time.monotonic() < deadline:
            if _STARTED_MARK in self._launch_log(node):
                return
            self._fail_if_exited(node, "while starting")
            time.sleep(0.2)
        raise TimeoutError(f"node {node.name} did not start within {self.startup_timeout_s}s; "
                           f"{self._diagnosis(node)}")

    def _node_ids(self) -> dict[str, str]:
        return {row["name"]: row["node_id"] for row in self.node_table() if row["alive"] and row["name"]}

    def _wait_registered(self, nodes: list[LocalNode]) -> None:
        """Wait until the GCS lists every node alive; fail at once if a node's `ray start --block` exits
        (it does when any of its Ray processes dies, e.g. a dashboard that crashed after start-up)."""
        deadline = time.monotonic() + self.startup_timeout_s
        while time.monotonic() < deadline:
            for node in nodes:  # first: asking a dead GCS blocks for ~40 s
                self._fail_if_exited(node, f"before registering with the GCS at {self.address}")
            try:
                if {n.name for n in nodes} <= set(self._node_ids()):
                    return
            except Exception:  # noqa: BLE001 - the GCS may still be coming up; retry until the deadline
                pass
            time.sleep(0.3)
        raise TimeoutError(f"nodes {[n.name for n in nodes]} did not register with the GCS at {self.address} "
                           f"within {self.startup_timeout_s}s; {self._diagnosis(nodes[0])}")

    def _wait_http(self, url: str, node: LocalNode) -> None:
        deadline = time.monotonic() + self.startup_timeout_s
        last: Exception | None = None
        headers = {}
        if self.auth_env.get(auth.MODE_ENV) == "token":  # the job server checks the token like the GCS
            headers["Authorization"] = f"Bearer {auth.find_token()}"
        while time.monotonic() < deadline:
            try:
                with urllib.request.urlopen(urllib.request.Request(url, headers=headers), timeout=5) as resp:
                    if resp.status == 200:
                        return
            except Exception as e:  # noqa: BLE001 - connection refused until the dashboard binds
                last = e
            self._fail_if_exited(node, f"before {url} answered")
            time.sleep(0.3)
        raise TimeoutError(f"{url} did not answer within {self.startup_timeout_s}s: {last}; "
                           f"{self._diagnosis(node)}")

    def _resolve(self, node: int | str | LocalNode) -> LocalNode:
        if isinstance(node, LocalNode):
            if node not in self.nodes:
                raise ValueError(f"node {node.name} is not part of this cluster")
            return node
        if isinstance(node, int):
            workers = self.workers
            if not -len(workers) <= node < len(workers):
                raise IndexError(f"worker index {node} out of range; cluster has {len(workers)} workers")
            return workers[node]
        for n in self.nodes:
            if n.name == node:
                return n
        raise ValueError(f"unknown node {node!r}; expected one of {[n.name for n in self.nodes]}")

    def _stop_node(self, node: LocalNode, graceful: bool, timeout_s: float = 20.0) -> None:
        """Stop exactly this node's processes: SIGTERM to `ray start` (it stops its children), then
        SIGKILL to whatever still carries the node's marker."""
        proc = self._procs.pop(node.name, None)
        marker = self._marker(node.name)
        if graceful and has_marker(node.pid, marker):
            signal_pid(node.pid, signal.SIGTERM)
            deadline = time.monotonic() + timeout_s
            while time.monotonic() < deadline and node.is_running():
                if proc is not None and proc.poll() is not None:
                    break
                time.sleep(0.1)
        for pid in pids_with_marker(marker):
            signal_pid(pid, signal.SIGKILL)
        if proc is not None:
            try:
                proc.wait(timeout=timeout_s)
            except subprocess.TimeoutExpired:
                pass


def run_driver(address: str, code: str, timeout_s: float = 120.0,
               env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    """Run `python -c code` as a Ray driver of the cluster at `address` (RAY_ADDRESS is set).

    The driver gets `RAY_AUTH_MODE=token` (unless this process has `RAY_AUTH_MODE=disabled`) and
    finds the token as Ray documents; `env` overrides either.

    A separate process, so it works from a test process that already `ray.init`-ed another cluster.
    Raises `RuntimeError` with the output if the driver exits non-zero.
    """
    full_env = {**os.environ, **BASE_ENV, **auth.client_env(), **(env or {}), "RAY_ADDRESS": address}
    res = subprocess.run([sys.executable, "-c", code], env=full_env, capture_output=True, text=True,
                         timeout=timeout_s, cwd=os.getcwd())
    if res.returncode != 0:
        raise RuntimeError(f"driver exited with code {res.returncode}:\n"
                           f"{tail(res.stdout)}\n{tail(res.stderr)}")
    return res
