"""The run's output files on the workers: metrics.jsonl, events.log, TensorBoard and the loss plot.

Global rank 0 writes them. With a local (or NFS) `output_dir` it writes there directly. With an object
storage `output_dir` (`s3://...`) it writes into a local staging directory and copies it to the URI at
every checkpoint and at the end, so the files on the storage always cover the run up to its latest
checkpoint; a restarted worker (on any node) first copies back what the storage holds and appends.
"""

from __future__ import annotations

import shutil
import tempfile
from pathlib import Path

from pali import storage

CARRIED = ("metrics.jsonl", "events.log")
"""Files a restarted rank 0 appends to, copied back from object storage first."""


class RunOutputs:
    """Where this worker writes the run's files (`local`), and their copy to object storage (`sync`)."""

    def __init__(self, output_dir: str, rank: int):
        self.uri = output_dir if storage.is_uri(output_dir) else None
        self.rank = rank
        if self.uri is None:
            self.local = Path(output_dir)
            return
        self.local = Path(tempfile.mkdtemp(prefix="pali-outputs-"))
        if rank == 0:
            for name in CARRIED:
                src = storage.join(self.uri, name)
                if storage.exists(src):
                    (self.local / name).write_bytes(storage.read_bytes(src))

    def sync(self) -> None:
        """Copy rank 0's files to the object-storage output (a no-op for local outputs and other ranks)."""
        if self.uri is not None and self.rank == 0:
            storage.upload_dir(self.local, self.uri)

    def close(self) -> None:
        """Final copy, then drop the staging directory."""
        self.sync()
        if self.uri is not None:
            shutil.rmtree(self.local, ignore_errors=True)
