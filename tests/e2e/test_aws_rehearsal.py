"""The rehearsal against real AWS (opt-in: TRAINCTL_E2E=1; costs money, see docs/REHEARSE.md).

Deploys the stack to the caller's account, submits the tiny numpy job with `trainctl
submit`, interrupts its Spot instance with the stack's FIS experiment template once it is
training, waits for the job to finish and applies the same verdict as `trainctl rehearse`
(trainctl.rehearse.verdict): the final checkpoint's files are identical to an
uninterrupted local run's, the noticed interruption lost no step, one replacement. The
stack is destroyed in `finally`, even when an assertion fails.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest

from trainctl.rehearse import verdict
from trainctl.rehearse.scenario import Options, resolve_script, run_reference

pytestmark = [
    pytest.mark.e2e,
    pytest.mark.skipif(os.environ.get("TRAINCTL_E2E") != "1", reason="real AWS: set TRAINCTL_E2E=1"),
    pytest.mark.timeout(3600),
]

REPO = Path(__file__).resolve().parents[2]
STACK = os.environ.get("TRAINCTL_E2E_STACK", "TrainctlE2E")
TRAINING = {"TRAIN_STEPS": "3000", "TRAIN_STEP_SECONDS": "0.1", "TRAIN_CHECKPOINT_EVERY": "100"}


def _run(*argv: str, **kwargs: Any) -> subprocess.CompletedProcess[str]:
    return subprocess.run(list(argv), cwd=REPO, text=True, capture_output=True, check=True, **kwargs)


def _trainctl(*argv: str) -> dict[str, Any]:
    done = _run(sys.executable, "-m", "trainctl.cli", *argv, "--stack", STACK, "--json")
    parsed: dict[str, Any] = json.loads(done.stdout)
    return parsed


def _wait(predicate: Any, timeout: float, what: str) -> Any:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(15)
    raise AssertionError(f"timed out waiting for {what}")


def test_spot_interruption_on_aws_passes_the_rehearsal_verdict(tmp_path: Path) -> None:
    import boto3

    from trainctl_core.checkpoints import S3CheckpointStorage

    reference = run_reference(
        Options(script=resolve_script("tiny_train"), environment=TRAINING),
        "e2e-reference",
        tmp_path / "reference",
    )
    spec = tmp_path / "trainctl.yaml"
    spec.write_text(
        "name: e2e-tiny\n"
        "script: training/examples/tiny_train.py\n"
        "pools: {instance_types: [m5.large, c5.large]}\n"
        "checkpoint: {interval_seconds: 60, retention: 100}\n"
        f"env: {json.dumps(TRAINING)}\n"
    )
    cdk = [
        "npx",
        "--no-install",
        "cdk",
        "--app",
        f"{sys.executable} -m infra.app",
        "-c",
        f"trainctl:stack_name={STACK}",
    ]
    try:
        _run(*cdk, "deploy", "--require-approval", "never")
        job = _trainctl("submit", "--spec", str(spec))
        job_id = job["job_id"]
        _wait(lambda: _trainctl("status", job_id).get("status") == "RUNNING", 900, "the job to run")
        outputs = {
            o["OutputKey"]: o["OutputValue"]
            for o in boto3.client("cloudformation").describe_stacks(StackName=STACK)["Stacks"][0]["Outputs"]
        }
        interrupted = _trainctl("status", job_id)
        boto3.client("fis").start_experiment(experimentTemplateId=outputs["GameDayExperimentTemplateId"])
        noticed = time.time()
        # The last step attempt 0 made durable before the loss, then where attempt 1 resumed.
        last_step = None
        while True:
            status = _trainctl("status", job_id)
            if status["attempt"] == interrupted["attempt"] and status.get("last_checkpoint"):
                last_step = max(last_step or 0, int(status["last_checkpoint"]["step"]))
            if status["attempt"] != interrupted["attempt"] or status["status"] in ("SUCCEEDED", "FAILED"):
                break
            time.sleep(5)
        resumed = _wait(lambda: (s := _trainctl("status", job_id)).get("resume_point") and s, 900, "a resume")
        final = _wait(
            lambda: (s := _trainctl("status", job_id)).get("status") in ("SUCCEEDED", "FAILED") and s,
            3000,
            "the end",
        )
        storage = S3CheckpointStorage(boto3.client("s3"), outputs["CheckpointBucketName"], job_id)
        run_digests = verdict.checkpoint_digests(storage, job_id)
        last = max(run_digests)
        outcome = verdict.InterruptionOutcome(
            index=0,
            job_id=job_id,
            attempt=int(interrupted["attempt"]),
            instance_id=str(interrupted["instance_id"]),
            pool=str(interrupted.get("pool")),
            kind="notice",
            noticed_at=noticed,
            last_step=last_step,
            resume_step=resumed["resume_point"].get("step"),
            checkpoint_kind=resumed["resume_point"].get("kind"),
        )
        judged = verdict.judge(
            # On AWS the artifact stays on the instance: compare the final checkpoints' files.
            reference_sha256=str(sorted(reference["digests"][reference["steps"]][1])),
            final_sha256=str(sorted(run_digests[last][1])),
            job_status=str(final["status"]),
            outcomes=[outcome],
            planned=1,
            duplicate_replacements=max(0, int(final.get("attempt", 0)) - 1),
            reference_digests=reference["digests"],
            run_digests=run_digests,
        )
        assert judged.passed, (judged.reasons, judged.divergence)
        assert outcome.checkpoint_kind == "final"
    finally:
        subprocess.run([*cdk, "destroy", "--force"], cwd=REPO, check=False)
