"""The HAProxy launcher binds the stats page and the Prometheus exporter to loopback, nothing else."""

from __future__ import annotations

import os
import subprocess

from serve.haproxy_admin import write_launcher

CONFIG = """global
    maxconn 10
frontend prometheus
    bind :9101
    mode http
frontend http_frontend
    bind 0.0.0.0:8000
listen stats
  bind *:8404
  stats enable
"""


def test_launcher_rewrites_admin_binds_and_execs_the_real_binary(tmp_path):
    cfg = tmp_path / "haproxy.cfg"
    cfg.write_text(CONFIG)
    fake = tmp_path / "fake-haproxy"  # prints its arguments and the config it was handed
    fake.write_text('#!/bin/sh\necho "ARGS $*"\ncat "$3"\n')
    fake.chmod(0o755)
    launcher = write_launcher(str(tmp_path))
    assert write_launcher(str(tmp_path)) == launcher  # idempotent
    out = subprocess.run([launcher, "-db", "-f", str(cfg), "-dR"], env=dict(os.environ, PALI_HAPROXY_BINARY=str(fake)),
                         capture_output=True, text=True, check=True).stdout
    assert f"ARGS -db -f {cfg}.loopback -dR" in out
    assert "bind 127.0.0.1:9101" in out and "bind 127.0.0.1:8404" in out
    assert "bind 0.0.0.0:8000" in out  # the API port stays as Serve configured it (http_options.host)
    env = dict(os.environ, PALI_HAPROXY_BINARY=str(fake), PALI_HAPROXY_ADMIN_HOST="10.0.0.5")
    out = subprocess.run([launcher, "-db", "-f", str(cfg)], env=env, capture_output=True, text=True).stdout
    assert "bind 10.0.0.5:8404" in out


def test_launcher_finds_the_real_binary_even_when_it_is_the_configured_one(tmp_path):
    """Ray sets RAY_SERVE_HAPROXY_BINARY_PATH to the launcher; the wheel's lookup must not loop back to it."""
    launcher = write_launcher(str(tmp_path))
    res = subprocess.run([launcher, "-v"], env=dict(os.environ, RAY_SERVE_HAPROXY_BINARY_PATH=launcher),
                         capture_output=True, text=True, timeout=60)
    assert res.returncode == 0 and "HAProxy version" in res.stdout, res.stderr[-2000:]
