"""Submit a command as a Ray job, exactly as a user would: `ray job submit --working-dir . -- <cmd>`.

`submit_job` runs the real `ray job submit` CLI (so the working directory is packaged and uploaded
the same way), waits for the job to finish, then asks the job server for the final status and the
driver's complete logs. It works against any Ray cluster with a dashboard / job server: a local
`ray start --head --include-dashboard true`, a `LocalCluster(include_dashboard=True)`, a cloud
cluster behind `ray dashboard ray-cluster.yaml`, or a KubeRay head service.
"""

from __future__ import annotations

import json
import os
import shlex
import subprocess
import sys
import uuid
from collections.abc import Sequence
from dataclasses import dataclass

DEFAULT_EXCLUDES = (".git", "**/__pycache__", "*.egg-info", ".pytest_cache", ".ruff_cache")
"""Paths never uploaded with the working directory (Ray also honours .gitignore files)."""
TERMINAL = ("SUCCEEDED", "FAILED", "STOPPED")
"""Job statuses after which a job no longer changes."""


@dataclass
class JobResult:
    """Outcome of one submitted job."""

    job_id: str
    """Submission id (`pali-<hex>` unless one was given)."""
    status: str
    """Final job status from the job server: SUCCEEDED, FAILED, STOPPED (or PENDING/RUNNING on timeout)."""
    logs: str
    """The driver's full stdout/stderr as kept by the job server."""
    cli_output: str
    """What `ray job submit` printed (submission messages and tailed logs)."""
    timed_out: bool = False
    """Whether `timeout_s` passed and the job was asked to stop."""

    @property
    def succeeded(self) -> bool:
        """Whether the job finished with status SUCCEEDED."""
        return self.status == "SUCCEEDED"


def submit_job(
    address: str,
    entrypoint: str | Sequence[str],
    working_dir: str | None = ".",
    timeout_s: float = 600.0,
    env_vars: dict[str, str] | None = None,
    excludes: Sequence[str] = DEFAULT_EXCLUDES,
    submission_id: str | None = None,
    extra_args: Sequence[str] = (),
) -> JobResult:
    """Submit `entrypoint` with `ray job submit` and wait for it to finish.

    Args:
        address: job server URL, e.g. `http://127.0.0.1:8265` (the dashboard address).
        entrypoint: the command, as a list of arguments or one shell-like string
            (e.g. `"python -m jobs.pretrain --steps 2"`).
        working_dir: directory uploaded as the job's working directory (None: no upload).
        timeout_s: wall-clock limit; past it the job is stopped and `timed_out` is set.
        env_vars: environment variables for the job's driver and every task/actor it starts.
        excludes: runtime-env `excludes` patterns for the upload.
        submission_id: the job id to use (default: a fresh `pali-<hex>`).
        extra_args: more `ray job submit` options, e.g. `["--entrypoint-num-cpus", "1"]`.

    Returns:
        A `JobResult`; a failed job is reported through `status`, not raised.
    """
    from ray.job_submission import JobSubmissionClient

    if not address.startswith(("http://", "https://")):
        raise ValueError(f"address {address!r} is not a job server URL; expected http://host:port "
                         "(the dashboard address, default port 8265)")
    args = shlex.split(entrypoint) if isinstance(entrypoint, str) else list(entrypoint)
    if not args:
        raise ValueError("entrypoint is empty; expected a command such as ['python', '-m', 'jobs.pretrain']")
    if working_dir is not None and not os.path.isdir(working_dir):
        raise ValueError(f"working_dir {working_dir!r} is not a directory")
    job_id = submission_id or f"pali-{uuid.uuid4().hex[:12]}"
    runtime_env: dict = {"excludes": list(excludes)}
    if env_vars:
        runtime_env["env_vars"] = dict(env_vars)
    cmd = [sys.executable, "-m", "ray.scripts.scripts", "job", "submit", "--address", address,
           "--submission-id", job_id, "--runtime-env-json", json.dumps(runtime_env), *extra_args]
    if working_dir is not None:
        cmd += ["--working-dir", working_dir]
    cmd += ["--", *args]

    timed_out = False
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout_s,
                              stdin=subprocess.DEVNULL)
        cli_output = proc.stdout + proc.stderr
    except subprocess.TimeoutExpired as e:
        timed_out = True
        cli_output = _text(e.stdout) + _text(e.stderr)

    client = JobSubmissionClient(address)
    try:
        info = client.get_job_info(job_id)
    except RuntimeError as e:  # the submission itself failed (bad address, upload error, ...)
        raise RuntimeError(f"job {job_id} was not accepted by {address}: {e}\n{cli_output[-4000:]}") from e
    if timed_out and str(info.status) not in TERMINAL:
        client.stop_job(job_id)
    status = client.get_job_status(job_id)
    return JobResult(job_id=job_id, status=getattr(status, "value", str(status)),
                     logs=client.get_job_logs(job_id), cli_output=cli_output, timed_out=timed_out)


def _text(data: bytes | str | None) -> str:
    if data is None:
        return ""
    return data.decode(errors="replace") if isinstance(data, bytes) else data
