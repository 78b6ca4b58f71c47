"""One rehearsal: reference run, then the same script under interruptions in emulated AWS.

1. The reference: the script run uninterrupted, locally (no agent), in parallel with
   provisioning; it gives the reference artifact hash, the checkpoints per step and the
   total number of steps (interruption points are fractions of it).
2. moto provisioned from the synthesized stack; handlers wired to the rule queues.
3. The job is submitted like `trainctl submit` does (a PENDING row, then the launch
   execution of the resume workflow), and the loop runs: the fleet boots what RunInstances
   created, the SSM agent delivers commands, and interruptions are injected when the
   job's heartbeats reach the planned steps: the real warning event through EventBridge
   plus the IMDS instance-action, SIGKILL at the (time-scaled) deadline; or no notice at
   all (kill + state-change events), optionally preceded by a rebalance recommendation.
4. Measurements come from what the system itself reports: the job row (heartbeat step,
   checkpoints, resume point, attempts), the fleet (launch, boot, kill), the SSM agent
   (delivery, durable), and the verdict compares artifacts and checkpoints.
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import json
import logging
import math
import os
import shutil
import subprocess
import sys
import tempfile
import threading
import time
import uuid
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from decimal import Decimal
from pathlib import Path
from typing import Any

from trainctl import runtime_env as env
from trainctl.rehearse import bridge, verdict
from trainctl.rehearse.cloud import CREDENTIALS, REGION, MotoCloud, PoolSpec, Provisioned, provision
from trainctl.rehearse.instances import Ec2Event, Fleet, FleetConfig, Instance, Spawner, SsmAgent
from trainctl.rehearse.interrupts import StopRequest
from trainctl.rehearse.stack import StackSpec, load_stack
from trainctl.rehearse.tether import kill_tree, tethered
from trainctl_core import jobs
from trainctl_core.checkpoints import LocalCheckpointStorage, S3CheckpointStorage
from trainctl_core.settings import ENV_NOTICE_SECONDS, SPOT_NOTICE_SECONDS

logger = logging.getLogger("trainctl.rehearse")

REPO_ROOT = Path(__file__).resolve().parents[3]
EXAMPLES_DIR = REPO_ROOT / "training" / "examples"
DEFAULT_EXAMPLE = "tiny_train"
SPOT_WARNING = "EC2 Spot Instance Interruption Warning"
REBALANCE = "EC2 Instance Rebalance Recommendation"
REBALANCE_LEAD_SECONDS = 600  # the longest a rehearsed warning trails its recommendation
DEFAULT_TIME_SCALE = 0.05
# The default --timeout: never below the old fixed default, and twice the estimate of
# `default_timeout_seconds` (a loaded machine runs everything slower than the reference).
MIN_DEFAULT_TIMEOUT_SECONDS = 600.0
START_SECONDS = 30.0  # an attempt's process starts, RUNNING, first progress report (generous)


def launch_execution_name(job_id: str) -> str:
    return jobs.execution_name(job_id, 0, jobs.InterruptionReason.LAUNCH)


class RehearsalError(RuntimeError):
    """The rehearsal could not be set up (bad option, script that cannot run)."""


@dataclass
class Options:
    script: Path
    script_args: list[str] = field(default_factory=list)
    interruptions: int = 2
    at: list[float] | None = None
    no_notice: int = 0
    duplicate_events: bool = False
    capacity_errors: list[str] = field(default_factory=list)
    rebalance_first: bool = False
    boot_seconds: float = 1.0
    time_scale: float = DEFAULT_TIME_SCALE
    seed: int = 7
    jobs: int = 1
    simultaneous: bool = False  # interrupt every job at once (burst)
    environment: dict[str, str] = field(default_factory=dict)
    # Seconds the interrupted run may take once the reference is done (None: computed
    # from the scenario, `default_timeout_seconds`).
    timeout_seconds: float | None = None
    workdir: Path | None = None
    keep_workdir: bool = False
    spawn: Spawner | None = None  # lightweight instances (bench); default: real processes
    reference: dict[str, Any] | None = None  # precomputed reference (bench)

    def validate(self) -> None:
        if not self.script.is_file():
            raise RehearsalError(f"training script not found: {self.script}")
        if self.interruptions < 0:
            raise RehearsalError("--interruptions must be >= 0")
        if not 0 <= self.no_notice <= self.interruptions:
            raise RehearsalError(
                f"--no-notice {self.no_notice} must be between 0 and --interruptions ({self.interruptions})"
            )
        if self.at is not None:
            if len(self.at) != self.interruptions:
                raise RehearsalError(
                    f"--at gives {len(self.at)} fraction(s) for {self.interruptions} interruption(s)"
                )
            if any(not 0 < f < 1 for f in self.at) or sorted(self.at) != self.at:
                raise RehearsalError("--at fractions must be increasing and strictly between 0 and 1")
        if self.boot_seconds < 0:
            raise RehearsalError("--boot-seconds must be >= 0")
        if not 0 < self.time_scale <= 1:
            raise RehearsalError("--time-scale must be in (0, 1] (1 = real AWS timings)")
        if self.jobs < 1:
            raise RehearsalError("jobs must be >= 1")
        if self.timeout_seconds is not None and not self.timeout_seconds > 0:
            raise RehearsalError("--timeout must be > 0 seconds")

    @property
    def fractions(self) -> list[float]:
        if self.at is not None:
            return list(self.at)
        return [(k + 1) / (self.interruptions + 1) for k in range(self.interruptions)]

    @property
    def notice_seconds(self) -> int:
        return max(2, round(SPOT_NOTICE_SECONDS * self.time_scale))

    def timeout_for(self, reference_seconds: float) -> float:
        """The timeout this rehearsal runs with: the one given, or the computed default."""
        if self.timeout_seconds is not None:
            return self.timeout_seconds
        return default_timeout_seconds(self, reference_seconds)


def default_timeout_seconds(options: Options, reference_seconds: float, cpus: int | None = None) -> float:
    """How long the interrupted run may take before the rehearsal gives up (and fails).

    An estimate of the slowest legitimate run, doubled, never below 600 s:

    * training: the reference's duration once per attempt (a script that ignores its
      resume point redoes everything), times the jobs per core when several share them;
    * per interruption: the notice (a script that ignores `should_stop()` trains on until
      the reclaim), with `--rebalance-first` the longest a warning trails its
      recommendation, the launch backoff rounds when pools have no capacity, and the boot
      delay plus the replacement's process starts.

    All AWS durations are time-scaled as the rehearsal scales them.
    """
    from infra.workflows.render import DEFAULT_LAUNCH_BACKOFF_SECONDS, DEFAULT_LAUNCH_ROUNDS

    cores = max(1, cpus or os.cpu_count() or 1)
    attempts = options.interruptions + 1
    training = reference_seconds * attempts * max(1.0, options.jobs / cores)
    per_interruption = options.notice_seconds + options.boot_seconds + START_SECONDS
    if options.rebalance_first:
        per_interruption += REBALANCE_LEAD_SECONDS * options.time_scale
    if options.capacity_errors:
        # Rounds over every pool, the backoff doubling between them.
        backoff = sum(DEFAULT_LAUNCH_BACKOFF_SECONDS * 2**k for k in range(DEFAULT_LAUNCH_ROUNDS - 1))
        per_interruption += backoff * options.time_scale
    # The first launch (boot, process starts) as for any attempt.
    estimate = training + options.boot_seconds + START_SECONDS + options.interruptions * per_interruption
    return max(MIN_DEFAULT_TIMEOUT_SECONDS, math.ceil(2 * estimate))


def resolve_script(name: str | None) -> Path:
    """A path, or the name of a bundled example (`tiny_train`, `train`)."""
    if not name:
        name = DEFAULT_EXAMPLE
    path = Path(name)
    if path.is_file():
        return path.resolve()
    example = EXAMPLES_DIR / (name if name.endswith(".py") else f"{name}.py")
    if example.is_file():
        return example
    examples = ", ".join(sorted(p.stem for p in EXAMPLES_DIR.glob("*.py")))
    raise RehearsalError(f"no such script or example: {name!r} (bundled examples: {examples})")


# --- tracking -------------------------------------------------------------------------------


@dataclass
class AttemptTrack:
    attempt: int
    launched_at: datetime | None = None
    running_at: float | None = None
    resumed_at: float | None = None
    resume_kind: str | None = None
    resume_step: int | None = None
    max_step: int | None = None  # newest step known trained: heartbeats and checkpoints
    heartbeat_step: int | None = None  # newest step from a heartbeat of this attempt
    checkpoint_step: int | None = None  # newest checkpoint of this attempt on the row
    # This attempt's final checkpoint: begun (its `created_at`, the script's save call)
    # and recorded durable on the row (the write's `updated_at`, see `_observe`).
    final_started_at: float | None = None
    final_durable_at: float | None = None
    first_step: int | None = None  # the step of this attempt's first progress report

    @property
    def restarted_from(self) -> int | None:
        """Where training restarted: the resume point, or lower if the script ignored it."""
        if self.first_step is None:
            return self.resume_step
        actual = max(0, self.first_step - 1)
        return actual if self.resume_step is None else min(self.resume_step, actual)

    def saw_step(self, step: int | None) -> None:
        if step is not None and (self.max_step is None or step > self.max_step):
            self.max_step = step


@dataclass
class Plan:
    index: int
    threshold: int
    kind: str  # notice | rebalance+notice | no-notice
    outcome: verdict.InterruptionOutcome | None = None
    tick: int | None = None  # the loop iteration that injected it (a burst: all the same)
    # Rebalance first: the recommendation, then the warning once training went on past
    # the checkpoint the recommendation asked for (or, failing that, at `warn_at`).
    rebalanced_at: float | None = None
    rebalance_step: int | None = None  # the checkpoint step durable when its command ended
    warn_at: float | None = None


@dataclass
class JobTrack:
    job_id: str
    plans: list[Plan]
    attempts: dict[int, AttemptTrack] = field(default_factory=dict)
    status: str = "PENDING"
    attempt: int = 0
    instance_id: str | None = None
    failure_reason: str | None = None
    finished_at: float | None = None
    stalled: bool = False  # the job's agent is gone while the job still runs

    def track(self, attempt: int) -> AttemptTrack:
        return self.attempts.setdefault(attempt, AttemptTrack(attempt))

    @property
    def done_plans(self) -> list[Plan]:
        return [p for p in self.plans if p.outcome is not None]

    @property
    def next_plan(self) -> Plan | None:
        return next((p for p in self.plans if p.outcome is None), None)


def _plain(value: Any) -> Any:
    """DynamoDB numbers (Decimal) as int/float, like JobStore.raw returns them."""
    if isinstance(value, Decimal):
        return int(value) if value == value.to_integral_value() else float(value)
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_plain(v) for v in value]
    return value


def _parse_time(value: Any) -> datetime | None:
    if not value:
        return None
    try:
        return datetime.fromisoformat(str(value).replace("Z", "+00:00"))
    except ValueError:
        return None


# --- the reference run ----------------------------------------------------------------------


def training_command(options: Options) -> list[str]:
    return [sys.executable, str(options.script), *options.script_args]


def base_environment(options: Options) -> dict[str, str]:
    """The training settings both runs share; nothing that points at AWS."""
    environment = {
        k: v
        for k, v in os.environ.items()
        if not k.startswith(("TRAINCTL_", "AWS_")) and k not in ("MOTO_PORT",)
    }
    repo = str(REPO_ROOT)
    environment["PYTHONPATH"] = os.pathsep.join(p for p in (repo, environment.get("PYTHONPATH", "")) if p)
    # --seed wins over a TRAIN_SEED exported in the shell; only options.environment
    # (the caller's explicit settings for this rehearsal) overrides it.
    environment["TRAIN_SEED"] = str(options.seed)
    environment.update(options.environment)
    return environment


def run_reference(
    options: Options,
    job_id: str,
    directory: Path,
    started: Callable[[subprocess.Popen[bytes]], None] | None = None,
) -> dict[str, Any]:
    """Run the script once, uninterrupted and without the agent; `started` is handed the
    process (so that the rehearsal can stop it if it is itself stopped)."""
    directory.mkdir(parents=True, exist_ok=True)
    environment = {
        **base_environment(options),
        env.JOB_ID: job_id,
        env.CHECKPOINT_DIR: str(directory / "checkpoints"),
        env.STAGING_DIR: str(directory / "staging"),
        env.CHECKPOINT_KEEP: "100",
        "TRAIN_OUTPUT": str(directory / "final_model.bin"),
    }
    began = time.time()
    command, fds = tethered(training_command(options))
    with open(directory / "reference.log", "wb") as log:
        process = subprocess.Popen(
            command,
            env=environment,
            cwd=directory,
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,  # stopped by the rehearsal, not by the terminal's Ctrl-C
            pass_fds=fds,
        )
        if started is not None:
            started(process)
        returncode = process.wait()
    seconds = time.time() - began
    tail = (directory / "reference.log").read_text(errors="replace").splitlines()[-15:]
    if returncode != 0:
        raise RehearsalError(
            f"the uninterrupted reference run failed (exit {returncode}):\n" + "\n".join(tail)
        )
    storage = LocalCheckpointStorage(str(directory / "checkpoints"), job_id)
    digests = verdict.checkpoint_digests(storage, job_id)
    if not digests:
        raise RehearsalError(
            "the reference run wrote no checkpoint: the script does not use trainctl's Checkpointer "
            "(nothing to resume from)"
        )
    return {
        "sha256": verdict.sha256_file(str(directory / "final_model.bin")),
        "digests": digests,
        "steps": max(digests),
        "seconds": seconds,
    }


# --- the rehearsal ----------------------------------------------------------------------------


class Rehearsal:
    def __init__(
        self,
        options: Options,
        *,
        progress: Callable[[str], None] | None = None,
        stop: StopRequest | None = None,
    ) -> None:
        options.validate()
        self.options = options
        self.progress = progress or (lambda _line: None)
        # A stop request (a signal, see `interrupts.py`) is honoured between steps.
        self.stop = stop or StopRequest()
        self.cloud = MotoCloud()
        self.timeline: list[dict[str, Any]] = []
        self.started = time.time()
        self.ticks = 0  # iterations of the loop so far
        self.timeout_seconds: float | None = None  # set once the reference is done
        self.timed_out: str | None = None  # why the run was given up on (a timeout)
        self._reference_process: subprocess.Popen[bytes] | None = None
        self._reference_lock = threading.Lock()
        self._stopping = False  # set on the way out: a reference starting now is killed

    def mark(self, what: str, **details: Any) -> None:
        self.timeline.append({"t": round(time.time() - self.started, 3), "event": what, **details})

    def run(self) -> dict[str, Any]:
        options = self.options
        owns_workdir = options.workdir is None
        workdir = options.workdir or Path(tempfile.mkdtemp(prefix="trainctl-rehearse-"))
        workdir.mkdir(parents=True, exist_ok=True)
        # AF_UNIX paths are limited to ~107 bytes: sockets get a short directory of their
        # own, in the temporary directory if its path is short, else in /tmp.
        temp = tempfile.gettempdir()
        socket_root = Path(tempfile.mkdtemp(prefix="trh-", dir=temp if len(temp) <= 40 else "/tmp"))
        base = f"rehearse-{uuid.uuid4().hex[:6]}"
        job_ids = [base] if options.jobs == 1 else [f"{base}-{n:03d}" for n in range(options.jobs)]
        pool = concurrent.futures.ThreadPoolExecutor(max_workers=1, thread_name_prefix="rehearse-reference")
        try:
            with quiet_logs():
                reference_future = (
                    pool.submit(run_reference, options, base, workdir / "reference", self._reference_started)
                    if options.reference is None
                    else None
                )
                self.progress("synthesizing the stack and starting moto...")
                stack = load_stack()
                self.stop.check()
                self.cloud.start()
                provisioned = provision(self.cloud, stack, time_scale=options.time_scale)
                self.mark("provisioned")
                self.progress("provisioned from the synthesized stack; waiting for the reference run...")
                reference = (
                    self._await(reference_future) if reference_future else dict(options.reference or {})
                )
                self.mark("reference done", steps=reference["steps"])
                return self._rehearse(stack, provisioned, reference, job_ids, workdir, socket_root)
        finally:
            # Stopped early (an error, Ctrl-C, SIGTERM): the reference run must not be
            # waited for, nor outlive the rehearsal.
            with self._reference_lock:
                self._stopping = True
                process = self._reference_process
            if process is not None and process.poll() is None:
                kill_tree(process.pid)
            pool.shutdown(wait=True, cancel_futures=True)
            self.cloud.stop()
            shutil.rmtree(socket_root, ignore_errors=True)
            if owns_workdir and not options.keep_workdir:
                shutil.rmtree(workdir, ignore_errors=True)

    def _await(self, future: concurrent.futures.Future[dict[str, Any]]) -> dict[str, Any]:
        """The reference run's result; a stop request is honoured while it runs."""
        while True:
            self.stop.check()
            try:
                return future.result(timeout=0.25)
            except concurrent.futures.TimeoutError:
                continue

    def _reference_started(self, process: subprocess.Popen[bytes]) -> None:
        with self._reference_lock:
            self._reference_process = process
            stopping = self._stopping
        if stopping:  # the rehearsal is already on its way out
            kill_tree(process.pid)

    def _rehearse(
        self,
        stack: StackSpec,
        provisioned: Provisioned,
        reference: dict[str, Any],
        job_ids: list[str],
        workdir: Path,
        socket_root: Path,
    ) -> dict[str, Any]:
        options = self.options
        endpoint = provisioned.endpoint
        aws_env = {
            "AWS_ENDPOINT_URL": endpoint,
            "AWS_DEFAULT_REGION": REGION,
            "AWS_REGION": REGION,
            **CREDENTIALS,
            "MOTO_PORT": str(self.cloud.port),
        }
        handler_env: dict[str, str | None] = {
            **aws_env,
            "AWS_PROFILE": None,
            "AWS_EC2_METADATA_SERVICE_ENDPOINT": None,
            "POWERTOOLS_TRACE_DISABLED": "true",
            "POWERTOOLS_METRICS_DISABLED": "true",  # no CloudWatch: and EMF would go to stdout
            ENV_NOTICE_SECONDS: str(options.notice_seconds),
        }
        for environment in provisioned.functions.values():
            handler_env.update(environment)
        ec2, events, ssm, sqs, sfn, s3, ddb = (
            self.cloud.client(s) for s in ("ec2", "events", "ssm", "sqs", "stepfunctions", "s3", "dynamodb")
        )
        # The job's pools: every instance type the synthesized stack allows, in each of
        # its subnets (what `trainctl submit` builds from the stack's outputs).
        pools = [
            PoolSpec(instance_type, subnet, zone)
            for instance_type in stack.allowed_instance_types
            for subnet, zone in provisioned.subnets.items()
        ]
        self._apply_capacity_errors(pools)
        fleet = Fleet(
            ec2,
            events,
            FleetConfig(
                boot_seconds=options.boot_seconds,
                work_root=workdir / "instances",
                socket_root=socket_root,
                jobs_table=provisioned.jobs_table,
                bucket=provisioned.bucket,
                region=REGION,
                training_command=training_command(options),
                environment={**base_environment(options), **aws_env},
                # moto serves every request from one Python process: a burst's agents at
                # the single-job rates (a heartbeat every 0.25 s, the resume point polled
                # every 0.1 s) would ask hundreds of requests a second and starve the rest.
                **({"heartbeat_seconds": 1.0, "resume_poll_seconds": 0.5} if len(job_ids) > 4 else {}),
            ),
            spawn=options.spawn,
            duplicate_events=options.duplicate_events,
        )
        ssm_agent = SsmAgent(ssm, fleet)
        from trainctl_core.store import JobStore
        from trainctl_core.workflow import resume_input

        store = JobStore(ddb, provisioned.jobs_table)
        with bridge.patched_environ(handler_env), bridge.isolated_metrics():
            handlers = bridge.load_handlers(provisioned)
            dispatcher = bridge.Dispatcher(
                sqs, provisioned.handler_queues, handlers, redeliver=options.duplicate_events
            ).start()
            try:
                ssm_agent.start()
                self.timeout_seconds = options.timeout_for(float(reference.get("seconds", 0.0)))
                tracks = [self._plan(job_id, reference["steps"]) for job_id in job_ids]
                for track in tracks:
                    self._submit(store, sfn, provisioned.state_machine_arn, resume_input, track.job_id, pools)
                self.mark("submitted", jobs=len(tracks))
                self._loop(tracks, fleet, store, ddb, sfn, provisioned, dispatcher)
            finally:
                fleet.shutdown()
                dispatcher.stop()
                ssm_agent.join(timeout=5)
                from trainctl_core import clients, settings

                clients.reset()
                settings.get_settings.cache_clear()
        return self._report(tracks, fleet, ssm_agent, dispatcher, reference, provisioned, s3, pools)

    # --- setup --------------------------------------------------------------------------

    def _apply_capacity_errors(self, pools: list[PoolSpec]) -> None:
        for spec in self.options.capacity_errors:
            matched = [
                p
                for p in pools
                if spec in (p.label, p.instance_type, p.zone, p.zone[-1:])
                or spec == f"{p.instance_type}@{p.zone[-1:]}"
            ]
            if not matched:
                known = ", ".join(p.label for p in pools)
                raise RehearsalError(f"--capacity-errors: {spec!r} matches no pool (pools: {known})")
            for pool in matched:
                self.cloud.faults.out_of_capacity.add((pool.instance_type, pool.subnet_id))

    def _plan(self, job_id: str, total_steps: int) -> JobTrack:
        options = self.options
        kinds = ["notice"] * (options.interruptions - options.no_notice) + ["no-notice"] * options.no_notice
        if options.rebalance_first:
            kinds = ["rebalance+notice" if k == "notice" else k for k in kinds]
        plans = [
            Plan(index=k, threshold=max(1, math.ceil(f * total_steps)), kind=kinds[k])
            for k, f in enumerate(options.fractions)
        ]
        return JobTrack(job_id=job_id, plans=plans)

    def _submit(
        self,
        store: Any,
        starter_client: Any,
        state_machine_arn: str,
        resume_input: Any,
        job_id: str,
        pools: list[PoolSpec],
    ) -> None:
        spec = jobs.JobSpec(
            name=job_id,
            command=training_command(self.options),
            pools=[jobs.CapacityPool(instance_type=p.instance_type, subnet_id=p.subnet_id) for p in pools],
            # Keep every checkpoint: the verdict compares them step by step with the reference.
            checkpoint_retention=100,
            limits=jobs.JobLimits(max_interruptions=max(10, self.options.interruptions + 1)),
        )
        store.create(jobs.new_job(job_id, spec))
        document = resume_input(
            job_id=job_id,
            instance_id=None,
            attempt=0,
            reason=jobs.InterruptionReason.LAUNCH,
            deadline=None,
            noticed_at=jobs.utcnow(),
        )
        # As `trainctl submit` does: the starter names the launch <job>-launch.
        from trainctl_core.workflow import ResumeStarter

        ResumeStarter(starter_client, state_machine_arn).start(document)

    # --- the loop ------------------------------------------------------------------------------

    def _loop(
        self,
        tracks: list[JobTrack],
        fleet: Fleet,
        store: Any,
        ddb: Any,
        sfn: Any,
        provisioned: Provisioned,
        dispatcher: bridge.Dispatcher,
    ) -> None:
        assert self.timeout_seconds is not None
        deadline = time.time() + self.timeout_seconds
        settle_until: float | None = None
        last_line = ""
        while True:
            now = time.time()
            if now > deadline:
                # Given up on: a fail (something did not make progress), reported with
                # what was observed so far and what an operator would look at first.
                self.mark("timeout")
                self.timed_out = (
                    f"the rehearsal did not finish within its timeout ({self.timeout_seconds:.0f} s; "
                    "--timeout): "
                    + "; ".join(f"{t.job_id} {t.status} attempt {t.attempt}" for t in tracks)
                    + self._diagnose(sfn, provisioned, dispatcher)
                )
                return
            self.stop.check()
            self.ticks += 1
            fleet.tick(now)
            read_at = time.time()
            rows = self._read_rows(store, ddb, provisioned.jobs_table, tracks)
            for track in tracks:
                self._observe(track, rows[track.job_id], fleet, read_at)
            self._inject(tracks, fleet, now)
            for track in tracks:
                self._check_stalled(track, fleet, now)
            line = self._progress_line(tracks)
            if line != last_line:
                self.progress(line)
                last_line = line
            finished = all(t.status in ("SUCCEEDED", "FAILED", "CANCELLED") or t.stalled for t in tracks)
            reclaims_pending = any(
                i.reclaim_at is not None and i.ended_at is None for i in fleet.instances.values()
            )
            if finished and not reclaims_pending:
                # Let the last state-change events reach the handlers and executions end:
                # a late duplicate replacement would show up here.
                settle_until = settle_until or now + 1.0
                if (
                    now >= settle_until
                    and dispatcher.idle()
                    and not self._executions_running(sfn, provisioned)
                ):
                    break
            # Each pass lists every instance and job row: with hundreds of jobs a pass costs
            # moto (one lock, one process) far more, so it comes less often. Reclaims and
            # SSM deliveries have threads of their own and do not wait for it.
            time.sleep(0.05 if len(tracks) <= 4 else 0.25 if len(tracks) <= 20 else 1.0)

    def _read_rows(
        self, store: Any, ddb: Any, table: str, tracks: list[JobTrack]
    ) -> dict[str, dict[str, Any]]:
        """Every job's row: one read each, or one scan when there are many (bursts)."""
        if len(tracks) <= 4:
            return {t.job_id: store.raw(t.job_id) for t in tracks}
        from boto3.dynamodb.types import TypeDeserializer

        deserializer = TypeDeserializer()
        rows: dict[str, dict[str, Any]] = {}
        for page in ddb.get_paginator("scan").paginate(TableName=table, ConsistentRead=True):
            for item in page.get("Items", []):
                row = {k: _plain(deserializer.deserialize(v)) for k, v in item.items()}
                rows[str(row.get("job_id") or str(row.get("pk", "")).removeprefix("JOB#"))] = row
        return rows

    def _diagnose(self, sfn: Any, provisioned: Provisioned, dispatcher: bridge.Dispatcher) -> str:
        """What an operator would look at first: executions and handler failures."""
        lines = []
        listed = sfn.list_executions(stateMachineArn=provisioned.state_machine_arn)["executions"]
        for execution in listed[:20]:
            described = sfn.describe_execution(executionArn=execution["executionArn"])
            lines.append(
                f"execution {execution['name']}: {described['status']}"
                + (f" ({described.get('error')}: {described.get('cause')})" if described.get("error") else "")
            )
        lines += [
            f"handler {i.function} failed on {i.detail_type}: {i.error}"
            for i in dispatcher.snapshot()
            if i.error
        ]
        return "".join("\n  " + line for line in lines)

    def _executions_running(self, sfn: Any, provisioned: Provisioned) -> bool:
        running = sfn.list_executions(stateMachineArn=provisioned.state_machine_arn, statusFilter="RUNNING")
        return bool(running.get("executions"))

    def _observe(self, track: JobTrack, row: dict[str, Any], fleet: Fleet, now: float) -> None:
        if track.stalled:
            return
        status, attempt = str(row.get("status")), int(row.get("attempt", 0))
        if status != track.status:
            self.mark("job " + status.lower(), job_id=track.job_id, attempt=attempt)
        track.status, track.attempt = status, attempt
        track.instance_id = row.get("instance_id")
        track.failure_reason = row.get("failure_reason")
        current = track.track(attempt)
        if current.launched_at is None:
            # When the row moved to this attempt (seen by us within a tick; the new agent
            # needs seconds to start). Every heartbeat written after it is this attempt's:
            # the previous attempt's agent is fenced off the row from then on.
            current.launched_at = datetime.fromtimestamp(now, UTC)
        point = row.get("resume_point") or {}
        if current.resume_kind is None and point:
            current.resume_kind = point.get("kind")
            current.resume_step = point.get("step")
        # Phases are timed by the row's own timestamps, not by when this loop read the row
        # (under load a pass takes seconds): `updated_at` of the write that made the
        # change, or of a later write if one came before this read (an upper bound, never
        # later than the read), `heartbeat_at` of a progress report.
        updated = _parse_time(row.get("updated_at"))
        written_at = min(now, updated.timestamp()) if updated is not None else now
        if status == "RUNNING" and current.running_at is None:
            current.running_at = written_at
        heartbeat_at = _parse_time(row.get("heartbeat_at"))
        step = row.get("heartbeat_step")
        # A heartbeat belongs to this attempt only if written after it was launched (the
        # row keeps the previous attempt's last heartbeat until the new agent reports).
        if (
            step is not None
            and heartbeat_at is not None
            and current.launched_at is not None
            and heartbeat_at > current.launched_at
            and status in ("RUNNING", "INTERRUPTED", "SUCCEEDED")
        ):
            current.saw_step(int(step))
            current.heartbeat_step = int(step)
            if current.resumed_at is None:
                # The first progress report of an attempt is sent after its first step, so
                # it says where training really restarted (a script that ignores the
                # resume point shows here) and when (its heartbeat's own time).
                current.resumed_at = min(now, heartbeat_at.timestamp())
                current.first_step = int(step)
                if attempt > 0:
                    self.mark("training resumed", job_id=track.job_id, attempt=attempt, step=int(step))
        for key in ("last_checkpoint", "final_checkpoint"):
            checkpoint = row.get(key) or {}
            if checkpoint and int(checkpoint.get("attempt", -1)) in track.attempts:
                owner = track.track(int(checkpoint["attempt"]))
                owner.saw_step(int(checkpoint["step"]))
                owner.checkpoint_step = max(owner.checkpoint_step or 0, int(checkpoint["step"]))
                if key == "final_checkpoint" and owner.final_durable_at is None:
                    # Recorded by `record_checkpoint`, which stamps `updated_at`; no
                    # earlier than the checkpoint began (its own `created_at`).
                    begun = _parse_time(checkpoint.get("created_at"))
                    owner.final_started_at = begun.timestamp() if begun is not None else None
                    owner.final_durable_at = max(written_at, owner.final_started_at or written_at)
        if status in ("SUCCEEDED", "FAILED", "CANCELLED") and track.finished_at is None:
            track.finished_at = now
            if status == "SUCCEEDED" and current.resumed_at is None:
                # Resumed at the very last step: the replacement had nothing left to train,
                # so it never reported progress; it is back (and done) when the job is.
                current.resumed_at = written_at
        # Fill in what followed each injected interruption.
        for plan in track.done_plans:
            outcome = plan.outcome
            assert outcome is not None
            lost_attempt = track.attempts.get(outcome.attempt)
            if lost_attempt is not None:
                outcome.last_step = lost_attempt.max_step
                outcome.checkpoint_started_at = lost_attempt.final_started_at
                outcome.checkpoint_durable_at = lost_attempt.final_durable_at
            old = fleet.instances.get(outcome.instance_id)
            if old is not None:
                outcome.killed_at = old.killed_at
                # The command the warning sent (a rebalance's came earlier).
                outcome.ssm_delivered_at = next(
                    (
                        c["delivered_at"]
                        for c in list(old.commands)
                        if c.get("delivered_at") and c["delivered_at"] >= outcome.noticed_at
                    ),
                    None,
                )
            following = track.attempts.get(outcome.attempt + 1)
            replacement = [i for i in fleet.of_job(track.job_id) if i.attempt == outcome.attempt + 1]
            if replacement:
                outcome.replacement_launched_at = replacement[0].discovered_at
                outcome.replacement_booted_at = replacement[0].started_at
                outcome.replacement_pool = replacement[0].pool
            if following is not None:
                outcome.resume_step = following.restarted_from
                outcome.checkpoint_kind = following.resume_kind
                outcome.running_at = following.running_at
                outcome.resumed_at = following.resumed_at

    def _check_stalled(self, track: JobTrack, fleet: Fleet, now: float) -> None:
        """A job still RUNNING whose agent exited (not killed) will never end: say so."""
        if track.stalled or track.status not in ("RUNNING", "LAUNCHING"):
            return
        instance = fleet.instances.get(track.instance_id or "")
        if instance is None or instance.exited_at is None or instance.reclaim_at is not None:
            return
        if now - instance.exited_at < 3.0:
            return  # its last writes may still be on their way
        track.stalled = True
        track.finished_at = now
        log = instance.directory / "agent.log"
        tail = [
            line
            for line in (log.read_text(errors="replace").splitlines() if log.exists() else [])
            if "botocore" not in line
        ][-4:]
        track.failure_reason = (
            f"the agent on {instance.instance_id} exited (code {instance.exit_code}) while the job was "
            f"{track.status} attempt {track.attempt}; nothing would ever finish it. Agent log: "
            + " | ".join(tail)
        )
        self.mark("job stalled", job_id=track.job_id, attempt=track.attempt)

    def _eligible(self, track: JobTrack, fleet: Fleet) -> tuple[Plan, Instance] | None:
        plan = track.next_plan
        if plan is None or track.status != "RUNNING" or track.attempt != plan.index:
            return None
        current = track.attempts.get(track.attempt)
        instance = fleet.instances.get(track.instance_id or "")
        if current is None or instance is None or not instance.alive:
            return None
        # Heartbeats only: a checkpoint step arriving makes the kill land on a checkpoint
        # boundary, which would hide the steps a loss without notice really costs.
        if current.heartbeat_step is None or current.heartbeat_step < plan.threshold:
            return None
        return plan, instance

    def _inject(self, tracks: list[JobTrack], fleet: Fleet, now: float) -> None:
        # The EC2 events of this tick go out together, after every notice is in IMDS.
        outbox: list[Ec2Event] = []
        # Rebalance first: the warning follows the recommendation once training went on
        # past the checkpoint it asked for (the recommendation says "at risk", not "stop").
        for track in tracks:
            for plan in track.plans:
                if plan.warn_at is None or plan.outcome is None:
                    continue
                instance = fleet.instances[plan.outcome.instance_id]
                if now >= plan.warn_at or self._trained_past_rebalance(track, plan, instance):
                    plan.warn_at = None
                    self._warn(track, plan, instance, fleet, time.time(), outbox)
        ready = [(t, e) for t in tracks if (e := self._eligible(t, fleet)) is not None]
        burst_pending = False
        if ready and self.options.simultaneous:
            pending = [
                t for t in tracks if t.next_plan is not None and t.status not in ("SUCCEEDED", "FAILED")
            ]
            burst_pending = len(ready) < len(pending)  # wait until every job reached its point
        if not burst_pending:
            for track, (plan, instance) in ready:
                self._interrupt(track, plan, instance, fleet, outbox)
        if outbox:
            fleet.put_events(outbox)

    def _interrupt(
        self, track: JobTrack, plan: Plan, instance: Instance, fleet: Fleet, outbox: list[Ec2Event]
    ) -> None:
        moment = time.time()
        plan.outcome = verdict.InterruptionOutcome(
            index=plan.index,
            job_id=track.job_id,
            attempt=track.attempt,
            instance_id=instance.instance_id,
            pool=instance.pool,
            kind=plan.kind,
            noticed_at=moment,
        )
        plan.tick = self.ticks
        self.mark(
            f"interruption ({plan.kind})",
            job_id=track.job_id,
            attempt=track.attempt,
            instance=instance.instance_id,
        )
        if plan.kind == "no-notice":
            # The machine disappears: no warning, no IMDS notice; EC2 reports the state change.
            fleet.schedule_reclaim(instance, moment)
            fleet.tick(moment)
            return
        if plan.kind == "rebalance+notice":
            assert instance.imds is not None
            instance.imds.recommend_rebalance(datetime.fromtimestamp(moment, UTC))
            outbox.append(Ec2Event(REBALANCE, instance, {}, moment))
            plan.rebalanced_at = moment
            # If training never gets past the rebalance checkpoint (it stopped, or the
            # checkpoint failed), the warning still comes: ten minutes later, time-scaled
            # (a recommendation tends to come minutes ahead of an interruption, if at all).
            plan.warn_at = moment + REBALANCE_LEAD_SECONDS * self.options.time_scale
            return
        self._warn(track, plan, instance, fleet, moment, outbox)

    def _trained_past_rebalance(self, track: JobTrack, plan: Plan, instance: Instance) -> bool:
        """The rebalance's checkpoint command succeeded and a later step was trained."""
        assert plan.outcome is not None and plan.rebalanced_at is not None
        attempt = track.attempts.get(plan.outcome.attempt)
        if attempt is None:
            return False
        if plan.rebalance_step is None:
            done = next(
                (
                    c
                    for c in list(instance.commands)
                    if (c.get("delivered_at") or 0) >= plan.rebalanced_at and c.get("finished_at")
                ),
                None,
            )
            if done is None or done.get("exit_code") != 0 or attempt.checkpoint_step is None:
                return False
            # The agent records a checkpoint on the row before it reports it durable.
            plan.rebalance_step = attempt.checkpoint_step
        return attempt.heartbeat_step is not None and attempt.heartbeat_step > plan.rebalance_step

    def _warn(
        self,
        track: JobTrack,
        plan: Plan,
        instance: Instance,
        fleet: Fleet,
        moment: float,
        outbox: list[Ec2Event],
    ) -> None:
        notice = self.options.notice_seconds
        # The event's time is to the second (as EC2's); the handler's deadline is that time
        # plus the notice, and so are IMDS's and the reclaim's.
        noticed = math.floor(moment)
        deadline = datetime.fromtimestamp(noticed + notice, UTC)
        if instance.imds is not None:
            instance.imds.notice(deadline)
        outbox.append(Ec2Event(SPOT_WARNING, instance, {"instance-action": "terminate"}, noticed))
        fleet.schedule_reclaim(instance, noticed + notice)
        if plan.kind != "notice":
            self.mark(
                "spot warning", job_id=track.job_id, attempt=track.attempt, instance=instance.instance_id
            )
        if plan.outcome is not None:
            # Recovery is measured from the warning (a rebalance recommendation before it
            # is a risk signal, not the loss).
            plan.outcome.noticed_at = moment

    def _progress_line(self, tracks: list[JobTrack]) -> str:
        if len(tracks) > 1:
            statuses: dict[str, int] = {}
            for t in tracks:
                statuses[t.status] = statuses.get(t.status, 0) + 1
            injected = sum(len(t.done_plans) for t in tracks)
            planned = sum(len(t.plans) for t in tracks)
            return (
                f"{len(tracks)} jobs: "
                + ", ".join(f"{v} {k}" for k, v in sorted(statuses.items()))
                + (f" | interruptions {injected}/{planned}")
            )
        track = tracks[0]
        current = track.attempts.get(track.attempt)
        step = current.max_step if current and current.max_step is not None else "-"
        return (
            f"{track.job_id}: {track.status} attempt {track.attempt} step {step}"
            f" | interruptions {len(track.done_plans)}/{len(track.plans)}"
        )

    # --- the report ------------------------------------------------------------------------------

    def _report(
        self,
        tracks: list[JobTrack],
        fleet: Fleet,
        ssm_agent: SsmAgent,
        dispatcher: bridge.Dispatcher,
        reference: dict[str, Any],
        provisioned: Provisioned,
        s3: Any,
        pools: list[PoolSpec],
    ) -> dict[str, Any]:
        zone_of = {p.subnet_id: p.zone for p in pools}
        per_job = []
        all_outcomes: list[verdict.InterruptionOutcome] = []
        injected: list[Plan] = []
        duplicates_total = 0
        failures: list[str] = []
        divergences: list[str] = []
        finals = []
        for track in tracks:
            instances = fleet.of_job(track.job_id)
            per_attempt: dict[int, int] = {}
            for instance in instances:
                per_attempt[instance.attempt] = per_attempt.get(instance.attempt, 0) + 1
            duplicates = sum(n - 1 for n in per_attempt.values() if n > 1)
            duplicates_total += duplicates
            outcomes = [p.outcome for p in track.plans if p.outcome is not None]
            all_outcomes.extend(outcomes)
            injected.extend(p for p in track.plans if p.outcome is not None)
            final_instance = fleet.instances.get(track.instance_id or "")
            final_sha = (
                verdict.sha256_file(str(final_instance.directory / "final_model.bin"))
                if final_instance is not None and track.status == "SUCCEEDED"
                else None
            )
            finals.append(final_sha)
            storage = S3CheckpointStorage(s3, provisioned.bucket, track.job_id)
            try:
                run_digests = verdict.checkpoint_digests(storage, track.job_id)
            finally:
                storage.close()  # type: ignore[attr-defined]
            judged = verdict.judge(
                reference_sha256=reference.get("sha256"),
                final_sha256=final_sha,
                job_status=track.status,
                outcomes=outcomes,
                planned=len(track.plans),
                duplicate_replacements=duplicates,
                reference_digests=reference.get("digests"),
                run_digests=run_digests,
                failure_reason=track.failure_reason,
                replaced_attempts=sum(1 for attempt in per_attempt if attempt > 0),
            )
            prefix = f"{track.job_id}: " if len(tracks) > 1 else ""
            failures.extend(prefix + r for r in judged.reasons)
            if judged.divergence:
                divergences.append(prefix + judged.divergence)
            per_job.append(
                {
                    "job_id": track.job_id,
                    "status": track.status,
                    "failure_reason": track.failure_reason,
                    "final_sha256": final_sha,
                    "replacements": sum(1 for i in instances if i.attempt > 0),
                    "duplicate_replacements": duplicates,
                    "instances": [
                        {
                            "instance_id": i.instance_id,
                            "attempt": i.attempt,
                            "pool": i.pool,
                            "exit_code": i.exit_code,
                            "killed": i.killed_at is not None,
                        }
                        for i in instances
                    ],
                }
            )
        if dispatcher.parked:
            failures.append(f"{len(dispatcher.parked)} event(s) failed in the handlers after every retry")
        with ssm_agent.lock:
            deliveries = list(ssm_agent.deliveries)
        commands = [
            {
                "command_id": d["command_id"],
                "job_id": d["job_id"],
                "instance_id": d["instance_id"],
                "sent_at": self._since_start(d["sent_at"]),
                "delivered_at": self._since_start(d["delivered_at"]),
                "exit_code": d["exit_code"],
            }
            for d in deliveries
        ]
        failures.extend(
            verdict.command_problems(((o.job_id, o.instance_id, o.kind) for o in all_outcomes), commands)
        )
        if self.timed_out:
            failures.insert(0, self.timed_out)
        passed = not failures
        final_sha = finals[0] if len(finals) == 1 else (finals[0] if len(set(finals)) == 1 else None)
        with self.cloud.faults.lock:
            calls = list(self.cloud.faults.calls)
        pools_tried = [
            {
                "pool": f"{c.instance_type}@{zone_of.get(c.subnet_id, c.subnet_id)}",
                "market": c.market,
                "result": c.error or "launched",
            }
            for c in calls
        ]
        invocations = dispatcher.snapshot()
        result: dict[str, Any] = {
            "verdict": "pass" if passed else "fail",
            "reasons": failures,
            "divergence": "; ".join(divergences) or None,
            "script": str(self.options.script),
            "jobs": len(tracks),
            "interruptions": len(all_outcomes),
            "reference_sha256": reference.get("sha256"),
            "final_sha256": final_sha,
            "identical": reference.get("sha256") is not None
            and all(f == reference.get("sha256") for f in finals),
            "total_steps": reference.get("steps"),
            "lost_steps": [o.lost_steps for o in all_outcomes],
            "recovery_seconds": [o.recovery_seconds for o in all_outcomes],
            "replacements": sum(j["replacements"] for j in per_job),
            "duplicate_replacements": duplicates_total,
            "pools_tried": pools_tried,
            "checkpoint_kinds": [o.checkpoint_kind for o in all_outcomes],
            "interruption_details": [self._detail(plan, deliveries) for plan in injected],
            "events_emitted": len(fleet.emitted) * (2 if self.options.duplicate_events else 1),
            "handler_invocations": len(invocations),
            "handler_errors": sum(1 for i in invocations if i.error),
            # Each failed invocation (it was retried, or parked after the last retry).
            "handler_failures": [
                {
                    "function": i.function,
                    "detail_type": i.detail_type,
                    "event_id": i.event_id,
                    "instance_id": i.instance_id,
                    "at": self._since_start(i.at),
                    "error": i.error,
                }
                for i in invocations
                if i.error
            ],
            "ssm_deliveries": sum(1 for d in deliveries if d.get("delivered_at")),
            "ssm_commands": commands,
            "notice_seconds": self.options.notice_seconds,
            "boot_seconds": self.options.boot_seconds,
            "time_scale": self.options.time_scale,
            "timeout_seconds": self.timeout_seconds,
            "timed_out": self.timed_out is not None,
            "reference_seconds": round(float(reference.get("seconds", 0.0)), 3),
            "wall_seconds": round(time.time() - self.started, 3),
            "per_job": per_job,
            "timeline": self.timeline,
        }
        return result

    def _since_start(self, moment: float | None) -> float | None:
        """Seconds since the rehearsal started, like the timeline's `t`."""
        return None if moment is None else round(moment - self.started, 3)

    def _detail(self, plan: Plan, deliveries: list[dict[str, Any]]) -> dict[str, Any]:
        """One interruption's outcome, with when it was injected (seconds since the start,
        like the timeline's `t`): `noticed_at` the Spot warning (the loss itself without
        notice), `rebalance_at` the recommendation before it and `rebalance_checkpoint_step`
        the checkpoint that recommendation made durable (None: none), `tick` the loop
        iteration that injected it. `breakdown_seconds.ssm_sent`: when the handler sent the
        warning's checkpoint command (SSM's RequestedDateTime; delivered or not)."""
        outcome = plan.outcome
        assert outcome is not None
        since = self._since_start
        sent = min(
            (
                d["sent_at"]
                for d in deliveries
                if d["instance_id"] == outcome.instance_id and d["sent_at"] >= outcome.noticed_at
            ),
            default=None,
        )
        detail = outcome.as_dict()
        detail["breakdown_seconds"] = {"ssm_sent": outcome.since_notice(sent), **detail["breakdown_seconds"]}
        return {
            **detail,
            "overhead_seconds": outcome.overhead_seconds(self.options.boot_seconds),
            "noticed_at": since(outcome.noticed_at),
            "rebalance_at": since(plan.rebalanced_at),
            "rebalance_checkpoint_step": plan.rebalance_step,
            "tick": plan.tick,
        }


def rehearse(
    options: Options,
    *,
    progress: Callable[[str], None] | None = None,
    stop: StopRequest | None = None,
) -> dict[str, Any]:
    """Run one rehearsal and return its report (see `trainctl rehearse --json`); raises
    `Interrupted` when `stop` is requested, after stopping everything it started."""
    return Rehearsal(options, progress=progress, stop=stop).run()


def to_json(result: dict[str, Any]) -> str:
    return json.dumps(result, indent=1, default=str)


@contextlib.contextmanager
def quiet_logs() -> Any:
    """moto's request log and botocore chatter do not belong in the rehearsal's output."""
    names = ("werkzeug", "botocore", "moto", "s3transfer", "urllib3", "trainctl.rehearse")
    saved = {n: logging.getLogger(n).level for n in names}
    for name in names:
        logging.getLogger(name).setLevel(logging.CRITICAL)
    try:
        with warnings.catch_warnings():
            # An invocation that failed before it added a metric flushes an empty set:
            # nothing to publish, and no CloudWatch here anyway.
            warnings.filterwarnings(
                "ignore", message="No application metrics to publish", category=UserWarning
            )
            yield
    finally:
        for name, level in saved.items():
            logging.getLogger(name).setLevel(level)
