"""Savings arithmetic against a case computed by hand (pure: no AWS, no moto)."""

from __future__ import annotations

from dataclasses import replace
from datetime import UTC, datetime, timedelta

import pytest

from trainctl.commands.costs import (
    AgentMarks,
    CostError,
    InstanceFacts,
    PricePoint,
    UnknownInstanceType,
    agent_marks,
    overheads_from_job,
    savings_report,
    spot_cost,
    transition_time,
    usages_from_job,
)
from trainctl_core import jobs
from trainctl_core.jobs import CapacityPool, CheckpointRef, JobSpec

T = datetime(2026, 1, 5, 10, 0, 0, tzinfo=UTC)
A = "subnet-0aaaaaaaaaaaaaaaa"
B = "subnet-0bbbbbbbbbbbbbbbb"


def at(minutes: float) -> datetime:
    return T + timedelta(minutes=minutes)


def _two_attempts(
    *,
    reason: jobs.InterruptionReason = jobs.InterruptionReason.SPOT_WARNING,
    final: bool,
    replacement_at: float | None,
    succeeded_at: float | None = 120.5,
) -> jobs.Job:
    """Attempt 0: m5.large spot in zone a, launched 10:00, periodic checkpoint (step 500)
    at 10:50, notice at 11:00 with the deadline at 11:02; with `final`, its final
    checkpoint (step 600) snapshotted at 11:00:10. Attempt 1: c5.xlarge spot in zone b,
    launched at `replacement_at` (minutes after 10:00; None: not yet), until `succeeded_at`."""
    spec = JobSpec(
        name="hand",
        command=["python", "train.py"],
        pools=[
            CapacityPool(instance_type="m5.large", subnet_id=A),
            CapacityPool(instance_type="c5.xlarge", subnet_id=B),
        ],
    )
    job = jobs.new_job("hand-case", spec, T)
    job = jobs.apply(
        job,
        jobs.mark_launching(
            job,
            instance_id="i-0000000000000000a",
            pool=f"m5.large@{A}",
            resume_point=jobs.ResumePoint(kind="none"),
            now=at(0),
        ),
    )
    job = jobs.apply(job, jobs.mark_running(job, instance_id="i-0000000000000000a", now=at(0)))
    ckpt = CheckpointRef(step=500, prefix="hand-case/ckpt/500/", attempt=0, created_at=at(50))
    job = job.model_copy(update={"last_checkpoint": ckpt})
    deadline = at(62) if reason != jobs.InterruptionReason.TERMINATED_WITHOUT_NOTICE else None
    job = jobs.apply(
        job,
        jobs.mark_interrupted(
            job, instance_id="i-0000000000000000a", reason=reason, now=at(60), deadline=deadline
        ),
    )
    resume = jobs.ResumePoint(kind="fallback", step=500, prefix=ckpt.prefix)
    if final:
        last = CheckpointRef(
            step=600, prefix="hand-case/ckpt/600/", attempt=0, created_at=at(60) + SECOND * 10
        )
        job = job.model_copy(update={"last_checkpoint": last, "final_checkpoint": last})
        resume = jobs.ResumePoint(kind="final", step=600, prefix=last.prefix)
    if replacement_at is None:
        return job  # still recovering
    job = jobs.apply(
        job,
        jobs.mark_launching(
            job,
            instance_id="i-0000000000000000b",
            pool=f"c5.xlarge@{B}",
            resume_point=resume,
            now=at(replacement_at),
        ),
    )
    job = jobs.apply(job, jobs.mark_running(job, instance_id="i-0000000000000000b", now=at(replacement_at)))
    if succeeded_at is None:
        return job
    return jobs.apply(job, jobs.mark_succeeded(job, instance_id="i-0000000000000000b", now=at(succeeded_at)))


SECOND = timedelta(seconds=1)


def hand_case() -> jobs.Job:
    """The final-checkpoint case: replacement launched 11:00:30, job succeeded 12:00:30."""
    return _two_attempts(final=True, replacement_at=60.5)


def fallback_case() -> jobs.Job:
    """The handshake timed out: attempt 1 resumed from the periodic checkpoint of 10:50."""
    return _two_attempts(final=False, replacement_at=60.5)


FACTS = {
    "i-0000000000000000a": InstanceFacts(instance_type="m5.large", zone="us-east-1a", market="spot"),
    "i-0000000000000000b": InstanceFacts(instance_type="c5.xlarge", zone="us-east-1b", market="spot"),
}
HISTORY = {
    ("m5.large", "us-east-1a"): [PricePoint(at(-60), 0.030), PricePoint(at(30), 0.040)],
    ("c5.xlarge", "us-east-1b"): [PricePoint(at(0), 0.068)],
}
# What the agents reported: attempt 0's final checkpoint durable 40 s after the notice
# (11:00:40), attempt 1 training again 90 s after it (11:01:30).
MARKS = {
    0: AgentMarks(final_durable_at=at(60) + 40 * SECOND),
    1: AgentMarks(resumed_at=at(60) + 90 * SECOND),
}


def test_report_matches_the_hand_computed_case() -> None:
    job = hand_case()
    now = at(200)  # long after the end: a finished job's windows do not grow
    report = savings_report(
        job.job_id,
        usages_from_job(job, FACTS, now, MARKS),
        overheads_from_job(job, now, FACTS, MARKS),
        HISTORY,
    )

    first, second = report.attempts
    # Attempt 0 ends when the workflow retired it: after the replacement's launch
    # (11:00:30) and the final checkpoint's durability (11:00:40), the later one; well
    # before the 11:02 deadline. 10:00:00-11:00:40 = 3640 s.
    assert (first.usage.seconds, first.usage.ended_by) == (3640, "agent")
    # Paid: 10:00-10:30 = 1800 s at 0.030 + 10:30-11:00:40 = 1840 s at 0.040
    #     = 0.015 + 0.0204444 = 0.0354444.
    assert first.paid_usd == pytest.approx(1800 / 3600 * 0.030 + 1840 / 3600 * 0.040)
    assert first.on_demand_usd == pytest.approx(3640 / 3600 * 0.096)  # 0.0970667
    # Useful: it trained 10:00-11:00 (after the notice it only checkpoints), nothing lost
    # (final checkpoint): 3600 s; baseline 3600 s x 0.096/h = 0.096.
    assert first.usage.useful == 3600
    assert first.baseline_usd == pytest.approx(0.096)
    # Attempt 1: 11:00:30-12:00:30 = 3600 s at 0.068 (on-demand 0.17). It trains from
    # 11:01:30 (the agent's resume) to 12:00:30: 3540 s; baseline 3540 x 0.17/3600 = 0.1671667.
    assert (second.usage.seconds, second.usage.ended_by) == (3600, "job-end")
    assert second.paid_usd == pytest.approx(0.068)
    assert second.on_demand_usd == pytest.approx(0.17)
    assert second.usage.useful == 3540
    assert second.baseline_usd == pytest.approx(3540 / 3600 * 0.17)

    (overhead,) = report.interruptions
    assert overhead.lost_seconds == 0  # final checkpoint
    assert overhead.recovery_seconds == 30  # notice 11:00:00 -> replacement 11:00:30
    assert overhead.overlap_seconds == 10  # replacement 11:00:30 -> old retired 11:00:40
    assert overhead.boot_seconds == 50  # old retired 11:00:40 -> training resumed 11:01:30

    assert report.billed_seconds == 7240
    assert report.useful_seconds == 7140
    assert report.paid_usd == pytest.approx(0.1034444, abs=1e-6)  # 0.0354444 + 0.068
    assert report.on_demand_same_seconds_usd == pytest.approx(0.2670667, abs=1e-6)
    assert report.baseline_usd == pytest.approx(0.2631667, abs=1e-6)  # 0.096 + 0.1671667
    assert report.net_saving_usd == pytest.approx(0.1597222, abs=1e-6)  # 0.2631667 - 0.1034444
    assert report.net_saving_pct == pytest.approx(60.69, abs=0.01)  # 0.1597222 / 0.2631667
    assert report.unknown_boot == 0


def test_fallback_case_excludes_lost_and_after_notice_seconds() -> None:
    job = fallback_case()
    now = at(200)
    report = savings_report(
        job.job_id, usages_from_job(job, FACTS, now), overheads_from_job(job, now), HISTORY
    )

    first, second = report.attempts
    # No final checkpoint: the handshake waited until its timeout (the 11:02 deadline), and
    # the workflow retired the old instance then. 10:00-11:02 = 3720 s, paid 30 min at
    # 0.030 + 32 min at 0.040 = 0.0363333, on-demand 3720 s x 0.096/h = 0.0992.
    assert (first.usage.seconds, first.usage.ended_by) == (3720, "deadline")
    assert first.paid_usd == pytest.approx(0.5 * 0.030 + 32 / 60 * 0.040)
    # It trained 10:00-11:00 (3600 s), of which 10:50-11:00 (600 s) is redone by attempt 1:
    # useful 3000 s, baseline 3000 x 0.096/3600 = 0.08.
    assert first.usage.useful == 3000
    # Attempt 1 (no agent lines): the earliest it can train is when the old instance was
    # retired (11:02), so 11:02-12:00:30 = 3510 s counts, baseline 3510 x 0.17/3600 = 0.16575.
    assert second.usage.useful == 3510

    (overhead,) = report.interruptions
    assert overhead.lost_seconds == 600  # notice 11:00 - periodic checkpoint 10:50
    assert overhead.recovery_seconds == 30  # notice 11:00 -> replacement 11:00:30
    assert overhead.overlap_seconds == 90  # replacement 11:00:30 -> retired 11:02
    assert overhead.boot_seconds is None  # when it resumed is unknown
    assert report.unknown_boot == 1

    assert report.paid_usd == pytest.approx(0.1043333, abs=1e-6)  # 0.0363333 + 0.068
    assert report.on_demand_same_seconds_usd == pytest.approx(0.2692)  # 0.0992 + 0.17
    assert report.baseline_usd == pytest.approx(0.08 + 0.16575)  # 0.24575
    assert report.net_saving_usd == pytest.approx(0.24575 - 0.1043333, abs=1e-6)  # 0.1414167
    assert report.net_saving_pct == pytest.approx(57.55, abs=0.01)


def test_without_agent_lines_the_row_bounds_the_windows() -> None:
    job = hand_case()
    (first, second) = usages_from_job(job, FACTS, at(200))
    # Retired after both the launch (11:00:30) and the final checkpoint's snapshot
    # (11:00:10): 11:00:30, a lower bound (the upload after the snapshot is not on the row).
    assert (first.ended_at, first.ended_by) == (at(60.5), "launch")
    # Training on attempt 1 cannot start before that: 11:00:30-12:00:30.
    assert second.useful == 3600
    (overhead,) = overheads_from_job(job, at(200), FACTS)
    assert (overhead.overlap_seconds, overhead.boot_seconds) == (0, None)


def test_ec2s_termination_time_wins_but_never_past_a_spot_deadline() -> None:
    job = hand_case()
    retired = {
        **FACTS,
        "i-0000000000000000a": replace(FACTS["i-0000000000000000a"], ended_at=at(60) + 43 * SECOND),
    }
    (first, _) = usages_from_job(job, retired, at(200), MARKS)
    assert (first.seconds, first.ended_by) == (3643, "ec2")  # 10:00:00-11:00:43
    late = {**FACTS, "i-0000000000000000a": replace(FACTS["i-0000000000000000a"], ended_at=at(70))}
    (first, _) = usages_from_job(job, late, at(200), MARKS)
    # AWS reclaims a warned Spot instance at the deadline (11:02) whatever else is said.
    assert (first.ended_at, first.ended_by) == (at(62), "deadline")


def test_a_migrating_rebalance_bills_until_retired_even_past_the_deadline() -> None:
    # The replacement took until 11:05 to launch (capacity fallback), after the +120 s mark.
    warned = _two_attempts(final=True, replacement_at=65)
    migrated = _two_attempts(final=True, replacement_at=65, reason=jobs.InterruptionReason.REBALANCE_MIGRATE)
    (spot, _) = usages_from_job(warned, FACTS, at(200))
    (rebalance, _) = usages_from_job(migrated, FACTS, at(200))
    assert (spot.ended_at, spot.ended_by) == (at(62), "deadline")  # reclaimed by AWS
    assert (rebalance.ended_at, rebalance.ended_by) == (at(65), "launch")  # retired by the workflow


def test_a_loss_without_notice_ends_at_the_notice() -> None:
    job = _two_attempts(
        final=False, replacement_at=61, reason=jobs.InterruptionReason.TERMINATED_WITHOUT_NOTICE
    )
    (first, second) = usages_from_job(job, FACTS, at(200))
    assert (first.ended_at, first.ended_by) == (at(60), "notice")
    # 10:00-11:00 trained, the 10 minutes since the 10:50 checkpoint redone.
    assert first.useful == 3000
    assert second.useful == (at(120.5) - at(61)).total_seconds()


def test_a_recovery_in_progress_bills_the_old_instance_until_the_deadline() -> None:
    job = _two_attempts(final=False, replacement_at=None)
    assert job.status == jobs.JobStatus.INTERRUPTED
    (first,) = usages_from_job(job, FACTS, at(61))
    assert (first.ended_at, first.ended_by) == (at(61), "now")
    (first,) = usages_from_job(job, FACTS, at(90))
    assert (first.ended_at, first.ended_by) == (at(62), "deadline")


def test_agent_marks_come_from_this_jobs_metric_lines() -> None:
    job = hand_case()
    line = '{{"trainctl_metric":"{}","value":{},"unit":"Seconds","job_id":"{}"}}'
    marks = agent_marks(
        job,
        [
            ("hand-case/0/i-0000000000000000a", "checkpoint: step 600 durable"),  # not a metric line
            ("hand-case/0/i-0000000000000000a", line.format("TimeToCheckpoint", 40, "hand-case")),
            ("hand-case/1/i-0000000000000000b", line.format("TimeToResume", 90.5, "hand-case")),
            (
                "hand-case/1/i-0000000000000000b",
                line.format("TimeToResume", 300, "hand-case"),
            ),  # second: ignored
            ("hand-case/1/i-0000000000000000b", line.format("TimeToResume", 5, "other-job")),
            ("other-job/1/i-0000000000000000c", line.format("TimeToResume", 7, "hand-case")),
        ],
    )
    assert marks == {
        0: AgentMarks(final_durable_at=at(60) + 40 * SECOND),  # from attempt 0's notice
        1: AgentMarks(resumed_at=at(60) + 90.5 * SECOND),  # from the previous attempt's notice
    }


def test_transition_time_reads_ec2s_reason() -> None:
    assert transition_time("User initiated (2026-01-05 11:00:41 GMT)") == at(60) + 41 * SECOND
    assert transition_time("User initiated (2026-01-05 11:00:41 UTC)") == at(60) + 41 * SECOND  # moto
    assert transition_time("Service initiated") is None
    assert transition_time("") is None and transition_time(None) is None


def test_final_checkpoint_means_nothing_lost() -> None:
    job = fallback_case()
    final = CheckpointRef(step=600, prefix="hand-case/ckpt/600/", attempt=0, created_at=at(60.2))
    job = job.model_copy(update={"final_checkpoint": final, "last_checkpoint": final})
    (overhead,) = overheads_from_job(job, at(200))
    assert overhead.lost_seconds == 0


def test_on_demand_attempt_pays_on_demand_and_saves_nothing() -> None:
    job = hand_case()
    facts = {**FACTS, "i-0000000000000000b": InstanceFacts("c5.xlarge", "us-east-1b", "on-demand")}
    report = savings_report(job.job_id, usages_from_job(job, facts, at(200)), [], HISTORY)
    assert report.attempts[1].paid_usd == pytest.approx(report.attempts[1].on_demand_usd)


def test_running_job_bills_until_now() -> None:
    job = hand_case()
    running = job.model_copy(update={"status": jobs.JobStatus.RUNNING})
    (_, second) = usages_from_job(running, FACTS, at(90.5))
    assert second.seconds == 30 * 60


def test_spot_cost_needs_a_price_in_force_at_the_start() -> None:
    with pytest.raises(CostError, match="no spot price in force"):
        spot_cost(at(0), at(10), [PricePoint(at(5), 0.1)])


def test_spot_cost_integrates_piecewise() -> None:
    history = [PricePoint(at(0), 1.0), PricePoint(at(30), 2.0), PricePoint(at(45), 4.0)]
    assert spot_cost(at(15), at(60), history) == pytest.approx(0.25 * 1 + 0.25 * 2 + 0.25 * 4)


def test_unknown_instance_type_is_named_and_overridable() -> None:
    job = fallback_case()
    facts = {k: InstanceFacts("x9.huge", v.zone, v.market) for k, v in FACTS.items()}
    history = {("x9.huge", z): [PricePoint(at(-60), 0.5)] for z in ("us-east-1a", "us-east-1b")}
    usages = usages_from_job(job, facts, at(200))
    with pytest.raises(UnknownInstanceType, match=r"x9\.huge"):
        savings_report(job.job_id, usages, [], history)
    report = savings_report(job.job_id, usages, [], history, on_demand_overrides={"x9.huge": 2.0})
    assert report.on_demand_same_seconds_usd == pytest.approx(7320 / 3600 * 2.0)
