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


def C(step: int, attempt: int = 0) -> ck.CheckpointId:
    return ck.CheckpointId(step, attempt)


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

    def put_files(
        self, checkpoint: ck.CheckpointId, files: Sequence[tuple[str, str]], cancelled: Callable[[], bool]
    ) -> None:
        self.put_calls.append(checkpoint.step)
        if self.failures > 0:
            self.failures -= 1
            raise ConnectionError("could not connect to the endpoint URL (simulated)")
        end = time.monotonic() + self.delay
        while time.monotonic() < end:
            if cancelled():
                return
            time.sleep(0.01)
        self.inner.put_files(checkpoint, files, cancelled)


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
    assert ck.LocalCheckpointStorage(str(tmp_path / "store"), "job-1").list_checkpoints() == [C(20), C(30)]
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
    assert durable is not None and durable.prefix == "job-1/ckpt/000000000005-a3/"
    keys = sorted(o["Key"] for o in s3.list_objects_v2(Bucket=BUCKET)["Contents"])
    assert keys == [f"job-1/ckpt/000000000005-a3/{n}" for n in ("manifest.json", "state.bin", "state.pkl")]
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
    newest = tmp_path / "store" / "job-1" / "ckpt" / "000000000002-a0"
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
    (tmp_path / "store" / "job-1" / "ckpt" / "000000000001-a0" / "manifest.json").unlink()
    with _local(tmp_path) as again:
        assert again.restore() is None
        assert again.fresh_reason and "step 1 (attempt 0): missing manifest" in again.fresh_reason


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
        outcome = ck.verify_checkpoint(storage, C(2), job_id="job-1", dest_dir=str(tmp_path / "v"))
        assert not isinstance(outcome, str)
        assert ckpt.should_stop()
        ckpt.flush()
    # And the slow periodic upload gave way (cancelled: no manifest for step 1)
    assert storage.inner.read_manifest(C(1)) is None


class GatedStorage(SlowFlakyStorage):
    """put_files of the first checkpoint blocks until `release` is set (a stuck upload)."""

    def __init__(self, inner: Any) -> None:
        super().__init__(inner)
        self.release = threading.Event()

    def put_files(
        self, checkpoint: ck.CheckpointId, files: Sequence[tuple[str, str]], cancelled: Callable[[], bool]
    ) -> None:
        if not self.put_calls:
            self.put_calls.append(checkpoint.step)
            self.release.wait(30)
            self.inner.put_files(checkpoint, files, cancelled)
            return
        super().put_files(checkpoint, files, cancelled)


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
    assert storage.inner.read_manifest(C(2)) is None and storage.inner.read_manifest(C(1)) is None


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


# --- requests: each urgent save answers only what arrived before its snapshot ------------


class FakeLink:
    """The agent's end of the Checkpointer's link: records messages, answers the fence."""

    def __init__(self, current: bool | None = True) -> None:
        self.current = current
        self.sent: list[dict[str, Any]] = []
        self.fences = 0

    def send(self, message: dict[str, Any]) -> None:
        self.sent.append(message)

    def is_current(self, timeout: float) -> bool | None:
        self.fences += 1
        return self.current

    def close(self) -> None:
        pass

    def ops(self, op: str) -> list[dict[str, Any]]:
        return [m for m in self.sent if m["op"] == op]


def test_a_stop_arriving_during_a_rebalance_save_is_not_lost(tmp_path: Any) -> None:
    storage = SlowFlakyStorage(ck.LocalCheckpointStorage(str(tmp_path / "store"), "job-1"), delay=1.0)
    link = FakeLink()
    with Checkpointer(storage, job_id="job-1", staging_dir=str(tmp_path / "st"), link=link) as ckpt:
        # Given a rebalance request (checkpoint, continue) whose urgent save is uploading
        ckpt.request(stop=False, ref=1)
        assert ckpt.due(10)
        saving = threading.Thread(target=lambda: ckpt.save(_state(10), 10))
        saving.start()
        time.sleep(0.3)
        # When the Spot notice arrives meanwhile (after that save's snapshot)
        ckpt.request(stop=True, ref=2)
        saving.join(30)
        # Then the rebalance checkpoint does not count as the notice's: training is not
        # told to stop on it, and the next save is urgent again
        assert not ckpt.should_stop()
        assert ckpt.requested and ckpt.due(11)
        assert [m["answers"] for m in link.ops("durable")] == [1]
        durable = ckpt.save(_state(11), 11)
        assert durable is not None and durable.step == 11
        # And only the checkpoint whose snapshot followed the notice answers it
        assert ckpt.should_stop()
        assert [(m["step"], m["answers"]) for m in link.ops("durable")] == [(10, 1), (11, 2)]


def test_requests_before_the_snapshot_are_answered_by_one_save(tmp_path: Any) -> None:
    link = FakeLink()
    with _local(tmp_path, link=link) as ckpt:
        ckpt.request(stop=False, ref=4)
        ckpt.request(stop=True, ref=5)
        assert ckpt.save(_state(3), 3) is not None
        assert ckpt.should_stop() and not ckpt.requested
    assert [m["answers"] for m in link.ops("durable")] == [5]


def test_a_periodic_checkpoint_answers_no_request(tmp_path: Any) -> None:
    link = FakeLink()
    with _local(tmp_path, link=link) as ckpt:
        ckpt.save(_state(1), 1)
        ckpt.flush()
    (durable,) = link.ops("durable")
    assert durable["answers"] is None and durable["urgent"] is False


# --- the request's deadline bounds its urgent save --------------------------------------------


def test_a_stop_notice_checkpoint_gives_up_at_its_deadline_and_says_so(tmp_path: Any) -> None:
    storage = SlowFlakyStorage(ck.LocalCheckpointStorage(str(tmp_path / "store"), "job-1"), failures=10_000)
    link = FakeLink()
    ckpt = Checkpointer(
        storage, job_id="job-1", staging_dir=str(tmp_path / "st"), link=link, retry_initial_seconds=0.05
    )
    # Given a notice whose deadline is 1.5 s away and storage that never answers
    ckpt.request(stop=True, deadline=time.time() + 1.5, ref=7)
    started = time.monotonic()
    # Then the save waits until the deadline, not forever, and fails naming it
    with pytest.raises(
        CheckpointFailed, match=r"not durable within 1\.\d s \(the deadline of the request it answers\)"
    ):
        ckpt.save(_state(1), 1)
    assert 1.0 <= time.monotonic() - started < 10
    # And the agent is told at once, for that request
    (failed,) = link.ops("checkpoint-failed")
    assert failed["answers"] == 7 and "not durable" in failed["error"]
    assert not ckpt.requested  # answered (with a failure): saves are periodic again
    ckpt.close(flush=False)


def test_a_failed_rebalance_checkpoint_does_not_stop_training(tmp_path: Any) -> None:
    storage = SlowFlakyStorage(ck.LocalCheckpointStorage(str(tmp_path / "store"), "job-1"), failures=10_000)
    link = FakeLink()
    ckpt = Checkpointer(
        storage, job_id="job-1", staging_dir=str(tmp_path / "st"), link=link, retry_initial_seconds=0.05
    )
    # An ISO 8601 deadline, as the agent forwards it
    ckpt.request(stop=False, deadline=ck.format_time(ck.utcnow()), ref=3)
    assert ckpt.save(_state(1), 1) is None  # logged, not raised: training goes on
    assert [m["answers"] for m in link.ops("checkpoint-failed")] == [3]
    assert not ckpt.requested and not ckpt.should_stop()
    ckpt.close(flush=False)


# --- fencing: attempts never overwrite each other; no answer means no write ---------------------


def _attempt(tmp_path: Any, attempt: int, **kwargs: Any) -> Checkpointer:
    storage = ck.LocalCheckpointStorage(str(tmp_path / "store"), "job-1")
    return Checkpointer(
        storage, job_id="job-1", staging_dir=str(tmp_path / f"st-{attempt}"), attempt=attempt, **kwargs
    )


def test_an_old_attempts_late_save_cannot_replace_a_newer_attempts_checkpoint(tmp_path: Any) -> None:
    # Given attempt 1 made step 10 durable (its resume point for attempt 2)
    with _attempt(tmp_path, 1) as newer:
        newer.save_now(_state(10), 10)
    store = tmp_path / "store" / "job-1" / "ckpt"
    kept = {p.name: p.read_bytes() for p in (store / "000000000010-a1").iterdir()}
    # When attempt 0 comes back (a stopped instance) and, racing the hand-over, saves the
    # same step (other content) and a later one
    with _attempt(tmp_path, 0) as old:
        old.save_now(_state(99), 10)
        old.save_now(_state(98), 20)
    # Then attempt 1's checkpoint is untouched, byte for byte
    assert {p.name: p.read_bytes() for p in (store / "000000000010-a1").iterdir()} == kept
    # And attempt 2, resuming from the row's resume point, restores exactly it
    with _attempt(tmp_path, 2, resume_step=10, resume_attempt=1) as resumed:
        _assert_same(resumed.restore(), _state(10))
        assert resumed.restored is not None and resumed.restored.checkpoint == C(10, 1)


def test_from_env_takes_the_resume_checkpoint_from_the_rows_prefix(tmp_path: Any) -> None:
    environ = {
        "TRAINCTL_JOB_ID": "job-1",
        "TRAINCTL_CHECKPOINT_DIR": str(tmp_path / "store"),
        "TRAINCTL_ATTEMPT": "2",
        "TRAINCTL_RESUME_STEP": "10",
        "TRAINCTL_RESUME_PREFIX": "job-1/ckpt/000000000010-a1/",
        "TRAINCTL_AGENT_SOCKET": str(tmp_path / "agent.sock"),  # the agent's, unreachable
    }
    ckpt = Checkpointer.from_env(environ, install_signal_handlers=False)
    try:
        # Under the agent (attempt and socket set): fenced, even with the agent unreachable
        assert ckpt.resume == C(10, 1) and ckpt.managed and ckpt.attempt == 2
    finally:
        ckpt.close(flush=False)
    # An attempt without an agent socket is a local run: nobody to ask, nothing fenced
    del environ["TRAINCTL_AGENT_SOCKET"]
    local = Checkpointer.from_env(environ, install_signal_handlers=False)
    try:
        assert not local.managed and local.save_now(_state(1), 11).checkpoint == C(11, 2)
    finally:
        local.close()


def test_managed_save_without_the_agents_answer_writes_nothing(tmp_path: Any) -> None:
    # Given a training process under the agent whose agent does not answer the fence
    link = FakeLink(current=None)
    with _attempt(tmp_path, 1, link=link, managed=True, retry_initial_seconds=0.05) as ckpt:
        assert ckpt.save(_state(5), 5) is None
        assert ckpt.flush(timeout=1.0) is None
        # Then nothing was published, nor any file written, and it keeps asking
        assert ckpt.last_durable is None and link.fences >= 2
        assert not (tmp_path / "store").exists()
        # When the agent answers again, the retried upload lands
        link.current = True
        durable = ckpt.flush(timeout=30)
        assert durable is not None and durable.checkpoint == C(5, 1)


def test_managed_save_without_any_agent_link_writes_nothing(tmp_path: Any) -> None:
    ckpt = _attempt(tmp_path, 1, managed=True, retry_initial_seconds=0.05)
    ckpt.save(_state(5), 5)
    assert ckpt.flush(timeout=1.0) is None and not (tmp_path / "store").exists()
    ckpt.close(flush=False)


def test_a_superseded_attempt_writes_no_file_at_all(tmp_path: Any) -> None:
    link = FakeLink(current=False)
    with _attempt(tmp_path, 0, link=link, managed=True) as ckpt:
        with pytest.raises(CheckpointFailed, match="no longer the job's current one"):
            ckpt.save_now(_state(5), 5, timeout=30)
        assert ckpt.superseded
    assert not (tmp_path / "store").exists()


def test_a_local_run_without_an_agent_still_checkpoints(tmp_path: Any) -> None:
    with _attempt(tmp_path, 0) as ckpt:  # not managed, no link: nobody to ask
        assert ckpt.save_now(_state(5), 5).checkpoint == C(5, 0)


def test_retention_never_deletes_a_newer_attempts_checkpoints(tmp_path: Any) -> None:
    with _attempt(tmp_path, 3) as newest:
        newest.save_now(_state(1), 1)
    with _attempt(tmp_path, 2, keep=2) as older:
        for step in (10, 20, 30):
            older.save_now(_state(step), step)
    listed = ck.LocalCheckpointStorage(str(tmp_path / "store"), "job-1").list_checkpoints()
    assert listed == [C(1, 3), C(20, 2), C(30, 2)]


# --- retention never removes what the job row may still name -----------------------------------


def test_keep_1_still_keeps_the_checkpoint_the_row_names_until_a_newer_one_is_durable(
    tmp_path: Any,
) -> None:
    # Given attempt 1 keeping one checkpoint; the agent recorded step 10 on the row
    with _attempt(tmp_path, 1, keep=1) as ckpt:
        ckpt.save_now(_state(10), 10)
        # When step 20 becomes durable (the agent records it on the row a moment later)
        ckpt.save_now(_state(20), 20)
        listed = ck.LocalCheckpointStorage(str(tmp_path / "store"), "job-1").list_checkpoints()
        # Then step 10 is still there: an interruption right now resumes from it
        assert listed == [C(10, 1), C(20, 1)]
        ckpt.save_now(_state(30), 30)
    assert ck.LocalCheckpointStorage(str(tmp_path / "store"), "job-1").list_checkpoints() == [
        C(20, 1),
        C(30, 1),
    ]
    with _attempt(tmp_path, 2, resume_step=20, resume_attempt=1) as resumed:
        _assert_same(resumed.restore(), _state(20))


def test_a_row_lagging_behind_retention_resumes_from_the_newest_checkpoint_of_its_attempt(
    tmp_path: Any,
) -> None:
    # Given attempt 1 checkpointed steps 10-40 (keep 2: 10 and 20 are gone) while the row,
    # its updates failing, still names step 10
    with _attempt(tmp_path, 1, keep=2) as ckpt:
        for step in (10, 20, 30, 40):
            ckpt.save_now(_state(step), step)
    # And an older attempt's late upload above it, and a newer attempt's checkpoint
    with _attempt(tmp_path, 0, keep=10) as stale:
        stale.save_now(_state(90), 50)
    with _attempt(tmp_path, 3, keep=10) as newer:
        newer.save_now(_state(91), 45)
    # When attempt 2 restores the row's resume point
    with _attempt(tmp_path, 2, resume_step=10, resume_attempt=1) as resumed:
        state = resumed.restore()
        # Then it continues attempt 1's history from its newest checkpoint, not fresh
        assert resumed.restored is not None and resumed.restored.checkpoint == C(40, 1)
        _assert_same(state, _state(40))


# --- saving a durable step again never rewrites it in place ----------------------------------------


class RecordingStorage(SlowFlakyStorage):
    """Records the order of writes (put_files, put_manifest, delete) per checkpoint."""

    def __init__(self, inner: Any) -> None:
        super().__init__(inner)
        self.calls: list[tuple[str, int]] = []

    def put_files(
        self, checkpoint: ck.CheckpointId, files: Sequence[tuple[str, str]], cancelled: Callable[[], bool]
    ) -> None:
        self.calls.append(("files", checkpoint.step))
        super().put_files(checkpoint, files, cancelled)

    def put_manifest(self, checkpoint: ck.CheckpointId, manifest: bytes) -> None:
        self.calls.append(("manifest", checkpoint.step))
        self.inner.put_manifest(checkpoint, manifest)

    def delete(self, checkpoint: ck.CheckpointId) -> None:
        self.calls.append(("delete", checkpoint.step))
        self.inner.delete(checkpoint)


def test_the_final_save_of_an_already_durable_step_uploads_nothing(tmp_path: Any) -> None:
    storage = RecordingStorage(ck.LocalCheckpointStorage(str(tmp_path / "store"), "job-1"))
    with Checkpointer(storage, job_id="job-1", staging_dir=str(tmp_path / "st")) as ckpt:
        # Given step 5 saved periodically and durable
        ckpt.save(_state(5), 5)
        first = ckpt.flush()
        assert first is not None
        before = {
            p.name: p.stat().st_mtime_ns for p in (tmp_path / "store/job-1/ckpt/000000000005-a0").iterdir()
        }
        # When training ends at step 5 and saves it again, unchanged
        final = ckpt.save_now(_state(5), 5)
    # Then that durable checkpoint is the answer; nothing was written again
    assert (final.step, final.size) == (5, first.size)
    assert ck.format_time(final.created_at) == ck.format_time(first.created_at)  # the same checkpoint
    assert storage.calls == [("files", 5), ("manifest", 5)]
    after = {p.name: p.stat().st_mtime_ns for p in (tmp_path / "store/job-1/ckpt/000000000005-a0").iterdir()}
    assert after == before


def test_resaving_a_durable_step_with_other_content_retracts_it_first(tmp_path: Any) -> None:
    storage = RecordingStorage(ck.LocalCheckpointStorage(str(tmp_path / "store"), "job-1"))
    with Checkpointer(storage, job_id="job-1", staging_dir=str(tmp_path / "st")) as ckpt:
        ckpt.save_now(_state(5), 5)
        ckpt.save_now(_state(6), 5)  # the same step, other state
    # The old checkpoint went (manifest first) before any new file was written
    assert storage.calls == [("files", 5), ("manifest", 5), ("delete", 5), ("files", 5), ("manifest", 5)]
    with _local_again(tmp_path) as again:
        _assert_same(again.restore(), _state(6))


def test_new_metadata_for_the_same_files_replaces_only_the_manifest(tmp_path: Any) -> None:
    storage = RecordingStorage(ck.LocalCheckpointStorage(str(tmp_path / "store"), "job-1"))
    with Checkpointer(storage, job_id="job-1", staging_dir=str(tmp_path / "st")) as ckpt:
        ckpt.save_now(_state(5), 5, extra={"note": "periodic"})
        ckpt.save_now(_state(5), 5, extra={"note": "final"})
    assert storage.calls == [("files", 5), ("manifest", 5), ("manifest", 5)]
    manifest = ck.parse_manifest(storage.inner.read_manifest(C(5)) or b"")
    assert manifest.extra == {"note": "final"}


RESAVE_CHILD = os.path.join(os.path.dirname(__file__), "resave_child.py")


@pytest.mark.parametrize("content", ["same", "other"])
@pytest.mark.parametrize("point", ["files", "manifest", "delete"])
def test_kill_9_in_the_middle_of_resaving_a_durable_step_leaves_a_verified_newest(
    tmp_path: Any, content: str, point: str
) -> None:
    import subprocess
    import sys

    # Given a training process whose step 2 is durable, saving step 2 again; it is killed
    # with SIGKILL right before the re-save's first write of the kind `point`, if any
    store, staging = tmp_path / "store", tmp_path / "staging"
    process = subprocess.Popen(
        [sys.executable, RESAVE_CHILD, str(store), str(staging), content, point],
        stdout=subprocess.PIPE,
        text=True,
    )
    assert process.stdout is not None
    lines = []
    for line in process.stdout:
        lines.append(line.strip())
        if line.startswith(("paused", "resaved")):
            break
    process.kill()
    process.wait()
    process.stdout.close()
    assert "durable 2" in lines, lines
    # Then every checkpoint with a manifest verifies, and restore finds the newest
    storage = ck.LocalCheckpointStorage(str(store), "kill")
    for checkpoint in storage.list_checkpoints():
        if storage.read_manifest(checkpoint) is not None:
            outcome = ck.verify_checkpoint(storage, checkpoint, job_id="kill", dest_dir=str(tmp_path / "v"))
            assert not isinstance(outcome, str), (checkpoint, outcome)
    with Checkpointer(storage, job_id="kill", staging_dir=str(tmp_path / "r")) as ckpt:
        state = ckpt.restore()
        assert state is not None
        # The same content: step 2 as it was. Other content: step 2 either way (killed
        # after the retraction, so step 1), never an unverifiable one skipped.
        if content == "same":
            assert ckpt.restored_step == 2 and int(state["data"][0]) == 2
        else:
            assert ckpt.restored_step in (1, 2)
        assert np.all(state["data"] == state["data"][0])


# --- bounds: save_now never waits forever; urgent retries fit the notice ------------------------


def test_save_now_gives_up_waiting_for_a_stuck_write_at_its_timeout(
    tmp_path: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    import trainctl.checkpoint as module
    from trainctl.checkpoint import CheckpointTimeout

    real, stuck = module.write_snapshot, threading.Event()

    def hanging(*args: Any, **kwargs: Any) -> Any:
        stuck.wait(30)  # a disk that stopped answering
        return real(*args, **kwargs)

    monkeypatch.setattr(module, "write_snapshot", hanging)
    ckpt = _local(tmp_path)
    try:
        # Given a periodic snapshot whose write hangs (the host buffer stays busy)
        ckpt.save(_state(1), 1)
        outcome: dict[str, Any] = {}

        def urgent() -> None:
            try:
                ckpt.save_now(_state(2), 2, timeout=0.5)
            except CheckpointFailed as exc:
                outcome["error"] = exc

        thread = threading.Thread(target=urgent, daemon=True)
        thread.start()
        thread.join(20)
        # Then the urgent save raised its typed timeout instead of waiting for the buffer
        assert not thread.is_alive(), "save_now waited for the host buffer past its timeout"
        assert isinstance(outcome.get("error"), CheckpointTimeout)
        assert "not started within 0.5 s" in str(outcome["error"])
    finally:
        stuck.set()
        ckpt.close()


def test_save_now_without_any_deadline_is_bounded_by_save_timeout_seconds(tmp_path: Any) -> None:
    from trainctl.checkpoint import CheckpointTimeout

    storage = SlowFlakyStorage(ck.LocalCheckpointStorage(str(tmp_path / "store"), "job-1"), failures=10_000)
    ckpt = Checkpointer(
        storage,
        job_id="job-1",
        staging_dir=str(tmp_path / "st"),
        retry_initial_seconds=0.05,
        save_timeout_seconds=0.5,
    )
    outcome: dict[str, Any] = {}

    def final_save() -> None:  # no request pending, storage down for good
        try:
            ckpt.save_now(_state(1), 1)
        except CheckpointFailed as exc:
            outcome["error"] = exc

    thread = threading.Thread(target=final_save, daemon=True)
    thread.start()
    thread.join(20)
    try:
        assert not thread.is_alive(), "save_now waited forever for storage that stays down"
        assert isinstance(outcome.get("error"), CheckpointTimeout)
        assert "(save_timeout_seconds)" in str(outcome["error"])
    finally:
        ckpt.close(flush=False)


def test_urgent_upload_retries_wait_a_fraction_of_the_time_left() -> None:
    from trainctl.checkpoint import URGENT_RETRY_MAX_SECONDS, retry_wait

    # Periodic uploads back off as configured (training goes on meanwhile)
    assert retry_wait(30.0, urgent=False, deadline=None, now=0.0) == 30.0
    # An urgent one never waits long: someone is waiting for it
    assert retry_wait(30.0, urgent=True, deadline=None, now=0.0) == URGENT_RETRY_MAX_SECONDS
    assert retry_wait(0.5, urgent=True, deadline=None, now=0.0) == 0.5
    # And, with the notice's deadline 8 s away, at most an eighth of what is left
    assert retry_wait(30.0, urgent=True, deadline=108.0, now=100.0) == 1.0
    assert retry_wait(30.0, urgent=True, deadline=100.0, now=101.0) == 0.05  # past: try again soon


def test_an_urgent_save_retried_through_failures_lands_before_its_notice_deadline(tmp_path: Any) -> None:
    # Given storage failing 5 times: the periodic back-off (0.5, 1, 2, 4, 8 s) would need
    # 15 s before the sixth try
    storage = SlowFlakyStorage(ck.LocalCheckpointStorage(str(tmp_path / "store"), "job-1"), failures=5)
    link = FakeLink()
    with Checkpointer(
        storage, job_id="job-1", staging_dir=str(tmp_path / "st"), link=link, retry_initial_seconds=0.5
    ) as ckpt:
        # When a notice with 8 s left asks for a checkpoint
        ckpt.request(stop=True, deadline=time.time() + 8.0, ref=1)
        durable = ckpt.save(_state(1), 1)
    # Then it became durable within the notice, on the sixth try
    assert durable is not None and durable.step == 1
    assert storage.put_calls == [1] * 6
    assert not link.ops("checkpoint-failed")


def test_an_urgent_save_is_uploaded_only_once_its_staged_files_are_in_place(
    tmp_path: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    class CheckingStorage(SlowFlakyStorage):
        def put_files(
            self, checkpoint: ck.CheckpointId, files: Sequence[tuple[str, str]], cancelled: Callable[[], bool]
        ) -> None:
            self.missing = [local for local, _ in files if not os.path.exists(local)]
            super().put_files(checkpoint, files, cancelled)

    storage = CheckingStorage(ck.LocalCheckpointStorage(str(tmp_path / "store"), "job-1"))
    # Widen the moment between the staging rename and the staged paths being known (the
    # writer computes them with relpath): an uploader that looked too early would see
    # the pre-rename paths, fail on a missing file and wait a retry back-off.
    real_relpath = os.path.relpath

    def slow_relpath(*args: Any, **kwargs: Any) -> str:
        if threading.current_thread().name == "trainctl-ckpt-writer":
            time.sleep(0.4)
        return real_relpath(*args, **kwargs)

    monkeypatch.setattr(os.path, "relpath", slow_relpath)
    with Checkpointer(
        storage, job_id="job-1", staging_dir=str(tmp_path / "st"), retry_initial_seconds=5.0
    ) as ckpt:
        durable = ckpt.save_now(_state(1), 1, timeout=30)
    assert durable.step == 1
    assert storage.put_calls == [1] and storage.missing == []


def test_the_staging_rename_is_made_durable(tmp_path: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    import trainctl.checkpoint as module

    real, seen = module._fsync_dir, []

    def record(path: str) -> None:
        # What the directory holds when it is fsynced: the rename must be done by then
        seen.append((path, sorted(os.listdir(path))))
        real(path)

    monkeypatch.setattr(module, "_fsync_dir", record)
    with _local(tmp_path) as ckpt:
        ckpt.save_now(_state(1), 1)
    staging = str(tmp_path / "staging")
    assert (staging, [f"{1:012d}"]) in seen


# --- restore: no leftover copy ---------------------------------------------------------------


def test_a_restore_from_s3_leaves_no_fetched_copy_behind(tmp_path: Any, s3: Any) -> None:
    storage = ck.S3CheckpointStorage(s3, BUCKET, "job-1")
    with Checkpointer(storage, job_id="job-1", staging_dir=str(tmp_path / "st")) as ckpt:
        for step in (1, 2):
            ckpt.save_now(_state(step), step)
    # Given the newest checkpoint corrupt in S3 (it is fetched, then skipped)
    key = "job-1/ckpt/000000000002-a0/state.bin"
    s3.put_object(Bucket=BUCKET, Key=key, Body=b"x" * 1000)
    for reserve in (True, False):
        staging = tmp_path / f"restore-{reserve}"
        with Checkpointer(storage, job_id="job-1", staging_dir=str(staging)) as again:
            _assert_same(again.restore(reserve=reserve), _state(1))
            # Then, the state in memory, neither the used nor the skipped copy stays on disk
            assert not (staging / "restore").exists()
