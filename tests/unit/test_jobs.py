"""The job model's transition table, move by move: every legal move is accepted by its
function and lands where it should; every other move is refused with a typed error.

The expected table is written out here on purpose (not read from `ALLOWED_TRANSITIONS`):
a change to the production table must show up as a failing test, not pass silently.
"""

from __future__ import annotations

import itertools
import re
from collections.abc import Callable
from datetime import UTC, datetime, timedelta, timezone
from typing import Any

import pytest
from pydantic import ValidationError

from trainctl_core import jobs
from trainctl_core.jobs import (
    AlreadyInterrupted,
    CapacityPool,
    CheckpointKind,
    IllegalTransition,
    InterruptionReason,
    Job,
    JobIsTerminal,
    JobSpec,
    JobStatus,
    ResumePoint,
    StaleAttempt,
    Transition,
)

S = JobStatus
LEGAL: dict[JobStatus, set[JobStatus]] = {
    S.PENDING: {S.LAUNCHING, S.FAILED, S.CANCELLED},
    S.LAUNCHING: {S.RUNNING, S.INTERRUPTED, S.FAILED, S.CANCELLED},
    S.RUNNING: {S.INTERRUPTED, S.SUCCEEDED, S.FAILED, S.CANCELLED},
    S.INTERRUPTED: {S.LAUNCHING, S.FAILED, S.CANCELLED},
    S.SUCCEEDED: set(),
    S.FAILED: set(),
    S.CANCELLED: set(),
}
TERMINAL = {S.SUCCEEDED, S.FAILED, S.CANCELLED}
ALL_PAIRS = list(itertools.product(JobStatus, JobStatus))
LEGAL_PAIRS = [(a, b) for a, b in ALL_PAIRS if b in LEGAL[a]]
ILLEGAL_PAIRS = [(a, b) for a, b in ALL_PAIRS if b not in LEGAL[a]]

T0 = datetime(2026, 12, 3, 12, 0, tzinfo=UTC)
NOW = T0 + timedelta(minutes=30)
OLD_INSTANCE = "i-0aaaaaaaaaaaaaaa0"
NEW_INSTANCE = "i-0bbbbbbbbbbbbbbb0"
POOL = CapacityPool(instance_type="g5.xlarge", subnet_id="subnet-0aaa1111")


def spec(**overrides: Any) -> JobSpec:
    fields: dict[str, Any] = {"name": "train", "command": ["python", "train.py"], "pools": [POOL]}
    return JobSpec(**{**fields, **overrides})


def job_in(status: JobStatus, *, attempt: int = 2, version: int = 7) -> Job:
    """A job row in `status`; every status but PENDING sits on an instance (attempt 2)."""
    return Job(
        job_id="job-1",
        spec=spec(),
        status=status,
        version=version,
        attempt=0 if status == S.PENDING else attempt,
        instance_id=None if status == S.PENDING else OLD_INSTANCE,
        created_at=T0,
        updated_at=T0,
    )


# Each target status is reached through exactly one function; PENDING through none.
MOVES: dict[JobStatus, Callable[[Job], Transition]] = {
    S.LAUNCHING: lambda job: jobs.mark_launching(
        job,
        instance_id=NEW_INSTANCE,
        pool=POOL.label,
        resume_point=ResumePoint(kind=CheckpointKind.NONE),
        now=NOW,
    ),
    S.RUNNING: lambda job: jobs.mark_running(job, instance_id=job.instance_id or OLD_INSTANCE, now=NOW),
    S.INTERRUPTED: lambda job: jobs.mark_interrupted(
        job,
        instance_id=job.instance_id or OLD_INSTANCE,
        reason=InterruptionReason.SPOT_WARNING,
        now=NOW,
        deadline=NOW + timedelta(minutes=2),
        event_id="evt-1",
    ),
    S.SUCCEEDED: lambda job: jobs.mark_succeeded(job, instance_id=job.instance_id or OLD_INSTANCE, now=NOW),
    S.FAILED: lambda job: jobs.mark_failed(job, reason="max interruptions reached", now=NOW),
    S.CANCELLED: lambda job: jobs.mark_cancelled(job, now=NOW),
}


# --- the table itself ---------------------------------------------------------------------


def test_production_table_is_the_documented_one() -> None:
    assert {k: set(v) for k, v in jobs.ALLOWED_TRANSITIONS.items()} == LEGAL
    assert set(jobs.TERMINAL_STATUSES) == TERMINAL


@pytest.mark.parametrize(("current", "target"), LEGAL_PAIRS, ids=[f"{a}->{b}" for a, b in LEGAL_PAIRS])
def test_check_accepts_every_legal_move(current: JobStatus, target: JobStatus) -> None:
    jobs.check_transition(job_in(current), target)  # does not raise


@pytest.mark.parametrize(("current", "target"), ILLEGAL_PAIRS, ids=[f"{a}->{b}" for a, b in ILLEGAL_PAIRS])
def test_check_refuses_every_illegal_move_with_a_typed_error(current: JobStatus, target: JobStatus) -> None:
    expected = JobIsTerminal if current in TERMINAL else IllegalTransition
    with pytest.raises(expected) as info:
        jobs.check_transition(job_in(current), target)
    # The error carries the move, so callers map it without reading the message.
    assert (info.value.job_id, info.value.current, info.value.target) == ("job-1", current, target)
    if current not in TERMINAL:
        assert type(info.value) is IllegalTransition  # a live job is not reported as ended


# --- the functions that make the moves ------------------------------------------------------


@pytest.mark.parametrize(("current", "target"), LEGAL_PAIRS, ids=[f"{a}->{b}" for a, b in LEGAL_PAIRS])
def test_every_legal_move_is_one_conditional_write(current: JobStatus, target: JobStatus) -> None:
    before = job_in(current)

    transition = MOVES[target](before)

    # The write is conditioned on exactly what the writer saw ...
    assert (transition.expected_version, transition.expected_status, transition.expected_instance_id) == (
        7,
        current,
        before.instance_id,
    )
    assert transition.target_status == target
    # ... and the row after it has the new status, the next version and the write time.
    after = jobs.apply(before, transition)
    assert (after.status, after.version, after.updated_at) == (target, 8, NOW)


ILLEGAL_VIA_FUNCTIONS = [(a, b) for a, b in ILLEGAL_PAIRS if b in MOVES]


def _expected_refusal(current: JobStatus, target: JobStatus) -> type[Exception]:
    if target == S.INTERRUPTED and current == S.INTERRUPTED:
        return AlreadyInterrupted  # a second signal about a loss already recorded
    if current == S.PENDING and target in (S.RUNNING, S.SUCCEEDED, S.INTERRUPTED):
        return StaleAttempt  # a PENDING job has no instance an event could be about
    return JobIsTerminal if current in TERMINAL else IllegalTransition


@pytest.mark.parametrize(
    ("current", "target"), ILLEGAL_VIA_FUNCTIONS, ids=[f"{a}->{b}" for a, b in ILLEGAL_VIA_FUNCTIONS]
)
def test_every_illegal_move_is_refused_by_its_function(current: JobStatus, target: JobStatus) -> None:
    with pytest.raises(jobs.JobError) as info:
        MOVES[target](job_in(current))
    assert type(info.value) is _expected_refusal(current, target)


@pytest.mark.parametrize("move", [jobs.mark_running, jobs.mark_succeeded])
def test_agent_reports_from_another_instance_are_stale(move: Callable[..., Transition]) -> None:
    job = job_in(S.LAUNCHING if move is jobs.mark_running else S.RUNNING)
    with pytest.raises(StaleAttempt) as info:
        move(job, instance_id=NEW_INSTANCE, now=NOW)
    assert info.value.expected == (NEW_INSTANCE, 2)
    assert info.value.actual == (OLD_INSTANCE, 2)


def test_interruption_of_a_superseded_instance_is_stale_not_recorded() -> None:
    with pytest.raises(StaleAttempt):
        jobs.mark_interrupted(
            job_in(S.RUNNING), instance_id=NEW_INSTANCE, reason=InterruptionReason.SPOT_WARNING, now=NOW
        )


def test_interruption_is_recorded_with_attempt_deadline_and_event() -> None:
    after = jobs.apply(job_in(S.RUNNING), MOVES[S.INTERRUPTED](job_in(S.RUNNING)))

    [record] = after.interruptions
    assert (record.attempt, record.instance_id, record.reason) == (2, OLD_INSTANCE, "spot-warning")
    assert (record.noticed_at, record.deadline, record.event_id) == (NOW, NOW + timedelta(minutes=2), "evt-1")
    assert after.interruption_for(2) == record
    assert after.interruption_for(1) is None
    assert after.instance_id == OLD_INSTANCE  # the lost instance stays named until a replacement


def test_launch_of_a_new_job_is_attempt_zero_and_a_replacement_is_the_next_attempt() -> None:
    first = jobs.apply(job_in(S.PENDING), MOVES[S.LAUNCHING](job_in(S.PENDING)))
    interrupted = job_in(S.INTERRUPTED, attempt=2)
    replacement = jobs.apply(interrupted, MOVES[S.LAUNCHING](interrupted))

    assert (first.attempt, first.instance_id) == (0, NEW_INSTANCE)
    assert (replacement.attempt, replacement.instance_id) == (3, NEW_INSTANCE)
    assert replacement.resume_point == ResumePoint(kind=CheckpointKind.NONE)
    [record] = replacement.attempts
    assert (record.attempt, record.instance_id, record.pool, record.launched_at) == (
        3,
        NEW_INSTANCE,
        POOL.label,
        NOW,
    )
    assert replacement.execution_name == "job-1-3"


def test_the_launch_and_the_resume_after_attempt_0_have_different_execution_names() -> None:
    # Both run with attempt 0: one name for both would make Step Functions refuse the
    # resume after attempt 0's loss as "already exists", leaving the job INTERRUPTED.
    launch = jobs.execution_name("job-1", 0, InterruptionReason.LAUNCH)
    resumes = {
        jobs.execution_name("job-1", 0, reason)
        for reason in InterruptionReason
        if reason != InterruptionReason.LAUNCH
    }

    assert launch == "job-1-launch"
    assert resumes == {"job-1-0"}
    assert jobs.execution_name("job-1", 0, "launch") == launch  # as the input document says it
    # Names stay within Step Functions' 80 characters for the longest job id.
    assert len(jobs.execution_name("j" * 63, 0, InterruptionReason.LAUNCH)) <= 80


def test_history_is_appended_not_replaced() -> None:
    job = job_in(S.PENDING)
    for move in (S.LAUNCHING, S.RUNNING, S.INTERRUPTED, S.LAUNCHING, S.RUNNING, S.INTERRUPTED):
        job = jobs.apply(job, MOVES[move](job))
    assert [a.attempt for a in job.attempts] == [0, 1]
    assert [i.attempt for i in job.interruptions] == [0, 1]
    assert job.version == 7 + 6


def test_failure_needs_a_reason_and_keeps_it() -> None:
    with pytest.raises(ValueError, match="reason"):
        jobs.mark_failed(job_in(S.RUNNING), reason="", now=NOW)
    failed = jobs.apply(job_in(S.RUNNING), MOVES[S.FAILED](job_in(S.RUNNING)))
    assert failed.failure_reason == "max interruptions reached"
    assert failed.is_terminal


def test_a_transition_computed_from_an_older_version_cannot_be_applied() -> None:
    seen = job_in(S.RUNNING, version=7)
    transition = MOVES[S.CANCELLED](seen)
    moved_on = job_in(S.RUNNING, version=8)
    with pytest.raises(ValueError, match="another version"):
        jobs.apply(moved_on, transition)


# --- the model's own validation -------------------------------------------------------------


@pytest.mark.parametrize("job_id", ["", "Job-1", "-job", "job_1", "a" * 64, "job/1"])
def test_job_ids_that_would_break_names_prefixes_or_tags_are_refused(job_id: str) -> None:
    with pytest.raises(ValidationError, match="job id"):
        Job(job_id=job_id, spec=spec(), created_at=T0, updated_at=T0)


@pytest.mark.parametrize("status", [S.RUNNING, S.INTERRUPTED])
def test_a_running_or_interrupted_job_must_name_its_instance(status: JobStatus) -> None:
    with pytest.raises(ValidationError, match="must name its instance"):
        Job(job_id="job-1", spec=spec(), status=status, created_at=T0, updated_at=T0)


def test_spec_refuses_repeated_pools_naming_them() -> None:
    with pytest.raises(ValidationError, match=re.escape(POOL.label)):
        spec(pools=[POOL, POOL])


@pytest.mark.parametrize(
    "pool",
    [
        {"instance_type": "g5", "subnet_id": "subnet-0aaa1111"},
        {"instance_type": "g5.xlarge", "subnet_id": "sn-1"},
        {"instance_type": "g5.xlarge", "subnet_id": "subnet-0aaa1111", "az": "us-east-1a"},
    ],
)
def test_malformed_pools_are_refused(pool: dict[str, str]) -> None:
    with pytest.raises(ValidationError):
        CapacityPool(**pool)


def test_new_job_precomputes_the_wall_clock_guard() -> None:
    job = jobs.new_job("job-1", spec(limits=jobs.JobLimits(max_hours=1.5)), now=T0)
    assert (job.status, job.version, job.attempt, job.instance_id) == (S.PENDING, 0, 0, None)
    assert job.deadline_at == T0 + timedelta(hours=1.5)


def test_times_are_rfc3339_utc_with_z_for_step_functions() -> None:
    # Given a moment expressed in another offset (UTC+2)
    elsewhere = datetime(2026, 12, 3, 15, 0, 0, 123456, tzinfo=timezone(timedelta(hours=2)))
    assert jobs.format_time(elsewhere) == "2026-12-03T13:00:00.123Z"
