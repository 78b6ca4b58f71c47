"""Child for the re-save kill -9 test: makes step 2 durable, then saves step 2 again.

    resave_child.py ROOT STAGING same|other files|manifest|delete

Prints `durable 2` once step 2 is durable. During the re-save (the same state, or other
content at the same step) it stops right before the first storage write of the named
kind, printing `paused <kind>`, so the parent can SIGKILL it exactly there; a re-save
that never makes such a write prints `resaved` instead.
"""

from __future__ import annotations

import sys
import threading
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np

from trainctl.checkpoint import Checkpointer
from trainctl_core.checkpoints import CheckpointId, LocalCheckpointStorage

ELEMENTS = 1_000_000


class PausingStorage:
    """Local storage that, once armed, hangs before the first write of one kind."""

    def __init__(self, inner: LocalCheckpointStorage, point: str) -> None:
        self.inner, self.point, self.armed = inner, point, False

    def __getattr__(self, name: str) -> Any:
        return getattr(self.inner, name)

    def _maybe_pause(self, kind: str) -> None:
        if self.armed and kind == self.point:
            print(f"paused {kind}", flush=True)
            threading.Event().wait()  # until SIGKILL

    def put_files(
        self, checkpoint: CheckpointId, files: Sequence[tuple[str, str]], cancelled: Callable[[], bool]
    ) -> None:
        self._maybe_pause("files")
        self.inner.put_files(checkpoint, files, cancelled)

    def put_manifest(self, checkpoint: CheckpointId, manifest: bytes) -> None:
        self._maybe_pause("manifest")
        self.inner.put_manifest(checkpoint, manifest)

    def delete(self, checkpoint: CheckpointId) -> None:
        self._maybe_pause("delete")
        self.inner.delete(checkpoint)


def main() -> None:
    root, staging, content, point = sys.argv[1:5]
    storage = PausingStorage(LocalCheckpointStorage(root, "kill"), point)
    ckpt = Checkpointer(storage, job_id="kill", staging_dir=staging, keep=2)  # type: ignore[arg-type]
    for step in (1, 2):
        ckpt.save_now({"step": step, "data": np.full(ELEMENTS, step, dtype=np.float32)}, step)
    print("durable 2", flush=True)
    storage.armed = True
    value = 2.0 if content == "same" else 2.5
    ckpt.save_now({"step": 2, "data": np.full(ELEMENTS, value, dtype=np.float32)}, 2)
    print("resaved", flush=True)
    threading.Event().wait()


if __name__ == "__main__":
    main()
