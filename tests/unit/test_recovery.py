"""`Recovery`'s branches with in-memory fakes for its ports (no boto3, no moto).

The fakes behave like the adapters they stand for: the job repository finds a job by its
*current* instance, or by the instance of its last recorded loss once it moved on, and
applies a transition only if version, status and instance still match (else
`ConcurrentUpdate` with the row as it is now); the resume launcher refuses a second
execution of the same name, like Step Functions.
"""

from __future__ import annotations

from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest

from trainctl_core import jobs
from trainctl_core.errors import (
    CheckpointRequestFailed,
    ConcurrentUpdate,
    InstanceUnreachable,
    WriteContention,
)
from trainctl_core.jobs import (
    CapacityPool,
    CheckpointKind,
    InterruptionReason,
    Job,
    JobSpec,
    JobStatus,
    ResumePoint,
    Transition,
)
from trainctl_core.recovery import Outcome, Recovery
from trainctl_core.workflow import execution_name_for, resume_input

INSTANCE = "i-0aaaaaaaaaaaaaaa0"
REPLACEMENT = "i-0bbbbbbbbbbbbbbb0"
NOTICED = datetime(2026, 12, 3, 12, 0, tzinfo=UTC)
CLOCK = NOTICED + timedelta(seconds=2)
POOL = CapacityPool(instance_type="g5.xlarge", subnet_id="subnet-0aaa1111")


class FakeJobs:
    """The jobs table: rows by id, conditional writes, lookup by current instance."""

    def __init__(self) -> None:
        self.rows: dict[str, Job] = {}
        self.writes: list[Transition] = []
        # Called before a write is checked: lets a test land another writer first.
        self.before_write: Callable[[Transition], None] = lambda _t: None

    def put(self, job: Job) -> Job:
        self.rows[job.job_id] = job
        return job

    def find_by_instance(self, instance_id: str) -> Job | None:
        return next((j for j in self.rows.values() if j.instance_id == instance_id), None)

    def find_by_interrupted_instance(self, instance_id: str) -> Job | None:
        return next(
            (
                j
                for j in self.rows.values()
                if j.interrupted_instance_id == instance_id and j.instance_id != instance_id
            ),
            None,
        )

    def apply(self, transition: Transition) -> Job:
        self.before_write(transition)
        row = self.rows.get(transition.job_id)
        if row is None or (row.version, row.status, row.instance_id) != (
            transition.expected_version,
            transition.expected_status,
            transition.expected_instance_id,
        ):
            raise ConcurrentUpdate(transition.job_id, row)
        self.writes.append(transition)
        self.rows[row.job_id] = jobs.apply(row, transition)
        return self.rows[row.job_id]


class FakeSignaller:
    def __init__(self) -> None:
        self.requests: list[dict[str, Any]] = []
        self.error: Exception | None = None

    def request_checkpoint(
        self, *, instance_id: str, job_id: str, deadline: datetime, stop: bool = True
    ) -> str:
        if self.error is not None:
            raise self.error
        self.requests.append(
            {"instance_id": instance_id, "job_id": job_id, "deadline": deadline, "stop": stop}
        )
        return f"cmd-{len(self.requests)}"


class FakeResumes:
    def __init__(self) -> None:
        self.started: dict[str, dict[str, Any]] = {}
        self.calls = 0

    def start(self, document: dict[str, Any]) -> bool:
        self.calls += 1
        name = execution_name_for(document)
        if name in self.started:
            return False  # ExecutionAlreadyExists
        self.started[name] = document
        return True


class World:
    def __init__(self) -> None:
        self.jobs = FakeJobs()
        self.signaller = FakeSignaller()
        self.resumes = FakeResumes()
        self.signal_failures: list[tuple[str, str, Exception]] = []
        self.now = CLOCK
        self.recovery = Recovery(
            jobs=self.jobs,
            signaller=self.signaller,
            resumes=self.resumes,
            resume_input=resume_input,
            clock=lambda: self.now,
            notice_seconds=120,
            on_signal_failure=lambda *args: self.signal_failures.append(args),
        )

    def job(self, status: JobStatus = JobStatus.RUNNING, *, on_rebalance: str = "checkpoint") -> Job:
        spec = JobSpec(name="train", command=["python", "t.py"], pools=[POOL], on_rebalance=on_rebalance)  # type: ignore[arg-type]
        job = jobs.new_job("job-1", spec, now=NOTICED - timedelta(hours=1))
        if status == JobStatus.PENDING:
            return self.jobs.put(job)
        job = jobs.apply(job, launching(job, INSTANCE))
        if status != JobStatus.LAUNCHING:
            job = jobs.apply(job, jobs.mark_running(job, instance_id=INSTANCE, now=NOTICED))
        if status == JobStatus.SUCCEEDED:
            job = jobs.apply(job, jobs.mark_succeeded(job, instance_id=INSTANCE, now=NOTICED))
        elif status == JobStatus.CANCELLED:
            job = jobs.apply(job, jobs.mark_cancelled(job, now=NOTICED))
        elif status == JobStatus.FAILED:
            job = jobs.apply(job, jobs.mark_failed(job, reason="test", now=NOTICED))
        return self.jobs.put(job)

    def warning(self, event_id: str = "evt-warning") -> Any:
        return self.recovery.on_spot_warning(instance_id=INSTANCE, noticed_at=NOTICED, event_id=event_id)

    def terminated(self, event_id: str = "evt-terminated", state: str = "terminated") -> Any:
        return self.recovery.on_state_change(
            instance_id=INSTANCE,
            state=state,
            changed_at=NOTICED + timedelta(seconds=90),
            event_id=event_id,
            is_loss=state in ("shutting-down", "terminated"),
        )

    def rebalance(self, event_id: str = "evt-rebalance") -> Any:
        return self.recovery.on_rebalance(instance_id=INSTANCE, noticed_at=NOTICED, event_id=event_id)

    @property
    def row(self) -> Job:
        return self.jobs.rows["job-1"]


def launching(job: Job, instance_id: str) -> Transition:
    return jobs.mark_launching(
        job,
        instance_id=instance_id,
        pool=POOL.label,
        resume_point=ResumePoint(kind=CheckpointKind.NONE),
        now=NOTICED,
    )


@pytest.fixture
def world() -> World:
    return World()


# --- the happy paths --------------------------------------------------------------------------


def test_warning_checkpoints_first_then_records_then_starts(world: World) -> None:
    world.job()
    order: list[str] = []
    world.jobs.before_write = lambda _t: order.append("record")
    original_request = world.signaller.request_checkpoint

    def request(**kwargs: Any) -> str:
        order.append("checkpoint")
        return original_request(**kwargs)

    world.signaller.request_checkpoint = request  # type: ignore[method-assign]

    result = world.warning()

    assert order == ["checkpoint", "record"]  # the time-critical request goes out first
    assert result.outcome == Outcome.RESUME_STARTED
    assert (result.checkpoint_requested, result.interruption_recorded, result.execution_started) == (
        True,
        True,
        True,
    )
    assert world.signaller.requests == [
        {
            "instance_id": INSTANCE,
            "job_id": "job-1",
            "deadline": NOTICED + timedelta(seconds=120),
            "stop": True,
        }
    ]
    assert world.row.status == JobStatus.INTERRUPTED
    [record] = world.row.interruptions
    # Noticed when EC2 sent the warning, recorded when the handler got to it.
    assert (record.reason, record.noticed_at, record.recorded_at, record.event_id) == (
        "spot-warning",
        NOTICED,
        CLOCK,
        "evt-warning",
    )
    assert world.row.interrupted_instance_id == INSTANCE
    assert world.resumes.started == {
        "job-1-0": {
            "job_id": "job-1",
            "instance_id": INSTANCE,
            "attempt": 0,
            "reason": "spot-warning",
            "deadline": "2026-12-03T12:02:00.000Z",
            # measured from when the loss was recorded, so a late handler waits less
            "handshake_timeout_seconds": 118,
        }
    }


@pytest.mark.parametrize("state", ["terminated", "shutting-down"])
def test_loss_without_notice_resumes_without_a_checkpoint_request(world: World, state: str) -> None:
    world.job()

    result = world.terminated(state=state)

    assert result.outcome == Outcome.RESUME_STARTED and result.execution_started
    assert world.signaller.requests == []
    document = world.resumes.started["job-1-0"]
    assert document["reason"] == "terminated-without-notice"
    assert document["deadline"] is None and "handshake_timeout_seconds" not in document


@pytest.mark.parametrize("state", ["pending", "running", "stopping", "stopped"])
def test_state_changes_that_are_not_losses_do_nothing(world: World, state: str) -> None:
    before = world.job()

    result = world.terminated(state=state)

    assert result.outcome == Outcome.IGNORED_NOT_A_LOSS
    assert world.row == before and world.resumes.calls == 0


def test_a_launching_replacement_lost_before_it_reported_in_is_a_loss(world: World) -> None:
    world.job(JobStatus.LAUNCHING)

    assert world.warning().outcome == Outcome.RESUME_STARTED
    assert world.row.status == JobStatus.INTERRUPTED


# --- duplicates and several signals about one loss ------------------------------------------------


def test_the_same_warning_three_times_is_one_checkpoint_one_record_one_execution(world: World) -> None:
    world.job()

    results = [world.warning() for _ in range(3)]

    assert [r.outcome for r in results] == [Outcome.RESUME_STARTED] * 3
    assert [r.interruption_recorded for r in results] == [True, False, False]
    assert [r.execution_started for r in results] == [True, False, False]
    assert [r.checkpoint_requested for r in results] == [True, False, False]
    assert len(world.signaller.requests) == 1
    assert len(world.jobs.writes) == 1
    assert list(world.resumes.started) == ["job-1-0"]


def test_warning_then_state_change_acts_once_and_keeps_the_warning_reason(world: World) -> None:
    world.job()

    world.warning()
    late = world.terminated()

    assert (late.interruption_recorded, late.execution_started, late.checkpoint_requested) == (
        False,
        False,
        False,
    )
    assert len(world.signaller.requests) == 1
    assert len(world.jobs.writes) == 1
    assert [d["reason"] for d in world.resumes.started.values()] == ["spot-warning"]


def test_state_change_then_warning_acts_once_and_still_asks_for_a_checkpoint(world: World) -> None:
    # The warning can trail the state change; the instance may still be alive to save.
    world.job()

    world.terminated()
    late = world.warning()

    assert late.checkpoint_requested and not late.interruption_recorded and not late.execution_started
    assert len(world.signaller.requests) == 1
    assert len(world.jobs.writes) == 1
    assert [d["reason"] for d in world.resumes.started.values()] == ["terminated-without-notice"]


def test_a_loss_recorded_by_a_handler_that_crashed_before_starting_still_gets_its_resume(
    world: World,
) -> None:
    # Given the row says INTERRUPTED but no execution was started (the recorder died)
    job = world.job()
    world.jobs.put(
        jobs.apply(
            job,
            jobs.mark_interrupted(
                job,
                instance_id=INSTANCE,
                reason=InterruptionReason.SPOT_WARNING,
                now=NOTICED,
                deadline=NOTICED + timedelta(seconds=120),
            ),
        )
    )

    # When the retry (or any other signal about the loss) arrives
    result = world.terminated()

    # Then the workflow runs, with the recorded interruption's reason and deadline ...
    assert world.resumes.started["job-1-0"]["reason"] == "spot-warning"
    assert world.resumes.started["job-1-0"]["deadline"] == "2026-12-03T12:02:00.000Z"
    assert world.jobs.writes == []
    # ... but only the recorder counts the loss and the start (one per loss on dashboards)
    assert (result.interruption_recorded, result.execution_started) == (False, False)


# --- rebalance ---------------------------------------------------------------------------------


def test_rebalance_checkpoints_and_keeps_running(world: World) -> None:
    before = world.job()

    result = world.rebalance()

    assert result.outcome == Outcome.CHECKPOINT_REQUESTED and result.checkpoint_requested
    # The instance keeps training after this checkpoint: the request must not stop it.
    assert [r["stop"] for r in world.signaller.requests] == [False]
    assert world.row == before and world.resumes.calls == 0


def test_rebalance_with_migrate_policy_resumes_and_a_later_warning_does_not_checkpoint_again(
    world: World,
) -> None:
    world.job(on_rebalance="migrate")

    first = world.rebalance()
    second = world.warning()

    assert first.outcome == Outcome.RESUME_STARTED and first.execution_started
    assert not second.checkpoint_requested  # the migrate already asked for the final save
    assert [r["stop"] for r in world.signaller.requests] == [True]  # migrating: this is the final one
    assert [d["reason"] for d in world.resumes.started.values()] == ["rebalance-migrate"]


def test_rebalance_then_warning_checkpoints_twice_resumes_once(world: World) -> None:
    world.job()

    world.rebalance()
    world.warning()

    # A checkpoint that keeps training on the risk, then the final one that stops it.
    assert [r["stop"] for r in world.signaller.requests] == [False, True]
    assert list(world.resumes.started) == ["job-1-0"]


def test_rebalance_for_an_already_interrupted_job_changes_nothing(world: World) -> None:
    world.job()
    world.warning()

    result = world.rebalance()

    assert result.outcome == Outcome.IGNORED_STALE
    assert len(world.signaller.requests) == 1


# --- jobs the event cannot change -------------------------------------------------------------


def test_unmanaged_instance_is_ignored(world: World) -> None:
    result = world.warning()

    assert result.outcome == Outcome.IGNORED_UNMANAGED and result.job_id is None
    assert world.signaller.requests == [] and world.resumes.calls == 0


@pytest.mark.parametrize("status", [JobStatus.SUCCEEDED, JobStatus.CANCELLED, JobStatus.FAILED])
@pytest.mark.parametrize("signal", ["warning", "terminated", "rebalance"])
def test_an_ended_job_is_never_touched(world: World, status: JobStatus, signal: str) -> None:
    before = world.job(status)

    result = getattr(world, signal)()

    assert result.outcome == Outcome.IGNORED_TERMINAL
    assert world.row == before
    assert world.signaller.requests == [] and world.resumes.calls == 0


def test_a_job_that_never_launched_is_stale(world: World) -> None:
    job = world.job(JobStatus.PENDING)
    # a PENDING row naming an instance (e.g. read between writes) must not be "interrupted"
    world.jobs.put(job.model_copy(update={"instance_id": INSTANCE}))

    assert world.warning().outcome == Outcome.IGNORED_STALE
    assert world.signaller.requests == []


def test_job_replaced_between_read_and_write_is_stale(world: World) -> None:
    # Given the handler read the RUNNING row, then the first loss was recorded and the
    # workflow put a replacement on the row before this late event's write
    seen = world.job()
    interrupted = jobs.apply(
        seen,
        jobs.mark_interrupted(
            seen, instance_id=INSTANCE, reason=InterruptionReason.SPOT_WARNING, now=NOTICED
        ),
    )
    world.jobs.put(jobs.apply(interrupted, launching(interrupted, REPLACEMENT)))
    world.jobs.find_by_instance = lambda _i: seen  # type: ignore[method-assign,assignment]

    result = world.terminated()

    # Then the late event is about an old attempt: nothing about the new one changes
    assert result.outcome == Outcome.IGNORED_STALE
    assert (world.row.instance_id, world.row.attempt, world.row.status) == (
        REPLACEMENT,
        1,
        JobStatus.LAUNCHING,
    )
    assert world.resumes.calls == 0


def test_job_cancelled_between_read_and_write_is_terminal(world: World) -> None:
    world.job()

    def cancel_first(_t: Transition) -> None:
        world.jobs.before_write = lambda _t: None
        world.jobs.rows["job-1"] = jobs.apply(world.row, jobs.mark_cancelled(world.row, now=NOTICED))

    world.jobs.before_write = cancel_first

    result = world.terminated()

    assert result.outcome == Outcome.IGNORED_TERMINAL
    assert world.row.status == JobStatus.CANCELLED
    assert world.resumes.calls == 0


def test_a_concurrent_unrelated_write_is_retried_on_the_fresh_row(world: World) -> None:
    world.job()
    raced: list[int] = []

    def bump_once(_t: Transition) -> None:
        if not raced:
            # e.g. the job's cost counter moved: same status and instance, new version
            raced.append(1)
            world.jobs.rows["job-1"] = world.row.model_copy(update={"version": world.row.version + 1})

    world.jobs.before_write = bump_once

    result = world.warning()

    assert result.interruption_recorded and result.execution_started
    assert len(world.jobs.writes) == 1 and world.row.status == JobStatus.INTERRUPTED


def test_a_row_that_keeps_changing_fails_loudly_instead_of_looping(world: World) -> None:
    world.job()
    world.jobs.before_write = lambda _t: world.jobs.rows.__setitem__(
        "job-1", world.row.model_copy(update={"version": world.row.version + 1})
    )

    with pytest.raises(WriteContention) as raised:
        world.warning()
    assert (raised.value.job_id, raised.value.tries) == ("job-1", 3)
    assert world.resumes.calls == 0


def test_a_row_deleted_mid_write_raises(world: World) -> None:
    world.job()
    world.jobs.before_write = lambda _t: world.jobs.rows.clear()

    with pytest.raises(ConcurrentUpdate):
        world.warning()


# --- SSM failures -------------------------------------------------------------------------------


def test_an_unreachable_instance_is_reported_and_recovery_goes_on(world: World) -> None:
    world.job()
    world.signaller.error = InstanceUnreachable(INSTANCE, "InvalidInstanceId")

    result = world.warning()

    assert result.outcome == Outcome.RESUME_STARTED
    assert not result.checkpoint_requested and result.interruption_recorded and result.execution_started
    [(job_id, instance_id, error)] = world.signal_failures
    assert (job_id, instance_id, error) == ("job-1", INSTANCE, world.signaller.error)


def throttled() -> CheckpointRequestFailed:
    return CheckpointRequestFailed(INSTANCE, "ThrottlingException", retryable=True)


def denied() -> CheckpointRequestFailed:
    return CheckpointRequestFailed(INSTANCE, "AccessDeniedException", retryable=False)


def test_a_refused_checkpoint_request_still_records_and_resumes_and_asks_for_no_retry(
    world: World,
) -> None:
    # Given SSM refuses the command in a way that repeats on every try
    world.job()
    world.signaller.error = denied()

    result = world.warning()

    # Then the loss is recorded and the resume runs anyway; a retry could not help
    assert result.outcome == Outcome.RESUME_STARTED
    assert (result.checkpoint_requested, result.interruption_recorded, result.execution_started) == (
        False,
        True,
        True,
    )
    assert result.retry is None
    assert result.checkpoint_error is not None and "AccessDeniedException" in result.checkpoint_error
    assert world.row.status == JobStatus.INTERRUPTED
    assert world.row.interruptions[0].checkpoint_requested is False
    assert [e for *_, e in world.signal_failures] == [world.signaller.error]


def test_a_transient_checkpoint_failure_records_resumes_then_asks_for_a_retry_that_delivers_it(
    world: World,
) -> None:
    # Given SSM throttles the first request
    world.job()
    world.signaller.error = throttled()

    first = world.warning()

    # Then the loss is recorded and the resume started before anything is raised ...
    assert first.interruption_recorded and first.execution_started
    assert world.row.status == JobStatus.INTERRUPTED
    assert list(world.resumes.started) == ["job-1-0"]
    # ... and the result asks the handler to fail the invocation so that Lambda retries
    assert first.retry is world.signaller.error

    # When the retry of the same event runs (SSM has recovered)
    world.signaller.error = None
    world.now = CLOCK + timedelta(seconds=60)
    retry = world.warning()

    # Then it sends the checkpoint request, and nothing else happens twice
    assert retry.checkpoint_requested and retry.retry is None and retry.checkpoint_error is None
    assert len(world.signaller.requests) == 1
    assert len(world.jobs.writes) == 1
    assert list(world.resumes.started) == ["job-1-0"]
    assert (retry.interruption_recorded, retry.execution_started) == (False, False)


def test_a_transient_failure_once_the_notice_is_over_asks_for_no_retry(world: World) -> None:
    # The instance is reclaimed at the deadline: a retry after it cannot deliver anything.
    world.job()
    world.signaller.error = throttled()
    world.now = NOTICED + timedelta(seconds=120)

    result = world.warning()

    assert result.retry is None and result.checkpoint_error is not None
    assert result.interruption_recorded and result.execution_started


def test_another_warning_about_a_loss_whose_request_failed_asks_again(world: World) -> None:
    world.job()
    world.signaller.error = denied()
    world.warning()

    world.signaller.error = None
    replay = world.warning(event_id="evt-replayed")

    assert replay.checkpoint_requested
    assert len(world.signaller.requests) == 1 and len(world.jobs.writes) == 1


def test_a_transient_failure_on_a_rebalance_asks_for_a_retry(world: World) -> None:
    before = world.job()
    world.signaller.error = throttled()

    result = world.rebalance()

    assert result.outcome == Outcome.CHECKPOINT_REQUESTED and not result.checkpoint_requested
    assert result.retry is world.signaller.error
    assert world.row == before

    world.signaller.error = None
    assert world.rebalance().checkpoint_requested


def test_a_migration_whose_request_failed_is_completed_by_the_retry(world: World) -> None:
    # Given a migrating rebalance whose checkpoint request was throttled
    world.job(on_rebalance="migrate")
    world.signaller.error = throttled()
    first = world.rebalance()
    assert first.outcome == Outcome.RESUME_STARTED and first.retry is not None
    assert world.row.status == JobStatus.INTERRUPTED

    # When Lambda retries the same event
    world.signaller.error = None
    retry = world.rebalance()

    # Then the retry asks for the checkpoint (the job is INTERRUPTED by then, which would
    # otherwise make a rebalance a no-op) and starts nothing new
    assert retry.outcome == Outcome.RESUME_STARTED and retry.checkpoint_requested
    assert len(world.signaller.requests) == 1 and len(world.jobs.writes) == 1
    assert list(world.resumes.started) == ["job-1-0"]


def test_start_failure_propagates_after_the_record_and_the_retry_starts_it(world: World) -> None:
    world.job()
    original = world.resumes.start

    def throttled(_document: dict[str, Any]) -> bool:
        raise TimeoutError("throttled")

    world.resumes.start = throttled  # type: ignore[method-assign,assignment]
    with pytest.raises(TimeoutError):
        world.warning()
    assert world.row.status == JobStatus.INTERRUPTED

    world.resumes.start = original  # type: ignore[method-assign]
    retry = world.warning()

    assert list(world.resumes.started) == ["job-1-0"]
    assert not retry.checkpoint_requested  # the first delivery's request already went out
    assert len(world.jobs.writes) == 1


def test_result_is_plain_data_for_logs_and_responses(world: World) -> None:
    world.job()
    assert world.warning().as_dict() == {
        "outcome": "resume_started",
        "instance_id": INSTANCE,
        "job_id": "job-1",
        "attempt": 0,
        "checkpoint_requested": True,
        "interruption_recorded": True,
        "execution_started": True,
        "detail": None,
        "checkpoint_error": None,
    }
