"""The job model and its state machine, as pure data and functions.

One job row is the source of truth. Every change of status goes through a function here
that checks the move against `ALLOWED_TRANSITIONS` and the caller's view of the job
(instance, attempt), and returns a `Transition`: the expected current state plus the
fields to set. The store turns a `Transition` into a single conditional write, so two
writers racing on the same job can never both win.
"""

from __future__ import annotations

import re
from datetime import UTC, datetime, timedelta
from enum import StrEnum
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

JOB_ID_PATTERN = re.compile(r"^[a-z0-9][a-z0-9-]{0,62}$")
"""Job ids end up in execution names (80 chars), S3 prefixes and tags: keep them tame."""


class JobStatus(StrEnum):
    PENDING = "PENDING"
    LAUNCHING = "LAUNCHING"
    RUNNING = "RUNNING"
    INTERRUPTED = "INTERRUPTED"
    SUCCEEDED = "SUCCEEDED"
    FAILED = "FAILED"
    CANCELLED = "CANCELLED"


TERMINAL_STATUSES = frozenset({JobStatus.SUCCEEDED, JobStatus.FAILED, JobStatus.CANCELLED})

ALLOWED_TRANSITIONS: dict[JobStatus, frozenset[JobStatus]] = {
    JobStatus.PENDING: frozenset({JobStatus.LAUNCHING, JobStatus.FAILED, JobStatus.CANCELLED}),
    # A replacement can be lost before its agent reports in, hence LAUNCHING -> INTERRUPTED.
    JobStatus.LAUNCHING: frozenset(
        {JobStatus.RUNNING, JobStatus.INTERRUPTED, JobStatus.FAILED, JobStatus.CANCELLED}
    ),
    JobStatus.RUNNING: frozenset(
        {JobStatus.INTERRUPTED, JobStatus.SUCCEEDED, JobStatus.FAILED, JobStatus.CANCELLED}
    ),
    JobStatus.INTERRUPTED: frozenset({JobStatus.LAUNCHING, JobStatus.FAILED, JobStatus.CANCELLED}),
    JobStatus.SUCCEEDED: frozenset(),
    JobStatus.FAILED: frozenset(),
    JobStatus.CANCELLED: frozenset(),
}


class InterruptionReason(StrEnum):
    """Why a resume workflow runs; the values are the workflow's `reason` input."""

    SPOT_WARNING = "spot-warning"
    REBALANCE_MIGRATE = "rebalance-migrate"
    TERMINATED_WITHOUT_NOTICE = "terminated-without-notice"
    LAUNCH = "launch"


class CheckpointKind(StrEnum):
    FINAL = "final"  # taken on the notice, handshake completed
    FALLBACK = "fallback"  # newest periodic checkpoint (no notice, or the handshake timed out)
    NONE = "none"  # nothing durable yet: start from scratch


# --- errors --------------------------------------------------------------------------


class JobError(Exception):
    """Base class of every refusal the job model makes."""


class IllegalTransition(JobError):
    def __init__(self, job_id: str, current: JobStatus, target: JobStatus) -> None:
        super().__init__(f"job {job_id}: {current} -> {target} is not an allowed transition")
        self.job_id, self.current, self.target = job_id, current, target


class JobIsTerminal(IllegalTransition):
    """The job already ended (SUCCEEDED, FAILED or CANCELLED); nothing may change it."""


class StaleAttempt(JobError):
    """The caller speaks about an instance/attempt that is no longer the job's current one."""

    def __init__(self, job_id: str, expected: tuple[str | None, int], actual: tuple[str | None, int]):
        super().__init__(
            f"job {job_id}: event is about instance {expected[0]} attempt {expected[1]}, "
            f"but the job is on instance {actual[0]} attempt {actual[1]}"
        )
        self.job_id, self.expected, self.actual = job_id, expected, actual


class AlreadyInterrupted(JobError):
    """This (instance, attempt) was already recorded as interrupted: a duplicate signal."""

    def __init__(self, job_id: str, instance_id: str, attempt: int) -> None:
        super().__init__(f"job {job_id}: instance {instance_id} attempt {attempt} already interrupted")
        self.job_id, self.instance_id, self.attempt = job_id, instance_id, attempt


# --- the spec a user submits ------------------------------------------------------------


class CapacityPool(BaseModel):
    """One place a job can run: an instance type in a subnet (hence an AZ)."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    instance_type: str = Field(pattern=r"^[a-z0-9]+[a-z0-9-]*\.[a-z0-9]+$")
    subnet_id: str = Field(pattern=r"^subnet-[0-9a-f]{8,17}$")

    @property
    def label(self) -> str:
        return f"{self.instance_type}@{self.subnet_id}"


class JobLimits(BaseModel):
    """Cost guards; hitting any of them ends the job FAILED with the reason."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    max_interruptions: int = Field(default=10, ge=0, le=100)
    max_hours: float = Field(default=24.0, gt=0, le=24 * 30)
    budget_usd: float | None = Field(default=None, gt=0)


class JobSpec(BaseModel):
    """What to run and under which policy."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    name: str = Field(min_length=1, max_length=128)
    command: list[str] = Field(min_length=1)
    image: str | None = None
    pools: list[CapacityPool] = Field(min_length=1, max_length=20)
    allow_on_demand: bool = False
    on_rebalance: Literal["checkpoint", "migrate"] = "checkpoint"
    limits: JobLimits = JobLimits()
    checkpoint_interval_seconds: int = Field(default=600, ge=10)
    checkpoint_retention: int = Field(default=3, ge=1, le=100)
    env: dict[str, str] = Field(default_factory=dict)
    tags: dict[str, str] = Field(default_factory=dict)

    @field_validator("pools")
    @classmethod
    def _pools_unique(cls, pools: list[CapacityPool]) -> list[CapacityPool]:
        labels = [p.label for p in pools]
        duplicates = sorted({label for label in labels if labels.count(label) > 1})
        if duplicates:
            raise ValueError(f"capacity pools must be unique, repeated: {', '.join(duplicates)}")
        return pools


# --- the row -----------------------------------------------------------------------------


class CheckpointRef(BaseModel):
    """A durable checkpoint: its step and S3 prefix (the manifest lives under it)."""

    model_config = ConfigDict(frozen=True)

    step: int = Field(ge=0)
    prefix: str
    attempt: int = Field(ge=0)
    created_at: datetime


class ResumePoint(BaseModel):
    """Where the next attempt starts: decided by the resume workflow, read by the agent."""

    model_config = ConfigDict(frozen=True)

    kind: CheckpointKind
    step: int | None = None
    prefix: str | None = None


class Interruption(BaseModel):
    model_config = ConfigDict(frozen=True)

    attempt: int
    instance_id: str
    reason: InterruptionReason
    noticed_at: datetime  # when EC2 announced the loss (the event's time)
    deadline: datetime | None = None
    event_id: str | None = None
    # When trainctl recorded it (None: a row written before this field existed). The
    # handshake's remaining notice is measured from here.
    recorded_at: datetime | None = None
    # Whether the recorder's checkpoint-now request reached SSM (None: it sent none, e.g.
    # a loss without notice, or a row written before this field existed). False lets a
    # retry of the event, or another warning about the same loss, ask again.
    checkpoint_requested: bool | None = None


class AttemptRecord(BaseModel):
    model_config = ConfigDict(frozen=True)

    attempt: int
    instance_id: str
    pool: str | None = None
    launched_at: datetime


class Job(BaseModel):
    """The job row, as the domain sees it."""

    model_config = ConfigDict(frozen=True)

    job_id: str
    spec: JobSpec
    status: JobStatus = JobStatus.PENDING
    version: int = Field(default=0, ge=0)
    attempt: int = Field(default=0, ge=0)
    instance_id: str | None = None
    # The instance whose loss was recorded last (kept after the replacement takes over),
    # so that late events about it are recognised as this job's stale attempt.
    interrupted_instance_id: str | None = None
    created_at: datetime
    updated_at: datetime
    interruptions: list[Interruption] = Field(default_factory=list)
    attempts: list[AttemptRecord] = Field(default_factory=list)
    last_checkpoint: CheckpointRef | None = None
    final_checkpoint: CheckpointRef | None = None
    resume_point: ResumePoint | None = None
    failure_reason: str | None = None
    # Precomputed wall-clock guard (created_at + limits.max_hours): Step Functions can
    # compare timestamps but not add to them.
    deadline_at: datetime | None = None
    cost_usd: float = Field(default=0.0, ge=0)

    @field_validator("job_id")
    @classmethod
    def _job_id_shape(cls, value: str) -> str:
        if not JOB_ID_PATTERN.match(value):
            raise ValueError(
                "job id must be 1-63 chars of lowercase letters, digits and '-', starting "
                f"with a letter or digit (got {value!r})"
            )
        return value

    @model_validator(mode="after")
    def _running_has_instance(self) -> Job:
        if self.status in (JobStatus.RUNNING, JobStatus.INTERRUPTED) and not self.instance_id:
            raise ValueError(f"a {self.status} job must name its instance")
        return self

    @property
    def is_terminal(self) -> bool:
        return self.status in TERMINAL_STATUSES

    def interruption_for(self, attempt: int) -> Interruption | None:
        """The recorded interruption of `attempt`, if any (the newest wins)."""
        for interruption in reversed(self.interruptions):
            if interruption.attempt == attempt:
                return interruption
        return None

    @property
    def execution_name(self) -> str:
        """Name of the resume that follows the loss of the current attempt (`<job>-<attempt>`)."""
        return execution_name(self.job_id, self.attempt)


LAUNCH_EXECUTION_SUFFIX = "launch"


def execution_name(job_id: str, attempt: int, reason: InterruptionReason | str | None = None) -> str:
    """The workflow execution's name for a job: deterministic, so a second start of the
    same run is a no-op (same input) or `ExecutionAlreadyExists` (another input).

    The launch (reason `launch`) is `<job>-launch`; the resume after the loss of attempt n
    is `<job>-<n>`. The launch also runs with attempt 0, so naming it `<job>-0` would
    take the name of the resume after attempt 0's loss, and Step Functions would refuse
    that resume (the job would stay INTERRUPTED for ever).
    """
    if reason == InterruptionReason.LAUNCH:
        return f"{job_id}-{LAUNCH_EXECUTION_SUFFIX}"
    return f"{job_id}-{attempt}"


# --- transitions --------------------------------------------------------------------------


class Transition(BaseModel):
    """One conditional write: the state the writer saw, and what it changes.

    `expected_*` become the write's condition; `changes` are attribute values to set (in
    row form, see `Job`); `append` are list attributes to extend. The version always moves
    to `expected_version + 1`.
    """

    model_config = ConfigDict(frozen=True)

    job_id: str
    expected_version: int
    expected_status: JobStatus
    expected_instance_id: str | None
    target_status: JobStatus
    changes: dict[str, Any] = Field(default_factory=dict)
    append: dict[str, list[Any]] = Field(default_factory=dict)


def check_transition(job: Job, target: JobStatus) -> None:
    """Raise unless `job.status -> target` is in the transition table."""
    if job.is_terminal:
        raise JobIsTerminal(job.job_id, job.status, target)
    if target not in ALLOWED_TRANSITIONS[job.status]:
        raise IllegalTransition(job.job_id, job.status, target)


def _transition(job: Job, target: JobStatus, now: datetime, **changes: Any) -> Transition:
    check_transition(job, target)
    append = changes.pop("append", {})
    return Transition(
        job_id=job.job_id,
        expected_version=job.version,
        expected_status=job.status,
        expected_instance_id=job.instance_id,
        target_status=target,
        changes={"status": target, "updated_at": now, **changes},
        append=append,
    )


def mark_interrupted(
    job: Job,
    *,
    instance_id: str,
    reason: InterruptionReason,
    now: datetime,
    noticed_at: datetime | None = None,
    deadline: datetime | None = None,
    event_id: str | None = None,
    checkpoint_requested: bool | None = None,
) -> Transition:
    """RUNNING/LAUNCHING(instance, attempt) -> INTERRUPTED, recording the interruption.

    `noticed_at` is when EC2 announced the loss (the event's time; default `now`, the
    recorder's clock), so that "notice to launch" includes the event's delivery.
    Raises `AlreadyInterrupted` when this instance's loss is already recorded (a second
    signal about the same loss), `StaleAttempt` when the instance is not the job's current
    one, `JobIsTerminal`/`IllegalTransition` otherwise.
    """
    if job.instance_id != instance_id:
        raise StaleAttempt(job.job_id, (instance_id, job.attempt), (job.instance_id, job.attempt))
    if job.status == JobStatus.INTERRUPTED:
        raise AlreadyInterrupted(job.job_id, instance_id, job.attempt)
    record = Interruption(
        attempt=job.attempt,
        instance_id=instance_id,
        reason=reason,
        noticed_at=noticed_at or now,
        recorded_at=now,
        deadline=deadline,
        event_id=event_id,
        checkpoint_requested=checkpoint_requested,
    )
    return _transition(
        job,
        JobStatus.INTERRUPTED,
        now,
        interrupted_instance_id=instance_id,
        append={"interruptions": [record]},
    )


def mark_launching(
    job: Job,
    *,
    instance_id: str,
    pool: str | None,
    resume_point: ResumePoint,
    now: datetime,
) -> Transition:
    """PENDING/INTERRUPTED -> LAUNCHING on a new instance; a replacement is attempt + 1."""
    attempt = 0 if job.status == JobStatus.PENDING else job.attempt + 1
    record = AttemptRecord(attempt=attempt, instance_id=instance_id, pool=pool, launched_at=now)
    return _transition(
        job,
        JobStatus.LAUNCHING,
        now,
        instance_id=instance_id,
        attempt=attempt,
        resume_point=resume_point,
        append={"attempts": [record]},
    )


def mark_running(job: Job, *, instance_id: str, now: datetime) -> Transition:
    """LAUNCHING -> RUNNING, reported by the agent on the instance the job launched."""
    if job.instance_id != instance_id:
        raise StaleAttempt(job.job_id, (instance_id, job.attempt), (job.instance_id, job.attempt))
    return _transition(job, JobStatus.RUNNING, now)


def mark_succeeded(job: Job, *, instance_id: str, now: datetime) -> Transition:
    if job.instance_id != instance_id:
        raise StaleAttempt(job.job_id, (instance_id, job.attempt), (job.instance_id, job.attempt))
    return _transition(job, JobStatus.SUCCEEDED, now)


def mark_failed(job: Job, *, reason: str, now: datetime) -> Transition:
    if not reason:
        raise ValueError("a failed job needs a reason")
    return _transition(job, JobStatus.FAILED, now, failure_reason=reason)


def mark_cancelled(job: Job, *, now: datetime) -> Transition:
    return _transition(job, JobStatus.CANCELLED, now)


def apply(job: Job, transition: Transition) -> Job:
    """The job as it is after `transition` was written (what the store returns)."""
    if (job.version, job.status) != (transition.expected_version, transition.expected_status):
        raise ValueError("transition was computed from another version of the job")
    data = job.model_dump()
    data.update(transition.changes)
    for name, items in transition.append.items():
        data[name] = [*data.get(name, []), *items]
    data["version"] = job.version + 1
    return Job.model_validate(data)


def new_job(job_id: str, spec: JobSpec, now: datetime | None = None) -> Job:
    moment = now or utcnow()
    return Job(
        job_id=job_id,
        spec=spec,
        created_at=moment,
        updated_at=moment,
        deadline_at=moment + timedelta(hours=spec.limits.max_hours),
    )


def utcnow() -> datetime:
    return datetime.now(UTC)


def format_time(moment: datetime) -> str:
    """RFC 3339 with a `Z`, as Step Functions' timestamp comparisons require."""
    return moment.astimezone(UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")
