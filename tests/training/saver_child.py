"""Child for the kill -9 test: saves checkpoints as fast as it can, forever."""

from __future__ import annotations

import sys

import numpy as np

from trainctl.checkpoint import Checkpointer
from trainctl_core.checkpoints import LocalCheckpointStorage


def main() -> None:
    root, staging, start = sys.argv[1], sys.argv[2], int(sys.argv[3])
    ckpt = Checkpointer(LocalCheckpointStorage(root, "kill"), job_id="kill", staging_dir=staging, keep=2)
    step = start
    while True:
        step += 1
        # 4 MB whose content is a function of the step: restore can check it exactly.
        ckpt.save({"step": step, "data": np.full(1_000_000, step, dtype=np.float32)}, step)
        ckpt.flush()
        print(step, flush=True)


if __name__ == "__main__":
    main()
