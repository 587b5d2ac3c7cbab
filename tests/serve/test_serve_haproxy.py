"""The HAProxy ingress (Ray Serve's throughput-optimised mode) end to end over real HTTP.

The ingress is fixed when Ray starts, so this runs the load test script in its own process and Ray
session: batching on and off behind HAProxy, every request answered, batches formed, API on loopback.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]


@pytest.mark.slow
def test_haproxy_ingress_serves_batched_and_unbatched(tmp_path):
    out = tmp_path / "load.json"
    env = dict(os.environ, RAY_SERVE_PROXY_READY_CHECK_TIMEOUT_S="60")  # token auth stays on (conftest)
    proc = subprocess.run([sys.executable, "-m", "pali.bench.serve_load", "--ingress", "haproxy",
                           "--duration", "2", "--concurrency", "16", "--torch-threads", "1", "--out", str(out)],
                          cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    res = json.loads(out.read_text())
    assert res["ingress"] == "haproxy"
    runs = {r["mode"]: r for r in res["runs"]}
    for mode, run in runs.items():
        assert run["requests"] > 0 and run["errors"] == 0, (mode, run)
    assert max(int(k) for k in runs["batching_on"]["batch_sizes"]) > 1  # requests met in one batch
    assert set(runs["batching_off"]["batch_sizes"]) == {"1"}
    assert "haproxy" in runs["batching_on"]["ingress_processes"]  # HAProxy really took the HTTP port
    # The API port (http_options.host 127.0.0.1), the stats page and the Prometheus exporter: all loopback.
    listeners = runs["batching_on"]["ingress_listeners"]
    assert len(listeners) >= 3 and all(a.startswith("127.0.0.1:") for a in listeners), listeners
