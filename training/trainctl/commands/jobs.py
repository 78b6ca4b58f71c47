"""Job commands: submit, status, list, cancel, logs, interrupt.

Thin: each command validates its input first (a bad spec creates nothing), then drives
the same adapters the serverless side uses (`JobStore`, `ResumeStarter`,
`CheckpointCommands`) and the job model's transitions, so the CLI cannot write a row
or start an execution the workflow would not accept.
"""

from __future__ import annotations

import json
import re
import secrets
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Annotated, Any

import typer
from botocore.exceptions import BotoCoreError, ClientError
from rich import box
from rich.table import Table

from trainctl.commands import agentlogs
from trainctl.commands import savings as savings_cmd
from trainctl.commands.costs import CostError, overheads_from_job
from trainctl.commands.output import (
    JsonOpt,
    ProfileOpt,
    RegionOpt,
    StackOpt,
    age,
    cloud_of,
    console,
    deps,
    duration,
    emit_json,
    reporting,
)
from trainctl.commands.stack import EXIT_USAGE, CliError, Cloud, aws_errors
from trainctl.spec import DEFAULT_SPEC_FILE, SpecError, job_id_stem, load_spec
from trainctl_core import jobs as model
from trainctl_core.commands import CheckpointCommands, CheckpointRequestFailed
from trainctl_core.events import EC2_SOURCE, SPOT_INTERRUPTION_WARNING
from trainctl_core.jobs import InterruptionReason, Job, JobStatus
from trainctl_core.settings import TAG_JOB_ID
from trainctl_core.store import ConcurrentUpdate, JobAlreadyExists, JobStore
from trainctl_core.workflow import ResumeStarter, execution_name_for, resume_input

LIVE_INSTANCE_STATES = ["pending", "running", "stopping", "stopped"]


def _store(cloud: Cloud) -> JobStore:
    return JobStore(cloud.client("dynamodb"), cloud.jobs_table)


# --- submit --------------------------------------------------------------------------------


def submit(
    ctx: typer.Context,
    spec: Annotated[Path, typer.Option("--spec", "-f", help="The job spec file.")] = Path(DEFAULT_SPEC_FILE),
    job_id: Annotated[str | None, typer.Option("--job-id", help="Job id (default: <name>-<random>).")] = None,
    dry_run: Annotated[
        bool, typer.Option("--dry-run", help="Validate against the stack; create nothing.")
    ] = False,
    stack: StackOpt = None,
    region: RegionOpt = None,
    profile: ProfileOpt = None,
    json_output: JsonOpt = False,
) -> None:
    """Create a job from trainctl.yaml and start its launch workflow."""
    with reporting(json_output):
        spec_file = load_spec(spec)  # before any AWS call: a bad spec creates nothing
        chosen_id = job_id or f"{job_id_stem(spec_file.name)}-{secrets.token_hex(3)}"
        if not model.JOB_ID_PATTERN.match(chosen_id):
            raise CliError(
                f"--job-id {chosen_id!r} is not a valid job id",
                exit_code=EXIT_USAGE,
                hint="1-63 lowercase letters, digits and '-', starting with a letter or digit",
            )
        cloud = cloud_of(ctx, stack, region, profile)
        image = spec_file.image
        if spec_file.dockerfile is not None:
            from trainctl.commands.images import pushed_image  # ECR lookups only when needed

            image = pushed_image(cloud, spec_file)
        job_spec = spec_file.to_job_spec(
            image=image,
            default_subnets=cloud.subnets,
            allowed_instance_types=cloud.allowed_instance_types or None,
        )
        now = deps(ctx).now()
        job = model.new_job(chosen_id, job_spec, now)
        document = resume_input(
            job_id=job.job_id,
            instance_id=None,
            attempt=0,
            reason=InterruptionReason.LAUNCH,
            deadline=None,
            noticed_at=now,
        )
        if dry_run:
            _print_submitted(job, document, None, json_output, dry_run=True)
            return
        store = _store(cloud)
        starter = ResumeStarter(cloud.client("stepfunctions"), cloud.state_machine_arn)
        try:
            store.create(job)
        except JobAlreadyExists:
            raise CliError(f"job {job.job_id} already exists", hint="pick another --job-id") from None
        name = execution_name_for(document)
        try:
            if not starter.start(document):
                # Execution names outlive their job rows (Step Functions keeps them for
                # 90 days): a reused job id finds its launch name taken.
                raise CliError(
                    f"an execution named {name} already exists in the resume state machine",
                    hint="a job id cannot be reused while its old executions are kept: pick another --job-id",
                )
        except Exception as exc:
            # A PENDING row nobody will launch would sit there forever: end it with the reason.
            store.apply(model.mark_failed(job, reason=f"launch workflow did not start: {exc}", now=now))
            raise
        _print_submitted(job, document, cloud.state_machine_arn, json_output, dry_run=False)


def _print_submitted(
    job: Job, document: dict[str, Any], state_machine: str | None, json_output: bool, *, dry_run: bool
) -> None:
    if json_output:
        emit_json(
            {
                "job_id": job.job_id,
                "status": job.status,
                "dry_run": dry_run,
                "execution_name": execution_name_for(document),
                "state_machine_arn": state_machine,
                "workflow_input": document,
                "spec": job.spec,
            }
        )
        return
    out = console()
    verb = "would submit" if dry_run else "submitted"
    out.print(f"{verb} job [bold]{job.job_id}[/] ({job.spec.name})")
    out.print(f"  command   {' '.join(job.spec.command)}")
    if job.spec.image:
        out.print(f"  image     {job.spec.image}")
    pools = ", ".join(p.label for p in job.spec.pools)
    out.print(f"  pools     {pools}")
    market = "spot, then on-demand" if job.spec.allow_on_demand else "spot only"
    limits = job.spec.limits
    budget = f", budget ${limits.budget_usd:g}" if limits.budget_usd else ""
    out.print(
        f"  policy    {market}; max {limits.max_interruptions} interruptions, {limits.max_hours:g} h{budget}"
    )
    if not dry_run:
        out.print(f"  workflow  {execution_name_for(document)} (reason launch)")
        out.print(f"follow it with: trainctl status {job.job_id}")


# --- status --------------------------------------------------------------------------------


def _progress(job: Job, raw: dict[str, Any], now: datetime) -> dict[str, Any]:
    """Status figures derived from the row: checkpoint age, steps at risk, steps lost."""
    heartbeat_step = raw.get("heartbeat_step")
    rate = raw.get("steps_per_second")
    overheads = overheads_from_job(job, now)
    lost_seconds = [o.lost_seconds for o in overheads]
    known = all(s is not None for s in lost_seconds)
    total_lost = sum(s or 0.0 for s in lost_seconds)
    lost_steps: int | None = None
    if known and total_lost == 0:
        lost_steps = 0  # no interruption, or final checkpoints only: no rate needed
    elif known and rate:
        lost_steps = round(total_lost * float(rate))
    last = job.last_checkpoint
    at_risk = None
    if heartbeat_step is not None and job.status == JobStatus.RUNNING:
        at_risk = max(0, int(heartbeat_step) - (last.step if last else 0))
    return {
        "heartbeat_step": heartbeat_step,
        "heartbeat_at": raw.get("heartbeat_at"),
        "steps_per_second": rate,
        "steps_at_risk": at_risk,
        "lost_steps": lost_steps,
        "lost_seconds": total_lost if known else None,
    }


def status(
    ctx: typer.Context,
    job_id: Annotated[str, typer.Argument(help="The job id (see `trainctl list`).")],
    stack: StackOpt = None,
    region: RegionOpt = None,
    profile: ProfileOpt = None,
    json_output: JsonOpt = False,
) -> None:
    """State, attempt, instance, last checkpoint and lost steps of one job."""
    with reporting(json_output):
        cloud = cloud_of(ctx, stack, region, profile)
        store = _store(cloud)
        job = store.get(job_id)
        raw = store.raw(job_id)
        now = deps(ctx).now()
        progress = _progress(job, raw, now)
        pool = job.attempts[-1].pool if job.attempts else None
        if json_output:
            emit_json(
                {
                    "job_id": job.job_id,
                    "name": job.spec.name,
                    "status": job.status,
                    "attempt": job.attempt,
                    "instance_id": job.instance_id,
                    "pool": pool,
                    "interruptions": len(job.interruptions),
                    "last_checkpoint": job.last_checkpoint,
                    "last_checkpoint_age_seconds": (
                        (now - job.last_checkpoint.created_at).total_seconds()
                        if job.last_checkpoint
                        else None
                    ),
                    "resume_point": job.resume_point,
                    "failure_reason": job.failure_reason,
                    "created_at": job.created_at,
                    "updated_at": job.updated_at,
                    "deadline_at": job.deadline_at,
                    **progress,
                }
            )
            return
        out = console()
        style = {"RUNNING": "green", "FAILED": "red", "INTERRUPTED": "yellow", "CANCELLED": "dim"}
        out.print(f"job [bold]{job.job_id}[/] ({job.spec.name})")
        out.print(f"  state        [{style.get(job.status, 'cyan')}]{job.status}[/]")
        out.print(f"  attempt      {job.attempt}   interruptions {len(job.interruptions)}")
        out.print(f"  instance     {job.instance_id or '-'}" + (f"  ({pool})" if pool else ""))
        last = job.last_checkpoint
        out.print(
            "  checkpoint   "
            + (
                f"step {last.step}, {age(last.created_at, now)} (attempt {last.attempt})"
                if last
                else "none yet"
            )
        )
        if progress["heartbeat_step"] is not None:
            out.print(
                f"  progress     step {progress['heartbeat_step']}, steps at risk {progress['steps_at_risk']}"
            )
        lost = progress["lost_steps"]
        lost_text = "unknown" if lost is None else str(lost)
        if progress["lost_seconds"] is not None:
            lost_text += f" ({duration(progress['lost_seconds'])} of training redone)"
        out.print(f"  lost steps   {lost_text}")
        if job.resume_point is not None and job.attempt > 0:
            point = job.resume_point
            out.print(
                f"  resumed from {point.kind}" + (f" step {point.step}" if point.step is not None else "")
            )
        if job.failure_reason:
            out.print(f"  reason       [red]{job.failure_reason}[/]")
        out.print(
            f"  created      {job.created_at:%Y-%m-%d %H:%M:%S} UTC, updated {age(job.updated_at, now)}"
        )


# --- list ------------------------------------------------------------------------------------


def list_jobs(
    ctx: typer.Context,
    state: Annotated[
        list[JobStatus] | None, typer.Option("--state", help="Only jobs in this state (repeatable).")
    ] = None,
    with_savings: Annotated[
        bool, typer.Option("--savings/--no-savings", help="Compute the savings column (EC2 price lookups).")
    ] = True,
    stack: StackOpt = None,
    region: RegionOpt = None,
    profile: ProfileOpt = None,
    json_output: JsonOpt = False,
) -> None:
    """Every job of the stack, newest first, with interruptions and savings."""
    with reporting(json_output):
        cloud = cloud_of(ctx, stack, region, profile)
        now = deps(ctx).now()
        found = sorted(_store(cloud).scan(), key=lambda j: j.created_at, reverse=True)
        if state:
            found = [j for j in found if j.status in state]
        calculator = savings_cmd.Calculator(cloud) if with_savings else None
        rows = []
        for job in found:
            saving: dict[str, Any] | None = None
            if calculator is not None:
                try:
                    # Per row: one job whose prices AWS refuses (throttling, a missing
                    # DescribeSpotPriceHistory grant) shows "?" instead of failing the list.
                    with aws_errors(cloud):
                        report = calculator.report(job, now)
                    saving = {"usd": report.net_saving_usd, "pct": report.net_saving_pct}
                except (CostError, CliError) as exc:
                    saving = {"usd": None, "pct": None, "error": str(exc)}
            rows.append((job, saving))
        if json_output:
            emit_json(
                [
                    {
                        "job_id": job.job_id,
                        "name": job.spec.name,
                        "status": job.status,
                        "attempt": job.attempt,
                        "interruptions": len(job.interruptions),
                        "last_checkpoint_step": job.last_checkpoint.step if job.last_checkpoint else None,
                        "created_at": job.created_at,
                        "saving": saving,
                    }
                    for job, saving in rows
                ]
            )
            return
        table = Table(title=f"trainctl jobs ({cloud.stack_name})", title_justify="left", box=box.SIMPLE_HEAD)
        # Ids are what users copy into the next command: never truncated; names may be.
        # (Newest first; creation times are in --json, kept out to fit 100 columns.)
        table.add_column("JOB", no_wrap=True, min_width=max((len(j.job_id) for j, _ in rows), default=3))
        table.add_column("NAME", max_width=20, overflow="ellipsis", no_wrap=True)
        table.add_column("STATE", no_wrap=True)
        for column in ("ATTEMPT", "INTERRUPTIONS", "LAST CKPT"):
            table.add_column(column, justify="right", no_wrap=True)
        table.add_column("SAVED", justify="right", no_wrap=True)
        for job, saving in rows:
            table.add_row(
                job.job_id,
                job.spec.name,
                job.status.value,
                str(job.attempt),
                str(len(job.interruptions)),
                str(job.last_checkpoint.step) if job.last_checkpoint else "-",
                _saving_cell(saving),
            )
        out = console()
        if rows:
            out.print(table)
        else:
            out.print(f"no jobs in stack {cloud.stack_name}" + (" with that state" if state else ""))


def _saving_cell(saving: dict[str, Any] | None) -> str:
    if saving is None:
        return "-"
    if saving.get("usd") is None:
        return "?"
    pct = saving.get("pct")
    return f"${saving['usd']:.2f}" + (f" ({pct:.0f}%)" if pct is not None else "")


# --- cancel -------------------------------------------------------------------------------------


def cancel(
    ctx: typer.Context,
    job_id: Annotated[str, typer.Argument(help="The job to stop.")],
    grace: Annotated[
        float,
        typer.Option("--grace", min=0, help="Seconds to wait for the final checkpoint of a running job."),
    ] = 90.0,
    checkpoint: Annotated[
        bool, typer.Option("--checkpoint/--no-checkpoint", help="Take a final checkpoint first if running.")
    ] = True,
    stack: StackOpt = None,
    region: RegionOpt = None,
    profile: ProfileOpt = None,
    json_output: JsonOpt = False,
) -> None:
    """Stop a job cleanly: final checkpoint, CANCELLED, workflow stopped, instances terminated."""
    with reporting(json_output):
        cloud = cloud_of(ctx, stack, region, profile)
        d = deps(ctx)
        store = _store(cloud)
        job = store.get(job_id)
        if job.is_terminal and job.status != JobStatus.CANCELLED:
            raise CliError(f"job {job_id} already ended {job.status}; nothing to cancel")
        already = job.status == JobStatus.CANCELLED
        result: dict[str, Any] = {"already": already, "checkpoint": None}
        if not already:
            if checkpoint and job.status == JobStatus.RUNNING and job.instance_id:
                result["checkpoint"] = _final_checkpoint(cloud, store, job, grace, d)
            job = _mark_cancelled(store, job_id, d.now)
        # Also for a job already CANCELLED: a second `cancel` finishes what a first one
        # could not (a workflow that had not stopped yet, an instance it launched late).
        result.update(_stop_and_sweep(cloud, job_id, d))
        _print_cancel(job, result, json_output)


# How long cancel waits for the executions it stopped to end before sweeping again.
STOP_WAIT_SECONDS = 30.0
STOP_POLL_SECONDS = 1.0
# SSM invocation states in which `trainctl checkpoint-now` ended without a durable checkpoint.
FAILED_INVOCATION_STATES = frozenset({"Failed", "TimedOut", "Cancelled"})


def _final_checkpoint(cloud: Cloud, store: JobStore, job: Job, grace: float, d: Any) -> dict[str, Any]:
    """Ask the agent for a final checkpoint (SSM document) and wait up to `grace` for it.

    The document runs in stop mode, so the agent records its answer as this attempt's
    final checkpoint, on the row before `checkpoint-now` returns. That mark, not the step,
    says it landed: with slow steps the final checkpoint can be at the same step as the
    newest periodic one. A failed invocation ends the wait early.
    """
    assert job.instance_id is not None
    earlier = job.final_checkpoint
    if earlier is not None and earlier.attempt == job.attempt:
        # Taken already (say, by a cancel that did not finish): training stopped after it.
        return {"requested": False, "landed": True, "step": earlier.step, "detail": "taken earlier"}
    before = job.last_checkpoint.step if job.last_checkpoint else None
    requested = d.now()
    ssm = cloud.client("ssm")
    commands = CheckpointCommands(ssm, cloud.checkpoint_document)
    try:
        command_id = commands.request_checkpoint(
            instance_id=job.instance_id, job_id=job.job_id, deadline=requested + timedelta(seconds=grace)
        )
    except CheckpointRequestFailed as exc:
        # The instance is gone, or SSM refused: cancelling goes on without the final
        # checkpoint (the newest periodic one stays), and the reason is printed.
        return {"requested": False, "landed": False, "detail": str(exc)}
    waited = 0.0
    poll = min(2.0, grace) if grace > 0 else 0.0
    while True:
        current = store.get(job.job_id)
        final = current.final_checkpoint
        if final is not None and final.attempt == job.attempt:
            return {"requested": True, "command_id": command_id, "landed": True, "step": final.step}
        not_landed = {"requested": True, "command_id": command_id, "landed": False, "step": before}
        if current.is_terminal or current.attempt != job.attempt:
            return not_landed
        failure = _invocation_failure(ssm, command_id, job.instance_id)
        if failure is not None:
            return {**not_landed, "detail": failure}
        if waited >= grace:
            return not_landed
        d.sleep(poll)
        waited += poll


def _invocation_failure(ssm: Any, command_id: str, instance_id: str) -> str | None:
    """Why the checkpoint command ended without a checkpoint; None while it may still land."""
    try:
        invocation = ssm.get_command_invocation(CommandId=command_id, InstanceId=instance_id)
    except (ClientError, BotoCoreError):
        # Not registered yet (InvocationDoesNotExist right after SendCommand), or not
        # allowed to read it: the job row still says when the checkpoint lands.
        return None
    status = invocation.get("Status")
    if status not in FAILED_INVOCATION_STATES:
        return None
    lines = str(invocation.get("StandardErrorContent") or "").strip().splitlines()
    return f"the checkpoint command ended {status}" + (f": {lines[-1]}" if lines else "")


def _stop_and_sweep(cloud: Cloud, job_id: str, d: Any) -> dict[str, Any]:
    """Stop the job's executions and terminate its instances, twice over.

    StopExecution skips the workflow's own clean-up (TerminateReplacement), and a
    RunInstances it had in flight can land after the first sweep: wait (bounded) for the
    stopped executions to end, then sweep every attempt's instances again by the job tag.
    """
    stopped = _stop_executions(cloud, job_id)
    first = _terminate_instances(cloud, job_id)
    running = _await_stopped(cloud, stopped, d)
    late = [i for i in _terminate_instances(cloud, job_id) if i not in first]
    return {
        "stopped_executions": [name for name, _ in stopped],
        "executions_still_running": running,
        "terminated_instances": sorted({*first, *late}),
        "terminated_late": late,
    }


def _await_stopped(cloud: Cloud, stopped: list[tuple[str, str]], d: Any) -> list[str]:
    """Poll the stopped executions until none is RUNNING (or the bound); the ones still running."""
    sfn = cloud.client("stepfunctions")
    pending = list(stopped)
    waited = 0.0
    while pending:
        pending = [
            (name, arn)
            for name, arn in pending
            if sfn.describe_execution(executionArn=arn)["status"] == "RUNNING"
        ]
        if not pending or waited >= STOP_WAIT_SECONDS:
            break
        d.sleep(STOP_POLL_SECONDS)
        waited += STOP_POLL_SECONDS
    return [name for name, _ in pending]


def _mark_cancelled(store: JobStore, job_id: str, now: Any) -> Job:
    # The workflow or an agent may write between our read and our write: re-read and retry.
    for _ in range(5):
        job = store.get(job_id)
        if job.is_terminal:
            if job.status == JobStatus.CANCELLED:
                return job
            raise CliError(f"job {job_id} ended {job.status} while cancelling")
        try:
            return store.apply(model.mark_cancelled(job, now=now()))
        except ConcurrentUpdate:
            continue
    raise CliError(f"job {job_id} kept changing; try `trainctl cancel {job_id}` again")


def _execution_names(job_id: str) -> re.Pattern[str]:
    """The job's executions: its launch (`<job>-launch`) and its resumes (`<job>-<attempt>`)."""
    return re.compile(rf"^{re.escape(job_id)}-(?:\d+|{model.LAUNCH_EXECUTION_SUFFIX})$")


def _stop_executions(cloud: Cloud, job_id: str) -> list[tuple[str, str]]:
    """Stop the job's running executions (a recovery must not launch anew); (name, arn)s."""
    sfn = cloud.client("stepfunctions")
    mine = _execution_names(job_id)
    stopped = []
    paginator = sfn.get_paginator("list_executions")
    for page in paginator.paginate(stateMachineArn=cloud.state_machine_arn, statusFilter="RUNNING"):
        for execution in page.get("executions", []):
            if mine.match(execution["name"]):
                sfn.stop_execution(
                    executionArn=execution["executionArn"],
                    error="trainctl.Cancelled",
                    cause="trainctl cancel",
                )
                stopped.append((execution["name"], execution["executionArn"]))
    return stopped


def _job_instances(cloud: Cloud, job_id: str, states: list[str]) -> list[dict[str, Any]]:
    ec2 = cloud.client("ec2")
    paginator = ec2.get_paginator("describe_instances")
    pages = paginator.paginate(
        Filters=[
            {"Name": f"tag:{TAG_JOB_ID}", "Values": [job_id]},
            {"Name": "instance-state-name", "Values": states},
        ]
    )
    # The account id (for the instance ARN) is on the reservation, not the instance.
    return [
        {**i, "OwnerId": r.get("OwnerId")}
        for page in pages
        for r in page.get("Reservations", [])
        for i in r.get("Instances", [])
    ]


def _terminate_instances(cloud: Cloud, job_id: str) -> list[str]:
    """Terminate every live instance of the job (the current one and any replacement)."""
    ids = sorted({i["InstanceId"] for i in _job_instances(cloud, job_id, LIVE_INSTANCE_STATES)})
    if ids:
        cloud.client("ec2").terminate_instances(InstanceIds=ids)
    return ids


def _print_cancel(job: Job, result: dict[str, Any], json_output: bool) -> None:
    if json_output:
        emit_json({"job_id": job.job_id, "status": job.status, **result})
        return
    out = console()
    ckpt = result.get("checkpoint")
    if ckpt is not None:
        if ckpt.get("landed"):
            out.print(f"final checkpoint: step {ckpt['step']}")
        elif ckpt.get("requested"):
            why = f" ({ckpt['detail']})" if ckpt.get("detail") else ""
            out.print(f"final checkpoint requested but not confirmed{why}; the newest periodic one stays")
        else:
            out.print(f"final checkpoint not possible: {ckpt.get('detail')}")
    for name in result.get("stopped_executions", []):
        out.print(f"stopped workflow {name}")
    terminated = result.get("terminated_instances", [])
    late = set(result.get("terminated_late", []))
    names = [f"{i} (launched while the workflow was being stopped)" if i in late else i for i in terminated]
    if terminated or not result.get("already"):
        out.print(f"terminated {', '.join(names) if names else 'no instances'}")
    for name in result.get("executions_still_running", []):
        out.print(
            f"[yellow]workflow {name} had not stopped after {STOP_WAIT_SECONDS:g} s: run "
            f"`trainctl cancel {job.job_id}` again to sweep what it launches[/]"
        )
    if result.get("already"):
        out.print(f"job {job.job_id} was already CANCELLED")
    else:
        out.print(f"job [bold]{job.job_id}[/] is CANCELLED")


# --- logs ------------------------------------------------------------------------------------------


def logs(
    ctx: typer.Context,
    job_id: Annotated[str, typer.Argument(help="The job whose agent logs to print.")],
    follow: Annotated[bool, typer.Option("--follow", "-F", help="Keep printing until the job ends.")] = False,
    attempt: Annotated[int | None, typer.Option("--attempt", min=0, help="Only this attempt.")] = None,
    since: Annotated[
        float | None, typer.Option("--since", min=0, help="Only the last N minutes (default: all).")
    ] = None,
    log_group: Annotated[
        str | None, typer.Option("--log-group", help="Log group (default: the stack's agent log group).")
    ] = None,
    poll: Annotated[
        float, typer.Option("--poll", min=0.1, help="Seconds between polls with --follow.")
    ] = 2.0,
    stack: StackOpt = None,
    region: RegionOpt = None,
    profile: ProfileOpt = None,
    json_output: JsonOpt = False,
) -> None:
    """The agent's CloudWatch Logs for a job (one stream per attempt); --follow tails them."""
    with reporting(json_output):
        cloud = cloud_of(ctx, stack, region, profile)
        d = deps(ctx)
        store = _store(cloud)
        store.get(job_id)  # a typo'd job id is an error, not an empty log
        group = log_group or cloud.agent_log_group
        prefix = f"{job_id}/" if attempt is None else f"{job_id}/{attempt}/"
        floor_ms = int((d.now() - timedelta(minutes=since)).timestamp() * 1000) if since else 0
        client = cloud.client("logs")
        # Event id -> timestamp of what was printed. Each poll asks again from a window
        # behind the newest event seen: streams flush independently (the old instance's
        # last batch can land after the replacement's first lines), so an older event can
        # still arrive; the ids keep repeats out.
        seen: dict[str, int] = {}
        newest = 0
        printed = 0
        try:
            while True:
                ended = follow and store.get(job_id).is_terminal  # read before the drain
                start_ms = max(floor_ms, newest - FOLLOW_LOOKBACK_MS) if newest else floor_ms
                streams = agentlogs.job_streams(client, group, prefix)
                for event in agentlogs.stream_events(client, group, streams, start_ms=start_ms):
                    if event["eventId"] in seen:
                        continue
                    seen[event["eventId"]] = int(event["timestamp"])
                    newest = max(newest, int(event["timestamp"]))
                    _print_log_event(event, json_output)
                    printed += 1
                if not follow or ended:
                    # A job seen ended before this drain has nothing more to log.
                    break
                # Ids below the next window cannot come back: forget them.
                horizon = newest - FOLLOW_LOOKBACK_MS
                seen = {k: t for k, t in seen.items() if t >= horizon}
                d.sleep(poll)
        except KeyboardInterrupt:
            raise typer.Exit(130) from None
        if printed == 0 and not json_output and not follow:
            console().print(f"no log events for {job_id} in {group}")


# How far behind the newest event `logs --follow` keeps asking: a stream's batch that
# lands later than this after a newer one from another stream is not printed.
FOLLOW_LOOKBACK_MS = 5 * 60 * 1000


def _print_log_event(event: dict[str, Any], json_output: bool) -> None:
    moment = datetime.fromtimestamp(event["timestamp"] / 1000, tz=UTC)
    if json_output:
        # One JSON object per line, so `--follow --json` can be piped into jq.
        line = {"timestamp": moment, "stream": event.get("logStreamName"), "message": event["message"]}
        typer.echo(
            json.dumps({k: (model.format_time(v) if isinstance(v, datetime) else v) for k, v in line.items()})
        )
        return
    stream = str(event.get("logStreamName", "")).split("/")
    where = f"[{stream[1]}]" if len(stream) > 1 else ""
    typer.echo(f"{model.format_time(moment)} {where} {event['message'].rstrip()}")


# --- interrupt --------------------------------------------------------------------------------------


def interrupt(
    ctx: typer.Context,
    job_id: Annotated[str, typer.Argument(help="The job whose current instance to interrupt.")],
    synthetic: Annotated[
        bool,
        typer.Option(
            "--synthetic",
            help="Put a test Spot warning on the default event bus instead of starting the FIS experiment.",
        ),
    ] = False,
    stack: StackOpt = None,
    region: RegionOpt = None,
    profile: ProfileOpt = None,
    json_output: JsonOpt = False,
) -> None:
    """Game day: send a Spot interruption to the job's instance (FIS, or a synthetic event)."""
    with reporting(json_output):
        cloud = cloud_of(ctx, stack, region, profile)
        job = _store(cloud).get(job_id)
        if job.status not in (JobStatus.RUNNING, JobStatus.LAUNCHING) or not job.instance_id:
            raise CliError(f"job {job_id} is {job.status}: only a running job can be interrupted")
        found = _job_instances(cloud, job_id, ["pending", "running"])
        instance = next((i for i in found if i["InstanceId"] == job.instance_id), None)
        if instance is None:
            raise CliError(f"instance {job.instance_id} of job {job_id} is not running")
        arn = _instance_arn(cloud.region_name, instance)
        if synthetic:
            result = _synthetic_warning(cloud, job, arn)
        else:
            if instance.get("InstanceLifecycle") != "spot":
                raise CliError(
                    f"instance {job.instance_id} is on-demand: FIS can only interrupt Spot instances",
                    hint="use --synthetic to rehearse the event path",
                )
            result = _fis_experiment(cloud, job, arn)
        if json_output:
            emit_json({"job_id": job_id, "instance_id": job.instance_id, **result})
            return
        out = console()
        if synthetic:
            out.print(
                f"put a synthetic Spot interruption warning for {job.instance_id} "
                f"(event {result['event_id']})"
            )
        else:
            out.print(f"started FIS experiment {result['experiment_id']} against {job.instance_id}")
        out.print(f"watch the recovery: trainctl status {job_id}")


def _instance_arn(region: str, instance: dict[str, Any]) -> str:
    partition = (
        "aws-cn" if region.startswith("cn-") else "aws-us-gov" if region.startswith("us-gov-") else "aws"
    )
    owner = instance.get("OwnerId") or ""
    return f"arn:{partition}:ec2:{region}:{owner}:instance/{instance['InstanceId']}"


def _synthetic_warning(cloud: Cloud, job: Job, arn: str) -> dict[str, Any]:
    """The event EC2 would send, put on the default bus (emulated clouds: moto, rehearse).

    EventBridge on AWS refuses `aws.*` sources from PutEvents; that refusal is reported
    as such (use the FIS experiment there).
    """
    detail = {"instance-id": job.instance_id, "instance-action": "terminate"}
    response = cloud.client("events").put_events(
        Entries=[
            {
                "Source": EC2_SOURCE,
                "DetailType": SPOT_INTERRUPTION_WARNING,
                "Detail": json.dumps(detail),
                "Resources": [arn],
                "EventBusName": "default",
            }
        ]
    )
    entry = response["Entries"][0]
    if response.get("FailedEntryCount") or "EventId" not in entry:
        raise CliError(
            f"EventBridge refused the synthetic event: {entry.get('ErrorCode')}: {entry.get('ErrorMessage')}",
            hint="AWS accepts aws.ec2 events only from EC2 itself: drop --synthetic to use FIS",
        )
    return {"mode": "synthetic", "event_id": entry["EventId"], "detail": detail}


def _fis_experiment(cloud: Cloud, job: Job, arn: str) -> dict[str, Any]:
    """Start the stack's game-day experiment aimed at this job's instance only.

    The deployed template picks any trainctl instance; an experiment cannot retarget a
    template, so a copy with this instance as its only target is created, started and
    deleted (a running experiment keeps its own copy of the configuration).
    """
    fis = cloud.client("fis")
    template = fis.get_experiment_template(id=cloud.fis_template_id)["experimentTemplate"]
    # Same targets, but by ARN instead of by tag (FIS takes one or the other); filters stay.
    targets = {
        name: {
            "resourceType": target["resourceType"],
            "resourceArns": [arn],
            "selectionMode": "ALL",
            **({"filters": target["filters"]} if target.get("filters") else {}),
        }
        for name, target in template.get("targets", {}).items()
    }
    if not targets:
        raise CliError(f"FIS template {cloud.fis_template_id} has no targets; redeploy the stack")
    actions = {
        name: {
            k: v
            for k, v in action.items()
            if k in ("actionId", "description", "parameters", "targets", "startAfter")
        }
        for name, action in template.get("actions", {}).items()
    }
    # Fresh tokens: interrupting the same attempt twice (say, after a stopped experiment)
    # must create a new experiment, not replay the first one.
    token = f"{job.job_id[:40]}-{job.attempt}-{secrets.token_hex(4)}"
    copy = fis.create_experiment_template(
        clientToken=f"{token}-t",
        description=f"trainctl interrupt {job.job_id} attempt {job.attempt}"[:512],
        stopConditions=template.get("stopConditions") or [{"source": "none"}],
        targets=targets,
        actions=actions,
        roleArn=template["roleArn"],
        tags={TAG_JOB_ID: job.job_id},
    )["experimentTemplate"]
    try:
        experiment = fis.start_experiment(
            clientToken=token, experimentTemplateId=copy["id"], tags={TAG_JOB_ID: job.job_id}
        )["experiment"]
    finally:
        fis.delete_experiment_template(id=copy["id"])
    return {
        "mode": "fis",
        "experiment_id": experiment["id"],
        "state": experiment.get("state", {}).get("status"),
        "template_id": cloud.fis_template_id,
    }


__all__ = ["SpecError", "cancel", "interrupt", "list_jobs", "logs", "status", "submit"]
