"""The agent end to end, offline: moto DynamoDB + Step Functions, a fake IMDSv2 on
127.0.0.1, and a real training child process (local checkpoint directory)."""

from __future__ import annotations

import json
import os
import sys
import threading
import time
from collections.abc import Callable, Iterator
from datetime import timedelta
from typing import Any

import boto3
import pytest
from moto import mock_aws

from trainctl.agent import cli
from trainctl.agent.fake_imds import FakeImds
from trainctl.agent.imds import ImdsClient
from trainctl.agent.supervisor import EXIT_STOOD_DOWN, Agent, AgentConfig
from trainctl_core import checkpoints as ck
from trainctl_core import jobs, settings
from trainctl_core.store import JobStore, job_key
from trainctl_core.workflow import Handshake

from .conftest import REGION

JOB = "agent-job"
INSTANCE = "i-0aaaaaaaaaaaaaaa1"
TABLE = "trainctl-jobs"
TRAIN = os.path.join(os.path.dirname(__file__), "..", "..", "training", "examples", "train.py")

# The handshake half of the resume workflow, as in infra/workflows/resume.asl.json:
# store the token unless this attempt's final checkpoint is already on the row.
HANDSHAKE_ASL = {
    "StartAt": "AwaitCheckpoint",
    "States": {
        "AwaitCheckpoint": {
            "Type": "Task",
            "Resource": "arn:aws:states:::aws-sdk:dynamodb:updateItem.waitForTaskToken",
            "Parameters": {
                "TableName": TABLE,
                "Key": {"pk": {"S.$": "States.Format('JOB#{}', $.job_id)"}},
                "UpdateExpression": "SET #token = :token, #token_attempt = :attempt",
                "ConditionExpression": "attribute_not_exists(#final) OR #final.#attempt <> :attempt",
                "ExpressionAttributeNames": {
                    "#token": "task_token",
                    "#token_attempt": "task_token_attempt",
                    "#final": "final_checkpoint",
                    "#attempt": "attempt",
                },
                "ExpressionAttributeValues": {
                    ":token": {"S.$": "$$.Task.Token"},
                    ":attempt": {"N.$": "$.attempt"},
                },
            },
            "TimeoutSeconds": 60,
            "End": True,
        }
    },
}


class World:
    def __init__(self, tmp: Any) -> None:
        self.tmp = tmp
        self.ddb = boto3.client("dynamodb", region_name=REGION)
        self.sfn = boto3.client("stepfunctions", region_name=REGION)
        self.ddb.create_table(
            TableName=TABLE,
            BillingMode="PAY_PER_REQUEST",
            AttributeDefinitions=[
                {"AttributeName": settings.JOBS_PARTITION_KEY, "AttributeType": "S"},
                {"AttributeName": settings.JOBS_INSTANCE_ATTRIBUTE, "AttributeType": "S"},
            ],
            KeySchema=[{"AttributeName": settings.JOBS_PARTITION_KEY, "KeyType": "HASH"}],
            GlobalSecondaryIndexes=[
                {
                    "IndexName": settings.JOBS_BY_INSTANCE_INDEX,
                    "KeySchema": [{"AttributeName": settings.JOBS_INSTANCE_ATTRIBUTE, "KeyType": "HASH"}],
                    "Projection": {"ProjectionType": "KEYS_ONLY"},
                }
            ],
        )
        self.store = JobStore(self.ddb, TABLE)
        self.ckpt_dir = str(tmp / "checkpoints")

    def add_job(self, *, launch: bool = True, resume: jobs.ResumePoint | None = None) -> jobs.Job:
        spec = jobs.JobSpec(
            name=JOB,
            command=["python", "train.py"],
            pools=[jobs.CapacityPool(instance_type="c7i.large", subnet_id="subnet-0aaa1111")],
        )
        job = self.store.create(jobs.new_job(JOB, spec))
        if launch:
            job = self.launch(job, INSTANCE, resume)
        return job

    def launch(self, job: jobs.Job, instance: str, resume: jobs.ResumePoint | None = None) -> jobs.Job:
        point = resume or jobs.ResumePoint(kind=jobs.CheckpointKind.NONE)
        return self.store.apply(
            jobs.mark_launching(job, instance_id=instance, pool=None, resume_point=point, now=jobs.utcnow())
        )

    def agent(
        self, command: list[str], *, imds: ImdsClient | None = None, instance: str = INSTANCE, **config: Any
    ) -> Agent:
        cfg = AgentConfig(
            job_id=JOB,
            instance_id=instance,
            command=command,
            socket_path=str(self.tmp / f"agent-{instance}.sock"),
            child_env={"TRAINCTL_CHECKPOINT_DIR": self.ckpt_dir, "PYTHONUNBUFFERED": "1"},
            imds_poll_seconds=0.2,
            heartbeat_seconds=0.5,
            resume_poll_seconds=0.1,
            **config,
        )
        return Agent(cfg, self.store, handshake=Handshake(self.sfn), imds=imds)


@pytest.fixture
def world(tmp_path: Any) -> Iterator[World]:
    with mock_aws(config={"stepfunctions": {"execute_state_machine": True}}):
        yield World(tmp_path)


def _run(agent: Agent) -> tuple[threading.Thread, dict[str, int]]:
    result: dict[str, int] = {}
    thread = threading.Thread(target=lambda: result.setdefault("rc", agent.run()), daemon=True)
    thread.start()
    return thread, result


def _until(predicate: Callable[[], Any], timeout: float = 30.0, what: str = "condition") -> Any:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(0.1)
    raise AssertionError(f"timed out waiting for {what}")


def _train(tmp: Any, steps: int = 100_000, step_seconds: float = 0.01) -> list[str]:
    return [
        sys.executable,
        TRAIN,
        "--steps",
        str(steps),
        "--step-seconds",
        str(step_seconds),
        "--checkpoint-every",
        "20",
        "--output",
        str(tmp / "final.bin"),
    ]


def test_imds_notice_checkpoints_and_completes_a_waiting_execution(world: World, tmp_path: Any) -> None:
    # Given a running job whose resume workflow waits on the handshake
    world.add_job()
    machine = world.sfn.create_state_machine(
        name="handshake", definition=json.dumps(HANDSHAKE_ASL), roleArn="arn:aws:iam::123456789012:role/sfn"
    )["stateMachineArn"]
    with FakeImds(INSTANCE) as fake:
        agent = world.agent(_train(tmp_path), imds=ImdsClient(fake.url))
        thread, result = _run(agent)
        _until(lambda: world.store.get(JOB).status == jobs.JobStatus.RUNNING, what="RUNNING")
        _until(lambda: agent.last_checkpoint is not None, what="a periodic checkpoint")
        execution = world.sfn.start_execution(
            stateMachineArn=machine, name=f"{JOB}-0", input=json.dumps({"job_id": JOB, "attempt": "0"})
        )["executionArn"]
        _until(lambda: world.store.raw(JOB).get("task_token"), what="the token on the row")
        # When the Spot notice appears in IMDS
        fake.notice(jobs.utcnow() + timedelta(minutes=2))
        thread.join(60)
    # Then the child checkpointed, stopped, and the agent exited cleanly
    assert result == {"rc": 0}
    final = world.store.get(JOB).final_checkpoint
    assert final is not None and final.attempt == 0
    storage = ck.LocalCheckpointStorage(world.ckpt_dir, JOB)
    assert not isinstance(
        ck.verify_checkpoint(storage, final.step, job_id=JOB, dest_dir=str(tmp_path / "v")), str
    )
    # And the waiting execution completed with that checkpoint
    described = _until(
        lambda: (d := world.sfn.describe_execution(executionArn=execution))["status"] != "RUNNING" and d,
        what="the execution to finish",
    )
    assert described["status"] == "SUCCEEDED"
    assert json.loads(described["output"])["checkpoint"] == {
        "step": final.step,
        "prefix": final.prefix,
        "attempt": 0,
        "created_at": jobs.format_time(final.created_at),
    }
    assert agent.handshake_completed
    assert world.store.get(JOB).status == jobs.JobStatus.RUNNING  # the workflow owns what comes next
    row = world.store.raw(JOB)
    assert 0 < row["heartbeat_step"] <= final.step  # heartbeats reached the row


def test_ssm_checkpoint_now_without_imds_then_replacement_resumes(world: World, tmp_path: Any) -> None:
    # Given an agent that is not on EC2 (IMDS unreachable)
    job = world.add_job()
    agent = world.agent(_train(tmp_path, steps=100_000), imds=ImdsClient("http://127.0.0.1:9", timeout=0.2))
    thread, result = _run(agent)
    _until(lambda: agent.last_checkpoint is not None, what="a periodic checkpoint")
    # When the SSM document runs `trainctl checkpoint-now`
    rc = cli.checkpoint_now_main(["--job-id", JOB, "--socket", agent.config.socket_path, "--timeout", "60"])
    # Then it returns 0 only once the final checkpoint is durable and on the row
    assert rc == 0
    final = world.store.get(JOB).final_checkpoint
    assert final is not None
    assert ck.LocalCheckpointStorage(world.ckpt_dir, JOB).read_manifest(final.step) is not None
    thread.join(30)
    assert result == {"rc": 0}
    # When the workflow records a replacement resuming from that checkpoint
    job = world.store.get(JOB)
    job = world.store.apply(
        jobs.mark_interrupted(
            job, instance_id=INSTANCE, reason=jobs.InterruptionReason.SPOT_WARNING, now=jobs.utcnow()
        )
    )
    replacement = world.agent(
        _train(tmp_path, steps=final.step + 5, step_seconds=0),
        instance="i-0bbbbbbbbbbbbbbb2",
        imds=None,
        shutdown_command=["true"],
    )
    thread2, result2 = _run(replacement)
    time.sleep(0.5)
    assert world.store.get(JOB).status == jobs.JobStatus.INTERRUPTED  # it waits for the row
    world.launch(
        job,
        "i-0bbbbbbbbbbbbbbb2",
        jobs.ResumePoint(kind=jobs.CheckpointKind.FINAL, step=final.step, prefix=final.prefix),
    )
    thread2.join(60)
    # Then it resumed at the final checkpoint, finished, and the job SUCCEEDED
    assert result2 == {"rc": 0}
    assert world.store.get(JOB).status == jobs.JobStatus.SUCCEEDED
    assert any(f"resumed at step {final.step}" in line for line in replacement.log_tail)


def test_exit_zero_succeeds_and_shuts_down(world: World, tmp_path: Any) -> None:
    world.add_job()
    marker = tmp_path / "shutdown-called"
    agent = world.agent([sys.executable, "-c", "print('hi')"], shutdown_command=["touch", str(marker)])
    assert agent.run() == 0
    assert world.store.get(JOB).status == jobs.JobStatus.SUCCEEDED and marker.exists()


def test_user_bug_fails_with_exit_code_and_log_tail(world: World) -> None:
    world.add_job()
    script = "import sys; print('loading data'); print('ValueError: bad shape', file=sys.stderr); sys.exit(3)"
    agent = world.agent([sys.executable, "-c", script], shutdown_command=["false"])
    assert agent.run() == 3
    job = world.store.get(JOB)
    assert job.status == jobs.JobStatus.FAILED
    assert (
        job.failure_reason
        and "code 3" in job.failure_reason
        and "ValueError: bad shape" in job.failure_reason
    )


def test_superseded_agent_stops_its_child_and_stands_down(world: World, tmp_path: Any) -> None:
    world.add_job()
    agent = world.agent(_train(tmp_path))
    thread, result = _run(agent)
    _until(lambda: agent.last_checkpoint is not None, what="a periodic checkpoint")
    # When the job moves on to another instance (e.g. this one was stopped and came back)
    job = world.store.get(JOB)
    job = world.store.apply(
        jobs.mark_interrupted(
            job, instance_id=INSTANCE, reason=jobs.InterruptionReason.SPOT_WARNING, now=jobs.utcnow()
        )
    )
    world.launch(job, "i-0ccccccccccccccc3")
    thread.join(30)
    # Then its next fenced write fails, it stops training and stands down
    assert result == {"rc": EXIT_STOOD_DOWN}
    assert agent.child is not None and agent.child.poll() is not None
    assert world.store.get(JOB).instance_id == "i-0ccccccccccccccc3"


def test_an_older_checkpoint_losing_the_step_race_does_not_stop_training(world: World, tmp_path: Any) -> None:
    # Given a running job whose row already names a newer checkpoint of this same attempt
    job = world.add_job()
    agent = world.agent(_train(tmp_path, steps=200))
    thread, result = _run(agent)
    _until(lambda: agent.last_checkpoint is not None, what="a periodic checkpoint")
    newer = jobs.CheckpointRef(
        step=10**6, prefix="s3://b/j/ckpt/future/", attempt=job.attempt, created_at=jobs.utcnow()
    )
    world.store.record_checkpoint(
        JOB, instance_id=INSTANCE, attempt=job.attempt, checkpoint=newer, final=False
    )
    # When its next (older) checkpoint is refused by "the step never goes back"
    thread.join(120)
    # Then the agent did not mistake that for being superseded: training ran to the end
    assert result == {"rc": 0}
    assert world.store.get(JOB).status is jobs.JobStatus.SUCCEEDED


def test_checkpoint_now_fails_clearly_without_an_agent(tmp_path: Any, capsys: Any) -> None:
    rc = cli.checkpoint_now_main(["--job-id", JOB, "--socket", str(tmp_path / "none.sock"), "--timeout", "1"])
    assert rc == cli.EXIT_CHECKPOINT_FAILED
    assert "unreachable" in capsys.readouterr().err


# --- `trainctl agent` without a command: the job row's (what the instance bootstrap runs) --


def _job_with_command(world: World, command: list[str]) -> jobs.Job:
    spec = jobs.JobSpec(
        name=JOB,
        command=command,
        pools=[jobs.CapacityPool(instance_type="c7i.large", subnet_id="subnet-0aaa1111")],
    )
    return world.launch(world.store.create(jobs.new_job(JOB, spec)), INSTANCE)


def _writes(marker: Any) -> list[str]:
    return [sys.executable, "-c", f"open({str(marker)!r}, 'w').write('ran')"]


def _agent_argv(tmp_path: Any, *extra: str) -> list[str]:
    return [
        "--table",
        TABLE,
        "--region",
        REGION,
        "--socket",
        str(tmp_path / "cli-agent.sock"),
        "--shutdown-command",
        "",
        "--imds-poll-seconds",
        "0.2",
        "--heartbeat-seconds",
        "0.5",
        *extra,
    ]


def test_agent_without_command_runs_the_job_rows_command_with_job_id_from_imds_tag(
    world: World, tmp_path: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Given a launched job whose row holds the command, and an instance tagged with its id
    marker = tmp_path / "from-row"
    _job_with_command(world, _writes(marker))
    for name in (cli.env.JOB_ID, cli.env.INSTANCE_ID):
        monkeypatch.delenv(name, raising=False)
    with FakeImds(INSTANCE, tags={settings.TAG_JOB_ID: JOB}) as fake:
        monkeypatch.setenv("AWS_EC2_METADATA_SERVICE_ENDPOINT", fake.url)
        # When the bootstrap starts `trainctl agent` with no command after `--`
        rc = cli.agent_main(_agent_argv(tmp_path))
    # Then the row's command ran under the agent and the job succeeded
    assert rc == 0
    assert marker.read_text() == "ran"
    job = world.store.get(JOB)
    assert job.status == jobs.JobStatus.SUCCEEDED and job.instance_id == INSTANCE


def test_explicit_command_after_dashes_wins_over_the_job_row(world: World, tmp_path: Any) -> None:
    from_row, explicit = tmp_path / "from-row", tmp_path / "explicit"
    _job_with_command(world, _writes(from_row))
    argv = _agent_argv(
        tmp_path, "--no-imds", "--job-id", JOB, "--instance-id", INSTANCE, "--", *_writes(explicit)
    )
    assert cli.agent_main(argv) == 0
    assert explicit.read_text() == "ran" and not from_row.exists()
    assert world.store.get(JOB).status == jobs.JobStatus.SUCCEEDED


def test_agent_without_command_refuses_an_unknown_job(world: World, tmp_path: Any, capsys: Any) -> None:
    argv = _agent_argv(tmp_path, "--no-imds", "--job-id", "no-such-job", "--instance-id", INSTANCE)
    assert cli.agent_main(argv) == 64
    err = capsys.readouterr().err
    assert "job no-such-job not found" in err and TABLE in err


def test_agent_without_command_refuses_a_row_without_a_command(
    world: World, tmp_path: Any, capsys: Any
) -> None:
    # Given a row whose spec lost its command (written by hand or by an older client)
    _job_with_command(world, ["true"])
    world.ddb.update_item(
        TableName=TABLE,
        Key=job_key(JOB),
        UpdateExpression="REMOVE #spec.#command",
        ExpressionAttributeNames={"#spec": "spec", "#command": "command"},
    )
    argv = _agent_argv(tmp_path, "--no-imds", "--job-id", JOB, "--instance-id", INSTANCE)
    # Then the agent refuses with a usage error naming the missing field, and runs nothing
    assert cli.agent_main(argv) == 64
    err = capsys.readouterr().err
    assert f"job {JOB}" in err and "spec.command" in err
    assert world.store.raw(JOB)["status"] == jobs.JobStatus.LAUNCHING.value


def test_agent_without_command_or_job_id_names_what_is_missing(tmp_path: Any, capsys: Any) -> None:
    argv = _agent_argv(tmp_path, "--no-imds", "--instance-id", INSTANCE)
    assert cli.agent_main(argv) == 64
    assert "--job-id" in capsys.readouterr().err
