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
@pytest.mark.parametrize("one_pass", [True, False], ids=["one-pass", "two-pass"])
def test_corrupt_newest_is_skipped_with_its_name(
    tmp_path: Any, caplog: Any, fault: str, one_pass: bool
) -> None:
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
        # one pass: hashed while read into the host buffer; two: hashed, then read
        _assert_same(again.restore(reserve=one_pass), _state(1))
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


class GatedStorage(SlowFlakyStorage):
    """put_files of the first checkpoint blocks until `release` is set (a stuck upload)."""

    def __init__(self, inner: Any) -> None:
        super().__init__(inner)
        self.release = threading.Event()

    def put_files(self, step: int, files: Sequence[tuple[str, str]], cancelled: Callable[[], bool]) -> None:
        if not self.put_calls:
            self.put_calls.append(step)
            self.release.wait(30)
            self.inner.put_files(step, files, cancelled)
            return
        super().put_files(step, files, cancelled)


def test_periodic_saves_do_not_wait_for_a_slow_upload(tmp_path: Any) -> None:
    storage = GatedStorage(ck.LocalCheckpointStorage(str(tmp_path / "store"), "job-1"))
    with Checkpointer(storage, job_id="job-1", staging_dir=str(tmp_path / "st")) as ckpt:
        # Given the upload of step 1 stuck
        for step in range(1, 6):
            assert ckpt.save(_state(step), step) is None  # returns after the snapshot
            _wait_written(ckpt)
        # Then every save returned while nothing was durable yet (none waited for it)...
        assert ckpt.last_durable is None and storage.put_calls == [1]
        storage.release.set()
        ckpt.flush()
        # ...and of the ones queued meanwhile only the newest was uploaded (2-4 superseded)
        assert ckpt.last_durable is not None and ckpt.last_durable.step == 5
        assert storage.put_calls == [1, 5]
        assert ckpt.skipped_saves == 0


def _wait_written(ckpt: Checkpointer) -> None:
    """Until the writer released the host buffer (the local write is done)."""
    deadline = time.monotonic() + 30
    while ckpt._buffer_busy or ckpt._write_queue:
        assert time.monotonic() < deadline
        time.sleep(0.01)


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
        storage, job_id="job-1", staging_dir=str(tmp_path / "st"), retry_initial_seconds=1.0
    ) as ckpt:
        # Two failures mean >= 3 s of back-off before the upload can land: a save that
        # returns with nothing durable did not wait for the retries (training goes on).
        assert ckpt.save(_state(7), 7) is None
        assert ckpt.last_durable is None  # nothing durable yet...
        ckpt.flush(timeout=30)
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


@pytest.mark.parametrize("reserve", [True, False])
def test_restore_into_live_tensors_reuses_their_memory(tmp_path: Any, reserve: bool) -> None:
    with _local(tmp_path) as ckpt:
        ckpt.save_now(_state(4), 4)
    # Given live tensors of the same structure holding other values (a fresh model)
    live = _state(99)
    pointers = [live["weights"].data_ptr(), live["half"].data_ptr(), live["array"].ctypes.data]
    with _local_again(tmp_path) as again:
        restored = again.restore(into=live, reserve=reserve)
    # Then the checkpoint's values are in the very same buffers: no second copy
    _assert_same(restored, _state(4))
    assert restored["weights"] is live["weights"] and restored["array"] is live["array"]
    assert [live["weights"].data_ptr(), live["half"].data_ptr(), live["array"].ctypes.data] == pointers


def _local_again(tmp_path: Any) -> Checkpointer:
    storage = ck.LocalCheckpointStorage(str(tmp_path / "store"), "job-1")
    return Checkpointer(storage, job_id="job-1", staging_dir=str(tmp_path / "staging-restore"))


@pytest.mark.parametrize(
    ("change", "message"),
    [
        (lambda s: s.update(weights=torch.zeros(10)), r"tensor #0: checkpoint has torch float32\[50000\]"),
        (lambda s: s.update(half=s["half"].float()), r"tensor #1: .* live state has torch float32"),
        (lambda s: s.update(extra=torch.zeros(1)), "checkpoint holds 4 tensors/arrays, the live state 5"),
    ],
)
def test_restore_into_a_mismatched_state_names_the_difference(
    tmp_path: Any, change: Callable[[dict[str, Any]], None], message: str
) -> None:
    from trainctl.snapshot import SnapshotMismatch

    with _local(tmp_path) as ckpt:
        ckpt.save_now(_state(4), 4)
    live = _state(99)
    change(live)
    with _local_again(tmp_path) as again, pytest.raises(SnapshotMismatch, match=message):
        again.restore(into=live)


def test_reserve_prepares_the_buffer_so_the_first_save_does_not_allocate(tmp_path: Any) -> None:
    state = _state(1, size=3_000_000)
    with _local(tmp_path) as ckpt:
        # Given the buffer reserved in the background (as restore does)
        ckpt.reserve(state)
        ckpt.flush()  # waits for the reservation like for a snapshot being written
        buffer = ckpt._snapshotter.buffer
        reserved = (buffer.size, buffer.array.ctypes.data)
        assert reserved[0] >= ck_measure(state)
        # When the first save happens, it copies into that very buffer
        ckpt.save(state, 1)
        ckpt.flush()
        assert (buffer.size, buffer.array.ctypes.data) == reserved
        assert ckpt.last_durable is not None and ckpt.last_durable.step == 1
    with _local_again(tmp_path) as again:
        _assert_same(again.restore(), state)
        again.flush()
        # And a restore reserves for the restored size on its own
        assert again._snapshotter.buffer.size >= ck_measure(state)


def ck_measure(state: Any) -> int:
    from trainctl.snapshot import Snapshotter

    return Snapshotter.measure(state)


def test_an_older_periodic_checkpoint_is_never_published_after_an_urgent_one(tmp_path: Any) -> None:
    storage = SlowFlakyStorage(ck.LocalCheckpointStorage(str(tmp_path / "store"), "job-1"), delay=1.0)
    durable: list[int] = []
    with Checkpointer(storage, job_id="job-1", staging_dir=str(tmp_path / "st")) as ckpt:
        original = ckpt._after_durable

        def record(job: Any, outcome: Any) -> None:
            durable.append(outcome.step)
            original(job, outcome)

        ckpt._after_durable = record  # type: ignore[method-assign]
        # Given step 1 uploading slowly and step 2 staged, waiting for the link
        ckpt.save(_state(1), 1)
        time.sleep(0.2)
        ckpt.save(_state(2), 2)
        time.sleep(0.2)
        # When the notice's urgent checkpoint 3 becomes durable
        assert ckpt.save_now(_state(3), 3).step == 3
        ckpt.flush()
    # Then nothing older follows it (the agent would see a checkpoint going backwards)
    assert durable == [3]
    assert storage.inner.read_manifest(2) is None and storage.inner.read_manifest(1) is None


def test_a_failed_urgent_save_does_not_block_later_checkpoints(
    tmp_path: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    import trainctl.checkpoint as module

    real = module.write_snapshot
    calls = {"n": 0}

    def failing_once(*args: Any, **kwargs: Any) -> Any:
        calls["n"] += 1
        if calls["n"] == 1:
            raise OSError(28, "No space left on device (simulated)")
        return real(*args, **kwargs)

    monkeypatch.setattr(module, "write_snapshot", failing_once)
    with _local(tmp_path) as ckpt:
        # Given an urgent checkpoint whose staging failed (disk full)
        with pytest.raises(CheckpointFailed, match="No space left"):
            ckpt.save_now(_state(1), 1, timeout=30)
        # Then the next checkpoints still become durable
        ckpt.save(_state(2), 2)
        assert ckpt.flush(timeout=30) is not None
        assert ckpt.last_durable is not None and ckpt.last_durable.step == 2


def test_staging_clean_up_never_removes_a_newer_checkpoint_still_on_its_way(tmp_path: Any) -> None:
    with _local(tmp_path) as ckpt:
        staging = tmp_path / "staging"
        for step in (3, 5, 7):  # 7: just renamed into place by the writer, not queued yet
            (staging / f"{step:012d}").mkdir()
            (staging / f"{step:012d}" / "state.bin").write_bytes(b"x")
        # When step 5 becomes durable and staging is cleaned
        ckpt._clean_staging(keep=str(staging / f"{5:012d}"), below_step=5)
        # Then only the older one is gone
        assert sorted(p.name for p in staging.iterdir() if p.name.isdigit()) == [f"{5:012d}", f"{7:012d}"]
