"""PyTorch Lightning integration (imported lazily; needs `lightning`).

    ckpt = Checkpointer.from_env(framework="lightning", interval_steps=100)
    loader = ResumableDataLoader(dataset, batch_size=32, seed=0)   # trainctl.integrations.torch
    trainer = L.Trainer(..., callbacks=[TrainctlLightningCallback(ckpt)])
    trainer.fit(model, loader, ckpt_path=resume_ckpt_path(ckpt))

The checkpoint is Lightning's own checkpoint dictionary (`dump_checkpoint`: model,
optimizers, schedulers, precision, callbacks, loops — and, through the loops, the
position of every stateful dataloader), handed to `Checkpointer.save` when the trainctl
interval is due or on the notice. So the stall on the training thread is the snapshot
into the host buffer, not a `torch.save`; writing and uploading run in the background.
On the notice training stops once the checkpoint is durable.

Data position: Lightning resumes a mid-epoch checkpoint at the right batch only with a
dataloader that implements `state_dict`/`load_state_dict`; with a plain DataLoader it
replays the epoch from its first batch (batches already trained on, trained again).
`ResumableDataLoader` implements the protocol.

`resume_ckpt_path` restores the newest verified checkpoint and writes it as a local
`.ckpt` for `trainer.fit(ckpt_path=...)`, Lightning's only entry for restoring loop
state: a once-per-start cost, not a training stall.
"""

from __future__ import annotations

import os
import shutil
from typing import Any

import lightning.pytorch as pl
import torch
from lightning.pytorch.strategies import DDPStrategy, SingleDeviceStrategy

from trainctl.checkpoint import Checkpointer

CKPT_NAME = "trainctl.ckpt"
RESUME_DIR = "lightning-resume"  # under the staging directory, by default
_MARKER = "trainctl-lightning"


class UnsupportedStrategy(TypeError):
    """The strategy shards state across ranks; rank zero's dictionary is not the whole state."""


class NotALightningCheckpoint(ValueError):
    """The restored checkpoint was not written by `TrainctlLightningCallback`."""


class TrainctlLightningCallback(pl.Callback):  # type: ignore[misc]
    def __init__(self, checkpointer: Checkpointer, dirpath: str | None = None) -> None:
        # `dirpath` is accepted for callers of the earlier folder-based version; nothing
        # is written there any more.
        self.checkpointer = checkpointer
        self._last_step: int | None = None

    def setup(self, trainer: Any, pl_module: Any, stage: str) -> None:
        if not isinstance(trainer.strategy, SingleDeviceStrategy | DDPStrategy):
            raise UnsupportedStrategy(
                f"TrainctlLightningCallback supports single-device and DDP training; "
                f"{type(trainer.strategy).__name__} shards the state across ranks"
            )

    def on_train_start(self, trainer: Any, pl_module: Any) -> None:
        # The step training starts (or resumes) at is already checkpointed (or is step 0).
        self._last_step = int(trainer.global_step)
        # Lightning has loaded the resume file by now: it would only hold disk space.
        shutil.rmtree(os.path.join(self.checkpointer.staging_dir, RESUME_DIR), ignore_errors=True)

    def on_train_batch_end(
        self, trainer: Any, pl_module: Any, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        step = int(trainer.global_step)
        # Once per optimizer step: with gradient accumulation several batches end at the
        # same global step, and only the one that stepped leaves no pending gradients.
        if step == self._last_step:
            return
        self._last_step = step
        if not self.checkpointer.due(step):
            return
        if trainer.is_global_zero:
            # Lightning's checkpoint dictionary refers to the live tensors; `save` copies
            # them into the host buffer before returning (the only stall) and writes and
            # uploads in the background. Lightning's private connector is the only way to
            # get that dictionary without `trainer.save_checkpoint`'s blocking torch.save.
            state = trainer._checkpoint_connector.dump_checkpoint(weights_only=False)
            state[_MARKER] = 1
            self.checkpointer.save(state, step, extra={"framework": "lightning"})
        if self.checkpointer.should_stop():
            trainer.should_stop = True

    def on_train_end(self, trainer: Any, pl_module: Any) -> None:
        self.checkpointer.flush()


def resume_ckpt_path(checkpointer: Checkpointer, dirpath: str | None = None) -> str | None:
    """A local `.ckpt` for `trainer.fit(..., ckpt_path=...)`, or None (fresh).

    Written under `dirpath` (default: the Checkpointer's staging directory, where the
    callback deletes it once training has started).
    """
    state = checkpointer.restore()
    if state is None:
        return None
    if not isinstance(state, dict) or _MARKER not in state:
        raise NotALightningCheckpoint(
            f"checkpoint step {checkpointer.restored_step} was not written by TrainctlLightningCallback"
        )
    state.pop(_MARKER)
    folder = dirpath or os.path.join(checkpointer.staging_dir, RESUME_DIR)
    os.makedirs(folder, exist_ok=True)
    path = os.path.join(folder, CKPT_NAME)
    tmp = f"{path}.tmp-{os.getpid()}"
    torch.save(state, tmp)
    os.replace(tmp, path)
    return path


__all__ = [
    "NotALightningCheckpoint",
    "TrainctlLightningCallback",
    "UnsupportedStrategy",
    "resume_ckpt_path",
]
