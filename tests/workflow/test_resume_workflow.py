"""The resume workflow under every fault of issue #4, executed by moto's interpreter.

Each test drives the definition exactly as deployed (see conftest) and asserts on what
the rest of the system would see: the job row, the instances in EC2, the SNS messages and
the execution history.
"""

from __future__ import annotations

import contextlib
import json
import threading
import time
from datetime import datetime, timedelta
from typing import Any

import pytest

from tests.workflow.conftest import (
    CAPACITY_MESSAGES,
    SERVER_ERROR,
    THROTTLED,
    TOKEN_WRITE,
    Cloud,
    RowFault,
    assert_guard_hit,
    ended,
    resource_of,
    tags_of,
    utc,
)
from trainctl_core import jobs
from trainctl_core.jobs import CapacityPool, CheckpointRef, InterruptionReason, Job, JobStatus, format_time
from trainctl_core.settings import TAG_ATTEMPT, TAG_JOB_ID, TAG_MANAGED
from trainctl_core.workflow import Handshake, HandshakeError


def _assert_recovered(
    cloud: Cloud, job: Job, arn: str, *, kind: str, step: int | None, pool: CapacityPool
) -> dict[str, Any]:
    """Shared checks of a successful recovery; returns the replacement instance."""
    described = cloud.wait(arn)
    assert described["status"] == "SUCCEEDED", described.get("cause")
    row = cloud.store.raw(job.job_id)
    record = cloud.store.get(job.job_id)
    assert record.status is JobStatus.LAUNCHING
    assert record.attempt == job.attempt + 1
    assert record.version == job.version + 1
    assert record.resume_point is not None and record.resume_point.kind == kind
    assert record.resume_point.step == step
    # The token is spent: the agent of the next attempt must not answer it.
    assert "task_token" not in row and "task_token_attempt" not in row
    new = record.attempts[-1]
    assert (new.attempt, new.instance_id, new.pool) == (record.attempt, record.instance_id, pool.label)

    instance = next(i for i in cloud.instances_of(job.job_id) if i["InstanceId"] == record.instance_id)
    assert (instance["InstanceType"], instance["SubnetId"]) == (pool.instance_type, pool.subnet_id)
    assert (
        tags_of(instance).items()
        >= {TAG_MANAGED: "true", TAG_JOB_ID: job.job_id, TAG_ATTEMPT: str(record.attempt)}.items()
    )
    assert len(cloud.replacements(job.job_id, record.attempt)) == 1  # never launched twice
    # The agent's `shutdown` after a finished job must end the instance, not stop it.
    shutdown = cloud.ec2.describe_instance_attribute(
        InstanceId=instance["InstanceId"], Attribute="instanceInitiatedShutdownBehavior"
    )
    assert shutdown["InstanceInitiatedShutdownBehavior"]["Value"] == "terminate"

    (message,) = cloud.messages(job.job_id)
    assert message["subject"] == f"trainctl: {job.job_id} attempt {record.attempt} launching"
    body = message["body"]
    assert body["instance_id"] == record.instance_id
    assert body["attempt"] == record.attempt
    assert body["checkpoint"] == kind
    assert body["pool"] == pool.label
    # After a warning or a migration the old instance goes once the replacement is recorded;
    # after a loss without notice it is gone already and nothing is asked of EC2.
    assert job.instance_id is not None
    old = cloud.instance(job.instance_id)
    if body["event"] in ("spot-warning", "rebalance-migrate"):
        assert body["old_instance"] == {"action": "terminated"}
        assert ended(old)
    else:
        assert body["old_instance"] == {"action": "none"}
        assert "RetireOldInstance" not in cloud.entered_states(arn)
    return instance


# --- happy paths ------------------------------------------------------------------------


def test_handshake_answered_before_the_launch_finishes(cloud: Cloud) -> None:
    # Given a job interrupted on pool 0 while pool 1's RunInstances is slow
    pools = cloud.pools("m5.large", "m5.xlarge", "c5.large")
    job = cloud.interrupted_job(pools, periodic_step=100)
    gate = cloud.faults.hold(pools[1])
    arn = cloud.start(cloud.workflow_input(job, "spot-warning"))
    try:
        # When the agent records its final checkpoint while the launch is in flight
        cloud.wait_for_token(job)
        cloud.agent_checkpoint(job, 150, final=True)
        # The callback lands on the interpreter's thread: hold the launch until it has,
        # or a loaded machine can order the two TaskSucceeded events either way.
        deadline = time.monotonic() + 10
        while not any(
            resource_of(e) == "updateItem.waitForTaskToken" for e in cloud.task_events(arn, "TaskSucceeded")
        ):
            assert time.monotonic() < deadline, "the handshake never completed"
            time.sleep(0.02)
    finally:
        gate.set()

    # Then the replacement runs in the next pool (the reclaimed one is skipped), from step 150
    instance = _assert_recovered(cloud, job, arn, kind="final", step=150, pool=pools[1])
    assert instance.get("InstanceLifecycle") == "spot"
    succeeded = [resource_of(e) for e in cloud.task_events(arn, "TaskSucceeded")]
    assert succeeded.index("updateItem.waitForTaskToken") < succeeded.index("runInstances")


def test_handshake_answered_after_the_launch_finished(cloud: Cloud) -> None:
    pools = cloud.pools("m5.large", "m5.xlarge")
    job = cloud.interrupted_job(pools, periodic_step=100)
    arn = cloud.start(cloud.workflow_input(job, "spot-warning", handshake_timeout_seconds=30))

    # The replacement exists before the old instance is done checkpointing...
    cloud.wait_for_instance(job.job_id, job.attempt + 1)
    assert cloud.sfn.describe_execution(executionArn=arn)["status"] == "RUNNING"
    assert cloud.store.get(job.job_id).status is JobStatus.INTERRUPTED  # not recorded before the handshake
    cloud.wait_for_token(job)
    cloud.agent_checkpoint(job, 130, final=True)

    _assert_recovered(cloud, job, arn, kind="final", step=130, pool=pools[1])
    succeeded = [resource_of(e) for e in cloud.task_events(arn, "TaskSucceeded")]
    assert succeeded.index("runInstances") < succeeded.index("updateItem.waitForTaskToken")


def test_final_checkpoint_recorded_before_the_token_was_stored(cloud: Cloud) -> None:
    # Given the agent was fast: the final checkpoint is on the row before the workflow runs
    pools = cloud.pools("m5.large", "m5.xlarge")
    job = cloud.interrupted_job(pools, periodic_step=100)
    row = cloud.agent_checkpoint(job, 140, final=True)
    assert "task_token" not in row  # nobody to answer yet

    arn = cloud.start(cloud.workflow_input(job, "spot-warning"))

    # Then the token write's condition fails and the workflow reads the final checkpoint
    _assert_recovered(cloud, job, arn, kind="final", step=140, pool=pools[1])
    failed = cloud.task_events(arn, "TaskFailed")
    assert [e["taskFailedEventDetails"]["error"] for e in failed] == [
        "DynamoDb.ConditionalCheckFailedException"
    ]


def test_handshake_timeout_falls_back_to_the_newest_periodic_checkpoint(cloud: Cloud) -> None:
    pools = cloud.pools("m5.large", "m5.xlarge")
    job = cloud.interrupted_job(pools, periodic_step=100)
    arn = cloud.start(cloud.workflow_input(job, "spot-warning", handshake_timeout_seconds=1))

    _assert_recovered(cloud, job, arn, kind="fallback", step=100, pool=pools[1])
    assert any(e["type"] == "TaskTimedOut" for e in cloud.history(arn))


def test_terminated_without_notice_does_not_wait_and_resumes_from_periodic(cloud: Cloud) -> None:
    pools = cloud.pools("m5.large", "m5.xlarge")
    job = cloud.interrupted_job(pools, periodic_step=90, reason=InterruptionReason.TERMINATED_WITHOUT_NOTICE)
    arn = cloud.start(cloud.workflow_input(job, "terminated-without-notice", deadline=None))

    _assert_recovered(cloud, job, arn, kind="fallback", step=90, pool=pools[1])
    assert "AwaitFinalCheckpoint" not in cloud.entered_states(arn)


def test_launch_starts_a_new_job_through_the_same_path(cloud: Cloud) -> None:
    pools = cloud.pools("g5.xlarge", "g5.2xlarge")
    job = cloud.new_job(pools)
    arn = cloud.start(cloud.workflow_input(job, "launch"))

    described = cloud.wait(arn)
    assert described["status"] == "SUCCEEDED", described.get("cause")
    record = cloud.store.get(job.job_id)
    assert (record.status, record.attempt, record.version) == (JobStatus.LAUNCHING, 0, 1)
    assert record.resume_point is not None and record.resume_point.kind == "none"
    (instance,) = cloud.instances_of(job.job_id)
    assert instance["InstanceId"] == record.instance_id
    assert (instance["InstanceType"], tags_of(instance)[TAG_ATTEMPT]) == ("g5.xlarge", "0")
    assert [a.pool for a in record.attempts] == [pools[0].label]
    assert "AwaitFinalCheckpoint" not in cloud.entered_states(arn)
    (message,) = cloud.messages(job.job_id)
    assert message["body"]["event"] == "launch"


# --- capacity ---------------------------------------------------------------------------


def test_first_two_pools_out_of_capacity_launches_in_the_third(cloud: Cloud) -> None:
    # Given pools A..D, running on D (reclaimed), with A and B out of Spot capacity
    pools = cloud.pools("m5.large", "m5.xlarge", "c5.large", "c5.xlarge")
    job = cloud.running_job(pools, pool_index=3)
    job = cloud.store.apply(
        jobs.mark_interrupted(
            job, instance_id=job.instance_id or "", reason=InterruptionReason.SPOT_WARNING, now=jobs.utcnow()
        )
    )
    cloud.faults.forget()
    cloud.faults.out_of_capacity(pools[0], code="InsufficientInstanceCapacity")
    cloud.faults.out_of_capacity(pools[1], code="SpotMaxPriceTooLow")
    arn = cloud.start(cloud.workflow_input(job, "spot-warning", handshake_timeout_seconds=1))

    _assert_recovered(cloud, job, arn, kind="none", step=None, pool=pools[2])
    assert cloud.faults.calls == [(p.instance_type, p.subnet_id, "spot") for p in pools[:3]]
    output = json.loads(cloud.wait(arn)["output"])
    assert output["pools_tried"].count("no capacity") == 2 and pools[2].label in output["pools_tried"]


CAPACITY_CASES = [
    (code, variant) for code, messages in CAPACITY_MESSAGES.items() for variant in range(len(messages))
]


@pytest.mark.parametrize(("code", "variant"), CAPACITY_CASES, ids=[f"{c}-{v}" for c, v in CAPACITY_CASES])
def test_every_capacity_message_moves_to_the_next_pool(cloud: Cloud, code: str, variant: int) -> None:
    # Given pool 1 refusing with one of EC2's real capacity messages (AWS names every EC2
    # error Ec2.Ec2Exception, so the message is all the workflow has to go by)
    pools = cloud.pools("m5.large", "m5.xlarge", "c5.large")
    job = cloud.interrupted_job(pools, reason=InterruptionReason.TERMINATED_WITHOUT_NOTICE)
    cloud.faults.out_of_capacity(pools[1], code=code, variant=variant)
    cloud.faults.forget()
    arn = cloud.start(cloud.workflow_input(job, "terminated-without-notice", deadline=None))

    # Then the next pool is tried at once, without retrying the refusing one
    _assert_recovered(cloud, job, arn, kind="none", step=None, pool=pools[2])
    assert cloud.faults.calls == [(p.instance_type, p.subnet_id, "spot") for p in pools[1:]]
    assert "RetryLaunchBackoff" not in cloud.entered_states(arn)


def test_all_spot_pools_out_uses_on_demand_when_allowed(cloud: Cloud) -> None:
    pools = cloud.pools("m5.large", "m5.xlarge", "c5.large")
    job = cloud.interrupted_job(
        pools, allow_on_demand=True, reason=InterruptionReason.TERMINATED_WITHOUT_NOTICE
    )
    for pool in pools:
        cloud.faults.out_of_capacity(pool, market="spot")
    cloud.faults.forget()
    arn = cloud.start(cloud.workflow_input(job, "terminated-without-notice", deadline=None))

    instance = _assert_recovered(cloud, job, arn, kind="none", step=None, pool=pools[0])
    assert "InstanceLifecycle" not in instance  # on-demand
    # Spot in order with the reclaimed pool last, then on-demand from the top.
    order = [pools[1], pools[2], pools[0]]
    assert cloud.faults.calls == [(p.instance_type, p.subnet_id, "spot") for p in order] + [
        (pools[0].instance_type, pools[0].subnet_id, "on-demand")
    ]
    # Spot and on-demand calls alike ask for termination on an OS shutdown (the agent shuts
    # the machine down when the job is done; EC2's default would only stop it).
    assert [r["shutdown_behavior"] for r in cloud.faults.requests] == ["terminate"] * 4


def test_all_spot_pools_out_fails_the_job_when_on_demand_is_not_allowed(cloud: Cloud) -> None:
    pools = cloud.pools("m5.large", "m5.xlarge")
    job = cloud.interrupted_job(pools, periodic_step=10)
    for pool in pools:
        cloud.faults.out_of_capacity(pool)
    cloud.faults.forget()
    arn = cloud.start(cloud.workflow_input(job, "spot-warning", handshake_timeout_seconds=30))

    described = cloud.wait(arn)
    assert (described["status"], described["error"]) == ("FAILED", "trainctl.JobFailed")
    record = cloud.store.get(job.job_id)
    assert record.status is JobStatus.FAILED
    assert record.failure_reason and "trainctl.CapacityExhausted" in record.failure_reason
    # Bounded: two rounds (test tuning) over both pools, with a backoff between them.
    assert len(cloud.faults.calls) == 2 * len(pools)
    assert cloud.entered_states(arn).count("Backoff") == 1
    assert cloud.replacements(job.job_id, job.attempt + 1) == []
    # The old instance goes with the job; the alert names the reason.
    (old,) = [i for i in cloud.instances_of(job.job_id) if i["InstanceId"] == job.instance_id]
    assert old["State"]["Name"] in ("shutting-down", "terminated")
    (message,) = cloud.messages(job.job_id)
    assert message["body"]["event"] == "job-failed"
    assert "CapacityExhausted" in message["body"]["failure_reason"]


def test_a_non_capacity_launch_error_fails_clearly(cloud: Cloud) -> None:
    pools = cloud.pools("m5.large", "m5.xlarge", "c5.large")
    job = cloud.interrupted_job(pools, periodic_step=10)
    cloud.faults.fail(
        pools[1], "spot", "InvalidParameterValue", "Value (ami-0) for parameter image is invalid."
    )
    cloud.faults.forget()
    started = time.monotonic()
    arn = cloud.start(cloud.workflow_input(job, "spot-warning", handshake_timeout_seconds=60))

    described = cloud.wait(arn)
    # The waiting handshake branch is abandoned, not waited for.
    assert time.monotonic() - started < 30
    assert described["status"] == "FAILED"
    record = cloud.store.get(job.job_id)
    assert record.status is JobStatus.FAILED
    assert record.failure_reason and "trainctl.LaunchFailed" in record.failure_reason
    assert "is invalid" in record.failure_reason
    assert len(cloud.faults.calls) == 1  # no other pool tried
    assert [m["body"]["event"] for m in cloud.messages(job.job_id)] == ["job-failed"]


# --- guards -----------------------------------------------------------------------------


def test_max_interruptions_reached_fails_the_job_without_launching(cloud: Cloud) -> None:
    pools = cloud.pools("m5.large", "m5.xlarge")
    job = cloud.interrupted_job(pools, limits=jobs.JobLimits(max_interruptions=0))
    cloud.faults.forget()
    arn = cloud.start(cloud.workflow_input(job, "spot-warning"))

    described = cloud.wait(arn)
    assert (described["status"], described["error"]) == ("FAILED", "trainctl.JobFailed")
    assert "max interruptions reached: 1 of 0" in described["cause"]
    record = cloud.store.get(job.job_id)
    assert (record.status, record.version) == (JobStatus.FAILED, job.version + 1)
    assert record.failure_reason == "max interruptions reached: 1 of 0"
    assert cloud.faults.calls == []
    assert "Recover" not in cloud.entered_states(arn)
    (message,) = cloud.messages(job.job_id)
    assert message["body"]["failure_reason"] == record.failure_reason


def test_wall_clock_limit_reached_fails_the_job(cloud: Cloud) -> None:
    pools = cloud.pools("m5.large")
    job = cloud.new_job(pools, limits=jobs.JobLimits(max_hours=0.0001))  # 0.36 s
    time.sleep(0.5)
    cloud.faults.forget()
    arn = cloud.start(cloud.workflow_input(job, "launch"))

    deadline = cloud.store.raw(job.job_id)["deadline_at"]
    assert_guard_hit(cloud, job, arn, f"max wall-clock reached: deadline {deadline} passed")
    assert cloud.instances_of(job.job_id) == [] and cloud.faults.calls == []


def test_budget_reached_fails_the_job_and_ends_the_old_instance(cloud: Cloud) -> None:
    pools = cloud.pools("m5.large", "m5.xlarge")
    job = cloud.interrupted_job(pools, limits=jobs.JobLimits(budget_usd=5.0))
    cloud.ddb.update_item(
        TableName=cloud.table,
        Key={"pk": {"S": f"JOB#{job.job_id}"}},
        UpdateExpression="SET cost_usd = :c",
        ExpressionAttributeValues={":c": {"N": "5.5"}},
    )
    cloud.faults.forget()
    arn = cloud.start(cloud.workflow_input(job, "spot-warning"))

    assert_guard_hit(cloud, job, arn, "budget reached: cost 5.5 USD of 5.0 USD")
    assert cloud.faults.calls == []
    assert cloud.replacements(job.job_id, job.attempt + 1) == []
    # The warned instance would otherwise run on (or come back from a stop) at our cost.
    assert job.instance_id is not None and ended(cloud.instance(job.instance_id))


# --- concurrency and bad requests --------------------------------------------------------


def test_job_cancelled_mid_flight_terminates_the_new_instance(cloud: Cloud) -> None:
    pools = cloud.pools("m5.large", "m5.xlarge")
    job = cloud.interrupted_job(pools, reason=InterruptionReason.TERMINATED_WITHOUT_NOTICE)
    gate = cloud.faults.hold(pools[1])
    arn = cloud.start(cloud.workflow_input(job, "terminated-without-notice", deadline=None))
    try:
        # While the replacement is being launched, the user cancels the job.
        deadline = time.monotonic() + 10
        while (pools[1].instance_type, pools[1].subnet_id, "spot") not in cloud.faults.calls:
            assert time.monotonic() < deadline
            time.sleep(0.02)
        cloud.store.apply(jobs.mark_cancelled(cloud.store.get(job.job_id), now=jobs.utcnow()))
    finally:
        gate.set()

    described = cloud.wait(arn)
    assert described["status"] == "SUCCEEDED"
    assert "JobCancelled" in cloud.entered_states(arn)
    record = cloud.store.get(job.job_id)
    assert (record.status, record.instance_id, record.attempt) == (
        JobStatus.CANCELLED,
        job.instance_id,
        job.attempt,
    )
    (replacement,) = cloud.replacements(job.job_id, job.attempt + 1)
    assert replacement["State"]["Name"] in ("shutting-down", "terminated")
    assert cloud.messages(job.job_id) == []


def test_job_cancelled_while_the_handshake_waits_terminates_the_launched_replacement(cloud: Cloud) -> None:
    # Given a Spot warning whose replacement is up while the old agent has not answered yet
    pools = cloud.pools("m5.large", "m5.xlarge")
    job = cloud.interrupted_job(pools, periodic_step=40)
    arn = cloud.start(cloud.workflow_input(job, "spot-warning", handshake_timeout_seconds=3))
    replacement = cloud.wait_for_instance(job.job_id, job.attempt + 1)
    cloud.wait_for_token(job)
    assert cloud.sfn.describe_execution(executionArn=arn)["status"] == "RUNNING"

    # When the user cancels the job (the row goes CANCELLED)
    cloud.store.apply(jobs.mark_cancelled(cloud.store.get(job.job_id), now=jobs.utcnow()))

    # Then the workflow ends quietly, and the replacement it launched is not left running
    described = cloud.wait(arn)
    assert described["status"] == "SUCCEEDED"
    assert "JobCancelled" in cloud.entered_states(arn)
    record = cloud.store.get(job.job_id)
    assert (record.status, record.instance_id, record.attempt, record.version) == (
        JobStatus.CANCELLED,
        job.instance_id,
        job.attempt,
        job.version + 1,
    )
    assert ended(cloud.instance(replacement["InstanceId"]))
    assert len(cloud.replacements(job.job_id, job.attempt + 1)) == 1
    assert cloud.messages(job.job_id) == []


MALFORMED: list[tuple[str, dict[str, Any]]] = [
    ("job_id", {"job_id": None}),
    ("job_id", {"job_id": 42}),
    ("reason", {"reason": "power-outage"}),
    ("reason", {"reason": None}),
    ("attempt", {"attempt": "1"}),
    ("attempt", {"attempt": -1}),
    ("attempt", {"attempt": 1.5}),
    ("attempt", {"attempt": 10**9}),
    ("instance_id", {"instance_id": None}),
    ("deadline", {"deadline": "tomorrow"}),
    ("handshake_timeout_seconds", {"handshake_timeout_seconds": "soon"}),
    ("handshake_timeout_seconds", {"handshake_timeout_seconds": 2.5}),
    ("handshake_timeout_seconds", {"handshake_timeout_seconds": -1}),
    ("handshake_timeout_seconds", {"handshake_timeout_seconds": 86400}),
]


@pytest.mark.parametrize(("field", "change"), MALFORMED, ids=[f"{f}={v}" for f, v in MALFORMED])
def test_malformed_input_fails_at_once_touching_nothing(
    cloud: Cloud, field: str, change: dict[str, Any]
) -> None:
    pools = cloud.pools("m5.large", "m5.xlarge")
    job = cloud.interrupted_job(pools)
    payload = cloud.workflow_input(job, "spot-warning") | change
    arn = cloud.start(payload, name=f"{job.job_id}-bad")

    described = cloud.wait(arn)
    assert (described["status"], described["error"]) == ("FAILED", "trainctl.InvalidInput")
    assert field in described["cause"]
    assert not any(e["type"] == "TaskScheduled" for e in cloud.history(arn))
    assert cloud.store.get(job.job_id).version == job.version


@pytest.mark.parametrize(
    "payload",
    [
        {"job_id": "x", "instance_id": "i-1", "attempt": 0, "reason": "launch", "deadline": None},
        {"job_id": "x", "instance_id": None, "attempt": 2, "reason": "launch", "deadline": None},
        {"instance_id": "i-1", "attempt": 0, "reason": "spot-warning", "deadline": None},
    ],
    ids=["launch-with-instance", "launch-not-attempt-0", "missing-job-id"],
)
def test_inconsistent_launch_input_is_rejected(cloud: Cloud, payload: dict[str, Any]) -> None:
    arn = cloud.start(payload, name=f"bad-{time.monotonic_ns()}")
    described = cloud.wait(arn)
    assert (described["status"], described["error"]) == ("FAILED", "trainctl.InvalidInput")


@pytest.mark.parametrize(
    "change",
    [
        {"instance_id": "i-0123456789abcdef0"},
        {"attempt": 1},
        {"reason": "launch", "attempt": 0, "instance_id": None},
    ],
    ids=["other-instance", "other-attempt", "launch-of-a-started-job"],
)
def test_stale_request_leaves_the_job_alone(cloud: Cloud, change: dict[str, Any]) -> None:
    # Given a job INTERRUPTED on attempt 0 and a request that describes something else
    pools = cloud.pools("m5.large", "m5.xlarge")
    job = cloud.interrupted_job(pools)
    cloud.faults.forget()
    arn = cloud.start(cloud.workflow_input(job, "spot-warning") | change, name=f"{job.job_id}-stale")

    # Then the execution says so and reads the row, nothing else
    described = cloud.wait(arn)
    assert (described["status"], described["error"]) == ("FAILED", "trainctl.StaleRequest")
    assert [resource_of(e) for e in cloud.task_events(arn, "TaskScheduled")] == ["getItem"]
    assert cloud.store.get(job.job_id).version == job.version
    assert cloud.faults.calls == [] and cloud.replacements(job.job_id, job.attempt + 1) == []
    assert cloud.messages(job.job_id) == []


def test_duplicate_start_of_the_same_execution_launches_once(cloud: Cloud) -> None:
    pools = cloud.pools("m5.large", "m5.xlarge")
    job = cloud.interrupted_job(pools, reason=InterruptionReason.TERMINATED_WITHOUT_NOTICE)
    gate = cloud.faults.hold(pools[1])
    payload = cloud.workflow_input(job, "terminated-without-notice", deadline=None)
    try:
        first = cloud.start(payload)
        # The same start again (a duplicate event delivery) is the same execution...
        assert cloud.start(payload) == first
        # ...and a different request under the same name is refused.
        with pytest.raises(cloud.sfn.exceptions.ExecutionAlreadyExists):
            cloud.start(payload | {"deadline": "2030-01-01T00:00:00Z"})
    finally:
        gate.set()

    _assert_recovered(cloud, job, first, kind="none", step=None, pool=pools[1])
    executions = cloud.sfn.list_executions(stateMachineArn=cloud.state_machine_arn)["executions"]
    assert [e["name"] for e in executions].count(jobs.execution_name(job.job_id, job.attempt)) == 1


# --- handshake edge cases ------------------------------------------------------------------


def test_agent_reporting_a_failed_checkpoint_falls_back_at_once(cloud: Cloud) -> None:
    # Given the old instance's agent could not write its final checkpoint and says so
    pools = cloud.pools("m5.large", "m5.xlarge")
    job = cloud.interrupted_job(pools, periodic_step=80)
    started = time.monotonic()
    arn = cloud.start(cloud.workflow_input(job, "spot-warning", handshake_timeout_seconds=60))
    row = cloud.wait_for_token(job)

    cloud.sfn.send_task_failure(
        taskToken=row["task_token"], error="trainctl.CheckpointFailed", cause="disk full"
    )

    # Then the workflow does not sit out the deadline: it resumes from the periodic one
    _assert_recovered(cloud, job, arn, kind="fallback", step=80, pool=pools[1])
    assert time.monotonic() - started < 30
    assert not any(e["type"] == "TaskTimedOut" for e in cloud.history(arn))


def test_a_final_checkpoint_landing_after_the_fallback_is_fenced_off(cloud: Cloud) -> None:
    # Given the handshake timed out and the replacement was recorded from step 100
    from trainctl_core.store import Superseded

    pools = cloud.pools("m5.large", "m5.xlarge")
    job = cloud.interrupted_job(pools, periodic_step=100)
    arn = cloud.start(cloud.workflow_input(job, "spot-warning", handshake_timeout_seconds=1))
    _assert_recovered(cloud, job, arn, kind="fallback", step=100, pool=pools[1])
    recorded = cloud.store.get(job.job_id)

    # When the old agent's final checkpoint lands late
    with pytest.raises(Superseded):
        cloud.agent_checkpoint(job, 150, final=True)

    # Then the new attempt's resume point and checkpoints are untouched
    after = cloud.store.get(job.job_id)
    assert after.resume_point == recorded.resume_point
    assert (after.final_checkpoint, after.last_checkpoint) == (
        recorded.final_checkpoint,
        recorded.last_checkpoint,
    )
    assert after.version == recorded.version


def test_rebalance_migrate_awaits_the_final_checkpoint_like_a_warning(cloud: Cloud) -> None:
    pools = cloud.pools("m5.large", "m5.xlarge")
    job = cloud.interrupted_job(pools, periodic_step=100, reason=InterruptionReason.REBALANCE_MIGRATE)
    arn = cloud.start(cloud.workflow_input(job, "rebalance-migrate", handshake_timeout_seconds=30))
    cloud.wait_for_token(job)
    cloud.agent_checkpoint(job, 120, final=True)

    _assert_recovered(cloud, job, arn, kind="final", step=120, pool=pools[1])
    (message,) = cloud.messages(job.job_id)
    body = message["body"]
    assert body["event"] == "rebalance-migrate"
    assert body["interrupted_instance_id"] == job.instance_id
    # The message carries what "seconds from notice to launch" is computed from.
    noticed = datetime.fromisoformat(body["noticed_at"].replace("Z", "+00:00"))
    launched = datetime.fromisoformat(body["launched_at"].replace("Z", "+00:00"))
    assert timedelta(0) <= launched - noticed < timedelta(minutes=1)


def test_a_final_checkpoint_of_an_earlier_attempt_does_not_satisfy_the_handshake(cloud: Cloud) -> None:
    # Given attempt 1 runs after a recovery whose final checkpoint (attempt 0) is on the row
    pools = cloud.pools("m5.large", "m5.xlarge", "c5.large")
    job = cloud.interrupted_job(pools, periodic_step=100)
    first = cloud.start(cloud.workflow_input(job, "spot-warning", handshake_timeout_seconds=30))
    cloud.wait_for_token(job)
    cloud.agent_checkpoint(job, 150, final=True)
    cloud.wait(first)
    second = cloud.store.get(job.job_id)
    assert second.attempt == 1 and second.final_checkpoint is not None
    second = cloud.store.apply(
        jobs.mark_running(second, instance_id=second.instance_id or "", now=jobs.utcnow())
    )
    second = cloud.store.apply(
        jobs.mark_interrupted(
            second,
            instance_id=second.instance_id or "",
            reason=InterruptionReason.SPOT_WARNING,
            now=jobs.utcnow(),
            deadline=jobs.utcnow() + timedelta(minutes=2),
        )
    )

    # When attempt 1 is interrupted, the workflow must wait for *its* final checkpoint
    arn = cloud.start(cloud.workflow_input(second, "spot-warning", handshake_timeout_seconds=30))
    cloud.wait_for_token(second)
    cloud.agent_checkpoint(second, 210, final=True)

    # (two recoveries of one job: checked here rather than by _assert_recovered's one-message rule)
    assert cloud.wait(arn)["status"] == "SUCCEEDED"
    record = cloud.store.get(job.job_id)
    assert (record.status, record.attempt) == (JobStatus.LAUNCHING, 2)
    assert record.resume_point is not None
    assert (record.resume_point.kind, record.resume_point.step) == ("final", 210)
    assert [a.pool for a in record.attempts] == [pools[0].label, pools[1].label, pools[0].label]
    assert [m["body"]["checkpoint"] for m in cloud.messages(job.job_id)] == ["final", "final"]


def test_launch_is_the_third_step_after_the_guard_when_the_first_pool_is_reclaimed(cloud: Cloud) -> None:
    # Given the usual case: attempt 0 ran in the first pool, which is being reclaimed
    pools = cloud.pools("m5.large", "m5.xlarge", "c5.large")
    job = cloud.interrupted_job(pools)
    arn = cloud.start(cloud.workflow_input(job, "spot-warning", handshake_timeout_seconds=1))

    # Then the replacement comes from the second pool, with no detour through the first
    _assert_recovered(cloud, job, arn, kind="none", step=None, pool=pools[1])
    entered = cloud.entered_states(arn)
    # (the handshake branch's states interleave with the launch branch's: leave them out)
    launch_branch = {
        "Recover",
        "ConsiderPool",
        "LaunchSpot",
        "NextPool",
        "MorePools",
        "PickPool",
        "FirstPool",
    }
    after_guard = [s for s in entered[entered.index("Guard") + 1 :] if s in launch_branch]
    assert after_guard[:3] == ["Recover", "ConsiderPool", "LaunchSpot"]


def test_the_reclaimed_pool_is_tried_last_for_spot(cloud: Cloud) -> None:
    # Given a job reclaimed in pool 0 while every other pool is out of Spot capacity
    pools = cloud.pools("m5.large", "m5.xlarge", "c5.large")
    job = cloud.interrupted_job(pools)
    cloud.faults.forget()
    cloud.faults.out_of_capacity(pools[1], code="InsufficientInstanceCapacity")
    cloud.faults.out_of_capacity(pools[2], code="InsufficientInstanceCapacity")
    arn = cloud.start(cloud.workflow_input(job, "spot-warning", handshake_timeout_seconds=1))

    # Then it tries 1, 2 and only then the reclaimed pool 0, where it launches
    _assert_recovered(cloud, job, arn, kind="none", step=None, pool=pools[0])
    assert cloud.faults.calls == [
        (p.instance_type, p.subnet_id, "spot") for p in (pools[1], pools[2], pools[0])
    ]


def test_a_one_pool_job_relaunches_in_its_reclaimed_pool(cloud: Cloud) -> None:
    pools = cloud.pools("m5.large")
    job = cloud.interrupted_job(pools)
    arn = cloud.start(cloud.workflow_input(job, "spot-warning", handshake_timeout_seconds=1))
    _assert_recovered(cloud, job, arn, kind="none", step=None, pool=pools[0])


# --- the token write is retried, and a late start does not wait ---------------------------------


def test_a_throttled_token_write_is_retried_and_the_final_checkpoint_counts(cloud: Cloud) -> None:
    # Given DynamoDB throttles the workflow's first attempt to store its task token
    pools = cloud.pools("m5.large", "m5.xlarge")
    job = cloud.interrupted_job(pools, periodic_step=100)
    cloud.table_faults.script(job.job_id, TOKEN_WRITE, RowFault(THROTTLED))
    arn = cloud.start(cloud.workflow_input(job, "spot-warning", handshake_timeout_seconds=30))

    # When the agent records its final checkpoint and answers the stored token
    cloud.wait_for_token(job)
    cloud.agent_checkpoint(job, 150, final=True)

    # Then the job resumes from the final checkpoint, not the older periodic one
    _assert_recovered(cloud, job, arn, kind="final", step=150, pool=pools[1])
    failed = [e["taskFailedEventDetails"]["error"] for e in cloud.task_events(arn, "TaskFailed")]
    assert failed == ["DynamoDb.ProvisionedThroughputExceededException"]


def test_a_token_write_that_landed_before_its_error_cannot_lose_the_final_checkpoint(cloud: Cloud) -> None:
    # Given the token write lands but DynamoDB answers with a server error, and the agent
    # records its final checkpoint and answers that first token before the write is retried
    pools = cloud.pools("m5.large", "m5.xlarge")
    job = cloud.interrupted_job(pools, periodic_step=100)
    assert job.instance_id is not None
    fault = RowFault(SERVER_ERROR, land=True, release=threading.Event())
    cloud.table_faults.script(job.job_id, TOKEN_WRITE, fault)
    arn = cloud.start(cloud.workflow_input(job, "spot-warning", handshake_timeout_seconds=30))
    assert fault.landed.wait(timeout=10)
    ref = CheckpointRef(
        step=150, prefix=f"{job.job_id}/ckpt/150/", attempt=job.attempt, created_at=jobs.utcnow()
    )
    row = cloud.store.record_checkpoint(
        job.job_id, instance_id=job.instance_id, attempt=job.attempt, checkpoint=ref, final=True
    )
    # (the agent's answer to a spent token may be refused; the row is what counts)
    with contextlib.suppress(HandshakeError):
        Handshake(cloud.sfn).complete(row["task_token"], {"checkpoint": {"step": 150}})
    fault.release.set()

    # Then the retried write finds the checkpoint there (its condition fails) and uses it,
    # rather than storing a second token nobody will answer and falling back
    _assert_recovered(cloud, job, arn, kind="final", step=150, pool=pools[1])
    failed = [e["taskFailedEventDetails"]["error"] for e in cloud.task_events(arn, "TaskFailed")]
    assert failed == ["DynamoDb.InternalServerErrorException", "DynamoDb.ConditionalCheckFailedException"]
    assert not any(e["type"] == "TaskTimedOut" for e in cloud.history(arn))


@pytest.mark.parametrize("landed", [False, True], ids=["nothing-landed", "final-landed-in-time"])
def test_a_start_after_the_deadline_does_not_wait_for_the_handshake(cloud: Cloud, landed: bool) -> None:
    # Given a warning whose deadline has passed by the time the workflow starts (a late or
    # retried start), with the input still asking for a long handshake
    pools = cloud.pools("m5.large", "m5.xlarge")
    job = cloud.interrupted_job(pools, periodic_step=100)
    if landed:
        cloud.agent_checkpoint(job, 140, final=True)
    payload = cloud.workflow_input(
        job, "spot-warning", deadline=format_time(utc(-5)), handshake_timeout_seconds=1800
    )
    arn = cloud.start(payload)

    # Then it reads what is durable at once: nobody is left to answer a token
    if landed:
        _assert_recovered(cloud, job, arn, kind="final", step=140, pool=pools[1])
    else:
        _assert_recovered(cloud, job, arn, kind="fallback", step=100, pool=pools[1])
    assert "AwaitFinalCheckpoint" not in cloud.entered_states(arn)
