"""Handler cold import and warm latency, each against a baseline measured in the same run.

    python -m bench.handler_import                # 15 cold rounds, 200 warm invocations
    python -m bench.handler_import --rounds 10 --invocations 100 --json

Cold: each handler module is imported in a fresh interpreter (what a Lambda cold start
pays for our code: imports plus the module-scope wiring, i.e. settings and clients),
timed inside the child around the import statement only, so interpreter start-up does
not dilute the ratio. The baseline is a bare `import boto3` timed the same way. Rounds
interleave the candidates (in a rotating order) so drift on this shared machine hits all
of them alike; the figure is the median. The environment is Lambda-like
(`LAMBDA_TASK_ROOT` set, so Powertools Tracer loads and patches X-Ray as it does in the
deployed functions, which run with active tracing); a second interruption row with
tracing disabled shows what X-Ray costs.

Warm: both handlers invoked in-process against moto with real event shapes, each
invocation a *new* loss (its own job, instance and event id), so every one runs the full
path (idempotency record, job lookup, SSM command, conditional write, StartExecution)
rather than the idempotency short-cut. Baseline: a bare DynamoDB `get_item` against the
same moto, interleaved with the handler calls. AWS calls per invocation are counted too,
so the ratio can be read per call.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import io
import json
import os
import subprocess
import sys
import time
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from bench._moto import (
    CHECKPOINT_DOCUMENT,
    IDEMPOTENCY_TABLE,
    JOBS_TABLE,
    create_checkpoint_document,
    create_idempotency_table,
    create_jobs_table,
    fake_aws_environment,
    median,
    percentile,
)

HANDLERS = {
    "interruption": "functions.interruption.handler",
    "instance_state": "functions.instance_state.handler",
}
GOAL_RATIO = 1.3
EVENTS_DIR = Path(__file__).resolve().parents[1] / "tests" / "events"
STATE_MACHINE_ARN = "arn:aws:states:us-east-1:123456789012:stateMachine:trainctl-resume"
_PROBE = "import time\nt = time.perf_counter()\n{statement}\nprint(repr(time.perf_counter() - t))\n"
# What any boto3 Lambda with the same three clients pays before its own code: a second
# baseline that separates our overhead (Powertools, pydantic, X-Ray, trainctl_core) from
# the clients every such handler must create.
_CLIENTS_STATEMENT = (
    "import boto3\n"
    "session = boto3.session.Session()\n"
    "for name in ('dynamodb', 'ssm', 'stepfunctions'):\n"
    "    session.client(name)"
)


def settings_environment() -> dict[str, str]:
    from trainctl_core import settings

    return {
        settings.ENV_JOBS_TABLE: JOBS_TABLE,
        settings.ENV_IDEMPOTENCY_TABLE: IDEMPOTENCY_TABLE,
        settings.ENV_CHECKPOINT_DOCUMENT: CHECKPOINT_DOCUMENT,
        settings.ENV_RESUME_STATE_MACHINE_ARN: STATE_MACHINE_ARN,
    }


# --- cold import ------------------------------------------------------------------------------


def child_environment(*, tracing: bool) -> dict[str, str]:
    env = fake_aws_environment(dict(os.environ))
    env.update(settings_environment())
    env.update(
        {
            "AWS_LAMBDA_FUNCTION_NAME": "trainctl-interruption",
            "POWERTOOLS_SERVICE_NAME": "trainctl",
            "POWERTOOLS_METRICS_NAMESPACE": "trainctl",
            # No daemon here: a segment emitted outside Lambda must not log errors.
            "AWS_XRAY_CONTEXT_MISSING": "IGNORE_ERROR",
        }
    )
    # Powertools decides "in Lambda" by LAMBDA_TASK_ROOT; there X-Ray uses its local
    # sampler (outside Lambda it would build X-Ray clients for remote sampling).
    env["LAMBDA_TASK_ROOT"] = str(Path.cwd())
    if tracing:
        env.pop("POWERTOOLS_TRACE_DISABLED", None)
    else:
        env["POWERTOOLS_TRACE_DISABLED"] = "1"
    return env


@dataclass(frozen=True)
class Candidate:
    label: str
    statement: str
    tracing: bool = True
    handler: bool = False


def cold_candidates() -> list[Candidate]:
    return [
        Candidate("import boto3 (baseline)", "import boto3"),
        Candidate("import boto3 + 3 clients", _CLIENTS_STATEMENT),
        Candidate("functions.interruption.handler", f"import {HANDLERS['interruption']}", handler=True),
        Candidate("functions.instance_state.handler", f"import {HANDLERS['instance_state']}", handler=True),
        Candidate(
            "functions.interruption.handler, tracing off",
            f"import {HANDLERS['interruption']}",
            tracing=False,
            handler=True,
        ),
    ]


def import_seconds(candidate: Candidate) -> float:
    """Seconds the candidate's statement takes in a fresh interpreter."""
    completed = subprocess.run(
        [sys.executable, "-c", _PROBE.format(statement=candidate.statement)],
        env=child_environment(tracing=candidate.tracing),
        capture_output=True,
        text=True,
        check=False,
    )
    if completed.returncode != 0:
        raise RuntimeError(f"{candidate.label} failed:\n{completed.stderr.strip()}")
    return float(completed.stdout.strip().splitlines()[-1])


def measure_cold(rounds: int) -> dict[str, Any]:
    candidates = cold_candidates()
    for candidate in candidates:  # warm-up: byte-code caches written, disk cache filled
        import_seconds(candidate)
    samples: dict[str, list[float]] = {c.label: [] for c in candidates}
    for round_index in range(rounds):
        shift = round_index % len(candidates)
        for candidate in candidates[shift:] + candidates[:shift]:
            samples[candidate.label].append(import_seconds(candidate) * 1000)
    baseline = median(samples[candidates[0].label])
    with_clients = median(samples[candidates[1].label])
    rows = []
    for candidate in candidates:
        ms = median(samples[candidate.label])
        rows.append(
            {
                "label": candidate.label,
                "handler": candidate.handler,
                "median_ms": round(ms, 1),
                "min_ms": round(min(samples[candidate.label]), 1),
                "ratio": round(ms / baseline, 2),
                "ratio_vs_clients": round(ms / with_clients, 2),
            }
        )
    return {"rounds": rounds, "baseline_ms": round(baseline, 1), "rows": rows}


# --- warm latency ---------------------------------------------------------------------------------


@dataclass
class LambdaContext:
    function_name: str = "trainctl-handler"
    memory_limit_in_mb: int = 256
    invoked_function_arn: str = "arn:aws:lambda:us-east-1:123456789012:function:trainctl-handler"
    aws_request_id: str = "bench"

    def get_remaining_time_in_millis(self) -> int:
        return 30_000


def load_event(name: str) -> dict[str, Any]:
    event: dict[str, Any] = json.loads((EVENTS_DIR / f"{name}.json").read_text())
    return event


def measure_warm(invocations: int) -> dict[str, Any]:
    fake_aws_environment()
    os.environ.update(settings_environment())
    os.environ["POWERTOOLS_TRACE_DISABLED"] = "1"  # no X-Ray daemon outside Lambda
    os.environ.setdefault("POWERTOOLS_SERVICE_NAME", "trainctl")
    os.environ.setdefault("POWERTOOLS_METRICS_NAMESPACE", "trainctl")

    import boto3
    from moto import mock_aws

    from trainctl_core import clients, jobs, settings
    from trainctl_core.jobs import CapacityPool, CheckpointKind, JobSpec, ResumePoint
    from trainctl_core.store import JobStore, job_key

    sink = io.StringIO()
    with mock_aws(), contextlib.redirect_stdout(sink):
        clients.reset()
        settings.get_settings.cache_clear()
        ddb = boto3.client("dynamodb")
        create_jobs_table(ddb)
        create_idempotency_table(ddb)
        create_checkpoint_document(boto3.client("ssm"))
        sfn = boto3.client("stepfunctions")
        arn = sfn.create_state_machine(
            name="trainctl-resume",
            definition='{"StartAt": "Done", "States": {"Done": {"Type": "Succeed"}}}',
            roleArn="arn:aws:iam::123456789012:role/sfn",
        )["stateMachineArn"]
        assert arn == STATE_MACHINE_ARN, arn
        # Import inside the redirect: the Logger binds stdout at creation, and the log
        # lines and metrics it prints per invocation are part of the cost but not output.
        modules = {}
        for name, module_name in HANDLERS.items():
            sys.modules.pop(module_name, None)
            modules[name] = __import__(module_name, fromlist=["handler"])

        store = JobStore(ddb, JOBS_TABLE)
        pool = CapacityPool(instance_type="g5.xlarge", subnet_id="subnet-0aaa1111")
        spec = JobSpec(name="bench", command=["python", "train.py"], pools=[pool])

        def running_job(index: int) -> str:
            instance_id = f"i-{index:017x}"
            job = store.create(jobs.new_job(f"bench-{index}", spec))
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
            store.apply(jobs.mark_running(job, instance_id=instance_id, now=now))
            return instance_id

        calls = {"count": 0}

        def count(**_kwargs: Any) -> None:
            calls["count"] += 1

        for service in ("dynamodb", "ssm", "stepfunctions"):
            clients.client(service).meta.events.register("before-call.*", count)

        templates = {
            "interruption": load_event("spot_interruption_warning"),
            "instance_state": load_event("instance_state_terminated"),
        }
        context = LambdaContext()
        samples: dict[str, list[float]] = {"get_item (baseline)": [], **{n: [] for n in HANDLERS}}
        calls_per_invocation: dict[str, list[int]] = {n: [] for n in HANDLERS}
        outcomes: dict[str, set[str]] = {n: set() for n in HANDLERS}
        index = 0
        for iteration in range(invocations + 1):  # the first of each is the warm-up
            for name, module in modules.items():
                index += 1
                event = copy.deepcopy(templates[name])
                event["id"] = str(uuid.uuid4())
                event["detail"]["instance-id"] = running_job(index)
                calls["count"] = 0
                started = time.perf_counter()
                response = module.handler(event, context)
                elapsed = (time.perf_counter() - started) * 1000
                if iteration:
                    samples[name].append(elapsed)
                    calls_per_invocation[name].append(calls["count"])
                    outcomes[name].add(response["outcome"])
                started = time.perf_counter()
                ddb.get_item(TableName=JOBS_TABLE, Key=job_key(f"bench-{index}"), ConsistentRead=True)
                elapsed = (time.perf_counter() - started) * 1000
                if iteration:
                    samples["get_item (baseline)"].append(elapsed)
        settings.get_settings.cache_clear()
        clients.reset()

    baseline = median(samples["get_item (baseline)"])
    rows = []
    for name, values in samples.items():
        row: dict[str, Any] = {
            "label": name,
            "median_ms": round(median(values), 2),
            "p95_ms": round(percentile(values, 95), 2),
            "ratio": round(median(values) / baseline, 1),
        }
        if name in calls_per_invocation:
            row["aws_calls"] = median([float(c) for c in calls_per_invocation[name]])
            row["outcomes"] = sorted(outcomes[name])
        rows.append(row)
    return {"invocations": invocations, "baseline_ms": round(baseline, 2), "rows": rows}


# --- report -----------------------------------------------------------------------------------------


def render(cold: dict[str, Any], warm: dict[str, Any]) -> str:
    lines = [f"Cold import (fresh interpreter, median of {cold['rounds']} interleaved rounds)"]
    lines.append(f"  {'':46} {'median ms':>10} {'min ms':>8} {'x boto3':>8} {'x +clients':>10}")
    for row in cold["rows"]:
        lines.append(
            f"  {row['label']:46} {row['median_ms']:>10.1f} {row['min_ms']:>8.1f} {row['ratio']:>8.2f}"
            f" {row['ratio_vs_clients']:>10.2f}"
        )
    worst = max(r["ratio"] for r in cold["rows"] if r["handler"])
    verdict = "meets" if worst <= GOAL_RATIO else "misses"
    lines.append(f"  worst handler ratio {worst:.2f} {verdict} the goal of <= {GOAL_RATIO}")
    lines.append(f"Warm invocation (in-process moto, {warm['invocations']} invocations each, full path)")
    lines.append(f"  {'':22} {'median ms':>10} {'p95 ms':>8} {'x get_item':>11} {'AWS calls':>10}")
    for row in warm["rows"]:
        calls = f"{row['aws_calls']:.0f}" if "aws_calls" in row else "1"
        figures = f"{row['median_ms']:>10.2f} {row['p95_ms']:>8.2f} {row['ratio']:>11.1f}"
        lines.append(f"  {row['label']:22} {figures} {calls:>10}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m bench.handler_import", description=__doc__.split("\n\n")[0]
    )
    parser.add_argument(
        "--rounds", type=int, default=15, help="cold rounds (fresh interpreters) per candidate"
    )
    parser.add_argument("--invocations", type=int, default=200, help="warm invocations per handler")
    parser.add_argument("--json", action="store_true", help="print the figures as JSON")
    args = parser.parse_args(argv)
    if args.rounds < 10:
        parser.error("--rounds must be at least 10 (the figure is a median of >= 10 samples)")
    if args.invocations < 20:
        parser.error("--invocations must be at least 20 (p95 needs a sample)")
    cold = measure_cold(args.rounds)
    warm = measure_warm(args.invocations)
    if args.json:
        print(json.dumps({"cold": cold, "warm": warm}, indent=1))
    else:
        print(render(cold, warm))
    return 0


if __name__ == "__main__":
    sys.exit(main())
