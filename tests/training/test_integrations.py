"""PyTorch, Hugging Face Trainer and Lightning integrations (CPU, tiny models)."""

from __future__ import annotations

import os
import shutil
from typing import Any

import pytest
import torch
from torch import nn

from trainctl.checkpoint import Checkpointer
from trainctl.integrations.torch import (
    DataOrderMismatch,
    ResumableDataLoader,
    ResumableSampler,
    TorchState,
    load_final,
    save_final,
)
from trainctl_core import checkpoints as ck

from .conftest import BUCKET


def _ckpt(tmp_path: Any, name: str = "staging", store: str = "store", **kwargs: Any) -> Checkpointer:
    storage = ck.LocalCheckpointStorage(str(tmp_path / store), "job")
    return Checkpointer(storage, job_id="job", staging_dir=str(tmp_path / name), **kwargs)


def _model() -> tuple[nn.Module, torch.optim.Optimizer, Any]:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 8), nn.Dropout(0.2), nn.Linear(8, 1))
    optimizer = torch.optim.Adam(model.parameters(), lr=0.01)
    return model, optimizer, torch.optim.lr_scheduler.StepLR(optimizer, 2)


def _steps(model: nn.Module, optimizer: torch.optim.Optimizer, scheduler: Any, n: int) -> None:
    for _ in range(n):
        optimizer.zero_grad()
        model(torch.randn(16, 4)).pow(2).mean().backward()  # draws from the global RNG
        optimizer.step()
        scheduler.step()


def test_torch_state_resume_is_bit_identical(tmp_path: Any) -> None:
    torch.set_num_threads(1)
    reference = _model()
    _steps(*reference, n=6)
    # Given a run checkpointed after 3 steps
    first = _model()
    _steps(*first, n=3)
    with _ckpt(tmp_path) as ckpt:
        ckpt.save_now(TorchState(*first).capture(step=3), 3)
    # When a fresh process restores and continues
    torch.manual_seed(999)  # whatever the new process's RNG was, the checkpoint's wins
    second = _model()
    with _ckpt(tmp_path, "staging2") as ckpt:
        position = TorchState(*second).load(ckpt.restore())
    _steps(*second, n=6 - position["step"])
    # Then weights, optimizer moments and scheduler match the uninterrupted run exactly
    for a, b in zip(reference[0].state_dict().values(), second[0].state_dict().values(), strict=False):
        assert torch.equal(a, b)
    assert reference[2].state_dict() == second[2].state_dict()
    assert torch.equal(
        reference[1].state_dict()["state"][0]["exp_avg"], second[1].state_dict()["state"][0]["exp_avg"]
    )


def test_resumable_sampler_replays_the_same_order() -> None:
    sampler = ResumableSampler(10, seed=3, batch_size=2)
    full = list(iter(sampler))
    sampler.set_position(0, 2)
    assert list(iter(sampler)) == full[4:]
    assert list(iter(sampler)) == full  # only the first epoch after a resume starts mid-way


def test_save_final_is_deterministic(tmp_path: Any) -> None:
    state = {"b": torch.arange(6).reshape(2, 3), "a": torch.randn(3, dtype=torch.float64)}
    save_final(state, str(tmp_path / "x.bin"))
    save_final(dict(reversed(list(state.items()))), str(tmp_path / "y.bin"))
    assert (tmp_path / "x.bin").read_bytes() == (tmp_path / "y.bin").read_bytes()
    loaded = load_final(str(tmp_path / "x.bin"))
    assert torch.equal(loaded["a"], state["a"]) and torch.equal(loaded["b"], state["b"])


def test_resumable_dataloader_continues_after_the_last_batch_handed_out() -> None:
    dataset = torch.utils.data.TensorDataset(torch.arange(20))

    def epoch(loader: ResumableDataLoader, number: int) -> list[list[int]]:
        loader.set_epoch(number)
        return [batch[0].tolist() for batch in loader]

    reference = ResumableDataLoader(dataset, batch_size=4, seed=1)
    uninterrupted = epoch(reference, 0) + epoch(reference, 1)
    # Given a loader stopped after handing out 2 batches of epoch 1
    loader = ResumableDataLoader(dataset, batch_size=4, seed=1)
    epoch(loader, 0)
    loader.set_epoch(1)
    iterator = iter(loader)
    seen = [next(iterator)[0].tolist() for _ in range(2)]
    state = loader.state_dict()
    # When a new process loads that position
    resumed = ResumableDataLoader(dataset, batch_size=4, seed=1)
    resumed.load_state_dict(state)
    assert len(resumed) == 5  # the whole epoch: frameworks count resumed batches against it
    # Then it continues with the third batch, and the next epoch is whole
    assert seen + epoch(resumed, 1) == uninterrupted[5:]
    assert epoch(resumed, 2)[0] != uninterrupted[0] and len(epoch(resumed, 3)) == 5
    # A position taken after an epoch's last batch is the start of the next epoch
    assert resumed.state_dict() == {"epoch": 4, "batch": 0, "seed": 1}
    with pytest.raises(DataOrderMismatch, match="seed 1"):
        ResumableDataLoader(dataset, batch_size=4, seed=2).load_state_dict(state)


class _HfTiny(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.linear = nn.Linear(4, 1)

    def forward(self, x: torch.Tensor, labels: torch.Tensor) -> dict[str, torch.Tensor]:
        return {"loss": nn.functional.mse_loss(self.linear(x).squeeze(-1), labels)}


def _hf_trainer(output_dir: Any, callbacks: list[Any], *, max_steps: int = 8) -> Any:
    transformers = pytest.importorskip("transformers")
    data = [{"x": torch.randn(4), "labels": torch.tensor(1.0)} for _ in range(64)]
    args = transformers.TrainingArguments(
        output_dir=str(output_dir),
        max_steps=max_steps,
        per_device_train_batch_size=8,
        save_steps=100,  # the Trainer's own schedule never fires in these runs
        report_to=[],
        use_cpu=True,
        logging_steps=100,
        disable_tqdm=True,
    )
    return transformers.Trainer(model=_HfTiny(), args=args, train_dataset=data, callbacks=callbacks)


def test_hf_trainer_saves_at_the_trainctl_interval(tmp_path: Any) -> None:
    pytest.importorskip("transformers")
    from transformers import TrainerCallback

    from trainctl.integrations.hf import TrainctlCallback

    class OneAtATime(TrainerCallback):  # type: ignore[misc]
        """Waits for each checkpoint to be durable, so a quick successor cannot supersede it."""

        def __init__(self, ckpt: Checkpointer) -> None:
            self.ckpt = ckpt

        def on_save(self, *args: Any, **kwargs: Any) -> None:
            self.ckpt.flush()

    # Given the job's checkpoint interval of 3 steps and the Trainer's save_steps of 100
    with _ckpt(tmp_path, interval_steps=3) as ckpt:
        trainer = _hf_trainer(tmp_path / "out", [TrainctlCallback(ckpt), OneAtATime(ckpt)])
        # When 8 steps are trained
        trainer.train()
    # Then the Trainer saved, and trainctl published, at steps 3 and 6 (and at the end,
    # the Trainer's own final save)
    assert sorted(os.listdir(tmp_path / "out")) == ["checkpoint-3", "checkpoint-6", "checkpoint-8"]
    storage = ck.LocalCheckpointStorage(str(tmp_path / "store"), "job")
    published = [c for c in storage.list_checkpoints() if storage.read_manifest(c) is not None]
    assert [c.step for c in published] == [3, 6, 8]


@pytest.mark.parametrize("where", ["local", "s3"])
def test_hf_trainer_checkpoints_on_signal_and_resumes(
    tmp_path: Any, where: str, request: pytest.FixtureRequest
) -> None:
    pytest.importorskip("transformers")
    from transformers import TrainerCallback

    from trainctl.integrations.hf import TrainctlCallback, resume_from_checkpoint

    class RequestAtStep(TrainerCallback):  # type: ignore[misc]  # the agent's notice, mid-training
        def __init__(self, ckpt: Checkpointer) -> None:
            self.ckpt = ckpt

        def on_step_begin(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
            if state.global_step == 3:
                self.ckpt.request(stop=True)

    class Observe(TrainerCallback):  # type: ignore[misc]
        def __init__(self) -> None:
            self.start_weights: torch.Tensor | None = None
            self.steps = 0

        def on_train_begin(self, args: Any, state: Any, control: Any, model: Any = None, **kw: Any) -> None:
            self.start_weights = model.linear.weight.detach().clone()

        def on_step_end(self, *args: Any, **kwargs: Any) -> None:
            self.steps += 1

    def checkpointer(staging: str) -> Checkpointer:
        if where == "local":
            return _ckpt(tmp_path, staging)
        storage = ck.S3CheckpointStorage(request.getfixturevalue("s3"), BUCKET, "job")
        return Checkpointer(storage, job_id="job", staging_dir=str(tmp_path / staging))

    with checkpointer("staging") as ckpt:
        first = _hf_trainer(tmp_path / "out", [TrainctlCallback(ckpt), RequestAtStep(ckpt)])
        first.train()
        assert first.state.global_step == 4 and ckpt.should_stop()
        assert ckpt.last_durable is not None and ckpt.last_durable.step == 4
        stopped_weights = first.model.linear.weight.detach().clone()
    shutil.rmtree(tmp_path / "out")  # the replacement instance has only what the checkpoint holds
    with checkpointer("staging2") as ckpt:
        folder = resume_from_checkpoint(ckpt)
        assert folder is not None and os.path.exists(os.path.join(folder, "trainer_state.json"))
        observe = Observe()
        second = _hf_trainer(tmp_path / "out", [TrainctlCallback(ckpt), observe])
        second.train(resume_from_checkpoint=folder)
        assert second.state.global_step == 8
        # A copy fetched from S3 is gone once the Trainer has loaded it (after its first
        # step); a local checkpoint, read in place, is never touched
        assert os.path.exists(folder) is (where == "local")
    # The resumed run started from the checkpointed weights and ran only the remaining steps
    assert observe.start_weights is not None and torch.equal(observe.start_weights, stopped_weights)
    assert observe.steps == 4


# 8 batches per epoch: a notice before step 4 stops mid-epoch, one before step 8 on the
# epoch's last batch.
@pytest.mark.parametrize("notice_at_step", [3, 7])
def test_lightning_resume_trains_on_exactly_the_uninterrupted_batches(
    tmp_path: Any, monkeypatch: pytest.MonkeyPatch, notice_at_step: int
) -> None:
    lightning = pytest.importorskip("lightning.pytorch")
    from lightning.pytorch import Callback, LightningModule

    from trainctl.integrations.lightning import TrainctlLightningCallback, resume_ckpt_path

    torch.set_num_threads(1)

    class Module(LightningModule):  # type: ignore[misc]
        def __init__(self) -> None:
            super().__init__()
            torch.manual_seed(0)
            self.linear = nn.Linear(4, 1)
            self.seen: list[list[int]] = []  # sample ids of every batch trained on

        def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
            x, y, ids = batch
            self.seen.append(ids.tolist())
            return nn.functional.mse_loss(self.linear(x).squeeze(-1), y)

        def configure_optimizers(self) -> Any:
            return torch.optim.SGD(self.parameters(), lr=0.1, momentum=0.9)

    generator = torch.Generator().manual_seed(1)
    dataset = torch.utils.data.TensorDataset(
        torch.randn(64, 4, generator=generator), torch.randn(64, generator=generator), torch.arange(64)
    )

    class RequestAtStep(Callback):  # type: ignore[misc]  # the agent's notice, mid-training
        def __init__(self, ckpt: Checkpointer) -> None:
            self.ckpt = ckpt

        def on_train_batch_start(self, trainer: Any, *args: Any) -> None:
            if trainer.global_step == notice_at_step:
                self.ckpt.request(stop=True)

    def fit(ckpt: Checkpointer, *extra: Any, ckpt_path: str | None = None) -> tuple[Any, Any]:
        module = Module()
        trainer = lightning.Trainer(
            max_steps=10,
            accelerator="cpu",
            logger=False,
            enable_checkpointing=False,
            enable_progress_bar=False,
            enable_model_summary=False,
            callbacks=[TrainctlLightningCallback(ckpt), *extra],
        )
        loader = ResumableDataLoader(dataset, batch_size=8, seed=7)
        trainer.fit(module, loader, ckpt_path=ckpt_path)
        return trainer, module

    # Given an uninterrupted reference run
    with _ckpt(tmp_path, "ref-staging", store="ref-store") as ckpt:
        _, reference = fit(ckpt)
    assert len(reference.seen) == 10
    # When a run gets the notice: the checkpoint goes through the Checkpointer's snapshot,
    # never a torch.save on the training thread
    with _ckpt(tmp_path) as ckpt, monkeypatch.context() as patch:

        def no_blocking_save(*args: Any, **kwargs: Any) -> None:
            raise AssertionError("torch.save on the training thread")

        patch.setattr(torch, "save", no_blocking_save)
        trainer, first = fit(ckpt, RequestAtStep(ckpt))
        assert trainer.global_step == notice_at_step + 1 and ckpt.should_stop()
        assert ckpt.last_durable is not None and ckpt.last_durable.step == notice_at_step + 1
    # And a replacement (nothing local survives but the checkpoint storage) resumes
    with _ckpt(tmp_path, "staging2") as ckpt:
        path = resume_ckpt_path(ckpt)
        assert path is not None
        trainer, second = fit(ckpt, ckpt_path=path)
        assert trainer.global_step == 10
        assert not os.path.exists(path)  # the resume file is gone once Lightning loaded it
    # Then across the interruption it trained on exactly the uninterrupted batches, in
    # order (none replayed, none skipped), and ends with the same weights
    assert first.seen + second.seen == reference.seen
    for name, value in reference.state_dict().items():
        assert torch.equal(second.state_dict()[name], value), name


def test_lightning_resume_refuses_a_checkpoint_it_did_not_write(tmp_path: Any) -> None:
    pytest.importorskip("lightning.pytorch")
    from trainctl.integrations.lightning import NotALightningCheckpoint, resume_ckpt_path

    with _ckpt(tmp_path) as ckpt:
        ckpt.save_now({"step": 2}, 2)
    with _ckpt(tmp_path, "staging2") as ckpt, pytest.raises(NotALightningCheckpoint, match="step 2"):
        resume_ckpt_path(ckpt)
