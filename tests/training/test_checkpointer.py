"""The Checkpointer against local and (moto) S3 storage, including faults."""

from __future__ import annotations

import logging
import os
import threading
import time
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
import pytest
import torch

from trainctl.checkpoint import Checkpointer, CheckpointFailed
from trainctl_core import checkpoints as ck

from .conftest import BUCKET


def _state(seed: int, size: int = 50_000) -> dict[str, Any]:
    gen = torch.Generator().manual_seed(seed)
    return {
        "weights": torch.randn(size, generator=gen),
        "half": torch.randn(7, 3, generator=gen).to(torch.bfloat16),
        "array": np.arange(seed, seed + 10, dtype=np.int64),
        "meta": {"epoch": seed, "name": "x", "nested": [1, (2, 3)]},
        "rng": torch.get_rng_state(),
    }


def _assert_same(a: dict[str, Any], b: dict[str, Any]) -> None:
    assert torch.equal(a["weights"], b["weights"])
    assert torch.equal(a["half"], b["half"]) and a["half"].dtype == torch.bfloat16
    assert np.array_equal(a["array"], b["array"])
    assert a["meta"] == b["meta"]
    assert torch.equal(a["rng"], b["rng"])


def _local(tmp_path: Any, **kwargs: Any) -> Checkpointer:
    storage = ck.LocalCheckpointStorage(str(tmp_path / "store"), "job-1")
    return Checkpointer(storage, job_id="job-1", staging_dir=str(tmp_path / "staging"), **kwargs)


class SlowFlakyStorage:
    """Wraps a storage: each put_files takes `delay` s and the first `failures` raise."""

    def __init__(self, inner: Any, delay: float = 0.0, failures: int = 0) -> None:
        self.inner, self.delay, self.failures = inner, delay, failures
        self.put_calls: list[int] = []

    def __getattr__(self, name: str) -> Any:
        return getattr(self.inner, name)

    def put_files(self, step: int, files: Sequence[tuple[str, str]], cancelled: Callable[[], bool]) -> None:
        self.put_calls.append(step)
        if self.failures > 0:
            self.failures -= 1
            raise ConnectionError("could not connect to the endpoint URL (simulated)")
        end = time.monotonic() + self.delay
        while time.monotonic() < end:
            if cancelled():
                return
            time.sleep(0.01)
        self.inner.put_files(step, files, cancelled)


def test_local_round_trip_and_retention(tmp_path: Any) -> None:
    # Given a checkpointer keeping 2
    with _local(tmp_path, keep=2) as ckpt:
        assert ckpt.restore() is None and ckpt.fresh_reason == "no checkpoint found"
        # When three checkpoints are saved
        for step in (10, 20, 30):
            ckpt.save(_state(step), step)
            ckpt.flush()
        assert ckpt.last_durable is not None and ckpt.last_durable.step == 30
    # Then the newest two remain and the newest restores exactly
    assert ck.LocalCheckpointStorage(str(tmp_path / "store"), "job-1").list_steps() == [20, 30]
    with _local(tmp_path) as again:
        restored = again.restore()
        assert again.restored_step == 30
        _assert_same(restored, _state(30))


def test_s3_round_trip_files_then_manifest(tmp_path: Any, s3: Any) -> None:
    storage = ck.S3CheckpointStorage(s3, BUCKET, "job-1")
    with Checkpointer(
        storage, job_id="job-1", staging_dir=str(tmp_path / "st"), attempt=3, instance_id="i-1"
    ) as ckpt:
        ckpt.save(_state(5), 5, extra={"epoch": 1})
        durable = ckpt.flush()
    assert durable is not None and durable.prefix == "job-1/ckpt/000000000005/"
    keys = sorted(o["Key"] for o in s3.list_objects_v2(Bucket=BUCKET)["Contents"])
    assert keys == [f"job-1/ckpt/000000000005/{n}" for n in ("manifest.json", "state.bin", "state.pkl")]
    manifest = ck.parse_manifest(s3.get_object(Bucket=BUCKET, Key=keys[0])["Body"].read())
    assert (manifest.attempt, manifest.instance_id, manifest.extra) == (3, "i-1", {"epoch": 1})
    with Checkpointer(storage, job_id="job-1", staging_dir=str(tmp_path / "st2"), attempt=3) as again:
        _assert_same(again.restore(), _state(5))


@pytest.mark.parametrize(
    "fault", ["bad-hash", "missing-manifest", "truncated", "missing-file", "garbage-manifest"]
)
def test_corrupt_newest_is_skipped_with_its_name(tmp_path: Any, caplog: Any, fault: str) -> None:
    with _local(tmp_path) as ckpt:
        for step in (1, 2):
            ckpt.save(_state(step), step)
            ckpt.flush()
    newest = tmp_path / "store" / "job-1" / "ckpt" / "000000000002"
    data = newest / "state.bin"
    if fault == "bad-hash":
        raw = bytearray(data.read_bytes())
        raw[100] ^= 0xFF
        data.write_bytes(bytes(raw))
    elif fault == "missing-manifest":
        (newest / "manifest.json").unlink()
    elif fault == "truncated":
        data.write_bytes(data.read_bytes()[:1000])
    elif fault == "missing-file":
        data.unlink()
    else:
        (newest / "manifest.json").write_text("{not json")
    caplog.set_level(logging.WARNING, logger="trainctl")
    with _local(tmp_path) as again:
        _assert_same(again.restore(), _state(1))
    assert any("000000000002" in r.getMessage() and "skipped" in r.getMessage() for r in caplog.records)


def test_all_corrupt_starts_fresh_with_reason(tmp_path: Any) -> None:
    with _local(tmp_path) as ckpt:
        ckpt.save(_state(1), 1)
        ckpt.flush()
    (tmp_path / "store" / "job-1" / "ckpt" / "000000000001" / "manifest.json").unlink()
    with _local(tmp_path) as again:
        assert again.restore() is None
        assert again.fresh_reason and "step 1: missing manifest" in again.fresh_reason


def test_resume_cap_ignores_a_late_upload_from_an_older_attempt(tmp_path: Any) -> None:
    with _local(tmp_path) as ckpt:
        for step in (10, 20):
            ckpt.save(_state(step), step)
            ckpt.flush()
    with _local(tmp_path, resume_step=10) as again:
        _assert_same(again.restore(), _state(10))


def test_save_now_under_load_returns_only_when_durable(tmp_path: Any) -> None:
    storage = SlowFlakyStorage(ck.LocalCheckpointStorage(str(tmp_path / "store"), "job-1"), delay=1.0)
    with Checkpointer(storage, job_id="job-1", staging_dir=str(tmp_path / "st")) as ckpt:
        # Given a periodic checkpoint uploading slowly
        ckpt.save(_state(1, size=2_000_000), 1)
        time.sleep(0.2)
        # When the agent forwards a notice and the loop saves
        ckpt.request(stop=True)
        assert ckpt.due(2) and not ckpt.should_stop()
        started = time.monotonic()
        durable = ckpt.save(_state(2, size=2_000_000), 2)
        # Then save returned a durable checkpoint whose manifest verifies right now
        assert durable is not None and durable.step == 2 and durable.urgent
        assert time.monotonic() - started >= 0.9  # it waited for its own (slow) upload
        outcome = ck.verify_checkpoint(storage, 2, job_id="job-1", dest_dir=str(tmp_path / "v"))
        assert not isinstance(outcome, str)
        assert ckpt.should_stop()
        ckpt.flush()
    # And the slow periodic upload gave way (cancelled: no manifest for step 1)
    assert storage.inner.read_manifest(1) is None


def test_periodic_save_does_not_stall_on_a_busy_buffer(tmp_path: Any) -> None:
    storage = SlowFlakyStorage(ck.LocalCheckpointStorage(str(tmp_path / "store"), "job-1"), delay=0.5)
    with Checkpointer(storage, job_id="job-1", staging_dir=str(tmp_path / "st")) as ckpt:
        for step in range(1, 6):
            started = time.monotonic()
            ckpt.save(_state(step), step)
            assert time.monotonic() - started < 0.4
            time.sleep(0.1)  # the local write finishes; the (slow) upload does not
        ckpt.flush()
        # Only the newest queued periodic checkpoint matters: 2-4 were superseded while
        # 1 was uploading, 5 became durable.
        assert ckpt.last_durable is not None and ckpt.last_durable.step == 5
        assert storage.put_calls == [1, 5]


def test_back_to_back_periodic_saves_skip_instead_of_stalling(tmp_path: Any) -> None:
    storage = SlowFlakyStorage(ck.LocalCheckpointStorage(str(tmp_path / "store"), "job-1"))
    with Checkpointer(storage, job_id="job-1", staging_dir=str(tmp_path / "st")) as ckpt:
        big = _state(1, size=20_000_000)
        ckpt.save(big, 1)
        ckpt.save(big, 2)  # the 80 MB write of step 1 is still running
        ckpt.flush()
        assert ckpt.skipped_saves == 1 and storage.put_calls == [1]


def test_unreachable_storage_retries_while_training_continues(tmp_path: Any) -> None:
    storage = SlowFlakyStorage(ck.LocalCheckpointStorage(str(tmp_path / "store"), "job-1"), failures=2)
    with Checkpointer(
        storage, job_id="job-1", staging_dir=str(tmp_path / "st"), retry_initial_seconds=0.05
    ) as ckpt:
        started = time.monotonic()
        ckpt.save(_state(7), 7)
        assert time.monotonic() - started < 0.5  # training is not held up
        assert ckpt.last_durable is None  # nothing durable yet...
        ckpt.flush(timeout=10)
        assert ckpt.last_durable is not None and ckpt.last_durable.step == 7  # ...then it is
    assert storage.put_calls == [7, 7, 7]


def test_urgent_save_times_out_with_a_clear_error(tmp_path: Any) -> None:
    storage = SlowFlakyStorage(ck.LocalCheckpointStorage(str(tmp_path / "store"), "job-1"), failures=10_000)
    ckpt = Checkpointer(storage, job_id="job-1", staging_dir=str(tmp_path / "st"), retry_initial_seconds=0.05)
    with pytest.raises(CheckpointFailed, match="not durable within"):
        ckpt.save_now(_state(1), 1, timeout=0.5)
    ckpt.close(flush=False)


def test_directory_mode_round_trip(tmp_path: Any, s3: Any) -> None:
    folder = tmp_path / "hf" / "checkpoint-4"
    (folder / "sub").mkdir(parents=True)
    (folder / "model.bin").write_bytes(os.urandom(70_000))
    (folder / "sub" / "trainer_state.json").write_text('{"global_step": 4}')
    storage = ck.S3CheckpointStorage(s3, BUCKET, "job-1")
    with Checkpointer(storage, job_id="job-1", staging_dir=str(tmp_path / "st")) as ckpt:
        ckpt.save(None, 4, directory=str(folder))
        ckpt.flush()
    with Checkpointer(storage, job_id="job-1", staging_dir=str(tmp_path / "st2")) as again:
        restored = again.restore_checkpoint()
        assert restored is not None and restored.files_dir is not None
        out = restored.files_dir
        with open(os.path.join(out, "model.bin"), "rb") as model:
            assert model.read() == (folder / "model.bin").read_bytes()
        with open(os.path.join(out, "sub", "trainer_state.json")) as trainer_state:
            assert trainer_state.read() == '{"global_step": 4}'


def test_signal_requests_an_urgent_save(tmp_path: Any) -> None:
    import signal

    with _local(tmp_path) as ckpt:
        ckpt.install_signal_handlers()
        os.kill(os.getpid(), signal.SIGUSR2)
        time.sleep(0.05)
        assert ckpt.requested and ckpt.due(3)
        durable = ckpt.save(_state(3), 3)
        assert durable is not None and not ckpt.should_stop()
        assert not ckpt.requested
    signal.signal(signal.SIGUSR1, signal.SIG_DFL)
    signal.signal(signal.SIGUSR2, signal.SIG_DFL)
    _ = threading  # the handlers only set flags; no thread is involved
