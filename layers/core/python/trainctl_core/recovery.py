"""What trainctl does when EC2 says an instance is going away: pure domain logic.

`Recovery` takes its collaborators as ports (job repository, checkpoint signaller, resume
starter, clock) and never imports boto3, so every branch is unit-testable with fakes.

Idempotency here is per *loss*, keyed on (job, instance, attempt): the Spot warning, a
state-change to shutting-down/terminated and a duplicate delivery of either all describe
the same loss, and together they produce at most one interruption record, one resume
execution (its name is derived from job and attempt) and one checkpoint request.

A checkpoint request that fails never stops the rest: the loss is still recorded and the
resume still starts (the workflow falls back to the newest periodic checkpoint when no
final one arrives). When the failure is transient and the notice has not run out, the
`Result` carries it in `retry`, for the handler to raise *after* everything else is done:
a Lambda retry then finds the loss recorded with `checkpoint_requested=False` and asks
again, and every other step of the retry is a no-op.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from enum import StrEnum
from typing import Any, Protocol

from trainctl_core.errors import CheckpointRequestFailed, ConcurrentUpdate, WriteContention
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

WRITE_TRIES = 3  # conditional-write attempts before giving up on a row that keeps changing


class Outcome(StrEnum):
    """How an event was handled; also the `outcome` dimension of the handler metrics."""

    RESUME_STARTED = "resume_started"  # loss recorded (now or before) and workflow running
    CHECKPOINT_REQUESTED = "checkpoint_requested"  # rebalance: checkpoint now, keep running
    IGNORED_UNMANAGED = "ignored_unmanaged"  # not trainctl's: no job runs on it or lost it last
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
    checkpoint_error: str | None = None  # why the checkpoint request failed, if it did
    # A failed checkpoint request that a retry of the event can still deliver (transient
    # error, notice not over). The handler raises it after reporting this result.
    retry: CheckpointRequestFailed | None = field(default=None, compare=False, repr=False)

    def as_dict(self) -> dict[str, Any]:
        return {
            k: (v.value if isinstance(v, StrEnum) else v) for k, v in self.__dict__.items() if k != "retry"
        }


class JobRepository(Protocol):
    def find_by_instance(self, instance_id: str) -> Job | None: ...
    def find_by_interrupted_instance(self, instance_id: str) -> Job | None: ...
    def apply(self, transition: Transition) -> Job: ...


class CheckpointSignaller(Protocol):
    def request_checkpoint(
        self, *, instance_id: str, job_id: str, deadline: datetime, stop: bool = True
    ) -> str: ...


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
        requested, failure = False, None
        # A state-change may have recorded this loss first; the warning still asks for a
        # final checkpoint unless a warning already did (the instance may still be alive).
        if self._needs_checkpoint(job):
            requested, failure = self._request_checkpoint(job, instance_id, deadline)
        result = self._record_and_resume(
            job,
            instance_id=instance_id,
            reason=InterruptionReason.SPOT_WARNING,
            noticed_at=noticed_at,
            deadline=deadline,
            event_id=event_id,
            checkpoint_requested=requested,
        )
        return self._finish(result, requested, failure, deadline)

    def on_rebalance(self, *, instance_id: str, noticed_at: datetime, event_id: str) -> Result:
        """Rebalance risk: checkpoint now; migrate early if the job's policy says so."""
        job, ignored = self._current_job(instance_id)
        if job is None:
            return ignored  # type: ignore[return-value]
        # A retry of the very event that recorded a migration goes on: its checkpoint
        # request may have failed, and its resume may not have started.
        if job.status not in (JobStatus.RUNNING, JobStatus.LAUNCHING) and not self._recorded_by(
            job, event_id
        ):
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
        requested, failure = False, None
        migrate = job.spec.on_rebalance == "migrate"
        if self._needs_checkpoint(job):
            # Without migration the instance keeps training after this checkpoint: the
            # agent must not stop its training process (the Spot warning may never come).
            requested, failure = self._request_checkpoint(job, instance_id, deadline, stop=migrate)
        if not migrate:
            result = Result(Outcome.CHECKPOINT_REQUESTED, instance_id, job.job_id, job.attempt)
            return self._finish(result, requested, failure, deadline)
        result = self._record_and_resume(
            job,
            instance_id=instance_id,
            reason=InterruptionReason.REBALANCE_MIGRATE,
            noticed_at=noticed_at,
            deadline=deadline,
            event_id=event_id,
            checkpoint_requested=requested,
        )
        return self._finish(result, requested, failure, deadline)

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
            noticed_at=changed_at,
            deadline=None,
            event_id=event_id,
        )

    # --- steps ---------------------------------------------------------------------------

    def _current_job(self, instance_id: str) -> tuple[Job | None, Result | None]:
        job = self._jobs.find_by_instance(instance_id)
        if job is None:
            return None, self._not_current(instance_id)
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

    def _not_current(self, instance_id: str) -> Result:
        """No job runs on `instance_id` now: it is a job's replaced instance (a late or
        repeated event about a loss already handled) or not trainctl's at all."""
        past = self._jobs.find_by_interrupted_instance(instance_id)
        if past is None:
            return Result(
                Outcome.IGNORED_UNMANAGED,
                instance_id,
                detail="no trainctl job currently runs on this instance",
            )
        lost = next((i.attempt for i in reversed(past.interruptions) if i.instance_id == instance_id), None)
        return Result(
            Outcome.IGNORED_TERMINAL if past.is_terminal else Outcome.IGNORED_STALE,
            instance_id,
            past.job_id,
            lost,
            detail=(
                f"instance {instance_id} was attempt {lost} of job {past.job_id}, which is now "
                f"{past.status} on instance {past.instance_id} attempt {past.attempt}"
            ),
        )

    @staticmethod
    def _needs_checkpoint(job: Job) -> bool:
        """Whether to ask the current attempt's instance for a checkpoint now.

        Yes unless a warning (or a migrating rebalance) recorded this attempt's loss and
        its request went out: once is enough, later signals about the same loss add
        nothing. A loss recorded without notice, or whose request failed, asks again.
        """
        interruption = job.interruption_for(job.attempt)
        if interruption is None:
            return True
        if interruption.reason not in (InterruptionReason.SPOT_WARNING, InterruptionReason.REBALANCE_MIGRATE):
            return True
        return interruption.checkpoint_requested is False

    @staticmethod
    def _recorded_by(job: Job, event_id: str) -> bool:
        """This event recorded the current attempt's loss: it is being delivered again."""
        interruption = job.interruption_for(job.attempt)
        return (
            job.status == JobStatus.INTERRUPTED
            and interruption is not None
            and interruption.event_id == event_id
        )

    def _request_checkpoint(
        self, job: Job, instance_id: str, deadline: datetime, *, stop: bool = True
    ) -> tuple[bool, CheckpointRequestFailed | None]:
        try:
            self._signaller.request_checkpoint(
                instance_id=instance_id, job_id=job.job_id, deadline=deadline, stop=stop
            )
        except CheckpointRequestFailed as exc:
            # Reported, then recovery goes on: without a final checkpoint the workflow's
            # handshake times out and it resumes from the newest periodic checkpoint.
            self._on_signal_failure(job.job_id, instance_id, exc)
            return False, exc
        return True, None

    def _finish(
        self,
        result: Result,
        requested: bool,
        failure: CheckpointRequestFailed | None,
        deadline: datetime,
    ) -> Result:
        """Attach the checkpoint request's fate; ask for a retry only if it can still help."""
        if failure is None:
            return _with(result, checkpoint_requested=requested)
        helps = (
            failure.retryable
            and self._clock() < deadline
            # The loss is this job's (recorded now or before): not an instance it left.
            and result.outcome in (Outcome.RESUME_STARTED, Outcome.CHECKPOINT_REQUESTED)
        )
        return _with(
            result,
            checkpoint_requested=False,
            checkpoint_error=str(failure),
            retry=failure if helps else None,
        )

    def _record_and_resume(
        self,
        job: Job,
        *,
        instance_id: str,
        reason: InterruptionReason,
        noticed_at: datetime,
        deadline: datetime | None,
        event_id: str,
        checkpoint_requested: bool | None = None,
    ) -> Result:
        now = self._clock()
        recorded = False
        current = job
        for _ in range(WRITE_TRIES):  # re-read on a concurrent write (e.g. a status race)
            try:
                transition = mark_interrupted(
                    current,
                    instance_id=instance_id,
                    reason=reason,
                    now=now,
                    noticed_at=noticed_at,
                    deadline=deadline,
                    event_id=event_id,
                    checkpoint_requested=checkpoint_requested,
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
            raise WriteContention(job.job_id, WRITE_TRIES)

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
                # The remaining notice counts from when the loss was recorded (rows from
                # before `recorded_at` existed recorded the recorder's clock as noticed_at).
                noticed_at=(interruption.recorded_at or interruption.noticed_at) if interruption else now,
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
