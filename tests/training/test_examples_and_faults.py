"""Interrupted-and-resumed runs of the examples, and kill -9 during saves."""

from __future__ import annotations

import json
import os
import random
import re
import signal
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from typing import Any

import numpy as np
import pytest

from trainctl.checkpoint import Checkpointer
from trainctl_core import checkpoints as ck

HERE = os.path.dirname(os.path.abspath(__file__))
EXAMPLES = os.path.join(HERE, "..", "..", "training", "examples")


def _env(ckpt_dir: Any, **extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("TRAINCTL_")}
    env.update(
        {
            "TRAINCTL_CHECKPOINT_DIR": str(ckpt_dir),
            "TRAINCTL_JOB_ID": "example",
            "PYTHONUNBUFFERED": "1",
            **extra,
        }
    )
    return env


def _example(name: str, *args: str) -> list[str]:
    return [sys.executable, os.path.join(EXAMPLES, name), *args]


def _run_example(command: list[str], env: dict[str, str], timeout: float = 180) -> str:
    """Run an example to completion; its stdout. A hang fails within `timeout` with every
    thread's stack (faulthandler on SIGABRT) instead of blocking the suite."""
    process = subprocess.Popen(
        command,
        env={**env, "PYTHONFAULTHANDLER": "1"},
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        out, err = process.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        process.send_signal(signal.SIGABRT)
        out, err = process.communicate()
        raise AssertionError(f"{command[1]} hung for {timeout:.0f} s; stacks:\n{err[-6000:]}") from None
    assert process.returncode == 0, f"{command[1]} exited {process.returncode}:\n{err[-3000:]}"
    return out


def _durable_steps(ckpt_dir: Any) -> list[int]:
    """Steps of the published checkpoints (manifest present) in a local checkpoint store."""
    storage = ck.LocalCheckpointStorage(str(ckpt_dir), "example")
    return sorted(c.step for c in storage.list_checkpoints() if storage.read_manifest(c) is not None)


def _interrupt_after_first_checkpoint(
    command: list[str],
    env: dict[str, str],
    ckpt_dir: Any,
    extra_delay: float = 0.0,
    *,
    notice: bool = False,
    stdout: Any = None,
) -> None:
    """Run `command` until its first checkpoint is published (+ `extra_delay`), then kill
    it with SIGKILL (a reclaimed instance) or, with `notice`, deliver the interruption
    notice (SIGUSR1, as the agent forwards it) and let it stop by itself."""
    with open(stdout or os.devnull, "w") as out:
        process = subprocess.Popen(command, env=env, stdout=out, stderr=subprocess.DEVNULL)
        deadline = time.monotonic() + 60
        while not _durable_steps(ckpt_dir):
            assert process.poll() is None, "the example ended before its first checkpoint"
            assert time.monotonic() < deadline
            time.sleep(0.05)
        time.sleep(extra_delay)
        if notice:
            process.send_signal(signal.SIGUSR1)
            assert process.wait(60) == 0
        else:
            process.kill()  # SIGKILL: no clean-up, like a reclaimed instance
            process.wait()


def _logged_number(pattern: str, out: str) -> int:
    match = re.search(pattern, out)
    assert match, f"no line matching {pattern!r} in:\n{out[-3000:]}"
    return int(match.group(1))


def kill_9_cycles(
    tmp_path: Any, seed: int, cycles: int, restore_storage: Any, child_args: list[str] | None = None
) -> None:
    """Start saver_child, SIGKILL it at a random moment mid-save, restore; `cycles` times.

    Each restore must verify, carry the content of the step it names, and be at least as
    new as the last step the child reported durable (no durable checkpoint is lost).
    """
    root, staging = tmp_path / "store", tmp_path / "staging"
    rng = random.Random(seed)
    step = 0
    for cycle in range(cycles):
        process = subprocess.Popen(
            [
                sys.executable,
                os.path.join(HERE, "saver_child.py"),
                str(root),
                str(staging),
                str(step),
                *(child_args or []),
            ],
            stdout=subprocess.PIPE,
            text=True,
        )
        assert process.stdout is not None
        first = process.stdout.readline()
        assert first, "the saver child died before its first checkpoint"
        # Saves run back to back, so any moment is inside one (snapshot, write, upload or
        # manifest); the spread covers several saves.
        time.sleep(rng.uniform(0.0, 0.4))
        process.kill()
        process.wait()
        reported = [int(first), *(int(line) for line in process.stdout.read().split())]
        process.stdout.close()
        with Checkpointer(restore_storage(), job_id="kill", staging_dir=str(tmp_path / f"r{cycle}")) as ckpt:
            state = ckpt.restore()
            assert state is not None, ckpt.fresh_reason
            assert ckpt.restored_step == state["step"]
            assert np.array_equal(state["data"], np.full(len(state["data"]), state["step"], dtype=np.float32))
            assert state["step"] >= max(reported), "a durable checkpoint was lost"
            step = state["step"]
    assert step >= cycles  # every cycle restored something newer than the last


@pytest.mark.parametrize("seed", [1234, 7, 2026])
def test_kill_9_at_random_points_always_restores_a_verified_checkpoint(tmp_path: Any, seed: int) -> None:
    kill_9_cycles(tmp_path, seed, 5, lambda: ck.LocalCheckpointStorage(str(tmp_path / "store"), "kill"))


def test_train_resumed_after_kill_is_bit_identical(tmp_path: Any) -> None:
    args = ["--steps", "240", "--checkpoint-every", "40"]
    reference = tmp_path / "reference.bin"
    _run_example(
        _example("train.py", *args, "--step-seconds", "0", "--output", str(reference)), _env(tmp_path / "a")
    )
    resumed = tmp_path / "resumed.bin"
    command = _example("train.py", *args, "--step-seconds", "0.01", "--output", str(resumed))
    _interrupt_after_first_checkpoint(command, _env(tmp_path / "b"), tmp_path / "b", extra_delay=0.3)
    assert not resumed.exists()
    checkpointed = _durable_steps(tmp_path / "b")[-1]
    out = _run_example(
        _example("train.py", *args, "--step-seconds", "0", "--output", str(resumed)), _env(tmp_path / "b")
    )
    # It resumed from the newest checkpoint (a fresh start would be bit-identical too)
    assert _logged_number(r"resumed at step (\d+)", out) == checkpointed > 0
    assert resumed.read_bytes() == reference.read_bytes()


def _processed_shards(out: str) -> list[int]:
    return [int(n) for n in re.findall(r"processed shard (\d+)", out)]


@pytest.mark.parametrize("interruption", ["notice", "kill"])
def test_data_processing_resumes_on_a_fresh_disk_without_redoing_a_committed_shard(
    tmp_path: Any, interruption: str
) -> None:
    def command(output_dir: str) -> list[str]:
        return _example(
            "data_processing.py", "--shards", "30", "--shard-seconds", "0.03", "--output-dir", output_dir
        )

    store = tmp_path / "ck"  # the checkpoint storage: all that two instances share
    first_log = tmp_path / "first.log"
    # Given an instance interrupted after some shards were committed
    _interrupt_after_first_checkpoint(
        command(str(tmp_path / "first-out")),
        _env(store, TRAINCTL_STAGING_DIR=str(tmp_path / "first-staging")),
        store,
        extra_delay=0.2,
        notice=interruption == "notice",
        stdout=first_log,
    )
    committed = _durable_steps(store)[-1]  # the step is the next shard to process
    assert 0 < committed < 30
    first = _processed_shards(first_log.read_text())
    # When a replacement with an empty disk (fresh output and staging dirs) runs
    out = _run_example(
        command(str(tmp_path / "second-out")),
        _env(store, TRAINCTL_STAGING_DIR=str(tmp_path / "second-staging"), TRAINCTL_ATTEMPT="1"),
    )
    # Then it starts at the checkpoint's next shard and processes exactly the rest
    start = _logged_number(r"starting at shard (\d+)", out)
    assert start == committed
    assert _processed_shards(out) == list(range(start, 30))
    # and the interrupted instance processed every shard below it once; on the notice it
    # stopped after committing its last one, a kill may have caught one uncommitted
    assert first[:start] == list(range(start))
    uncommitted = first[start:]
    assert uncommitted in (([],) if interruption == "notice" else ([], [start]))
    # and the result is complete and equal to an uninterrupted run's
    reference = tmp_path / "ref"
    _run_example(
        _example(
            "data_processing.py", "--shards", "30", "--shard-seconds", "0", "--output-dir", str(reference)
        ),
        _env(tmp_path / "ck2"),
    )
    names = sorted(p.name for p in (tmp_path / "second-out").iterdir())
    assert names == [f"shard-{shard:05d}.json" for shard in range(30)]
    for name in names:
        assert (tmp_path / "second-out" / name).read_text() == (reference / name).read_text()


def test_data_processing_refuses_to_mix_a_checkpoint_of_another_seed(tmp_path: Any) -> None:
    def command(seed: str) -> list[str]:
        args = ["--shards", "3", "--shard-seconds", "0", "--seed", seed]
        return _example("data_processing.py", *args, "--output-dir", str(tmp_path / "out"))

    _run_example(command("11"), _env(tmp_path / "ck"))
    refused = subprocess.run(
        command("12"), env=_env(tmp_path / "ck"), capture_output=True, text=True, timeout=120
    )
    assert refused.returncode == 2
    assert "processed with --seed 11, this run has --seed 12" in refused.stderr


def test_model_evaluation_resumes_mid_dataset_with_the_same_metrics(tmp_path: Any) -> None:
    reference = tmp_path / "ref.json"
    _run_example(
        _example("model_evaluation.py", "--batch-seconds", "0", "--output", str(reference)),
        _env(tmp_path / "a"),
    )
    metrics = tmp_path / "metrics.json"
    command = _example("model_evaluation.py", "--batch-seconds", "0.02", "--output", str(metrics))
    _interrupt_after_first_checkpoint(command, _env(tmp_path / "b"), tmp_path / "b", extra_delay=0.1)
    assert not metrics.exists()
    checkpointed = _durable_steps(tmp_path / "b")[-1]  # the step is the next batch
    out = _run_example(command, _env(tmp_path / "b"))
    # It continued from the checkpoint's batch (a fresh start gives the same metrics too)
    assert _logged_number(r"evaluating from batch (\d+)", out) == checkpointed > 0
    assert json.loads(metrics.read_text()) == json.loads(reference.read_text())


def test_inference_server_drains_in_flight_and_refuses_new_requests(tmp_path: Any) -> None:
    process = subprocess.Popen(
        _example("inference_server.py", "--port", "0"),
        env=_env(tmp_path / "ck"),
        stdout=subprocess.PIPE,
        text=True,
    )
    assert process.stdout is not None
    line = process.stdout.readline()
    port = int(line.split()[-1])
    base = f"http://127.0.0.1:{port}"
    assert json.loads(urllib.request.urlopen(f"{base}/predict?x=2").read()) == {"y": 5.0}
    slow: dict[str, Any] = {}

    def call_slow() -> None:
        slow["body"] = json.loads(urllib.request.urlopen(f"{base}/predict?x=1&delay=1.5", timeout=10).read())

    # A rebalance recommendation (SIGUSR2: checkpoint, continue) does not drain it
    process.send_signal(signal.SIGUSR2)
    storage = ck.LocalCheckpointStorage(str(tmp_path / "ck"), "example")
    deadline = time.monotonic() + 10
    while not storage.list_checkpoints() and time.monotonic() < deadline:
        time.sleep(0.05)
    assert storage.list_checkpoints(), "no checkpoint on the rebalance recommendation"
    assert json.loads(urllib.request.urlopen(f"{base}/predict?x=2").read()) == {"y": 5.0}
    assert process.poll() is None

    thread = threading.Thread(target=call_slow)
    thread.start()
    time.sleep(0.3)
    # When the notice arrives (the agent forwards it as SIGUSR1)
    process.send_signal(signal.SIGUSR1)
    time.sleep(0.3)
    # Then new requests are refused while the in-flight one completes
    with pytest.raises(urllib.error.HTTPError) as refused:
        urllib.request.urlopen(f"{base}/predict?x=3", timeout=5)
    assert refused.value.code == 503
    thread.join(10)
    assert slow["body"] == {"y": 3.0}
    assert process.wait(20) == 0
    assert (
        len(storage.list_checkpoints()) == 2
        and storage.read_manifest(storage.list_checkpoints()[-1]) is not None
    )


def test_inference_server_keeps_serving_when_a_rebalance_checkpoint_fails(tmp_path: Any) -> None:
    # Given storage that refuses every write (the job's checkpoint root is a file)
    root = tmp_path / "ck"
    root.mkdir()
    (root / "example").write_text("not a directory")
    process = subprocess.Popen(
        _example("inference_server.py", "--port", "0", "--checkpoint-timeout", "2"),
        env=_env(root),
        stdout=subprocess.PIPE,
        text=True,
    )
    assert process.stdout is not None
    try:
        port = int(process.stdout.readline().split()[-1])
        base = f"http://127.0.0.1:{port}"
        # When a rebalance recommendation asks for a checkpoint that cannot be made
        process.send_signal(signal.SIGUSR2)
        failed = process.stdout.readline()
        while failed and "still serving" not in failed:
            failed = process.stdout.readline()
        # Then the failure is logged and the server goes on serving
        assert "failed" in failed and "still serving" in failed
        assert json.loads(urllib.request.urlopen(f"{base}/predict?x=2", timeout=5).read()) == {"y": 5.0}
        assert process.poll() is None
        # and once storage is back, a notice drains it with a durable checkpoint
        (root / "example").unlink()
        process.send_signal(signal.SIGUSR1)
        assert process.wait(30) == 0
        storage = ck.LocalCheckpointStorage(str(root), "example")
        assert storage.read_manifest(storage.list_checkpoints()[-1]) is not None
    finally:
        if process.poll() is None:
            process.kill()
