"""PyTorch Lightning integration (imported lazily; needs `lightning`).

    ckpt = Checkpointer.from_env(framework="lightning", interval_steps=100)
    trainer = L.Trainer(..., callbacks=[TrainctlLightningCallback(ckpt, "lightning-ckpt")])
    trainer.fit(model, ckpt_path=resume_ckpt_path(ckpt))

Checkpoints are Lightning's own `.ckpt` (model, optimizers, schedulers, loops — so resume
continues at the right batch), written when the trainctl interval is due or on the
notice, then uploaded by the Checkpointer; on the notice training stops once durable.
"""

from __future__ import annotations

import os
import shutil
from typing import Any

import lightning.pytorch as pl

from trainctl.checkpoint import FILES_DIR, Checkpointer

CKPT_NAME = "trainctl.ckpt"


class TrainctlLightningCallback(pl.Callback):  # type: ignore[misc]
    def __init__(self, checkpointer: Checkpointer, dirpath: str) -> None:
        self.checkpointer = checkpointer
        self.dirpath = dirpath

    def on_train_batch_end(
        self, trainer: Any, pl_module: Any, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        step = int(trainer.global_step)
        if not self.checkpointer.due(step):
            return
        folder = os.path.join(self.dirpath, f"step-{step:012d}")
        os.makedirs(folder, exist_ok=True)
        trainer.save_checkpoint(os.path.join(folder, CKPT_NAME))
        if trainer.is_global_zero:
            self.checkpointer.save(None, step, directory=folder, extra={"framework": "lightning"})
            # The files are hard-linked into staging: the local folder can go at once.
            shutil.rmtree(folder, ignore_errors=True)
        if self.checkpointer.should_stop():
            trainer.should_stop = True

    def on_train_end(self, trainer: Any, pl_module: Any) -> None:
        self.checkpointer.flush()


def resume_ckpt_path(checkpointer: Checkpointer) -> str | None:
    """A local `.ckpt` for `trainer.fit(..., ckpt_path=...)`, or None (fresh)."""
    restored = checkpointer.restore_checkpoint()
    if restored is None or restored.files_dir is None:
        return None
    path = os.path.join(restored.files_dir, CKPT_NAME)
    return path if os.path.exists(path) else None


__all__ = ["FILES_DIR", "TrainctlLightningCallback", "resume_ckpt_path"]
