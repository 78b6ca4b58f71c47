"""The Checkpointer: what a training script uses to save and restore.

    ckpt = Checkpointer.from_env()
    state = ckpt.restore()                # newest verified checkpoint, or None ("starting fresh")
    for step in range(start, steps):
        ...
        if ckpt.due(step):
            ckpt.save(make_state(), step)  # stall = one memcpy; write + upload in background
        if ckpt.should_stop():            # the agent got the interruption notice
            break

Pipeline: `save` snapshots into a reused host buffer (the only stall) and hands it to a
writer thread (buffer -> staging dir, fsync, hash, atomic rename), which hands the staged
files to an uploader thread (files concurrently via s3transfer, `manifest.json` last).
When the agent forwards a notice (IPC message and/or SIGUSR1), the *next* `save` is
urgent: it waits for the buffer if a write is running, cancels a periodic upload in
progress, and returns only once its manifest is durable.

Requests are numbered as they arrive. An urgent checkpoint answers exactly the requests
that arrived before its snapshot: one that arrives while it is being written or uploaded
(a Spot notice during a rebalance checkpoint) stays pending and makes the next `save`
urgent again, and the `durable` message to the agent names the newest agent request it
answers, so the agent never takes a snapshot from before a notice for the notice's
checkpoint.

Saving step N again when N is already durable under this attempt's key (a periodic save
at N, then the final `save_now` at N) never rewrites it in place: identical files are
not uploaded again, and different ones are written only after the old manifest is
gone, so a crash mid-way never leaves an old manifest over new files.

Restore reads storage with a bounded retry for errors that say nothing about the
checkpoint (network, throttling; `StorageError`); only a missing or invalid manifest, a
missing file or a size/hash mismatch makes it skip a checkpoint, and an outage that
outlasts the retries raises `RestoreFailed` rather than starting fresh.

Fencing (DESIGN §2): under the agent (`TRAINCTL_ATTEMPT` and the agent socket set)
nothing is written to storage unless the agent confirms this attempt is still the job's
current one, asked before the files and again before the manifest; no answer means no
(the upload is retried). Checkpoint keys carry the attempt, so even a write that raced
the hand-over lands beside, never over, a newer attempt's checkpoint.
"""

from __future__ import annotations

import itertools
import logging
import os
import shutil
import signal
import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any, NoReturn, Protocol, TypeVar

from trainctl import runtime_env as env
from trainctl.snapshot import (
    DATA_FILE,
    SKELETON_FILE,
    Snapshot,
    Snapshotter,
    load_snapshot,
    load_snapshot_from_buffer,
    read_into_buffer,
    write_snapshot,
)
from trainctl_core import checkpoints as layout
from trainctl_core.checkpoints import (
    CheckpointId,
    CheckpointStorage,
    LocalCheckpointStorage,
    Manifest,
    ManifestFile,
    S3CheckpointStorage,
    Skipped,
)
from trainctl_core.jobs import CheckpointRef

logger = logging.getLogger("trainctl.checkpoint")

_T = TypeVar("_T")

FILES_DIR = "files"
"""Directory-mode files (HF/Lightning checkpoint folders) live under this sub-path."""


class CheckpointFailed(RuntimeError):
    """An urgent checkpoint could not be written or did not become durable in time."""


class CheckpointTimeout(CheckpointFailed):
    """An urgent checkpoint was not durable by its deadline (the request's or `timeout`)."""


class RestoreFailed(RuntimeError):
    """The checkpoint storage could not be read (for longer than the retries allow, or
    refused): restore neither guesses nor starts fresh over checkpoints that may be intact."""


class FenceUnanswered(RuntimeError):
    """Under the agent, nobody confirmed that this attempt is still current: not publishing."""


class AgentLink(Protocol):
    """The Checkpointer's line to the agent (see trainctl.agent.ipc.AgentConnection)."""

    def send(self, message: dict[str, Any]) -> None: ...

    def is_current(self, timeout: float) -> bool | None: ...

    def close(self) -> None: ...


@dataclass(frozen=True)
class DurableCheckpoint:
    step: int
    location: str
    prefix: str
    attempt: int
    created_at: datetime
    urgent: bool
    size: int

    def ref(self) -> CheckpointRef:
        return CheckpointRef(
            step=self.step, prefix=self.prefix, attempt=self.attempt, created_at=self.created_at
        )

    @property
    def checkpoint(self) -> CheckpointId:
        return CheckpointId(self.step, self.attempt)


@dataclass(frozen=True)
class Restored:
    step: int
    manifest: Manifest
    # Relative path -> local file. A copy fetched from remote storage lasts until
    # `release_restored_files` (which `restore` calls once the state is loaded).
    paths: dict[str, str]

    @property
    def checkpoint(self) -> CheckpointId:
        return CheckpointId(self.manifest.step, self.manifest.attempt)

    @property
    def files_dir(self) -> str | None:
        """Local folder holding the directory-mode files (for `resume_from_checkpoint`)."""
        for relative, local in self.paths.items():
            if relative.startswith(FILES_DIR + "/"):
                return local[: -len(relative)] + FILES_DIR
        return None


@dataclass(frozen=True)
class _Request:
    """One checkpoint request (a signal, or the agent's IPC message)."""

    seq: int  # arrival order, from one counter
    stop: bool
    deadline: float | None = None  # epoch seconds: the urgent save's timeout
    ref: int | None = None  # the agent's id for it, echoed in the `durable` message


@dataclass
class _Save:
    step: int
    urgent: bool
    snapshot: Snapshot | None
    directory: str | None
    extra: dict[str, Any]
    covers: int = 0  # urgent: the newest request (seq) that arrived before its snapshot
    answers: int | None = None  # urgent: the newest agent request (ref) among those
    created_at: datetime = field(default_factory=layout.utcnow)
    files: list[tuple[str, ManifestFile]] = field(default_factory=list)  # (local path, entry)
    done: threading.Event = field(default_factory=threading.Event)
    result: DurableCheckpoint | None = None
    error: BaseException | None = None
    dropped: bool = False
    # Set last, under the lock, once `files` name the staged paths: the uploader takes
    # an urgent save as soon as it sees `staged`.
    staged: str | None = None
    deadline: float | None = None  # urgent: epoch seconds it must be durable by, if known


class Checkpointer:
    """Stall-free, verified checkpoints; see the module docstring for the pipeline."""

    def __init__(
        self,
        storage: CheckpointStorage,
        *,
        job_id: str,
        staging_dir: str,
        attempt: int = 0,
        instance_id: str = "local",
        keep: int = 3,
        interval_seconds: float | None = None,
        interval_steps: int | None = None,
        resume_step: int | None = None,
        resume_attempt: int | None = None,
        managed: bool = False,
        framework: str = "generic",
        link: AgentLink | None = None,
        direct_io: bool = True,
        retry_initial_seconds: float = 1.0,
        retry_max_seconds: float = 30.0,
        save_timeout_seconds: float | None = 1800.0,
        restore_retry_seconds: float = 300.0,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        """`keep`: how many checkpoints retention keeps; never fewer than 2, because the job
        row may still name the one before the newest. `save_timeout_seconds`: how long
        `save_now` waits when neither its `timeout` nor a pending request's deadline bounds
        it (None: until durable). `restore_retry_seconds`: how long restore retries storage
        that cannot be read before it raises `RestoreFailed`."""
        if keep < 1:
            raise ValueError(f"keep must be at least 1 (got {keep})")
        self.storage = storage
        self.job_id = job_id
        self.attempt = attempt
        self.instance_id = instance_id
        self.keep = keep
        self.interval_seconds = interval_seconds
        self.interval_steps = interval_steps
        self.resume_step = resume_step
        # The resume point the job row names, when its attempt is known: restored first,
        # and no other attempt's checkpoint at its step (or above) is taken instead.
        self.resume = (
            CheckpointId(resume_step, resume_attempt)
            if resume_step is not None and resume_attempt is not None
            else None
        )
        # Run by the agent: publishing needs the agent's "still current" (fail closed).
        self.managed = managed
        self.framework = framework
        self.staging_dir = staging_dir
        self.link = link
        self.direct_io = direct_io
        self._retry_initial = retry_initial_seconds
        self._retry_max = retry_max_seconds
        self._save_timeout = save_timeout_seconds
        self._restore_retry = restore_retry_seconds
        self._clock = clock
        self._snapshotter = Snapshotter()
        self._cv = threading.Condition()
        self._buffer_busy = False
        self._write_queue: list[_Save] = []
        self._upload_pending: _Save | None = None  # newest periodic save waiting to upload
        self._upload_urgent: _Save | None = None
        self._closing = False
        self._owns_storage = False  # from_env builds (and so closes) its own storage
        self._uploading = False
        self.superseded = False
        # Requests arrive from a signal handler or the agent link, so no locks here (a
        # signal handler must not take one): `next()` on a counter and `list.append` are
        # atomic. The list only grows by one per request (a handful per job).
        self._request_ids = itertools.count(1)
        self._requests: list[_Request] = []
        self._answered = 0  # newest request seq an urgent save answered (durable or failed)
        self._last_save_at = clock()
        self._last_progress_at = 0.0
        self.last_durable: DurableCheckpoint | None = None
        self.restored_step: int | None = None
        self.restored: Restored | None = None
        self.fresh_reason: str | None = None
        self.skipped_saves = 0
        self._buffer_step: int | None = None  # the checkpoint whose data restore read into the buffer
        os.makedirs(staging_dir, exist_ok=True)
        self._writer = threading.Thread(target=self._write_loop, name="trainctl-ckpt-writer", daemon=True)
        self._uploader = threading.Thread(
            target=self._upload_loop, name="trainctl-ckpt-uploader", daemon=True
        )
        self._writer.start()
        self._uploader.start()

    # --- construction ---------------------------------------------------------------------

    @classmethod
    def from_env(
        cls,
        environ: Mapping[str, str] | None = None,
        *,
        s3_client: Any = None,
        install_signal_handlers: bool = True,
        **overrides: Any,
    ) -> Checkpointer:
        """Build from the `TRAINCTL_*` variables the agent sets (or local defaults).

        With `TRAINCTL_CHECKPOINT_BUCKET` checkpoints go to S3, else to the local directory
        `TRAINCTL_CHECKPOINT_DIR` (default `./checkpoints`), same layout.
        """
        source = os.environ if environ is None else environ
        job_id = source.get(env.JOB_ID, "local")
        bucket = source.get(env.CHECKPOINT_BUCKET)
        storage: CheckpointStorage
        if bucket:
            if s3_client is None:
                from trainctl_core import clients

                s3_client = clients.client("s3", source.get(env.REGION) or None)
            storage = S3CheckpointStorage(s3_client, bucket, job_id)
        else:
            storage = LocalCheckpointStorage(source.get(env.CHECKPOINT_DIR, "checkpoints"), job_id)
        link = None
        socket_path = source.get(env.AGENT_SOCKET)
        if socket_path:
            from trainctl.agent.ipc import AgentConnection

            link = AgentConnection.try_connect(socket_path)
        resume = source.get(env.RESUME_STEP)
        # The row's resume prefix names the checkpoint exactly (step and attempt).
        named = layout.checkpoint_id_of(source.get(env.RESUME_PREFIX, ""))
        interval = source.get(env.CHECKPOINT_INTERVAL_SECONDS)
        kwargs: dict[str, Any] = {
            "job_id": job_id,
            "attempt": int(source.get(env.ATTEMPT, "0")),
            "instance_id": source.get(env.INSTANCE_ID, "local"),
            "keep": int(source.get(env.CHECKPOINT_KEEP, "3")),
            "interval_seconds": float(interval) if interval else None,
            "resume_step": int(resume) if resume else None,
            "resume_attempt": named.attempt
            if named is not None and resume and named.step == int(resume)
            else None,
            # Run by the agent (it sets both): publish only what it confirms. An attempt
            # without an agent socket is a local run standing in for one (nobody to ask).
            "managed": bool(source.get(env.ATTEMPT)) and bool(socket_path),
            "staging_dir": source.get(env.STAGING_DIR)
            or os.path.join(
                source.get(env.CHECKPOINT_DIR, "checkpoints") if not bucket else env.DEFAULT_STAGING_DIR,
                ".staging",
            ),
            "link": link,
        }
        kwargs.update(overrides)
        checkpointer = cls(storage, **kwargs)
        checkpointer._owns_storage = True
        if link is not None:
            link.attach(checkpointer)  # type: ignore[attr-defined]
        if install_signal_handlers:
            checkpointer.install_signal_handlers()
        return checkpointer

    def install_signal_handlers(self) -> None:
        """SIGUSR1: checkpoint now and stop (notice); SIGUSR2: checkpoint now, continue."""
        if threading.current_thread() is not threading.main_thread():
            return
        signal.signal(signal.SIGUSR1, lambda *_: self.request(stop=True))
        signal.signal(signal.SIGUSR2, lambda *_: self.request(stop=False))
        if self.link is not None:
            self.link.send({"op": "signals", "pid": os.getpid()})

    # --- requests (signal handler / agent link) -------------------------------------------

    def request(self, *, stop: bool, deadline: str | float | None = None, ref: int | None = None) -> None:
        """Ask for a checkpoint at the next `due()`; with `stop`, `should_stop()` turns
        True once it is durable. Safe to call from a signal handler.

        `deadline` (ISO 8601 or epoch seconds) bounds the urgent save that answers it;
        `ref` is the agent's id for the request, echoed when the checkpoint is durable.
        """
        seq = next(self._request_ids)
        self._requests.append(_Request(seq=seq, stop=stop, deadline=_epoch(deadline), ref=ref))

    def _latest_request(self) -> int:
        return max((r.seq for r in self._requests), default=0)

    @property
    def requested(self) -> bool:
        """A checkpoint request not yet answered by an urgent save."""
        return self._latest_request() > self._answered

    @property
    def stop_requested(self) -> bool:
        """An interruption notice arrived (training should stop after its checkpoint)."""
        return any(r.stop for r in self._requests)

    def should_stop(self) -> bool:
        """True once the urgent checkpoint asked for by a notice is durable (and no newer
        request still waits for one)."""
        answered = self._answered
        return any(r.stop and r.seq <= answered for r in self._requests) and not self.requested

    def due(self, step: int) -> bool:
        """Should the training loop call `save` now (interval reached or a request pending)?"""
        now = self._clock()
        if self.link is not None and now - self._last_progress_at >= 1.0:
            self._last_progress_at = now
            self.link.send({"op": "progress", "step": step, "t": time.time()})
        if self.requested:
            return True
        if self.interval_steps and step % self.interval_steps == 0:
            return True
        return bool(self.interval_seconds) and now - self._last_save_at >= (self.interval_seconds or 0)

    # --- saving ---------------------------------------------------------------------------

    def save(
        self,
        state: Any,
        step: int,
        *,
        extra: dict[str, Any] | None = None,
        directory: str | None = None,
        urgent: bool | None = None,
        timeout: float | None = None,
    ) -> DurableCheckpoint | None:
        """Snapshot `state` (and/or the files of `directory`) as checkpoint `step`.

        Periodic saves return at once after the in-memory snapshot (None); one that
        finds the previous snapshot still being written is skipped rather than stall
        training. An urgent save (a request is pending, or `urgent=True`) returns the
        durable checkpoint or raises `CheckpointFailed` after `timeout` (default: the
        pending request's deadline). When only "checkpoint, then continue" requests were
        pending, a failure is logged and None returned instead: training goes on.
        """
        if urgent is None and self.requested:
            try:
                return self.save_now(state, step, extra=extra, directory=directory, timeout=timeout)
            except CheckpointFailed:
                if self.stop_requested:
                    raise
                # Only "checkpoint, then continue" requests (a rebalance): the failure
                # went to the agent; training goes on, periodic checkpoints retry.
                logger.warning("the requested checkpoint at step %s failed: training continues", step)
                return None
        if urgent:
            return self.save_now(state, step, extra=extra, directory=directory, timeout=timeout)
        with self._cv:
            if state is not None and self._buffer_busy:
                self.skipped_saves += 1
                logger.info(
                    "checkpoint skipped: host buffer busy (previous snapshot still being written "
                    "or buffer being reserved) (step %s)",
                    step,
                )
                return None
            self._last_save_at = self._clock()
            self._snapshot_locked(state, step, extra, directory, urgent=False)
        return None

    def reserve(self, state: Any) -> None:
        """Allocate and pre-fault the host buffer for `state` (a state tree, or a byte
        count) on a background thread, so that the first `save` does not pay for first
        touch of fresh pages on the training thread (seconds for a multi-GB state here).

        `restore` calls it with the restored checkpoint's size. Meanwhile a periodic save
        is skipped and an urgent one waits, as while a snapshot is being written.
        """
        needed = state if isinstance(state, int) else Snapshotter.measure(state)
        with self._cv:
            if self._buffer_busy or needed <= self._snapshotter.buffer.size:
                return
            self._buffer_busy = True

        def allocate() -> None:
            try:
                self._snapshotter.buffer.ensure(needed)
            except Exception:
                logger.exception("could not reserve a %d-byte checkpoint buffer", needed)
            finally:
                with self._cv:
                    self._buffer_busy = False
                    self._cv.notify_all()

        threading.Thread(target=allocate, name="trainctl-ckpt-reserve", daemon=True).start()

    def save_now(
        self,
        state: Any,
        step: int,
        *,
        extra: dict[str, Any] | None = None,
        directory: str | None = None,
        timeout: float | None = None,
    ) -> DurableCheckpoint:
        """Checkpoint `step` with priority and return once its manifest is durable.

        It answers every request that arrived before its snapshot. It waits at most
        `timeout` seconds; without one, until the earliest deadline among those requests,
        and without any deadline `save_timeout_seconds` (default 30 min; None: until
        durable). That bound covers waiting for the host buffer too. Past it,
        `CheckpointTimeout` is raised; `CheckpointFailed` (its base class) also when the
        checkpoint cannot be written. A checkpoint that timed out keeps being retried in
        the background until it lands or a later urgent save replaces it.

        If `step` is already durable under this attempt with the same files (a periodic
        save at `step`, then this one), it is returned without being uploaded again.
        """
        started = self._clock()
        explicit = timeout is not None
        bound = "" if explicit else " (the deadline of the request it answers)"
        if timeout is None:
            # Provisional (the requests so far): it also bounds the wait for the buffer.
            timeout = self._deadline_timeout(self._latest_request())
            if timeout is None:
                timeout, bound = self._save_timeout, " (save_timeout_seconds)"
        limit = None if timeout is None else started + timeout
        job: _Save | None = None
        with self._cv:
            # Only one host buffer: wait for a periodic write to release it (seconds at
            # most, unless the disk hangs: hence the bound) instead of allocating a second,
            # cold one.
            while state is not None and self._buffer_busy:
                if limit is not None and self._clock() >= limit:
                    break
                self._cv.wait(0.1 if limit is None else max(0.0, min(0.1, limit - self._clock())))
            # Read before the snapshot: a request arriving after it is not answered by it.
            covers = self._latest_request()
            if not (state is not None and self._buffer_busy):
                self._last_save_at = self._clock()
                job = self._snapshot_locked(
                    state, step, extra, directory, urgent=True, covers=covers, deadline=self._epoch_of(limit)
                )
        if job is None:
            self._failed(
                covers,
                self._answers(covers),
                f"checkpoint at step {step} not started within {timeout:.1f} s{bound}: "
                "the previous snapshot is still being written",
                timeout=True,
            )
        if not explicit:
            # A request that arrived while waiting for the buffer may be due sooner.
            later = self._deadline_timeout(covers)
            if later is not None and (limit is None or self._clock() + later < limit):
                limit = self._clock() + later
                bound = " (the deadline of the request it answers)"
            job.deadline = self._epoch_of(limit)  # read by the uploader's retry back-off
        remaining = None if limit is None else max(0.0, limit - self._clock())
        if not job.done.wait(remaining):
            assert limit is not None
            self._failed(
                job.covers,
                job.answers,
                f"checkpoint at step {step} not durable within {limit - started:.1f} s{bound}",
                timeout=True,
            )
        if job.error is not None:
            self._failed(job.covers, job.answers, f"checkpoint at step {step} failed: {job.error}", job.error)
        assert job.result is not None
        self._answered = max(self._answered, covers)
        return job.result

    def _deadline_timeout(self, covers: int) -> float | None:
        """Seconds until the earliest deadline of the requests an urgent save answers."""
        deadlines = [
            r.deadline for r in self._requests if self._answered < r.seq <= covers and r.deadline is not None
        ]
        if not deadlines:
            return None
        # At least a moment: a deadline already past (clock skew) still gets one try.
        return max(1.0, min(deadlines) - time.time())

    def _epoch_of(self, moment: float | None) -> float | None:
        """A moment on `clock` as epoch seconds (the unit of request deadlines)."""
        return None if moment is None else time.time() + (moment - self._clock())

    def _answers(self, covers: int) -> int | None:
        """The newest agent request (its `ref`) among those up to `covers`."""
        return max((r.ref for r in self._requests if r.seq <= covers and r.ref is not None), default=None)

    def _failed(
        self,
        covers: int,
        answers: int | None,
        reason: str,
        cause: BaseException | None = None,
        *,
        timeout: bool = False,
    ) -> NoReturn:
        # The requests it answered are answered, with a failure: the agent hears it now
        # (its `checkpoint-now` fails at once) and they no longer make every save urgent.
        self._answered = max(self._answered, covers)
        if self.link is not None and answers is not None:
            self.link.send({"op": "checkpoint-failed", "answers": answers, "error": reason})
        raise (CheckpointTimeout if timeout else CheckpointFailed)(reason) from cause

    def _snapshot_locked(
        self,
        state: Any,
        step: int,
        extra: dict[str, Any] | None,
        directory: str | None,
        *,
        urgent: bool,
        covers: int = 0,
        deadline: float | None = None,
    ) -> _Save:
        snapshot = None
        if state is not None:
            snapshot = self._snapshotter.snapshot(state)
            self._buffer_busy = True
        if directory is not None:
            # Hard-link the framework's files into staging now (no data copied): the
            # framework may rotate its checkpoint folder away while we upload.
            directory = self._link_into_staging(directory, step)
        job = _Save(step=step, urgent=urgent, snapshot=snapshot, directory=directory, extra=dict(extra or {}))
        if urgent:
            job.covers = covers
            job.answers = self._answers(covers)
            job.deadline = deadline
            # Cancel any periodic upload in progress: the link is for this one now.
            self._upload_urgent = job
        self._write_queue.append(job)
        self._cv.notify_all()
        return job

    def _tmp_dir(self, step: int) -> str:
        return os.path.join(self.staging_dir, f"{step:012d}.tmp-{os.getpid()}")

    def _link_into_staging(self, directory: str, step: int) -> str:
        tmp = self._tmp_dir(step)
        shutil.rmtree(tmp, ignore_errors=True)
        target = os.path.join(tmp, FILES_DIR)
        shutil.copytree(directory, target, copy_function=_link_or_copy)
        return target

    def flush(self, timeout: float | None = None) -> DurableCheckpoint | None:
        """Wait until every queued save is durable (or dropped); returns the newest durable."""
        deadline = None if timeout is None else self._clock() + timeout
        with self._cv:
            while (
                self._write_queue
                or self._buffer_busy
                or self._upload_pending
                or self._upload_urgent
                or self._uploading
            ):
                left = None if deadline is None else deadline - self._clock()
                if left is not None and left <= 0:
                    break
                self._cv.wait(0.1 if left is None else min(0.1, left))
        return self.last_durable

    def close(self, *, flush: bool = True, timeout: float | None = 600) -> None:
        if flush:
            self.flush(timeout)
        with self._cv:
            self._closing = True
            self._cv.notify_all()
        self._writer.join(timeout=5)
        self._uploader.join(timeout=5)
        self._snapshotter.close()
        if self.link is not None:
            self.link.close()
        close = getattr(self.storage, "close", None)
        if close and self._owns_storage:
            close()

    def __enter__(self) -> Checkpointer:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # --- background: write -------------------------------------------------------------------

    def _write_loop(self) -> None:
        while True:
            with self._cv:
                while not self._write_queue and not self._closing:
                    self._cv.wait()
                if not self._write_queue:
                    return
                job = self._write_queue.pop(0)
            try:
                self._stage(job)
            except BaseException as exc:
                logger.exception("checkpoint at step %s could not be staged", job.step)
                job.error = exc
                job.done.set()
                with self._cv:
                    if self._upload_urgent is job:
                        # Never staged, so never uploadable: do not hold the link for it.
                        self._upload_urgent = None
            finally:
                with self._cv:
                    if job.snapshot is not None:
                        self._buffer_busy = False
                    self._cv.notify_all()
            if job.error is None:
                self._enqueue_upload(job)

    def _stage(self, job: _Save) -> None:
        final = os.path.join(self.staging_dir, f"{job.step:012d}")
        tmp = self._tmp_dir(job.step)
        if job.directory is None:
            shutil.rmtree(tmp, ignore_errors=True)
        os.makedirs(tmp, exist_ok=True)
        if job.snapshot is not None:
            for written in write_snapshot(job.snapshot, tmp, direct=self.direct_io):
                job.files.append(
                    (
                        written.local_path,
                        ManifestFile(path=written.path, size=written.size, xxh3_128=written.xxh3_128),
                    )
                )
        if job.directory:
            # Directory mode: the framework already wrote the files; hash them in place.
            for root, _dirs, names in os.walk(job.directory):
                for name in sorted(names):
                    local = os.path.join(root, name)
                    relative = os.path.relpath(local, job.directory).replace(os.sep, "/")
                    size, digest = layout.hash_file(local)
                    job.files.append(
                        (local, ManifestFile(path=f"{FILES_DIR}/{relative}", size=size, xxh3_128=digest))
                    )
        staged_files = [
            (
                os.path.join(final, os.path.relpath(local, tmp)) if local.startswith(tmp + os.sep) else local,
                entry,
            )
            for local, entry in job.files
        ]
        # Atomic rename: a staged checkpoint either exists whole or not at all. The files
        # are fsynced as written; their names (in tmp) and the rename (in staging) are
        # durable only once the directories holding them are.
        _fsync_dir(tmp)
        shutil.rmtree(final, ignore_errors=True)
        os.replace(tmp, final)
        _fsync_dir(self.staging_dir)
        with self._cv:
            # `staged` last: the uploader may take an urgent save the moment it is set.
            job.files = staged_files
            job.staged = final

    # --- background: upload ---------------------------------------------------------------------

    def _enqueue_upload(self, job: _Save) -> None:
        with self._cv:
            if job.urgent:
                self._upload_urgent = job
            else:
                if self._upload_pending is not None:
                    # Only the newest periodic checkpoint matters.
                    self._drop(self._upload_pending, "superseded by a newer checkpoint before upload")
                self._upload_pending = job
            self._cv.notify_all()

    def _drop(self, job: _Save, why: str) -> None:
        logger.info("checkpoint at step %s dropped: %s", job.step, why)
        job.dropped = True
        job.done.set()

    def _upload_loop(self) -> None:
        delay = self._retry_initial
        while True:
            with self._cv:
                while True:
                    urgent = self._upload_urgent
                    if urgent is not None and urgent.staged is not None:
                        job = urgent
                        break
                    if self._upload_pending is not None and urgent is None:
                        job = self._upload_pending
                        break
                    if self._closing and urgent is None and self._upload_pending is None:
                        return
                    self._cv.wait(0.5)
                self._uploading = True
            try:
                outcome = self._upload(job)
            except _Superseded as exc:
                logger.warning("checkpoint at step %s not published: %s", job.step, exc)
                with self._cv:
                    self.superseded = True
                    self._uploading = False
                    for waiting in (self._upload_urgent, self._upload_pending):
                        if waiting is not None:
                            waiting.error = exc
                            waiting.done.set()
                    self._upload_urgent = self._upload_pending = None
                    self._cv.notify_all()
                continue
            except Exception as exc:
                # botocore already retried the single request; this is the checkpoint-level
                # retry (training continues meanwhile) until it lands or a newer one replaces it.
                wait = retry_wait(delay, urgent=job.urgent, deadline=job.deadline, now=time.time())
                logger.warning(
                    "checkpoint upload of step %s failed, retrying in %.1f s: %s", job.step, wait, exc
                )
                with self._cv:
                    self._uploading = False
                    if self._closing:
                        job.error = exc
                        job.done.set()
                        return
                    self._cv.wait(wait)
                delay = min(delay * 2, self._retry_max)
                continue
            delay = self._retry_initial
            with self._cv:
                self._uploading = False
                if self._upload_urgent is job:
                    self._upload_urgent = None
                if self._upload_pending is job:
                    self._upload_pending = None
                if outcome is None and not job.urgent:
                    self._drop(job, "cancelled for an urgent checkpoint")
                pending = self._upload_pending
                if outcome is not None and pending is not None and pending.step <= outcome.step:
                    # Published after this one it would be an older checkpoint arriving
                    # late (the job row refuses those): it is superseded.
                    self._drop(pending, f"older than the durable checkpoint at step {outcome.step}")
                    self._upload_pending = None
                self._cv.notify_all()
            if outcome is not None:
                self._after_durable(job, outcome)

    def _fence(self) -> None:
        """Raise unless this attempt may still write (DESIGN §2 "Fencing").

        Under the agent, only its "yes" lets a write through: "no" means superseded (stop
        publishing for good), no answer (agent unreachable, the job row unreadable) means
        not now (the upload is retried). Without an agent (a local run) there is nobody to
        ask and nothing to fence against.
        """
        if self.link is None and not self.managed:
            return
        current = self.link.is_current(timeout=5.0) if self.link is not None else None
        if current is False:
            raise _Superseded()
        if current is None and self.managed:
            raise FenceUnanswered(
                f"the agent did not confirm that attempt {self.attempt} is still the job's current one"
            )

    def _upload(self, job: _Save) -> DurableCheckpoint | None:
        def cancelled() -> bool:
            return not job.urgent and self._upload_urgent is not None

        checkpoint = CheckpointId(job.step, self.attempt)
        # Before the files too: a superseded attempt (a stopped instance come back) writes
        # nothing at all, not even files without a manifest.
        self._fence()
        manifest = Manifest(
            job_id=self.job_id,
            step=job.step,
            attempt=self.attempt,
            instance_id=self.instance_id,
            framework=self.framework,
            created_at=job.created_at,
            files=[entry for _, entry in job.files],
            extra=job.extra,
        )
        existing = self._published(checkpoint)
        if existing is not None and _same_files(existing, manifest):
            # This step is already durable under this key with these very files (a
            # periodic save at N, then the final save_now at N): uploading them again
            # would only open a window in which the old manifest and half-replaced files
            # disagree. The checkpoint there *is* this one.
            if existing.model_copy(update={"created_at": manifest.created_at}) == manifest:
                logger.info("checkpoint at step %s is already durable with the same content", job.step)
                return self._durable(job, existing)
            self._fence()
            self.storage.put_manifest(checkpoint, manifest.to_json())  # one atomic PUT
            return self._durable(job, manifest)
        if existing is not None:
            if cancelled():
                return None  # superseded already: keep the durable checkpoint that is there
            # Other content at a durable step: retract the old checkpoint first (manifest
            # first), so a crash mid-rewrite leaves files without a manifest (no checkpoint:
            # restore takes the previous one), never an old manifest over new files.
            logger.warning(
                "checkpoint at step %s is already durable with other content: replacing it", job.step
            )
            self.storage.delete(checkpoint)
        files = [(local, entry.path) for local, entry in job.files]
        self.storage.put_files(checkpoint, files, cancelled)
        if cancelled():
            return None
        # Again before the manifest: the hand-over may have happened during the upload.
        self._fence()
        self.storage.put_manifest(checkpoint, manifest.to_json())
        return self._durable(job, manifest)

    def _published(self, checkpoint: CheckpointId) -> Manifest | None:
        """The valid manifest already under `checkpoint`'s key, if any (None for a new step)."""
        raw = self.storage.read_manifest(checkpoint)
        if raw is None:
            return None
        try:
            return layout.parse_manifest_at(raw, checkpoint, job_id=self.job_id)
        except layout.InvalidManifest:
            return None  # not a checkpoint: whatever files are there may be overwritten

    def _durable(self, job: _Save, manifest: Manifest) -> DurableCheckpoint:
        checkpoint = CheckpointId(manifest.step, manifest.attempt)
        return DurableCheckpoint(
            step=manifest.step,
            location=self.storage.describe(checkpoint),
            prefix=layout.checkpoint_prefix(self.job_id, checkpoint),
            attempt=manifest.attempt,
            created_at=manifest.created_at,
            urgent=job.urgent,
            size=manifest.total_bytes,
        )

    def _after_durable(self, job: _Save, durable: DurableCheckpoint) -> None:
        if self.last_durable is None or durable.step >= self.last_durable.step:
            self.last_durable = durable
        logger.info(
            "checkpoint durable: step %s at %s (%d bytes)", durable.step, durable.location, durable.size
        )
        if self.link is not None:
            self.link.send(
                {
                    "op": "durable",
                    "step": durable.step,
                    "prefix": durable.prefix,
                    "attempt": durable.attempt,
                    "created_at": layout.format_time(durable.created_at),
                    "urgent": durable.urgent,
                    "size": durable.size,
                    # The newest agent request this checkpoint answers (its snapshot was
                    # taken after it arrived); None for a periodic checkpoint.
                    "answers": job.answers,
                }
            )
        job.result = durable
        job.done.set()
        try:
            self._apply_retention()
            self._clean_staging(keep=job.staged, below_step=job.step)
        except Exception:
            logger.exception("checkpoint retention failed")

    def _apply_retention(self) -> None:
        listed = self.storage.list_checkpoints()
        # What this attempt continued from: what it restored, else what the row named.
        anchor = self.restored.checkpoint if self.restored is not None else self.resume
        if self.resume is not None:
            protect = [self.resume]
        else:  # only the resume step is known: every checkpoint at it is protected
            protect = [c for c in listed if c.step == self.resume_step]
        # Newer attempts' checkpoints are never ours to judge (or delete): do not read them.
        valid = [c for c in listed if c.attempt <= self.attempt and self._manifest_ok(c)]
        # At least two, whatever `keep` says: the agent records a checkpoint on the job row
        # only after it is durable (and may be slow to), so right after checkpoint N the row
        # may still name N-1, and an interruption now must find it. (Should the row lag
        # further, restore takes the newer checkpoints of the attempt the row names.)
        victims = layout.retention_plan(
            listed, valid, keep=max(self.keep, 2), attempt=self.attempt, anchor=anchor, protect=protect
        )
        for checkpoint in victims:
            logger.info("retention: deleting checkpoint %s", checkpoint)
            self.storage.delete(checkpoint)

    def _manifest_ok(self, checkpoint: CheckpointId) -> bool:
        return self._published(checkpoint) is not None

    def _clean_staging(self, keep: str | None, below_step: int) -> None:
        """Remove staged checkpoints older than the one just made durable.

        Only older ones: a newer one may have just been renamed into place by the writer
        and not be queued for upload yet (deleting it made its upload fail forever).
        """
        with self._cv:
            busy = {j.staged for j in (self._upload_pending, self._upload_urgent) if j is not None}
        for name in os.listdir(self.staging_dir):
            path = os.path.join(self.staging_dir, name)
            if path == keep or path in busy or not name.isdigit() or int(name) >= below_step:
                continue
            shutil.rmtree(path, ignore_errors=True)

    # --- restoring --------------------------------------------------------------------------------

    def restore(self, into: Any = None, *, reserve: bool = True) -> Any:
        """The state of the newest checkpoint that verifies, or None (starting fresh).

        Checkpoints that fail verification are skipped with a log line naming them; see
        `restore_checkpoint` for which ones are considered and for storage errors. With
        `into` (the live state tree, same structure), tensors are written into the live
        tensors in place. A local copy fetched from S3 is deleted once the state is loaded.

        With `reserve` (default) the data file is verified and read in one O_DIRECT pass
        into the host buffer the next save needs anyway, then copied into place: one disk
        read, and no memory beyond the steady state (state + buffer). With
        `reserve=False` no buffer is kept: the file is hashed, then read straight into the
        tensors (two passes over the file, the second one from the page cache).
        """
        with self._cv:
            buffered = reserve and not self._buffer_busy
            if buffered:
                self._buffer_busy = True  # no snapshot may use the buffer meanwhile
        try:
            restored = self.restore_checkpoint(_into_buffer=buffered)
            if restored is None:
                return None
            if SKELETON_FILE not in restored.paths:
                return {}
            size = os.path.getsize(restored.paths[DATA_FILE])
            if buffered and self._buffer_step == restored.step:
                state = load_snapshot_from_buffer(
                    restored.paths[SKELETON_FILE], self._snapshotter.buffer, into=into
                )
            else:
                state = load_snapshot(restored.paths, into=into)
            # In live tensors now: the fetched copy would only hold disk space all run.
            self.release_restored_files()
        finally:
            if buffered:
                with self._cv:
                    self._buffer_busy = False
                    self._cv.notify_all()
        if reserve:
            # The next save snapshots a state of about this size: ready the buffer off the
            # training thread now.
            self.reserve(size)
        return state

    @property
    def _restore_root(self) -> str:
        return os.path.join(self.staging_dir, "restore")

    def release_restored_files(self) -> None:
        """Delete the local copy `restore_checkpoint` fetched from remote storage, once the
        framework has loaded it (`restore` does this itself; the Hugging Face callback after
        the first step). Files read in place (local storage) are never touched."""
        shutil.rmtree(self._restore_root, ignore_errors=True)

    def restore_checkpoint(self, *, _into_buffer: bool = False) -> Restored | None:
        """Find, fetch and verify the newest valid checkpoint; its files stay local.

        Candidates, newest first: the resume point the job row names, then the newer
        checkpoints of its attempt (the same history, not yet on the row), then older
        steps; never a checkpoint of an attempt newer than this one, nor, above the resume
        step, one of another attempt (a superseded attempt's late upload). Without a
        named checkpoint but with a resume step, nothing above that step.

        A checkpoint is skipped (logged by name) only if it is invalid: no manifest, a
        manifest that does not parse or describes another checkpoint, a missing file, a
        size or hash mismatch. Storage that cannot be read is retried; one that stays
        unreadable for `restore_retry_seconds`, or refuses (access denied), raises
        `RestoreFailed`: starting fresh over checkpoints that may be intact would throw
        the run away.
        """
        restore_root = self._restore_root
        shutil.rmtree(restore_root, ignore_errors=True)
        found: dict[CheckpointId, tuple[Manifest, dict[str, str]]] = {}
        self._buffer_step = None
        give_up_at = self._clock() + self._restore_retry

        def verify(checkpoint: CheckpointId) -> str | None:
            if checkpoint.attempt > self.attempt:
                # Checked on the key, before anything is fetched: the manifest must agree.
                return f"written by attempt {checkpoint.attempt}, newer than this attempt {self.attempt}"
            dest = os.path.join(restore_root, checkpoint.name)

            def check() -> tuple[Manifest, dict[str, str]] | str:
                if _into_buffer:
                    return self._verify_into_buffer(checkpoint, dest)
                return layout.verify_checkpoint(self.storage, checkpoint, job_id=self.job_id, dest_dir=dest)

            outcome = self._read_storage(
                f"read checkpoint {self.storage.describe(checkpoint)}", check, give_up_at
            )
            if isinstance(outcome, str):
                shutil.rmtree(dest, ignore_errors=True)  # a fetched invalid copy: no use
                return outcome
            manifest, paths = outcome
            found[checkpoint] = (manifest, paths)
            if _into_buffer and DATA_FILE in paths:
                self._buffer_step = checkpoint.step
            return None

        def on_skip(skipped: Skipped) -> None:
            logger.warning(
                "checkpoint skipped: %s: %s", self.storage.describe(skipped.checkpoint), skipped.reason
            )

        listed = self._read_storage("list the checkpoints", self.storage.list_checkpoints, give_up_at)
        if self.resume is not None and self.resume not in listed:
            logger.warning(
                "the job's resume point %s is not in %s: looking for a newer checkpoint of its "
                "attempt, else an older one",
                self.resume,
                self.storage.describe(self.resume),
            )
        selection = layout.select_newest_valid(
            listed, verify, at_most=self.resume_step, prefer=self.resume, on_skip=on_skip
        )
        chosen = selection.checkpoint
        if chosen is None:
            self.fresh_reason = selection.reason
            logger.warning("starting fresh: %s", selection.reason)
            return None
        if self.resume is not None and chosen != self.resume:
            logger.warning(
                "the job's resume point %s is not usable: restoring %s instead", self.resume, chosen
            )
        manifest, paths = found[chosen]
        self.restored_step = chosen.step
        self.restored = Restored(step=chosen.step, manifest=manifest, paths=paths)
        logger.info("restoring checkpoint %s from %s", chosen, self.storage.describe(chosen))
        return self.restored

    def _read_storage(self, what: str, read: Callable[[], _T], give_up_at: float) -> _T:
        """`read()`, retried while storage is unreachable, until `give_up_at` (on `clock`).

        Not stacked on botocore's retries for nothing: botocore retries each request a few
        times over seconds (standard mode, trainctl_core.clients); this covers an outage
        longer than that, such as a replacement instance whose network or instance-profile
        credentials are not up yet, or an S3 brownout. The alternatives (crash, or skip
        a checkpoint that may be intact and start fresh) lose the run, so it is worth
        minutes, bounded, with back-off. Refusals (access denied) are not retried.
        """
        delay = self._retry_initial
        while True:
            try:
                return read()
            except layout.StorageError as exc:
                left = give_up_at - self._clock()
                if not exc.retryable or left <= 0:
                    stop = (
                        "refused" if not exc.retryable else f"still failing after {self._restore_retry:.0f} s"
                    )
                    raise RestoreFailed(
                        f"could not {what} ({stop}): {exc}. Not starting fresh: the checkpoints "
                        "may be intact; fix access to the storage and run again"
                    ) from exc
                wait = min(delay, left)
                logger.warning("could not %s, retrying in %.1f s: %s", what, wait, exc)
                time.sleep(wait)
                delay = min(delay * 2, self._retry_max)

    def _verify_into_buffer(
        self, checkpoint: CheckpointId, dest_dir: str
    ) -> tuple[Manifest, dict[str, str]] | str:
        """`layout.verify_checkpoint`, except that the data file is hashed while it is read
        into the host buffer (one pass): same checks, same reasons."""
        raw = self.storage.read_manifest(checkpoint)
        if raw is None:
            return layout.MISSING_MANIFEST
        try:
            manifest = layout.parse_manifest_at(raw, checkpoint, job_id=self.job_id)
        except layout.InvalidManifest as exc:
            return str(exc)
        try:
            paths = self.storage.fetch(checkpoint, manifest.files, dest_dir)
        except layout.FetchFailed as exc:
            return str(exc)
        for entry in manifest.files:
            if entry.path != DATA_FILE:
                problem = layout.verify_local_file(entry, paths[entry.path])
                if problem:
                    return problem
                continue
            path = paths[entry.path]
            if not os.path.exists(path):
                return f"file {entry.path} is missing"
            actual = os.path.getsize(path)
            if actual != entry.size:
                return f"file {entry.path} has {actual} bytes, manifest says {entry.size}"
            _, digest = read_into_buffer(path, self._snapshotter.buffer)
            if digest != entry.xxh3_128:
                return f"file {entry.path} hash {digest} != manifest {entry.xxh3_128}"
        return manifest, paths


URGENT_RETRY_MAX_SECONDS = 2.0
"""An urgent upload's retries never wait longer than this: someone is waiting for it."""


def retry_wait(delay: float, *, urgent: bool, deadline: float | None, now: float) -> float:
    """How long the uploader waits before retrying a failed upload.

    Periodic uploads back off exponentially (`delay`, up to `retry_max_seconds`): training
    goes on meanwhile. An urgent one waits at most `URGENT_RETRY_MAX_SECONDS` and, when
    its deadline (epoch seconds; e.g. the Spot notice's) is known, at most an eighth of
    the time left: inside a 2-minute notice a back-off grown to 30 s would leave one or
    two tries, a short one leaves many.
    """
    if not urgent:
        return delay
    wait = min(delay, URGENT_RETRY_MAX_SECONDS)
    if deadline is not None:
        wait = min(wait, max(0.05, (deadline - now) / 8))
    return wait


def _fsync_dir(path: str) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _same_files(a: Manifest, b: Manifest) -> bool:
    return sorted(a.files, key=lambda f: f.path) == sorted(b.files, key=lambda f: f.path)


def _link_or_copy(src: str, dst: str) -> None:
    try:
        os.link(src, dst)
    except OSError:
        shutil.copy2(src, dst)


def _epoch(deadline: str | float | None) -> float | None:
    """A request's deadline as epoch seconds (ISO 8601 from the agent, or a number)."""
    if deadline is None or deadline == "":
        return None
    if isinstance(deadline, int | float):
        return float(deadline)
    try:
        moment = datetime.fromisoformat(deadline.replace("Z", "+00:00"))
    except ValueError:
        logger.warning("ignoring a checkpoint deadline that is not ISO 8601: %r", deadline)
        return None
    if moment.tzinfo is None:
        moment = moment.replace(tzinfo=UTC)
    return moment.timestamp()


class _Superseded(RuntimeError):
    def __init__(self) -> None:
        super().__init__("this attempt is no longer the job's current one; not publishing")
