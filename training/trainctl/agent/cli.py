"""Entry points the typer CLI wires up: `trainctl agent` and `trainctl checkpoint-now`.

Configuration comes from flags or the environment (flags win); endpoints only from the
standard AWS variables (`AWS_ENDPOINT_URL`, `AWS_EC2_METADATA_SERVICE_ENDPOINT`).
"""

from __future__ import annotations

import argparse
import logging
import os
import shlex
import sys
import time
from collections.abc import Sequence
from datetime import UTC, datetime
from typing import TYPE_CHECKING

from trainctl import runtime_env as env

if TYPE_CHECKING:
    from trainctl.agent.imds import ImdsClient
    from trainctl_core.store import JobStore

logger = logging.getLogger("trainctl.agent")

EXIT_CHECKPOINT_FAILED = 2


def _agent_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="trainctl agent", description="Run a training command under the trainctl agent."
    )
    parser.add_argument("--job-id", default=os.environ.get(env.JOB_ID))
    parser.add_argument("--instance-id", default=os.environ.get(env.INSTANCE_ID), help="default: from IMDS")
    parser.add_argument(
        "--attempt",
        type=int,
        default=_int_env(env.ATTEMPT),
        help="default: the instance's trainctl:attempt tag (IMDS), else the job row's",
    )
    parser.add_argument("--table", default=os.environ.get(env.JOBS_TABLE))
    parser.add_argument("--bucket", default=os.environ.get(env.CHECKPOINT_BUCKET))
    parser.add_argument(
        "--region", default=os.environ.get(env.REGION) or os.environ.get("AWS_DEFAULT_REGION")
    )
    parser.add_argument("--socket", default=os.environ.get(env.AGENT_SOCKET, env.DEFAULT_AGENT_SOCKET))
    parser.add_argument("--staging-dir", default=os.environ.get(env.STAGING_DIR))
    parser.add_argument(
        "--log-group",
        default=os.environ.get(env.AGENT_LOG_GROUP),
        help="ship the agent's and the training output to this CloudWatch Logs group (default: off)",
    )
    parser.add_argument("--imds-poll-seconds", type=float, default=5.0)
    parser.add_argument("--heartbeat-seconds", type=float, default=30.0)
    parser.add_argument("--resume-wait-seconds", type=float, default=900.0)
    parser.add_argument("--resume-poll-seconds", type=float, default=2.0)
    parser.add_argument("--no-imds", action="store_true", help="do not poll IMDS (SSM signals only)")
    parser.add_argument(
        "--shutdown-command",
        default="shutdown -h now",
        help=(
            "run when this instance's attempt is over: succeeded, failed, superseded or never "
            "given a resume point; not after an interruption notice or SIGTERM "
            "('' to keep the machine up, e.g. locally)"
        ),
    )
    parser.add_argument(
        "command", nargs=argparse.REMAINDER, help="-- the training command (default: the job row's)"
    )
    return parser


def _int_env(name: str) -> int | None:
    value = os.environ.get(name)
    return int(value) if value else None


def _attempt_from_tag(value: str | None) -> int | None:
    if value is None:
        return None
    try:
        return int(value)
    except ValueError:
        logger.warning("ignoring the instance's attempt tag %r: not a number", value)
        return None


class CommandUnresolved(Exception):
    """No command after `--` and none to be had from the job row."""


def _command_from_row(store: JobStore, job_id: str, table: str) -> list[str]:
    """The job spec's command: what the instance bootstrap relies on (it passes none), so
    the row stays the one source of truth for what a job runs."""
    from botocore.exceptions import ClientError
    from pydantic import ValidationError

    from trainctl_core.store import JobNotFound

    try:
        job = store.get(job_id)
    except JobNotFound as exc:
        raise CommandUnresolved(
            f"job {job_id} not found in table {table}, so there is no command to run "
            "(give one after --, or check --job-id / --table)"
        ) from exc
    except ValidationError as exc:
        fields = ", ".join(f"{'.'.join(str(p) for p in e['loc'])}: {e['msg']}" for e in exc.errors())
        raise CommandUnresolved(
            f"job {job_id} in table {table} has no usable spec ({fields}), so no command to run"
        ) from exc
    except ClientError as exc:
        code = exc.response.get("Error", {}).get("Code", "error")
        raise CommandUnresolved(f"cannot read job {job_id} from table {table} ({code})") from exc
    return list(job.spec.command)


IMDS_IDENTITY_WAIT_SECONDS = 60.0
"""How long a booting agent keeps asking an unreachable IMDS who it is before giving up."""


def _identity_from_imds(
    imds: ImdsClient, instance_id: str | None, job_id: str | None, attempt: int | None
) -> tuple[str | None, str | None, int | None]:
    """Fill in what the flags left out from IMDS: instance id, and the job id and attempt
    from the instance's tags (metadata tags on). The attempt lets a stopped instance that
    comes back after its replacement took over stand down at once.

    An IMDS that does not answer at all is asked again, with backoff, for up to
    `IMDS_IDENTITY_WAIT_SECONDS`: on a busy instance at boot a request can time out, and
    giving up would leave the instance without an agent. A refusal (IMDS turned off) is
    final at once."""
    from trainctl.agent.imds import ImdsUnavailable, ImdsUnreachable
    from trainctl_core.settings import TAG_ATTEMPT, TAG_JOB_ID

    give_up = time.monotonic() + IMDS_IDENTITY_WAIT_SECONDS
    delay = 0.5
    while True:
        try:
            found_instance = instance_id or imds.instance_id()
            tagged_job = imds.tag(TAG_JOB_ID)
            found_job = job_id or tagged_job
            found_attempt = attempt
            if found_attempt is None and tagged_job is not None and tagged_job == found_job:
                found_attempt = _attempt_from_tag(imds.tag(TAG_ATTEMPT))
            return found_instance, found_job, found_attempt
        except ImdsUnreachable as exc:
            if time.monotonic() + delay > give_up:
                logger.warning("IMDS unavailable: %s", exc)
                return instance_id, job_id, attempt
            logger.warning("IMDS unreachable (%s): asking again in %.1f s", exc, delay)
            time.sleep(delay)
            delay = min(delay * 2, 8.0)
        except ImdsUnavailable as exc:
            logger.warning("IMDS unavailable: %s", exc)
            return instance_id, job_id, attempt


def agent_main(argv: Sequence[str] | None = None) -> int:
    """`trainctl agent [flags] [-- python train.py ...]`; returns the process exit code.

    Without a command after `--` the agent runs the job row's `spec.command`.
    """
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    args = _agent_parser().parse_args(list(argv) if argv is not None else None)
    command = [c for c in args.command if c != "--"] if args.command[:1] == ["--"] else list(args.command)

    from trainctl.agent.imds import ImdsClient
    from trainctl.agent.supervisor import Agent, AgentConfig
    from trainctl_core import clients
    from trainctl_core.store import JobStore
    from trainctl_core.workflow import Handshake

    imds = None if args.no_imds else ImdsClient()
    instance_id = args.instance_id
    job_id = args.job_id
    attempt = args.attempt
    if imds is not None and (not instance_id or not job_id or attempt is None):
        instance_id, job_id, attempt = _identity_from_imds(imds, instance_id, job_id, attempt)
    missing = [
        name
        for name, value in (("--job-id", job_id), ("--instance-id", instance_id), ("--table", args.table))
        if not value
    ]
    if missing:
        print(
            f"trainctl agent: missing {', '.join(missing)} (flags or TRAINCTL_* variables)", file=sys.stderr
        )
        return 64
    store = JobStore(clients.client("dynamodb", args.region), args.table)
    if not command:
        try:
            command = _command_from_row(store, job_id, args.table)
        except CommandUnresolved as exc:
            print(f"trainctl agent: {exc}", file=sys.stderr)
            return 64
        logger.info("command from the job row: %s", shlex.join(command))
    child_env = {}
    if args.bucket:
        child_env[env.CHECKPOINT_BUCKET] = args.bucket
        child_env[env.CHECKPOINT_PREFIX] = f"s3://{args.bucket}/{job_id}/ckpt/"
    if args.region:
        child_env[env.REGION] = args.region
    if args.staging_dir:
        child_env[env.STAGING_DIR] = args.staging_dir
    config = AgentConfig(
        job_id=job_id,
        instance_id=instance_id,
        attempt=attempt,
        command=command,
        socket_path=args.socket,
        child_env=child_env,
        imds_poll_seconds=args.imds_poll_seconds,
        heartbeat_seconds=args.heartbeat_seconds,
        resume_wait_seconds=args.resume_wait_seconds,
        resume_poll_seconds=args.resume_poll_seconds,
        shutdown_command=shlex.split(args.shutdown_command) or None,
    )
    shipper = None
    if args.log_group:
        from trainctl.agent.logship import LogShipper, make_client

        shipper = LogShipper(make_client(args.region), args.log_group, job_id=job_id, instance_id=instance_id)
        if attempt is not None:
            shipper.bind_attempt(attempt)
        shipper.attach("trainctl")
        shipper.start()
    prices = None
    if imds is not None:
        from trainctl.agent.pricing import InstancePrices

        ec2 = clients.client("ec2", args.region)
        prices = InstancePrices(ec2, imds, region=args.region or ec2.meta.region_name)
    try:
        agent = Agent(
            config,
            store,
            handshake=Handshake(clients.client("stepfunctions", args.region)),
            imds=imds,
            logs=shipper,
            prices=prices,
        )
        agent.install_signal_handlers()  # SIGTERM: checkpoint, stop the child, exit
        return agent.run()
    finally:
        if shipper is not None:
            shipper.close()  # the last records (the outcome) and a bounded wait


def checkpoint_now_main(argv: Sequence[str] | None = None) -> int:
    """`trainctl checkpoint-now --job-id X --deadline ISO [--mode stop|continue]`: 0 once
    durable, 2 otherwise (not durable by the deadline, no agent, no Checkpointer)."""
    from trainctl_core.settings import CHECKPOINT_MODE_STOP, CHECKPOINT_MODES

    parser = argparse.ArgumentParser(
        prog="trainctl checkpoint-now", description="Ask the agent for a checkpoint now."
    )
    parser.add_argument("--job-id", default=os.environ.get(env.JOB_ID))
    parser.add_argument(
        "--deadline",
        help="ISO 8601; the checkpoint must be durable by then (the wait ends a few seconds before it)",
    )
    parser.add_argument(
        "--mode",
        choices=CHECKPOINT_MODES,
        default=CHECKPOINT_MODE_STOP,
        help="stop: training stops after the checkpoint (interruption notice); "
        "continue: it goes on (rebalance recommendation)",
    )
    parser.add_argument("--socket", default=os.environ.get(env.AGENT_SOCKET, env.DEFAULT_AGENT_SOCKET))
    parser.add_argument(
        "--timeout", type=float, default=None, help="seconds (default: until the deadline, else 115)"
    )
    args = parser.parse_args(list(argv) if argv is not None else None)

    from trainctl.agent.ipc import CheckpointRequestFailed, request_checkpoint

    timeout = args.timeout or _seconds_until(args.deadline) or 115.0
    try:
        answer = request_checkpoint(
            args.socket, job_id=args.job_id, deadline=args.deadline, timeout=timeout, mode=args.mode
        )
    except CheckpointRequestFailed as exc:
        when = f" by the deadline {args.deadline}" if args.deadline else ""
        print(f"trainctl checkpoint-now: checkpoint not durable{when}: {exc}", file=sys.stderr)
        return EXIT_CHECKPOINT_FAILED
    after = "training stops" if args.mode == CHECKPOINT_MODE_STOP else "training continues"
    print(f"checkpoint durable: step {answer.get('step')} at {answer.get('prefix')} ({after})")
    return 0


def _seconds_until(deadline: str | None) -> float | None:
    if not deadline:
        return None
    try:
        moment = datetime.fromisoformat(deadline.replace("Z", "+00:00"))
    except ValueError:
        return None
    if moment.tzinfo is None:
        moment = moment.replace(tzinfo=UTC)
    # Leave a little margin so the SSM command reports before the instance is reclaimed.
    return max(1.0, (moment - datetime.now(UTC)).total_seconds() - 2.0)


def main_agent() -> None:
    raise SystemExit(agent_main())


def main_checkpoint_now() -> None:
    raise SystemExit(checkpoint_now_main())
