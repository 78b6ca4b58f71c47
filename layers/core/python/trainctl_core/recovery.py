"""What trainctl does when EC2 says an instance is going away: pure domain logic.

`Recovery` takes its collaborators as ports (job repository, checkpoint signaller, resume
starter, clock) and never imports boto3, so every branch is unit-testable with fakes.

Idempotency here is per *loss*, keyed on (job, instance, attempt): the Spot warning, a
state-change to shutting-down/terminated and a duplicate delivery of either all describe
the same loss, and together they produce at most one interruption record, one resume
execution (its name is derived from job and attempt) and one checkpoint request.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime, timedelta
from enum import StrEnum
from typing import Any, Protocol

from trainctl_core.commands import InstanceUnreachable
from trainctl_core.jobs import (
    AlreadyInterrupted,
    InterruptionReason,
    Job,
    JobIsTerminal,
    JobStatus,
    StaleAttempt,
    Transition,
    mark_interrupted,
)
from trainctl_core.store import ConcurrentUpdate


class Outcome(StrEnum):
    """How an event was handled; also the `outcome` dimension of the handler metrics."""

    RESUME_STARTED = "resume_started"  # loss recorded (now or before) and workflow running
    CHECKPOINT_REQUESTED = "checkpoint_requested"  # rebalance: checkpoint now, keep running
    IGNORED_UNMANAGED = "ignored_unmanaged"  # no job runs on this instance (now)
    IGNORED_TERMINAL = "ignored_terminal"  # the job already ended
    IGNORED_STALE = "ignored_stale"  # the job moved on to another instance/attempt
    IGNORED_NOT_A_LOSS = "ignored_not_a_loss"  # a state change that is not a loss


@dataclass(frozen=True)
class Result:
    outcome: Outcome
    instance_id: str
    job_id: str | None = None
    attempt: int | None = None
    checkpoint_requested: bool = False
    interruption_recorded: bool = False
    execution_started: bool = False
    detail: str | None = None

    def as_dict(self) -> dict[str, Any]:
        return {k: (v.value if isinstance(v, StrEnum) else v) for k, v in self.__dict__.items()}


class JobRepository(Protocol):
    def find_by_instance(self, instance_id: str) -> Job | None: ...
    def apply(self, transition: Transition) -> Job: ...


class CheckpointSignaller(Protocol):
    def request_checkpoint(self, *, instance_id: str, job_id: str, deadline: datetime) -> str: ...


class ResumeLauncher(Protocol):
    def start(self, document: dict[str, Any]) -> bool: ...


class Recovery:
    """Turns EC2 signals about an instance into checkpoint requests and resumes."""

    def __init__(
        self,
        *,
        jobs: JobRepository,
        signaller: CheckpointSignaller,
        resumes: ResumeLauncher,
        resume_input: Callable[..., dict[str, Any]],
        clock: Callable[[], datetime],
        notice_seconds: int,
        on_signal_failure: Callable[[str, str, Exception], None] | None = None,
    ) -> None:
        self._jobs = jobs
        self._signaller = signaller
        self._resumes = resumes
        self._resume_input = resume_input
        self._clock = clock
        self._notice = timedelta(seconds=notice_seconds)
        self._on_signal_failure = on_signal_failure or (lambda *_: None)

    # --- entry points (one per EC2 event) ----------------------------------------------

    def on_spot_warning(self, *, instance_id: str, noticed_at: datetime, event_id: str) -> Result:
        """Checkpoint now (first: it is the time-critical part), then record and resume."""
        job, ignored = self._current_job(instance_id)
        if job is None:
            return ignored  # type: ignore[return-value]
        deadline = noticed_at + self._notice
        requested = False
        # A state-change may have recorded this loss first; the warning still asks for a
        # final checkpoint unless a warning already did (the instance may still be alive).
        already_warned = self._warned(job, job.attempt)
        if not already_warned:
            requested = self._request_checkpoint(job, instance_id, deadline)
        result = self._record_and_resume(
            job,
            instance_id=instance_id,
            reason=InterruptionReason.SPOT_WARNING,
            deadline=deadline,
            event_id=event_id,
        )
        return _with(result, checkpoint_requested=requested)

    def on_rebalance(self, *, instance_id: str, noticed_at: datetime, event_id: str) -> Result:
        """Rebalance risk: checkpoint now; migrate early if the job's policy says so."""
        job, ignored = self._current_job(instance_id)
        if job is None:
            return ignored  # type: ignore[return-value]
        if job.status not in (JobStatus.RUNNING, JobStatus.LAUNCHING):
            return Result(
                Outcome.IGNORED_STALE,
                instance_id,
                job.job_id,
                job.attempt,
                detail=f"job is {job.status}; a rebalance recommendation changes nothing",
            )
        # No fixed deadline comes with a rebalance recommendation; the notice period is a
        # reasonable bound for the agent to make the checkpoint durable.
        deadline = noticed_at + self._notice
        requested = self._request_checkpoint(job, instance_id, deadline)
        if job.spec.on_rebalance != "migrate":
            return Result(
                Outcome.CHECKPOINT_REQUESTED,
                instance_id,
                job.job_id,
                job.attempt,
                checkpoint_requested=requested,
            )
        result = self._record_and_resume(
            job,
            instance_id=instance_id,
            reason=InterruptionReason.REBALANCE_MIGRATE,
            deadline=deadline,
            event_id=event_id,
        )
        return _with(result, checkpoint_requested=requested)

    def on_state_change(
        self, *, instance_id: str, state: str, changed_at: datetime, event_id: str, is_loss: bool
    ) -> Result:
        """shutting-down/terminated of a job's current instance: resume from the last
        periodic checkpoint, unless a warning already recorded this loss."""
        if not is_loss:
            return Result(Outcome.IGNORED_NOT_A_LOSS, instance_id, detail=f"state {state}")
        job, ignored = self._current_job(instance_id)
        if job is None:
            return ignored  # type: ignore[return-value]
        return self._record_and_resume(
            job,
            instance_id=instance_id,
            reason=InterruptionReason.TERMINATED_WITHOUT_NOTICE,
            deadline=None,
            event_id=event_id,
        )

    # --- steps ---------------------------------------------------------------------------

    def _current_job(self, instance_id: str) -> tuple[Job | None, Result | None]:
        job = self._jobs.find_by_instance(instance_id)
        if job is None:
            return None, Result(
                Outcome.IGNORED_UNMANAGED,
                instance_id,
                detail="no trainctl job currently runs on this instance",
            )
        if job.is_terminal:
            return None, Result(
                Outcome.IGNORED_TERMINAL,
                instance_id,
                job.job_id,
                job.attempt,
                detail=f"job already {job.status}",
            )
        if job.status == JobStatus.PENDING:
            return None, Result(
                Outcome.IGNORED_STALE, instance_id, job.job_id, job.attempt, detail="job not launched"
            )
        return job, None

    @staticmethod
    def _warned(job: Job, attempt: int) -> bool:
        interruption = job.interruption_for(attempt)
        return interruption is not None and interruption.reason in (
            InterruptionReason.SPOT_WARNING,
            InterruptionReason.REBALANCE_MIGRATE,
        )

    def _request_checkpoint(self, job: Job, instance_id: str, deadline: datetime) -> bool:
        try:
            self._signaller.request_checkpoint(instance_id=instance_id, job_id=job.job_id, deadline=deadline)
        except InstanceUnreachable as exc:
            # The instance is already gone or its SSM agent is down: the workflow's
            # handshake will time out and resume from the newest periodic checkpoint.
            self._on_signal_failure(job.job_id, instance_id, exc)
            return False
        return True

    def _record_and_resume(
        self,
        job: Job,
        *,
        instance_id: str,
        reason: InterruptionReason,
        deadline: datetime | None,
        event_id: str,
    ) -> Result:
        now = self._clock()
        recorded = False
        current = job
        for _ in range(3):  # re-read on a concurrent write (e.g. a heartbeat-free status race)
            try:
                transition = mark_interrupted(
                    current,
                    instance_id=instance_id,
                    reason=reason,
                    now=now,
                    deadline=deadline,
                    event_id=event_id,
                )
            except AlreadyInterrupted:
                break  # another signal recorded this loss: make sure the resume runs
            except StaleAttempt as exc:
                return Result(Outcome.IGNORED_STALE, instance_id, job.job_id, job.attempt, detail=str(exc))
            except JobIsTerminal as exc:
                return Result(Outcome.IGNORED_TERMINAL, instance_id, job.job_id, job.attempt, detail=str(exc))
            try:
                current = self._jobs.apply(transition)
                recorded = True
                break
            except ConcurrentUpdate as exc:
                if exc.current is None:
                    raise
                current = exc.current
        else:
            raise RuntimeError(f"job {job.job_id}: gave up recording the interruption after 3 races")

        interruption = current.interruption_for(current.attempt)
        # The workflow's reason is the one of the *recorded* interruption: whoever recorded
        # the loss first decides whether the handshake is awaited.
        effective_reason = interruption.reason if interruption else reason
        effective_deadline = interruption.deadline if interruption else deadline
        started = self._resumes.start(
            self._resume_input(
                job_id=current.job_id,
                instance_id=instance_id,
                attempt=current.attempt,
                reason=effective_reason,
                deadline=effective_deadline,
                noticed_at=interruption.noticed_at if interruption else now,
            )
        )
        # A signal that did not record the loss still starts the workflow: a safety net
        # for a recorder that crashed between its write and its start. The start call is
        # idempotent, so it is only *counted* as started by the recorder.
        started = started and recorded
        return Result(
            Outcome.RESUME_STARTED,
            instance_id,
            current.job_id,
            current.attempt,
            interruption_recorded=recorded,
            execution_started=started,
        )


def _with(result: Result, **changes: Any) -> Result:
    return Result(**{**result.__dict__, **changes})
