"""submit / status / list / cancel / logs / interrupt against a moto-backed stack."""

from __future__ import annotations

import json
import time
import uuid
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any

import boto3
import pytest
import yaml
from botocore.exceptions import ClientError
from moto.core import DEFAULT_ACCOUNT_ID as ACCOUNT_ID
from moto.ec2.models import ec2_backends
from moto.ssm.models import ssm_backends

from tests.cli.conftest import REGION, Cli, LambdaContext, Stack, utc
from trainctl.commands import savings as savings_cmd
from trainctl.commands.jobs import _execution_names
from trainctl.commands.stack import Cloud
from trainctl_core import jobs
from trainctl_core.events import rule_patterns
from trainctl_core.jobs import CheckpointRef, InterruptionReason, JobStatus
from trainctl_core.workflow import Handshake, ResumeStarter, resume_input


def write_spec(tmp_path: Path, **changes: Any) -> Path:
    data: dict[str, Any] = {
        "name": "cli test",
        "command": "python train.py",
        "pools": {"instance_types": ["m5.large"]},
    }
    data.update(changes)
    path = tmp_path / "trainctl.yaml"
    path.write_text(yaml.safe_dump(data))
    return path


MANIFEST = json.dumps(
    {
        "schemaVersion": 2,
        "mediaType": "application/vnd.docker.distribution.manifest.v2+json",
        "config": {
            "mediaType": "application/vnd.docker.container.image.v1+json",
            "size": 1,
            "digest": "sha256:" + "0" * 64,
        },
        "layers": [],
    }
)


def executions(stack: Stack) -> list[str]:
    return [
        e["name"] for e in stack.sfn.list_executions(stateMachineArn=stack.state_machine_arn)["executions"]
    ]


# --- submit / status ---------------------------------------------------------------------------


def test_submit_creates_the_row_and_runs_the_launch_workflow(stack: Stack, cli: Cli, tmp_path: Path) -> None:
    spec = write_spec(tmp_path, limits={"max_interruptions": 3})
    result = cli("submit", "--spec", str(spec), "--json")
    assert result.exit_code == 0, result.stderr
    submitted = result.json()
    job_id = submitted["job_id"]
    assert job_id.startswith("cli-test-")
    assert submitted["workflow_input"] == {
        "job_id": job_id,
        "instance_id": None,
        "attempt": 0,
        "reason": "launch",
        "deadline": None,
    }
    # The launch has its own name: `<job>-0` is the resume after attempt 0's loss.
    assert submitted["execution_name"] == f"{job_id}-launch"
    # The real resume ASL accepts the input and launches attempt 0 in the stack's subnets.
    assert stack.wait_execution(f"{job_id}-launch")["status"] == "SUCCEEDED"
    status = cli("status", job_id, "--json").json()
    assert status["status"] == "LAUNCHING"
    assert status["attempt"] == 0
    assert status["instance_id"] in stack.instance_states(job_id)
    assert status["pool"].startswith("m5.large@subnet-")
    job = stack.store.get(job_id)
    assert job.spec.limits.max_interruptions == 3
    assert [p.subnet_id for p in job.spec.pools] == stack.subnets


def test_a_spot_warning_for_the_launched_attempt_starts_its_resume(
    stack: Stack, cli: Cli, tmp_path: Path, interruption_handler: Any, event_loader: Any
) -> None:
    # Given a job submitted with the CLI, whose launch workflow put attempt 0 on an
    # instance, and whose agent reported in
    job_id = "warned-at-zero"
    submitted = cli("submit", "--spec", str(write_spec(tmp_path)), "--job-id", job_id, "--json")
    assert submitted.exit_code == 0, submitted.stderr
    launch = submitted.json()["execution_name"]
    assert stack.wait_execution(launch)["status"] == "SUCCEEDED"
    job = stack.store.get(job_id)
    assert (job.status, job.attempt, job.instance_id is not None) == (JobStatus.LAUNCHING, 0, True)
    assert job.instance_id is not None
    job = stack.store.apply(jobs.mark_running(job, instance_id=job.instance_id, now=utc()))

    # When EC2 warns that this instance is being reclaimed, and the real interruption
    # handler gets the event
    warning = event_loader(
        "spot_interruption_warning",
        id=str(uuid.uuid4()),
        time=utc().strftime("%Y-%m-%dT%H:%M:%SZ"),
        **{"instance-id": job.instance_id},
    )
    response = interruption_handler.handler(warning, LambdaContext())

    # Then the loss is recorded and a second execution, the resume `<job>-0`, runs
    assert response["outcome"] == "resume_started"
    assert (response["interruption_recorded"], response["execution_started"]) == (True, True)
    interrupted = stack.store.get(job_id)
    assert (interrupted.status, interrupted.attempt) == (JobStatus.INTERRUPTED, 0)
    resume = f"{job_id}-0"
    assert sorted(n for n in executions(stack) if n.startswith(job_id)) == sorted([launch, resume])
    assert launch == f"{job_id}-launch"
    arn = stack.state_machine_arn.replace(":stateMachine:", ":execution:") + f":{resume}"
    described = stack.sfn.describe_execution(executionArn=arn)
    assert described["status"] == "RUNNING"
    document = json.loads(described["input"])
    assert (document["reason"], document["attempt"], document["instance_id"]) == (
        "spot-warning",
        0,
        job.instance_id,
    )

    # And when the agent's final checkpoint completes the workflow's handshake, the
    # resume puts attempt 1 on a replacement, resuming from that checkpoint
    deadline = time.monotonic() + 20
    while not stack.store.raw(job_id).get("task_token") and time.monotonic() < deadline:
        time.sleep(0.05)
    final = CheckpointRef(step=300, prefix=f"{job_id}/ckpt/300/", attempt=0, created_at=utc())
    row = stack.store.record_checkpoint(
        job_id, instance_id=job.instance_id, attempt=0, checkpoint=final, final=True
    )
    assert row.get("task_token_attempt") == 0
    Handshake(stack.sfn).complete(
        str(row["task_token"]),
        {
            "checkpoint": {
                "step": 300,
                "prefix": final.prefix,
                "attempt": 0,
                "created_at": jobs.format_time(final.created_at),
            }
        },
    )
    assert stack.wait_execution(resume)["status"] == "SUCCEEDED"
    replaced = stack.store.get(job_id)
    assert (replaced.status, replaced.attempt) == (JobStatus.LAUNCHING, 1)
    assert replaced.instance_id not in (None, job.instance_id)
    assert replaced.resume_point is not None and replaced.resume_point.step == 300


def test_cancel_finds_the_launch_and_the_resumes_of_its_job_only() -> None:
    mine = _execution_names("job-1")

    assert [name for name in ("job-1-launch", "job-1-0", "job-1-12") if mine.match(name)] == [
        "job-1-launch",
        "job-1-0",
        "job-1-12",
    ]
    # Another job whose id starts the same way ("job-1-2"), and look-alikes, are not its own.
    assert not any(mine.match(name) for name in ("job-1-2-launch", "job-1-2-0", "job-10", "job-1-x"))


def test_submit_checks_the_spec_against_the_stack_and_creates_nothing(
    stack: Stack, cli: Cli, tmp_path: Path
) -> None:
    before_jobs, before_runs = len(list(stack.store.scan())), len(executions(stack))
    spec = write_spec(tmp_path, pools={"instance_types": ["p4d.24xlarge"]})
    result = cli("submit", "--spec", str(spec))
    assert result.exit_code == 2
    assert "field 'pools.instance_types'" in result.stderr
    assert "allowed: m5.large, c5.xlarge, g5.xlarge" in result.stderr
    assert (len(list(stack.store.scan())), len(executions(stack))) == (before_jobs, before_runs)


def test_submit_that_cannot_start_the_workflow_leaves_no_orphan_row(
    stack: Stack, cli: Cli, tmp_path: Path
) -> None:
    broken = Cloud.from_options(None, None, None)
    outputs = dict(stack.outputs)
    outputs["ResumeStateMachineArn"] = stack.state_machine_arn + "-gone"
    broken.__dict__["outputs"] = outputs  # a stack whose state machine was deleted by hand
    cli.deps.cloud_factory = lambda *_: broken
    result = cli("submit", "--spec", str(write_spec(tmp_path)), "--job-id", "orphan-check")
    assert result.exit_code == 1
    assert "StartExecution failed: StateMachineDoesNotExist" in result.stderr
    job = stack.store.get("orphan-check")
    assert job.status == JobStatus.FAILED
    assert job.failure_reason is not None and "launch workflow did not start" in job.failure_reason


def test_submit_of_a_reused_job_id_whose_launch_name_is_taken_says_so(
    stack: Stack, cli: Cli, tmp_path: Path
) -> None:
    # Given a job whose launch has run, and whose row was then deleted by hand
    spec = str(write_spec(tmp_path))
    assert cli("submit", "--spec", spec, "--job-id", "reused-id").exit_code == 0
    assert stack.wait_execution("reused-id-launch")["status"] == "SUCCEEDED"
    stack.ddb.delete_item(TableName=stack.table, Key={"pk": {"S": "JOB#reused-id"}})

    # When the same id is submitted again, Step Functions still holds the launch's name
    result = cli("submit", "--spec", spec, "--job-id", "reused-id")

    # Then nothing pretends to launch: a clear error, and the new row ends FAILED
    assert result.exit_code == 1
    assert "an execution named reused-id-launch already exists" in result.stderr
    job = stack.store.get("reused-id")
    assert job.status == JobStatus.FAILED
    assert job.failure_reason is not None and "reused-id-launch" in job.failure_reason


def test_submit_with_a_dockerfile_needs_the_pushed_image(stack: Stack, cli: Cli, tmp_path: Path) -> None:
    (tmp_path / "Dockerfile").write_text("FROM python:3.11-slim\n")
    spec = write_spec(tmp_path, name="from dockerfile", dockerfile="Dockerfile")
    result = cli("submit", "--spec", str(spec), "--dry-run")
    assert result.exit_code == 2
    assert "trainctl push --build" in result.stderr
    stack.ecr.put_image(
        repositoryName="trainctl-training", imageManifest=MANIFEST, imageTag="from-dockerfile"
    )
    result = cli("submit", "--spec", str(spec), "--dry-run", "--json")
    assert result.exit_code == 0, result.stderr
    assert result.json()["spec"]["image"] == f"{stack.repository_uri}:from-dockerfile"


def test_status_reports_checkpoint_age_steps_at_risk_and_lost_steps(stack: Stack, cli: Cli) -> None:
    # One clock for the rows and the CLI: figures exact however slow the machine is (whole
    # seconds: the row keeps milliseconds).
    now = utc().replace(microsecond=0)
    cli.deps.now = lambda: now

    def ago(minutes: float) -> datetime:
        return now - timedelta(minutes=minutes)

    job = stack.new_job(now=ago(30))
    job = stack.start_attempt(job, stack.pools("m5.large")[0], ago(30))
    job = stack.checkpoint(job, 400, ago(15), final=False)
    job = stack.interrupt(job, ago(10))  # 5 min after the checkpoint: lost
    job = stack.start_attempt(job, stack.pools("c5.xlarge")[0], ago(9))
    assert job.instance_id is not None
    stack.store.heartbeat(job.job_id, instance_id=job.instance_id, attempt=1, step=700, steps_per_second=2.0)

    status = cli("status", job.job_id, "--json").json()
    assert (status["status"], status["attempt"], status["interruptions"]) == ("RUNNING", 1, 1)
    assert status["last_checkpoint"]["step"] == 400
    assert status["last_checkpoint_age_seconds"] == 15 * 60
    assert status["steps_at_risk"] == 300  # heartbeat 700 - checkpoint 400
    assert status["lost_seconds"] == 300
    assert status["lost_steps"] == 600  # 300 s at 2 steps/s

    text = cli("status", job.job_id)
    assert text.exit_code == 0
    assert "RUNNING" in text.stdout and "step 400" in text.stdout and "lost steps   600" in text.stdout


def test_status_counts_no_lost_steps_after_a_final_checkpoint_without_a_step_rate(
    stack: Stack, cli: Cli
) -> None:
    # Given a job whose one interruption lost nothing (its final checkpoint landed), and
    # whose replacement has not reported a step rate yet
    job = stack.new_job(now=utc(minutes=-30))
    job = stack.start_attempt(job, stack.pools("m5.large")[0], utc(minutes=-30))
    job = stack.interrupt(job, utc(minutes=-10))
    job = stack.checkpoint(job, 400, utc(minutes=-10), final=True)
    job = stack.start_attempt(job, stack.pools("c5.xlarge")[0], utc(minutes=-9))

    status = cli("status", job.job_id, "--json").json()
    assert status["steps_per_second"] is None
    # Then the lost steps are 0, not "unknown": zero seconds need no rate
    assert (status["lost_seconds"], status["lost_steps"]) == (0, 0)
    assert "lost steps   0 (0s of training redone)" in cli("status", job.job_id).stdout


def test_unknown_job_and_undeployed_stack_are_clear_errors(stack: Stack, cli: Cli) -> None:
    missing = cli("status", "no-such-job")
    assert missing.exit_code == 1
    assert "job no-such-job does not exist" in missing.stderr
    undeployed = cli("status", "x", "--stack", "NotThere")
    assert undeployed.exit_code == 1
    assert "stack 'NotThere' is not deployed in us-east-1" in undeployed.stderr
    # The README's Deploy section: the pinned CDK CLI (there is no `make deploy`).
    assert "hint: deploy it with `npx cdk deploy`" in undeployed.stderr
    assert "Traceback" not in undeployed.stderr + undeployed.stdout
    # --region is honoured: the same stack name is not deployed in another region.
    elsewhere = cli("list", "--region", "eu-west-1")
    assert elsewhere.exit_code == 1 and "stack 'Trainctl' is not deployed in eu-west-1" in elsewhere.stderr
    as_json = cli("list", "--stack", "NotThere", "--json")
    assert as_json.exit_code == 1 and as_json.json()["error"].startswith("stack 'NotThere'")


# --- list ------------------------------------------------------------------------------------


def test_list_shows_interruptions_and_savings(stack: Stack, cli: Cli) -> None:
    stack.spot_prices[("m5.large", "us-east-1a")] = [("2020-01-01T00:00:00Z", "0.032")]
    stack.spot_prices[("c5.xlarge", "us-east-1a")] = [("2020-01-01T00:00:00Z", "0.06")]
    job = stack.new_job(stack.pools("m5.large", "c5.xlarge"), now=utc(hours=-2))
    job = stack.start_attempt(job, stack.pools("m5.large")[0], utc(hours=-2))
    job = stack.interrupt(job, utc(hours=-1))
    job = stack.start_attempt(job, stack.pools("c5.xlarge")[0], utc(minutes=-59))

    rows = {r["job_id"]: r for r in cli("list", "--json").json()}
    row = rows[job.job_id]
    assert (row["status"], row["interruptions"]) == ("RUNNING", 1)
    # Attempt 0 bills until the handshake's timeout (the notice deadline, -58 min: no
    # final checkpoint), attempt 1 from its launch (-59 min) until now. Paid 62 min x 0.032
    # + 59 min x 0.06. Useful: none of attempt 0's 60 training minutes (no checkpoint:
    # attempt 1 restarted from scratch, so they are redone), and attempt 1's 58 minutes
    # since the old instance ended (it cannot train before that; the agent logged no
    # resume moment): baseline 58 min x 0.17 on-demand.
    paid = 62 / 60 * 0.032 + 59 / 60 * 0.06
    baseline = 58 / 60 * 0.17
    assert row["saving"]["usd"] == pytest.approx(baseline - paid, abs=1e-3)
    assert row["saving"]["pct"] == pytest.approx((baseline - paid) / baseline * 100, abs=0.5)

    table = cli("list", "--state", "RUNNING")
    assert table.exit_code == 0
    line = next(li for li in table.stdout.splitlines() if job.job_id in li)
    assert "RUNNING" in line and f"${row['saving']['usd']:.2f}" in line
    assert "INTERRUPTIONS" in table.stdout and "SAVED" in table.stdout
    no_savings = cli("list", "--no-savings", "--json").json()
    assert all(r["saving"] is None for r in no_savings)


def test_list_shows_the_jobs_whose_prices_aws_refuses_with_the_reason(
    stack: Stack, cli: Cli, monkeypatch: pytest.MonkeyPatch
) -> None:
    stack.spot_prices[("m5.large", "us-east-1a")] = [("2020-01-01T00:00:00Z", "0.032")]
    priced = stack.start_attempt(
        stack.new_job(stack.pools("m5.large"), now=utc(hours=-1)), stack.pools("m5.large")[0], utc(hours=-1)
    )
    refused = stack.start_attempt(
        stack.new_job(stack.pools("m5.large"), now=utc(hours=-1)), stack.pools("m5.large")[0], utc(hours=-1)
    )
    # AWS refuses one job's prices (throttling, a missing DescribeSpotPriceHistory grant).
    original = savings_cmd.Calculator.report

    def report(self: Any, job: Any, now: Any) -> Any:
        if job.job_id == refused.job_id:
            raise ClientError(
                {"Error": {"Code": "UnauthorizedOperation", "Message": "not authorized"}},
                "DescribeSpotPriceHistory",
            )
        return original(self, job, now)

    monkeypatch.setattr(savings_cmd.Calculator, "report", report)
    result = cli("list", "--json")
    assert result.exit_code == 0
    rows = {r["job_id"]: r for r in result.json()}
    assert rows[priced.job_id]["saving"]["usd"] is not None, rows[priced.job_id]["saving"]
    assert rows[refused.job_id]["saving"]["usd"] is None
    assert "DescribeSpotPriceHistory" in rows[refused.job_id]["saving"]["error"]


# --- cancel ------------------------------------------------------------------------------------


def test_cancel_running_job_takes_a_final_checkpoint_then_terminates(stack: Stack, cli: Cli) -> None:
    job = stack.new_job()
    job = stack.start_attempt(job, stack.pools("m5.large")[0], utc())
    job = stack.checkpoint(job, 100, utc(), final=False)
    # The agent's answer to the SSM document lands while the CLI waits.
    cli.deps.sleep = lambda seconds: (stack.checkpoint(job, 180, utc(), final=True), None)[1]

    result = cli("cancel", job.job_id, "--grace", "10", "--json")
    assert result.exit_code == 0, result.stderr
    report = result.json()
    assert report["checkpoint"]["landed"] is True and report["checkpoint"]["step"] == 180
    assert report["status"] == "CANCELLED"
    assert report["terminated_instances"] == [job.instance_id]
    assert stack.store.get(job.job_id).status == JobStatus.CANCELLED
    assert set(stack.instance_states(job.job_id).values()) <= {"shutting-down", "terminated"}
    commands = boto3.client("ssm", region_name=REGION).list_commands()["Commands"]
    assert any(
        c["DocumentName"] == "trainctl-checkpoint" and job.instance_id in c["InstanceIds"] for c in commands
    )


def test_cancel_recognises_a_final_checkpoint_at_the_same_step(stack: Stack, cli: Cli) -> None:
    # Given a running job whose newest periodic checkpoint is at step 100, with steps so
    # slow that the final checkpoint the cancel asks for is at step 100 too
    job = stack.new_job()
    job = stack.start_attempt(job, stack.pools("m5.large")[0], utc())
    job = stack.checkpoint(job, 100, utc(), final=False)
    polls: list[float] = []

    def agent_answers(seconds: float) -> None:
        polls.append(seconds)
        if len(polls) == 1:
            stack.checkpoint(job, 100, utc(), final=True)

    cli.deps.sleep = agent_answers

    # When it is cancelled
    result = cli("cancel", job.job_id, "--grace", "60", "--json")

    # Then the final checkpoint is confirmed as soon as the row records it (one poll, not
    # the whole grace period)
    assert result.exit_code == 0, result.stderr
    report = result.json()
    assert report["checkpoint"]["landed"] is True and report["checkpoint"]["step"] == 100
    assert len(polls) == 1
    assert stack.store.get(job.job_id).status == JobStatus.CANCELLED


def test_cancel_stops_waiting_when_the_checkpoint_command_fails(stack: Stack, cli: Cli) -> None:
    job = stack.new_job()
    job = stack.start_attempt(job, stack.pools("m5.large")[0], utc())
    job = stack.checkpoint(job, 100, utc(), final=False)
    polls: list[float] = []

    def agent_fails(seconds: float) -> None:
        # What SSM reports when `trainctl checkpoint-now` exits 2 on the instance.
        polls.append(seconds)
        command = ssm_backends[ACCOUNT_ID][REGION]._commands[-1]
        for invocation in command.invocations:
            invocation["Status"] = "Failed"
            invocation["StandardErrorContent"] = "trainctl checkpoint-now: checkpoint not durable: no agent\n"

    cli.deps.sleep = agent_fails
    result = cli("cancel", job.job_id, "--grace", "60", "--json")
    assert result.exit_code == 0, result.stderr
    ckpt = result.json()["checkpoint"]
    assert (ckpt["requested"], ckpt["landed"], ckpt["step"]) == (True, False, 100)
    assert ckpt["detail"] == (
        "the checkpoint command ended Failed: trainctl checkpoint-now: checkpoint not durable: no agent"
    )
    assert len(polls) == 1  # not 30 polls of 2 s
    assert stack.store.get(job.job_id).status == JobStatus.CANCELLED


def test_cancel_during_a_recovery_stops_the_workflow_and_every_instance(
    stack: Stack, cli: Cli, monkeypatch: pytest.MonkeyPatch
) -> None:
    job = stack.new_job(stack.pools("m5.large", "c5.xlarge"))
    job = stack.start_attempt(job, stack.pools("m5.large")[0], utc())
    noticed = utc()
    job = stack.interrupt(job, noticed)
    document = resume_input(
        job_id=job.job_id,
        instance_id=job.instance_id,
        attempt=0,
        reason=InterruptionReason.SPOT_WARNING,
        # A short handshake: moto's StopExecution takes effect only when a task-token wait
        # inside a Parallel ends (AWS aborts at once), so let it end soon, but not before
        # the cancel below has run on a busy machine.
        deadline=noticed + jobs.timedelta(seconds=8),
        noticed_at=noticed,
    )
    ResumeStarter(stack.sfn, stack.state_machine_arn).start(document)
    # The workflow launches the replacement and waits for the checkpoint handshake.
    deadline = time.monotonic() + 20
    while len(stack.instance_states(job.job_id)) < 2 and time.monotonic() < deadline:
        time.sleep(0.05)
    assert len(stack.instance_states(job.job_id)) == 2
    # A RunInstances the workflow had in flight lands right after cancel's first sweep.
    backend = ec2_backends[ACCOUNT_ID][REGION]
    sweep = backend.terminate_instances
    late: list[str] = []

    def first_sweep_then_a_launch_lands(instance_ids: list[str]) -> Any:
        terminated = sweep(instance_ids)
        # Cancel's sweep (it takes the old instance too; the workflow's own clean-up
        # would only take its replacement).
        if not late and job.instance_id in instance_ids:
            late.append(stack.launch(job.job_id, 1, stack.pools("c5.xlarge")[0]))
        return terminated

    monkeypatch.setattr(backend, "terminate_instances", first_sweep_then_a_launch_lands)

    result = cli("cancel", job.job_id, "--json")
    assert result.exit_code == 0, result.stderr
    report = result.json()
    assert report["checkpoint"] is None  # not running: nothing to checkpoint
    assert report["stopped_executions"] == [f"{job.job_id}-0"]
    # The second sweep, after the stopped execution was waited for, found the late one.
    assert report["terminated_late"] == late
    assert len(report["terminated_instances"]) == 3 and late[0] in report["terminated_instances"]
    # AWS aborts at once; moto keeps the stopped execution waiting inside the Parallel and
    # then ends it ABORTED or FAILED. Either way it must not have relaunched the job.
    assert stack.wait_execution(f"{job.job_id}-0")["status"] in ("ABORTED", "FAILED")
    # Nothing the workflow did afterwards revived the job or left an instance running.
    assert stack.store.get(job.job_id).status == JobStatus.CANCELLED
    assert set(stack.instance_states(job.job_id).values()) <= {"shutting-down", "terminated"}


def test_cancel_of_an_ended_job(stack: Stack, cli: Cli) -> None:
    job = stack.new_job()
    job = stack.start_attempt(job, stack.pools("m5.large")[0], utc())
    assert job.instance_id is not None
    stack.store.apply(jobs.mark_succeeded(job, instance_id=job.instance_id, now=utc()))
    ended = cli("cancel", job.job_id)
    assert ended.exit_code == 1 and "already ended SUCCEEDED" in ended.stderr
    other = stack.new_job()
    assert cli("cancel", other.job_id).exit_code == 0
    again = cli("cancel", other.job_id)
    assert again.exit_code == 0 and "already CANCELLED" in again.stdout


# --- logs ----------------------------------------------------------------------------------------


def test_logs_prints_the_agent_streams_of_a_job_and_follows(stack: Stack, cli: Cli) -> None:
    job = stack.new_job()
    job = stack.start_attempt(job, stack.pools("m5.large")[0], utc())
    now = time.time()
    stack.put_logs(f"{job.job_id}/0/i-0aaaaaaaaaaaaaaa0", "agent started", "step 10", at=now - 60)
    stack.put_logs(f"{job.job_id}/1/i-0bbbbbbbbbbbbbbb1", "restored step 10", at=now - 30)
    stack.put_logs("some-other-job/0/i-0ccccccccccccccc2", "not mine", at=now - 45)

    result = cli("logs", job.job_id)
    assert result.exit_code == 0, result.stderr
    lines = result.stdout.splitlines()
    assert [li.split(" ", 2)[2] for li in lines] == ["agent started", "step 10", "restored step 10"]
    assert lines[2].split(" ")[1] == "[1]"
    only_first = cli("logs", job.job_id, "--attempt", "1", "--json").stdout.splitlines()
    assert [json.loads(li)["message"] for li in only_first] == ["restored step 10"]

    # --follow: new lines appear while it polls; it stops once the job has ended.
    def agent_writes_and_finishes(seconds: float) -> None:
        stack.put_logs(f"{job.job_id}/0/i-0aaaaaaaaaaaaaaa0", "step 20", "done", at=time.time())
        current = stack.store.get(job.job_id)
        assert current.instance_id is not None
        stack.store.apply(jobs.mark_succeeded(current, instance_id=current.instance_id, now=utc()))

    cli.deps.sleep = agent_writes_and_finishes
    followed = cli("logs", job.job_id, "--follow")
    assert followed.exit_code == 0
    messages = [li.split(" ", 2)[2] for li in followed.stdout.splitlines()]
    assert messages == ["agent started", "step 10", "restored step 10", "step 20", "done"]


def test_logs_follow_prints_a_late_batch_from_another_stream(stack: Stack, cli: Cli) -> None:
    # Given a recovery: the replacement (attempt 1) has logged at t-10 s, while the old
    # instance's (attempt 0) last batch, with lines from t-30 s, has not landed yet
    job = stack.new_job()
    job = stack.start_attempt(job, stack.pools("m5.large")[0], utc())
    now = time.time()
    old, new = f"{job.job_id}/0/i-0aaaaaaaaaaaaaaa0", f"{job.job_id}/1/i-0bbbbbbbbbbbbbbb1"
    stack.put_logs(old, "old: step 10", at=now - 60)
    stack.put_logs(new, "new: restored step 10", at=now - 10)
    polls: list[float] = []

    def old_instance_flushes_then_job_ends(seconds: float) -> None:
        polls.append(seconds)
        if len(polls) == 1:
            # When it lands after the newer lines were printed (older timestamps)
            stack.put_logs(old, "old: step 12", "old: final checkpoint step 12", at=now - 30)
        elif len(polls) == 2:
            current = stack.store.get(job.job_id)
            assert current.instance_id is not None
            stack.store.apply(jobs.mark_succeeded(current, instance_id=current.instance_id, now=utc()))

    cli.deps.sleep = old_instance_flushes_then_job_ends
    followed = cli("logs", job.job_id, "--follow")

    # Then --follow prints it too, once, and nothing twice
    assert followed.exit_code == 0, followed.stderr
    messages = [li.split(" ", 2)[2] for li in followed.stdout.splitlines()]
    assert messages == [
        "old: step 10",
        "new: restored step 10",
        "old: step 12",
        "old: final checkpoint step 12",
    ]


def test_logs_without_a_log_group_says_so(stack: Stack, cli: Cli) -> None:
    job = stack.new_job()
    result = cli("logs", job.job_id, "--log-group", "/nope")
    assert result.exit_code == 1 and "log group /nope does not exist" in result.stderr


# --- interrupt -----------------------------------------------------------------------------------


def test_interrupt_synthetic_puts_the_real_event_shape_on_the_default_bus(stack: Stack, cli: Cli) -> None:
    events = boto3.client("events", region_name=REGION)
    sqs = boto3.client("sqs", region_name=REGION)
    queue = sqs.create_queue(QueueName="spot-warnings")["QueueUrl"]
    queue_arn = sqs.get_queue_attributes(QueueUrl=queue, AttributeNames=["QueueArn"])["Attributes"][
        "QueueArn"
    ]
    # The stack's own rule pattern: the synthetic event must be one the detection rule matches.
    events.put_rule(Name="spot", EventPattern=json.dumps(rule_patterns()["SpotInterruptionWarning"]))
    events.put_targets(Rule="spot", Targets=[{"Id": "q", "Arn": queue_arn}])
    job = stack.new_job()
    job = stack.start_attempt(job, stack.pools("m5.large")[0], utc())

    result = cli("interrupt", job.job_id, "--synthetic", "--json")
    assert result.exit_code == 0, result.stderr
    (message,) = sqs.receive_message(QueueUrl=queue, MaxNumberOfMessages=10)["Messages"]
    event = json.loads(message["Body"])
    assert event["detail"] == {"instance-id": job.instance_id, "instance-action": "terminate"}
    assert event["resources"] == [f"arn:aws:ec2:{REGION}:123456789012:instance/{job.instance_id}"]
    assert event["id"] == result.json()["event_id"]


def test_interrupt_starts_fis_against_this_jobs_instance_only(stack: Stack, cli: Cli) -> None:
    job = stack.new_job()
    job = stack.start_attempt(job, stack.pools("m5.large")[0], utc())
    templates_before = {t["id"] for t in stack.fis.list_experiment_templates()["experimentTemplates"]}

    result = cli("interrupt", job.job_id, "--json")
    assert result.exit_code == 0, result.stderr
    experiment = stack.fis.get_experiment(id=result.json()["experiment_id"])["experiment"]
    (target,) = experiment["targets"].values()
    assert target["resourceArns"] == [f"arn:aws:ec2:{REGION}:123456789012:instance/{job.instance_id}"]
    assert experiment["actions"]["InterruptOne"]["actionId"] == "aws:ec2:send-spot-instance-interruptions"
    # The per-job copy of the template is gone; the stack's template is untouched.
    assert {t["id"] for t in stack.fis.list_experiment_templates()["experimentTemplates"]} == templates_before

    on_demand = stack.new_job()
    on_demand = stack.start_attempt(on_demand, stack.pools("m5.large")[0], utc(), spot=False)
    refused = cli("interrupt", on_demand.job_id)
    assert refused.exit_code == 1 and "on-demand" in refused.stderr
    pending = stack.new_job()
    assert "only a running job" in cli("interrupt", pending.job_id).stderr
