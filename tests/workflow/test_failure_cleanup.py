"""What the resume workflow does when something fails *after* it may have launched.

A replacement that is launched but never recorded on the job row belongs to nobody: no
agent will train on it and nothing else will ever terminate it. These tests break the
recovery at each point after RunInstances (moto's backends refuse the call) and check
what an operator would see: no instance left running, the job FAILED with the real
reason, one alert. They also cover the launch calls themselves: transient EC2 errors are
retried with the same ClientToken, and each backoff round uses a fresh one.
"""

from __future__ import annotations

import hashlib
import json
import time
from collections.abc import Iterator
from datetime import datetime, timedelta
from typing import Any

import pytest
from moto.dynamodb.exceptions import DynamodbException, ItemSizeTooLarge
from moto.stepfunctions.parser.asl.component.state.exec.execute_state import ExecutionState

from tests.workflow.conftest import (
    FAILED_WRITE,
    REPLACEMENT_WRITE,
    SERVER_ERROR,
    TEST_TUNING,
    TRANSIENT_MESSAGES,
    Cloud,
    RowFault,
    assert_guard_hit,
    ended,
    resource_of,
)
from trainctl_core import jobs
from trainctl_core.jobs import InterruptionReason, Job, JobStatus
from trainctl_core.store import format_time

KMS_DENIED = (
    "com.amazonaws.dynamodb.v20120810#KMSAccessDeniedException",
    "KMS key access denied error: the key is disabled",
)


def _client_token(
    job_id: str, attempt: int, pool_label: str, market: str, round_n: int, execution: str
) -> str:
    """The ClientToken the workflow derives (SHA-1 of job/attempt/pool/market/round/execution ARN)."""
    digest = hashlib.sha1(
        f"{job_id}/{attempt}/{pool_label}/{market}/{round_n}/{execution}".encode()
    ).hexdigest()
    return f"trainctl-{digest}"


def _assert_failed_cleanly(
    cloud: Cloud, job: Job, arn: str, *, reason_starts: str, replacement_id: str
) -> dict[str, Any]:
    """The job FAILED with a reason starting `reason_starts`, the replacement it launched is
    ending, the row names the old attempt, and one alert went out. Returns the alert body."""
    described = cloud.wait(arn)
    assert (described["status"], described["error"]) == ("FAILED", "trainctl.JobFailed")
    assert described["cause"].startswith(reason_starts), described["cause"]
    record = cloud.store.get(job.job_id)
    assert (record.status, record.failure_reason) == (JobStatus.FAILED, described["cause"])
    assert (record.instance_id, record.attempt, record.version) == (
        job.instance_id,
        job.attempt,
        job.version + 1,
    )
    assert "task_token" not in cloud.store.raw(job.job_id)
    (replacement,) = cloud.replacements(job.job_id, job.attempt + 1)
    assert replacement["InstanceId"] == replacement_id and ended(replacement)
    (message,) = cloud.messages(job.job_id)
    body: dict[str, Any] = message["body"]
    assert (body["event"], body["failure_reason"]) == ("job-failed", described["cause"])
    return body


# --- a replacement is never left behind -------------------------------------------------------


def test_checkpoints_unreadable_after_the_launch_terminates_the_replacement(cloud: Cloud) -> None:
    # Given a loss without notice, and a job row whose checkpoints cannot be read
    pools = cloud.pools("m5.large", "m5.xlarge")
    job = cloud.interrupted_job(pools, periodic_step=50, reason=InterruptionReason.TERMINATED_WITHOUT_NOTICE)
    cloud.table_faults.checkpoint_reads[job.job_id] = DynamodbException(*KMS_DENIED)
    arn = cloud.start(cloud.workflow_input(job, "terminated-without-notice", deadline=None))

    # Then the launch still happened (the branches run side by side)...
    described = cloud.wait(arn)
    assert [resource_of(e) for e in cloud.task_events(arn, "TaskSucceeded")].count("runInstances") == 1
    (replacement,) = cloud.replacements(job.job_id, job.attempt + 1)

    # ...and the replacement nobody will use is terminated, the job FAILED, the operator told
    body = _assert_failed_cleanly(
        cloud,
        job,
        arn,
        reason_starts="could not read the checkpoints on the job row: ",
        replacement_id=replacement["InstanceId"],
    )
    assert KMS_DENIED[1] in described["cause"]
    assert body["replacement_instance_id"] == replacement["InstanceId"]
    assert body["replacement"] == {"terminated": True}


def test_a_failed_record_of_the_replacement_terminates_it(cloud: Cloud) -> None:
    # Given a Spot warning whose final checkpoint already landed, and a job row that refuses
    # the replacement's record with something other than a changed version
    pools = cloud.pools("m5.large", "m5.xlarge")
    job = cloud.interrupted_job(pools, periodic_step=50)
    cloud.agent_checkpoint(job, 70, final=True)
    cloud.table_faults.replacement_writes[job.job_id] = ItemSizeTooLarge()
    arn = cloud.start(cloud.workflow_input(job, "spot-warning"))

    replacement = cloud.wait_for_instance(job.job_id, job.attempt + 1)
    body = _assert_failed_cleanly(
        cloud,
        job,
        arn,
        reason_starts="could not record the replacement on the job row: ",
        replacement_id=replacement["InstanceId"],
    )
    assert ItemSizeTooLarge.item_size_too_large_msg in body["failure_reason"]
    assert body["replacement"] == {"terminated": True}
    # The warned instance goes with the job, as on every FAILED path.
    assert job.instance_id is not None and ended(cloud.instance(job.instance_id))
    assert "JobCancelled" not in cloud.entered_states(arn)


def test_retries_exhausted_after_a_lost_response_terminate_the_stray_replacement(cloud: Cloud) -> None:
    # Given a RunInstances that created the instance but whose response was lost (EC2's
    # InternalError), then throttling on every retry: the launch branch gives up
    pools = cloud.pools("m5.large", "m5.xlarge")
    job = cloud.interrupted_job(pools, reason=InterruptionReason.TERMINATED_WITHOUT_NOTICE)
    cloud.faults.script(
        pools[1],
        "spot",
        ("launch-then-raise", "InternalError", TRANSIENT_MESSAGES["InternalError"]),
        ("raise", "RequestLimitExceeded", TRANSIENT_MESSAGES["RequestLimitExceeded"]),
        ("raise", "RequestLimitExceeded", TRANSIENT_MESSAGES["RequestLimitExceeded"]),
    )
    cloud.faults.forget()
    arn = cloud.start(cloud.workflow_input(job, "terminated-without-notice", deadline=None))

    described = cloud.wait(arn)
    (stray,) = cloud.replacements(job.job_id, job.attempt + 1)
    body = _assert_failed_cleanly(
        cloud,
        job,
        arn,
        reason_starts="launch failed: trainctl.LaunchFailed: ",
        replacement_id=stray["InstanceId"],
    )
    assert TRANSIENT_MESSAGES["RequestLimitExceeded"] in described["cause"]
    # Bounded (the test tuning allows 2 retries), all with the same token, no other pool.
    assert cloud.faults.calls == [(pools[1].instance_type, pools[1].subnet_id, "spot")] * 3
    assert len({r["client_token"] for r in cloud.faults.requests}) == 1
    # The sweep found it by its tags and says so.
    assert body["stray_replacements"] == {"terminated": [stray["InstanceId"]]}


def test_a_row_changed_by_another_writer_abandons_the_recovery_with_an_alert(cloud: Cloud) -> None:
    # Given a replacement launched while the handshake waits
    pools = cloud.pools("m5.large", "m5.xlarge")
    job = cloud.interrupted_job(pools, periodic_step=20)
    arn = cloud.start(cloud.workflow_input(job, "spot-warning", handshake_timeout_seconds=2))
    replacement = cloud.wait_for_instance(job.job_id, job.attempt + 1)

    # When someone else ends the job meanwhile (not a cancel)
    cloud.store.apply(
        jobs.mark_failed(cloud.store.get(job.job_id), reason="operator: bad data", now=jobs.utcnow())
    )

    # Then the workflow records nothing, ends its replacement and tells the operator why
    described = cloud.wait(arn)
    assert (described["status"], described["error"]) == ("FAILED", "trainctl.ConcurrentUpdate")
    record = cloud.store.get(job.job_id)
    assert (record.status, record.failure_reason, record.instance_id) == (
        JobStatus.FAILED,
        "operator: bad data",
        job.instance_id,
    )
    assert ended(cloud.instance(replacement["InstanceId"]))
    (message,) = cloud.messages(job.job_id)
    body = message["body"]
    assert (body["event"], body["replacement_instance_id"]) == (
        "recovery-abandoned",
        replacement["InstanceId"],
    )
    assert body["replacement"] == {"terminated": True}
    assert body["row"]["Item"]["status"]["S"] == "FAILED"


# --- the handshake's answer is not trusted blindly ---------------------------------------------


@pytest.mark.parametrize(
    "payload",
    [
        {
            "checkpoint": {
                "step": 999,
                "prefix": "elsewhere/",
                "attempt": 0,
                "created_at": "2030-01-01T00:00:00Z",
            }
        },
        {"unexpected": True},
        ["not", "an", "object"],
    ],
    ids=["other-step", "no-checkpoint", "not-an-object"],
)
def test_the_resume_point_comes_from_the_row_not_the_callback(cloud: Cloud, payload: Any) -> None:
    # Given an agent that records its final checkpoint (step 150) and answers with a payload
    # that says something else, or nothing usable
    pools = cloud.pools("m5.large", "m5.xlarge")
    job = cloud.interrupted_job(pools, periodic_step=100)
    arn = cloud.start(cloud.workflow_input(job, "spot-warning", handshake_timeout_seconds=30))
    row = cloud.wait_for_token(job)
    assert job.instance_id is not None
    cloud.store.record_checkpoint(
        job.job_id,
        instance_id=job.instance_id,
        attempt=job.attempt,
        checkpoint=jobs.CheckpointRef(
            step=150, prefix=f"{job.job_id}/ckpt/150/", attempt=job.attempt, created_at=jobs.utcnow()
        ),
        final=True,
    )
    cloud.sfn.send_task_success(taskToken=row["task_token"], output=json.dumps(payload))

    # Then the recovery resumes from what the row says, and the branch never failed
    described = cloud.wait(arn)
    assert described["status"] == "SUCCEEDED", described.get("cause")
    point = cloud.store.get(job.job_id).resume_point
    assert point is not None and (point.kind, point.step, point.prefix) == (
        "final",
        150,
        f"{job.job_id}/ckpt/150/",
    )
    assert "CheckpointsUnreadable" not in cloud.entered_states(arn)


# --- the launch calls --------------------------------------------------------------------------


@pytest.mark.parametrize("code", sorted(TRANSIENT_MESSAGES))
def test_a_transient_ec2_error_is_retried_with_the_same_client_token(cloud: Cloud, code: str) -> None:
    # Given the first RunInstances in pool 1 throttled (or failed on EC2's side), once
    pools = cloud.pools("m5.large", "m5.xlarge", "c5.large")
    job = cloud.interrupted_job(pools, reason=InterruptionReason.TERMINATED_WITHOUT_NOTICE)
    cloud.faults.script(pools[1], "spot", ("raise", code, TRANSIENT_MESSAGES[code]))
    cloud.faults.forget()
    arn = cloud.start(cloud.workflow_input(job, "terminated-without-notice", deadline=None))

    # Then the same call is made again after a backoff and the job recovers in that pool
    described = cloud.wait(arn)
    assert described["status"] == "SUCCEEDED", described.get("cause")
    record = cloud.store.get(job.job_id)
    assert record.attempts[-1].pool == pools[1].label
    (replacement,) = cloud.replacements(job.job_id, job.attempt + 1)
    assert replacement["InstanceId"] == record.instance_id
    key = (pools[1].instance_type, pools[1].subnet_id, "spot")
    assert cloud.faults.calls == [key, key]
    first, second = (r["client_token"] for r in cloud.faults.requests)
    assert first == second == _client_token(job.job_id, job.attempt + 1, pools[1].label, "spot", 0, arn)
    assert cloud.entered_states(arn).count("RetryLaunchBackoff") == 1


def test_each_backoff_round_uses_a_fresh_client_token(cloud: Cloud) -> None:
    # Given every pool out of capacity, Spot and on-demand, for both rounds
    pools = cloud.pools("m5.large", "m5.xlarge")
    job = cloud.interrupted_job(
        pools, allow_on_demand=True, reason=InterruptionReason.TERMINATED_WITHOUT_NOTICE
    )
    for pool in pools:
        for market in ("spot", "on-demand"):
            cloud.faults.out_of_capacity(pool, market=market)
    cloud.faults.forget()
    arn = cloud.start(cloud.workflow_input(job, "terminated-without-notice", deadline=None))
    assert cloud.wait(arn)["status"] == "FAILED"

    # Then each call's token is job/attempt/pool/market/round: a round never replays the
    # previous one's cached capacity error, and no two calls of a round share a token
    requests = cloud.faults.requests
    per_round = 2 * len(pools)  # Spot over every pool, then on-demand over every pool
    assert len(requests) == 2 * per_round
    expected = [
        _client_token(job.job_id, job.attempt + 1, r["pool"], r["market"], index // per_round, arn)
        for index, r in enumerate(requests)
    ]
    assert [r["client_token"] for r in requests] == expected
    assert len(set(expected)) == len(expected)
    assert all(len(token) <= 64 for token in expected)  # EC2's limit


def test_the_notification_carries_the_notice_and_launch_times(cloud: Cloud) -> None:
    # The alert carries when the loss was noticed and when the replacement was asked for;
    # JSONPath cannot subtract them, so the delay is left to the reader (docs/WORKFLOW.md).
    pools = cloud.pools("m5.large", "m5.xlarge")
    job = cloud.interrupted_job(pools, reason=InterruptionReason.TERMINATED_WITHOUT_NOTICE)
    arn = cloud.start(cloud.workflow_input(job, "terminated-without-notice", deadline=None))
    assert cloud.wait(arn)["status"] == "SUCCEEDED"

    (message,) = cloud.messages(job.job_id)
    body = message["body"]
    interruption = job.interruption_for(job.attempt)
    assert interruption is not None
    assert body["noticed_at"] == format_time(interruption.noticed_at)
    noticed = datetime.fromisoformat(body["noticed_at"].replace("Z", "+00:00"))
    launched = datetime.fromisoformat(body["launched_at"].replace("Z", "+00:00"))
    assert timedelta(0) <= launched - noticed < timedelta(minutes=1)
    assert "seconds" not in json.dumps(body)


def test_a_new_execution_for_the_same_attempt_asks_ec2_with_its_own_client_token(cloud: Cloud) -> None:
    # Given a recovery that launched, could not record its replacement (terminated it) and
    # could not mark the job FAILED either: the row is still INTERRUPTED on attempt 0
    pools = cloud.pools("m5.large", "m5.xlarge")
    job = cloud.interrupted_job(pools, reason=InterruptionReason.TERMINATED_WITHOUT_NOTICE)
    cloud.table_faults.replacement_writes[job.job_id] = ItemSizeTooLarge()
    cloud.table_faults.script(job.job_id, FAILED_WRITE, RowFault(ItemSizeTooLarge()))
    cloud.faults.forget()
    payload = cloud.workflow_input(job, "terminated-without-notice", deadline=None)
    first = cloud.start(payload)
    assert cloud.wait(first)["status"] == "FAILED"
    (terminated,) = cloud.replacements(job.job_id, job.attempt + 1)
    assert ended(terminated) and cloud.store.get(job.job_id).status is JobStatus.INTERRUPTED

    # When the operator runs the recovery again under another name
    cloud.table_faults.clear()
    second = cloud.start(payload, name=f"{job.execution_name}-rerun")
    described = cloud.wait(second)
    assert described["status"] == "SUCCEEDED", described.get("cause")

    # Then its RunInstances carries a token of its own: with the first one, EC2 would answer
    # with the first execution's (terminated) instance, and that is what would be recorded
    tokens = [r["client_token"] for r in cloud.faults.requests]
    assert tokens == [
        _client_token(job.job_id, job.attempt + 1, pools[1].label, "spot", 0, first),
        _client_token(job.job_id, job.attempt + 1, pools[1].label, "spot", 0, second),
    ]
    assert tokens[0] != tokens[1] and all(len(token) <= 64 for token in tokens)
    record = cloud.store.get(job.job_id)
    assert record.status is JobStatus.LAUNCHING and record.instance_id != terminated["InstanceId"]


def test_the_launch_loop_makes_exactly_the_calls_and_waits_the_tuning_budgets(cloud: Cloud) -> None:
    # The execution timeout is derived from WorkflowTuning's count of the launch loop's
    # calls and waits; here the real definition runs that worst case (every call throttled
    # until the retries are spent, then refused for capacity, on Spot and on-demand, in
    # every round) and the count is checked against what it did.
    pools = cloud.pools("m5.large")
    job = cloud.interrupted_job(
        pools, allow_on_demand=True, reason=InterruptionReason.TERMINATED_WITHOUT_NOTICE
    )
    throttled = ("raise", "RequestLimitExceeded", TRANSIENT_MESSAGES["RequestLimitExceeded"])
    for market in ("spot", "on-demand"):
        refused = (
            "raise",
            "InsufficientInstanceCapacity",
            cloud.faults.capacity_message(pools[0], market, "InsufficientInstanceCapacity"),
        )
        per_round = [throttled] * TEST_TUNING.launch_retries + [refused]
        cloud.faults.script(pools[0], market, *(per_round * TEST_TUNING.launch_rounds))
    cloud.faults.forget()
    arn = cloud.start(cloud.workflow_input(job, "terminated-without-notice", deadline=None))

    described = cloud.wait(arn, timeout=90)
    assert (described["status"], described["error"]) == ("FAILED", "trainctl.JobFailed")
    assert "trainctl.CapacityExhausted" in described["cause"]
    assert len(cloud.faults.calls) == TEST_TUNING.launch_calls(len(pools))
    waited = 0
    for event in cloud.history(arn):
        entered = event.get("stateEnteredEventDetails")
        if entered and entered["name"] in ("RetryLaunchBackoff", "Backoff"):
            launch = json.loads(entered["input"])["launch"]
            if entered["name"] == "RetryLaunchBackoff":
                waited += launch["cursor"]["retry_wait_seconds"]
            else:
                waited += launch["round"]["backoff_seconds"]
    assert waited == TEST_TUNING.launch_wait_seconds(len(pools))


# --- writes whose answer is lost ----------------------------------------------------------------


def test_a_record_that_landed_before_its_error_is_kept_not_terminated(cloud: Cloud) -> None:
    # Given the record of the replacement lands but DynamoDB answers with a server error: the
    # retry then fails its own condition (the first write moved the version)
    pools = cloud.pools("m5.large", "m5.xlarge")
    job = cloud.interrupted_job(pools, periodic_step=30, reason=InterruptionReason.TERMINATED_WITHOUT_NOTICE)
    cloud.table_faults.script(job.job_id, REPLACEMENT_WRITE, RowFault(SERVER_ERROR, land=True))
    arn = cloud.start(cloud.workflow_input(job, "terminated-without-notice", deadline=None))

    # Then the workflow sees its own record on the row and carries on: the replacement the
    # row names as LAUNCHING keeps running, and the recovery is announced once
    described = cloud.wait(arn)
    assert described["status"] == "SUCCEEDED", described.get("cause")
    (replacement,) = cloud.replacements(job.job_id, job.attempt + 1)
    assert not ended(replacement)
    record = cloud.store.get(job.job_id)
    assert (record.status, record.instance_id, record.attempt, record.version) == (
        JobStatus.LAUNCHING,
        replacement["InstanceId"],
        job.attempt + 1,
        job.version + 1,
    )
    assert record.resume_point is not None and (record.resume_point.kind, record.resume_point.step) == (
        "fallback",
        30,
    )
    assert [a.instance_id for a in record.attempts] == [job.instance_id, replacement["InstanceId"]]
    failed = [e["taskFailedEventDetails"]["error"] for e in cloud.task_events(arn, "TaskFailed")]
    assert failed == ["DynamoDB.InternalServerError", "DynamoDB.ConditionalCheckFailedException"]
    entered = cloud.entered_states(arn)
    assert "RecordLanded" in entered and "TerminateReplacement" not in entered
    (message,) = cloud.messages(job.job_id)
    assert (message["body"]["event"], message["body"]["instance_id"]) == (
        "terminated-without-notice",
        replacement["InstanceId"],
    )


def test_a_failed_write_that_landed_before_its_error_is_reported_as_failed(cloud: Cloud) -> None:
    # Given a job at its interruption limit whose FAILED write lands but DynamoDB answers
    # with a server error: the retry then fails its own condition (the version moved)
    pools = cloud.pools("m5.large", "m5.xlarge")
    job = cloud.interrupted_job(pools, limits=jobs.JobLimits(max_interruptions=0))
    assert job.instance_id is not None
    cloud.faults.forget()
    cloud.table_faults.script(job.job_id, FAILED_WRITE, RowFault(SERVER_ERROR, land=True))
    arn = cloud.start(cloud.workflow_input(job, "spot-warning"))

    # Then the workflow sees its own write on the row: the job FAILED with its reason, the
    # warned old instance is ended with it, and the alert is the FAILED one, not "changed
    # by someone else"
    message = assert_guard_hit(cloud, job, arn, "max interruptions reached: 1 of 0")
    failed = [e["taskFailedEventDetails"]["error"] for e in cloud.task_events(arn, "TaskFailed")]
    assert failed == ["DynamoDB.InternalServerError", "DynamoDB.ConditionalCheckFailedException"]
    entered = cloud.entered_states(arn)
    assert "FailedLanded" in entered and "RefusedReason" not in entered
    assert ended(cloud.instance(job.instance_id))
    assert message["body"]["row_update_error"]["landed"] is True


def test_a_job_row_changed_before_it_could_be_marked_failed_is_alerted(cloud: Cloud) -> None:
    # Given a launch that is about to fail (a non-capacity error) while the old instance,
    # warned, still runs
    pools = cloud.pools("m5.large", "m5.xlarge")
    job = cloud.interrupted_job(pools, periodic_step=10)
    assert job.instance_id is not None
    key = (pools[1].instance_type, pools[1].subnet_id, "spot")
    gate = cloud.faults.hold(pools[1])
    cloud.faults.fail(
        pools[1], "spot", "InvalidParameterValue", "Value (ami-0) for parameter image is invalid."
    )
    cloud.faults.forget()
    arn = cloud.start(cloud.workflow_input(job, "spot-warning", handshake_timeout_seconds=30))
    try:
        # When an operator ends the job meanwhile, so that the workflow's FAILED write is refused
        deadline = time.monotonic() + 10
        while key not in cloud.faults.calls:
            assert time.monotonic() < deadline, "RunInstances was never called"
            time.sleep(0.02)
        cloud.store.apply(
            jobs.mark_failed(cloud.store.get(job.job_id), reason="operator: bad data", now=jobs.utcnow())
        )
    finally:
        gate.set()

    # Then the operator's row stands, the now ownerless old instance is ended, and the
    # operator is told what this execution could not record
    described = cloud.wait(arn)
    assert (described["status"], described["error"]) == ("FAILED", "trainctl.ConcurrentUpdate")
    record = cloud.store.get(job.job_id)
    assert (record.status, record.failure_reason) == (JobStatus.FAILED, "operator: bad data")
    assert ended(cloud.instance(job.instance_id))
    (message,) = cloud.messages(job.job_id)
    assert message["subject"] == f"trainctl: {job.job_id} recovery abandoned"
    body = message["body"]
    assert body["event"] == "recovery-abandoned"
    assert body["row"]["Item"]["status"]["S"] == "FAILED"
    assert body["unrecorded_failure"]["failure_reason"].startswith("launch failed: trainctl.LaunchFailed: ")
    assert body["old_instance"] == {"action": "terminated"}


# --- an error object without a Cause -----------------------------------------------------------


@pytest.fixture
def errors_without_cause() -> Iterator[None]:
    """Error objects as ASL allows them: an Error and no Cause (moto always adds one)."""
    original = ExecutionState.__dict__["_construct_error_output_value"]

    def without_cause(failure_event: Any) -> Any:
        output = original.__func__(failure_event)
        output.pop("Cause", None)
        return output

    ExecutionState._construct_error_output_value = staticmethod(without_cause)  # type: ignore[method-assign]
    try:
        yield
    finally:
        ExecutionState._construct_error_output_value = original  # type: ignore[method-assign]


@pytest.mark.usefixtures("errors_without_cause")
def test_a_launch_error_without_a_cause_still_fails_the_job_cleanly(cloud: Cloud) -> None:
    pools = cloud.pools("m5.large", "m5.xlarge")
    job = cloud.interrupted_job(pools, reason=InterruptionReason.TERMINATED_WITHOUT_NOTICE)
    cloud.faults.fail(
        pools[1], "spot", "InvalidParameterValue", "Value (ami-0) for parameter image is invalid."
    )
    arn = cloud.start(cloud.workflow_input(job, "terminated-without-notice", deadline=None))

    # Not a States.Runtime that strands the job INTERRUPTED: FAILED, with the reason it has
    described = cloud.wait(arn)
    assert (described["status"], described["error"]) == ("FAILED", "trainctl.JobFailed")
    assert described["cause"] == "launch failed: trainctl.LaunchFailed: (no cause given)"
    record = cloud.store.get(job.job_id)
    assert (record.status, record.failure_reason) == (JobStatus.FAILED, described["cause"])
    assert "LaunchErrorWithoutCause" in cloud.entered_states(arn)
    (message,) = cloud.messages(job.job_id)
    assert message["body"]["failure_reason"] == described["cause"]


@pytest.mark.usefixtures("errors_without_cause")
@pytest.mark.parametrize("failing", ["record", "checkpoints"])
def test_a_failure_after_the_launch_without_a_cause_still_ends_the_replacement(
    cloud: Cloud, failing: str
) -> None:
    pools = cloud.pools("m5.large", "m5.xlarge")
    job = cloud.interrupted_job(pools, periodic_step=50, reason=InterruptionReason.TERMINATED_WITHOUT_NOTICE)
    if failing == "record":
        cloud.table_faults.replacement_writes[job.job_id] = ItemSizeTooLarge()
        reason = "could not record the replacement on the job row: "
    else:
        cloud.table_faults.checkpoint_reads[job.job_id] = DynamodbException(*KMS_DENIED)
        reason = "could not read the checkpoints on the job row: "
    arn = cloud.start(cloud.workflow_input(job, "terminated-without-notice", deadline=None))

    replacement = cloud.wait_for_instance(job.job_id, job.attempt + 1)
    body = _assert_failed_cleanly(
        cloud, job, arn, reason_starts=reason, replacement_id=replacement["InstanceId"]
    )
    assert body["failure_reason"].endswith(": (no cause given)")
