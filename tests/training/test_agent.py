"""The agent end to end, offline: moto DynamoDB + Step Functions, a fake IMDSv2 on
127.0.0.1, and a real training child process (local checkpoint directory)."""

from __future__ import annotations

import contextlib
import json
import logging
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from datetime import timedelta
from pathlib import Path
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
from trainctl_core.tables import jobs_table_request
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
        self.ddb.create_table(**jobs_table_request(TABLE))
        self.store = JobStore(self.ddb, TABLE)
        self.ckpt_dir = str(tmp / "checkpoints")
        self.agents: list[Agent] = []

    def close(self) -> None:
        """Stop the training processes a failed test left behind (their own sessions)."""
        for agent in self.agents:
            child = agent.child
            if child is not None and child.poll() is None:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(child.pid, signal.SIGKILL)
                child.wait(10)

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
        agent = Agent(cfg, self.store, handshake=Handshake(self.sfn), imds=imds, logs=logs)
        self.agents.append(agent)
        return agent


@pytest.fixture
def world(tmp_path: Any) -> Iterator[World]:
    with mock_aws(config={"stepfunctions": {"execute_state_machine": True}}):
        world = World(tmp_path)
        try:
            yield world
        finally:
            world.close()


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


def _agent_with_stuck_storage(
    world: World, tmp_path: Any
) -> tuple[Agent, threading.Thread, dict[str, int], Path]:
    """An agent running STUCK_CHILD for a new job, its Checkpointer connected; storage
    hangs until the returned flag file is removed."""
    flag = tmp_path / "storage-down"
    flag.touch()
    world.add_job()
    agent = world.agent([sys.executable, "-c", STUCK_CHILD, str(flag)])
    thread, result = _run(agent)
    _until(lambda: agent._checkpointers, what="the Checkpointer to connect")
    return agent, thread, result, flag


def test_checkpoint_now_fails_clearly_once_the_deadline_passes(
    world: World, tmp_path: Any, capsys: Any
) -> None:
    # Given a training process whose checkpoint storage does not answer
    agent, thread, result, flag = _agent_with_stuck_storage(world, tmp_path)
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
        world = World(tmp_path)
        try:
            yield world, f"http://{host}:{port}"
        finally:
            world.close()
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
    # Then it exited cleanly once the child stopped after a durable checkpoint, recorded
    # as the attempt's newest, not its final one: a SIGTERM alone (a reboot) ends no
    # attempt, and a final checkpoint would end a later notice's handshake at once
    assert rc == 0, logged[-3000:]
    assert not _processes_with(str(output))
    job = world.store.get(JOB)
    assert job.last_checkpoint is not None and job.last_checkpoint.step >= before.step
    assert job.final_checkpoint is None
    storage = ck.LocalCheckpointStorage(world.ckpt_dir, JOB)
    assert storage.read_manifest(_id(job.last_checkpoint)) is not None
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


# --- a replacement that fell back to an older checkpoint -----------------------------------------


def _handshake_machine(world: World) -> str:
    return str(
        world.sfn.create_state_machine(
            name="handshake",
            definition=json.dumps(HANDSHAKE_ASL),
            roleArn="arn:aws:iam::123456789012:role/sfn",
        )["stateMachineArn"]
    )


def _finished(world: World, execution: str) -> Any:
    return _until(
        lambda: (d := world.sfn.describe_execution(executionArn=execution))["status"] != "RUNNING" and d,
        what="the execution to finish",
    )


def test_a_replacement_that_fell_back_to_an_older_checkpoint_records_its_own_and_hands_over(
    world: World, tmp_path: Any
) -> None:
    # Given attempt 0 recorded a checkpoint at a high step that turns out to be unusable
    # (its files are gone), and the replacement (attempt 1) was told to resume from it
    job = world.add_job()
    lost = jobs.CheckpointRef(
        step=10**6,
        prefix=ck.checkpoint_prefix(JOB, ck.CheckpointId(10**6, 0)),
        attempt=0,
        created_at=jobs.utcnow(),
    )
    world.store.record_checkpoint(JOB, instance_id=INSTANCE, attempt=0, checkpoint=lost, final=True)
    job = world.store.apply(
        jobs.mark_interrupted(
            world.store.get(JOB),
            instance_id=INSTANCE,
            reason=jobs.InterruptionReason.SPOT_WARNING,
            now=jobs.utcnow(),
        )
    )
    replacement = "i-0bbbbbbbbbbbbbbb2"
    world.launch(
        job, replacement, jobs.ResumePoint(kind=jobs.CheckpointKind.FINAL, step=lost.step, prefix=lost.prefix)
    )
    machine = _handshake_machine(world)
    agent = world.agent(_train(tmp_path), instance=replacement)
    thread, result = _run(agent)
    # When training fell back (to a fresh start: nothing older exists) and its own,
    # lower-step checkpoints become durable, and then a notice comes for attempt 1
    _until(lambda: agent.last_checkpoint is not None, what="a periodic checkpoint of attempt 1 on the row")
    execution = world.sfn.start_execution(
        stateMachineArn=machine, name=f"{JOB}-1", input=json.dumps({"job_id": JOB, "attempt": "1"})
    )["executionArn"]
    _until(lambda: world.store.raw(JOB).get("task_token_attempt") == 1, what="the token on the row")
    argv = ["--job-id", JOB, "--socket", agent.config.socket_path, "--timeout", "60"]
    assert cli.checkpoint_now_main(argv) == 0
    thread.join(60)
    # Then its final checkpoint (below attempt 0's step) is the row's, and the handshake completed
    assert result == {"rc": 0}
    row = world.store.get(JOB)
    assert row.final_checkpoint is not None and row.final_checkpoint.attempt == 1
    assert row.final_checkpoint.step < lost.step and row.last_checkpoint == row.final_checkpoint
    described = _finished(world, execution)
    assert described["status"] == "SUCCEEDED"
    assert json.loads(described["output"])["checkpoint"]["step"] == row.final_checkpoint.step


# --- DynamoDB unavailable while a checkpoint is recorded ---------------------------------------------


class ThrottledCheckpointRecords:
    """The jobs table's client, throttling the first `failures` checkpoint records (as
    DynamoDB does after botocore's own retries ran out)."""

    def __init__(self, client: Any, failures: int) -> None:
        self._client = client
        self.failures = failures
        self.refused = 0

    def update_item(self, **kwargs: Any) -> Any:
        if "last_checkpoint = :ckpt" in kwargs.get("UpdateExpression", "") and self.refused < self.failures:
            from botocore.exceptions import ClientError

            self.refused += 1
            raise ClientError(
                {
                    "Error": {"Code": "ProvisionedThroughputExceededException", "Message": "slow down"},
                    "ResponseMetadata": {"HTTPStatusCode": 400},
                },
                "UpdateItem",
            )
        return self._client.update_item(**kwargs)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._client, name)


def test_a_checkpoint_record_refused_by_a_throttled_table_is_retried(world: World, tmp_path: Any) -> None:
    # Given a job whose table throttles the next two checkpoint records
    world.add_job()
    agent = world.agent(_train(tmp_path, every=10**9))
    flaky = ThrottledCheckpointRecords(world.ddb, failures=2)
    agent.store = JobStore(flaky, TABLE)
    thread, result = _run(agent)
    _until(lambda: agent._checkpointers, what="the Checkpointer to connect")
    # When the notice's checkpoint is durable
    argv = ["--job-id", JOB, "--socket", agent.config.socket_path, "--timeout", "30"]
    assert cli.checkpoint_now_main(argv) == 0
    thread.join(60)
    # Then its record was retried until the row named it
    assert flaky.refused == 2 and result == {"rc": 0}
    final = world.store.get(JOB).final_checkpoint
    assert final is not None
    assert ck.LocalCheckpointStorage(world.ckpt_dir, JOB).read_manifest(_id(final)) is not None


# --- an agent restarted on its attempt (a reboot) ----------------------------------------------------


def test_an_agent_restarted_on_its_attempt_resumes_from_that_attempts_newest_checkpoint(
    world: World, tmp_path: Any
) -> None:
    # Given attempt 1 resumed from attempt 0's final checkpoint and checkpointed beyond it
    world.add_job()
    first = world.agent(_train(tmp_path))
    thread, result = _run(first)
    _until(lambda: first.last_checkpoint is not None, what="a checkpoint of attempt 0")
    assert (
        cli.checkpoint_now_main(["--job-id", JOB, "--socket", first.config.socket_path, "--timeout", "60"])
        == 0
    )
    thread.join(60)
    handed_over = world.store.get(JOB).final_checkpoint
    assert handed_over is not None and result == {"rc": 0}
    job = world.store.apply(
        jobs.mark_interrupted(
            world.store.get(JOB),
            instance_id=INSTANCE,
            reason=jobs.InterruptionReason.SPOT_WARNING,
            now=jobs.utcnow(),
        )
    )
    replacement = "i-0bbbbbbbbbbbbbbb2"
    world.launch(
        job,
        replacement,
        jobs.ResumePoint(kind=jobs.CheckpointKind.FINAL, step=handed_over.step, prefix=handed_over.prefix),
    )
    booted = world.agent(_train(tmp_path), instance=replacement)
    thread, result = _run(booted)
    _until(
        lambda: (
            (last := world.store.get(JOB).last_checkpoint) is not None
            and last.attempt == 1
            and last.step >= handed_over.step + 40
        ),
        what="attempt 1's own checkpoints",
    )
    # When the machine reboots: systemd stops the agent (SIGTERM), then starts it again
    booted.terminate()
    thread.join(60)
    assert result == {"rc": 0}
    row = world.store.get(JOB)
    assert row.status == jobs.JobStatus.RUNNING and row.last_checkpoint is not None
    newest = row.last_checkpoint
    assert newest.attempt == 1 and newest.step > handed_over.step
    # (and attempt 1 has no final checkpoint: a later Spot notice still gets its handshake)
    assert row.final_checkpoint is None or row.final_checkpoint.attempt != 1
    again = world.agent(
        _train(tmp_path, steps=newest.step + 5, step_seconds=0),
        instance=replacement,
        shutdown_command=["true"],
    )
    # Then it resumes where attempt 1 got to, not from the row's resume point
    assert again.run() == 0
    assert any(f"resumed at step {newest.step} " in line for line in again.log_tail), list(again.log_tail)
    assert world.store.get(JOB).status == jobs.JobStatus.SUCCEEDED


# --- a stopped instance that comes back ---------------------------------------------------------------


def test_a_stopped_instance_that_comes_back_after_its_replacement_stands_down_at_once(
    world: World, tmp_path: Any
) -> None:
    # Given the job moved on from this instance (stopped on its notice) to a replacement
    job = world.add_job()
    job = world.store.apply(
        jobs.mark_interrupted(
            job, instance_id=INSTANCE, reason=jobs.InterruptionReason.SPOT_WARNING, now=jobs.utcnow()
        )
    )
    world.launch(job, "i-0bbbbbbbbbbbbbbb2")
    marker = tmp_path / "shutdown-called"
    # When the instance is started again: the bootstrap's agent knows no attempt
    agent = world.agent(["true"], resume_wait_seconds=60, shutdown_command=["touch", str(marker)])
    assert agent.config.attempt is None
    # Then it stands down (the row will never name it again) and shuts the instance down
    assert agent.run() == EXIT_STOOD_DOWN
    assert agent.child is None and marker.exists()
    assert world.store.get(JOB).instance_id == "i-0bbbbbbbbbbbbbbb2"


def test_the_agent_takes_its_attempt_from_the_instance_tag(
    world: World, tmp_path: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Given an instance launched for attempt 0 that the row never recorded (the job's
    # attempt 0 ran elsewhere, and attempt 1 runs now on another instance)
    job = world.store.apply(
        jobs.mark_interrupted(
            world.add_job(),
            instance_id=INSTANCE,
            reason=jobs.InterruptionReason.SPOT_WARNING,
            now=jobs.utcnow(),
        )
    )
    world.launch(job, "i-0bbbbbbbbbbbbbbb2")
    orphan = "i-0ddddddddddddddd4"
    for name in (cli.env.JOB_ID, cli.env.INSTANCE_ID, cli.env.ATTEMPT):
        monkeypatch.delenv(name, raising=False)
    tags = {settings.TAG_JOB_ID: JOB, settings.TAG_ATTEMPT: "0"}
    with FakeImds(orphan, tags=tags) as fake:
        monkeypatch.setenv("AWS_EC2_METADATA_SERVICE_ENDPOINT", fake.url)
        # When its agent starts as the bootstrap starts it (no --attempt)
        rc = cli.agent_main(_agent_argv(tmp_path, "--resume-wait-seconds", "60", "--", "true"))
    # Then it knows its attempt is over and stands down
    assert rc == EXIT_STOOD_DOWN
    assert world.store.get(JOB).instance_id == "i-0bbbbbbbbbbbbbbb2"


def test_a_booting_agent_asks_an_imds_that_did_not_answer_again(
    world: World, tmp_path: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Given an instance of the job whose IMDS does not answer its first requests (a busy
    # instance at boot: each one times out)
    job = world.add_job()
    for name in (cli.env.JOB_ID, cli.env.INSTANCE_ID, cli.env.ATTEMPT):
        monkeypatch.delenv(name, raising=False)
    tags = {settings.TAG_JOB_ID: JOB, settings.TAG_ATTEMPT: str(job.attempt)}
    with FakeImds(INSTANCE, tags=tags) as fake:
        fake.unanswered = 2
        monkeypatch.setenv("AWS_EC2_METADATA_SERVICE_ENDPOINT", fake.url)
        # When its agent starts as the bootstrap starts it (no flags for its identity)
        rc = cli.agent_main(_agent_argv(tmp_path, "--resume-wait-seconds", "30", "--", "true"))
    # Then it asked again, learnt who it is and ran the job (not "missing --job-id")
    assert fake.unanswered == 0
    assert rc == 0
    assert world.store.get(JOB).status == jobs.JobStatus.SUCCEEDED


@pytest.mark.parametrize("status", [403, 405])
def test_imds_refusing_its_token_means_unavailable_not_a_crash(
    world: World, tmp_path: Any, monkeypatch: pytest.MonkeyPatch, caplog: Any, capsys: Any, status: int
) -> None:
    from trainctl.agent.imds import ImdsUnavailable

    world.add_job()
    for name in (cli.env.JOB_ID, cli.env.INSTANCE_ID):
        monkeypatch.delenv(name, raising=False)
    with FakeImds(INSTANCE, tags={settings.TAG_JOB_ID: JOB}, token_status=status) as fake:
        # Given IMDS refusing session tokens (turned off: 403; through a proxy: 405)
        with pytest.raises(ImdsUnavailable):
            ImdsClient(fake.url).poll()
        monkeypatch.setenv("AWS_EC2_METADATA_SERVICE_ENDPOINT", fake.url)
        # When the agent starts without an instance id: a usage error naming it
        assert cli.agent_main(_agent_argv(tmp_path, "--job-id", JOB, "--", "true")) == 64
        assert "--instance-id" in capsys.readouterr().err
        # When it is given one, it runs on SSM signals alone, saying so once
        script = "import time; time.sleep(1.5)"
        argv = _agent_argv(
            tmp_path, "--job-id", JOB, "--instance-id", INSTANCE, "--", sys.executable, "-c", script
        )
        with caplog.at_level(logging.WARNING, logger="trainctl"):
            assert cli.agent_main(argv) == 0
    assert world.store.get(JOB).status == jobs.JobStatus.SUCCEEDED
    warnings = [r.getMessage() for r in caplog.records if "IMDS" in r.getMessage()]
    assert len([m for m in warnings if "relying on SSM signals" in m]) == 1, warnings
    assert not any(r.exc_info for r in caplog.records if r.name.startswith("trainctl"))


# --- fences are answered while a checkpoint record is slow -----------------------------------------


class SlowCheckpointRecords:
    """The store, with checkpoint records that hang until `release` is set."""

    def __init__(self, store: JobStore) -> None:
        self._store = store
        self.release = threading.Event()
        self.started = threading.Event()

    def record_checkpoint(self, *args: Any, **kwargs: Any) -> Any:
        self.started.set()
        self.release.wait(60)
        return self._store.record_checkpoint(*args, **kwargs)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._store, name)


def test_a_fence_is_answered_while_a_checkpoint_record_is_slow(world: World, tmp_path: Any) -> None:
    from trainctl.agent.ipc import AgentConnection

    # Given an agent whose checkpoint records hang (DynamoDB or Step Functions slow)
    world.add_job()
    agent = world.agent(["true"])
    slow = SlowCheckpointRecords(world.store)
    agent.store = slow  # type: ignore[assignment]
    agent.attempt = 0
    agent.ipc.start()
    link = AgentConnection.try_connect(agent.config.socket_path)
    assert link is not None
    try:
        # When the Checkpointer reports a durable checkpoint, then asks to publish the next
        link.send(
            {
                "op": "durable",
                "step": 20,
                "prefix": ck.checkpoint_prefix(JOB, ck.CheckpointId(20, 0)),
                "created_at": jobs.format_time(jobs.utcnow()),
            }
        )
        assert slow.started.wait(10)
        # Then the fence is answered (within the Checkpointer's own 5 s) while the record waits
        assert link.is_current(timeout=5.0) is True
        assert world.store.get(JOB).last_checkpoint is None
        slow.release.set()
        _until(lambda: world.store.get(JOB).last_checkpoint, what="the checkpoint on the row")
    finally:
        slow.release.set()
        link.close()
        agent.ipc.stop()


# --- the same notice asking twice (the interruption handler retried) ------------------------------


def test_a_second_checkpoint_now_for_the_same_notice_gets_the_same_checkpoint(
    world: World, tmp_path: Any, capsys: Any
) -> None:
    from trainctl.agent.ipc import request_checkpoint

    # Given a training process whose storage is slow, and a Spot notice's checkpoint-now
    agent, thread, result, flag = _agent_with_stuck_storage(world, tmp_path)
    deadline = jobs.format_time(jobs.utcnow() + timedelta(seconds=90))
    answers: list[dict[str, Any]] = []

    def ask() -> None:
        answers.append(
            request_checkpoint(agent.config.socket_path, job_id=JOB, deadline=deadline, timeout=60)
        )

    first = threading.Thread(target=ask)
    first.start()
    _until(lambda: agent._stop_request is not None, what="the first request to reach the child")
    # When the same notice's second checkpoint-now arrives while the first is in flight
    second = threading.Thread(target=ask)
    second.start()
    _until(lambda: len(agent._waiters) == 2, what="the second request to wait")
    flag.unlink()
    first.join(60)
    second.join(60)
    thread.join(60)
    # Then both get the one final checkpoint; no second checkpoint was taken
    assert result == {"rc": 0}
    final = world.store.get(JOB).final_checkpoint
    assert final is not None
    assert [(a["ok"], a["step"], a["prefix"]) for a in answers] == [(True, final.step, final.prefix)] * 2
    storage = ck.LocalCheckpointStorage(world.ckpt_dir, JOB)
    assert storage.list_checkpoints() == [_id(final)]
    # And one arriving after the agent has exited still gets that checkpoint
    argv = ["--job-id", JOB, "--socket", agent.config.socket_path, "--deadline", deadline, "--timeout", "5"]
    assert cli.checkpoint_now_main(argv) == 0
    assert f"checkpoint durable: step {final.step} at {final.prefix}" in capsys.readouterr().out
    assert storage.list_checkpoints() == [_id(final)]
    # But not for another job
    other = ["--job-id", "another-job", "--socket", agent.config.socket_path, "--timeout", "5"]
    assert cli.checkpoint_now_main(other) == cli.EXIT_CHECKPOINT_FAILED
