"""A moto-backed trainctl stack for the CLI: real resources, a CloudFormation stack whose
outputs name them, and the resume workflow rendered from the deployed ASL.

moto's CloudFormation cannot create the synthesized template (DESIGN §5), so the
resources are created through each service's API and a small stack carries only the
outputs the CLI reads (`describe_stacks`), under the names infra/stack.py defines.
"""

from __future__ import annotations

import contextlib
import importlib
import json
import os
import sys
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any

os.environ.setdefault("MOTO_EC2_LOAD_DEFAULT_AMIS", "false")

import boto3
import pytest
from moto import mock_aws
from moto.core import DEFAULT_ACCOUNT_ID as ACCOUNT_ID
from moto.ec2.models import ec2_backends
from moto.ec2.responses.spot_instances import SpotInstances
from moto.stepfunctions.parser.asl.component.state.choice.comparison.operator.implementations.is_operator import (  # noqa: E501
    IsTimestamp,
)
from typer.testing import CliRunner

from infra.workflows.render import WorkflowTuning, load_resume_definition, render, substitutions
from trainctl.cli import app
from trainctl.commands import stack as stack_mod
from trainctl.commands.output import Deps
from trainctl_core import clients, jobs, settings
from trainctl_core.jobs import CapacityPool, CheckpointRef, Job, JobSpec
from trainctl_core.store import JobStore
from trainctl_core.tables import idempotency_table_request, jobs_table_request

REGION = "us-east-1"
STACK = "Trainctl"
IDEMPOTENCY_TABLE = "trainctl-idempotency"
CHECKPOINT_DOCUMENT = "trainctl-checkpoint"
ALLOWED_TYPES = ["m5.large", "c5.xlarge", "g5.xlarge"]

# Spot price history the patched moto EC2 returns: (type, zone) -> [(RFC 3339, USD/h)].
SPOT_PRICES: dict[tuple[str, str], list[tuple[str, str]]] = {}


def _describe_spot_price_history(self: Any) -> Any:
    """moto answers a constant price from 2006; answer what the test configured instead."""
    from moto.core.responses import ActionResult

    types = self._get_param("InstanceTypes", [])
    zone = self._get_param("AvailabilityZone")
    history = [
        {
            "InstanceType": instance_type,
            "ProductDescription": "Linux/UNIX",
            "SpotPrice": price,
            "AvailabilityZone": az,
            "Timestamp": at,
        }
        for (instance_type, az), points in SPOT_PRICES.items()
        if (not types or instance_type in types) and (not zone or az == zone)
        for at, price in points
    ]
    return ActionResult({"SpotPriceHistory": history})


@dataclass
class Stack:
    ddb: Any
    ec2: Any
    sfn: Any
    logs: Any
    ecr: Any
    fis: Any
    table: str
    subnets: list[str]
    zones: dict[str, str]
    launch_template_id: str
    state_machine_arn: str
    repository_uri: str
    fis_template_id: str
    outputs: dict[str, str] = field(default_factory=dict)
    # The patched spot price history, (type, zone) -> [(RFC 3339, USD/h)]. Reached through
    # the fixture because test modules may import this file as a second module object.
    spot_prices: dict[tuple[str, str], list[tuple[str, str]]] = field(default_factory=lambda: SPOT_PRICES)

    @property
    def store(self) -> JobStore:
        return JobStore(self.ddb, self.table)

    def pools(self, *types: str) -> list[CapacityPool]:
        return [
            CapacityPool(instance_type=t, subnet_id=self.subnets[i % len(self.subnets)])
            for i, t in enumerate(types)
        ]

    def new_job(
        self, pools: list[CapacityPool] | None = None, now: datetime | None = None, **spec: Any
    ) -> Job:
        job_id = f"job-{uuid.uuid4().hex[:10]}"
        job_spec = JobSpec(
            name=job_id, command=["python", "train.py"], pools=pools or self.pools("m5.large"), **spec
        )
        return self.store.create(jobs.new_job(job_id, job_spec, now))

    def launch(self, job_id: str, attempt: int, pool: CapacityPool, *, spot: bool = True) -> str:
        kwargs: dict[str, Any] = {}
        if spot:
            kwargs["InstanceMarketOptions"] = {"MarketType": "spot"}
        response = self.ec2.run_instances(
            ImageId="ami-12345678",
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
            **kwargs,
        )
        return str(response["Instances"][0]["InstanceId"])

    def start_attempt(self, job: Job, pool: CapacityPool, now: datetime, *, spot: bool = True) -> Job:
        """PENDING/INTERRUPTED -> LAUNCHING -> RUNNING on a fresh (moto) instance at `now`."""
        attempt = 0 if job.status == jobs.JobStatus.PENDING else job.attempt + 1
        instance_id = self.launch(job.job_id, attempt, pool, spot=spot)
        kind = "none" if job.last_checkpoint is None else "final"
        point = jobs.ResumePoint(kind=kind, step=job.last_checkpoint.step if job.last_checkpoint else None)
        job = self.store.apply(
            jobs.mark_launching(job, instance_id=instance_id, pool=pool.label, resume_point=point, now=now)
        )
        return self.store.apply(jobs.mark_running(job, instance_id=instance_id, now=now))

    def checkpoint(self, job: Job, step: int, at: datetime, *, final: bool) -> Job:
        assert job.instance_id is not None
        ref = CheckpointRef(
            step=step, prefix=f"{job.job_id}/ckpt/{step}/", attempt=job.attempt, created_at=at
        )
        self.store.record_checkpoint(
            job.job_id, instance_id=job.instance_id, attempt=job.attempt, checkpoint=ref, final=final
        )
        return self.store.get(job.job_id)

    def interrupt(self, job: Job, at: datetime, notice: float = 120) -> Job:
        assert job.instance_id is not None
        return self.store.apply(
            jobs.mark_interrupted(
                job,
                instance_id=job.instance_id,
                reason=jobs.InterruptionReason.SPOT_WARNING,
                now=at,
                deadline=at + timedelta(seconds=notice),
            )
        )

    def retire(self, instance_id: str, at: datetime) -> None:
        """Terminate an instance as of `at`: EC2's StateTransitionReason, in AWS's words."""
        self.ec2.terminate_instances(InstanceIds=[instance_id])
        instance = ec2_backends[ACCOUNT_ID][REGION].get_instance(instance_id)
        # moto stamps the real clock (and writes "UTC"); AWS writes "GMT".
        instance._reason = f"User initiated ({at.astimezone(UTC):%Y-%m-%d %H:%M:%S} GMT)"

    def put_logs(self, stream: str, *messages: str, at: float) -> None:
        """Agent log events in the stack's agent log group, `at` seconds since the epoch."""
        group = stack_mod.default_agent_log_group(STACK)
        with contextlib.suppress(self.logs.exceptions.ResourceAlreadyExistsException):
            self.logs.create_log_stream(logGroupName=group, logStreamName=stream)
        self.logs.put_log_events(
            logGroupName=group,
            logStreamName=stream,
            logEvents=[{"timestamp": int(at * 1000) + i, "message": m} for i, m in enumerate(messages)],
        )

    def wait_execution(self, name: str, timeout: float = 30.0) -> dict[str, Any]:
        arn = self.state_machine_arn.replace(":stateMachine:", ":execution:") + f":{name}"
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            described = self.sfn.describe_execution(executionArn=arn)
            if described["status"] != "RUNNING":
                return dict(described)
            time.sleep(0.05)
        raise AssertionError(f"execution {name} still running after {timeout}s")

    def instance_states(self, job_id: str) -> dict[str, str]:
        reservations = self.ec2.describe_instances(
            Filters=[{"Name": "tag:trainctl:job-id", "Values": [job_id]}]
        )
        return {
            i["InstanceId"]: i["State"]["Name"] for r in reservations["Reservations"] for i in r["Instances"]
        }


def _parse_rfc3339(value: str) -> datetime | None:
    try:
        return datetime.fromisoformat(value.replace("Z", "+00:00"))
    except (TypeError, ValueError):
        return None


@pytest.fixture(scope="module")
def stack() -> Iterator[Stack]:
    original_prices = SpotInstances.describe_spot_price_history
    SpotInstances.describe_spot_price_history = _describe_spot_price_history  # type: ignore[method-assign]
    # As in tests/workflow: teach moto RFC 3339 timestamps in Choice comparisons.
    original_parse = IsTimestamp.string_to_timestamp
    IsTimestamp.string_to_timestamp = staticmethod(_parse_rfc3339)  # type: ignore[assignment]
    try:
        with mock_aws(config={"stepfunctions": {"execute_state_machine": True}}):
            yield _build_stack()
    finally:
        SpotInstances.describe_spot_price_history = original_prices  # type: ignore[method-assign]
        IsTimestamp.string_to_timestamp = original_parse  # type: ignore[method-assign]
        SPOT_PRICES.clear()


def _build_stack() -> Stack:
    client = lambda name: boto3.client(name, region_name=REGION)  # noqa: E731
    ddb, ec2, sfn, iam, sns, ssm = (
        client(n) for n in ("dynamodb", "ec2", "stepfunctions", "iam", "sns", "ssm")
    )
    logs, ecr, fis, cfn = (client(n) for n in ("logs", "ecr", "fis", "cloudformation"))
    table = "trainctl-jobs"
    ddb.create_table(**jobs_table_request(table))
    # The handlers' idempotency table: tests run the real interruption handler against
    # this stack (the CLI itself never touches it).
    ddb.create_table(**idempotency_table_request(IDEMPOTENCY_TABLE))
    vpc_id = ec2.create_vpc(CidrBlock="10.0.0.0/16")["Vpc"]["VpcId"]
    zones = {}
    for i, az in enumerate("ab"):
        subnet = ec2.create_subnet(VpcId=vpc_id, CidrBlock=f"10.0.{i}.0/24", AvailabilityZone=f"{REGION}{az}")
        zones[subnet["Subnet"]["SubnetId"]] = f"{REGION}{az}"
    template = ec2.create_launch_template(
        LaunchTemplateName="trainctl",
        LaunchTemplateData={"ImageId": "ami-12345678", "InstanceType": "m5.large"},
    )["LaunchTemplate"]
    topic_arn = sns.create_topic(Name="trainctl-alerts")["TopicArn"]
    role_arn = iam.create_role(RoleName="trainctl-resume", AssumeRolePolicyDocument="{}")["Role"]["Arn"]
    definition = render(
        load_resume_definition(),
        substitutions(
            jobs_table_name=table,
            alerts_topic_arn=topic_arn,
            launch_template_id=template["LaunchTemplateId"],
            launch_template_version=str(template["LatestVersionNumber"]),
            tuning=WorkflowTuning(launch_backoff_seconds=1, launch_rounds=1),
        ),
    )
    state_machine_arn = sfn.create_state_machine(
        name="trainctl-resume", definition=definition, roleArn=role_arn
    )["stateMachineArn"]
    ssm.create_document(
        Name=CHECKPOINT_DOCUMENT,
        DocumentType="Command",
        DocumentFormat="JSON",
        Content=json.dumps(
            {
                "schemaVersion": "2.2",
                "description": "checkpoint now",
                "parameters": {"JobId": {"type": "String"}, "Deadline": {"type": "String"}},
                "mainSteps": [
                    {
                        "action": "aws:runShellScript",
                        "name": "checkpoint",
                        "inputs": {"runCommand": ["trainctl checkpoint-now --job-id {{JobId}}"]},
                    }
                ],
            }
        ),
    )
    repository_uri = ecr.create_repository(repositoryName="trainctl-training")["repository"]["repositoryUri"]
    fis_role = iam.create_role(RoleName="trainctl-fis", AssumeRolePolicyDocument="{}")["Role"]["Arn"]
    fis_template = fis.create_experiment_template(
        clientToken="stack",
        description="trainctl game day",
        stopConditions=[{"source": "none"}],
        targets={
            "TrainctlSpotInstances": {
                "resourceType": "aws:ec2:spot-instance",
                "resourceTags": {"trainctl:managed": "true"},
                "selectionMode": "COUNT(1)",
            }
        },
        actions={
            "InterruptOne": {
                "actionId": "aws:ec2:send-spot-instance-interruptions",
                "parameters": {"durationBeforeInterruption": "PT2M"},
                "targets": {"SpotInstances": "TrainctlSpotInstances"},
            }
        },
        roleArn=fis_role,
    )["experimentTemplate"]["id"]
    logs.create_log_group(logGroupName=stack_mod.default_agent_log_group(STACK))
    outputs = {
        stack_mod.OUTPUT_JOBS_TABLE: table,
        stack_mod.OUTPUT_CHECKPOINT_BUCKET: "trainctl-checkpoints",
        stack_mod.OUTPUT_STATE_MACHINE: state_machine_arn,
        stack_mod.OUTPUT_REPOSITORY_URI: repository_uri,
        stack_mod.OUTPUT_CHECKPOINT_DOCUMENT: CHECKPOINT_DOCUMENT,
        stack_mod.OUTPUT_FIS_TEMPLATE: fis_template,
        stack_mod.OUTPUT_SUBNETS: ",".join(zones),
        stack_mod.OUTPUT_INSTANCE_TYPES: ",".join(ALLOWED_TYPES),
    }
    cfn.create_stack(
        StackName=STACK,
        TemplateBody=json.dumps(
            {
                # moto needs a resource; a parameter is the cheapest one it supports.
                "Resources": {
                    "Marker": {
                        "Type": "AWS::SSM::Parameter",
                        "Properties": {"Name": "/trainctl/cli-test", "Type": "String", "Value": "x"},
                    }
                },
                "Outputs": {name: {"Value": value} for name, value in outputs.items()},
            }
        ),
    )
    return Stack(
        ddb=ddb,
        ec2=ec2,
        sfn=sfn,
        logs=logs,
        ecr=ecr,
        fis=fis,
        table=table,
        subnets=list(zones),
        zones=zones,
        launch_template_id=template["LaunchTemplateId"],
        state_machine_arn=state_machine_arn,
        repository_uri=repository_uri,
        fis_template_id=fis_template,
        outputs=outputs,
    )


@dataclass
class LambdaContext:
    """The attributes Powertools reads from a real Lambda context."""

    function_name: str = "trainctl-interruption"
    memory_limit_in_mb: int = 512
    invoked_function_arn: str = "arn:aws:lambda:us-east-1:123456789012:function:trainctl-interruption"
    aws_request_id: str = "0f6c2b1e-7d7e-4a51-9a47-3d1c2b0e9f11"

    def get_remaining_time_in_millis(self) -> int:
        return 30_000


@pytest.fixture
def interruption_handler(stack: Stack, monkeypatch: pytest.MonkeyPatch) -> Iterator[Any]:
    """The real interruption handler module, wired to this stack as the CDK stack wires it."""
    for name, value in {
        settings.ENV_JOBS_TABLE: stack.table,
        settings.ENV_IDEMPOTENCY_TABLE: IDEMPOTENCY_TABLE,
        settings.ENV_CHECKPOINT_DOCUMENT: CHECKPOINT_DOCUMENT,
        settings.ENV_RESUME_STATE_MACHINE_ARN: stack.state_machine_arn,
    }.items():
        monkeypatch.setenv(name, value)
    settings.get_settings.cache_clear()
    clients.reset()
    # Import anew: the module-scope wiring reads the settings above.
    sys.modules.pop("functions.interruption.handler", None)
    yield importlib.import_module("functions.interruption.handler")
    sys.modules.pop("functions.interruption.handler", None)
    settings.get_settings.cache_clear()
    clients.reset()


@dataclass
class Result:
    exit_code: int
    stdout: str
    stderr: str

    def json(self) -> Any:
        return json.loads(self.stdout)


class Cli:
    """Runs `trainctl ...` in-process with typer's CliRunner and injected collaborators."""

    def __init__(self, deps: Deps) -> None:
        self.deps = deps
        self.sleeps: list[float] = []

    def __call__(self, *args: str, input: str | None = None) -> Result:
        runner = CliRunner()
        # TRAINCTL_DEBUG: a bug raises here instead of becoming a polite exit 1.
        result = runner.invoke(
            app, list(args), obj=self.deps, input=input, env={"COLUMNS": "120", "TRAINCTL_DEBUG": "1"}
        )
        if result.exception is not None and not isinstance(result.exception, SystemExit):
            raise result.exception
        return Result(result.exit_code, result.stdout, result.stderr)


@pytest.fixture
def cli() -> Cli:
    holder: Cli
    deps = Deps(sleep=lambda s: holder.sleeps.append(s))
    holder = Cli(deps)
    return holder


def utc(**delta: float) -> datetime:
    return datetime.now(UTC) + timedelta(**delta)
