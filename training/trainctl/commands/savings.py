"""`trainctl savings`: what Spot saved, per job, from EC2's own records.

The adapter half of the report: EC2 says each attempt's instance type, zone, market and,
for a stopped or terminated instance, when it stopped billing (`describe_instances`,
falling back to the pool the row names for instances EC2 has forgotten) and the spot
prices in force (`describe_spot_price_history`); the agent's recovery metric lines in its
log streams say when training resumed on a replacement and when a final checkpoint was
durable. The arithmetic is `trainctl.commands.costs`, pure and tested against a
hand-computed case.
"""

from __future__ import annotations

from collections.abc import Sequence
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Annotated, Any

import typer
from botocore.exceptions import BotoCoreError, ClientError
from rich import box
from rich.table import Table

from trainctl.commands import agentlogs
from trainctl.commands.costs import (
    ENDED_STATES,
    ON_DEMAND_TABLE_REGION,
    AgentMarks,
    AttemptUsage,
    CostError,
    InstanceFacts,
    PricePoint,
    SavingsReport,
    UnknownInstanceType,
    agent_marks,
    overheads_from_job,
    savings_report,
    transition_time,
    usages_from_job,
)
from trainctl.commands.output import (
    JsonOpt,
    ProfileOpt,
    RegionOpt,
    StackOpt,
    cloud_of,
    console,
    deps,
    duration,
    emit_json,
    reporting,
)
from trainctl.commands.stack import EXIT_FAILURE, EXIT_USAGE, CliError, Cloud
from trainctl_core import metrics
from trainctl_core.jobs import Job
from trainctl_core.store import JobStore

# EC2 reports Linux prices under both names depending on the account's platform.
LINUX_PRODUCTS = ("Linux/UNIX", "Linux/UNIX (Amazon VPC)")
# The agent's recovery metric lines the report reads (trainctl_core.metrics' contract).
RECOVERY_LINES_PATTERN = (
    f'{{ ($.{metrics.METRIC_FIELD} = "{metrics.TIME_TO_RESUME}") || '
    f'($.{metrics.METRIC_FIELD} = "{metrics.TIME_TO_CHECKPOINT}") }}'
)


class Calculator:
    """Builds savings reports for jobs of one stack, caching EC2 lookups across jobs."""

    def __init__(self, cloud: Cloud, on_demand_overrides: dict[str, float] | None = None) -> None:
        self._cloud = cloud
        self._overrides = on_demand_overrides or {}
        self._facts: dict[str, InstanceFacts] = {}
        self._zones: dict[str, str | None] = {}

    def report(self, job: Job, now: datetime) -> SavingsReport:
        notes: list[str] = []
        facts = self._instance_facts(job, notes)
        marks = self._agent_marks(job, notes)
        usages = usages_from_job(job, facts, now, marks)
        history = self._spot_history(usages)
        region = self._cloud.region_name
        if region != ON_DEMAND_TABLE_REGION and any(u.instance_type not in self._overrides for u in usages):
            notes.append(
                f"on-demand prices are {ON_DEMAND_TABLE_REGION} list prices; {region} may differ "
                "(override with --on-demand-price TYPE=USD)"
            )
        overheads = overheads_from_job(job, now, facts, marks)
        for overhead in overheads:
            if overhead.recovery_seconds is not None and overhead.boot_seconds is None:
                notes.append(
                    f"attempt {overhead.attempt + 1}: when training resumed is not in the agent logs; "
                    "its boot after the old instance ended counts as useful"
                )
        return savings_report(
            job.job_id,
            usages,
            overheads,
            history,
            on_demand_overrides=self._overrides,
            notes=notes,
        )

    def _agent_marks(self, job: Job, notes: list[str]) -> dict[int, AgentMarks]:
        """When training resumed / final checkpoints were durable, from the agent's lines."""
        if not job.interruptions:
            return {}  # nothing to measure: no recovery
        client = self._cloud.client("logs")
        group = self._cloud.agent_log_group
        try:
            streams = agentlogs.job_streams(client, group, f"{job.job_id}/")
            events = agentlogs.stream_events(client, group, streams, filter_pattern=RECOVERY_LINES_PATTERN)
        except (agentlogs.LogGroupMissing, ClientError, BotoCoreError) as exc:
            # The logs only sharpen the report; without them it falls back to the row.
            notes.append(f"agent logs not read ({getattr(exc, 'message', exc)}): using the job row only")
            return {}
        return agent_marks(job, ((str(e.get("logStreamName", "")), str(e["message"])) for e in events))

    def _instance_facts(self, job: Job, notes: list[str]) -> dict[str, InstanceFacts]:
        wanted = [r.instance_id for r in job.attempts if r.instance_id not in self._facts]
        if wanted:
            ec2 = self._cloud.client("ec2")
            try:
                pages = ec2.get_paginator("describe_instances").paginate(InstanceIds=wanted)
                described = [
                    i for p in pages for r in p.get("Reservations", []) for i in r.get("Instances", [])
                ]
            except ec2.exceptions.ClientError as exc:
                # One forgotten id fails the whole call: fall back to asking one by one.
                if exc.response.get("Error", {}).get("Code") != "InvalidInstanceID.NotFound":
                    raise
                described = []
                for instance_id in wanted:
                    try:
                        reply = ec2.describe_instances(InstanceIds=[instance_id])
                    except ec2.exceptions.ClientError:
                        continue
                    described += [i for r in reply.get("Reservations", []) for i in r.get("Instances", [])]
            for instance in described:
                state = instance.get("State", {}).get("Name")
                self._facts[instance["InstanceId"]] = InstanceFacts(
                    instance_type=instance["InstanceType"],
                    zone=instance.get("Placement", {}).get("AvailabilityZone"),
                    market="spot" if instance.get("InstanceLifecycle") == "spot" else "on-demand",
                    # Billing stops with the transition; EC2 writes its moment in the reason.
                    ended_at=(
                        transition_time(instance.get("StateTransitionReason"))
                        if state in ENDED_STATES
                        else None
                    ),
                )
        facts = {}
        for record in job.attempts:
            fact = self._facts.get(record.instance_id)
            if fact is None and record.pool:
                # EC2 forgets terminated instances after about an hour; the row keeps the pool.
                instance_type, _, subnet = record.pool.partition("@")
                fact = InstanceFacts(instance_type=instance_type, zone=self._zone_of(subnet), market="spot")
                notes.append(f"{record.instance_id} is no longer known to EC2: assumed spot in {record.pool}")
            if fact is not None:
                facts[record.instance_id] = fact
        return facts

    def _zone_of(self, subnet: str) -> str | None:
        if subnet not in self._zones:
            try:
                subnets = self._cloud.client("ec2").describe_subnets(SubnetIds=[subnet])["Subnets"]
                self._zones[subnet] = subnets[0]["AvailabilityZone"] if subnets else None
            except Exception:  # the zone only refines the price; never fail the report on it
                self._zones[subnet] = None
        return self._zones[subnet]

    def _spot_history(self, usages: Sequence[AttemptUsage]) -> dict[tuple[str, str | None], list[PricePoint]]:
        windows: dict[tuple[str, str | None], tuple[datetime, datetime]] = {}
        for usage in usages:
            if usage.market != "spot":
                continue
            key = (usage.instance_type, usage.zone)
            start, end = windows.get(key, (usage.started_at, usage.ended_at))
            windows[key] = (min(start, usage.started_at), max(end, usage.ended_at))
        return {key: self._prices(key[0], key[1], *window) for key, window in windows.items()}

    def _prices(
        self, instance_type: str, zone: str | None, start: datetime, end: datetime
    ) -> list[PricePoint]:
        ec2 = self._cloud.client("ec2")
        kwargs: dict[str, Any] = {
            "InstanceTypes": [instance_type],
            "StartTime": start,
            "EndTime": max(end, start + timedelta(seconds=1)),
        }
        if zone:
            kwargs["AvailabilityZone"] = zone
        entries = [
            e
            for page in ec2.get_paginator("describe_spot_price_history").paginate(**kwargs)
            for e in page.get("SpotPriceHistory", [])
            if e.get("ProductDescription") in LINUX_PRODUCTS
            and e.get("InstanceType") == instance_type
            and (zone is None or e.get("AvailabilityZone") == zone)
        ]
        by_time: dict[datetime, float] = {}
        for entry in entries:
            moment = entry["Timestamp"].astimezone(UTC)
            # Two product names can report the same moment; the higher price is the safe bound.
            by_time[moment] = max(by_time.get(moment, 0.0), float(entry["SpotPrice"]))
        if not by_time:
            raise CostError(
                f"EC2 returned no spot price history for {instance_type} in {zone or 'the region'}"
            )
        return [PricePoint(at=at, usd_per_hour=price) for at, price in sorted(by_time.items())]


def parse_overrides(values: Sequence[str]) -> dict[str, float]:
    overrides = {}
    for value in values:
        instance_type, sep, price = value.partition("=")
        try:
            rate = float(price)
        except ValueError:
            rate = -1.0
        if not sep or not instance_type or rate <= 0:
            raise CliError(
                f"--on-demand-price {value!r}: expected TYPE=USD_PER_HOUR, like g5.xlarge=1.006",
                exit_code=EXIT_USAGE,
            )
        overrides[instance_type] = rate
    return overrides


def savings(
    ctx: typer.Context,
    job_id: Annotated[str | None, typer.Argument(help="The job to report on (or --all).")] = None,
    all_jobs: Annotated[bool, typer.Option("--all", help="Every job of the stack, with a total.")] = False,
    on_demand_price: Annotated[
        list[str] | None,
        typer.Option("--on-demand-price", help="Override an on-demand rate: TYPE=USD_PER_HOUR (repeatable)."),
    ] = None,
    plot: Annotated[
        Path | None, typer.Option("--plot", help="Write a PNG timeline of the job's attempts here.")
    ] = None,
    stack: StackOpt = None,
    region: RegionOpt = None,
    profile: ProfileOpt = None,
    json_output: JsonOpt = False,
) -> None:
    """Spot cost paid vs on-demand for the same seconds, interruption overhead, net saving."""
    with reporting(json_output):
        if (job_id is None) == (not all_jobs):
            raise CliError("give a JOB id or --all (not both)", exit_code=EXIT_USAGE)
        if plot is not None and all_jobs:
            raise CliError("--plot draws one job: give a JOB id", exit_code=EXIT_USAGE)
        overrides = parse_overrides(on_demand_price or [])
        cloud = cloud_of(ctx, stack, region, profile)
        now = deps(ctx).now()
        store = JobStore(cloud.client("dynamodb"), cloud.jobs_table)
        found = [store.get(job_id)] if job_id else sorted(store.scan(), key=lambda j: j.created_at)
        calculator = Calculator(cloud, overrides)
        reports: list[SavingsReport] = []
        failures: dict[str, str] = {}
        for job in found:
            try:
                reports.append(calculator.report(job, now))
            except CostError as exc:
                if job_id:
                    # An unknown type is fixed by the user's --on-demand-price: a usage error.
                    code = EXIT_USAGE if isinstance(exc, UnknownInstanceType) else EXIT_FAILURE
                    raise CliError(str(exc), exit_code=code) from None
                failures[job.job_id] = str(exc)
        if plot is not None:
            from trainctl.commands.plot import plot_timeline  # matplotlib only when asked

            plot_timeline(found[0], reports[0], plot, now=now)
        _print(reports, failures, json_output, plot)


def _totals(reports: Sequence[SavingsReport]) -> dict[str, Any]:
    baseline = sum(r.baseline_usd for r in reports)
    net = sum(r.net_saving_usd for r in reports)
    return {
        "jobs": len(reports),
        "paid_usd": sum(r.paid_usd for r in reports),
        "on_demand_same_seconds_usd": sum(r.on_demand_same_seconds_usd for r in reports),
        "baseline_usd": baseline,
        "net_saving_usd": net,
        "net_saving_pct": net / baseline * 100.0 if baseline > 0 else None,
    }


def _print(
    reports: Sequence[SavingsReport], failures: dict[str, str], json_output: bool, plot: Path | None
) -> None:
    if json_output:
        document: dict[str, Any] = {"jobs": [r.as_dict() for r in reports], "total": _totals(reports)}
        if failures:
            document["errors"] = failures
        if plot is not None:
            document["plot"] = str(plot)
        emit_json(document)
        return
    out = console()
    for report in reports:
        table = Table(title=f"savings for {report.job_id}", title_justify="left", box=box.SIMPLE_HEAD)
        for column in ("ATTEMPT", "INSTANCE", "TYPE", "ZONE", "MARKET", "BILLED", "PAID", "ON-DEMAND"):
            table.add_column(column, justify="right" if column in ("BILLED", "PAID", "ON-DEMAND") else "left")
        for cost in report.attempts:
            u = cost.usage
            table.add_row(
                str(u.attempt),
                u.instance_id,
                u.instance_type,
                u.zone or "?",
                u.market,
                duration(u.seconds),
                f"${cost.paid_usd:.4f}",
                f"${cost.on_demand_usd:.4f}",
            )
        out.print(table)
        out.print(
            f"  billed             {duration(report.billed_seconds)} over {len(report.attempts)} attempt(s)"
        )
        out.print(f"  paid               ${report.paid_usd:.4f}")
        out.print(f"  on-demand, same    ${report.on_demand_same_seconds_usd:.4f}")
        unknown = f" ({report.unknown_lost} unknown)" if report.unknown_lost else ""
        unknown_boot = f" ({report.unknown_boot} unknown)" if report.unknown_boot else ""
        out.print(
            f"  overhead           lost {duration(report.lost_seconds)}{unknown}, recovery "
            f"{duration(report.recovery_seconds)}, overlap {duration(report.overlap_seconds)}, "
            f"boot {duration(report.boot_seconds)}{unknown_boot} "
            f"({len(report.interruptions)} interruption(s))"
        )
        out.print(f"  useful training    {duration(report.useful_seconds)}")
        out.print(f"  on-demand baseline ${report.baseline_usd:.4f} (the useful seconds at on-demand rates)")
        pct = f" ({report.net_saving_pct:.1f}%)" if report.net_saving_pct is not None else ""
        out.print(f"  [bold]net saving         ${report.net_saving_usd:.4f}{pct}[/]")
        for note in report.notes:
            out.print(f"  [dim]note               {note}[/]")
    if len(reports) > 1:
        total = _totals(reports)
        pct = f" ({total['net_saving_pct']:.1f}%)" if total["net_saving_pct"] is not None else ""
        out.print(
            f"[bold]total: paid ${total['paid_usd']:.4f}, baseline ${total['baseline_usd']:.4f}, "
            f"net saving ${total['net_saving_usd']:.4f}{pct}[/]"
        )
    for job_id, problem in failures.items():
        out.print(f"[yellow]{job_id}: {problem}[/]")
    if plot is not None:
        out.print(f"timeline written to {plot}")
    if not reports and not failures:
        out.print("no jobs")
