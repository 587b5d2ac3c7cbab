"""The Ray clusters the project starts keep Ray's token authentication on.

Ray's GCS, raylets and workers listen on every interface, so whoever reaches the machine could run code
on a cluster without a token. Here the project's real commands run as a new user would start them (a
fresh HOME, no auth variables): the main job's local Ray (`python -m jobs.pretrain`), `python -m serve`'s
Ray, and a `cluster.local_cluster` multi-node cluster. While they are up, separate processes without the
token, with `RAY_AUTH_MODE` unset and with `RAY_AUTH_MODE=disabled` on their side, try to run a task
there and are refused for want of a token; the same probe holding the token runs it.
"""

from __future__ import annotations

import json
import os
import signal
import stat
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest

from cluster import auth
from cluster.local_cluster import LocalCluster

ROOT = Path(__file__).resolve().parents[2]
pytestmark = pytest.mark.slow

PROBE = """
import sys, ray
ray.init(address=sys.argv[1], log_to_driver=False)
@ray.remote(num_cpus=0)
def f():
    return 41 + 1
print("RAN", ray.get(f.remote(), timeout=60), flush=True)
"""


def _quiet_port() -> int:
    """A free port outside the kernel's ephemeral range (where the Ray instances starting beside the server
    take theirs by binding port 0) and above Ray's worker ports (10002-19999), so nothing takes it between
    this pick and the server's bind."""
    import random
    import socket

    for port in random.sample(range(20000, 32000), 200):
        with socket.socket() as s:
            try:
                s.bind(("127.0.0.1", port))
            except OSError:
                continue
            return port
    raise RuntimeError("no free port in 20000-31999")


def _user_env(home: Path, tmpdir: str | None = None, **extra: str) -> dict[str, str]:
    """This process's environment as a new user's: own HOME, no Ray auth variables, no RAY_ADDRESS."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("RAY_AUTH", "RAY_ADDRESS"))}
    env.update(HOME=str(home), OMP_NUM_THREADS="1", **extra)
    if tmpdir:
        env["RAY_TMPDIR"] = tmpdir
    return env


def _probe(address: str, home: Path, mode: str | None) -> subprocess.Popen:
    env = _user_env(home)
    if mode:
        env["RAY_AUTH_MODE"] = mode
    return subprocess.Popen([sys.executable, "-c", PROBE, address], env=env, cwd=tempfile.gettempdir(),
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def _gcs_address(ray_tmpdir: str, timeout_s: float, proc: subprocess.Popen, log: Path) -> str:
    """`ip:port` of the GCS of the Ray instance whose temp dir is `ray_tmpdir` (its session files)."""
    import ray

    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        ports = list(Path(ray_tmpdir, "ray", "session_latest").glob("gcs_server_port_*"))
        if ports and ports[0].read_text().strip():
            return f"{ray.util.get_node_ip_address()}:{int(ports[0].read_text())}"
        assert proc.poll() is None, f"exited with {proc.returncode}:\n{log.read_text()[-3000:]}"
        time.sleep(0.5)
    raise AssertionError(f"no GCS port under {ray_tmpdir} after {timeout_s}s:\n{log.read_text()[-3000:]}")


def _wait(pred, timeout_s: float, what: str, proc: subprocess.Popen, log: Path) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if pred():
            return
        assert proc.poll() is None, f"exited with {proc.returncode} waiting for {what}:\n{log.read_text()[-3000:]}"
        time.sleep(0.5)
    raise AssertionError(f"timed out waiting for {what}:\n{log.read_text()[-3000:]}")


def _http_ok(url: str) -> bool:
    try:
        with urllib.request.urlopen(url, timeout=5) as resp:
            return resp.status == 200
    except Exception:  # noqa: BLE001 - not up yet
        return False


def _stop(proc: subprocess.Popen) -> None:
    if proc.poll() is None:
        proc.send_signal(signal.SIGINT)
        try:
            proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def test_project_clusters_refuse_processes_without_the_token(tmp_path):
    from pali.data.synthetic import write_synthetic_shards

    shards = tmp_path / "shards"
    write_synthetic_shards(str(shards / "train"), num_examples=64, seed=0, examples_per_shard=32)
    write_synthetic_shards(str(shards / "val"), num_examples=32, seed=1, examples_per_shard=32)
    from pali.bench.serve_load import tiny_checkpoint

    ckpt = tiny_checkpoint(tmp_path / "ckpt")
    stranger = tmp_path / "stranger"  # a HOME without ~/.ray/auth_token
    stranger.mkdir()

    # The main job on its local Ray, as a new user starts it: no auth settings at all.
    job_home, job_tmp = tmp_path / "job-home", tempfile.mkdtemp(prefix="pa-", dir="/tmp")
    job_home.mkdir()
    job_log = tmp_path / "job.log"
    job = subprocess.Popen(
        [sys.executable, "-m", "jobs.pretrain", "--data", str(shards / "train"), "--eval-data", str(shards / "val"),
         "--steps", "400", "--global-batch", "4", "--micro-batch", "2", "--workers", "1",
         "--vision-pretrain-steps", "0", "--log-every", "1", "--checkpoint-every", "1000", "--no-eval",
         "--num-cpus", "4", "--output-dir", str(tmp_path / "out")],
        cwd=ROOT, env={**_user_env(job_home, job_tmp), "PALI_STEP_HOOKS": "pali.testing.faults:slow_steps",
                       "PALI_STEP_DELAY_S": "0.5"}, stdout=open(job_log, "w"), stderr=subprocess.STDOUT)
    # `python -m serve` on its own local Ray, likewise.
    serve_home, serve_tmp = tmp_path / "serve-home", tempfile.mkdtemp(prefix="ps-", dir="/tmp")
    serve_home.mkdir()
    serve_log, port = tmp_path / "serve.log", _quiet_port()
    server = subprocess.Popen(
        [sys.executable, "-m", "serve", "--checkpoint", str(ckpt), "--port", str(port), "--num-replicas", "1",
         "--torch-threads", "1"],
        cwd=ROOT, env=_user_env(serve_home, serve_tmp, RAY_SERVE_PROXY_READY_CHECK_TIMEOUT_S="60"),
        stdout=open(serve_log, "w"), stderr=subprocess.STDOUT)
    cluster = None
    probes: dict[str, subprocess.Popen] = {}
    try:
        # A local multi-node cluster (its own ports and temp dir), started from this process.
        cluster = LocalCluster(num_workers=1, cpus_per_node=1, head_cpus=1, include_dashboard=True).start()
        assert cluster.auth_env == {"RAY_AUTH_MODE": "token"}
        # Its job server (what `ray job submit` talks to) wants the token too.
        with pytest.raises(urllib.error.HTTPError, match="401"):
            urllib.request.urlopen(f"{cluster.dashboard_url}/api/jobs/", timeout=10)
        job_address = _gcs_address(job_tmp, 240, job, job_log)
        serve_address = _gcs_address(serve_tmp, 240, server, serve_log)
        # The clusters' own processes work with auth on: the job trains, the server answers.
        metrics = tmp_path / "out" / "metrics.jsonl"
        _wait(lambda: metrics.exists() and metrics.read_text().count("\n") >= 2, 300, "two training steps",
              job, job_log)
        _wait(lambda: _http_ok(f"http://127.0.0.1:{port}/v1/models"), 300, "the HTTP API", server, serve_log)

        targets = {"job": (job_address, job_home), "serve": (serve_address, serve_home),
                   "local_cluster": (cluster.address, Path.home())}
        out = {}
        for name, (address, home) in targets.items():  # one cluster's probes at a time: 2 cores run it all
            probes[f"{name}/no token"] = _probe(address, stranger, None)
            probes[f"{name}/no token, disabled"] = _probe(address, stranger, "disabled")
            if name != "local_cluster":  # (drivers holding the token: every other local-cluster test)
                probes[f"{name}/token"] = _probe(address, home, "token")
            for key, proc in probes.items():
                if key not in out:
                    text, _ = proc.communicate(timeout=300)
                    out[key] = (proc.returncode, text)
        for key, (rc, text) in out.items():
            if key.endswith("/token"):
                assert rc == 0 and "RAN 42" in text, f"{key}: the token holder must run a task:\n{text[-2000:]}"
            else:
                assert rc != 0 and "RAN" not in text, f"{key}: a process without the token ran a task:\n{text}"
                # Refused for want of a token (not, say, an unreachable address).
                assert "InvalidAuthToken" in text or "Unauthenticated" in text, f"{key}:\n{text[-2000:]}"
        # The tokens were generated where Ray looks for them, readable by their owner only.
        for home in (job_home, serve_home):
            token = home / ".ray" / "auth_token"
            assert token.is_file() and stat.S_IMODE(token.stat().st_mode) == 0o600, token
        assert "Token authentication is OFF" not in job_log.read_text() + serve_log.read_text()
    finally:
        for proc in probes.values():
            if proc.poll() is None:
                proc.kill()
        _stop(job)
        _stop(server)
        if cluster is not None:
            cluster.shutdown()
    assert json.loads(metrics.read_text().splitlines()[0])["step"] >= 1


def test_turning_auth_off_takes_an_explicit_request_and_warns(capsys, monkeypatch, tmp_path):
    monkeypatch.setenv("HOME", str(tmp_path))
    for var in (auth.MODE_ENV, auth.TOKEN_ENV, auth.TOKEN_PATH_ENV):
        monkeypatch.delenv(var, raising=False)
    assert auth.cluster_env() == {"RAY_AUTH_MODE": "token"}  # no request: on, with a generated token
    token_file = tmp_path / ".ray" / "auth_token"
    token = token_file.read_text()
    assert len(token) == 64 and stat.S_IMODE(token_file.stat().st_mode) == 0o600
    assert auth.cluster_env() == {"RAY_AUTH_MODE": "token"} and token_file.read_text() == token  # reused
    assert "OFF" not in capsys.readouterr().err

    assert auth.cluster_env(no_auth_flag=True) == {"RAY_AUTH_MODE": "disabled"}
    assert "Ray token authentication is OFF for this cluster (--no-ray-auth)" in capsys.readouterr().err
    monkeypatch.setenv(auth.MODE_ENV, "disabled")
    assert auth.cluster_env() == {"RAY_AUTH_MODE": "disabled"}
    assert "RAY_AUTH_MODE=disabled in the environment" in capsys.readouterr().err

    # A token the user provides is used as is; a token path naming no file is an error, not a new token.
    monkeypatch.delenv(auth.MODE_ENV)
    assert auth.find_token({"RAY_AUTH_TOKEN": "abc"}) == "abc"
    with pytest.raises(FileNotFoundError, match="RAY_AUTH_TOKEN_PATH"):
        auth.ensure_token({"RAY_AUTH_TOKEN_PATH": str(tmp_path / "missing")})
