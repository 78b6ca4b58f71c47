"""The agent: runs the training command as a child and reacts to every signal.

Lifecycle of one attempt on one instance:

1. wait until the job row names this instance and a resume point (a replacement boots
   while the old instance is still checkpointing: it must not train before that);
2. LAUNCHING -> RUNNING, start the training child with `TRAINCTL_*` variables (resume
   step/prefix, checkpoint bucket, IPC socket);
3. while it runs: IMDSv2 polled every 5 s (backup signal), IPC endpoint for the SSM
   document's `trainctl checkpoint-now`, heartbeats to the row, every durable checkpoint
   recorded on the row (fenced on instance + attempt);
4. on a notice: forward it to the child (IPC message + SIGUSR1), wait for the durable
   checkpoint, record it as final and complete the workflow's handshake;
5. child exit 0 -> SUCCEEDED and shut the instance down; non-zero -> FAILED with the exit
   code and log tail (never relaunched: a user bug would loop); after a notice -> nothing
   (the resume workflow owns the job now).

A fenced write refused with `Superseded` means another attempt owns the job: stop the
child and stand down.
"""

from __future__ import annotations

import collections
import contextlib
import logging
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any, Protocol

from trainctl import runtime_env as env
from trainctl.agent.imds import ImdsClient, ImdsUnavailable
from trainctl.agent.ipc import IpcServer, Peer
from trainctl_core import jobs
from trainctl_core.jobs import CheckpointKind, CheckpointRef, Job, JobStatus
from trainctl_core.store import ConcurrentUpdate, JobNotFound, Superseded

logger = logging.getLogger("trainctl.agent")

EXIT_OK = 0
EXIT_STOOD_DOWN = 3
EXIT_NO_RESUME_POINT = 4


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
    urgent_timeout_seconds: float = 110.0
    shutdown_command: list[str] | None = None
    log_tail_lines: int = 30
    stop_grace_seconds: float = 10.0


@dataclass
class _Notice:
    stop: bool
    source: str
    deadline: str | None = None
    final: bool = True


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
    ) -> None:
        self.config = config
        self.store = store
        self.handshake = handshake
        self.imds = imds
        self.logs = logs
        self.now = now
        self.attempt: int = config.attempt if config.attempt is not None else -1
        self.child: subprocess.Popen[bytes] | None = None
        self.log_tail: collections.deque[str] = collections.deque(maxlen=config.log_tail_lines)
        self.ipc = IpcServer(config.socket_path, self._on_message, self._on_disconnect)
        self._lock = threading.Lock()
        self._stopped = threading.Event()
        self._notice: _Notice | None = None
        self._notice_forwarded = False
        self._waiters: list[Peer] = []
        self._signal_pids: set[int] = set()
        self._checkpointers: list[Peer] = []
        self.stood_down = False
        self.final_checkpoint: CheckpointRef | None = None
        self.last_checkpoint: CheckpointRef | None = None
        self.handshake_completed = False
        self._step: int | None = None
        self._rate: float | None = None
        self._progress: collections.deque[tuple[float, int]] = collections.deque(maxlen=30)
        self._imds_down_logged = False

    # --- entry point ------------------------------------------------------------------------

    def run(self) -> int:
        job = self._wait_for_resume_point()
        if job is not None and self.logs is not None:
            self.logs.bind_attempt(self.attempt)  # the stream is <job>/<attempt>/<instance>
        if job is None:
            return EXIT_NO_RESUME_POINT if not self.stood_down else EXIT_STOOD_DOWN
        if not self._mark_running(job):
            return EXIT_STOOD_DOWN
        self.ipc.start()
        try:
            self._start_child(job)
            threads = [threading.Thread(target=self._heartbeat_loop, name="trainctl-heartbeat", daemon=True)]
            if self.imds is not None:
                threads.append(threading.Thread(target=self._imds_loop, name="trainctl-imds", daemon=True))
            for thread in threads:
                thread.start()
            assert self.child is not None
            returncode = self.child.wait()
            self._drain_output()
            return self._on_child_exit(returncode)
        finally:
            self._stopped.set()
            self.ipc.stop()

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
            time.sleep(self.config.resume_poll_seconds)

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
        point = job.resume_point
        if point is not None and point.kind != CheckpointKind.NONE and point.step is not None:
            environment[env.RESUME_STEP] = str(point.step)
            if point.prefix:
                environment[env.RESUME_PREFIX] = point.prefix
        return environment

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

    def _drain_output(self) -> None:
        self._output.join(timeout=5)
        # Durable messages sent just before exit must be recorded before we decide.
        time.sleep(0.2)

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

    def _on_child_exit(self, returncode: int) -> int:
        # Before the outcome: `trainctl logs --follow` stops once the job is terminal.
        self._flush_logs()
        if self.stood_down:
            return EXIT_STOOD_DOWN
        if self._notice is not None and self._notice.stop:
            # The resume workflow owns the job now; the instance is about to go.
            logger.info("training stopped after the interruption notice (exit %s)", returncode)
            return EXIT_OK
        if returncode == 0:
            self._finish(succeeded=True, reason=None)
            if self.config.shutdown_command:
                logger.info("job succeeded: shutting the instance down")
                self._flush_logs()
                subprocess.run(self.config.shutdown_command, check=False)
            return EXIT_OK
        tail = "\n".join(list(self.log_tail)[-15:])
        reason = f"training exited with code {returncode}: {tail}"[:3000]
        self._finish(succeeded=False, reason=reason)
        return returncode if returncode > 0 else 128 - returncode

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
                self.notice(
                    _Notice(stop=True, source=f"imds:{action.action}", deadline=jobs.format_time(action.time))
                )
            elif rebalance is not None:
                self.notice(_Notice(stop=False, final=False, source="imds:rebalance"))

    def notice(self, notice: _Notice, waiter: Peer | None = None) -> None:
        """A checkpoint is wanted (notice or rebalance); forward it to the child once."""
        with self._lock:
            if waiter is not None:
                self._waiters.append(waiter)
            escalate = self._notice is None or (notice.stop and not self._notice.stop)
            if not escalate:
                if waiter is not None and self.final_checkpoint is not None:
                    self._answer_waiters()
                return
            self._notice = notice
            checkpointers = list(self._checkpointers)
            pids = set(self._signal_pids)
        logger.info(
            "checkpoint requested (%s, stop=%s, deadline=%s)", notice.source, notice.stop, notice.deadline
        )
        if not checkpointers and not pids:
            self._fail_waiters("the training process has no trainctl Checkpointer connected")
            return
        for peer in checkpointers:
            peer.send({"op": "checkpoint", "stop": notice.stop, "deadline": notice.deadline})
        for pid in pids:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGUSR1 if notice.stop else signal.SIGUSR2)

    def _answer_waiters(self) -> None:
        checkpoint = self.final_checkpoint
        with self._lock:
            waiters, self._waiters = self._waiters, []
        for peer in waiters:
            peer.send(
                {
                    "op": "checkpoint-done",
                    "ok": True,
                    "step": checkpoint.step if checkpoint else None,
                    "prefix": checkpoint.prefix if checkpoint else None,
                }
            )

    def _fail_waiters(self, error: str) -> None:
        with self._lock:
            waiters, self._waiters = self._waiters, []
        for peer in waiters:
            peer.send({"op": "checkpoint-done", "ok": False, "error": error})

    # --- IPC --------------------------------------------------------------------------------------------

    def _on_message(self, peer: Peer, message: dict[str, Any]) -> None:
        op = message.get("op")
        if op == "hello":
            peer.kind, peer.pid = str(message.get("kind")), message.get("pid")
            with self._lock:
                self._checkpointers.append(peer)
                pending = self._notice
            if pending is not None:
                # A notice that arrived before the training process connected.
                peer.send({"op": "checkpoint", "stop": pending.stop, "deadline": pending.deadline})
        elif op == "signals":
            with self._lock:
                self._signal_pids.add(int(message["pid"]))
        elif op == "progress":
            self._on_progress(int(message["step"]), float(message.get("t", time.time())))
        elif op == "durable":
            self._on_durable(message)
        elif op == "fence":
            peer.send({"op": "fence-reply", "id": message.get("id"), "current": self._is_current()})
        elif op == "checkpoint-now":
            if message.get("job_id") not in (None, self.config.job_id):
                peer.send(
                    {
                        "op": "checkpoint-done",
                        "ok": False,
                        "error": f"this agent runs job {self.config.job_id}",
                    }
                )
                return
            self.notice(_Notice(stop=True, source="ssm", deadline=message.get("deadline")), waiter=peer)
        else:
            logger.warning("ipc: unknown op %r", op)

    def _on_disconnect(self, peer: Peer) -> None:
        with self._lock:
            if peer in self._checkpointers:
                self._checkpointers.remove(peer)
            if peer in self._waiters:
                self._waiters.remove(peer)

    def _on_progress(self, step: int, at: float) -> None:
        with self._lock:
            self._step = step
            self._progress.append((at, step))
            if len(self._progress) >= 2:
                (t0, s0), (t1, s1) = self._progress[0], self._progress[-1]
                self._rate = (s1 - s0) / (t1 - t0) if t1 > t0 else self._rate

    def _is_current(self) -> bool:
        try:
            job = self.store.get(self.config.job_id)
        except JobNotFound:
            return False
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
        with self._lock:
            final = bool(message.get("urgent")) and self._notice is not None and self._notice.final
        try:
            row = self.store.record_checkpoint(
                self.config.job_id,
                instance_id=self.config.instance_id,
                attempt=self.attempt,
                checkpoint=ref,
                final=final,
            )
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
                return
            logger.warning("superseded (%s): stopping training and standing down", exc)
            self._stand_down()
            return
        self.last_checkpoint = ref
        logger.info("checkpoint recorded: step %s%s", ref.step, " (final)" if final else "")
        if not final:
            return
        self.final_checkpoint = ref
        self._complete_handshake(row, ref)
        self._answer_waiters()

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
        self._fail_waiters("this agent was superseded by a newer attempt")
        self._stop_child()

    # --- heartbeats ------------------------------------------------------------------------

    def _heartbeat_loop(self) -> None:
        while not self._stopped.wait(self.config.heartbeat_seconds):
            with self._lock:
                step, rate = self._step, self._rate
            if step is None:
                continue
            try:
                self.store.heartbeat(
                    self.config.job_id,
                    instance_id=self.config.instance_id,
                    attempt=self.attempt,
                    step=step,
                    steps_per_second=rate,
                )
            except Superseded as exc:
                logger.warning("superseded (%s): stopping training and standing down", exc)
                self._stand_down()
                return
            except Exception:
                logger.exception("heartbeat failed")
