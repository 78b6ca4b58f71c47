"""The recovery metrics the agent reports: computed from the job row, never guessed."""

from __future__ import annotations

import json
from datetime import UTC, datetime, timedelta

from trainctl.agent import recovery_metrics
from trainctl_core import jobs

T0 = datetime(2026, 12, 3, 12, 0, tzinfo=UTC)
POOL = jobs.CapacityPool(instance_type="c7i.large", subnet_id="subnet-0aaa1111")


def _replacement(
    *, kind: jobs.CheckpointKind, resume_step: int | None, last: jobs.CheckpointRef | None
) -> jobs.Job:
    """A job whose attempt 0 was lost without notice and whose attempt 1 is launching."""
    job = jobs.new_job("job-1", jobs.JobSpec(name="t", command=["python", "t.py"], pools=[POOL]), T0)
    job = jobs.apply(
        job,
        jobs.mark_launching(
            job,
            instance_id="i-1",
            pool=None,
            resume_point=jobs.ResumePoint(kind=jobs.CheckpointKind.NONE),
            now=T0,
        ),
    )
    job = jobs.apply(job, jobs.mark_running(job, instance_id="i-1", now=T0))
    if last is not None:
        job = job.model_copy(update={"last_checkpoint": last})
    job = jobs.apply(
        job,
        jobs.mark_interrupted(
            job, instance_id="i-1", reason=jobs.InterruptionReason.TERMINATED_WITHOUT_NOTICE, now=T0
        ),
    )
    point = jobs.ResumePoint(kind=kind, step=resume_step, prefix=None if resume_step is None else "p/")
    return jobs.apply(
        job,
        jobs.mark_launching(
            job, instance_id="i-2", pool=None, resume_point=point, now=T0 + timedelta(seconds=5)
        ),
    )


def _parsed(lines: list[str]) -> dict[str, dict[str, object]]:
    return {record["trainctl_metric"]: record for record in map(json.loads, lines)}


def test_lost_steps_count_what_the_last_heartbeat_saw_beyond_the_resume_point() -> None:
    last = jobs.CheckpointRef(step=100, prefix="p/", attempt=0, created_at=T0)
    job = _replacement(kind=jobs.CheckpointKind.FALLBACK, resume_step=100, last=last)

    lines = recovery_metrics.resumed_lines(
        job, {"heartbeat_step": 137}, resumed_at=T0 + timedelta(seconds=42), pool="c7i.large@us-east-1b"
    )

    reported = _parsed(lines)
    assert reported["LostSteps"]["value"] == 37
    assert reported["TimeToResume"]["value"] == 42.0
    assert reported["Replacements"]["pool"] == "c7i.large@us-east-1b"


def test_a_replacement_starting_from_scratch_lost_everything_the_old_attempt_trained() -> None:
    job = _replacement(kind=jobs.CheckpointKind.NONE, resume_step=None, last=None)

    reported = _parsed(recovery_metrics.resumed_lines(job, {"heartbeat_step": 12}, resumed_at=T0, pool=None))

    assert reported["LostSteps"]["value"] == 12
    assert "Replacements" not in reported  # no pool known (not on EC2): left out, not guessed


def test_nothing_is_known_about_the_old_attempt_so_no_lost_steps_are_reported() -> None:
    job = _replacement(kind=jobs.CheckpointKind.NONE, resume_step=None, last=None)

    reported = _parsed(recovery_metrics.resumed_lines(job, {}, resumed_at=T0, pool=None))

    assert "LostSteps" not in reported and "TimeToResume" in reported


def test_a_first_attempt_is_a_launch_not_a_recovery() -> None:
    job = jobs.new_job("job-1", jobs.JobSpec(name="t", command=["python", "t.py"], pools=[POOL]), T0)

    assert (
        recovery_metrics.resumed_lines(job, {"heartbeat_step": 5}, resumed_at=T0, pool="c7i.large@us-east-1a")
        == []
    )


def test_time_to_checkpoint_prefers_the_recorded_notice_over_the_agents_own() -> None:
    job = _replacement(kind=jobs.CheckpointKind.NONE, resume_step=None, last=None)  # attempt 0 noticed at T0

    [line] = recovery_metrics.final_checkpoint_lines(
        job, attempt=0, durable_at=T0 + timedelta(seconds=3.5), agent_noticed_at=T0 + timedelta(seconds=1)
    )
    assert json.loads(line)["value"] == 3.5
    # Without a recorded notice the agent's own moment of receipt counts; without either, nothing.
    [line] = recovery_metrics.final_checkpoint_lines(
        job, attempt=1, durable_at=T0 + timedelta(seconds=3.5), agent_noticed_at=T0 + timedelta(seconds=1)
    )
    assert json.loads(line)["value"] == 2.5
    assert recovery_metrics.final_checkpoint_lines(job, attempt=1, durable_at=T0, agent_noticed_at=None) == []
