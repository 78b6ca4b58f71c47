"""Child for the kill -9 tests: saves checkpoints as fast as it can, forever.

    saver_child.py ROOT STAGING START            # local directory storage under ROOT
    saver_child.py ROOT STAGING START BUCKET     # S3 (AWS_ENDPOINT_URL, e.g. a moto server)

Prints each step once it is durable, so the parent knows a lower bound of what a restore
must find. With S3, parts are 5 MiB so every save is a real multipart upload that a
kill can interrupt between parts.
"""

from __future__ import annotations

import sys

import numpy as np

from trainctl.checkpoint import Checkpointer
from trainctl_core.checkpoints import CheckpointStorage, LocalCheckpointStorage, S3CheckpointStorage

ELEMENTS = 1_000_000  # 4 MB of float32 per save (local)
S3_ELEMENTS = 3_000_000  # 12 MB: three 5 MiB parts


def main() -> None:
    root, staging, start = sys.argv[1], sys.argv[2], int(sys.argv[3])
    bucket = sys.argv[4] if len(sys.argv) > 4 else None
    storage: CheckpointStorage
    elements = ELEMENTS
    if bucket:
        import boto3
        from s3transfer.manager import TransferConfig

        part = 5 * 1024 * 1024
        storage = S3CheckpointStorage(
            boto3.client("s3"),
            bucket,
            "kill",
            transfer_config=TransferConfig(multipart_threshold=part, multipart_chunksize=part),
        )
        elements = S3_ELEMENTS
    else:
        storage = LocalCheckpointStorage(root, "kill")
    ckpt = Checkpointer(storage, job_id="kill", staging_dir=staging, keep=2)
    step = start
    while True:
        step += 1
        # Content is a function of the step: restore can check it exactly.
        ckpt.save({"step": step, "data": np.full(elements, step, dtype=np.float32)}, step)
        ckpt.flush()
        print(step, flush=True)


if __name__ == "__main__":
    main()
