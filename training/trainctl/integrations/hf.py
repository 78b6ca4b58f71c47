"""Hugging Face `Trainer` integration (imported lazily; needs `transformers`).

    ckpt = Checkpointer.from_env(framework="hf")
    trainer = Trainer(..., callbacks=[TrainctlCallback(ckpt)])
    trainer.train(resume_from_checkpoint=resume_from_checkpoint(ckpt))

Every checkpoint folder the Trainer writes (`checkpoint-<step>`, per `save_steps`) is
uploaded as a trainctl checkpoint (hard-linked into staging, hashed, manifest last). The
callback also makes the Trainer save whenever the Checkpointer's interval is due
(`interval_steps` / `interval_seconds`, i.e. the job's checkpoint interval), so the
Trainer's `save_steps` can stay large. On the interruption notice it makes the Trainer
save at the end of the current step, waits until that checkpoint is durable and stops.
"""

from __future__ import annotations

import os
from typing import Any

from transformers import TrainerCallback
from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR

from trainctl.checkpoint import Checkpointer


class TrainctlCallback(TrainerCallback):  # type: ignore[misc]
    def __init__(self, checkpointer: Checkpointer) -> None:
        self.checkpointer = checkpointer
        self._stepped = False

    def on_step_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> Any:
        if not self._stepped:
            # The Trainer has read everything it resumes from (model, optimizer, scheduler,
            # RNG, trainer state) by the end of its first step: the copy fetched for
            # `resume_from_checkpoint` would only hold disk space for the rest of the run.
            self._stepped = True
            self.checkpointer.release_restored_files()
        # trainctl's interval (steps or seconds) or a pending notice makes the Trainer save
        # at the end of this step, on top of the Trainer's own `save_steps`; `on_save`
        # then uploads the folder. (`due` also reports progress to the agent.)
        if self.checkpointer.due(state.global_step):
            control.should_save = True
        return control

    def on_save(self, args: Any, state: Any, control: Any, **kwargs: Any) -> Any:
        folder = os.path.join(args.output_dir, f"{PREFIX_CHECKPOINT_DIR}-{state.global_step}")
        if not os.path.isdir(folder) or not state.is_world_process_zero:
            return control
        self.checkpointer.save(None, state.global_step, directory=folder, extra={"framework": "hf"})
        if self.checkpointer.should_stop():
            control.should_training_stop = True
        return control

    def on_train_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> Any:
        self.checkpointer.flush()
        return control


def resume_from_checkpoint(checkpointer: Checkpointer) -> str | None:
    """A local folder for `trainer.train(resume_from_checkpoint=...)`, or None (fresh)."""
    restored = checkpointer.restore_checkpoint()
    return restored.files_dir if restored is not None else None
