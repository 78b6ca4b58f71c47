"""Savings arithmetic: pure functions over the job row, EC2's facts and price data (no boto3).

What a job paid versus what an uninterrupted on-demand run of the same training would
have cost. Per attempt (one instance), with `N` its interruption notice:

* **billed window**: from its launch to its end. The end is, in order of preference:
  EC2's own record (a stopped or terminated instance's `StateTransitionReason` carries the
  moment, e.g. `User initiated (2026-01-05 11:00:41 GMT)`; EC2 keeps it about an hour);
  else what the row and the agent say. An attempt lost to a Spot warning or a migrating
  rebalance is retired by the resume workflow right after it records the replacement
  (RetireOldInstance), which happens once both the replacement is launched and the
  checkpoint handshake is done: end = max(replacement launched, final checkpoint durable).
  "Durable" is the agent's TimeToCheckpoint line when the logs have it, else the final
  checkpoint's snapshot moment on the row (a lower bound: its upload follows), else the
  handshake's timeout (the notice deadline). A Spot warning's end is never after its
  deadline (AWS reclaims the instance then); a migrating rebalance has no such bound. A
  loss without notice ends at the notice; an attempt with no replacement yet runs until
  the job ended (the workflow or `cancel` terminated it) or now; a finished job's last
  attempt ends with the job.
* **paid**: spot attempts integrate the spot price history of their type and zone over
  their window (the price in force at each moment, piecewise constant); on-demand attempts
  pay the on-demand rate.
* **on-demand, same seconds**: every billed second at the on-demand rate of its type.
* **useful seconds**: the seconds an uninterrupted run would also have billed, i.e.
  training that was kept. An attempt trains from its launch (attempt 0: an uninterrupted
  run boots once too) or, for a replacement, from the moment training resumed on it (the
  agent's TimeToResume line; without it, from when the old instance ended, the earliest
  the row allows: the boot after that is then counted as useful, and a note says so);
  it trains until its notice (the old instance only checkpoints after it) or its end.
  Minus the *lost* seconds: training after the checkpoint the next attempt resumed from,
  redone by it (zero with a final checkpoint).
* **interruption overhead** (what useful excludes, per interruption): *lost* seconds,
  *recovery* (notice -> replacement launched), *overlap* (replacement launched -> old
  instance ended: both bill, neither trains) and *boot* (the replacement's seconds after
  that until training resumed).
* **baseline** = the useful seconds of each attempt at its type's on-demand rate: what an
  uninterrupted on-demand run of the same training would have cost.
* **net saving** = baseline - paid, and as a percentage of the baseline.

On-demand rates come from a bundled table (us-east-1, Linux, USD/hour) rather than the
Pricing API: the Pricing API only answers in us-east-1/ap-south-1, needs its own IAM
permission, returns multi-megabyte filter results for one price, and cannot be emulated
offline. Unknown types are an error naming them; `--on-demand-price TYPE=USD` overrides.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any, Literal

from trainctl_core import metrics
from trainctl_core.jobs import AttemptRecord, InterruptionReason, Job, JobStatus

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
    """One instance's billed window, and how much of it was useful training."""

    attempt: int
    instance_id: str
    instance_type: str
    zone: str | None
    market: Market
    started_at: datetime
    ended_at: datetime
    # What decided `ended_at` (see the module docstring): ec2, agent, checkpoint, launch,
    # deadline, notice, job-end, next-launch or now.
    ended_by: str = "now"
    # Seconds an uninterrupted run would also have billed; None: all of them.
    useful_seconds: float | None = None

    @property
    def seconds(self) -> float:
        return max(0.0, (self.ended_at - self.started_at).total_seconds())

    @property
    def useful(self) -> float:
        return self.seconds if self.useful_seconds is None else min(self.seconds, self.useful_seconds)


@dataclass(frozen=True)
class InterruptionOverhead:
    attempt: int
    instance_id: str
    noticed_at: datetime
    lost_seconds: float | None  # None: the row no longer says what the next attempt resumed from
    recovery_seconds: float | None  # None: no replacement launched yet
    overlap_seconds: float
    # The replacement's seconds after the overlap until training resumed on it; None: no
    # replacement yet, or the agent logs do not say when it resumed.
    boot_seconds: float | None = None


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

    @property
    def baseline_usd(self) -> float:
        return self.usage.useful / 3600.0 * self.on_demand_rate

    def as_dict(self) -> dict[str, Any]:
        usage = asdict(self.usage)
        usage.pop("useful_seconds")  # None means "all": give the figure itself
        return {
            **usage,
            "seconds": self.usage.seconds,
            "useful_seconds": self.usage.useful,
            "paid_usd": self.paid_usd,
            "on_demand_usd": self.on_demand_usd,
            "on_demand_usd_per_hour": self.on_demand_rate,
            "baseline_usd": self.baseline_usd,
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
    boot_seconds: float
    unknown_lost: int  # interruptions whose lost seconds are unknown (counted as 0)
    unknown_boot: int  # replacements whose resume moment is unknown (boot counted as useful)
    useful_seconds: float
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
    """The report; `spot_history` is keyed by (instance type, zone) of the spot attempts.

    The baseline is each usage's useful seconds at its on-demand rate (`usages_from_job`
    computes them); `interruptions` only itemise the overhead.
    """
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

    paid_total = sum(c.paid_usd for c in costs)
    baseline = sum(c.baseline_usd for c in costs)
    net = baseline - paid_total
    return SavingsReport(
        job_id=job_id,
        attempts=costs,
        interruptions=list(interruptions),
        billed_seconds=sum(u.seconds for u in usages),
        paid_usd=paid_total,
        on_demand_same_seconds_usd=sum(c.on_demand_usd for c in costs),
        lost_seconds=sum(i.lost_seconds or 0.0 for i in interruptions),
        recovery_seconds=sum(i.recovery_seconds or 0.0 for i in interruptions),
        overlap_seconds=sum(i.overlap_seconds for i in interruptions),
        boot_seconds=sum(i.boot_seconds or 0.0 for i in interruptions),
        unknown_lost=sum(1 for i in interruptions if i.lost_seconds is None),
        unknown_boot=sum(
            1 for i in interruptions if i.recovery_seconds is not None and i.boot_seconds is None
        ),
        useful_seconds=sum(u.useful for u in usages),
        baseline_usd=baseline,
        net_saving_usd=net,
        net_saving_pct=(net / baseline * 100.0) if baseline > 0 else None,
        notes=list(notes),
    )


# --- what EC2 and the agent say -----------------------------------------------------------------


@dataclass(frozen=True)
class InstanceFacts:
    """What EC2 says about an instance (the row only names its pool)."""

    instance_type: str
    zone: str | None
    market: Market
    # When EC2 stopped billing it (stopped or terminated), from its StateTransitionReason.
    ended_at: datetime | None = None


# EC2 states whose StateTransitionReason names the moment the instance stopped running.
ENDED_STATES = frozenset({"shutting-down", "terminated", "stopping", "stopped"})
# "User initiated (2026-01-05 11:00:41 GMT)" on AWS; moto writes "UTC".
_TRANSITION_TIME = re.compile(r"\((\d{4}-\d{2}-\d{2} \d{2}:\d{2}:\d{2}) (?:GMT|UTC)\)")


def transition_time(reason: str | None) -> datetime | None:
    """The moment in an EC2 `StateTransitionReason`, or None when it carries none."""
    found = _TRANSITION_TIME.search(reason or "")
    if found is None:
        return None
    return datetime.strptime(found.group(1), "%Y-%m-%d %H:%M:%S").replace(tzinfo=UTC)


@dataclass(frozen=True)
class AgentMarks:
    """Moments an attempt's agent reported in its recovery metric lines."""

    resumed_at: datetime | None = None  # training running again (this attempt is a replacement)
    final_durable_at: datetime | None = None  # its final checkpoint durable and on the row


def agent_marks(job: Job, lines: Iterable[tuple[str, str]]) -> dict[int, AgentMarks]:
    """Per attempt, from `(log stream, message)` pairs of the job's agent log streams.

    Streams are `<job>/<attempt>/<instance>`. TimeToResume is measured from the previous
    attempt's notice as the row records it, TimeToCheckpoint from the attempt's own
    notice; a line whose notice is not on the row, or that is not a metric line of this
    job, is ignored. The first line of each kind wins (an agent reports each once).
    """
    resumed: dict[int, datetime] = {}
    durable: dict[int, datetime] = {}
    for stream, message in lines:
        parts = stream.split("/")
        if len(parts) < 3 or parts[0] != job.job_id or not parts[1].isdigit():
            continue
        attempt = int(parts[1])
        try:
            line = json.loads(message)
        except ValueError:
            continue
        if not isinstance(line, dict) or line.get(metrics.JOB_ID_FIELD) != job.job_id:
            continue
        value = line.get(metrics.VALUE_FIELD)
        if isinstance(value, bool) or not isinstance(value, int | float) or value < 0:
            continue
        name = line.get(metrics.METRIC_FIELD)
        if name == metrics.TIME_TO_RESUME:
            previous = job.interruption_for(attempt - 1)
            if previous is not None and attempt not in resumed:
                resumed[attempt] = previous.noticed_at + timedelta(seconds=value)
        elif name == metrics.TIME_TO_CHECKPOINT:
            own = job.interruption_for(attempt)
            if own is not None and attempt not in durable:
                durable[attempt] = own.noticed_at + timedelta(seconds=value)
    return {
        a: AgentMarks(resumed_at=resumed.get(a), final_durable_at=durable.get(a))
        for a in sorted(set(resumed) | set(durable))
    }


# --- from the job row to usages -----------------------------------------------------------------


@dataclass(frozen=True)
class AttemptWindow:
    """An attempt's billed window and the part of it in which it trained."""

    attempt: int
    instance_id: str
    started_at: datetime
    ended_at: datetime
    ended_by: str
    trained_from: datetime  # == trained_until when it never trained
    trained_until: datetime
    resume_known: bool  # trained_from is measured (or the first attempt's launch), not a bound


def attempt_windows(
    job: Job,
    now: datetime,
    facts: Mapping[str, InstanceFacts] | None = None,
    marks: Mapping[int, AgentMarks] | None = None,
) -> list[AttemptWindow]:
    """The window of every launched attempt, in order (see the module docstring)."""
    facts, marks = facts or {}, marks or {}
    records = sorted(job.attempts, key=lambda r: r.attempt)
    windows: list[AttemptWindow] = []
    for index, record in enumerate(records):
        following = records[index + 1] if index + 1 < len(records) else None
        end, ended_by = _end_of(job, record, following, now, facts, marks)
        interruption = job.interruption_for(record.attempt)
        # After its notice an attempt only checkpoints (the document's stop mode).
        until = min(end, interruption.noticed_at) if interruption is not None else end
        until = max(until, record.launched_at)
        if index == 0:
            start, known = record.launched_at, True
        else:
            resumed = marks.get(record.attempt, AgentMarks()).resumed_at
            if resumed is not None:
                start, known = max(record.launched_at, resumed), True
            elif job.attempt == record.attempt and job.status == JobStatus.LAUNCHING:
                start, known = until, True  # still booting: nothing trained yet
            else:
                # The agent waits for the row to name the resume point, which the workflow
                # writes just before it retires the old instance: the earliest it can train.
                start, known = max(record.launched_at, windows[-1].ended_at), False
        windows.append(
            AttemptWindow(
                attempt=record.attempt,
                instance_id=record.instance_id,
                started_at=record.launched_at,
                ended_at=end,
                ended_by=ended_by,
                trained_from=min(start, until),
                trained_until=until,
                resume_known=known,
            )
        )
    return windows


def _end_of(
    job: Job,
    record: AttemptRecord,
    following: AttemptRecord | None,
    now: datetime,
    facts: Mapping[str, InstanceFacts],
    marks: Mapping[int, AgentMarks],
) -> tuple[datetime, str]:
    interruption = job.interruption_for(record.attempt)
    # A Spot warning's deadline is when AWS reclaims the instance, whatever else happened.
    bound = (
        interruption.deadline
        if interruption is not None and interruption.reason == InterruptionReason.SPOT_WARNING
        else None
    )
    fact = facts.get(record.instance_id)
    if fact is not None and fact.ended_at is not None:
        end, ended_by = fact.ended_at, "ec2"
    elif interruption is None:
        if following is not None:
            end, ended_by = following.launched_at, "next-launch"
        elif job.is_terminal:
            end, ended_by = job.updated_at, "job-end"
        else:
            end, ended_by = now, "now"
    elif interruption.reason == InterruptionReason.TERMINATED_WITHOUT_NOTICE:
        end, ended_by = interruption.noticed_at, "notice"
    elif following is not None:
        # RetireOldInstance follows RecordReplacement, which follows both the launch and
        # the checkpoint handshake.
        handshake: tuple[datetime, str] | None = None
        durable = marks.get(record.attempt, AgentMarks()).final_durable_at
        final = job.final_checkpoint
        if durable is not None:
            handshake = (durable, "agent")
        elif final is not None and final.attempt == record.attempt:
            handshake = (final.created_at, "checkpoint")
        elif interruption.deadline is not None:
            handshake = (interruption.deadline, "deadline")  # it timed out, or the row moved on
        end, ended_by = following.launched_at, "launch"
        if handshake is not None and handshake[0] > end:
            end, ended_by = handshake
    elif job.is_terminal:
        end, ended_by = job.updated_at, "job-end"
    else:
        end, ended_by = now, "now"
    if bound is not None and end > bound:
        end, ended_by = bound, "deadline"
    if end > now:
        end, ended_by = now, "now"
    return max(end, record.launched_at), ended_by


def usages_from_job(
    job: Job,
    facts: Mapping[str, InstanceFacts],
    now: datetime,
    marks: Mapping[int, AgentMarks] | None = None,
) -> list[AttemptUsage]:
    usages = []
    for window in attempt_windows(job, now, facts, marks):
        fact = facts.get(window.instance_id)
        if fact is None:
            raise CostError(f"nothing known about instance {window.instance_id} (attempt {window.attempt})")
        trained = max(0.0, (window.trained_until - window.trained_from).total_seconds())
        lost = _lost_seconds(job, window.attempt, window.trained_until, window.started_at)
        usages.append(
            AttemptUsage(
                attempt=window.attempt,
                instance_id=window.instance_id,
                instance_type=fact.instance_type,
                zone=fact.zone,
                market=fact.market,
                started_at=window.started_at,
                ended_at=window.ended_at,
                ended_by=window.ended_by,
                useful_seconds=trained - min(trained, lost or 0.0),
            )
        )
    return usages


def overheads_from_job(
    job: Job,
    now: datetime,
    facts: Mapping[str, InstanceFacts] | None = None,
    marks: Mapping[int, AgentMarks] | None = None,
) -> list[InterruptionOverhead]:
    """Lost, recovery, overlap and boot seconds of each interruption, from what the row
    (and EC2 and the agent logs, when given) records.

    Lost seconds are known when the interrupted attempt's final checkpoint is on the row
    (nothing lost), when its newest periodic checkpoint is (work after it is lost unless a
    final one landed), or when the next attempt started from scratch; the row keeps only
    the newest checkpoints, so older interruptions can be unknown (reported as such).
    """
    windows = {w.attempt: w for w in attempt_windows(job, now, facts, marks)}
    overheads = []
    for interruption in sorted(job.interruptions, key=lambda i: i.attempt):
        n = interruption.attempt
        old, new = windows.get(n), windows.get(n + 1)
        start = old.started_at if old else interruption.noticed_at
        end = old.ended_at if old else interruption.noticed_at
        lost = _lost_seconds(job, n, interruption.noticed_at, start)
        recovery = overlap = boot = None
        if new is not None:
            recovery = max(0.0, (new.started_at - interruption.noticed_at).total_seconds())
            overlap = max(0.0, (end - new.started_at).total_seconds())
            if new.resume_known:
                boot = max(0.0, (new.trained_from - max(end, new.started_at)).total_seconds())
        overheads.append(
            InterruptionOverhead(
                attempt=n,
                instance_id=interruption.instance_id,
                noticed_at=interruption.noticed_at,
                lost_seconds=lost,
                recovery_seconds=recovery,
                overlap_seconds=overlap or 0.0,
                boot_seconds=boot,
            )
        )
    return overheads


def _lost_seconds(job: Job, attempt: int, noticed_at: datetime, started_at: datetime) -> float | None:
    if job.interruption_for(attempt) is None:
        return 0.0  # not interrupted: nothing it trained is redone
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
