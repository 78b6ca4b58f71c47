"""Interrupted-and-resumed runs of the examples, and kill -9 during saves."""

from __future__ import annotations

import json
import os
import random
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


def _kill_after_first_checkpoint(
    command: list[str], env: dict[str, str], ckpt_dir: Any, extra_delay: float = 0.0
) -> None:
    process = subprocess.Popen(command, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    storage = ck.LocalCheckpointStorage(str(ckpt_dir), "example")
    deadline = time.monotonic() + 60
    while not any(storage.read_manifest(s) for s in storage.list_steps()):
        assert process.poll() is None, "the example ended before its first checkpoint"
        assert time.monotonic() < deadline
        time.sleep(0.05)
    time.sleep(extra_delay)
    process.kill()  # SIGKILL: no clean-up, like a reclaimed instance
    process.wait()


def test_kill_9_at_random_points_always_restores_a_verified_checkpoint(tmp_path: Any) -> None:
    root, staging = tmp_path / "store", tmp_path / "staging"
    rng = random.Random(1234)
    step = 0
    for _ in range(6):
        process = subprocess.Popen(
            [sys.executable, os.path.join(HERE, "saver_child.py"), str(root), str(staging), str(step)],
            stdout=subprocess.PIPE,
            text=True,
        )
        assert process.stdout is not None
        process.stdout.readline()  # at least one durable checkpoint exists
        time.sleep(rng.uniform(0.0, 0.3))
        process.kill()
        process.wait()
        with Checkpointer(
            ck.LocalCheckpointStorage(str(root), "kill"), job_id="kill", staging_dir=str(tmp_path / "r")
        ) as ckpt:
            state = ckpt.restore()
            assert state is not None, ckpt.fresh_reason
            assert ckpt.restored_step == state["step"]
            assert np.array_equal(state["data"], np.full(1_000_000, state["step"], dtype=np.float32))
            step = state["step"]
    assert step > 6


def test_train_resumed_after_kill_is_bit_identical(tmp_path: Any) -> None:
    args = ["--steps", "240", "--checkpoint-every", "40"]
    reference = tmp_path / "reference.bin"
    subprocess.run(
        _example("train.py", *args, "--step-seconds", "0", "--output", str(reference)),
        env=_env(tmp_path / "a"),
        check=True,
        capture_output=True,
    )
    resumed = tmp_path / "resumed.bin"
    command = _example("train.py", *args, "--step-seconds", "0.01", "--output", str(resumed))
    _kill_after_first_checkpoint(command, _env(tmp_path / "b"), tmp_path / "b", extra_delay=0.3)
    assert not resumed.exists()
    out = subprocess.run(
        _example("train.py", *args, "--step-seconds", "0", "--output", str(resumed)),
        env=_env(tmp_path / "b"),
        check=True,
        capture_output=True,
        text=True,
    )
    assert "resumed at step" in out.stdout
    assert resumed.read_bytes() == reference.read_bytes()


def test_data_processing_resumes_at_the_next_shard_without_redoing_any(tmp_path: Any) -> None:
    out = tmp_path / "out"
    command = _example(
        "data_processing.py", "--shards", "30", "--shard-seconds", "0.03", "--output-dir", str(out)
    )
    _kill_after_first_checkpoint(command, _env(tmp_path / "ck"), tmp_path / "ck", extra_delay=0.2)
    done_before = len(list(out.glob("shard-*.json")))
    assert 0 < done_before < 30
    result = subprocess.run(command, env=_env(tmp_path / "ck"), check=True, capture_output=True, text=True)
    assert "starting at shard" in result.stdout
    commits = [int(line) for line in (out / "commits.log").read_text().split()]
    assert sorted(commits) == list(range(30))  # every shard exactly once
    reference = tmp_path / "ref"
    subprocess.run(
        _example(
            "data_processing.py", "--shards", "30", "--shard-seconds", "0", "--output-dir", str(reference)
        ),
        env=_env(tmp_path / "ck2"),
        check=True,
        capture_output=True,
    )
    for shard in range(30):
        name = f"shard-{shard:05d}.json"
        assert (out / name).read_text() == (reference / name).read_text()


def test_model_evaluation_resumes_mid_dataset_with_the_same_metrics(tmp_path: Any) -> None:
    reference = tmp_path / "ref.json"
    subprocess.run(
        _example("model_evaluation.py", "--batch-seconds", "0", "--output", str(reference)),
        env=_env(tmp_path / "a"),
        check=True,
        capture_output=True,
    )
    metrics = tmp_path / "metrics.json"
    command = _example("model_evaluation.py", "--batch-seconds", "0.02", "--output", str(metrics))
    _kill_after_first_checkpoint(command, _env(tmp_path / "b"), tmp_path / "b", extra_delay=0.1)
    assert not metrics.exists()
    result = subprocess.run(command, env=_env(tmp_path / "b"), check=True, capture_output=True, text=True)
    assert "evaluating from batch 0 " not in result.stdout
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
    storage = ck.LocalCheckpointStorage(str(tmp_path / "ck"), "example")
    assert storage.list_steps() and storage.read_manifest(storage.list_steps()[-1]) is not None
