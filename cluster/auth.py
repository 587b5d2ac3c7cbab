"""Ray token authentication for the Ray clusters this project starts.

Ray's GCS, raylets and workers listen on every interface of the machine, whatever address they
report. Ray (>= 2.52) protects those ports with token authentication: every process of the cluster
and every client must present the same token. This module keeps that protection on for every
cluster the project starts itself (the main job's local Ray, `python -m serve`, the local
multi-node clusters of `cluster.local_cluster`, `jobs.benchmark`, the tests):

- `RAY_AUTH_MODE=token` is set for the cluster's processes;
- the token is found the way Ray documents: `RAY_AUTH_TOKEN`, else the file named by
  `RAY_AUTH_TOKEN_PATH`, else `~/.ray/auth_token`; when there is none, one is generated at
  `~/.ray/auth_token` (mode 0600), as `ray get-auth-token --generate` does.

A user turns it off only explicitly, with `--no-ray-auth` or `RAY_AUTH_MODE=disabled` in their own
environment, and is warned on stderr. Joining an existing cluster (`--ray-address`, `RAY_ADDRESS`,
`ray job submit`) never goes through here: the user's settings pass through unchanged.
"""

from __future__ import annotations

import os
import secrets
import sys
import time
from collections.abc import Mapping
from pathlib import Path

MODE_ENV = "RAY_AUTH_MODE"
TOKEN_ENV = "RAY_AUTH_TOKEN"
TOKEN_PATH_ENV = "RAY_AUTH_TOKEN_PATH"

DISABLED_WARNING = (
    "[pali] WARNING: Ray token authentication is OFF for this cluster ({why}). Ray's ports listen on "
    "every network interface: anyone who can reach this machine can run code on it while the cluster "
    "is up. Drop {how} to keep it on."
)


def default_token_path() -> Path:
    """Where Ray looks for its token when neither `RAY_AUTH_TOKEN` nor `RAY_AUTH_TOKEN_PATH` is set."""
    return Path.home() / ".ray" / "auth_token"


def find_token(env: Mapping[str, str] | None = None) -> str | None:
    """The token Ray would use in an environment like `env` (default: this process's), or None."""
    env = os.environ if env is None else env
    if env.get(TOKEN_ENV, "").strip():
        return env[TOKEN_ENV].strip()
    path = Path(env[TOKEN_PATH_ENV]) if env.get(TOKEN_PATH_ENV) else default_token_path()
    try:
        token = path.read_text().strip()
    except (FileNotFoundError, NotADirectoryError, PermissionError):
        return None
    return token or None


def ensure_token(env: Mapping[str, str] | None = None) -> str:
    """The token of `env` (see `find_token`); generates and saves one at `~/.ray/auth_token` if none.

    An explicit `RAY_AUTH_TOKEN_PATH` that names a missing or empty file is an error (Ray would
    refuse to start), not something to paper over by writing elsewhere.
    """
    env = os.environ if env is None else env
    token = find_token(env)
    if token:
        return token
    if env.get(TOKEN_PATH_ENV):
        raise FileNotFoundError(f"{TOKEN_PATH_ENV}={env[TOKEN_PATH_ENV]!r} names a missing or empty file; "
                                f"write a token there (e.g. `ray get-auth-token --generate`) or unset it")
    path = default_token_path()
    path.parent.mkdir(parents=True, exist_ok=True)
    token = secrets.token_hex(32)  # 256 bits, the format Ray generates
    try:  # O_EXCL: two processes starting clusters at once must agree on one token
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    except FileExistsError:  # another process is writing it: wait for its 64 characters
        for _ in range(100):
            token = find_token(env)
            if token:
                return token
            time.sleep(0.05)
        raise RuntimeError(f"{path} exists but stays empty; remove it or write a token there") from None
    with os.fdopen(fd, "w") as f:
        f.write(token)
    print(f"[pali] generated a Ray authentication token at {path}", file=sys.stderr)
    return token


def disabled_reason(no_auth_flag: bool = False, env: Mapping[str, str] | None = None) -> str | None:
    """Why token authentication is off for a cluster started now (the flag or the user's env), or None."""
    env = os.environ if env is None else env
    if no_auth_flag:
        return "--no-ray-auth"
    if env.get(MODE_ENV, "").strip().lower() == "disabled":
        return f"{MODE_ENV}=disabled in the environment"
    return None


def cluster_env(no_auth_flag: bool = False, env: Mapping[str, str] | None = None) -> dict[str, str]:
    """The auth variables for the processes of a Ray cluster the project starts.

    `{"RAY_AUTH_MODE": "token"}` after making sure a token exists; `{"RAY_AUTH_MODE": "disabled"}`
    (with a warning on stderr) only when the user asked for it (see `disabled_reason`).
    """
    why = disabled_reason(no_auth_flag, env)
    if why:
        how = "--no-ray-auth" if no_auth_flag else f"{MODE_ENV}=disabled"
        print(DISABLED_WARNING.format(why=why, how=how), file=sys.stderr, flush=True)
        return {MODE_ENV: "disabled"}
    ensure_token(env)
    return {MODE_ENV: "token"}


def use_in_this_process(no_auth_flag: bool = False) -> dict[str, str]:
    """Apply `cluster_env` to this process before it starts (`ray.init`) or talks to its own cluster.

    Sets the variables in `os.environ`, so Ray processes spawned from here inherit them, and refreshes
    Ray's cached config in case Ray already read the old mode in this process.
    """
    update = cluster_env(no_auth_flag)
    os.environ.update(update)
    try:
        from ray._raylet import Config

        Config.initialize("")
    except Exception:  # noqa: BLE001 - an older Ray without the cache: the environment is enough
        pass
    return update


def client_env(env: Mapping[str, str] | None = None) -> dict[str, str]:
    """Variables a client process (a driver, `ray job submit`) of a project-started cluster needs.

    Ray reads the token itself (`RAY_AUTH_TOKEN` / `RAY_AUTH_TOKEN_PATH` / `~/.ray/auth_token`), but a
    client connecting to an explicit address enables token mode only if `RAY_AUTH_MODE=token` is set.
    """
    env = os.environ if env is None else env
    if env.get(MODE_ENV, "").strip().lower() == "disabled":
        return {MODE_ENV: "disabled"}
    return {MODE_ENV: "token"}
