"""Evaluate a fixed model over a dataset; resumes mid-dataset with identical metrics.

The running sums (correct, loss, seen) and the batch position are the checkpoint, so an
interrupted evaluation continues where it stopped and ends with bit-identical metrics.

    python training/examples/model_evaluation.py --output metrics.json
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import time

import numpy as np

from trainctl.checkpoint import Checkpointer

log = logging.getLogger("model_evaluation")


def model_and_data(seed: int, samples: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    weights = rng.normal(size=(16, 3))
    inputs = rng.normal(size=(samples, 16))
    labels = np.argmax(inputs @ weights + rng.normal(scale=2.0, size=(samples, 3)), axis=1)
    return weights, inputs, labels


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s", stream=sys.stdout)
    parser = argparse.ArgumentParser(description="resumable model evaluation")
    parser.add_argument("--samples", type=int, default=20_000)
    parser.add_argument("--batch-size", type=int, default=200)
    parser.add_argument(
        "--batch-seconds", type=float, default=float(os.environ.get("EVAL_BATCH_SECONDS", "0.05"))
    )
    parser.add_argument("--seed", type=int, default=5)
    parser.add_argument("--output", default=os.environ.get("EVAL_OUTPUT", "metrics.json"))
    args = parser.parse_args(argv)

    weights, inputs, labels = model_and_data(args.seed, args.samples)
    ckpt = Checkpointer.from_env(interval_steps=10, framework="generic")
    state = ckpt.restore() or {"batch": 0, "correct": 0, "loss_sum": 0.0, "seen": 0}
    batches = (args.samples + args.batch_size - 1) // args.batch_size
    log.info("evaluating from batch %d of %d", state["batch"], batches)
    while state["batch"] < batches:
        start = state["batch"] * args.batch_size
        x, y = inputs[start : start + args.batch_size], labels[start : start + args.batch_size]
        logits = x @ weights
        logits = logits - logits.max(axis=1, keepdims=True)
        log_probs = logits - np.log(np.exp(logits).sum(axis=1, keepdims=True))
        state = {
            "batch": state["batch"] + 1,
            "correct": state["correct"] + int((logits.argmax(axis=1) == y).sum()),
            "loss_sum": state["loss_sum"] - float(log_probs[np.arange(len(y)), y].sum()),
            "seen": state["seen"] + len(y),
        }
        time.sleep(args.batch_seconds)
        if ckpt.due(state["batch"]):
            ckpt.save(state, state["batch"])
        if ckpt.should_stop():
            log.info("stopping at batch %d on the interruption notice", state["batch"])
            ckpt.close()
            return 0
    metrics = {
        "accuracy": state["correct"] / state["seen"],
        "loss": state["loss_sum"] / state["seen"],
        "samples": state["seen"],
    }
    with open(args.output, "w") as handle:
        json.dump(metrics, handle, sort_keys=True)
    ckpt.save_now(state, state["batch"])
    ckpt.close()
    log.info("metrics: %s", metrics)
    return 0


if __name__ == "__main__":
    sys.exit(main())
