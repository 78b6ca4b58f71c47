"""A small, deterministic, resumable PyTorch training job (CPU).

    python training/examples/train.py --steps 300 --output final.bin

Kill it anywhere and run it again with the same checkpoint location: it resumes from the
newest verified checkpoint (model, optimizer, scheduler, RNG and data position), and its
final artifact is byte-identical to an uninterrupted run's. Under the agent it also
stops cleanly, after a durable checkpoint, on an interruption notice.

Settings (flag or environment): --steps/TRAIN_STEPS, --step-seconds/TRAIN_STEP_SECONDS
(simulated extra work per step), --checkpoint-every/TRAIN_CHECKPOINT_EVERY (steps),
--output/TRAIN_OUTPUT (final model file), --seed/TRAIN_SEED.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
import time

import torch
from torch import nn

from trainctl.checkpoint import Checkpointer
from trainctl.integrations.torch import ResumableSampler, TorchState, save_final

log = logging.getLogger("train")


def build(seed: int) -> tuple[nn.Module, torch.optim.Optimizer, torch.optim.lr_scheduler.LRScheduler]:
    torch.manual_seed(seed)
    model = nn.Sequential(
        nn.Linear(32, 64), nn.ReLU(), nn.Dropout(0.1), nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 4)
    )
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
    scheduler = torch.optim.lr_scheduler.StepLR(optimizer, step_size=100, gamma=0.5)
    return model, optimizer, scheduler


def dataset(seed: int, size: int = 2048) -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed + 1)
    inputs = torch.randn(size, 32, generator=generator)
    targets = (inputs[:, :4].sum(dim=1, keepdim=True) > 0).long().squeeze(1) + 2 * (inputs[:, 4] > 0).long()
    return inputs, targets


def parse(argv: list[str] | None) -> argparse.Namespace:
    env = os.environ
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=int(env.get("TRAIN_STEPS", "300")))
    parser.add_argument("--step-seconds", type=float, default=float(env.get("TRAIN_STEP_SECONDS", "0.04")))
    parser.add_argument("--checkpoint-every", type=int, default=int(env.get("TRAIN_CHECKPOINT_EVERY", "50")))
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--seed", type=int, default=int(env.get("TRAIN_SEED", "7")))
    parser.add_argument("--output", default=env.get("TRAIN_OUTPUT", "final_model.bin"))
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s", stream=sys.stdout)
    args = parse(argv)
    # Bit-identical resume on CPU: one thread (reduction order) and deterministic kernels.
    torch.set_num_threads(1)
    torch.use_deterministic_algorithms(True)

    model, optimizer, scheduler = build(args.seed)
    inputs, targets = dataset(args.seed)
    batches_per_epoch = len(inputs) // args.batch_size
    sampler = ResumableSampler(len(inputs), seed=args.seed, batch_size=args.batch_size)
    bundle = TorchState(model, optimizer, scheduler)
    ckpt = Checkpointer.from_env(interval_steps=args.checkpoint_every, framework="torch")

    step, epoch, batch = 0, 0, 0
    restored = ckpt.restore()
    if restored is not None:
        position = bundle.load(restored)
        step, epoch, batch = position["step"], position["epoch"], position["batch"]
        log.info("resumed at step %d (epoch %d, batch %d)", step, epoch, batch)
    else:
        log.info("starting fresh: %s", ckpt.fresh_reason)

    loss_fn = nn.CrossEntropyLoss()
    model.train()
    while step < args.steps:
        sampler.set_position(epoch, batch)
        order = list(iter(sampler))
        for start in range(0, len(order) - args.batch_size + 1, args.batch_size):
            if step >= args.steps:
                break
            index = torch.tensor(order[start : start + args.batch_size])
            optimizer.zero_grad(set_to_none=True)
            loss = loss_fn(model(inputs[index]), targets[index])
            loss.backward()
            optimizer.step()
            scheduler.step()
            if args.step_seconds:
                time.sleep(args.step_seconds)
            step += 1
            batch += 1
            if batch == batches_per_epoch:
                epoch, batch = epoch + 1, 0
            if ckpt.due(step):
                ckpt.save(bundle.capture(step=step, epoch=epoch, batch=batch), step)
            if ckpt.should_stop():
                log.info("stopping at step %d after the interruption checkpoint", step)
                ckpt.close()
                return 0
            if step % 50 == 0:
                log.info("step %d loss %.4f", step, loss.item())
        else:
            continue
        break

    # The last step as a checkpoint too, so a restart after completion has nothing to redo.
    ckpt.save_now(bundle.capture(step=step, epoch=epoch, batch=batch), step)
    save_final(model.state_dict(), args.output)
    log.info("done: %d steps, final model at %s", step, args.output)
    ckpt.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
