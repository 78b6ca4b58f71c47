"""Recovery time breakdown and a burst of simultaneous interruptions (the offline rehearsal).

    python -m bench.recovery            # 3 noticed interruptions + a burst of 200 jobs
    python -m bench.recovery --quick    # 2 interruptions + a burst of 40
    python -m bench.recovery --json
    python -m bench.recovery --save-reports DIR   # also both rehearsals' full reports

1. Breakdown: one `trainctl rehearse` of the tiny numpy example (real agent and training
   processes, real handlers, the real resume workflow in moto) with noticed interruptions.
   Per interruption, seconds after the warning: SSM command sent and delivered, final
   checkpoint begun and durable (on the job row), replacement's RunInstances done, booted
   (the configured boot delay after that), RUNNING, training resumed; each phase timed by
   its own record (SSM's request time, the row's write times, the heartbeat's time), not
   by when the rehearsal's loop saw it. trainctl's own overhead is the recovery time
   minus the boot delay and minus notice -> final checkpoint durable (goal: <= 2 s;
   `overhead_seconds` of each interruption in the report). Baseline in
   the same run: the cold start of one Python process importing what the agent and the
   training import; process starts are most of the overhead here, so the overhead is also
   given as a multiple of it.
2. Burst: N jobs, all interrupted by the same tick. Real agent processes for 200 jobs
   would be 400+ Python processes on 2 cores, so the "instances" are lightweight: a
   thread per instance that does what the agent does on the job row, through the same
   adapters (waits for its resume point, marks RUNNING, heartbeats a simulated step
   counter, records periodic and final checkpoints fenced on instance and attempt, and
   answers the workflow's handshake when the SSM command arrives; first attempts
   "train" slowly so every job is still training when the burst hits, replacements
   fast; like the agent, a checkpoint command for another job is refused). Everything
   else is the real flow: EventBridge rules, handlers, SSM, the resume workflow in moto,
   the instance emulator. Reported: recoveries, duplicate replacements (goal 0), jobs that
   did not finish (goal 0, with the reason the rehearsal found), throughput (recoveries
   per second from the first warning to the last training resumed), the recovery-time
   median / p95, and what late commands cost: how many jobs resumed from their final
   checkpoint and how many from a periodic one, and the steps lost.

Exit 1 when the breakdown's verdict is not `pass`, or the burst has a duplicate
replacement, an interruption not recovered, a job that did not finish, a handler error,
or a checkpoint command that addressed any instance but the one its job was warned about,
or reached that one more than once (each command record is checked, not their count: a
count cannot tell a command that reached the wrong instance while the right one was
missed). How many commands arrive within the notice, and so how many jobs resume from
their `final` checkpoint rather than a periodic one (`fallback`, losing the steps since),
measures this harness's throughput and is reported, not a pass condition.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import statistics
import subprocess
import sys
import threading
import time
from collections import Counter
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from trainctl.rehearse import verdict
from trainctl.rehearse.instances import Instance
from trainctl.rehearse.scenario import Options, rehearse, resolve_script

BOOT_SECONDS = 1.0


# --- lightweight instances (burst) ------------------------------------------------------------


class LightAgent:
    """One emulated instance: the agent's job-row protocol without processes."""

    def __init__(
        self, instance: Instance, environment: Mapping[str, str], *, steps: int, rate: float
    ) -> None:
        from trainctl.rehearse.cloud import client
        from trainctl_core import jobs
        from trainctl_core.jobs import CheckpointRef
        from trainctl_core.store import JobStore
        from trainctl_core.workflow import Handshake

        endpoint = environment["AWS_ENDPOINT_URL"]
        self._jobs, self._ref = jobs, CheckpointRef
        # One set of clients for all (thread-safe; a boto3 client costs ~10 MB).
        shared = _clients(endpoint, client)
        self.store = JobStore(shared["dynamodb"], environment["TRAINCTL_JOBS_TABLE"])
        self.handshake = Handshake(shared["stepfunctions"])
        self.ec2 = shared["ec2"]
        self.instance = instance
        self.steps, self.rate = steps, rate
        self.code: int | None = None
        self.stop = threading.Event()
        self.notice = threading.Event()
        self.step = 0
        self.attempt = -1
        self._lock = threading.Lock()
        threading.Thread(target=self._run, daemon=True, name=f"light-{instance.instance_id}").start()

    def poll(self) -> int | None:
        return self.code

    def kill(self) -> None:
        self.stop.set()
        self.code = -9

    def run_command(self, argv: list[str], timeout: float) -> int:
        # The SSM document's `trainctl checkpoint-now --job-id J ...`: checkpoint now and
        # stop (or, with `--mode continue`, checkpoint and keep training).
        if "checkpoint-now" not in argv:
            return 127
        if _flag(argv, "--job-id") not in (None, self.instance.job_id):
            return 2  # like the agent: "this agent runs job ..." (the command fails)
        if _flag(argv, "--mode") == "continue":
            if self.attempt < 0 or self.code is not None:
                return 2
            self._checkpoint(self.step, final=False)
            return 0
        self.notice.set()
        deadline = time.time() + timeout
        while time.time() < deadline and not self.stop.is_set():
            if self.code is not None:
                return 0
            time.sleep(0.05)
        return 2

    def _checkpoint(self, step: int, *, final: bool) -> dict[str, Any]:
        ref = self._ref(
            step=step,
            prefix=f"{self.instance.job_id}/ckpt/{step:012d}/",
            attempt=self.attempt,
            created_at=self._jobs.utcnow(),
        )
        return self.store.record_checkpoint(
            self.instance.job_id,
            instance_id=self.instance.instance_id,
            attempt=self.attempt,
            checkpoint=ref,
            final=final,
        )

    def _run(self) -> None:
        jobs = self._jobs
        try:
            while not self.stop.is_set():
                job = self.store.get(self.instance.job_id)
                if job.instance_id == self.instance.instance_id and job.resume_point is not None:
                    break
                time.sleep(2.0)
            if self.stop.is_set():
                return
            self.attempt = job.attempt
            self.step = job.resume_point.step or 0 if job.resume_point else 0
            self.store.apply(jobs.mark_running(job, instance_id=self.instance.instance_id, now=jobs.utcnow()))
            # First attempts train slowly so that every job is still training when the
            # burst hits (launching hundreds takes a while); replacements finish fast.
            rate = self.rate if self.attempt == 0 else 50 * self.rate
            started, first = time.time(), self.step
            last_checkpoint = self.step
            while not self.stop.is_set():
                # Few requests per agent: hundreds of them share one moto process (which
                # serves some 50 requests a second here).
                self.notice.wait(1.0 if self.attempt > 0 else 5.0)
                if self.stop.is_set():
                    return  # killed while waiting: a machine that is gone writes nothing more
                self.step = min(self.steps, first + int((time.time() - started) * rate))
                if self.notice.is_set():
                    row = self._checkpoint(self.step, final=True)
                    token = row.get("task_token")
                    if token and row.get("task_token_attempt") == self.attempt:
                        from trainctl_core.workflow import HandshakeError

                        with contextlib.suppress(HandshakeError):  # the workflow timed out: fine
                            self.handshake.complete(
                                str(token),
                                {
                                    "checkpoint": {
                                        "step": self.step,
                                        "prefix": f"{self.instance.job_id}/ckpt/{self.step:012d}/",
                                        "attempt": self.attempt,
                                        "created_at": jobs.format_time(jobs.utcnow()),
                                    }
                                },
                            )
                    self.code = 0
                    return
                self.store.heartbeat(
                    self.instance.job_id,
                    instance_id=self.instance.instance_id,
                    attempt=self.attempt,
                    step=self.step,
                )
                if self.step - last_checkpoint >= 20:
                    self._checkpoint(self.step, final=False)
                    last_checkpoint = self.step
                if self.step >= self.steps:
                    job = self.store.get(self.instance.job_id)
                    self.store.apply(
                        jobs.mark_succeeded(job, instance_id=self.instance.instance_id, now=jobs.utcnow())
                    )
                    # The agent's shutdown command: the instance terminates on shutdown.
                    self.ec2.terminate_instances(InstanceIds=[self.instance.instance_id])
                    self.code = 0
                    return
        except Exception as exc:  # a superseded or failed light agent ends like a crashed one
            print(f"light agent {self.instance.instance_id}: {type(exc).__name__}: {exc}", file=sys.stderr)
            self.code = 1


def _flag(argv: list[str], name: str) -> str | None:
    """The value after `name` in an argument list (None: not given)."""
    try:
        return argv[argv.index(name) + 1]
    except (ValueError, IndexError):
        return None


_CLIENTS: dict[str, dict[str, Any]] = {}
_CLIENTS_LOCK = threading.Lock()


def _clients(endpoint: str, factory: Any) -> dict[str, Any]:
    with _CLIENTS_LOCK:
        if endpoint not in _CLIENTS:
            _CLIENTS[endpoint] = {s: factory(s, endpoint) for s in ("dynamodb", "stepfunctions", "ec2")}
        return _CLIENTS[endpoint]


# --- the two measurements ---------------------------------------------------------------------


def process_baseline() -> float:
    """Seconds for one cold Python process importing the agent's and the training's modules."""
    started = time.perf_counter()
    subprocess.run(
        [sys.executable, "-c", "import numpy, boto3, trainctl.agent.supervisor, trainctl.checkpoint"],
        check=True,
    )
    return time.perf_counter() - started


def _save(report: dict[str, Any], directory: Path | None, name: str) -> None:
    """Keep the rehearsal's whole report (every interruption, command, handler failure)."""
    if directory is not None:
        directory.mkdir(parents=True, exist_ok=True)
        (directory / f"{name}.json").write_text(json.dumps(report, indent=1, default=str))


def breakdown(interruptions: int, save: Path | None = None) -> dict[str, Any]:
    fractions = [round((k + 1) / (interruptions + 1), 3) for k in range(interruptions)]
    options = Options(
        script=resolve_script(None),
        interruptions=interruptions,
        at=fractions,
        boot_seconds=BOOT_SECONDS,
        environment={"TRAIN_STEPS": str(200 * (interruptions + 1)), "TRAIN_CHECKPOINT_EVERY": "25"},
    )
    report = rehearse(options)
    _save(report, save, "breakdown" if options.spawn is None else "burst")
    phases = (
        "ssm_sent",
        "ssm_delivered",
        "checkpoint_started",
        "checkpoint_durable",
        "replacement_launched",
        "replacement_booted",
        "running",
        "training_resumed",
    )
    details = report["interruption_details"]
    rows = [d["breakdown_seconds"] for d in details]
    medians = {p: _median([r[p] for r in rows]) for p in phases}
    overheads = [o for d in details if (o := d["overhead_seconds"]) is not None]
    return {
        "verdict": report["verdict"],
        "lost_steps": report["lost_steps"],
        "checkpoint_kinds": report["checkpoint_kinds"],
        "median_seconds_after_notice": medians,
        "recovery_seconds": report["recovery_seconds"],
        "overhead_seconds": overheads,
        "overhead_median_seconds": _median(overheads),
        "boot_seconds": BOOT_SECONDS,
        "command_problems": command_problems(report),
    }


def command_problems(report: Mapping[str, Any]) -> list[str]:
    """Every checkpoint command record checked against the warnings (`verdict.command_problems`):
    the warned instance of its job only, and delivered there at most once per warning."""
    warned = [(d["job_id"], d["instance_id"], d["kind"]) for d in report["interruption_details"]]
    return verdict.command_problems(warned, report["ssm_commands"], at_most_one_per_warning=True)


def burst(jobs: int, save: Path | None = None) -> dict[str, Any]:
    steps, rate = 400, 0.5

    def spawn(instance: Instance, environment: Mapping[str, str]) -> LightAgent:
        return LightAgent(instance, environment, steps=steps, rate=rate)

    options = Options(
        script=resolve_script(None),
        jobs=jobs,
        interruptions=1,
        at=[0.02],
        simultaneous=True,
        boot_seconds=BOOT_SECONDS,
        spawn=spawn,
        # No training artifacts here: the burst measures the control plane only.
        reference={"sha256": None, "steps": steps, "digests": {}, "seconds": 0.0},
        # AWS's own timings (the 120 s notice): moto, the handlers and 200 resume executions
        # share one Python process here, so their work takes far longer than on AWS; a
        # scaled-down notice would measure that, not whether each warning is answered.
        time_scale=1.0,
        timeout_seconds=1500,
    )
    report = rehearse(options)
    _save(report, save, "breakdown" if options.spawn is None else "burst")
    details = report["interruption_details"]
    recoveries = [d["recovery_seconds"] for d in details if d["recovery_seconds"] is not None]
    # Every warning went out in the same tick, so the last recovery ends the burst.
    span = max(recoveries, default=0.0)
    unfinished = [j for j in report["per_job"] if j["status"] != "SUCCEEDED"]
    # When each warning's handler sent its checkpoint command (seconds after the warning):
    # a command sent after the notice finds its instance gone.
    sent = sorted(s for d in details if (s := d["breakdown_seconds"]["ssm_sent"]) is not None)
    kinds = Counter(str(k) for k in report["checkpoint_kinds"])
    lost = [s for s in report["lost_steps"] if s is not None]
    return {
        "jobs": jobs,
        "interruptions": report["interruptions"],
        "recovered": len(recoveries),
        "replacements": report["replacements"],
        "duplicate_replacements": report["duplicate_replacements"],
        "succeeded": jobs - len(unfinished),
        "unfinished": [
            {"job_id": j["job_id"], "status": j["status"], "reason": j["failure_reason"]} for j in unfinished
        ],
        "ssm_deliveries": report["ssm_deliveries"],
        "command_problems": command_problems(report),
        "commands_sent_within_notice": sum(1 for s in sent if s < report["notice_seconds"]),
        "command_sent_seconds": {
            "median": _median(sent),
            "p95": round(sent[int(0.95 * (len(sent) - 1))], 3) if sent else None,
            "max": sent[-1] if sent else None,
        },
        "handler_errors": report["handler_errors"],
        "recovery_median_seconds": _median(recoveries),
        "recovery_p95_seconds": round(sorted(recoveries)[int(0.95 * (len(recoveries) - 1))], 3)
        if recoveries
        else None,
        "recoveries_per_second": round(len(recoveries) / span, 2) if span > 0 else None,
        "notice_seconds": report["notice_seconds"],
        # What the warnings whose command came too late cost: those jobs resumed from a
        # periodic checkpoint and redid the steps since.
        "resumed_from_final": kinds.get("final", 0),
        "resumed_from_fallback": kinds.get("fallback", 0),
        "checkpoint_kinds": dict(kinds),
        "lost_steps_total": sum(lost),
        "lost_steps_max": max(lost, default=0),
        "jobs_that_lost_steps": sum(1 for s in lost if s > 0),
        "lost_steps_unknown": sum(1 for s in report["lost_steps"] if s is None),
        "handler_failures": report["handler_failures"],
        "wall_seconds": report["wall_seconds"],
    }


def _median(values: list[Any]) -> float | None:
    present = [v for v in values if v is not None]
    return round(statistics.median(present), 3) if present else None


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Recovery breakdown and burst (offline rehearsal).")
    parser.add_argument("--quick", action="store_true", help="2 interruptions and a burst of 40")
    parser.add_argument("--interruptions", type=int, default=None)
    parser.add_argument("--burst", type=int, default=None, help="jobs interrupted at once")
    parser.add_argument("--json", action="store_true")
    parser.add_argument(
        "--save-reports", type=Path, default=None, help="write both rehearsals' full reports here"
    )
    args = parser.parse_args(argv)
    interruptions = args.interruptions or (2 if args.quick else 3)
    jobs = args.burst or (40 if args.quick else 200)

    baseline = process_baseline()
    first = breakdown(interruptions, args.save_reports)
    second = burst(jobs, args.save_reports)
    overhead = first["overhead_median_seconds"]
    result = {
        "baseline_process_start_seconds": round(baseline, 3),
        "breakdown": first,
        "overhead_in_process_starts": round(overhead / baseline, 2)
        if overhead is not None and baseline
        else None,
        "burst": second,
        "command": "python -m bench.recovery" + (" --quick" if args.quick else ""),
    }
    print(json.dumps(result, indent=None if args.json else 1))
    burst_ok = (
        second["duplicate_replacements"] == 0
        and second["recovered"] == second["interruptions"] == jobs
        # Each checkpoint command reached its job's warned instance, once, or nothing.
        and not second["command_problems"]
        and not second["unfinished"]
        and second["handler_errors"] == 0
    )
    print(
        f"burst: {second['recovered']}/{jobs} recovered, {second['duplicate_replacements']} duplicate "
        f"replacements, {second['resumed_from_final']} resumed from their final checkpoint and "
        f"{second['resumed_from_fallback']} from a periodic one (fallback), "
        f"{second['lost_steps_total']} steps lost in all (at most {second['lost_steps_max']} by one job), "
        f"{len(second['command_problems'])} misdirected checkpoint commands",
        file=sys.stderr,
    )
    return 0 if first["verdict"] == "pass" and not first["command_problems"] and burst_ok else 1


if __name__ == "__main__":
    sys.exit(main())
