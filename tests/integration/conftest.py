"""Handlers against moto: real event JSON in, AWS state out."""

from __future__ import annotations

import importlib
import sys
import threading
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any

import boto3
import pytest
from moto import mock_aws

from trainctl_core import clients, jobs, settings
from trainctl_core.store import JobStore
from trainctl_core.tables import idempotency_table_request, jobs_table_request

INSTANCE = "i-1234567890abcdef0"
JOB_ID = "llama-finetune"
POOLS = [
    {"instance_type": "g5.xlarge", "subnet_id": "subnet-0aaa1111"},
    {"instance_type": "g5.xlarge", "subnet_id": "subnet-0bbb2222"},
]


@dataclass
class LambdaContext:
    """The attributes Powertools reads from a real Lambda context."""

    function_name: str = "trainctl-handler"
    memory_limit_in_mb: int = 256
    invoked_function_arn: str = "arn:aws:lambda:us-east-1:123456789012:function:trainctl-handler"
    aws_request_id: str = "52fdfc07-2182-154f-163f-5f0f9a621d72"

    def get_remaining_time_in_millis(self) -> int:
        return 30_000


@dataclass
class Env:
    """The moto-backed resources a handler sees, plus helpers to inspect them."""

    ddb: Any
    ssm: Any
    sfn: Any
    store: JobStore
    state_machine_arn: str
    instance_id: str = INSTANCE
    job_id: str = JOB_ID

    def add_job(
        self,
        job_id: str = JOB_ID,
        *,
        instance_id: str | None = INSTANCE,
        status: jobs.JobStatus = jobs.JobStatus.RUNNING,
        on_rebalance: str = "checkpoint",
    ) -> jobs.Job:
        spec = jobs.JobSpec(
            name=job_id,
            command=["python", "train.py"],
            pools=[jobs.CapacityPool(**p) for p in POOLS],
            on_rebalance=on_rebalance,  # type: ignore[arg-type]
        )
        job = self.store.create(jobs.new_job(job_id, spec))
        if status == jobs.JobStatus.PENDING:
            return job
        now = jobs.utcnow()
        job = self.store.apply(
            jobs.mark_launching(
                job,
                instance_id=instance_id or INSTANCE,
                pool=jobs.CapacityPool(**POOLS[0]).label,
                resume_point=jobs.ResumePoint(kind=jobs.CheckpointKind.NONE),
                now=now,
            )
        )
        if status == jobs.JobStatus.LAUNCHING:
            return job
        job = self.store.apply(jobs.mark_running(job, instance_id=job.instance_id or "", now=now))
        if status == jobs.JobStatus.RUNNING:
            return job
        if status == jobs.JobStatus.SUCCEEDED:
            return self.store.apply(jobs.mark_succeeded(job, instance_id=job.instance_id or "", now=now))
        if status == jobs.JobStatus.CANCELLED:
            return self.store.apply(jobs.mark_cancelled(job, now=now))
        if status == jobs.JobStatus.FAILED:
            return self.store.apply(jobs.mark_failed(job, reason="test", now=now))
        raise ValueError(status)

    def ssm_commands(self) -> list[dict[str, Any]]:
        return self.ssm.list_commands()["Commands"]

    def executions(self) -> list[dict[str, Any]]:
        return self.sfn.list_executions(stateMachineArn=self.state_machine_arn)["executions"]

    def execution_input(self, name: str) -> dict[str, Any]:
        import json

        arn = self.state_machine_arn.replace(":stateMachine:", ":execution:") + f":{name}"
        return json.loads(self.sfn.describe_execution(executionArn=arn)["input"])


def create_tables(ddb: Any, jobs_table: str, idempotency_table: str) -> None:
    ddb.create_table(**jobs_table_request(jobs_table))
    ddb.create_table(**idempotency_table_request(idempotency_table))


@pytest.fixture
def env(monkeypatch: pytest.MonkeyPatch) -> Iterator[Env]:
    with mock_aws():
        clients.reset()
        ddb = boto3.client("dynamodb")
        ssm = boto3.client("ssm")
        sfn = boto3.client("stepfunctions")
        create_tables(ddb, "trainctl-jobs", "trainctl-idempotency")
        ssm.create_document(
            Name="trainctl-checkpoint",
            DocumentType="Command",
            DocumentFormat="JSON",
            Content='{"schemaVersion": "2.2", "description": "checkpoint now", "parameters": '
            '{"JobId": {"type": "String"}, "Deadline": {"type": "String"}, '
            '"Mode": {"type": "String", "allowedValues": ["stop", "continue"], "default": "stop"}}, '
            '"mainSteps": [{"action": "aws:runShellScript", "name": "checkpoint", "inputs": {"runCommand": '
            '["trainctl checkpoint-now --job-id {{JobId}} --deadline {{Deadline}} --mode {{Mode}}"]}}]}',
        )
        # The handlers only start executions; the workflow's own behaviour is executed
        # from the deployed ASL in tests/workflow.
        arn = sfn.create_state_machine(
            name="trainctl-resume",
            definition='{"StartAt": "Done", "States": {"Done": {"Type": "Succeed"}}}',
            roleArn="arn:aws:iam::123456789012:role/sfn",
        )["stateMachineArn"]
        for name, value in {
            settings.ENV_JOBS_TABLE: "trainctl-jobs",
            settings.ENV_IDEMPOTENCY_TABLE: "trainctl-idempotency",
            settings.ENV_CHECKPOINT_DOCUMENT: "trainctl-checkpoint",
            settings.ENV_RESUME_STATE_MACHINE_ARN: arn,
        }.items():
            monkeypatch.setenv(name, value)
        settings.get_settings.cache_clear()
        yield Env(ddb, ssm, sfn, JobStore(ddb, "trainctl-jobs"), arn)
        settings.get_settings.cache_clear()
        clients.reset()


def fresh_module(name: str) -> Any:
    """Import a handler module anew: its module-scope wiring reads the current settings."""
    sys.modules.pop(name, None)
    return importlib.import_module(name)


@pytest.fixture
def interruption(env: Env) -> Any:
    return fresh_module("functions.interruption.handler")


@pytest.fixture
def instance_state(env: Env) -> Any:
    return fresh_module("functions.instance_state.handler")


@pytest.fixture
def context() -> LambdaContext:
    return LambdaContext()


@pytest.fixture
def serialized_moto(monkeypatch: pytest.MonkeyPatch) -> None:
    """moto's conditional writes are not atomic across threads (DESIGN §5): serialise its
    request dispatch so concurrency tests exercise our logic, not moto's races."""
    from moto.core.botocore_stubber import BotocoreStubber

    lock = threading.RLock()
    original = BotocoreStubber.__call__

    def locked(self: Any, *args: Any, **kwargs: Any) -> Any:
        with lock:
            return original(self, *args, **kwargs)

    monkeypatch.setattr(BotocoreStubber, "__call__", locked)


def iso(moment: datetime) -> str:
    return moment.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def recent(seconds_ago: int = 0) -> str:
    return iso(datetime.now(UTC) - timedelta(seconds=seconds_ago))
