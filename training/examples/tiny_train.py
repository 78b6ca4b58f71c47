"""A tiny, deterministic, resumable numpy training job (no framework download needed).

    python training/examples/tiny_train.py --steps 400 --output final.bin

A 2-layer MLP (tanh) trained with Adam on a seeded synthetic regression task, shuffled
per epoch. Everything that decides the next update is in the checkpoint: weights, Adam
moments, the step and the data position (epoch, batch). Kill it anywhere and run it
again with the same checkpoint location: it resumes from the newest verified checkpoint
and its final artifact is byte-identical to an uninterrupted run's. This is the default
script of `trainctl rehearse` and `make demo`.

Settings (flag or environment): --steps/TRAIN_STEPS, --step-seconds/TRAIN_STEP_SECONDS
(simulated extra work per step), --checkpoint-every/TRAIN_CHECKPOINT_EVERY (steps),
--output/TRAIN_OUTPUT (final model file), --seed/TRAIN_SEED.
"""

from __future__ import annotations

import argparse
import hashlib
import logging
import os
import sys
import time
from typing import Any

import numpy as np

from trainctl.checkpoint import Checkpointer

log = logging.getLogger("tiny_train")

INPUTS, HIDDEN, OUTPUTS = 16, 32, 1
PARAMS = ("w1", "b1", "w2", "b2")


def dataset(seed: int, size: int = 1024) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed + 1)
    inputs = rng.standard_normal((size, INPUTS))
    true_w = rng.standard_normal((INPUTS, OUTPUTS))
    targets = np.sin(inputs @ true_w) + 0.1 * rng.standard_normal((size, OUTPUTS))
    return inputs, targets


def initial_state(seed: int) -> dict[str, Any]:
    rng = np.random.default_rng(seed)
    params = {
        "w1": rng.standard_normal((INPUTS, HIDDEN)) / np.sqrt(INPUTS),
        "b1": np.zeros(HIDDEN),
        "w2": rng.standard_normal((HIDDEN, OUTPUTS)) / np.sqrt(HIDDEN),
        "b2": np.zeros(OUTPUTS),
    }
    return {
        "params": params,
        "adam_m": {k: np.zeros_like(v) for k, v in params.items()},
        "adam_v": {k: np.zeros_like(v) for k, v in params.items()},
        "step": 0,
        "epoch": 0,
        "batch": 0,
    }


def batch_indices(seed: int, epoch: int, batch: int, size: int, batch_size: int) -> np.ndarray:
    # The order of an epoch depends only on (seed, epoch): a resumed run that restores its
    # data position sees exactly the batches the uninterrupted run saw.
    order = np.random.default_rng([seed, epoch]).permutation(size)
    return order[batch * batch_size : (batch + 1) * batch_size]


def train_step(state: dict[str, Any], x: np.ndarray, y: np.ndarray, lr: float) -> float:
    p, m, v = state["params"], state["adam_m"], state["adam_v"]
    hidden = np.tanh(x @ p["w1"] + p["b1"])
    error = hidden @ p["w2"] + p["b2"] - y
    loss = float(np.mean(error**2))
    d_out = 2.0 * error / len(x)
    d_hidden = (d_out @ p["w2"].T) * (1.0 - hidden**2)
    grads = {
        "w1": x.T @ d_hidden,
        "b1": d_hidden.sum(axis=0),
        "w2": hidden.T @ d_out,
        "b2": d_out.sum(axis=0),
    }
    t = state["step"] + 1
    beta1, beta2, eps = 0.9, 0.999, 1e-8
    for name in PARAMS:
        m[name] = beta1 * m[name] + (1 - beta1) * grads[name]
        v[name] = beta2 * v[name] + (1 - beta2) * grads[name] ** 2
        m_hat = m[name] / (1 - beta1**t)
        v_hat = v[name] / (1 - beta2**t)
        p[name] = p[name] - lr * m_hat / (np.sqrt(v_hat) + eps)
    state["step"] = t
    return loss


def save_final(state: dict[str, Any], path: str) -> str:
    """Write the parameters as raw little-endian float64 (byte-stable); returns sha256."""
    payload = b"".join(np.ascontiguousarray(state["params"][k], dtype="<f8").tobytes() for k in PARAMS)
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    tmp = path + ".tmp"
    with open(tmp, "wb") as handle:
        handle.write(payload)
    os.replace(tmp, path)
    return hashlib.sha256(payload).hexdigest()


def parse(argv: list[str] | None) -> argparse.Namespace:
    env = os.environ
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--steps", type=int, default=int(env.get("TRAIN_STEPS", "400")))
    parser.add_argument("--step-seconds", type=float, default=float(env.get("TRAIN_STEP_SECONDS", "0.02")))
    parser.add_argument("--checkpoint-every", type=int, default=int(env.get("TRAIN_CHECKPOINT_EVERY", "25")))
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--lr", type=float, default=3e-3)
    parser.add_argument("--seed", type=int, default=int(env.get("TRAIN_SEED", "7")))
    parser.add_argument("--output", default=env.get("TRAIN_OUTPUT", "final_model.bin"))
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s", stream=sys.stdout)
    args = parse(argv)
    if args.steps < 1 or args.checkpoint_every < 1 or args.batch_size < 1:
        print("tiny_train: --steps, --checkpoint-every and --batch-size must be >= 1", file=sys.stderr)
        return 64
    inputs, targets = dataset(args.seed)
    batches_per_epoch = len(inputs) // args.batch_size
    ckpt = Checkpointer.from_env(interval_steps=args.checkpoint_every, framework="numpy")

    state = initial_state(args.seed)
    restored = ckpt.restore()
    if restored is not None:
        state = restored
        log.info("resumed at step %d (epoch %d, batch %d)", state["step"], state["epoch"], state["batch"])
    else:
        log.info("starting fresh: %s", ckpt.fresh_reason)

    while state["step"] < args.steps:
        index = batch_indices(args.seed, state["epoch"], state["batch"], len(inputs), args.batch_size)
        loss = train_step(state, inputs[index], targets[index], args.lr)
        if args.step_seconds:
            time.sleep(args.step_seconds)
        state["batch"] += 1
        if state["batch"] == batches_per_epoch:
            state["epoch"], state["batch"] = state["epoch"] + 1, 0
        step = state["step"]
        if ckpt.due(step):
            ckpt.save(state, step)
        if ckpt.should_stop():
            log.info("stopping at step %d after the interruption checkpoint", step)
            ckpt.close()
            return 0
        if step % 100 == 0:
            log.info("step %d loss %.5f", step, loss)

    # The last step as a checkpoint too, so a restart after completion has nothing to redo.
    ckpt.save_now(state, state["step"])
    digest = save_final(state, args.output)
    log.info("done: %d steps, final model at %s (sha256 %s)", state["step"], args.output, digest)
    ckpt.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
