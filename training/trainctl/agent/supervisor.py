"""The agent: runs the training command as a child and reacts to every signal.

Lifecycle of one attempt on one instance:

1. wait until the job row names this instance and a resume point (a replacement boots
   while the old instance is still checkpointing: it must not train before that);
2. LAUNCHING -> RUNNING, start the training child with `TRAINCTL_*` variables (resume
   step/prefix, checkpoint bucket, IPC socket);
3. while it runs: IMDSv2 polled every 5 s (backup signal), IPC endpoint for the SSM
   document's `trainctl checkpoint-now`, heartbeats to the row, every durable checkpoint
   recorded on the row (fenced on instance + attempt);
4. on a notice (SSM `--mode stop`, IMDS instance-action, SIGTERM): forward it to the
   child (IPC message, or SIGUSR1 if it has no link), wait for the durable checkpoint
   that answers it, record it as final and complete the workflow's handshake; on a
   rebalance (SSM `--mode continue`, IMDS recommendation): the same checkpoint, recorded
   as an ordinary one, and training goes on;
5. child exit 0 -> SUCCEEDED; non-zero -> FAILED with the exit code and log tail (never
   relaunched: a user bug would loop); after a notice or SIGTERM -> nothing (the resume
   workflow owns the job now, or whoever stops the machine does).

Cost guards: with each heartbeat the agent adds what its attempt cost since the last one
to the row's `cost_usd` (priced by `trainctl.agent.pricing`, exactly once per window),
and checks the job's limits (`trainctl.agent.limits`, the resume workflow's own guards):
past `deadline_at` (max_hours) or at `budget_usd`, it asks the child for a checkpoint,
waits for it (bounded), and ends the job FAILED with the reason.

Every terminal outcome of this instance's attempt (SUCCEEDED, FAILED, stood down, no
resume point) ends with the shutdown command: nothing else will use the instance.

A fenced write refused with `Superseded` means another attempt owns the job: stop the
child and stand down. So does finding the row on another instance at start, once this
instance's attempt is over (it is in the row's attempt history, or older than the row's):
a stopped instance that comes back after its replacement took over.

Checkpoint records (and the handshake) run on a worker thread of their own, in order:
a slow or retried DynamoDB or Step Functions call never delays the answer to the
Checkpointer's `fence` question, which it waits for only a few seconds.

Requests to the child are numbered; the child's `durable` message says which request
its snapshot answers, so a checkpoint whose snapshot predates the stop notice (a
rebalance checkpoint still uploading when the notice came) is never taken as final.
"""

from __future__ import annotations

import collections
import contextlib
import functools
import itertools
import logging
import os
import queue
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import Any, Protocol

from trainctl import runtime_env as env
from trainctl.agent import ipc, recovery_metrics
from trainctl.agent.imds import ImdsClient, ImdsUnavailable
from trainctl.agent.ipc import IpcServer, Peer
from trainctl.agent.limits import limit_reached
from trainctl_core import jobs
from trainctl_core.jobs import CheckpointKind, CheckpointRef, Job, JobStatus, ResumePoint
from trainctl_core.settings import CHECKPOINT_MODE_STOP, CHECKPOINT_MODES
from trainctl_core.store import ConcurrentUpdate, JobNotFound, StoreUnavailable, Superseded

logger = logging.getLogger("trainctl.agent")

EXIT_OK = 0
EXIT_STOOD_DOWN = 3
EXIT_NO_RESUME_POINT = 4
EXIT_LIMIT_REACHED = 5

FAILURE_REASON_LIMIT = 3000
"""Characters of the FAILED reason on the job row (the exit code and the log tail)."""


class Store(Protocol):
    def get(self, job_id: str) -> Job: ...

    def raw(self, job_id: str) -> dict[str, Any]: ...

    def apply(self, transition: jobs.Transition) -> Job: ...

    def record_checkpoint(
        self, job_id: str, *, instance_id: str, attempt: int, checkpoint: CheckpointRef, final: bool
    ) -> dict[str, Any]: ...

    def heartbeat(
        self, job_id: str, *, instance_id: str, attempt: int, step: int, steps_per_second: float | None = None
    ) -> dict[str, Any]: ...

    def accrue_cost(
        self,
        job_id: str,
        *,
        instance_id: str,
        attempt: int,
        usd: float,
        since: datetime | None,
        until: datetime,
    ) -> dict[str, Any]: ...


class PriceSource(Protocol):
    """What this instance cost over a window, USD; None when unknown (trainctl.agent.pricing)."""

    def cost(self, start: datetime, end: datetime) -> float | None: ...


class HandshakePort(Protocol):
    def complete(self, task_token: str, output: dict[str, Any]) -> None: ...


class LogSink(Protocol):
    """Where the child's output goes besides stdout (trainctl.agent.logship.LogShipper)."""

    def bind_attempt(self, attempt: int) -> None: ...

    def write(self, message: str) -> None: ...

    def flush(self) -> bool: ...


@dataclass
class AgentConfig:
    job_id: str
    instance_id: str
    command: list[str]
    attempt: int | None = None  # None: take it from the row once it names this instance
    socket_path: str = env.DEFAULT_AGENT_SOCKET
    child_env: dict[str, str] = field(default_factory=dict)
    imds_poll_seconds: float = 5.0
    heartbeat_seconds: float = 30.0
    resume_wait_seconds: float = 900.0
    resume_poll_seconds: float = 2.0
    # Deadline of a checkpoint request that comes without one (IMDS rebalance, an SSM
    # request without --deadline): the child's urgent save gives up after it.
    urgent_timeout_seconds: float = 110.0
    shutdown_command: list[str] | None = None
    log_tail_lines: int = 30
    stop_grace_seconds: float = 10.0
    # SIGTERM (systemd stop, `docker stop`): checkpoint and stop within this; the unit's
    # TimeoutStopSec / --stop-timeout (110 s) leave the rest for the stop itself.
    terminate_grace_seconds: float = 100.0
    # How long a checkpoint's record on the row is retried while DynamoDB is unavailable
    # (throttled, 5xx, unreachable) beyond botocore's own few seconds of retries: a
    # durable checkpoint the row does not name is lost to the next attempt.
    record_retry_seconds: float = 60.0


@dataclass
class _Notice:
    """A checkpoint request: `stop` (a notice: training ends after it) or not (rebalance)."""

    stop: bool
    source: str
    deadline: str | None = None
    id: int = 0  # set when forwarded to the child


class _Worker:
    """Runs submitted calls one at a time, in order, on a thread of its own (started on
    first use)."""

    def __init__(self, name: str) -> None:
        self._name = name
        self._calls: queue.Queue[Callable[[], None]] = queue.Queue()
        self._idle = threading.Condition()
        self._pending = 0
        self._thread: threading.Thread | None = None

    def submit(self, call: Callable[[], None]) -> None:
        with self._idle:
            self._pending += 1
            if self._thread is None:
                self._thread = threading.Thread(target=self._loop, name=self._name, daemon=True)
                self._thread.start()
        self._calls.put(call)

    def wait_idle(self, timeout: float) -> bool:
        """Whether every submitted call has finished, waiting up to `timeout` seconds."""
        with self._idle:
            return self._idle.wait_for(lambda: self._pending == 0, timeout)

    def _loop(self) -> None:
        while True:
            call = self._calls.get()
            try:
                call()
            except Exception:
                logger.exception("%s: a call failed", self._name)
            finally:
                with self._idle:
                    self._pending -= 1
                    self._idle.notify_all()


def failure_reason(returncode: int, tail: list[str], limit: int = FAILURE_REASON_LIMIT) -> str:
    """The FAILED reason: the exit code and the log tail, cut from the front if too long.

    The end is what matters (the exception and its message come last in a traceback).
    """
    head = f"training exited with code {returncode}: "
    text = "\n".join(tail)
    room = limit - len(head)
    if len(text) > room:
        text = "…" + text[len(text) - room + 1 :]
    return head + text


class Agent:
    """See the module docstring. Collaborators are injected (store, handshake, IMDS)."""

    def __init__(
        self,
        config: AgentConfig,
        store: Store,
        *,
        handshake: HandshakePort | None = None,
        imds: ImdsClient | None = None,
        now: Callable[[], datetime] = jobs.utcnow,
        logs: LogSink | None = None,
        prices: PriceSource | None = None,
    ) -> None:
        self.config = config
        self.store = store
        self.handshake = handshake
        self.imds = imds
        self.logs = logs
        self.now = now
        self.prices = prices
        self.attempt: int = config.attempt if config.attempt is not None else -1
        self.child: subprocess.Popen[bytes] | None = None
        self.log_tail: collections.deque[str] = collections.deque(maxlen=config.log_tail_lines)
        self.ipc = IpcServer(config.socket_path, self._on_message, self._on_disconnect)
        self._lock = threading.Lock()
        self._stopped = threading.Event()
        self._request_ids = itertools.count(1)
        self._stopping = False  # a stop notice arrived: the child's exit is not an outcome
        self._first_stop_id: int | None = None  # answering it (or later) makes a checkpoint final
        self._stop_request: _Notice | None = None  # the stop request later requests wait on
        self._outstanding: _Notice | None = None  # the newest request not answered yet
        self._answered = 0  # the newest request id a durable checkpoint (or failure) answered
        self._answer: CheckpointRef | None = None  # the checkpoint that answered it
        self._seen_rebalance: datetime | None = None
        self._waiters: list[tuple[Peer, int]] = []  # (checkpoint-now peer, request id)
        self._signal_pids: set[int] = set()
        self._terminating = threading.Event()
        self._wake_r, self._wake_w = -1, -1
        self._checkpointers: list[Peer] = []
        self.stood_down = False
        self.final_checkpoint: CheckpointRef | None = None
        self.last_checkpoint: CheckpointRef | None = None
        self.handshake_completed = False
        self._step: int | None = None
        self._rate: float | None = None
        self._progress: collections.deque[tuple[float, int]] = collections.deque(maxlen=30)
        self._imds_down_logged = False
        self._stop_noticed_at: datetime | None = None  # when the first stop notice reached us
        self._boot_job: Job | None = None  # the row as this attempt found it (recovery metrics)
        self._boot_row: dict[str, Any] = {}
        self._resume_reported = False
        self._metric_threads: list[threading.Thread] = []
        # Checkpoint records and the handshake, off the IPC reader threads (fences).
        self._recorder = _Worker("trainctl-checkpoint-records")
        # Cost accrual: the row's mark for this attempt (None: nothing accrued yet), and
        # where this attempt's billing starts; the row's cost as last seen.
        self._cost_lock = threading.Lock()
        self._cost_mark: datetime | None = None
        self._cost_start: datetime | None = None
        self._cost_usd = 0.0
        self._job: Job | None = None  # the row as this attempt started (spec, limits)
        self.limit_reason: str | None = None  # a cost guard ended the job (FAILED reason)

    # --- entry point ------------------------------------------------------------------------

    def run(self) -> int:
        """Run the attempt; the exit code. A terminal outcome ends with the shutdown command."""
        code, terminal = self._run()
        self.wait_for_metrics()
        if terminal:
            self._flush_logs()  # the outcome and its metric line, before the machine goes
            self._shutdown()
        return code

    def _run(self) -> tuple[int, bool]:
        ipc.clear_final_answer(self.config.socket_path)  # an earlier agent's, on this socket
        job = self._wait_for_resume_point()
        if job is not None and self.logs is not None:
            self.logs.bind_attempt(self.attempt)  # the stream is <job>/<attempt>/<instance>
        if job is None:
            if self._terminating.is_set():
                return EXIT_OK, False  # stopped from outside before there was anything to run
            return (EXIT_NO_RESUME_POINT if not self.stood_down else EXIT_STOOD_DOWN), True
        if not self._mark_running(job):
            return EXIT_STOOD_DOWN, True
        self._remember_boot_row()
        self._start_cost_accrual(job)
        if self._terminating.is_set():
            return EXIT_OK, False
        self.ipc.start()
        try:
            self._start_child(job)
            threads = [threading.Thread(target=self._heartbeat_loop, name="trainctl-heartbeat", daemon=True)]
            if self.imds is not None:
                threads.append(threading.Thread(target=self._imds_loop, name="trainctl-imds", daemon=True))
            for thread in threads:
                thread.start()
            assert self.child is not None
            if self._terminating.is_set():
                # SIGTERM came while the child was starting: its handler found no child.
                threading.Thread(target=self._stop_for_terminate, daemon=True).start()
            returncode = self.child.wait()
            self._drain_output()
            return self._on_child_exit(returncode)
        finally:
            self._stopped.set()
            self.ipc.stop()

    def _shutdown(self) -> None:
        if not self.config.shutdown_command:
            return
        logger.info("nothing left for this instance to run: shutting it down")
        self._flush_logs()
        subprocess.run(self.config.shutdown_command, check=False)

    # --- SIGTERM ------------------------------------------------------------------------------

    def install_signal_handlers(self) -> None:
        """SIGTERM (systemd stopping the unit, `docker stop`, an OS shutdown) becomes a stop
        notice with a deadline: checkpoint, stop the child, exit. Main thread only."""
        if threading.current_thread() is not threading.main_thread():
            return
        # A Python signal handler runs between two bytecodes of the main thread and must
        # not take a lock that thread may hold: it only writes a byte to a pipe, and a
        # thread waiting on the pipe does the work.
        self._wake_r, self._wake_w = os.pipe()
        threading.Thread(target=self._wait_for_sigterm, name="trainctl-sigterm", daemon=True).start()
        signal.signal(signal.SIGTERM, lambda *_: os.write(self._wake_w, b"T"))

    def _wait_for_sigterm(self) -> None:
        with contextlib.suppress(OSError):
            if os.read(self._wake_r, 1):
                self.terminate()

    def terminate(self) -> None:
        """Stop on request: a final checkpoint if the child can take one, then stop it.

        Returns once the child is gone (its durable checkpoint recorded first) or the
        grace period (`terminate_grace_seconds`) is over.
        """
        if self._terminating.is_set():
            return
        self._terminating.set()
        logger.warning(
            "SIGTERM: checkpointing and stopping training within %.0f s", self.config.terminate_grace_seconds
        )
        self._stop_for_terminate()

    def _stop_for_terminate(self) -> None:
        # The child's checkpoint gets the grace period but the last few seconds, which are
        # for stopping it the hard way if it did not stop by itself after the checkpoint.
        budget = max(0.0, self.config.terminate_grace_seconds - self.config.stop_grace_seconds)
        self._checkpoint_then_stop(SIGTERM_SOURCE, deadline_seconds=budget, wait_seconds=budget)

    def _checkpoint_then_stop(self, source: str, *, deadline_seconds: float, wait_seconds: float) -> None:
        """Ask the child for a checkpoint-then-stop due in `deadline_seconds`, give it
        `wait_seconds` to stop by itself once that checkpoint is durable (and recorded),
        then stop it in any case. Without a Checkpointer connected it is stopped at once."""
        child = self.child
        if child is None or child.poll() is not None:
            return
        with self._lock:
            can_checkpoint = bool(self._checkpointers or self._signal_pids)
        if can_checkpoint:
            deadline = jobs.format_time(self.now() + timedelta(seconds=deadline_seconds))
            self.notice(_Notice(stop=True, source=source, deadline=deadline))
            with contextlib.suppress(subprocess.TimeoutExpired):
                child.wait(wait_seconds)
            if child.poll() is None:
                logger.warning("training did not stop after its checkpoint in time: stopping it")
        else:
            logger.warning("the training process has no trainctl Checkpointer: stopping it without one")
        self._stop_child()

    # --- 1. resume point --------------------------------------------------------------------------

    def _wait_for_resume_point(self) -> Job | None:
        deadline = time.monotonic() + self.config.resume_wait_seconds
        logged = False
        while True:
            try:
                job = self.store.get(self.config.job_id)
            except JobNotFound:
                job = None
            if job is not None and job.is_terminal:
                logger.info("job %s is already %s: nothing to run", self.config.job_id, job.status)
                self.stood_down = True
                return None
            if (
                job is not None
                and job.instance_id == self.config.instance_id
                and (self.config.attempt is None or job.attempt == self.config.attempt)
                and job.resume_point is not None
                and job.status in (JobStatus.LAUNCHING, JobStatus.RUNNING)
            ):
                self.attempt = job.attempt
                return job
            if job is not None and self.config.attempt is not None and job.attempt > self.config.attempt:
                logger.warning(
                    "job %s moved on to attempt %s: standing down", self.config.job_id, job.attempt
                )
                self.stood_down = True
                return None
            if (
                job is not None
                and job.instance_id is not None
                and job.instance_id != self.config.instance_id
                and self._attempt_is_over(job)
            ):
                # E.g. a stopped instance that came back after its replacement took over:
                # nothing will ever name it again, so there is nothing to wait for.
                logger.warning(
                    "job %s moved on to instance %s (attempt %s): standing down",
                    self.config.job_id,
                    job.instance_id,
                    job.attempt,
                )
                self.stood_down = True
                return None
            if not logged:
                logger.info(
                    "waiting for the job row to name instance %s and a resume point", self.config.instance_id
                )
                logged = True
            if time.monotonic() >= deadline:
                logger.error(
                    "job row never named this instance and a resume point within %.0f s",
                    self.config.resume_wait_seconds,
                )
                return None
            if self._terminating.wait(self.config.resume_poll_seconds):
                logger.info("stopped while waiting for the resume point")
                return None

    def _attempt_is_over(self, job: Job) -> bool:
        """Whether this instance's attempt is behind the row (which names another instance):
        it is in the row's attempt history, or the row's attempt is not older than the one
        this instance was launched for (`--attempt`, or its `trainctl:attempt` tag)."""
        if any(record.instance_id == self.config.instance_id for record in job.attempts):
            return True
        return self.config.attempt is not None and job.attempt >= self.config.attempt

    def _mark_running(self, job: Job) -> bool:
        for _ in range(5):
            if job.status == JobStatus.RUNNING:
                return True  # an agent restart on the same attempt
            try:
                self.store.apply(jobs.mark_running(job, instance_id=self.config.instance_id, now=self.now()))
                logger.info(
                    "job %s RUNNING on %s attempt %s", job.job_id, self.config.instance_id, self.attempt
                )
                return True
            except ConcurrentUpdate as exc:
                # E.g. the workflow recorded something else meanwhile: re-read and decide again.
                if (
                    exc.current is None
                    or exc.current.instance_id != self.config.instance_id
                    or exc.current.is_terminal
                ):
                    self.stood_down = True
                    return False
                job = exc.current
            except jobs.JobError as exc:
                logger.warning("cannot mark running: %s", exc)
                self.stood_down = True
                return False
        return False

    # --- 2. the child -------------------------------------------------------------------------------

    def child_environment(self, job: Job) -> dict[str, str]:
        environment = {**os.environ, **self.config.child_env}
        environment.update(
            {
                env.JOB_ID: self.config.job_id,
                env.ATTEMPT: str(self.attempt),
                env.INSTANCE_ID: self.config.instance_id,
                env.AGENT_SOCKET: self.config.socket_path,
                env.CHECKPOINT_KEEP: str(job.spec.checkpoint_retention),
                env.CHECKPOINT_INTERVAL_SECONDS: str(job.spec.checkpoint_interval_seconds),
            }
        )
        for name in (env.RESUME_STEP, env.RESUME_PREFIX):
            environment.pop(name, None)
        point = self.resume_point(job)
        if point is not None and point.kind != CheckpointKind.NONE and point.step is not None:
            environment[env.RESUME_STEP] = str(point.step)
            if point.prefix:
                environment[env.RESUME_PREFIX] = point.prefix
        return environment

    def resume_point(self, job: Job) -> ResumePoint | None:
        """Where training starts: the row's resume point, except for an agent restarted on
        its attempt (a reboot) once that attempt has a checkpoint of its own on the row:
        that one is newer (the steps after the resume point were trained already), and
        the resume point would exclude it (training never restores above it)."""
        last = job.last_checkpoint
        if (
            last is not None
            and last.attempt == self.attempt
            and job.instance_id == self.config.instance_id
            and job.status == JobStatus.RUNNING
        ):
            logger.info(
                "restarted on attempt %s: resuming from its own checkpoint at step %s",
                last.attempt,
                last.step,
            )
            return ResumePoint(kind=CheckpointKind.FALLBACK, step=last.step, prefix=last.prefix)
        return job.resume_point

    def _start_child(self, job: Job) -> None:
        logger.info("starting training: %s", " ".join(self.config.command))
        self.child = subprocess.Popen(
            self.config.command,
            env=self.child_environment(job),
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            start_new_session=True,  # its own process group: stand-down stops all of it
        )
        self._output = threading.Thread(target=self._pump_output, name="trainctl-child-output", daemon=True)
        self._output.start()

    def _pump_output(self) -> None:
        assert self.child is not None and self.child.stdout is not None
        for raw in iter(self.child.stdout.readline, b""):
            line = raw.decode(errors="replace")
            self.log_tail.append(line.rstrip("\n"))
            sys.stdout.write(line)
            sys.stdout.flush()
            if self.logs is not None:
                self.logs.write(line)

    def _drain_output(self, timeout: float = 10.0) -> None:
        self._output.join(timeout=5)
        # Durable messages sent just before exit must be recorded before we decide (and
        # before the agent exits): the child's connection ends only after the server
        # read each of its messages, and the recorder then works through them (retrying
        # an unavailable table for a while). Bounded: a forked grandchild may hold the
        # connection open.
        ends = time.monotonic() + timeout
        while time.monotonic() < ends:
            with self._lock:
                if not self._checkpointers:
                    break
            time.sleep(0.05)
        if not self._recorder.wait_idle(self.config.record_retry_seconds + timeout):
            logger.warning("a checkpoint record was still in progress when training ended")

    def _stop_child(self) -> None:
        child = self.child
        if child is None or child.poll() is not None:
            return
        try:
            os.killpg(child.pid, signal.SIGTERM)
            child.wait(self.config.stop_grace_seconds)
        except subprocess.TimeoutExpired:
            os.killpg(child.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass

    def _flush_logs(self) -> None:
        # Bounded wait: an unreachable CloudWatch must not delay the outcome or the shutdown.
        if self.logs is not None and not self.logs.flush():
            logger.warning("not every log line reached CloudWatch Logs before the job's outcome")

    def _on_child_exit(self, returncode: int) -> tuple[int, bool]:
        """(exit code, whether this is the attempt's terminal outcome)."""
        # Before the outcome: `trainctl logs --follow` stops once the job is terminal.
        self._flush_logs()
        if self.stood_down:
            return EXIT_STOOD_DOWN, True
        self._accrue_final_cost()
        if self.limit_reason is not None:
            # Stopped by a cost guard (after its checkpoint): the job ends here, whatever
            # else asked it to stop meanwhile; the resume workflow would fail it the same way.
            self._finish(succeeded=False, reason=self.limit_reason)
            return EXIT_LIMIT_REACHED, True
        if self._terminating.is_set():
            # Stopped from outside (systemd, docker): whoever stops us owns what comes next.
            logger.info("training stopped on SIGTERM (exit %s)", returncode)
            return EXIT_OK, False
        if self._stopping:
            # The resume workflow owns the job now; the instance is about to go.
            logger.info("training stopped after the interruption notice (exit %s)", returncode)
            return EXIT_OK, False
        if returncode == 0:
            self._finish(succeeded=True, reason=None)
            return EXIT_OK, True
        reason = failure_reason(returncode, list(self.log_tail)[-15:])
        self._finish(succeeded=False, reason=reason)
        return (returncode if returncode > 0 else 128 - returncode), True

    def _finish(self, *, succeeded: bool, reason: str | None) -> None:
        for _ in range(5):
            job = self.store.get(self.config.job_id)
            if job.instance_id != self.config.instance_id or job.attempt != self.attempt:
                logger.warning("job moved on to another attempt: not recording the outcome")
                return
            try:
                if succeeded:
                    transition = jobs.mark_succeeded(job, instance_id=self.config.instance_id, now=self.now())
                else:
                    transition = jobs.mark_failed(job, reason=reason or "training failed", now=self.now())
                self.store.apply(transition)
                logger.info("job %s %s", job.job_id, "SUCCEEDED" if succeeded else f"FAILED: {reason}")
                self._emit(lambda: [recovery_metrics.outcome_line(self.config.job_id, succeeded=succeeded)])
                return
            except ConcurrentUpdate:
                continue
            except jobs.JobError as exc:
                logger.warning("cannot record the outcome: %s", exc)
                return

    # --- 3. signals -------------------------------------------------------------------------------------

    def _imds_loop(self) -> None:
        assert self.imds is not None
        while not self._stopped.wait(self.config.imds_poll_seconds):
            try:
                action, rebalance = self.imds.poll()
            except ImdsUnavailable as exc:
                if not self._imds_down_logged:
                    logger.warning("IMDS unavailable (%s): relying on SSM signals", exc)
                    self._imds_down_logged = True
                continue
            except Exception:
                logger.exception("IMDS poll failed")
                continue
            if action is not None:
                # Polled again every few seconds: `notice` forwards a stop only once.
                self.notice(
                    _Notice(stop=True, source=f"imds:{action.action}", deadline=jobs.format_time(action.time))
                )
            elif rebalance is not None and rebalance.notice_time != self._seen_rebalance:
                # The recommendation stays in IMDS once issued: one checkpoint per recommendation,
                # then training continues (like the SSM document's Mode=continue).
                self._seen_rebalance = rebalance.notice_time
                self.notice(_Notice(stop=False, source="imds:rebalance", deadline=self._default_deadline()))

    def _default_deadline(self) -> str:
        return jobs.format_time(self.now() + timedelta(seconds=self.config.urgent_timeout_seconds))

    def notice(self, notice: _Notice, waiter: Peer | None = None) -> None:
        """A checkpoint is wanted (notice or rebalance): forward it to the child, unless a
        request it can wait on is already on its way.

        Once a stop was forwarded, every later request waits for the stop's checkpoint; a
        "continue" request waits for one still in flight. `waiter` (a `checkpoint-now`
        peer) is answered when the checkpoint answering the request is durable.
        """
        with self._lock:
            if notice.stop:
                self._stopping = True
                if self._stop_noticed_at is None and notice.source != LIMIT_SOURCE:
                    self._stop_noticed_at = self.now()  # a notice (the recovery's metrics)
            target = self._stop_request
            if target is None and not notice.stop:
                target = self._outstanding
            forward = target is None
            if target is None:
                notice.id = next(self._request_ids)
                if notice.stop:
                    self._stop_request = notice
                self._outstanding = notice
                target = notice
            if notice.stop and notice.source != SIGTERM_SOURCE and self._first_stop_id is None:
                # A SIGTERM alone (a reboot, `systemctl stop`) ends no attempt: its
                # checkpoint is recorded as the attempt's newest, not as its final one. A
                # final checkpoint on the row would end the handshake of a later notice on
                # this attempt at once, and the workflow would resume from it (older than
                # the notice's). A notice that joins a SIGTERM's stop makes it final.
                self._first_stop_id = target.id
            if waiter is not None:
                self._waiters.append((waiter, target.id))
            answered = target.id <= self._answered
            checkpointers = list(self._checkpointers)
            pids = set(self._signal_pids)
        if answered and self._answer is not None:
            self._answer_waiters(self._answered, self._answer)  # e.g. the SSM document sent twice
        if not checkpointers and not pids:
            # Still forwarded when the training process connects (`hello`), but nobody
            # can promise the waiter a checkpoint now.
            self._fail_waiters(target.id, "the training process has no trainctl Checkpointer connected")
        if not forward:
            return
        logger.info(
            "checkpoint requested (%s, %s, deadline=%s, request %s)",
            notice.source,
            "then stop" if notice.stop else "then continue",
            notice.deadline,
            notice.id,
        )
        if not checkpointers and not pids:
            return
        message = {"op": "checkpoint", "id": notice.id, "stop": notice.stop, "deadline": notice.deadline}
        linked = {peer.pid for peer in checkpointers if peer.send(message)}
        # The signal only where no link carried the message: the link's request names
        # this request (its id comes back with the checkpoint), a signal cannot.
        for pid in pids - linked:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGUSR1 if notice.stop else signal.SIGUSR2)

    def _answer_waiters(self, upto: int, checkpoint: CheckpointRef) -> None:
        with self._lock:
            done = [peer for peer, wanted in self._waiters if wanted <= upto]
            self._waiters = [(peer, wanted) for peer, wanted in self._waiters if wanted > upto]
        for peer in done:
            peer.send(
                {"op": "checkpoint-done", "ok": True, "step": checkpoint.step, "prefix": checkpoint.prefix}
            )

    def _fail_waiters(self, upto: int | None, error: str) -> None:
        """Fail the waiters of requests up to `upto` (None: all of them)."""
        with self._lock:
            done = [peer for peer, wanted in self._waiters if upto is None or wanted <= upto]
            self._waiters = [(p, w) for p, w in self._waiters if upto is not None and w > upto]
        for peer in done:
            peer.send({"op": "checkpoint-done", "ok": False, "error": error})

    def _answered_by(self, answers: int) -> None:
        """Requests up to `answers` have their answer: later ones must be forwarded anew."""
        with self._lock:
            self._answered = max(self._answered, answers)
            if self._outstanding is not None and self._outstanding.id <= answers:
                self._outstanding = None

    # --- IPC --------------------------------------------------------------------------------------------

    def _on_message(self, peer: Peer, message: dict[str, Any]) -> None:
        op = message.get("op")
        if op == "hello":
            peer.kind, peer.pid = str(message.get("kind")), message.get("pid")
            with self._lock:
                self._checkpointers.append(peer)
                pending = self._outstanding
            if pending is not None:
                # A request that arrived before the training process connected.
                peer.send(
                    {"op": "checkpoint", "id": pending.id, "stop": pending.stop, "deadline": pending.deadline}
                )
        elif op == "signals":
            with self._lock:
                self._signal_pids.add(int(message["pid"]))
        elif op == "progress":
            self._on_progress(int(message["step"]), float(message.get("t", time.time())))
        elif op == "durable":
            # Recorded in order, on the recorder's thread: this reader goes on reading,
            # so the `fence` the Checkpointer sends next is answered at once.
            self._recorder.submit(lambda: self._on_durable(message))
        elif op == "checkpoint-failed":
            self._recorder.submit(lambda: self._on_checkpoint_failed(message))
        elif op == "fence":
            peer.send({"op": "fence-reply", "id": message.get("id"), "current": self._is_current()})
        elif op == "checkpoint-now":
            self._on_checkpoint_now(peer, message)
        else:
            logger.warning("ipc: unknown op %r", op)

    def _on_checkpoint_now(self, peer: Peer, message: dict[str, Any]) -> None:
        if message.get("job_id") not in (None, self.config.job_id):
            peer.send(
                {"op": "checkpoint-done", "ok": False, "error": f"this agent runs job {self.config.job_id}"}
            )
            return
        mode = message.get("mode") or CHECKPOINT_MODE_STOP
        if mode not in CHECKPOINT_MODES:
            peer.send(
                {
                    "op": "checkpoint-done",
                    "ok": False,
                    "error": f"unknown mode {mode!r} (expected one of: {', '.join(CHECKPOINT_MODES)})",
                }
            )
            return
        deadline = message.get("deadline") or self._default_deadline()
        notice = _Notice(stop=mode == CHECKPOINT_MODE_STOP, source=f"ssm:{mode}", deadline=deadline)
        self.notice(notice, waiter=peer)

    def _on_checkpoint_failed(self, message: dict[str, Any]) -> None:
        answers = message.get("answers")
        if isinstance(answers, int):
            self._requests_failed(answers, str(message.get("error") or "the checkpoint failed"))

    def _requests_failed(self, answers: int, error: str) -> None:
        logger.warning("the requested checkpoint failed (request %s): %s", answers, error)
        self._answered_by(answers)
        with self._lock:
            if self._stop_request is not None and self._stop_request.id <= answers:
                # A later stop request (the SSM document again, IMDS on its next poll)
                # asks the child for a new one.
                self._stop_request = None
        self._fail_waiters(answers, error)

    def _on_disconnect(self, peer: Peer) -> None:
        with self._lock:
            if peer in self._checkpointers:
                self._checkpointers.remove(peer)
            self._waiters = [(p, wanted) for p, wanted in self._waiters if p is not peer]

    def _on_progress(self, step: int, at: float) -> None:
        with self._lock:
            first = not self._resume_reported
            self._resume_reported = True
        if first:
            resumed_at = self.now()  # training is running again: the moment a recovery ends
            self._emit(lambda: self._resumed_lines(resumed_at))
        with self._lock:
            self._step = step
            self._progress.append((at, step))
            if len(self._progress) >= 2:
                (t0, s0), (t1, s1) = self._progress[0], self._progress[-1]
                self._rate = (s1 - s0) / (t1 - t0) if t1 > t0 else self._rate

    # --- recovery metrics (log lines the stack's metric filters read) ---------------------

    def _remember_boot_row(self) -> None:
        """The row as this attempt found it: the previous attempt's last heartbeat is
        still on it, and is gone after this attempt's first heartbeat."""
        try:
            self._boot_job = self.store.get(self.config.job_id)
            self._boot_row = self.store.raw(self.config.job_id)
        except Exception:
            logger.warning("cannot read the job row for the recovery metrics", exc_info=True)

    def _resumed_lines(self, resumed_at: datetime) -> list[str]:
        if self._boot_job is None:
            return []
        return recovery_metrics.resumed_lines(
            self._boot_job, self._boot_row, resumed_at=resumed_at, pool=self._pool()
        )

    def _pool(self) -> str | None:
        """`<instance type>@<zone>` from IMDS; None off EC2 (the Replacements line is skipped)."""
        if self.imds is None:
            return None
        try:
            return self.imds.pool()
        except ImdsUnavailable:
            return None

    def _emit(self, lines: Callable[[], list[str]]) -> None:
        """Write metric lines straight to the log shipper (not through the logging
        formatter: a metric filter only matches a log event that is one JSON object).

        On a thread of its own: computing them may read the row or IMDS, and metrics
        never get in the way of training, the handshake or the outcome."""
        sink = self.logs
        if sink is None:
            return

        def report() -> None:
            try:
                for line in lines():
                    sink.write(line)
            except Exception:
                logger.warning("recovery metric not reported", exc_info=True)

        thread = threading.Thread(target=report, name="trainctl-metrics", daemon=True)
        self._metric_threads.append(thread)
        thread.start()

    def wait_for_metrics(self, timeout: float = 5.0) -> None:
        """Let the metric lines reach the log sink before it is closed (bounded)."""
        deadline = time.monotonic() + timeout
        for thread in list(self._metric_threads):
            thread.join(max(0.0, deadline - time.monotonic()))

    def _is_current(self) -> bool | None:
        """Is this attempt still the job's current one? None: the row could not be read."""
        try:
            job = self.store.get(self.config.job_id)
        except JobNotFound:
            return False
        except Exception:
            # The Checkpointer treats "no answer" as "do not publish yet" (fail closed).
            logger.exception("fence: cannot read the job row")
            return None
        return (
            job.instance_id == self.config.instance_id and job.attempt == self.attempt and not job.is_terminal
        )

    # --- 4. checkpoints and the handshake ------------------------------------------------

    def _on_durable(self, message: dict[str, Any]) -> None:
        ref = CheckpointRef(
            step=int(message["step"]),
            prefix=str(message["prefix"]),
            attempt=self.attempt,
            created_at=datetime.fromisoformat(str(message["created_at"]).replace("Z", "+00:00")),
        )
        answers = message.get("answers")
        answers = answers if isinstance(answers, int) else None
        with self._lock:
            # Final only if its snapshot was taken after the stop notice reached the child.
            first_stop = self._first_stop_id
            final = (
                bool(message.get("urgent"))
                and first_stop is not None
                and answers is not None
                and answers >= first_stop
            )
        try:
            row = self._record_checkpoint(ref, final=final)
        except Superseded as exc:
            current = exc.current
            if (
                current is not None
                and not current.is_terminal
                and current.attempt == self.attempt
                and current.instance_id == self.config.instance_id
            ):
                # Still this job's attempt: the write lost only on "step never goes back"
                # (an older checkpoint finished after a newer one). Not a reason to stop.
                logger.warning("checkpoint at step %s is older than the recorded one: not recorded", ref.step)
                if answers is not None:
                    self._requests_failed(
                        answers, f"checkpoint at step {ref.step} is older than the one on the job row"
                    )
                return
            logger.warning("superseded (%s): stopping training and standing down", exc)
            self._stand_down()
            return
        except Exception as exc:
            # Durable in storage, but the row does not name it: not a checkpoint the next
            # attempt (or the handshake) can use, so not one to promise a waiter.
            logger.error("checkpoint at step %s durable but not recorded on the job row: %s", ref.step, exc)
            if answers is not None:
                self._requests_failed(
                    answers,
                    f"checkpoint at step {ref.step} is durable but not recorded on the job row ({exc})",
                )
            return
        self._note_cost(row)
        self.last_checkpoint = ref
        logger.info("checkpoint recorded: step %s%s", ref.step, " (final)" if final else "")
        if final:
            if self.final_checkpoint is None:
                durable_at = self.now()
                self._emit(
                    lambda: recovery_metrics.final_checkpoint_lines(
                        self.store.get(self.config.job_id),
                        attempt=self.attempt,
                        durable_at=durable_at,
                        agent_noticed_at=self._stop_noticed_at,
                    )
                )
            self.final_checkpoint = ref
            self._leave_final_answer(ref)
            if not self.handshake_completed:
                self._complete_handshake(row, ref)
        if answers is not None:
            with self._lock:
                self._answer = ref
            self._answered_by(answers)
            self._answer_waiters(answers, ref)

    def _record_checkpoint(self, ref: CheckpointRef, *, final: bool) -> dict[str, Any]:
        """`store.record_checkpoint`, retried with backoff for `record_retry_seconds` while
        the table is unavailable. Never retried: `Superseded` (a condition said no)."""
        give_up = time.monotonic() + self.config.record_retry_seconds
        delay = 0.5
        while True:
            try:
                return self.store.record_checkpoint(
                    self.config.job_id,
                    instance_id=self.config.instance_id,
                    attempt=self.attempt,
                    checkpoint=ref,
                    final=final,
                )
            except StoreUnavailable as exc:
                if time.monotonic() + delay > give_up:
                    raise
                logger.warning(
                    "checkpoint at step %s not recorded yet (%s): retrying in %.1f s", ref.step, exc, delay
                )
                time.sleep(delay)
                delay = min(delay * 2, 8.0)

    def _leave_final_answer(self, ref: CheckpointRef) -> None:
        """For a `checkpoint-now` that comes after the agent has exited (ipc module docstring)."""
        try:
            ipc.write_final_answer(
                self.config.socket_path,
                {
                    "op": "checkpoint-done",
                    "ok": True,
                    "step": ref.step,
                    "prefix": ref.prefix,
                    "job_id": self.config.job_id,
                    "attempt": ref.attempt,
                },
            )
        except OSError as exc:
            logger.warning("cannot leave the final checkpoint's answer beside the socket: %s", exc)

    def _complete_handshake(self, row: dict[str, Any], ref: CheckpointRef) -> None:
        # DESIGN §2 race rule: the workflow stores its token conditioned on "no final
        # checkpoint for this attempt yet". If it is not on the row we just wrote, the
        # workflow's conditional write will fail and it reads the checkpoint itself.
        token = row.get("task_token")
        if not token or row.get("task_token_attempt") != self.attempt or self.handshake is None:
            logger.info(
                "no handshake token for attempt %s on the row: the workflow will read the row", self.attempt
            )
            return
        from trainctl_core.workflow import HandshakeError

        output = {
            "checkpoint": {
                "step": ref.step,
                "prefix": ref.prefix,
                "attempt": ref.attempt,
                "created_at": jobs.format_time(ref.created_at),
            }
        }
        try:
            self.handshake.complete(str(token), output)
            self.handshake_completed = True
            logger.info("handshake completed for attempt %s at step %s", self.attempt, ref.step)
        except HandshakeError as exc:
            logger.warning("handshake not completed: %s", exc)

    def _stand_down(self) -> None:
        self.stood_down = True
        self._fail_waiters(None, "this agent was superseded by a newer attempt")
        self._stop_child()

    # --- heartbeats ------------------------------------------------------------------------

    def _heartbeat_loop(self) -> None:
        """Every `heartbeat_seconds`: the attempt's cost, then its progress, to the row;
        then the cost guards. Ends when the attempt does, is superseded, or hits a guard."""
        while not self._stopped.wait(self.config.heartbeat_seconds):
            with self._lock:
                step, rate = self._step, self._rate
            # One failing does not keep the other off the row.
            if not self._fenced_write("cost", self._accrue_cost):
                return
            if step is not None and not self._fenced_write(
                "heartbeat", functools.partial(self._heartbeat, step, rate)
            ):
                return
            if self._check_limits():
                return

    def _heartbeat(self, step: int, rate: float | None) -> dict[str, Any]:
        return self.store.heartbeat(
            self.config.job_id,
            instance_id=self.config.instance_id,
            attempt=self.attempt,
            step=step,
            steps_per_second=rate,
        )

    def _fenced_write(self, what: str, write: Callable[[], dict[str, Any] | None]) -> bool:
        """Run one periodic write; False once superseded (the agent stands down)."""
        try:
            row = write()
        except Superseded as exc:
            logger.warning("superseded (%s): stopping training and standing down", exc)
            self._stand_down()
            return False
        except StoreUnavailable as exc:
            logger.warning("%s not written: %s", what, exc)
        except Exception:
            logger.exception("%s not written", what)
        else:
            if row is not None:
                self._note_cost(row)
        return True

    # --- cost guards ----------------------------------------------------------------------------

    def _start_cost_accrual(self, job: Job) -> None:
        """Where this attempt's billing starts (its launch on the row), and the row's
        accrual mark if this attempt already accrued (an agent restarted on it)."""
        self._job = self._boot_job or job
        self._cost_usd = float(self._job.cost_usd)
        launched = [
            record.launched_at
            for record in self._job.attempts
            if record.attempt == self.attempt and record.instance_id == self.config.instance_id
        ]
        # The launch is recorded just after RunInstances returned: billing starts soon after.
        self._cost_start = launched[-1] if launched else self.now()
        self._cost_mark = _accrual_mark(self._boot_row, self.attempt)

    def _accrue_cost(self) -> dict[str, Any] | None:
        """Add what this attempt cost since the row's mark to the row; the row as written,
        or None when nothing was (no price source, price unknown: the window waits)."""
        if self.prices is None or self._cost_start is None:
            return None
        with self._cost_lock:
            since = self._cost_mark
            start = since or self._cost_start
            until = _millis(self.now())
            if until <= start:
                return None
            usd = self.prices.cost(start, until)
            if usd is None:
                return None
            row = self.store.accrue_cost(
                self.config.job_id,
                instance_id=self.config.instance_id,
                attempt=self.attempt,
                usd=usd,
                since=since,
                until=until,
            )
            # The row's mark, not ours: if it had moved on (an earlier write landed after
            # all), nothing was added and the next window starts from where the row says.
            self._cost_mark = _accrual_mark(row, self.attempt) or self._cost_mark
            self._note_cost(row)
            return row

    def _accrue_final_cost(self) -> None:
        """What the attempt cost up to its end (best effort: the outcome comes first)."""
        try:
            self._accrue_cost()
        except Superseded:
            logger.info("the job moved on: this attempt's last cost is not added")
        except Exception:
            logger.warning("this attempt's last cost was not added to the job row", exc_info=True)

    def _note_cost(self, row: dict[str, Any]) -> None:
        value = row.get("cost_usd")
        if isinstance(value, int | float) and not isinstance(value, bool):
            self._cost_usd = float(value)

    def _check_limits(self) -> bool:
        """Past the job's deadline or at its budget: stop it (True). Not while a notice
        already stops it: the resume workflow then checks the same guards."""
        job = self._job
        if job is None:
            return False
        reason = limit_reached(job, cost_usd=self._cost_usd, now=self.now())
        if reason is None:
            return False
        with self._lock:
            if self.limit_reason is not None or self._stopping or self.stood_down:
                return self.limit_reason is not None
            self.limit_reason = reason
        logger.warning("%s: checkpointing, then the job ends FAILED", reason)
        threading.Thread(target=self._stop_for_limit, name="trainctl-limit", daemon=True).start()
        return True

    def _stop_for_limit(self) -> None:
        budget = self.config.urgent_timeout_seconds
        self._checkpoint_then_stop(
            LIMIT_SOURCE, deadline_seconds=budget, wait_seconds=budget + self.config.stop_grace_seconds
        )


LIMIT_SOURCE = "limit"
"""The `_Notice.source` of a stop a cost guard asked for (no notice: no recovery metrics)."""
SIGTERM_SOURCE = "sigterm"
"""The `_Notice.source` of the stop SIGTERM asks for (its checkpoint is not final)."""


def _millis(moment: datetime) -> datetime:
    """`moment` at the row's precision (milliseconds), so the mark written reads back equal."""
    return moment.replace(microsecond=moment.microsecond // 1000 * 1000)


def _accrual_mark(row: dict[str, Any], attempt: int) -> datetime | None:
    """The row's cost accrual mark, if it is `attempt`'s."""
    mark = row.get("cost_accrued_at")
    if row.get("cost_accrued_attempt") != attempt or not isinstance(mark, str):
        return None
    return datetime.fromisoformat(mark.replace("Z", "+00:00"))
