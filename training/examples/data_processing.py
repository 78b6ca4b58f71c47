"""A sharded batch job that resumes at the next unprocessed shard (no shard done twice).

A shard is done when its result is committed, and committing means making a checkpoint
that holds it durable: the checkpoint carries every committed result and the next shard.
So a replacement instance starting on an empty disk restores all the shards finished
before the interruption from the checkpoint storage alone and processes only the rest.
Each commit waits for durability (`save_now`): a shard takes far longer than one
checkpoint upload here, and an asynchronous commit could be lost with the instance and
the shard done again. A kill between a shard's processing and its commit loses that one
shard's work, which the replacement then processes (once) — nothing committed is redone.

The complete result is written to `--output-dir` (one file per shard, atomic renames)
once every shard is committed. Results here are a few numbers per shard; a job with large
outputs would upload each to object storage and commit its key the same way.

    python training/examples/data_processing.py --shards 40 --output-dir out/
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import time
from typing import Any

import numpy as np

from trainctl.checkpoint import Checkpointer

log = logging.getLogger("data_processing")


def process(shard: int, seed: int) -> dict[str, float]:
    """The work: statistics of a deterministic, shard-specific chunk of data."""
    data = np.random.default_rng([seed, shard]).normal(size=200_000)
    return {"shard": shard, "mean": float(data.mean()), "std": float(data.std()), "max": float(data.max())}


class IncompatibleCheckpoint(ValueError):
    """The checkpoint's committed shards cannot be continued with this run's arguments."""


def restored_state(restored: Any, seed: int, shards: int) -> dict[str, Any]:
    """The committed progress, checked against this run's arguments."""
    if restored is None:
        return {"seed": seed, "next_shard": 0, "results": []}
    if restored.get("seed") != seed:
        raise IncompatibleCheckpoint(
            f"the checkpoint's shards were processed with --seed {restored.get('seed')}, this run "
            f"has --seed {seed}: the results would mix two datasets"
        )
    done = restored["next_shard"]
    if len(restored["results"]) != done:
        raise IncompatibleCheckpoint(
            f"the checkpoint holds {len(restored['results'])} results for {done} committed shards"
        )
    if done > shards:
        raise IncompatibleCheckpoint(f"{done} shards are already committed, more than --shards {shards}")
    return dict(restored)


def write_output(output_dir: str, results: list[dict[str, float]]) -> None:
    os.makedirs(output_dir, exist_ok=True)
    for result in results:
        target = os.path.join(output_dir, f"shard-{int(result['shard']):05d}.json")
        tmp = f"{target}.tmp-{os.getpid()}"
        with open(tmp, "w") as handle:
            json.dump(result, handle, sort_keys=True)
        os.replace(tmp, target)


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s", stream=sys.stdout)
    parser = argparse.ArgumentParser(description="sharded, resumable data processing")
    parser.add_argument("--shards", type=int, default=int(os.environ.get("DP_SHARDS", "40")))
    parser.add_argument("--seed", type=int, default=11)
    parser.add_argument(
        "--shard-seconds", type=float, default=float(os.environ.get("DP_SHARD_SECONDS", "0.05"))
    )
    parser.add_argument("--output-dir", default=os.environ.get("DP_OUTPUT_DIR", "processed"))
    args = parser.parse_args(argv)

    ckpt = Checkpointer.from_env(framework="generic")
    try:
        state = restored_state(ckpt.restore(), args.seed, args.shards)
    except IncompatibleCheckpoint as exc:
        ckpt.close()
        parser.error(str(exc))
    log.info("starting at shard %d of %d", state["next_shard"], args.shards)
    while state["next_shard"] < args.shards:
        shard = state["next_shard"]
        result = process(shard, args.seed)
        time.sleep(args.shard_seconds)
        log.info("processed shard %d", shard)
        state = {"seed": args.seed, "next_shard": shard + 1, "results": [*state["results"], result]}
        # The commit point of this shard: returns once the checkpoint holding it is durable.
        ckpt.save_now(state, shard + 1)
        ckpt.due(shard + 1)  # progress for the agent's heartbeats (every shard is saved anyway)
        if ckpt.should_stop():
            log.info("stopping after shard %d on the interruption notice", shard)
            ckpt.close()
            return 0
    write_output(args.output_dir, state["results"])
    ckpt.close()
    log.info("all %d shards processed; results in %s", args.shards, args.output_dir)
    return 0


if __name__ == "__main__":
    sys.exit(main())
