"""Regenerate docs/CLI.md: run the real commands against the moto-backed stack of
tests/cli/conftest.py and paste their output.

    .venv/bin/python -m tests.cli.render_docs          # rewrites docs/CLI.md

The cloud is moto; what the serverless side would do between commands (the agent
reporting RUNNING, checkpoints and its recovery metric lines, the interruption handler
and the resume workflow replacing an instance and retiring the old one) is played by the
same helpers the tests use, and said so in the page. Prices are moto's patched spot
history (illustrative numbers). tests/cli/test_docs.py checks that docs/CLI.md is what
this produces (ids, times and numbers aside).
"""

from __future__ import annotations

import os
import re
import tempfile
import time
from datetime import UTC, datetime, timedelta
from pathlib import Path

os.environ.setdefault("MOTO_EC2_LOAD_DEFAULT_AMIS", "false")
for _name, _value in {
    "AWS_ACCESS_KEY_ID": "testing",
    "AWS_SECRET_ACCESS_KEY": "testing",
    "AWS_DEFAULT_REGION": "us-east-1",
}.items():
    os.environ.setdefault(_name, _value)

from moto import mock_aws  # noqa: E402 - after the environment defaults
from typer.testing import CliRunner  # noqa: E402 - after the environment defaults

from tests.cli import conftest  # noqa: E402 - after the environment defaults
from trainctl.cli import app  # noqa: E402 - after the environment defaults
from trainctl.commands.output import Deps  # noqa: E402 - after the environment defaults
from trainctl_core import jobs, metrics  # noqa: E402 - after the environment defaults

DOC = Path(__file__).resolve().parents[2] / "docs" / "CLI.md"
TEMPLATE = Path(__file__).with_name("CLI.md.in")

SPEC = """\
name: resnet50
command: python train.py --epochs 90
pools:
  instance_types: [m5.large, c5.xlarge]   # subnets: the stack's, in order
market: spot-then-on-demand
limits: {max_interruptions: 10, max_hours: 24, budget_usd: 50}
checkpoint: {interval_seconds: 300, retention: 3}
env: {EPOCHS: "90"}
tags: {team: vision}
"""
BAD_SPEC = SPEC.replace("market: spot-then-on-demand", "market: cheapest")


class Session:
    def __init__(self, deps: Deps) -> None:
        self.deps = deps
        self.blocks: list[str] = []

    def run(self, *args: str, shown: str | None = None) -> str:
        result = CliRunner().invoke(app, list(args), obj=self.deps, env={"COLUMNS": "100"})
        text = (result.stdout + result.stderr).rstrip()
        lines = "\n".join(line.rstrip() for line in text.splitlines())
        command = shown or "trainctl " + " ".join(args)
        exit_note = f"\n# exit code {result.exit_code}" if result.exit_code else ""
        return f"```console\n$ {command}\n{lines}{exit_note}\n```"


def utc(**delta: float) -> datetime:
    return datetime.now(UTC) + timedelta(**delta)


def metric_line(name: str, value: float, job_id: str) -> str:
    """A recovery metric line as the agent ships it (trainctl_core.metrics)."""
    return metrics.metric_line(name, value, metrics.Unit.SECONDS, job_id=job_id)


def main() -> None:
    DOC.write_text(generate())
    print(f"wrote {DOC}")


def generate() -> str:
    """docs/CLI.md as the commands print it now (runs them in a scratch directory)."""
    home = Path.cwd()
    cwd = Path(tempfile.mkdtemp(prefix="trainctl-docs-"))
    (cwd / "trainctl.yaml").write_text(SPEC)
    (cwd / "bad.yaml").write_text(BAD_SPEC)
    os.chdir(cwd)
    try:
        return render(_capture())
    finally:
        os.chdir(home)


def _capture() -> dict[str, str]:
    original = conftest.SpotInstances.describe_spot_price_history
    conftest.SpotInstances.describe_spot_price_history = conftest._describe_spot_price_history  # type: ignore[method-assign]
    prices = dict(conftest.SPOT_PRICES)  # run from a test: leave the module's prices as found
    out: dict[str, str] = {}
    try:
        with mock_aws(config={"stepfunctions": {"execute_state_machine": True}}):
            stack = conftest._build_stack()
            zone_a, zone_b = (stack.zones[s] for s in stack.subnets)
            start = utc(days=-2).strftime("%Y-%m-%dT%H:%M:%SZ")
            stack.spot_prices[("m5.large", zone_a)] = [(start, "0.0371")]
            stack.spot_prices[("m5.large", zone_b)] = [(start, "0.0402")]
            stack.spot_prices[("c5.xlarge", zone_a)] = [(start, "0.0689")]
            stack.spot_prices[("c5.xlarge", zone_b)] = [(start, "0.0655")]
            session = Session(Deps(sleep=lambda s: None))

            out["bad"] = session.run("submit", "-f", "bad.yaml")
            out["dry"] = session.run("submit", "--dry-run")
            submitted = CliRunner().invoke(app, ["submit", "--job-id", "resnet50-demo"], obj=session.deps)
            out["submit"] = (
                "```console\n$ trainctl submit --job-id resnet50-demo\n"
                + "\n".join(line.rstrip() for line in submitted.stdout.rstrip().splitlines())
                + "\n```"
            )
            stack.wait_execution(jobs.execution_name("resnet50-demo", 0, jobs.InterruptionReason.LAUNCH))
            out["status_launching"] = session.run("status", "resnet50-demo")

            # The agent on the instance reports in, checkpoints and heartbeats.
            job = stack.store.get("resnet50-demo")
            assert job.instance_id is not None
            job = stack.store.apply(jobs.mark_running(job, instance_id=job.instance_id, now=utc()))
            job = stack.checkpoint(job, 1200, utc(seconds=-95), final=False)
            stack.store.heartbeat(
                job.job_id, instance_id=job.instance_id, attempt=0, step=1410, steps_per_second=2.2
            )
            group = "/trainctl/Trainctl/agent"
            stream = f"{job.job_id}/0/{job.instance_id}"
            stack.logs.create_log_stream(logGroupName=group, logStreamName=stream)
            now_ms = int(time.time() * 1000)
            lines = [
                "agent: job resnet50-demo attempt 0 on " + job.instance_id + ", resume point: none",
                "agent: started python train.py --epochs 90 (pid 2291)",
                "checkpoint: step 600 durable in 2.1 s (s3://trainctl-checkpoints/resnet50-demo/ckpt/600/)",
                "checkpoint: step 1200 durable in 2.0 s (s3://trainctl-checkpoints/resnet50-demo/ckpt/1200/)",
            ]
            stack.logs.put_log_events(
                logGroupName=group,
                logStreamName=stream,
                logEvents=[
                    {"timestamp": now_ms - 60000 + i * 1000, "message": m} for i, m in enumerate(lines)
                ],
            )
            out["status_running"] = session.run("status", "resnet50-demo")
            out["logs"] = session.run("logs", "resnet50-demo")
            out["interrupt"] = session.run("interrupt", "resnet50-demo", "--synthetic")
            out["fis"] = session.run("interrupt", "resnet50-demo")

            # A job from earlier: interrupted once, replaced in the other pool, finished.
            m5, c5 = stack.pools("m5.large")[0], stack.pools("c5.xlarge", "c5.xlarge")[1]
            old = stack.new_job([m5, c5], now=utc(hours=-6))
            old = stack.start_attempt(old, m5, utc(hours=-6))
            first_instance = old.instance_id
            assert first_instance is not None
            old = stack.checkpoint(old, 9000, utc(hours=-4, minutes=-4), final=False)
            noticed = utc(hours=-4).replace(microsecond=0)  # EC2's record has whole seconds too
            old = stack.interrupt(old, noticed)
            old = stack.checkpoint(old, 9300, noticed + timedelta(seconds=8), final=True)
            launched = stack.store.apply(
                jobs.mark_launching(
                    old,
                    instance_id=stack.launch(old.job_id, 1, c5),
                    pool=c5.label,
                    resume_point=jobs.ResumePoint(kind="final", step=9300),
                    now=noticed + timedelta(seconds=25),
                )
            )
            second_instance = launched.instance_id
            assert second_instance is not None
            running = stack.store.apply(
                jobs.mark_running(launched, instance_id=second_instance, now=noticed + timedelta(seconds=70))
            )
            stack.store.apply(jobs.mark_succeeded(running, instance_id=second_instance, now=utc(hours=-1)))
            # The agents' recovery lines: the final checkpoint durable 41 s after the
            # notice, training again on the replacement 96 s after it. The workflow
            # retired the old instance once both the checkpoint and the launch were done;
            # the replacement shut itself down after the job succeeded.
            durable = metric_line(metrics.TIME_TO_CHECKPOINT, 41, old.job_id)
            resumed = metric_line(metrics.TIME_TO_RESUME, 96, old.job_id)
            stack.put_logs(f"{old.job_id}/0/{first_instance}", durable, at=time.time())
            stack.put_logs(f"{old.job_id}/1/{second_instance}", resumed, at=time.time())
            stack.retire(first_instance, noticed + timedelta(seconds=42))
            stack.retire(second_instance, utc(hours=-1, seconds=6))

            out["list"] = session.run("list")
            out["savings"] = session.run("savings", old.job_id, "--plot", "timeline.png")
            out["savings_json"] = session.run("savings", old.job_id, "--json")
            out["savings_all"] = session.run("savings", "--all")

            # cancel: the agent answers the SSM checkpoint document while the CLI waits.
            current = stack.store.get("resnet50-demo")
            session.deps.sleep = lambda s: (stack.checkpoint(current, 1432, utc(), final=True), None)[1]
            out["cancel"] = session.run("cancel", "resnet50-demo")
            out["status_json"] = session.run("status", "resnet50-demo", "--json")
            out["not_deployed"] = session.run("status", "resnet50-demo", "--stack", "TrainctlProd")
            out["missing_job"] = session.run("status", "resnet5-demo")
            out["help"] = session.run("--help")
    finally:
        conftest.SpotInstances.describe_spot_price_history = original  # type: ignore[method-assign]
        conftest.SPOT_PRICES.clear()
        conftest.SPOT_PRICES.update(prices)
    # Outside moto: this machine has no Docker daemon, which is what a user without one sees.
    out["no_docker"] = Session(Deps()).run("build")
    return out


def render(out: dict[str, str]) -> str:
    """docs/CLI.md from its template: each `{{name}}` is a captured block (or the spec)."""
    text = TEMPLATE.read_text()
    for name, block in {"spec": SPEC, **out}.items():
        text = text.replace("{{" + name + "}}", block)
    missing = re.findall(r"\{\{([a-z_]+)\}\}", text)
    if missing:
        raise KeyError(f"template placeholders without output: {missing}")
    return text


if __name__ == "__main__":
    main()
