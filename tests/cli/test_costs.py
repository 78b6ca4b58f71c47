"""Savings arithmetic against a case computed by hand (pure: no AWS, no moto)."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import pytest

from trainctl.commands.costs import (
    CostError,
    InstanceFacts,
    PricePoint,
    UnknownInstanceType,
    overheads_from_job,
    savings_report,
    spot_cost,
    usages_from_job,
)
from trainctl_core import jobs
from trainctl_core.jobs import CapacityPool, CheckpointRef, JobSpec

T = datetime(2026, 1, 5, 10, 0, 0, tzinfo=UTC)
A = "subnet-0aaaaaaaaaaaaaaaa"
B = "subnet-0bbbbbbbbbbbbbbbb"


def at(minutes: float) -> datetime:
    return T + timedelta(minutes=minutes)


def hand_case() -> jobs.Job:
    """Attempt 0: m5.large spot in zone a, 10:00 -> notice 11:00 (reclaimed 11:02), last
    periodic checkpoint 10:50. Attempt 1: c5.xlarge spot in zone b, launched 11:00:30,
    succeeded 12:00:30."""
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
    job = jobs.apply(
        job,
        jobs.mark_interrupted(
            job,
            instance_id="i-0000000000000000a",
            reason=jobs.InterruptionReason.SPOT_WARNING,
            now=at(60),
            deadline=at(62),
        ),
    )
    resume = jobs.ResumePoint(kind="fallback", step=500, prefix=ckpt.prefix)
    job = jobs.apply(
        job,
        jobs.mark_launching(
            job, instance_id="i-0000000000000000b", pool=f"c5.xlarge@{B}", resume_point=resume, now=at(60.5)
        ),
    )
    job = jobs.apply(job, jobs.mark_running(job, instance_id="i-0000000000000000b", now=at(61)))
    return jobs.apply(job, jobs.mark_succeeded(job, instance_id="i-0000000000000000b", now=at(120.5)))


FACTS = {
    "i-0000000000000000a": InstanceFacts(instance_type="m5.large", zone="us-east-1a", market="spot"),
    "i-0000000000000000b": InstanceFacts(instance_type="c5.xlarge", zone="us-east-1b", market="spot"),
}
HISTORY = {
    ("m5.large", "us-east-1a"): [PricePoint(at(-60), 0.030), PricePoint(at(30), 0.040)],
    ("c5.xlarge", "us-east-1b"): [PricePoint(at(0), 0.068)],
}


def test_report_matches_the_hand_computed_case() -> None:
    job = hand_case()
    now = at(200)  # long after the end: a finished job's windows do not grow
    report = savings_report(
        job.job_id, usages_from_job(job, FACTS, now), overheads_from_job(job, now), HISTORY
    )

    # Attempt 0: 10:00-11:02 = 3720 s; 30 min at 0.030 + 32 min at 0.040.
    first, second = report.attempts
    assert first.usage.seconds == 3720
    assert first.paid_usd == pytest.approx(0.5 * 0.030 + 32 / 60 * 0.040)  # 0.0363333
    assert first.on_demand_usd == pytest.approx(3720 / 3600 * 0.096)  # 0.0992
    # Attempt 1: 11:00:30-12:00:30 = 3600 s at 0.068; on-demand 0.17.
    assert second.usage.seconds == 3600
    assert second.paid_usd == pytest.approx(0.068)
    assert second.on_demand_usd == pytest.approx(0.17)

    (overhead,) = report.interruptions
    assert overhead.lost_seconds == 600  # notice 11:00 - periodic checkpoint 10:50
    assert overhead.recovery_seconds == 30  # notice 11:00 -> replacement 11:00:30
    assert overhead.overlap_seconds == 90  # replacement 11:00:30 -> reclaim 11:02

    assert report.billed_seconds == 7320
    assert report.paid_usd == pytest.approx(0.1043333, abs=1e-6)
    assert report.on_demand_same_seconds_usd == pytest.approx(0.2692)
    # Baseline: on-demand without the 600 lost s (m5.large) and 90 overlapping s (c5.xlarge).
    assert report.baseline_usd == pytest.approx(0.2692 - 0.016 - 0.00425)  # 0.24895
    assert report.net_saving_usd == pytest.approx(0.24895 - 0.1043333, abs=1e-6)  # 0.1446167
    assert report.net_saving_pct == pytest.approx(58.09, abs=0.01)


def test_final_checkpoint_means_nothing_lost() -> None:
    job = hand_case()
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
    job = hand_case()
    facts = {k: InstanceFacts("x9.huge", v.zone, v.market) for k, v in FACTS.items()}
    history = {("x9.huge", z): [PricePoint(at(-60), 0.5)] for z in ("us-east-1a", "us-east-1b")}
    usages = usages_from_job(job, facts, at(200))
    with pytest.raises(UnknownInstanceType, match=r"x9\.huge"):
        savings_report(job.job_id, usages, [], history)
    report = savings_report(job.job_id, usages, [], history, on_demand_overrides={"x9.huge": 2.0})
    assert report.on_demand_same_seconds_usd == pytest.approx(7320 / 3600 * 2.0)
