"""Resume workflow overhead: how soon the replacement is asked for, and the row recorded.

    python -m bench.workflow_overhead               # 10 recoveries (after one warm-up)
    python -m bench.workflow_overhead --runs 20 --json

Runs the deployed definition (`resume.asl.json`, rendered as the stack deploys it) in
moto's Step Functions interpreter, in process. Each run is a Spot warning recovery of a
fresh job (INTERRUPTED on a moto instance, periodic checkpoint recorded) with the agent's
side of the handshake answered at once: a thread records the final checkpoint the moment
the workflow's task token is on the row and calls SendTaskSuccess, like the agent does.

Reported per run, from the execution history (one clock for every event):
- states entered before RunInstances is scheduled, in total and after the guard, on the
  path that leads to it (the top level and the launch branch). The goal: RunInstances is
  the first AWS write of the launch branch, <= 3 transitions after the guard;
- the AWS writes on that path before RunInstances (the goal says: none). The handshake
  branch runs beside it and stores its task token (a job-row write) at the same time;
  whether that write was scheduled first is reported, not judged: the branches race;
- ms from StartExecution to RunInstances scheduled, to the job row recorded, and to the
  end of the execution; plus the wall-clock time to the RunInstances call reaching
  moto's EC2 backend, measured by a hook on it.
Baseline in the same run: a two-state machine (Pass -> DynamoDB getItem task), whose
time to its task being scheduled is the interpreter's fixed cost per execution; the
figures are also given as multiples of it.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import Any

from bench._moto import ResumeAccount, build_resume_account, fake_aws_environment, median

MOTO_CONFIG: Any = {"stepfunctions": {"execute_state_machine": True}}
# API actions that write (a Task on one of these is an AWS write). Reads (getItem,
# describeInstances) are not; the handshake's token write is `updateItem` in the other
# branch, which `analyse` leaves out of the launch path and reports separately.
_WRITE_RESOURCES = ("updateItem", "putItem", "runInstances", "terminateInstances", "publish", "createTags")


@dataclass
class Hooks:
    """Moments observed inside moto's backends (perf_counter), and a wake-up for the agent."""

    run_instances: list[float] = field(default_factory=list)
    row_writes: threading.Condition = field(default_factory=threading.Condition)
    write_count: int = 0
    recorded: dict[str, float] = field(default_factory=dict)
    get_items: list[float] = field(default_factory=list)


@contextmanager
def backend_hooks() -> Iterator[Hooks]:
    """Time RunInstances reaching EC2 and the replacement landing on the job row, and
    wake the agent on every job-row write (so it answers at once, without polling)."""
    from moto.dynamodb.models import DynamoDBBackend
    from moto.ec2.models.instances import InstanceBackend

    hooks = Hooks()
    original_run = InstanceBackend.run_instances
    original_update = DynamoDBBackend.update_item
    original_get = DynamoDBBackend.get_item

    def run_instances(self: Any, *args: Any, **kwargs: Any) -> Any:
        hooks.run_instances.append(time.perf_counter())
        return original_run(self, *args, **kwargs)

    def update_item(self: Any, table_name: str, key: dict[str, Any], *args: Any, **kwargs: Any) -> Any:
        item = original_update(self, table_name, key, *args, **kwargs)
        status = item.attrs.get("status")
        if status is not None and status.value == "LAUNCHING":
            # the last LAUNCHING write of a job is its replacement being recorded
            hooks.recorded[key["pk"]["S"]] = time.perf_counter()
        with hooks.row_writes:
            hooks.write_count += 1
            hooks.row_writes.notify_all()
        return item

    def get_item(self: Any, *args: Any, **kwargs: Any) -> Any:
        hooks.get_items.append(time.perf_counter())
        return original_get(self, *args, **kwargs)

    InstanceBackend.run_instances = run_instances  # type: ignore[method-assign]
    DynamoDBBackend.update_item = update_item  # type: ignore[method-assign]
    DynamoDBBackend.get_item = get_item  # type: ignore[method-assign]
    try:
        yield hooks
    finally:
        InstanceBackend.run_instances = original_run  # type: ignore[method-assign]
        DynamoDBBackend.update_item = original_update  # type: ignore[method-assign]
        DynamoDBBackend.get_item = original_get  # type: ignore[method-assign]


def _changed(hooks: Hooks, seen: int, stop: threading.Event) -> Callable[[], bool]:
    return lambda: hooks.write_count != seen or stop.is_set()


class Agent:
    """The old instance's agent: answer the handshake as soon as the token is stored."""

    def __init__(self, store: Any, sfn: Any, hooks: Hooks) -> None:
        self._store = store
        self._sfn = sfn
        self._hooks = hooks

    def answer(self, job: Any, step: int, stop: threading.Event) -> None:
        from trainctl_core.jobs import CheckpointRef, utcnow
        from trainctl_core.store import format_time

        hooks = self._hooks
        while not stop.is_set():
            with hooks.row_writes:
                seen = hooks.write_count
            row = self._store.raw(job.job_id)
            if row.get("task_token") and row.get("task_token_attempt") == job.attempt:
                break
            with hooks.row_writes:
                hooks.row_writes.wait_for(_changed(hooks, seen, stop), timeout=0.5)
        else:
            return
        ref = CheckpointRef(
            step=step, prefix=f"{job.job_id}/ckpt/{step:012d}/", attempt=job.attempt, created_at=utcnow()
        )
        row = self._store.record_checkpoint(
            job.job_id, instance_id=job.instance_id, attempt=job.attempt, checkpoint=ref, final=True
        )
        checkpoint = {
            "step": step,
            "prefix": ref.prefix,
            "attempt": job.attempt,
            "created_at": format_time(ref.created_at),
        }
        self._sfn.send_task_success(
            taskToken=row["task_token"], output=json.dumps({"checkpoint": checkpoint})
        )


def interrupted_job(store: Any, ec2: Any, account: ResumeAccount, *, running_in: int) -> Any:
    """A job with three pools, RUNNING attempt 0 on a moto instance in pool `running_in`,
    with a periodic checkpoint at step 100, then warned (INTERRUPTED), as the handler leaves it."""
    from trainctl_core import jobs
    from trainctl_core.jobs import (
        CapacityPool,
        CheckpointKind,
        CheckpointRef,
        InterruptionReason,
        JobSpec,
        ResumePoint,
    )
    from trainctl_core.settings import TAG_ATTEMPT, TAG_JOB_ID, TAG_MANAGED

    pools = [
        CapacityPool(instance_type=t, subnet_id=account.subnets[i])
        for i, t in enumerate(("m5.large", "m5.xlarge", "c5.large"))
    ]
    job_id = f"bench-{uuid.uuid4().hex[:10]}"
    job = store.create(
        jobs.new_job(job_id, JobSpec(name=job_id, command=["python", "train.py"], pools=pools))
    )
    pool = pools[running_in]
    instance_id = ec2.run_instances(
        LaunchTemplate={"LaunchTemplateId": account.launch_template_id},
        InstanceType=pool.instance_type,
        SubnetId=pool.subnet_id,
        MinCount=1,
        MaxCount=1,
        TagSpecifications=[
            {
                "ResourceType": "instance",
                "Tags": [
                    {"Key": TAG_MANAGED, "Value": "true"},
                    {"Key": TAG_JOB_ID, "Value": job_id},
                    {"Key": TAG_ATTEMPT, "Value": "0"},
                ],
            }
        ],
    )["Instances"][0]["InstanceId"]
    now = jobs.utcnow()
    job = store.apply(
        jobs.mark_launching(
            job,
            instance_id=instance_id,
            pool=pool.label,
            resume_point=ResumePoint(kind=CheckpointKind.NONE),
            now=now,
        )
    )
    job = store.apply(jobs.mark_running(job, instance_id=instance_id, now=now))
    periodic = CheckpointRef(step=100, prefix=f"{job_id}/ckpt/{100:012d}/", attempt=0, created_at=now)
    store.record_checkpoint(job_id, instance_id=instance_id, attempt=0, checkpoint=periodic, final=False)
    return store.apply(
        jobs.mark_interrupted(
            store.get(job_id),
            instance_id=instance_id,
            reason=InterruptionReason.SPOT_WARNING,
            now=now,
            deadline=now + timedelta(minutes=2),
        )
    )


def wait_for(sfn: Any, arn: str, timeout: float = 60.0) -> dict[str, Any]:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        described: dict[str, Any] = sfn.describe_execution(executionArn=arn)
        if described["status"] != "RUNNING":
            return described
        time.sleep(0.02)
    raise RuntimeError(f"execution {arn} still running after {timeout}s")


def history(sfn: Any, arn: str) -> list[dict[str, Any]]:
    events: list[dict[str, Any]] = sfn.get_execution_history(executionArn=arn, maxResults=1000)["events"]
    return events


def _ms(later: datetime, earlier: datetime) -> float:
    return (later - earlier).total_seconds() * 1000


def state_index(definition: dict[str, Any]) -> dict[str, tuple[str, dict[str, Any]]]:
    """Every state by name -> (where it lives: 'top' or 'branch <n>', its definition)."""
    index: dict[str, tuple[str, dict[str, Any]]] = {}

    def walk(states: dict[str, Any], where: str) -> None:
        for name, state in states.items():
            index[name] = (where, state)
            for number, branch in enumerate(state.get("Branches", [])):
                walk(branch["States"], f"branch {number}")
            if "ItemProcessor" in state:  # a Map's iterations run in its own place
                walk(state["ItemProcessor"]["States"], where)

    walk(definition["States"], "top")
    return index


def _is_write(state: dict[str, Any]) -> bool:
    resource = str(state.get("Resource", ""))
    action = resource.rsplit(":", 1)[-1].split(".", 1)[0]
    return state.get("Type") == "Task" and action in _WRITE_RESOURCES


def analyse(events: list[dict[str, Any]], states: dict[str, tuple[str, dict[str, Any]]]) -> dict[str, Any]:
    """The path to RunInstances (the launch branch only: the handshake branch runs beside
    it) and the timings of one recovery, from its execution history."""
    launch_branch = states["LaunchSpot"][0]
    started = next(e["timestamp"] for e in events if e["type"] == "ExecutionStarted")
    path: list[str] = []
    run_instances_at = None
    token_write_first = False
    for event in events:
        name = event.get("stateEnteredEventDetails", {}).get("name")
        if name and states[name][0] in ("top", launch_branch):
            path.append(name)
        if event["type"] != "TaskScheduled":
            continue
        resource = event["taskScheduledEventDetails"]["resource"]
        if resource == "updateItem.waitForTaskToken":
            token_write_first = True
        if resource == "runInstances":
            run_instances_at = event["timestamp"]
            break
    if run_instances_at is None or "Guard" not in path:
        raise RuntimeError(f"the execution never reached RunInstances after the guard: {path}")
    after_guard = path[path.index("Guard") + 1 :]
    recorded_at = next(
        e["timestamp"]
        for e in events
        if e["type"] == "TaskStateExited" and e["stateExitedEventDetails"]["name"] == "RecordReplacement"
    )
    ended_at = next(e["timestamp"] for e in events if e["type"] == "ExecutionSucceeded")
    return {
        "path": path,
        "transitions_after_guard": len(after_guard),
        "writes_before_run_instances": [n for n in path[:-1] if _is_write(states[n][1])],
        "token_write_first": token_write_first,
        "ms_to_run_instances": _ms(run_instances_at, started),
        "ms_to_row_recorded": _ms(recorded_at, started),
        "ms_to_end": _ms(ended_at, started),
        "history_events": len(events),
    }


BASELINE_DEFINITION = {
    "StartAt": "Start",
    "States": {
        "Start": {"Type": "Pass", "Next": "Read"},
        "Read": {
            "Type": "Task",
            "Resource": "arn:aws:states:::dynamodb:getItem",
            "Parameters": {"TableName": "trainctl-jobs", "Key": {"pk": {"S.$": "$.pk"}}},
            "End": True,
        },
    },
}
# Where the interrupted instance ran: the reclaimed pool is tried last for Spot, so when it
# is the first pool of the list the launch branch walks past it first.
SCENARIOS = {"reclaimed pool listed first": 0, "reclaimed pool listed second": 1}


def measure(runs: int) -> dict[str, Any]:
    fake_aws_environment()
    import boto3
    from moto import mock_aws

    from trainctl_core.store import JobStore

    # moto's interpreter logs every absent optional field a Choice probes (IsPresent).
    logging.getLogger("moto.stepfunctions").setLevel(logging.CRITICAL)
    with mock_aws(config=MOTO_CONFIG), backend_hooks() as hooks:
        clients: dict[str, Any] = {
            name: boto3.client(name)
            for name in ("dynamodb", "ec2", "stepfunctions", "sns", "iam")  # type: ignore[call-overload]
        }
        sfn = clients["stepfunctions"]
        account = build_resume_account(
            ddb=clients["dynamodb"], ec2=clients["ec2"], sfn=sfn, sns=clients["sns"], iam=clients["iam"]
        )
        definition = sfn.describe_state_machine(stateMachineArn=account.state_machine_arn)["definition"]
        states = state_index(json.loads(definition))
        baseline_arn = sfn.create_state_machine(
            name="bench-baseline",
            definition=json.dumps(BASELINE_DEFINITION),
            roleArn="arn:aws:iam::123456789012:role/trainctl-resume",
        )["stateMachineArn"]
        store = JobStore(clients["dynamodb"], account.table)
        agent = Agent(store, sfn, hooks)

        results: dict[str, list[dict[str, Any]]] = {name: [] for name in SCENARIOS}
        baseline: dict[str, list[float]] = {"history": [], "wall": []}
        for index in range(runs + 1):  # the first round warms the interpreter up
            gets_before = len(hooks.get_items)
            t0 = time.perf_counter()
            arn = sfn.start_execution(
                stateMachineArn=baseline_arn, name=f"baseline-{index}", input=json.dumps({"pk": "JOB#none"})
            )["executionArn"]
            wait_for(sfn, arn)
            events = history(sfn, arn)
            started = next(e["timestamp"] for e in events if e["type"] == "ExecutionStarted")
            scheduled = next(e["timestamp"] for e in events if e["type"] == "TaskScheduled")
            if index:
                baseline["history"].append(_ms(scheduled, started))
                baseline["wall"].append((hooks.get_items[gets_before] - t0) * 1000)

            for scenario, running_in in SCENARIOS.items():
                result = recover_once(sfn, store, agent, hooks, clients["ec2"], account, states, running_in)
                if index:
                    results[scenario].append(result)

        parse_ms = {
            "resume": moto_parse_ms(definition),
            "baseline": moto_parse_ms(json.dumps(BASELINE_DEFINITION)),
        }

    base = {kind: median(values) for kind, values in baseline.items()}
    report: dict[str, Any] = {
        "runs": runs,
        "baseline_ms_to_first_task": round(base["history"], 1),
        "baseline_wall_ms_to_first_task": round(base["wall"], 1),
        "moto_parse_ms": {k: round(v, 1) for k, v in parse_ms.items()},
        "scenarios": {},
    }
    for scenario, runs_of in results.items():
        first = runs_of[0]
        figures = {key: median([r[key] for r in runs_of]) for key in TIMINGS}
        report["scenarios"][scenario] = {
            "path_to_run_instances": first["path"],
            "states_before_run_instances": len(first["path"]) - 1,
            "transitions_after_guard": first["transitions_after_guard"],
            "writes_before_run_instances": first["writes_before_run_instances"],
            "runs_with_token_write_first": sum(r["token_write_first"] for r in runs_of),
            "history_events": first["history_events"],
            **{k: round(v, 1) for k, v in figures.items()},
            **{
                f"{k}_x_baseline": round(v / base["wall" if k.startswith("wall") else "history"], 1)
                for k, v in figures.items()
            },
        }
    return report


TIMINGS = (
    "ms_to_run_instances",
    "ms_to_row_recorded",
    "ms_to_end",
    "wall_ms_to_run_instances",
    "wall_ms_to_row_recorded",
)


def moto_parse_ms(definition: str, repeats: int = 5) -> float:
    """What moto spends parsing `definition`, which it does again for every execution
    (before ExecutionStarted): part of the wall-clock figures, absent on AWS."""
    from moto.stepfunctions.parser.asl.parse.asl_parser import AmazonStateLanguageParser

    samples = []
    for _ in range(repeats):
        started = time.perf_counter()
        AmazonStateLanguageParser.parse(definition)
        samples.append((time.perf_counter() - started) * 1000)
    return median(samples)


def recover_once(
    sfn: Any,
    store: Any,
    agent: Agent,
    hooks: Hooks,
    ec2: Any,
    account: ResumeAccount,
    states: dict[str, tuple[str, dict[str, Any]]],
    running_in: int,
) -> dict[str, Any]:
    """One Spot-warning recovery, checked (final checkpoint resumed), with its figures."""
    from trainctl_core.jobs import format_time

    job = interrupted_job(store, ec2, account, running_in=running_in)
    interruption = job.interruption_for(job.attempt)
    payload = {
        "job_id": job.job_id,
        "instance_id": job.instance_id,
        "attempt": job.attempt,
        "reason": "spot-warning",
        "deadline": format_time(interruption.deadline),
        "handshake_timeout_seconds": 60,
    }
    stop = threading.Event()
    responder = threading.Thread(target=agent.answer, args=(job, 150, stop), daemon=True)
    responder.start()
    calls_before = len(hooks.run_instances)
    t0 = time.perf_counter()
    arn = sfn.start_execution(
        stateMachineArn=account.state_machine_arn,
        name=f"{job.job_id}-{job.attempt}",
        input=json.dumps(payload),
    )["executionArn"]
    described = wait_for(sfn, arn)
    stop.set()
    responder.join(timeout=10)
    if described["status"] != "SUCCEEDED":
        raise RuntimeError(f"recovery {arn} ended {described['status']}: {described.get('cause')}")
    row = store.get(job.job_id)
    resumed_from = row.resume_point.step if row.resume_point else None
    if (row.attempt, resumed_from) != (job.attempt + 1, 150):
        raise RuntimeError(f"recovery {arn} did not resume from the final checkpoint: {row}")
    result = analyse(history(sfn, arn), states)
    result["wall_ms_to_run_instances"] = (hooks.run_instances[calls_before] - t0) * 1000
    result["wall_ms_to_row_recorded"] = (hooks.recorded[f"JOB#{job.job_id}"] - t0) * 1000
    return result


def render(report: dict[str, Any]) -> str:
    lines = [
        f"Resume workflow in moto: {report['runs']} Spot-warning recoveries per scenario, "
        "handshake answered at once (medians)",
        "  baseline, Pass > getItem task: StartExecution > task "
        f"{report['baseline_wall_ms_to_first_task']:.1f} ms wall clock, "
        f"{report['baseline_ms_to_first_task']:.1f} ms in the execution history",
        f"  moto re-parses the definition for every execution: {report['moto_parse_ms']['resume']:.1f} ms "
        f"for resume.asl.json, {report['moto_parse_ms']['baseline']:.1f} ms for the baseline "
        "(inside the wall-clock figures; AWS does not do this per execution)",
    ]
    for scenario, r in report["scenarios"].items():
        meets = r["transitions_after_guard"] <= 3 and not r["writes_before_run_instances"]
        lines += [
            f"  {scenario}:",
            f"    path: {' > '.join(r['path_to_run_instances'])}",
            f"    transitions after the guard: {r['transitions_after_guard']}; "
            f"AWS writes before RunInstances on its path: {len(r['writes_before_run_instances'])} -> "
            f"{'meets' if meets else 'misses'} the goal (first write of the launch branch, "
            "<= 3 transitions after the guard)",
            f"    handshake branch's token write scheduled before RunInstances in "
            f"{r['runs_with_token_write_first']} of {report['runs']} runs (the branches race)",
            f"    {'':34} {'wall ms':>8} {'x base':>7} {'history ms':>11} {'x base':>7}",
            f"    {'StartExecution > RunInstances':34} {r['wall_ms_to_run_instances']:>8.1f} "
            f"{r['wall_ms_to_run_instances_x_baseline']:>7.1f} {r['ms_to_run_instances']:>11.1f} "
            f"{r['ms_to_run_instances_x_baseline']:>7.1f}",
            f"    {'StartExecution > job row recorded':34} {r['wall_ms_to_row_recorded']:>8.1f} "
            f"{r['wall_ms_to_row_recorded_x_baseline']:>7.1f} {r['ms_to_row_recorded']:>11.1f} "
            f"{r['ms_to_row_recorded_x_baseline']:>7.1f}",
            f"    {'StartExecution > succeeded':34} {'':>8} {'':>7} {r['ms_to_end']:>11.1f} "
            f"{r['ms_to_end_x_baseline']:>7.1f}   ({r['history_events']} history events)",
        ]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m bench.workflow_overhead", description=__doc__.split("\n\n")[0]
    )
    parser.add_argument(
        "--runs", type=int, default=10, help="recoveries per scenario (after one warm-up round)"
    )
    parser.add_argument("--json", action="store_true", help="print the figures as JSON")
    args = parser.parse_args(argv)
    if args.runs < 1:
        parser.error("--runs must be at least 1")
    report = measure(args.runs)
    print(json.dumps(report, indent=1) if args.json else render(report))
    return 0


if __name__ == "__main__":
    sys.exit(main())
