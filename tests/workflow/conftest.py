"""Run the real resume workflow (resume.asl.json, rendered as deployed) in moto.

One moto mock per test module (the first state machine in a process costs seconds);
every test uses its own job id, so tests share the table, topic and state machine. Faults
come from patching moto's EC2 backend, which the state machine's own aws-sdk calls reach.
"""

from __future__ import annotations

import json
import os
import threading
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any

# Before moto is imported: no default AMIs (describe_images is slow), fake credentials.
os.environ.setdefault("MOTO_EC2_LOAD_DEFAULT_AMIS", "false")
os.environ.setdefault("AWS_DEFAULT_REGION", "us-east-1")
os.environ.setdefault("AWS_ACCESS_KEY_ID", "testing")
os.environ.setdefault("AWS_SECRET_ACCESS_KEY", "testing")

import boto3
import pytest
from moto import mock_aws
from moto.dynamodb.exceptions import DynamodbException
from moto.dynamodb.models import DynamoDBBackend
from moto.dynamodb.responses import DynamoHandler
from moto.ec2.exceptions import EC2ClientError
from moto.ec2.models.instances import InstanceBackend
from moto.stepfunctions.parser.asl.component.state.choice.comparison.operator.implementations.is_operator import (  # noqa: E501
    IsTimestamp,
)

from infra.workflows.render import WorkflowTuning, load_resume_definition, render, substitutions
from trainctl_core import jobs
from trainctl_core.jobs import CapacityPool, CheckpointRef, InterruptionReason, Job, JobSpec
from trainctl_core.settings import (
    JOBS_PARTITION_KEY,
    TAG_ATTEMPT,
)
from trainctl_core.store import JobStore, format_time
from trainctl_core.tables import jobs_table_request

REGION = "us-east-1"
MOTO_CONFIG: Any = {"stepfunctions": {"execute_state_machine": True}}
# Short backoffs so the "all pools out" and transient-error cases take seconds, not
# minutes; everything else is what the stack deploys.
TEST_TUNING = WorkflowTuning(
    launch_backoff_seconds=1, launch_rounds=2, launch_retries=2, launch_retry_seconds=1
)

# EC2's real messages (as RunInstances returns them; collected from public reports of each
# code). The workflow can only go by the message: on AWS every EC2 error of an aws-sdk task
# is `Ec2.Ec2Exception` (moto: `ec2.ec2Exception`) with the message as its cause. The
# first message of each code is the one `out_of_capacity` uses by default.
CAPACITY_MESSAGES: dict[str, list[str]] = {
    "InsufficientInstanceCapacity": [
        "We currently do not have sufficient {type} capacity in the Availability Zone you requested ({az}). "
        "Our system will be working on provisioning additional capacity. You can currently get {type} "
        "capacity by not specifying an Availability Zone in your request or choosing {other_azs}.",
        "There is no Spot capacity available that matches your request.",
        "Insufficient capacity.",
    ],
    "SpotMaxPriceTooLow": [
        "Your Spot request price of 0.001 is lower than the minimum required Spot request fulfillment "
        "price of 0.0374.",
    ],
    "MaxSpotInstanceCountExceeded": ["Max spot instance count exceeded"],
    "Unsupported": [
        "Your requested instance type ({type}) is not supported in your requested Availability Zone ({az}). "
        "Please retry your request by not specifying an Availability Zone or choosing {other_azs}.",
        "The requested configuration is currently not supported. Please check the documentation for "
        "supported configurations.",
    ],
    "InsufficientFreeAddressesInSubnet": [
        "There are not enough free addresses in subnet '{subnet}' to satisfy the requested number of "
        "instances.",
    ],
}
# Spot capacity shortages read differently from on-demand ones.
SPOT_CAPACITY_MESSAGE = CAPACITY_MESSAGES["InsufficientInstanceCapacity"][1]
# Transient errors: throttling and EC2's server errors.
TRANSIENT_MESSAGES = {
    "RequestLimitExceeded": "Request limit exceeded.",
    "InternalError": "An internal error has occurred.",
    "Unavailable": "The server is overloaded and can't handle the request.",
}


@dataclass
class LaunchFaults:
    """What moto's RunInstances does per (instance type, subnet, market).

    `errors` fail every call for a key; `scripts` are consumed one call at a time, each
    either ("raise", code, message) or ("launch-then-raise", code, message) (the instance is
    created, the response lost: what a retried call with the same ClientToken guards
    against). `calls` and `requests` record every call, failed or not.
    """

    zones: dict[str, str] = field(default_factory=dict)  # subnet -> availability zone
    errors: dict[tuple[str, str, str], tuple[str, str]] = field(default_factory=dict)
    scripts: dict[tuple[str, str, str], list[tuple[str, str, str]]] = field(default_factory=dict)
    gates: dict[tuple[str, str, str], threading.Event] = field(default_factory=dict)
    calls: list[tuple[str, str, str]] = field(default_factory=list)
    requests: list[dict[str, Any]] = field(default_factory=list)

    def capacity_message(self, pool: CapacityPool, market: str, code: str, variant: int | None = None) -> str:
        if variant is None:
            variant = 1 if (code, market) == ("InsufficientInstanceCapacity", "spot") else 0
        zone = self.zones.get(pool.subnet_id, f"{REGION}a")
        others = ", ".join(z for z in sorted(set(self.zones.values())) if z != zone)
        return CAPACITY_MESSAGES[code][variant].format(
            type=pool.instance_type, subnet=pool.subnet_id, az=zone, other_azs=others
        )

    def out_of_capacity(
        self,
        pool: CapacityPool,
        market: str = "spot",
        code: str = "InsufficientInstanceCapacity",
        variant: int | None = None,
    ) -> None:
        message = self.capacity_message(pool, market, code, variant)
        self.errors[(pool.instance_type, pool.subnet_id, market)] = (code, message)

    def fail(self, pool: CapacityPool, market: str, code: str, message: str) -> None:
        self.errors[(pool.instance_type, pool.subnet_id, market)] = (code, message)

    def script(self, pool: CapacityPool, market: str, *steps: tuple[str, str, str]) -> None:
        """The next calls for `pool` do `steps` in order, then behave normally."""
        self.scripts[(pool.instance_type, pool.subnet_id, market)] = list(steps)

    def hold(self, pool: CapacityPool, market: str = "spot") -> threading.Event:
        """Block RunInstances for `pool` until the returned event is set."""
        gate = threading.Event()
        self.gates[(pool.instance_type, pool.subnet_id, market)] = gate
        return gate

    def forget(self) -> None:
        """Drop the record of earlier calls (e.g. the test's own launch of attempt 0)."""
        self.calls.clear()
        self.requests.clear()

    def clear(self) -> None:
        for gate in self.gates.values():
            gate.set()
        self.errors.clear()
        self.scripts.clear()
        self.gates.clear()
        self.calls.clear()
        self.requests.clear()


@dataclass
class RowFault:
    """One refused job-row write: `error` is raised. With `land=True` the write is applied
    first and only its answer is lost (a server error after the commit); `landed` is then
    set, and the error waits for `release` when one is given, so a test can act in between."""

    error: Exception
    land: bool = False
    landed: threading.Event = field(default_factory=threading.Event)
    release: threading.Event | None = None


# DynamoDB's transient errors as the service sends them (moto raises what it is given).
THROTTLED = DynamodbException(
    "com.amazonaws.dynamodb.v20120810#ProvisionedThroughputExceededException",
    "The level of configured provisioned throughput for the table was exceeded. Consider increasing your "
    "provisioning level with the UpdateTable API.",
)
SERVER_ERROR = DynamodbException(
    "com.amazonaws.dynamodb.v20120810#InternalServerError", "Internal server error"
)

# The job-row writes the workflow makes, told apart by their values.
TOKEN_WRITE = "token"  # AwaitFinalCheckpoint (aws-sdk updateItem.waitForTaskToken)
REPLACEMENT_WRITE = "replacement"  # RecordReplacement
FAILED_WRITE = "failed"  # MarkFailed


def _write_kind(values: dict[str, Any]) -> str | None:
    if ":token" in values:
        return TOKEN_WRITE
    if values.get(":launching") == {"S": "LAUNCHING"}:
        return REPLACEMENT_WRITE
    if values.get(":failed") == {"S": "FAILED"}:
        return FAILED_WRITE
    return None


@dataclass
class TableFaults:
    """Job-row reads and writes the state machine makes that moto's DynamoDB should refuse.

    Keyed by job id: `checkpoint_reads` (the `get_item` of the checkpoints) and
    `replacement_writes` refuse every such call; `scripts` refuse the next calls of one kind
    of write (`TOKEN_WRITE`, ...), one `RowFault` per call, then let them through.
    """

    checkpoint_reads: dict[str, Exception] = field(default_factory=dict)
    replacement_writes: dict[str, Exception] = field(default_factory=dict)
    scripts: dict[tuple[str, str], list[RowFault]] = field(default_factory=dict)

    def script(self, job_id: str, kind: str, *faults: RowFault) -> None:
        self.scripts[(job_id, kind)] = list(faults)

    def clear(self) -> None:
        for script in self.scripts.values():
            for fault in script:
                if fault.release is not None:
                    fault.release.set()
        self.checkpoint_reads.clear()
        self.replacement_writes.clear()
        self.scripts.clear()


@dataclass
class Cloud:
    """The moto account a module's tests run in, plus helpers that act like the other parts."""

    ddb: Any
    ec2: Any
    sfn: Any
    sqs: Any
    table: str
    topic_arn: str
    queue_url: str
    subnets: list[str]
    launch_template_id: str
    state_machine_arn: str
    definition: str
    faults: LaunchFaults
    table_faults: TableFaults

    @property
    def store(self) -> JobStore:
        return JobStore(self.ddb, self.table)

    # --- jobs ---------------------------------------------------------------------------

    def pools(self, *types: str) -> list[CapacityPool]:
        """One pool per instance type, each in the next subnet."""
        return [
            CapacityPool(instance_type=t, subnet_id=self.subnets[i % len(self.subnets)])
            for i, t in enumerate(types)
        ]

    def new_job(self, pools: list[CapacityPool], **spec: Any) -> Job:
        job_id = f"job-{uuid.uuid4().hex[:10]}"
        job = jobs.new_job(job_id, JobSpec(name=job_id, command=["python", "train.py"], pools=pools, **spec))
        return self.store.create(job)

    def running_job(self, pools: list[CapacityPool], *, pool_index: int = 0, **spec: Any) -> Job:
        """A job RUNNING attempt 0 on a real (moto) instance launched in pools[pool_index]."""
        job = self.new_job(pools, **spec)
        pool = pools[pool_index]
        instance_id = self.launch_instance(job.job_id, 0, pool)
        now = jobs.utcnow()
        job = self.store.apply(
            jobs.mark_launching(
                job,
                instance_id=instance_id,
                pool=pool.label,
                resume_point=jobs.ResumePoint(kind="none"),
                now=now,
            )
        )
        return self.store.apply(jobs.mark_running(job, instance_id=instance_id, now=now))

    def interrupted_job(
        self,
        pools: list[CapacityPool],
        *,
        reason: InterruptionReason = InterruptionReason.SPOT_WARNING,
        periodic_step: int | None = None,
        **spec: Any,
    ) -> Job:
        """Like the interruption handler leaves it: INTERRUPTED on its current instance."""
        job = self.running_job(pools, **spec)
        assert job.instance_id is not None
        if periodic_step is not None:
            self.agent_checkpoint(job, periodic_step, final=False)
            job = self.store.get(job.job_id)
        now = jobs.utcnow()
        return self.store.apply(
            jobs.mark_interrupted(
                job, instance_id=job.instance_id, reason=reason, now=now, deadline=now + timedelta(minutes=2)
            )
        )

    def launch_instance(self, job_id: str, attempt: int, pool: CapacityPool) -> str:
        response = self.ec2.run_instances(
            LaunchTemplate={"LaunchTemplateId": self.launch_template_id},
            InstanceType=pool.instance_type,
            SubnetId=pool.subnet_id,
            MinCount=1,
            MaxCount=1,
            TagSpecifications=[
                {
                    "ResourceType": "instance",
                    "Tags": [
                        {"Key": "trainctl:managed", "Value": "true"},
                        {"Key": "trainctl:job-id", "Value": job_id},
                        {"Key": "trainctl:attempt", "Value": str(attempt)},
                    ],
                }
            ],
        )
        return str(response["Instances"][0]["InstanceId"])

    # --- the agent's side of the handshake ------------------------------------------------

    def agent_checkpoint(self, job: Job, step: int, *, final: bool) -> dict[str, Any]:
        """What the agent does: record the checkpoint (fenced) and answer a waiting token."""
        assert job.instance_id is not None
        ref = CheckpointRef(
            step=step, prefix=f"{job.job_id}/ckpt/{step}/", attempt=job.attempt, created_at=jobs.utcnow()
        )
        row = self.store.record_checkpoint(
            job.job_id, instance_id=job.instance_id, attempt=job.attempt, checkpoint=ref, final=final
        )
        if final and row.get("task_token") and row.get("task_token_attempt") == job.attempt:
            checkpoint = {
                "step": step,
                "prefix": ref.prefix,
                "attempt": job.attempt,
                "created_at": format_time(ref.created_at),
            }
            self.sfn.send_task_success(
                taskToken=row["task_token"], output=json.dumps({"checkpoint": checkpoint})
            )
        return row

    def wait_for_token(self, job: Job, timeout: float = 10.0) -> dict[str, Any]:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            row = self.store.raw(job.job_id)
            if row.get("task_token") and row.get("task_token_attempt") == job.attempt:
                return row
            time.sleep(0.02)
        raise AssertionError(f"the workflow never stored its task token on {job.job_id}")

    # --- executions ---------------------------------------------------------------------

    def workflow_input(self, job: Job, reason: str, **overrides: Any) -> dict[str, Any]:
        interruption = job.interruption_for(job.attempt) if reason != "launch" else None
        payload: dict[str, Any] = {
            "job_id": job.job_id,
            "instance_id": None if reason == "launch" else job.instance_id,
            "attempt": job.attempt,
            "reason": reason,
            "deadline": format_time(interruption.deadline)
            if interruption and interruption.deadline
            else None,
        }
        payload.update(overrides)
        return payload

    def start(self, payload: dict[str, Any], name: str | None = None) -> str:
        if name is None:
            name = (
                jobs.execution_name(payload["job_id"], payload["attempt"], payload.get("reason"))
                if "job_id" in payload
                else uuid.uuid4().hex
            )
        response = self.sfn.start_execution(
            stateMachineArn=self.state_machine_arn, name=name, input=json.dumps(payload)
        )
        return str(response["executionArn"])

    def wait(self, execution_arn: str, timeout: float = 30.0) -> dict[str, Any]:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            described = self.sfn.describe_execution(executionArn=execution_arn)
            if described["status"] != "RUNNING":
                return dict(described)
            time.sleep(0.05)
        raise AssertionError(f"execution {execution_arn} still running after {timeout}s")

    def history(self, execution_arn: str) -> list[dict[str, Any]]:
        events: list[dict[str, Any]] = self.sfn.get_execution_history(
            executionArn=execution_arn, maxResults=1000
        )["events"]
        return events

    def entered_states(self, execution_arn: str) -> list[str]:
        return [
            e["stateEnteredEventDetails"]["name"]
            for e in self.history(execution_arn)
            if "stateEnteredEventDetails" in e
        ]

    # --- observable effects -------------------------------------------------------------

    def instances_of(self, job_id: str) -> list[dict[str, Any]]:
        reservations = self.ec2.describe_instances(
            Filters=[{"Name": "tag:trainctl:job-id", "Values": [job_id]}]
        )["Reservations"]
        return [i for r in reservations for i in r["Instances"]]

    def replacements(self, job_id: str, attempt: int) -> list[dict[str, Any]]:
        """The job's instances tagged with `attempt` (any state)."""
        return [i for i in self.instances_of(job_id) if tags_of(i).get(TAG_ATTEMPT) == str(attempt)]

    def instance(self, instance_id: str) -> dict[str, Any]:
        reservations = self.ec2.describe_instances(InstanceIds=[instance_id])["Reservations"]
        return dict(reservations[0]["Instances"][0])

    def wait_for_instance(self, job_id: str, attempt: int, timeout: float = 10.0) -> dict[str, Any]:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            found = self.replacements(job_id, attempt)
            if found:
                return found[0]
            time.sleep(0.02)
        raise AssertionError(f"no instance for {job_id} attempt {attempt}")

    def task_events(self, execution_arn: str, kind: str) -> list[dict[str, Any]]:
        return [e for e in self.history(execution_arn) if e["type"] == kind]

    def messages(self, job_id: str) -> list[dict[str, Any]]:
        """Every SNS message about `job_id` delivered so far (via the subscribed queue)."""
        found: list[dict[str, Any]] = []
        while True:
            batch = self.sqs.receive_message(QueueUrl=self.queue_url, MaxNumberOfMessages=10).get(
                "Messages", []
            )
            if not batch:
                break
            for message in batch:
                envelope = json.loads(message["Body"])
                _INBOX.append({"subject": envelope.get("Subject"), "body": json.loads(envelope["Message"])})
                self.sqs.delete_message(QueueUrl=self.queue_url, ReceiptHandle=message["ReceiptHandle"])
        found = [m for m in _INBOX if m["body"].get("job_id") == job_id]
        return found


_INBOX: list[dict[str, Any]] = []


def tags_of(instance: dict[str, Any]) -> dict[str, str]:
    return {t["Key"]: t["Value"] for t in instance.get("Tags", [])}


def assert_guard_hit(cloud: Cloud, job: Job, arn: str, reason: str) -> dict[str, Any]:
    """A guard ended the job: FAILED with `reason`, alerted, nothing launched. Returns the
    alert (the SNS message)."""
    described = cloud.wait(arn)
    assert (described["status"], described["error"], described["cause"]) == (
        "FAILED",
        "trainctl.JobFailed",
        reason,
    )
    record = cloud.store.get(job.job_id)
    assert (record.status, record.failure_reason, record.version) == (
        jobs.JobStatus.FAILED,
        reason,
        job.version + 1,
    )
    entered = cloud.entered_states(arn)
    assert "Recover" not in entered and "MarkFailed" in entered
    assert not [e for e in cloud.task_events(arn, "TaskScheduled") if resource_of(e) == "runInstances"]
    (message,) = cloud.messages(job.job_id)
    assert message["subject"] == f"trainctl: {job.job_id} FAILED"
    assert (message["body"]["event"], message["body"]["failure_reason"]) == ("job-failed", reason)
    return message


def resource_of(event: dict[str, Any]) -> str:
    """The API a Task* history event is about (e.g. `runInstances`)."""
    details = next(v for k, v in event.items() if k.endswith("EventDetails"))
    return str(details.get("resource"))


def ended(instance: dict[str, Any]) -> bool:
    return instance["State"]["Name"] in ("shutting-down", "terminated")


def _patch_run_instances(faults: LaunchFaults) -> Any:
    original = InstanceBackend.run_instances

    def run_instances(
        self: Any, image_id: str, count: int, user_data: Any, security_group_names: Any, **kwargs: Any
    ) -> Any:
        # moto passes InstanceMarketOptions.MarketType through as a plain string.
        market = "spot" if kwargs.get("instance_market_options") == "spot" else "on-demand"
        key = (str(kwargs.get("instance_type")), str(kwargs.get("subnet_id")), market)
        faults.calls.append(key)
        faults.requests.append(
            {
                "pool": f"{key[0]}@{key[1]}",
                "market": market,
                "client_token": kwargs.get("client_token"),
                "shutdown_behavior": kwargs.get("instance_initiated_shutdown_behavior"),
            }
        )
        gate = faults.gates.get(key)
        if gate is not None:
            gate.wait(timeout=30)
        script = faults.scripts.get(key)
        if script:
            action, code, message = script.pop(0)
            if action == "launch-then-raise":
                original(self, image_id, count, user_data, security_group_names, **kwargs)
            raise EC2ClientError(code, message)
        if key in faults.errors:
            code, message = faults.errors[key]
            raise EC2ClientError(code, message)
        return original(self, image_id, count, user_data, security_group_names, **kwargs)

    InstanceBackend.run_instances = run_instances  # type: ignore[method-assign]
    return original


# moto's DynamoDB is not thread-safe: a test reading a row (e.g. polling for the task token)
# while the workflow's thread updates it can fail with "dictionary changed size during
# iteration". Requests are served one at a time (DESIGN §5).
_DYNAMODB_REQUESTS = threading.RLock()


def _patch_job_rows(faults: TableFaults) -> tuple[Any, Any, Any]:
    """Serialise DynamoDB requests, and let a test refuse the workflow's checkpoint read or
    its writes of one job's row."""
    original_get = DynamoDBBackend.get_item
    original_update = DynamoDBBackend.update_item
    original_call = DynamoHandler.call_action

    def call_action(self: Any) -> Any:
        with _DYNAMODB_REQUESTS:
            return original_call(self)

    def get_item(self: Any, table_name: str, keys: dict[str, Any], *args: Any, **kwargs: Any) -> Any:
        job_id = str(keys.get(JOBS_PARTITION_KEY, {}).get("S", "")).removeprefix("JOB#")
        projection = args[0] if args else kwargs.get("projection_expressions")
        reads_checkpoints = projection is not None and ["final_checkpoint"] in projection
        if reads_checkpoints and job_id in faults.checkpoint_reads:
            raise faults.checkpoint_reads[job_id]
        return original_get(self, table_name, keys, *args, **kwargs)

    def update_item(self: Any, table_name: str, key: dict[str, Any], *args: Any, **kwargs: Any) -> Any:
        job_id = str(key.get(JOBS_PARTITION_KEY, {}).get("S", "")).removeprefix("JOB#")
        values = kwargs.get("expression_attribute_values") or (args[2] if len(args) > 2 else {})
        kind = _write_kind(values or {})
        if kind == REPLACEMENT_WRITE and job_id in faults.replacement_writes:
            raise faults.replacement_writes[job_id]
        script = faults.scripts.get((job_id, kind or ""))
        if script:
            fault = script.pop(0)
            if fault.land:
                original_update(self, table_name, key, *args, **kwargs)
                fault.landed.set()
                if fault.release is not None:
                    # Let the test's own requests through while this one is held.
                    _DYNAMODB_REQUESTS.release()
                    try:
                        fault.release.wait(timeout=30)
                    finally:
                        _DYNAMODB_REQUESTS.acquire()
            raise fault.error
        return original_update(self, table_name, key, *args, **kwargs)

    DynamoDBBackend.get_item = get_item  # type: ignore[method-assign]
    DynamoDBBackend.update_item = update_item  # type: ignore[method-assign]
    DynamoHandler.call_action = call_action  # type: ignore[method-assign]
    return original_get, original_update, original_call


def _parse_rfc3339(value: str) -> datetime | None:
    try:
        return datetime.fromisoformat(value.replace("Z", "+00:00"))
    except (TypeError, ValueError):
        return None


@pytest.fixture(scope="module")
def cloud() -> Iterator[Cloud]:
    faults = LaunchFaults()
    table_faults = TableFaults()
    original = _patch_run_instances(faults)
    original_get, original_update, original_call = _patch_job_rows(table_faults)
    # moto parses Choice timestamps only as %Y-%m-%dT%H:%M:%SZ (no fractions, no offsets),
    # so every comparison with our millisecond timestamps is false there; AWS accepts
    # RFC 3339. Teach moto RFC 3339 so the wall-clock guard is exercised as on AWS.
    original_parse = IsTimestamp.string_to_timestamp
    IsTimestamp.string_to_timestamp = staticmethod(_parse_rfc3339)  # type: ignore[assignment]
    with mock_aws(config=MOTO_CONFIG):
        try:
            yield _build_cloud(faults, table_faults)
        finally:
            faults.clear()
            table_faults.clear()
            InstanceBackend.run_instances = original  # type: ignore[method-assign]
            DynamoDBBackend.get_item = original_get  # type: ignore[method-assign]
            DynamoDBBackend.update_item = original_update  # type: ignore[method-assign]
            DynamoHandler.call_action = original_call  # type: ignore[method-assign]
            IsTimestamp.string_to_timestamp = original_parse  # type: ignore[method-assign]


@pytest.fixture(autouse=True)
def _reset_faults(request: pytest.FixtureRequest) -> Iterator[None]:
    yield
    if "cloud" in request.fixturenames:
        cloud = request.getfixturevalue("cloud")
        cloud.faults.clear()
        cloud.table_faults.clear()


def _build_cloud(faults: LaunchFaults, table_faults: TableFaults) -> Cloud:
    ddb = boto3.client("dynamodb", region_name=REGION)
    ec2 = boto3.client("ec2", region_name=REGION)
    sfn = boto3.client("stepfunctions", region_name=REGION)
    sns = boto3.client("sns", region_name=REGION)
    sqs = boto3.client("sqs", region_name=REGION)
    iam = boto3.client("iam", region_name=REGION)

    table = "trainctl-jobs"
    ddb.create_table(**jobs_table_request(table, projection="ALL"))
    topic_arn = sns.create_topic(Name="trainctl-alerts")["TopicArn"]
    queue_url = sqs.create_queue(QueueName="trainctl-alerts-inbox")["QueueUrl"]
    queue_arn = sqs.get_queue_attributes(QueueUrl=queue_url, AttributeNames=["QueueArn"])["Attributes"][
        "QueueArn"
    ]
    sns.subscribe(TopicArn=topic_arn, Protocol="sqs", Endpoint=queue_arn)

    vpc_id = ec2.create_vpc(CidrBlock="10.0.0.0/16")["Vpc"]["VpcId"]
    subnets = [
        ec2.create_subnet(VpcId=vpc_id, CidrBlock=f"10.0.{i}.0/24", AvailabilityZone=f"{REGION}{az}")[
            "Subnet"
        ]["SubnetId"]
        for i, az in enumerate("abc")
    ]
    faults.zones.update({subnet: f"{REGION}{az}" for subnet, az in zip(subnets, "abc", strict=True)})
    template = ec2.create_launch_template(
        LaunchTemplateName="trainctl",
        LaunchTemplateData={"ImageId": "ami-12345678", "InstanceType": "m5.large"},
    )["LaunchTemplate"]

    role_arn = iam.create_role(RoleName="trainctl-resume", AssumeRolePolicyDocument="{}")["Role"]["Arn"]
    definition = render(
        load_resume_definition(),
        substitutions(
            jobs_table_name=table,
            alerts_topic_arn=topic_arn,
            launch_template_id=template["LaunchTemplateId"],
            launch_template_version=str(template["LatestVersionNumber"]),
            tuning=TEST_TUNING,
        ),
    )
    state_machine_arn = sfn.create_state_machine(
        name="trainctl-resume", definition=definition, roleArn=role_arn
    )["stateMachineArn"]
    return Cloud(
        ddb=ddb,
        ec2=ec2,
        sfn=sfn,
        sqs=sqs,
        table=table,
        topic_arn=topic_arn,
        queue_url=queue_url,
        subnets=subnets,
        launch_template_id=template["LaunchTemplateId"],
        state_machine_arn=state_machine_arn,
        definition=definition,
        faults=faults,
        table_faults=table_faults,
    )


def utc(seconds_from_now: float = 0) -> datetime:
    return datetime.now(UTC) + timedelta(seconds=seconds_from_now)
