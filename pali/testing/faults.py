"""Step hooks (`pali.train.hooks`) that inject faults into a training run, for the tests.

Configured by environment variables the trainer hands to its workers:
- `pali.testing.faults:exit_once`: the worker of rank `PALI_FAULT_RANK` (default 1, or 0 in a world of
  one) exits abruptly before step `PALI_FAULT_STEP` (0-based), once per output directory: the marker
  `<output_dir>/.injected_failure` keeps the restarted group from failing again.
- `pali.testing.faults:slow_steps`: every step sleeps `PALI_STEP_DELAY_S` seconds first (to give a test
  time to act while a run is in flight).
"""

from __future__ import annotations

import os
import time

from pali.train.hooks import StepInfo

MARKER = ".injected_failure"


def exit_once(info: StepInfo) -> None:
    step = int(os.environ["PALI_FAULT_STEP"])
    rank = int(os.environ.get("PALI_FAULT_RANK", min(1, info.world - 1)))
    if info.step != step or info.rank != rank:
        return
    from pathlib import Path

    marker = Path(os.environ.get("PALI_FAULT_MARKER") or info.output_dir / MARKER)
    if marker.exists():
        return
    marker.parent.mkdir(parents=True, exist_ok=True)
    marker.write_text(f"rank {info.rank} killed at step {info.step}\n")
    print(f"[pali] injected failure: rank {info.rank} exits at step {info.step}", flush=True)
    os._exit(1)


def slow_steps(info: StepInfo) -> None:
    time.sleep(float(os.environ.get("PALI_STEP_DELAY_S", "0")))
