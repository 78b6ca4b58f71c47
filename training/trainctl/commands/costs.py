"""Savings arithmetic: pure functions over the job row and price data (no boto3).

What a job paid versus what the same training would have cost on on-demand capacity:

* **billed seconds** of each attempt: from its launch to its end (the reclaim deadline of
  an interrupted attempt, the job's end for a finished one, now for a running one).
* **paid**: spot attempts integrate the spot price history of their type and zone over
  their window (the price in force at each moment, piecewise constant); on-demand attempts
  pay the on-demand rate.
* **on-demand, same seconds**: every billed second at the on-demand rate of its type.
* **interruption overhead**: *lost* seconds (training done after the checkpoint the next
  attempt resumed from, i.e. redone), *recovery* seconds (notice -> replacement launched,
  wall-clock without a replacement), and *overlap* seconds (the old instance still running
  its final checkpoint while the replacement already bills).
* **baseline**: an uninterrupted on-demand run needs neither the lost nor the overlapping
  seconds: `on_demand_same_seconds - on_demand(lost) - on_demand(overlap)`.
* **net saving** = baseline - paid, and as a percentage of the baseline.

On-demand rates come from a bundled table (us-east-1, Linux, USD/hour) rather than the
Pricing API: the Pricing API only answers in us-east-1/ap-south-1, needs its own IAM
permission, returns multi-megabyte filter results for one price, and cannot be emulated
offline. Unknown types are an error naming them; `--on-demand-price TYPE=USD` overrides.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field
from datetime import datetime
from typing import Any, Literal

from trainctl_core.jobs import Job

Market = Literal["spot", "on-demand"]

ON_DEMAND_TABLE_REGION = "us-east-1"
# us-east-1 Linux on-demand list prices (USD per instance-hour), as published by AWS.
ON_DEMAND_USD_PER_HOUR: dict[str, float] = {
    "t3.medium": 0.0416,
    "t3.large": 0.0832,
    "t3.xlarge": 0.1664,
    "m5.large": 0.096,
    "m5.xlarge": 0.192,
    "m5.2xlarge": 0.384,
    "m5.4xlarge": 0.768,
    "m6i.large": 0.096,
    "m6i.xlarge": 0.192,
    "m6i.2xlarge": 0.384,
    "m7i.large": 0.1008,
    "m7i.xlarge": 0.2016,
    "c5.large": 0.085,
    "c5.xlarge": 0.17,
    "c5.2xlarge": 0.34,
    "c5.4xlarge": 0.68,
    "c6i.xlarge": 0.17,
    "c6i.2xlarge": 0.34,
    "r5.large": 0.126,
    "r5.xlarge": 0.252,
    "r5.2xlarge": 0.504,
    "g4dn.xlarge": 0.526,
    "g4dn.2xlarge": 0.752,
    "g4dn.4xlarge": 1.204,
    "g4dn.8xlarge": 2.176,
    "g4dn.12xlarge": 3.912,
    "g5.xlarge": 1.006,
    "g5.2xlarge": 1.212,
    "g5.4xlarge": 1.624,
    "g5.8xlarge": 2.448,
    "g5.12xlarge": 5.672,
    "g5.48xlarge": 16.288,
    "g6.xlarge": 0.8048,
    "g6.2xlarge": 0.9776,
    "g6.4xlarge": 1.3232,
    "g6.12xlarge": 4.6016,
    "p3.2xlarge": 3.06,
    "p3.8xlarge": 12.24,
    "p3.16xlarge": 24.48,
    "p4d.24xlarge": 32.7726,
    "trn1.2xlarge": 1.3438,
    "trn1.32xlarge": 21.50,
    "inf2.xlarge": 0.7582,
}


class CostError(ValueError):
    """The report cannot be computed from the data at hand (names what is missing)."""


class UnknownInstanceType(CostError):
    def __init__(self, instance_type: str) -> None:
        super().__init__(
            f"no on-demand price for instance type {instance_type!r} in the bundled table; "
            f"pass --on-demand-price {instance_type}=USD_PER_HOUR"
        )
        self.instance_type = instance_type


def on_demand_rate(instance_type: str, overrides: Mapping[str, float] | None = None) -> float:
    if overrides and instance_type in overrides:
        return float(overrides[instance_type])
    try:
        return ON_DEMAND_USD_PER_HOUR[instance_type]
    except KeyError:
        raise UnknownInstanceType(instance_type) from None


@dataclass(frozen=True)
class PricePoint:
    """A spot price that took effect at `at` (one describe_spot_price_history entry)."""

    at: datetime
    usd_per_hour: float


@dataclass(frozen=True)
class AttemptUsage:
    """One instance's billed window."""

    attempt: int
    instance_id: str
    instance_type: str
    zone: str | None
    market: Market
    started_at: datetime
    ended_at: datetime

    @property
    def seconds(self) -> float:
        return max(0.0, (self.ended_at - self.started_at).total_seconds())


@dataclass(frozen=True)
class InterruptionOverhead:
    attempt: int
    instance_id: str
    noticed_at: datetime
    lost_seconds: float | None  # None: the row no longer says what the next attempt resumed from
    recovery_seconds: float | None  # None: no replacement launched yet
    overlap_seconds: float


def spot_cost(start: datetime, end: datetime, history: Sequence[PricePoint]) -> float:
    """USD for running from `start` to `end` under the piecewise-constant price `history`.

    The price in force at a moment is the newest entry at or before it; EC2 returns the
    entry in force at the window's start too, so a window before the first entry is an
    error rather than a guess.
    """
    if end <= start:
        return 0.0
    points = sorted(history, key=lambda p: p.at)
    if not points or points[0].at > start:
        first = points[0].at.isoformat() if points else "none"
        raise CostError(f"no spot price in force at {start.isoformat()} (first entry: {first})")
    total = 0.0
    for index, point in enumerate(points):
        segment_start = max(start, point.at)
        segment_end = min(end, points[index + 1].at) if index + 1 < len(points) else end
        if segment_end > segment_start:
            total += (segment_end - segment_start).total_seconds() / 3600.0 * point.usd_per_hour
    return total


@dataclass(frozen=True)
class AttemptCost:
    usage: AttemptUsage
    paid_usd: float
    on_demand_usd: float
    on_demand_rate: float

    def as_dict(self) -> dict[str, Any]:
        return {
            **asdict(self.usage),
            "seconds": self.usage.seconds,
            "paid_usd": self.paid_usd,
            "on_demand_usd": self.on_demand_usd,
            "on_demand_usd_per_hour": self.on_demand_rate,
        }


@dataclass(frozen=True)
class SavingsReport:
    job_id: str
    attempts: list[AttemptCost]
    interruptions: list[InterruptionOverhead]
    billed_seconds: float
    paid_usd: float
    on_demand_same_seconds_usd: float
    lost_seconds: float
    recovery_seconds: float
    overlap_seconds: float
    unknown_lost: int  # interruptions whose lost seconds are unknown (counted as 0)
    baseline_usd: float
    net_saving_usd: float
    net_saving_pct: float | None
    notes: list[str] = field(default_factory=list)

    def as_dict(self) -> dict[str, Any]:
        data = asdict(self)
        data["attempts"] = [a.as_dict() for a in self.attempts]
        return data


def savings_report(
    job_id: str,
    usages: Sequence[AttemptUsage],
    interruptions: Sequence[InterruptionOverhead],
    spot_history: Mapping[tuple[str, str | None], Sequence[PricePoint]],
    on_demand_overrides: Mapping[str, float] | None = None,
    notes: Sequence[str] = (),
) -> SavingsReport:
    """The report; `spot_history` is keyed by (instance type, zone) of the spot attempts."""
    costs: list[AttemptCost] = []
    for usage in usages:
        rate = on_demand_rate(usage.instance_type, on_demand_overrides)
        on_demand = usage.seconds / 3600.0 * rate
        if usage.market == "on-demand":
            paid = on_demand
        else:
            history = spot_history.get((usage.instance_type, usage.zone))
            if history is None:
                raise CostError(f"no spot price history for {usage.instance_type} in {usage.zone}")
            paid = spot_cost(usage.started_at, usage.ended_at, history)
        costs.append(AttemptCost(usage=usage, paid_usd=paid, on_demand_usd=on_demand, on_demand_rate=rate))

    rate_of = {c.usage.attempt: c.on_demand_rate for c in costs}
    lost = sum(i.lost_seconds or 0.0 for i in interruptions)
    lost_usd = sum((i.lost_seconds or 0.0) / 3600.0 * rate_of.get(i.attempt, 0.0) for i in interruptions)
    # The overlap is billed by the replacement (attempt + 1) while the old one finishes.
    overlap_usd = sum(
        i.overlap_seconds / 3600.0 * rate_of.get(i.attempt + 1, rate_of.get(i.attempt, 0.0))
        for i in interruptions
    )
    on_demand_total = sum(c.on_demand_usd for c in costs)
    paid_total = sum(c.paid_usd for c in costs)
    baseline = max(0.0, on_demand_total - lost_usd - overlap_usd)
    net = baseline - paid_total
    return SavingsReport(
        job_id=job_id,
        attempts=costs,
        interruptions=list(interruptions),
        billed_seconds=sum(u.seconds for u in usages),
        paid_usd=paid_total,
        on_demand_same_seconds_usd=on_demand_total,
        lost_seconds=lost,
        recovery_seconds=sum(i.recovery_seconds or 0.0 for i in interruptions),
        overlap_seconds=sum(i.overlap_seconds for i in interruptions),
        unknown_lost=sum(1 for i in interruptions if i.lost_seconds is None),
        baseline_usd=baseline,
        net_saving_usd=net,
        net_saving_pct=(net / baseline * 100.0) if baseline > 0 else None,
        notes=list(notes),
    )


# --- from the job row to usages ---------------------------------------------------------------


@dataclass(frozen=True)
class InstanceFacts:
    """What EC2 says about an instance (the row only names its pool)."""

    instance_type: str
    zone: str | None
    market: Market


def attempt_windows(job: Job, now: datetime) -> list[tuple[int, str, datetime, datetime]]:
    """(attempt, instance, start, end) of every launched attempt, in order."""
    records = sorted(job.attempts, key=lambda r: r.attempt)
    windows = []
    for index, record in enumerate(records):
        interruption = job.interruption_for(record.attempt)
        following = records[index + 1] if index + 1 < len(records) else None
        if interruption is not None:
            # Billing runs until EC2 reclaims the instance (the notice's deadline).
            end = interruption.deadline or interruption.noticed_at
        elif following is not None:
            end = following.launched_at
        elif job.is_terminal:
            end = job.updated_at
        else:
            end = now
        windows.append((record.attempt, record.instance_id, record.launched_at, max(end, record.launched_at)))
    return windows


def usages_from_job(job: Job, facts: Mapping[str, InstanceFacts], now: datetime) -> list[AttemptUsage]:
    usages = []
    for attempt, instance_id, start, end in attempt_windows(job, now):
        fact = facts.get(instance_id)
        if fact is None:
            raise CostError(f"nothing known about instance {instance_id} (attempt {attempt})")
        usages.append(
            AttemptUsage(
                attempt=attempt,
                instance_id=instance_id,
                instance_type=fact.instance_type,
                zone=fact.zone,
                market=fact.market,
                started_at=start,
                ended_at=end,
            )
        )
    return usages


def overheads_from_job(job: Job, now: datetime) -> list[InterruptionOverhead]:
    """Lost, recovery and overlap seconds of each interruption, from what the row records.

    Lost seconds are known when the interrupted attempt's final checkpoint is on the row
    (nothing lost), when its newest periodic checkpoint is (work after it is lost unless a
    final one landed), or when the next attempt started from scratch; the row keeps only
    the newest checkpoints, so older interruptions can be unknown (reported as such).
    """
    windows = {a: (start, end) for a, _, start, end in attempt_windows(job, now)}
    launched = {r.attempt: r.launched_at for r in job.attempts}
    overheads = []
    for interruption in sorted(job.interruptions, key=lambda i: i.attempt):
        n = interruption.attempt
        start, end = windows.get(n, (interruption.noticed_at, interruption.noticed_at))
        replacement_at = launched.get(n + 1)
        lost = _lost_seconds(job, n, interruption.noticed_at, start)
        overheads.append(
            InterruptionOverhead(
                attempt=n,
                instance_id=interruption.instance_id,
                noticed_at=interruption.noticed_at,
                lost_seconds=lost,
                recovery_seconds=(
                    max(0.0, (replacement_at - interruption.noticed_at).total_seconds())
                    if replacement_at
                    else None
                ),
                overlap_seconds=max(0.0, (end - replacement_at).total_seconds()) if replacement_at else 0.0,
            )
        )
    return overheads


def _lost_seconds(job: Job, attempt: int, noticed_at: datetime, started_at: datetime) -> float | None:
    final = job.final_checkpoint
    if final is not None and final.attempt == attempt:
        return 0.0
    last = job.last_checkpoint
    if last is not None and last.attempt == attempt:
        return max(0.0, (noticed_at - last.created_at).total_seconds())
    resumed = job.resume_point if job.attempt == attempt + 1 else None
    if resumed is not None and resumed.kind == "none":
        return max(0.0, (noticed_at - started_at).total_seconds())
    return None
