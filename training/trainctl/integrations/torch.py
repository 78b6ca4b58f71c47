"""PyTorch helpers: capture/restore model, optimizer, scheduler, RNG and data position.

The Checkpointer stores tensors raw through its reused host buffer (see
`trainctl.snapshot`); `bench/checkpoint.py` measured that against both serialisers here:
the training loop stalls only for one memcpy, while `torch.save` blocks for the whole
write (and safetensors, faster than `torch.save` here, still for its whole write) —
docs/BENCHMARKS.md, "Checkpoint stall, durability and restore". So no serialiser is used
at save time. `save_final` writes a *deterministic* single-file artifact (sorted keys, raw bytes)
so two runs can be compared byte for byte.

Imported lazily: `import trainctl.integrations.torch` only where torch is installed.
"""

from __future__ import annotations

import json
import os
import random
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch


def rng_state() -> dict[str, Any]:
    """Every RNG a training step may draw from (python, numpy, torch CPU and CUDA)."""
    state: dict[str, Any] = {
        "python": random.getstate(),
        "numpy": np.random.get_state(),
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


@dataclass
class TorchState:
    """Bundles what a resumable PyTorch job has to save.

    bundle = TorchState(model, optimizer, scheduler)
    restored = ckpt.restore()
    position = bundle.load(restored) if restored else {"epoch": 0, "batch": 0}
    ...
    ckpt.save(bundle.capture(step=step, epoch=e, batch=b), step)
    """

    model: torch.nn.Module
    optimizer: torch.optim.Optimizer | None = None
    scheduler: Any = None

    def capture(self, **position: Any) -> dict[str, Any]:
        """The state tree (tensors are copied by the Checkpointer's snapshot, not here)."""
        return {
            "model": self.model.state_dict(),
            "optimizer": self.optimizer.state_dict() if self.optimizer is not None else None,
            "scheduler": self.scheduler.state_dict() if self.scheduler is not None else None,
            "rng": rng_state(),
            "position": dict(position),
        }

    def load(self, state: dict[str, Any]) -> dict[str, Any]:
        """Apply a restored tree; returns its data position (step/epoch/batch…)."""
        self.model.load_state_dict(state["model"])
        if self.optimizer is not None and state.get("optimizer") is not None:
            self.optimizer.load_state_dict(state["optimizer"])
        if self.scheduler is not None and state.get("scheduler") is not None:
            self.scheduler.load_state_dict(state["scheduler"])
        set_rng_state(state["rng"])
        position: dict[str, Any] = state.get("position", {})
        return position


class ResumableSampler(torch.utils.data.Sampler[int]):
    """A shuffling sampler that can start mid-epoch: the order of epoch `e` depends only on
    (seed, e), so resuming at (epoch, batch) replays exactly the uninterrupted order."""

    def __init__(self, length: int, *, seed: int, batch_size: int, shuffle: bool = True) -> None:
        self.length, self.seed, self.batch_size, self.shuffle = length, seed, batch_size, shuffle
        self.epoch = 0
        self.start_batch = 0

    def set_position(self, epoch: int, batch: int) -> None:
        self.epoch, self.start_batch = epoch, batch

    def set_epoch(self, epoch: int) -> None:
        """The `DistributedSampler` hook frameworks call at each epoch start (Lightning does).

        A resume position belongs to its epoch: it survives the call for that epoch (the
        framework announcing the epoch being resumed) and is dropped for any other.
        """
        if epoch != self.epoch:
            self.start_batch = 0
        self.epoch = epoch

    def order(self, epoch: int) -> list[int]:
        if not self.shuffle:
            return list(range(self.length))
        generator = torch.Generator().manual_seed(self.seed * 1_000_003 + epoch)
        return torch.randperm(self.length, generator=generator).tolist()

    def __iter__(self) -> Iterator[int]:
        indices = self.order(self.epoch)[self.start_batch * self.batch_size :]
        self.start_batch = 0  # only the first epoch after a resume starts mid-way
        return iter(indices)

    def __len__(self) -> int:
        return max(0, self.length - self.start_batch * self.batch_size)


class DataOrderMismatch(ValueError):
    """A saved data position was drawn with another seed: resuming would change the order."""


class ResumableDataLoader(torch.utils.data.DataLoader):  # type: ignore[type-arg]
    """A DataLoader whose position (epoch, batches handed out) is part of the checkpoint.

    It implements `state_dict()` / `load_state_dict()`, the stateful-loader protocol
    Lightning saves into its checkpoints (`loops.fit_loop.combined_loader`) and loads
    before iterating again, so a run resumed from a mid-epoch checkpoint continues with
    the first batch it had not trained on instead of replaying the epoch from its start.
    A plain training loop can use the same two calls around `Checkpointer.save/restore`.

    Batches are counted as they are handed to the consumer, not as workers prefetch them,
    so the position is exact with `num_workers > 0` too. The shuffled order comes from a
    `ResumableSampler` (a pure function of seed and epoch). Single process only: a
    distributed sampler would need the rank in the order as well.
    """

    def __init__(
        self, dataset: Any, *, batch_size: int, seed: int, shuffle: bool = True, **kwargs: Any
    ) -> None:
        for owned in ("sampler", "batch_sampler"):
            if owned in kwargs:
                raise TypeError(f"ResumableDataLoader chooses its own {owned}; do not pass {owned}=")
        self.resumable_sampler = ResumableSampler(
            len(dataset), seed=seed, batch_size=batch_size, shuffle=shuffle
        )
        super().__init__(dataset, batch_size=batch_size, sampler=self.resumable_sampler, **kwargs)
        self._served = 0  # batches handed out in the current epoch

    def set_epoch(self, epoch: int) -> None:
        self.resumable_sampler.set_epoch(epoch)

    def __len__(self) -> int:
        # Always the whole epoch, also right after a mid-epoch `load_state_dict`:
        # Lightning counts the resumed batches against this length.
        length = self.resumable_sampler.length
        return (
            length // self.resumable_sampler.batch_size
            if self.drop_last
            else -(-length // self.resumable_sampler.batch_size)
        )

    def __iter__(self) -> Iterator[Any]:  # type: ignore[override]
        # A generator, so nothing below runs before the first batch is asked for: the
        # framework's `set_epoch` for this epoch (called after `iter()`) is honoured.
        self._served = self.resumable_sampler.start_batch
        for batch in super().__iter__():
            self._served += 1
            yield batch

    def state_dict(self) -> dict[str, int]:
        epoch, served = self.resumable_sampler.epoch, self._served
        if served >= len(self):
            epoch, served = epoch + 1, 0  # the epoch is finished: the next one starts at 0
        return {"epoch": epoch, "batch": served, "seed": self.resumable_sampler.seed}

    def load_state_dict(self, state: dict[str, int]) -> None:
        if state.get("seed", self.resumable_sampler.seed) != self.resumable_sampler.seed:
            raise DataOrderMismatch(
                f"the checkpoint's data order was drawn with seed {state['seed']}, this loader has "
                f"seed {self.resumable_sampler.seed}: resuming would train on a different order"
            )
        self.resumable_sampler.set_position(int(state["epoch"]), int(state["batch"]))
        self._served = int(state["batch"])


def save_final(state_dict: dict[str, torch.Tensor], path: str) -> str:
    """Write tensors deterministically (sorted names, JSON header, raw bytes); returns path.

    Written to a temporary name and renamed, so a kill mid-write leaves no partial file.
    """
    header = []
    offset = 0
    items = sorted(state_dict.items())
    for name, tensor in items:
        nbytes = tensor.numel() * tensor.element_size()
        header.append(
            {
                "name": name,
                "dtype": str(tensor.dtype),
                "shape": list(tensor.shape),
                "offset": offset,
                "nbytes": nbytes,
            }
        )
        offset += nbytes
    encoded = json.dumps(header, sort_keys=True).encode()
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    tmp = f"{path}.tmp-{os.getpid()}"
    with open(tmp, "wb") as handle:
        handle.write(len(encoded).to_bytes(8, "little"))
        handle.write(encoded)
        for _, tensor in items:
            handle.write(tensor.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())
        handle.flush()
        os.fsync(handle.fileno())
    os.replace(tmp, path)
    return path


def load_final(path: str) -> dict[str, torch.Tensor]:
    with open(path, "rb") as handle:
        size = int.from_bytes(handle.read(8), "little")
        header = json.loads(handle.read(size))
        data = handle.read()
    out: dict[str, torch.Tensor] = {}
    for entry in header:
        dtype = getattr(torch, entry["dtype"].removeprefix("torch."))
        raw = torch.frombuffer(
            bytearray(data[entry["offset"] : entry["offset"] + entry["nbytes"]]), dtype=torch.uint8
        )
        out[entry["name"]] = (
            raw.view(dtype).reshape(entry["shape"])
            if entry["nbytes"]
            else torch.empty(entry["shape"], dtype=dtype)
        )
    return out
