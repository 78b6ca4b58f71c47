"""The agent end to end, offline: moto DynamoDB + Step Functions, a fake IMDSv2 on
127.0.0.1, and a real training child process (local checkpoint directory)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
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
from trainctl.agent.supervisor import (
    EXIT_NO_RESUME_POINT,
    EXIT_STOOD_DOWN,
    Agent,
    AgentConfig,
    _Notice,
    failure_reason,
)
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
        self,
        command: list[str],
        *,
        imds: ImdsClient | None = None,
        instance: str = INSTANCE,
        logs: Any = None,
        **config: Any,
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
        return Agent(cfg, self.store, handshake=Handshake(self.sfn), imds=imds, logs=logs)


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


def _id(ref: jobs.CheckpointRef) -> ck.CheckpointId:
    return ck.CheckpointId(ref.step, ref.attempt)


def _train(tmp: Any, steps: int = 100_000, step_seconds: float = 0.01, every: int = 20) -> list[str]:
    return [
        sys.executable,
        TRAIN,
        "--steps",
        str(steps),
        "--step-seconds",
        str(step_seconds),
        "--checkpoint-every",
        str(every),
        "--output",
        str(tmp / "final.bin"),
    ]


def test_imds_notice_checkpoints_and_completes_a_waiting_execution(world: World, tmp_path: Any) -> None:
    # Given a running job whose resume workflow waits on the handshake
    world.add_job()
    machine = world.sfn.create_state_machine(
        name="handshake", definition=json.dumps(HANDSHAKE_ASL), roleArn="arn:aws:iam::123456789012:role/sfn"
    )["stateMachineArn"]
    marker = tmp_path / "shutdown-called"
    with FakeImds(INSTANCE) as fake:
        agent = world.agent(
            _train(tmp_path), imds=ImdsClient(fake.url), shutdown_command=["touch", str(marker)]
        )
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
    assert final.prefix == ck.checkpoint_prefix(JOB, ck.CheckpointId(final.step, 0))
    outcome = ck.verify_checkpoint(storage, _id(final), job_id=JOB, dest_dir=str(tmp_path / "v"))
    assert not isinstance(outcome, str)
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
    assert not marker.exists()  # the instance is being reclaimed: not the agent's to shut down
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
    assert ck.LocalCheckpointStorage(world.ckpt_dir, JOB).read_manifest(_id(final)) is not None
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


def test_user_bug_fails_with_exit_code_and_log_tail_and_shuts_down(world: World, tmp_path: Any) -> None:
    world.add_job()
    marker = tmp_path / "shutdown-called"
    script = "import sys; print('loading data'); print('ValueError: bad shape', file=sys.stderr); sys.exit(3)"
    logs = RecordingLogs()
    agent = world.agent([sys.executable, "-c", script], shutdown_command=["touch", str(marker)], logs=logs)
    assert agent.run() == 3
    job = world.store.get(JOB)
    assert job.status == jobs.JobStatus.FAILED
    # The stack's JobsFailed alarm counts it
    assert logs.metrics()["JobsFailed"] == {
        "trainctl_metric": "JobsFailed",
        "value": 1,
        "unit": "Count",
        "job_id": JOB,
    }
    assert (
        job.failure_reason
        and "code 3" in job.failure_reason
        and "ValueError: bad shape" in job.failure_reason
    )
    # A failed job's instance has nothing left to do either (no relaunch on a user bug)
    assert marker.exists()


def test_a_long_log_tail_keeps_its_end_the_exception(world: World) -> None:
    # Given a training process that logs long lines, then dies of an exception
    world.add_job()
    script = (
        "for i in range(40): print(f'batch {i} ' + 'x' * 300)\n"
        "raise ValueError('the real cause: shapes (3, 4) and (5, 6) do not align')"
    )
    agent = world.agent([sys.executable, "-c", script])
    assert agent.run() == 1
    reason = world.store.get(JOB).failure_reason
    # Then the reason fits the row and ends with what the user needs: the exception
    assert reason is not None and len(reason) <= 3000
    assert reason.startswith("training exited with code 1: …")
    assert reason.endswith("ValueError: the real cause: shapes (3, 4) and (5, 6) do not align")


def test_failure_reason_cuts_from_the_front() -> None:
    assert failure_reason(2, ["a", "b"]) == "training exited with code 2: a\nb"
    cut = failure_reason(2, ["x" * 50, "Error: last"], limit=60)
    assert len(cut) == 60 and cut.endswith("x\nError: last") and "…" in cut


def test_superseded_agent_stops_its_child_stands_down_and_shuts_down(world: World, tmp_path: Any) -> None:
    world.add_job()
    marker = tmp_path / "shutdown-called"
    agent = world.agent(_train(tmp_path), shutdown_command=["touch", str(marker)])
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
    # And the superseded instance (e.g. stopped and come back) is not left running
    assert marker.exists()


def test_no_resume_point_in_time_shuts_the_instance_down(world: World, tmp_path: Any) -> None:
    # Given a job that never names this instance (the workflow moved on, or failed)
    world.add_job(launch=False)
    marker = tmp_path / "shutdown-called"
    agent = world.agent(["true"], resume_wait_seconds=0.5, shutdown_command=["touch", str(marker)])
    assert agent.run() == EXIT_NO_RESUME_POINT
    assert marker.exists() and agent.child is None


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


# --- rebalance: checkpoint, then continue (SSM Mode=continue, IMDS recommendation) --------


def _heartbeat_step(world: World) -> int:
    return int(world.store.raw(JOB).get("heartbeat_step", 0))


def test_ssm_checkpoint_continue_keeps_training_then_a_stop_notice_still_works(
    world: World, tmp_path: Any, capsys: Any
) -> None:
    # Given a running job
    world.add_job()
    agent = world.agent(_train(tmp_path), imds=None)
    thread, result = _run(agent)
    _until(lambda: agent.last_checkpoint is not None, what="a periodic checkpoint")
    # When the SSM document runs for a rebalance recommendation (Mode=continue)
    argv = ["--job-id", JOB, "--socket", agent.config.socket_path, "--timeout", "60"]
    assert cli.checkpoint_now_main([*argv, "--mode", "continue"]) == 0
    assert "training continues" in capsys.readouterr().out
    # Then a durable checkpoint is on the row, not as the attempt's final one...
    job = world.store.get(JOB)
    assert job.last_checkpoint is not None and job.final_checkpoint is None
    rebalance = job.last_checkpoint
    assert ck.LocalCheckpointStorage(world.ckpt_dir, JOB).read_manifest(_id(rebalance)) is not None
    # ...and training goes on: the job stays RUNNING with a live process making progress
    _until(lambda: _heartbeat_step(world) > rebalance.step + 40, what="training to continue")
    assert thread.is_alive() and agent.child is not None and agent.child.poll() is None
    assert world.store.get(JOB).status == jobs.JobStatus.RUNNING
    # When the Spot warning's document runs later (Mode=stop, the default)
    assert cli.checkpoint_now_main(argv) == 0
    thread.join(60)
    # Then training stopped after a final checkpoint newer than the rebalance one
    assert result == {"rc": 0}
    final = world.store.get(JOB).final_checkpoint
    assert final is not None and final.step > rebalance.step


def test_checkpoint_now_refuses_an_unknown_mode(world: World, tmp_path: Any, capsys: Any) -> None:
    with pytest.raises(SystemExit):
        cli.checkpoint_now_main(["--job-id", JOB, "--socket", str(tmp_path / "x.sock"), "--mode", "pause"])
    assert "invalid choice: 'pause'" in capsys.readouterr().err


def test_imds_rebalance_checkpoints_once_and_training_continues(world: World, tmp_path: Any) -> None:
    # Given a job with no periodic checkpoints (so every checkpoint below was requested)
    world.add_job()
    with FakeImds(INSTANCE) as fake:
        agent = world.agent(_train(tmp_path, every=10**9), imds=ImdsClient(fake.url))
        thread, result = _run(agent)
        _until(lambda: _heartbeat_step(world) > 0, what="progress")
        # When IMDS shows a rebalance recommendation (it stays there once issued)
        fake.recommend_rebalance(jobs.utcnow())
        _until(lambda: agent.last_checkpoint is not None, what="the rebalance checkpoint")
        rebalance = agent.last_checkpoint
        assert rebalance is not None
        # Then training continues, and the standing recommendation is not checkpointed again
        _until(lambda: _heartbeat_step(world) > rebalance.step + 40, what="training to continue")
        time.sleep(1.0)  # several IMDS polls
        storage = ck.LocalCheckpointStorage(world.ckpt_dir, JOB)
        assert storage.list_checkpoints() == [_id(rebalance)]
        assert world.store.get(JOB).final_checkpoint is None
        assert world.store.get(JOB).status == jobs.JobStatus.RUNNING and thread.is_alive()
        # And a Spot notice afterwards still stops it with a final checkpoint
        fake.notice(jobs.utcnow() + timedelta(minutes=2))
        thread.join(60)
    assert result == {"rc": 0}
    final = world.store.get(JOB).final_checkpoint
    assert final is not None and final.step > rebalance.step


def test_only_a_checkpoint_answering_the_stop_request_is_final(world: World) -> None:
    # Given a rebalance request (1) and then a stop notice (2) forwarded to the child
    world.add_job()
    agent = world.agent(["true"])
    agent.attempt = 0
    agent.notice(_Notice(stop=False, source="test"))
    agent.notice(_Notice(stop=True, source="test"))

    def durable(step: int, answers: int | None) -> dict[str, Any]:
        return {
            "op": "durable",
            "step": step,
            "prefix": ck.checkpoint_prefix(JOB, ck.CheckpointId(step, 0)),
            "created_at": jobs.format_time(jobs.utcnow()),
            "urgent": True,
            "answers": answers,
        }

    # When the rebalance's urgent checkpoint (snapshot before the notice) becomes durable
    agent._on_durable(durable(10, 1))
    # Then it is recorded, but not as the attempt's final checkpoint
    job = world.store.get(JOB)
    assert job.last_checkpoint is not None and job.last_checkpoint.step == 10
    assert job.final_checkpoint is None and agent.final_checkpoint is None
    # When the checkpoint answering the notice follows, it is the final one
    agent._on_durable(durable(12, 2))
    final = world.store.get(JOB).final_checkpoint
    assert final is not None and final.step == 12


# --- the request's deadline ----------------------------------------------------------------------

# A training loop whose storage hangs while a flag file exists (S3 unreachable).
STUCK_CHILD = """
import os, sys, time
import numpy as np
from trainctl.checkpoint import Checkpointer
from trainctl_core.checkpoints import LocalCheckpointStorage

class Stuck(LocalCheckpointStorage):
    def put_files(self, checkpoint, files, cancelled):
        while os.path.exists(sys.argv[1]):
            time.sleep(0.05)
        super().put_files(checkpoint, files, cancelled)

ckpt = Checkpointer.from_env(retry_initial_seconds=0.1)
ckpt.storage = Stuck(ckpt.storage.root, ckpt.storage.job_id)
step = 0
while True:
    step += 1
    time.sleep(0.01)
    if ckpt.due(step):
        ckpt.save({"x": np.full(10, step)}, step)
    if ckpt.should_stop():
        break
ckpt.close()
"""


def test_checkpoint_now_fails_clearly_once_the_deadline_passes(
    world: World, tmp_path: Any, capsys: Any
) -> None:
    # Given a training process whose checkpoint storage does not answer
    flag = tmp_path / "storage-down"
    flag.touch()
    world.add_job()
    agent = world.agent([sys.executable, "-c", STUCK_CHILD, str(flag)])
    thread, result = _run(agent)
    _until(lambda: agent._checkpointers, what="the Checkpointer to connect")
    # When the SSM document asks for a checkpoint due 2 s from now (waiting up to 60 s)
    deadline = jobs.format_time(jobs.utcnow() + timedelta(seconds=2))
    argv = ["--job-id", JOB, "--socket", agent.config.socket_path, "--timeout", "60"]
    assert cli.checkpoint_now_main([*argv, "--deadline", deadline, "--mode", "continue"]) == 2
    # Then it fails at the deadline (not after its own 60 s), saying what happened
    err = capsys.readouterr().err
    assert f"checkpoint not durable by the deadline {deadline}" in err
    assert "not durable within" in err and "(the deadline of the request it answers)" in err
    # And a rebalance checkpoint that failed does not end training
    assert agent.child is not None and agent.child.poll() is None
    assert world.store.get(JOB).status == jobs.JobStatus.RUNNING
    # When storage is back, a stop notice still gets its checkpoint
    flag.unlink()
    assert cli.checkpoint_now_main(argv) == 0
    thread.join(60)
    assert result == {"rc": 0} and world.store.get(JOB).final_checkpoint is not None


# --- SIGTERM (systemd stop, docker stop): a real agent process --------------------------------------


def _processes_with(needle: str) -> list[int]:
    found = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/cmdline", "rb") as handle:
                if needle.encode() in handle.read():
                    found.append(int(entry))
        except OSError:
            continue
    return found


@pytest.fixture
def served_world(tmp_path: Any) -> Iterator[tuple[World, str]]:
    """A World whose AWS is also a moto server (for agents in their own processes)."""
    from moto.server import ThreadedMotoServer

    with mock_aws():  # the server shares these in-process backends
        server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
        server.start()
        host, port = server.get_host_and_port()
        try:
            yield World(tmp_path), f"http://{host}:{port}"
        finally:
            server.stop()


def test_sigterm_checkpoints_stops_the_child_and_exits(
    served_world: tuple[World, str], tmp_path: Any
) -> None:
    world, url = served_world
    world.add_job()
    marker = tmp_path / "shutdown-called"
    output = tmp_path / "final-sigterm.bin"  # unique in the child's command line
    env = {k: v for k, v in os.environ.items() if not k.startswith("TRAINCTL_")}
    env.update(
        {
            "AWS_ENDPOINT_URL": url,
            "TRAINCTL_CHECKPOINT_DIR": world.ckpt_dir,
            "PYTHONUNBUFFERED": "1",
        }
    )
    command = [*_train(tmp_path)[:-1], str(output)]
    argv = [
        sys.executable,
        "-c",
        "from trainctl.agent.cli import main_agent; main_agent()",
        *_agent_argv(tmp_path, "--no-imds", "--job-id", JOB, "--instance-id", INSTANCE),
        "--resume-poll-seconds",
        "0.1",
        "--shutdown-command",
        f"touch {marker}",
        "--",
        *command,
    ]
    with open(tmp_path / "agent.log", "wb") as log:
        agent = subprocess.Popen(argv, env=env, stdout=log, stderr=subprocess.STDOUT)
        try:
            # Given the agent running training, with a checkpoint already on the row
            _until(lambda: world.store.get(JOB).last_checkpoint, timeout=60, what="a checkpoint")
            before = world.store.get(JOB).last_checkpoint
            assert before is not None and _processes_with(str(output))
            # When systemd (or docker, through tini) stops it
            agent.send_signal(signal.SIGTERM)
            rc = agent.wait(90)
        finally:
            if agent.poll() is None:
                agent.kill()
    logged = (tmp_path / "agent.log").read_text(errors="replace")
    # Then it exited cleanly once the child stopped after a durable final checkpoint
    assert rc == 0, logged[-3000:]
    assert not _processes_with(str(output))
    job = world.store.get(JOB)
    assert job.final_checkpoint is not None and job.final_checkpoint.step >= before.step
    storage = ck.LocalCheckpointStorage(world.ckpt_dir, JOB)
    assert storage.read_manifest(_id(job.final_checkpoint)) is not None
    assert "stopping at step" in logged  # the child stopped itself after that checkpoint
    # And the job is left to the resume workflow; the machine is not the agent's to stop
    assert job.status == jobs.JobStatus.RUNNING and not marker.exists()


def test_the_image_runs_the_agent_under_an_init_and_asks_the_host_for_its_shutdown(repo_root: str) -> None:
    with open(os.path.join(repo_root, "training", "Dockerfile")) as handle:
        entrypoint = next(
            json.loads(line.removeprefix("ENTRYPOINT").strip())
            for line in handle
            if line.startswith("ENTRYPOINT")
        )
    # tini as PID 1 hands SIGTERM to the agent and reaps orphans
    assert entrypoint[:2] == ["/usr/bin/tini", "--"] and entrypoint[2:4] == ["trainctl", "agent"]
    # The agent's shutdown command leaves the marker the host's unit acts on
    shutdown = entrypoint[entrypoint.index("--shutdown-command") + 1]
    assert shutdown.split()[0] == "touch"
    marker = shutdown.split()[1]
    with open(os.path.join(repo_root, "training", "bootstrap", "user-data.sh")) as handle:
        bootstrap = handle.read()
    assert f"[ -e {marker} ] && exec shutdown -h now" in bootstrap
    assert f"rm -f {marker}" in bootstrap


def test_a_request_reaching_the_training_process_before_its_checkpointer_is_kept() -> None:
    import socket

    from trainctl.agent.ipc import AgentConnection

    class Target:
        def __init__(self) -> None:
            self.requests: list[dict[str, Any]] = []

        def request(self, **kwargs: Any) -> None:
            self.requests.append(kwargs)

    agent_end, child_end = socket.socketpair()
    link = AgentConnection(child_end)
    try:
        # Given the agent's request arriving while the Checkpointer is still being built
        agent_end.sendall(
            b'{"op": "checkpoint", "id": 4, "stop": true, "deadline": "2030-01-01T00:00:00Z"}\n'
        )
        time.sleep(0.3)
        # When the Checkpointer attaches, it gets the request (a notice is never dropped)
        target = Target()
        link.attach(target)
        assert target.requests == [{"stop": True, "deadline": "2030-01-01T00:00:00Z", "ref": 4}]
    finally:
        link.close()
        agent_end.close()


class RecordingLogs:
    """The agent's log sink (the CloudWatch shipper on EC2), recording what it is given."""

    def __init__(self) -> None:
        self.lines: list[str] = []

    def bind_attempt(self, attempt: int) -> None:
        pass

    def write(self, message: str) -> None:
        self.lines.append(message)

    def flush(self) -> bool:
        return True

    def metrics(self) -> dict[str, dict[str, Any]]:
        """Metric lines by name; every one must be a whole JSON object (what a filter reads)."""
        found: dict[str, dict[str, Any]] = {}
        for line in self.lines:
            if '"trainctl_metric"' in line:
                record = json.loads(line)
                found[record["trainctl_metric"]] = record
        return found


def test_a_recovery_reports_its_metrics_as_lines_the_stacks_filters_read(world: World, tmp_path: Any) -> None:
    # Given attempt 0 training, warned at `noticed`
    world.add_job()
    first_logs = RecordingLogs()
    agent = world.agent(_train(tmp_path), logs=first_logs)
    thread, result = _run(agent)
    _until(lambda: agent.last_checkpoint is not None, what="a periodic checkpoint")
    job = world.store.get(JOB)
    noticed = jobs.utcnow()
    world.store.apply(
        jobs.mark_interrupted(
            job, instance_id=INSTANCE, reason=jobs.InterruptionReason.SPOT_WARNING, now=noticed
        )
    )
    # When the SSM checkpoint-now arrives
    assert (
        cli.checkpoint_now_main(["--job-id", JOB, "--socket", agent.config.socket_path, "--timeout", "60"])
        == 0
    )
    thread.join(30)
    assert result == {"rc": 0}
    # Then the time from the recorded notice to the durable final checkpoint is reported
    checkpoint = first_logs.metrics()["TimeToCheckpoint"]
    assert checkpoint["unit"] == "Seconds" and checkpoint["job_id"] == JOB
    assert 0 < checkpoint["value"] < 60
    assert set(first_logs.metrics()) == {"TimeToCheckpoint"}  # no outcome: the workflow owns the job
    final = world.store.get(JOB).final_checkpoint
    assert final is not None

    # When the replacement (in another pool) resumes from it and finishes
    world.launch(
        world.store.get(JOB),
        "i-0bbbbbbbbbbbbbbb2",
        jobs.ResumePoint(kind=jobs.CheckpointKind.FINAL, step=final.step, prefix=final.prefix),
    )
    second_logs = RecordingLogs()
    with FakeImds("i-0bbbbbbbbbbbbbbb2", instance_type="c7i.large", zone="us-east-1b") as fake:
        replacement = world.agent(
            _train(tmp_path, steps=final.step + 5, step_seconds=0),
            instance="i-0bbbbbbbbbbbbbbb2",
            imds=ImdsClient(fake.url),
            logs=second_logs,
            shutdown_command=["true"],
        )
        assert replacement.run() == 0
    # Then it reports the recovery: notice -> training resumed, nothing redone, which pool, and the outcome
    reported = second_logs.metrics()
    assert set(reported) == {"TimeToResume", "LostSteps", "Replacements", "JobsSucceeded"}
    assert reported["TimeToResume"]["value"] > checkpoint["value"]
    assert reported["LostSteps"] == {
        "trainctl_metric": "LostSteps",
        "value": 0,
        "unit": "Count",
        "job_id": JOB,
    }
    assert reported["Replacements"]["pool"] == "c7i.large@us-east-1b"
    assert reported["JobsSucceeded"]["value"] == 1
