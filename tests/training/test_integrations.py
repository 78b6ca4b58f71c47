"""PyTorch, Hugging Face Trainer and Lightning integrations (CPU, tiny models)."""

from __future__ import annotations

import os
import shutil
from typing import Any

import pytest
import torch
from torch import nn

from trainctl.checkpoint import Checkpointer
from trainctl.integrations.torch import ResumableSampler, TorchState, load_final, save_final
from trainctl_core import checkpoints as ck


def _ckpt(tmp_path: Any, name: str = "staging", **kwargs: Any) -> Checkpointer:
    storage = ck.LocalCheckpointStorage(str(tmp_path / "store"), "job")
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


def test_hf_trainer_checkpoints_on_signal_and_resumes(tmp_path: Any) -> None:
    transformers = pytest.importorskip("transformers")
    from transformers import TrainerCallback

    from trainctl.integrations.hf import TrainctlCallback, resume_from_checkpoint

    class Tiny(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.linear = nn.Linear(4, 1)

        def forward(self, x: torch.Tensor, labels: torch.Tensor) -> dict[str, torch.Tensor]:
            return {"loss": nn.functional.mse_loss(self.linear(x).squeeze(-1), labels)}

    data = [{"x": torch.randn(4), "labels": torch.tensor(1.0)} for _ in range(64)]

    class RequestAtStep(TrainerCallback):  # type: ignore[misc]  # the agent's notice, mid-training
        def __init__(self, ckpt: Checkpointer) -> None:
            self.ckpt = ckpt

        def on_step_begin(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
            if state.global_step == 3:
                self.ckpt.request(stop=True)

    def trainer(ckpt: Checkpointer, *extra: Any) -> Any:
        args = transformers.TrainingArguments(
            output_dir=str(tmp_path / "out"),
            max_steps=8,
            per_device_train_batch_size=8,
            save_steps=100,
            report_to=[],
            use_cpu=True,
            logging_steps=100,
            disable_tqdm=True,
        )
        return transformers.Trainer(
            model=Tiny(), args=args, train_dataset=data, callbacks=[TrainctlCallback(ckpt), *extra]
        )

    class Observe(TrainerCallback):  # type: ignore[misc]
        def __init__(self) -> None:
            self.start_weights: torch.Tensor | None = None
            self.steps = 0

        def on_train_begin(self, args: Any, state: Any, control: Any, model: Any = None, **kw: Any) -> None:
            self.start_weights = model.linear.weight.detach().clone()

        def on_step_end(self, *args: Any, **kwargs: Any) -> None:
            self.steps += 1

    with _ckpt(tmp_path) as ckpt:
        first = trainer(ckpt, RequestAtStep(ckpt))
        first.train()
        assert first.state.global_step == 4 and ckpt.should_stop()
        assert ckpt.last_durable is not None and ckpt.last_durable.step == 4
        stopped_weights = first.model.linear.weight.detach().clone()
    shutil.rmtree(tmp_path / "out")  # the replacement instance has only what the checkpoint holds
    with _ckpt(tmp_path, "staging2") as ckpt:
        folder = resume_from_checkpoint(ckpt)
        assert folder is not None and os.path.exists(os.path.join(folder, "trainer_state.json"))
        observe = Observe()
        second = trainer(ckpt, observe)
        second.train(resume_from_checkpoint=folder)
        assert second.state.global_step == 8
    # The resumed run started from the checkpointed weights and ran only the remaining steps
    assert observe.start_weights is not None and torch.equal(observe.start_weights, stopped_weights)
    assert observe.steps == 4


def test_lightning_callback_checkpoints_on_signal_and_resumes(tmp_path: Any) -> None:
    lightning = pytest.importorskip("lightning.pytorch")
    from lightning.pytorch import Callback, LightningModule

    from trainctl.integrations.lightning import TrainctlLightningCallback, resume_ckpt_path

    class Module(LightningModule):  # type: ignore[misc]
        def __init__(self) -> None:
            super().__init__()
            self.linear = nn.Linear(4, 1)
            self.seen = 0

        def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
            self.seen += 1
            x, y = batch
            return nn.functional.mse_loss(self.linear(x).squeeze(-1), y)

        def configure_optimizers(self) -> Any:
            return torch.optim.SGD(self.parameters(), lr=0.1)

    dataset = torch.utils.data.TensorDataset(torch.randn(64, 4), torch.randn(64))

    class RequestAtStep(Callback):  # type: ignore[misc]
        def __init__(self, ckpt: Checkpointer) -> None:
            self.ckpt = ckpt

        def on_train_batch_start(self, trainer: Any, *args: Any) -> None:
            if trainer.global_step == 3:
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
            callbacks=[TrainctlLightningCallback(ckpt, str(tmp_path / "pl")), *extra],
        )
        trainer.fit(module, torch.utils.data.DataLoader(dataset, batch_size=8), ckpt_path=ckpt_path)
        return trainer, module

    class Observe(Callback):  # type: ignore[misc]
        start_weights: torch.Tensor | None = None

        def on_train_start(self, trainer: Any, module: Any) -> None:
            self.start_weights = module.linear.weight.detach().clone()

    with _ckpt(tmp_path) as ckpt:
        trainer, module = fit(ckpt, RequestAtStep(ckpt))
        assert trainer.global_step == 4 and ckpt.should_stop()
        stopped_weights = module.linear.weight.detach().clone()
    shutil.rmtree(tmp_path / "pl", ignore_errors=True)  # only the checkpoint survives the instance
    with _ckpt(tmp_path, "staging2") as ckpt:
        path = resume_ckpt_path(ckpt)
        assert path is not None
        observe = Observe()
        trainer, module = fit(ckpt, observe, ckpt_path=path)
        assert trainer.global_step == 10 and module.seen == 6  # only the remaining steps ran
    assert observe.start_weights is not None and torch.equal(observe.start_weights, stopped_weights)
