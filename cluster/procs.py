"""Process helpers of the local cluster: free ports and exact, marker-based process signalling.

Every process of a local-cluster node inherits `MARKER_ENV=<dir>:<node>` from its `ray start`; stopping
a node signals exactly the processes that carry its marker (Linux `/proc`), never other Ray users'.
"""

from __future__ import annotations

import os
import socket

MARKER_ENV = "PALI_LOCAL_CLUSTER_NODE"
"""Environment variable inherited by every process of a node; its value is `<dir>:<node name>`."""


def free_port() -> int:
    """Return a TCP port that is free on this machine right now (the OS picks it)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("", 0))
        return s.getsockname()[1]


def signal_pid(pid: int, sig: int) -> None:
    """Send `sig` to `pid`, ignoring a process that is already gone."""
    try:
        os.kill(pid, sig)
    except (ProcessLookupError, PermissionError):
        pass


def has_marker(pid: int, marker: str) -> bool:
    """Whether process `pid` carries `MARKER_ENV=marker` in its environment."""
    try:
        with open(f"/proc/{pid}/environ", "rb") as f:
            return f"{MARKER_ENV}={marker}".encode() in f.read().split(b"\0")
    except OSError:
        return False


def pids_with_marker(marker: str) -> list[int]:
    """Pids of live processes whose environment carries `MARKER_ENV=marker` (Linux /proc)."""
    pids = []
    for entry in os.listdir("/proc"):
        if entry.isdigit() and int(entry) != os.getpid() and has_marker(int(entry), marker):
            pids.append(int(entry))
    return pids


def tail(text: str, lines: int = 30) -> str:
    """The last `lines` lines of `text` (for error messages)."""
    return "\n".join(text.splitlines()[-lines:])
