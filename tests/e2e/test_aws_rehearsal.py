"""The rehearsal's verdict against real AWS. Opt-in (TRAINCTL_E2E=1): it costs money.

1. `cdk deploy` the stack (`$TRAINCTL_E2E_STACK`, default TrainctlE2E) with the rehearsal's
   stage context (`trainctl.rehearse.stack.REHEARSAL_CONTEXT`: m5.large and c5.large
   allowed; the default stack allows only GPU types and this job is a small CPU script).
2. `trainctl push --build` the bundled training image (training/Dockerfile: the agent, the
   examples, CPU PyTorch) to the stack's ECR repository.
3. `trainctl submit` two identical jobs of the bundled PyTorch example in that image: a
   reference that is never interrupted, and one that `trainctl interrupt` interrupts (the
   stack's FIS experiment aimed at that job's instance only: a real Spot interruption)
   once it has trained a while. The reference runs on AWS, not here: floating-point
   results are bit-identical only on the same kind of CPU with the same libraries, and
   both jobs share the image and the instance types (all Intel Xeon with AVX-512).
4. The interrupted job's row is polled: the newest heartbeat step of the interrupted
   attempt (and its newest checkpoint) is what it trained before the loss; the first
   heartbeat of the next attempt is when training resumed. Recovery is measured from the
   warning itself, the EventBridge event's time that the interruption handler recorded
   on the row (`interruptions[].noticed_at`), not from when `trainctl interrupt`
   returned: FIS sends the warning some time after the experiment starts. `verdict.judge`, the code
   `trainctl rehearse` uses, then requires: SUCCEEDED, the final checkpoint's files equal
   to the reference's (per-file hashes from the manifests), 0 lost steps, and one
   instance per attempt (counted from the instances' EC2 tags). The resume point must be
   the `final` checkpoint.
5. `finally`, even when an assertion failed: cancel unfinished jobs, terminate their
   instances, empty the stack's buckets (all versions) and ECR repository, `cdk destroy`;
   a teardown that fails fails the test, naming what is left.

Prerequisites: credentials for an account you may deploy to, bootstrapped for CDK
(`npx cdk bootstrap`), Node (the pinned CDK CLI: `npm ci`), a Docker daemon (the image
build), Spot capacity for m5.large/c5.large in the region. Cost: two or three m5/c5.large
Spot instances with 200 GiB gp3 roots for ~30 minutes, a ~1 GB image in ECR, the stack's
VPC endpoints while it exists, FIS action-minutes and a few Lambda/Step Functions/
DynamoDB/S3 requests: well under 1 USD per run (check your region's prices).

    TRAINCTL_E2E=1 AWS_PROFILE=... .venv/bin/python -m pytest tests/e2e -m e2e
"""

from __future__ import annotations

import hashlib
import json
import os
import secrets
import subprocess
import sys
import time
from collections import Counter
from collections.abc import Callable
from datetime import datetime
from pathlib import Path
from typing import Any

import pytest

from trainctl.rehearse import verdict
from trainctl.rehearse.stack import REHEARSAL_CONTEXT

pytestmark = [
    pytest.mark.e2e,
    pytest.mark.skipif(os.environ.get("TRAINCTL_E2E") != "1", reason="real AWS: set TRAINCTL_E2E=1"),
    pytest.mark.timeout(5400),
]

REPO = Path(__file__).resolve().parents[2]
STACK = os.environ.get("TRAINCTL_E2E_STACK", "TrainctlE2E")
# ~5 minutes of training (0.1 s a step), a checkpoint every 100 steps.
TRAINING = {"TRAIN_STEPS": "3000", "TRAIN_STEP_SECONDS": "0.1", "TRAIN_CHECKPOINT_EVERY": "100"}
INTERRUPT_AT_STEP = 500  # several periodic checkpoints in, most of the run still to go
TERMINAL = ("SUCCEEDED", "FAILED", "CANCELLED")
CDK = [
    "npx",
    "--no-install",
    "cdk",
    "--app",
    f"{sys.executable} -m infra.app",
    "-c",
    f"trainctl:stack_name={STACK}",
    *(arg for key, value in REHEARSAL_CONTEXT.items() for arg in ("-c", f"{key}={value}")),
]


def _run(*argv: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    return subprocess.run(list(argv), cwd=REPO, text=True, capture_output=True, check=check)


def _trainctl(*argv: str) -> dict[str, Any]:
    done = _run(sys.executable, "-m", "trainctl.cli", *argv, "--stack", STACK, "--json")
    parsed: dict[str, Any] = json.loads(done.stdout)
    return parsed


def _wait(what: str, timeout: float, predicate: Callable[[], Any], every: float = 10) -> Any:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(every)
    raise AssertionError(f"timed out after {timeout:.0f} s waiting for {what}")


def _time(value: Any) -> datetime | None:
    return datetime.fromisoformat(str(value).replace("Z", "+00:00")) if value else None


def _spec(path: Path, name: str, image: str) -> Path:
    path.write_text(
        json.dumps(  # JSON is YAML
            {
                "name": name,
                "image": image,
                "command": ["python", "/opt/trainctl/examples/train.py"],
                "pools": {"instance_types": REHEARSAL_CONTEXT["trainctl:allowed_instance_types"].split(",")},
                "checkpoint": {"retention": 100},  # every checkpoint, for `divergence`
                "env": TRAINING,
            }
        )
    )
    return path


def _final_files(digests: verdict.Digests) -> str | None:
    """One hash of the newest checkpoint's files (the artifact stays on the instance)."""
    if not digests:
        return None
    files = sorted(digests[max(digests)][1])
    return hashlib.sha256(json.dumps(files).encode()).hexdigest()


def _instances_per_attempt(ec2: Any, job_id: str) -> Counter[int]:
    from trainctl_core.settings import TAG_ATTEMPT, TAG_JOB_ID

    pages = ec2.get_paginator("describe_instances").paginate(
        Filters=[{"Name": f"tag:{TAG_JOB_ID}", "Values": [job_id]}]
    )
    counts: Counter[int] = Counter()
    for reservation in (r for page in pages for r in page["Reservations"]):
        for instance in reservation["Instances"]:
            tags = {t["Key"]: t["Value"] for t in instance.get("Tags", [])}
            counts[int(tags.get(TAG_ATTEMPT, "0"))] += 1
    return counts


def test_spot_interruption_on_aws_passes_the_rehearsal_verdict(tmp_path: Path) -> None:
    import boto3

    from trainctl.commands.stack import OUTPUT_CHECKPOINT_BUCKET, OUTPUT_JOBS_TABLE
    from trainctl_core.checkpoints import S3CheckpointStorage
    from trainctl_core.jobs import InterruptionReason
    from trainctl_core.store import JobStore

    suffix = secrets.token_hex(3)
    reference_id, job_id = f"e2e-reference-{suffix}", f"e2e-interrupted-{suffix}"
    try:
        _run(*CDK, "deploy", "--require-approval", "never")
        # The bundled image (no Dockerfile in the project directory given).
        pushed = _trainctl("push", "--build", "--project", str(tmp_path), "--tag", f"e2e-{suffix}")
        for name in (reference_id, job_id):
            spec = _spec(tmp_path / f"{name}.json", name, pushed["image"])
            _trainctl("submit", "--spec", str(spec), "--job-id", name)

        # Interrupt once the job has trained a while.
        def trained_a_while() -> dict[str, Any] | None:
            status = _trainctl("status", job_id)
            assert status["status"] not in TERMINAL, f"the job ended before the interruption: {status}"
            step = status.get("heartbeat_step") or 0
            return status if status["status"] == "RUNNING" and step >= INTERRUPT_AT_STEP else None

        before = _wait("the job to train", 1800, trained_a_while)
        _trainctl("interrupt", job_id)
        old_attempt, old_instance = int(before["attempt"]), str(before["instance_id"])

        # Follow the row: what the interrupted attempt trained, where and when the next resumed.
        last_step: int | None = None
        resume_point: dict[str, Any] | None = None
        resumed_at: float | None = None
        next_attempt_seen: datetime | None = None
        deadline = time.monotonic() + 3000
        while True:
            now = datetime.now().astimezone()
            status = _trainctl("status", job_id)
            # Heartbeats are fenced on instance and attempt: while the row names the old
            # instance, its heartbeats are the interrupted attempt's.
            if status.get("instance_id") == old_instance and status.get("heartbeat_step") is not None:
                last_step = max(last_step or 0, int(status["heartbeat_step"]))
            checkpoint = status.get("last_checkpoint") or {}
            if checkpoint and int(checkpoint["attempt"]) == old_attempt:
                last_step = max(last_step or 0, int(checkpoint["step"]))
            if int(status["attempt"]) > old_attempt:
                next_attempt_seen = next_attempt_seen or now
                resume_point = resume_point or status.get("resume_point")
                beat = _time(status.get("heartbeat_at"))
                replaced = status.get("instance_id") != old_instance
                if resumed_at is None and replaced and beat is not None and beat > next_attempt_seen:
                    resumed_at = beat.timestamp()
            if status["status"] in TERMINAL:
                break
            assert time.monotonic() < deadline, f"job {job_id} did not end: {status}"
            time.sleep(5)
        final = status
        reference = _wait(
            "the reference to end",
            1800,
            lambda: (s := _trainctl("status", reference_id))["status"] in TERMINAL and s,
        )

        outputs = {
            o["OutputKey"]: o["OutputValue"]
            for o in boto3.client("cloudformation").describe_stacks(StackName=STACK)["Stacks"][0]["Outputs"]
        }
        # When EC2 issued the warning: the event's time, as the handler recorded it.
        row = JobStore(boto3.client("dynamodb"), outputs[OUTPUT_JOBS_TABLE]).get(job_id)
        interruption = row.interruption_for(old_attempt)
        assert interruption is not None, f"no interruption of attempt {old_attempt} on the row: {row}"
        assert interruption.reason == InterruptionReason.SPOT_WARNING, (
            f"the loss was recorded as {interruption.reason}, not from the Spot warning"
        )
        noticed = interruption.noticed_at.timestamp()
        digests = {}
        for name in (reference_id, job_id):
            storage = S3CheckpointStorage(boto3.client("s3"), outputs[OUTPUT_CHECKPOINT_BUCKET], name)
            try:
                digests[name] = verdict.checkpoint_digests(storage, name)
            finally:
                storage.close()  # type: ignore[attr-defined]
        per_attempt = _instances_per_attempt(boto3.client("ec2"), job_id)
        point = resume_point or {}
        outcome = verdict.InterruptionOutcome(
            index=0,
            job_id=job_id,
            attempt=old_attempt,
            instance_id=old_instance,
            pool=str(before.get("pool")),
            kind="notice",
            noticed_at=noticed,
            resumed_at=resumed_at,
            last_step=last_step,
            resume_step=point.get("step"),
            checkpoint_kind=point.get("kind"),
        )
        judged = verdict.judge(
            reference_sha256=_final_files(digests[reference_id]),
            final_sha256=_final_files(digests[job_id]),
            job_status=str(final["status"]),
            outcomes=[outcome],
            planned=1,
            # A second, real Spot interruption is a new attempt, not a duplicate.
            duplicate_replacements=sum(n - 1 for n in per_attempt.values()),
            reference_digests=digests[reference_id],
            run_digests=digests[job_id],
            failure_reason=final.get("failure_reason"),
        )
        assert reference["status"] == "SUCCEEDED", reference
        assert judged.passed, (judged.reasons, judged.divergence)
        assert outcome.checkpoint_kind == "final"
        print(
            f"recovery {outcome.recovery_seconds} s, lost steps {outcome.lost_steps}, instances {per_attempt}"
        )
    finally:
        _teardown([reference_id, job_id])


def _teardown(job_ids: list[str]) -> None:
    """Leave nothing behind that costs money; raise naming whatever could not be removed."""
    import boto3

    from trainctl_core.settings import TAG_JOB_ID

    problems: list[str] = []

    def attempt(what: str, action: Callable[[], object]) -> None:
        try:
            action()
        except Exception as exc:  # keep tearing down; report everything at the end
            problems.append(f"{what}: {type(exc).__name__}: {exc}")

    ec2, cfn = boto3.client("ec2"), boto3.client("cloudformation")
    for job_id in job_ids:
        # Instances the workflow launched are not the stack's: end the job, then them.
        _run(
            sys.executable,
            "-m",
            "trainctl.cli",
            "cancel",
            job_id,
            "--no-checkpoint",
            "--stack",
            STACK,
            check=False,
        )

    def terminate_leftovers() -> None:
        pages = ec2.get_paginator("describe_instances").paginate(
            Filters=[
                {"Name": f"tag:{TAG_JOB_ID}", "Values": job_ids},
                {"Name": "instance-state-name", "Values": ["pending", "running", "stopping", "stopped"]},
            ]
        )
        live = [i["InstanceId"] for page in pages for r in page["Reservations"] for i in r["Instances"]]
        if live:
            ec2.terminate_instances(InstanceIds=live)
            ec2.get_waiter("instance_terminated").wait(InstanceIds=live)

    attempt("terminate the jobs' instances", terminate_leftovers)
    # Twice at most: access logs may land in the logs bucket after it was emptied.
    for last_round in (False, True):
        emptying: list[str] = []
        try:
            pages = cfn.get_paginator("list_stack_resources").paginate(StackName=STACK)
            resources = [r for page in pages for r in page["StackResourceSummaries"]]
        except Exception as exc:  # no stack (the deploy failed early): destroy is still tried
            resources, emptying = [], [f"list stack resources: {exc}"]
        for resource in resources:
            # CloudFormation cannot delete a non-empty bucket or repository.
            kind, name = resource["ResourceType"], resource["PhysicalResourceId"]
            empty = {"AWS::S3::Bucket": _empty_bucket, "AWS::ECR::Repository": _empty_repository}.get(kind)
            if empty is not None:
                try:
                    empty(name)
                except Exception as exc:
                    emptying.append(f"empty {name}: {type(exc).__name__}: {exc}")
        destroyed = _run(*CDK, "destroy", "--force", check=False)
        if destroyed.returncode == 0:
            break
        if last_round:
            problems += [*emptying, f"cdk destroy exited {destroyed.returncode}: {destroyed.stderr[-2000:]}"]
    if problems:
        raise AssertionError(f"teardown of {STACK} incomplete; check the account:\n" + "\n".join(problems))


def _empty_bucket(name: str) -> None:
    import boto3

    boto3.resource("s3").Bucket(name).object_versions.delete()  # every version and delete marker


def _empty_repository(name: str) -> None:
    import boto3

    ecr = boto3.client("ecr")
    for page in ecr.get_paginator("list_images").paginate(repositoryName=name):
        if page["imageIds"]:
            ecr.batch_delete_image(repositoryName=name, imageIds=page["imageIds"])
