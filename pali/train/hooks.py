"""Step hooks: callables every training worker runs before each step, named in `PALI_STEP_HOOKS`.

`PALI_STEP_HOOKS="module:function[,module:function...]"` in the driver's environment reaches the workers
(the trainer hands `PALI_*` variables to them). Each hook is called as `hook(StepInfo)`. The tests use
this to kill a worker or slow the steps down (`pali.testing.faults`); nothing in the training loop
itself knows about faults.
"""

from __future__ import annotations

import importlib
import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

ENV = "PALI_STEP_HOOKS"


@dataclass(frozen=True)
class StepInfo:
    """What a hook sees: the step about to run (0-based), this worker's rank, the world size, and the
    run's output directory (local, or the worker's staging directory when the output is on object storage)."""

    step: int
    rank: int
    world: int
    output_dir: Path


def load_step_hooks(spec: str | None = None) -> list[Callable[[StepInfo], None]]:
    """The hooks named in `spec` (default: the `PALI_STEP_HOOKS` environment variable)."""
    spec = os.environ.get(ENV, "") if spec is None else spec
    hooks = []
    for item in filter(None, (s.strip() for s in spec.split(","))):
        module, sep, name = item.partition(":")
        if not sep or not module or not name:
            raise ValueError(f"{ENV} entry {item!r} must be 'module:function'")
        fn = getattr(importlib.import_module(module), name, None)
        if not callable(fn):
            raise ValueError(f"{ENV} entry {item!r}: {module} has no callable {name!r}")
        hooks.append(fn)
    return hooks
