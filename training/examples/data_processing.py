"""A sharded batch job that resumes at the next unprocessed shard (no shard done twice).

Each shard's result is committed with an atomic rename; the checkpoint records the next
shard. A shard whose result is committed but whose checkpoint was lost with the instance
is recognised by its committed output and not processed again.

    python training/examples/data_processing.py --shards 40 --output-dir out/
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

log = logging.getLogger("data_processing")


def process(shard: int, seed: int) -> dict[str, float]:
    """The work: statistics of a deterministic, shard-specific chunk of data."""
    data = np.random.default_rng([seed, shard]).normal(size=200_000)
    return {"shard": shard, "mean": float(data.mean()), "std": float(data.std()), "max": float(data.max())}


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
    os.makedirs(args.output_dir, exist_ok=True)

    ckpt = Checkpointer.from_env(interval_steps=1, framework="generic")
    state = ckpt.restore() or {"next_shard": 0}
    shard = state["next_shard"]
    log.info("starting at shard %d of %d", shard, args.shards)
    while shard < args.shards:
        target = os.path.join(args.output_dir, f"shard-{shard:05d}.json")
        if os.path.exists(target):
            log.info("shard %d already committed: not processing it again", shard)
        else:
            result = process(shard, args.seed)
            time.sleep(args.shard_seconds)
            tmp = f"{target}.tmp-{os.getpid()}"
            with open(tmp, "w") as handle:
                json.dump(result, handle, sort_keys=True)
            os.replace(tmp, target)  # the commit point of this shard
            with open(os.path.join(args.output_dir, "commits.log"), "a") as ledger:
                ledger.write(f"{shard}\n")
        shard += 1
        if ckpt.due(shard):
            ckpt.save({"next_shard": shard}, shard)
        if ckpt.should_stop():
            log.info("stopping after shard %d on the interruption notice", shard - 1)
            ckpt.close()
            return 0
    ckpt.save_now({"next_shard": shard}, shard)
    ckpt.close()
    log.info("all %d shards processed", args.shards)
    return 0


if __name__ == "__main__":
    sys.exit(main())
