"""`ray job submit --working-dir . -- <cmd>` against a local `ray start --head` cluster on loopback.

The lead's end-to-end variant swaps the trivial command for `python -m jobs.pretrain --steps 2 ...`:
    result = submit_job(ray_head, ["python", "-m", "jobs.pretrain", "--steps", "2", ...], working_dir=ROOT)
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from cluster.jobs import submit_job

ROOT = Path(__file__).resolve().parents[2]

JOB = r"""
import importlib.util, os, ray
ray.init()
mark = ray.get(ray.remote(num_cpus=0.1)(lambda: os.environ["PALI_JOB_MARK"]).remote())
cwd = os.path.realpath(os.getcwd())
print("JOB_OK", {
    "uploaded": cwd != os.path.realpath(os.environ["REPO_ROOT"]) and os.path.isfile("pali/config.py"),
    "pali_from_cwd": importlib.util.find_spec("pali").origin.startswith(cwd),
    "cpus": int(ray.cluster_resources()["CPU"]),
    "mark": mark,
})
"""


@pytest.mark.slow
def test_job_runs_from_uploaded_working_dir(ray_head):
    result = submit_job(ray_head, ["python", "-c", JOB], working_dir=str(ROOT), timeout_s=240,
                        env_vars={"PALI_JOB_MARK": "m-42", "REPO_ROOT": str(ROOT)})
    assert result.succeeded, f"{result.status}\n{result.logs}\n{result.cli_output[-3000:]}"
    line = next(line for line in result.logs.splitlines() if line.startswith("JOB_OK"))
    assert line == "JOB_OK " + str({"uploaded": True, "pali_from_cwd": True, "cpus": 8, "mark": "m-42"})
    assert result.job_id in result.cli_output  # the CLI really submitted it


@pytest.mark.slow
def test_failing_job_is_reported(ray_head):
    result = submit_job(ray_head, "python -c 'import sys; print(\"about to fail\"); sys.exit(3)'",
                        working_dir=None, timeout_s=120)
    assert result.status == "FAILED" and not result.succeeded
    assert "about to fail" in result.logs


def test_submit_job_rejects_bad_input(tmp_path):
    with pytest.raises(ValueError, match="not a job server URL"):
        submit_job("127.0.0.1:8265", ["python", "-c", "pass"])
    with pytest.raises(ValueError, match="entrypoint is empty"):
        submit_job("http://127.0.0.1:8265", [])
    with pytest.raises(ValueError, match="is not a directory"):
        submit_job("http://127.0.0.1:8265", "python -c pass", working_dir=os.fspath(tmp_path / "missing"))
