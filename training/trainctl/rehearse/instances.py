"""Instances as local processes, plus the EC2 and SSM behaviour around them.

`Fleet` polls moto for the instances RunInstances created (the workflow launches them).
After the boot delay each one becomes a local process running the real agent
(`trainctl agent -- <training command>`) with its own fake IMDSv2 endpoint, agent socket,
staging and working directory (a replacement starts on an empty disk, as on EC2), and the
standard `AWS_ENDPOINT_URL` / `AWS_EC2_METADATA_SERVICE_ENDPOINT` pointing at moto and at
its IMDS. EC2's side is emulated too: an instance terminated in moto has its processes
SIGKILLed, every instance that ends emits the state-change events EC2 would, and an
instance whose agent exits on its own shuts down (terminates).

`SsmAgent` stands in for the SSM agent on each instance: a command sent to an instance id
runs the document's command on *that* instance only (moto's send_command addresses every
instance when given Targets), against that instance's agent socket.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import shlex
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

from trainctl.agent.fake_imds import FakeImds
from trainctl_core.settings import SSM_PARAM_DEADLINE, SSM_PARAM_JOB_ID, TAG_ATTEMPT, TAG_JOB_ID, TAG_MANAGED

logger = logging.getLogger("trainctl.rehearse")

TRAINCTL_ENTRY = [sys.executable, "-c", "from trainctl.cli import main; main()"]
STATE_CHANGE = "EC2 Instance State-change Notification"


class Handle(Protocol):
    """A running "instance": a real process tree, or a lightweight stand-in (bench)."""

    def poll(self) -> int | None: ...

    def kill(self) -> None: ...

    def run_command(self, argv: list[str], timeout: float) -> int: ...


@dataclass
class Instance:
    instance_id: str
    job_id: str
    attempt: int
    instance_type: str
    subnet_id: str
    zone: str
    discovered_at: float
    boot_at: float
    directory: Path
    socket: str
    state: str = "pending"
    imds: FakeImds | None = None
    handle: Handle | None = None
    started_at: float | None = None
    exited_at: float | None = None
    exit_code: int | None = None
    reclaim_at: float | None = None
    killed_at: float | None = None
    ended_at: float | None = None  # observed shutting-down/terminated in moto
    commands: list[dict[str, Any]] = field(default_factory=list)

    @property
    def pool(self) -> str:
        return f"{self.instance_type}@{self.zone}"

    @property
    def alive(self) -> bool:
        return self.handle is not None and self.killed_at is None and self.handle.poll() is None


def descendants(pid: int) -> list[int]:
    """Every process below `pid` (the training child runs in its own session)."""
    children: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat") as handle:
                stat = handle.read()
        except OSError:
            continue
        parent = int(stat.rsplit(")", 1)[1].split()[1])
        children.setdefault(parent, []).append(int(entry))
    found, frontier = [], [pid]
    while frontier:
        current = frontier.pop()
        for child in children.get(current, []):
            found.append(child)
            frontier.append(child)
    return found


class ProcessHandle:
    """The agent process (and, below it, the training process) of one instance."""

    def __init__(self, argv: list[str], *, env: Mapping[str, str], cwd: Path, log_path: Path) -> None:
        self._log = open(log_path, "ab")  # noqa: SIM115 - kept open for the process's lifetime
        self.env = dict(env)
        self.process = subprocess.Popen(
            argv, env=self.env, cwd=cwd, stdout=self._log, stderr=subprocess.STDOUT, start_new_session=True
        )

    def poll(self) -> int | None:
        code = self.process.poll()
        if code is not None and not self._log.closed:
            self._log.close()
        return code

    def kill(self) -> None:
        """SIGKILL the whole tree at once: the machine is gone, nothing gets to clean up."""
        victims = [self.process.pid, *descendants(self.process.pid)]
        for pid in victims:
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.kill(pid, signal.SIGKILL)
        with contextlib.suppress(subprocess.TimeoutExpired):
            self.process.wait(timeout=5)
        if not self._log.closed:
            self._log.close()

    def run_command(self, argv: list[str], timeout: float) -> int:
        """Run a command "on this instance" (SSM's aws:runShellScript), with its environment."""
        try:
            done = subprocess.run(argv, env=self.env, capture_output=True, timeout=timeout, check=False)
        except subprocess.TimeoutExpired:
            return 124
        if done.returncode != 0:
            logger.info(
                "ssm command exited %s: %s", done.returncode, done.stderr.decode(errors="replace")[-500:]
            )
        return done.returncode


Spawner = Callable[[Instance, Mapping[str, str]], Handle]


@dataclass
class FleetConfig:
    boot_seconds: float
    work_root: Path
    socket_root: Path
    jobs_table: str
    bucket: str
    region: str
    training_command: list[str]
    environment: Mapping[str, str]  # moto endpoint, credentials, training settings
    heartbeat_seconds: float = 0.25
    imds_poll_seconds: float = 1.0
    resume_poll_seconds: float = 0.1
    resume_wait_seconds: float = 300.0


class Fleet:
    """Instances of the rehearsal: discovered in moto, booted, reclaimed, shut down."""

    def __init__(
        self,
        ec2: Any,
        events: Any,
        config: FleetConfig,
        *,
        spawn: Spawner | None = None,
        duplicate_events: bool = False,
    ) -> None:
        self.ec2 = ec2
        self.events = events
        self.config = config
        self.spawn = spawn or self._spawn_process
        self.duplicate_events = duplicate_events
        self.instances: dict[str, Instance] = {}
        self.emitted: list[dict[str, Any]] = []
        self._lock = threading.Lock()

    # --- the loop ------------------------------------------------------------------------------

    def tick(self, now: float) -> None:
        self._discover(now)
        for instance in list(self.instances.values()):
            if instance.state in ("shutting-down", "terminated"):
                if instance.ended_at is None:
                    instance.ended_at = now
                    self._kill(instance, now)
                    self._stop_imds(instance)
                    self.emit_state_change(instance, "shutting-down")
                    self.emit_state_change(instance, "terminated")
                continue
            if instance.handle is None and now >= instance.boot_at:
                self._boot(instance, now)
            if instance.reclaim_at is not None and now >= instance.reclaim_at and instance.killed_at is None:
                # The Spot reclaim: the machine stops dead at the deadline.
                self._kill(instance, now)
                self.terminate(instance)
                continue
            if instance.handle is not None and instance.exited_at is None and instance.killed_at is None:
                code = instance.handle.poll()
                if code is not None:
                    # The agent ran its shutdown command if the job succeeded (the instance
                    # then terminates); otherwise the machine idles until reclaimed.
                    instance.exited_at, instance.exit_code = now, code

    def _discover(self, now: float) -> None:
        pages = self.ec2.get_paginator("describe_instances").paginate(
            Filters=[{"Name": f"tag:{TAG_MANAGED}", "Values": ["true"]}]
        )
        for reservation in (r for page in pages for r in page["Reservations"]):
            for raw in reservation["Instances"]:
                instance_id = raw["InstanceId"]
                state = raw["State"]["Name"]
                known = self.instances.get(instance_id)
                if known is not None:
                    known.state = state
                    continue
                tags = {t["Key"]: t["Value"] for t in raw.get("Tags", [])}
                directory = self.config.work_root / instance_id
                directory.mkdir(parents=True, exist_ok=True)
                self.instances[instance_id] = Instance(
                    instance_id=instance_id,
                    job_id=tags.get(TAG_JOB_ID, ""),
                    attempt=int(tags.get(TAG_ATTEMPT, "0")),
                    instance_type=raw["InstanceType"],
                    subnet_id=raw.get("SubnetId", ""),
                    zone=raw.get("Placement", {}).get("AvailabilityZone", ""),
                    discovered_at=now,
                    boot_at=now + self.config.boot_seconds,
                    directory=directory,
                    socket=str(self.config.socket_root / f"{instance_id}.sock"),
                    state=state,
                )

    def _boot(self, instance: Instance, now: float) -> None:
        raw = self.ec2.describe_instances(InstanceIds=[instance.instance_id])["Reservations"][0]["Instances"][
            0
        ]
        tags = {t["Key"]: t["Value"] for t in raw.get("Tags", [])}
        instance.imds = FakeImds(instance.instance_id, tags=tags).start()
        environment = {
            **self.config.environment,
            "AWS_EC2_METADATA_SERVICE_ENDPOINT": instance.imds.url,
            "TRAINCTL_AGENT_SOCKET": instance.socket,
            "TRAINCTL_JOBS_TABLE": self.config.jobs_table,
            "TRAIN_OUTPUT": str(instance.directory / "final_model.bin"),
        }
        instance.handle = self.spawn(instance, environment)
        instance.started_at = now

    def _spawn_process(self, instance: Instance, environment: Mapping[str, str]) -> Handle:
        config = self.config
        argv = [
            *TRAINCTL_ENTRY,
            "agent",
            # No --job-id / --instance-id: the agent reads both from (fake) IMDS, as on EC2.
            "--table",
            config.jobs_table,
            "--bucket",
            config.bucket,
            "--region",
            config.region,
            "--socket",
            instance.socket,
            "--staging-dir",
            str(instance.directory / "staging"),
            "--imds-poll-seconds",
            str(config.imds_poll_seconds),
            "--heartbeat-seconds",
            str(config.heartbeat_seconds),
            "--resume-poll-seconds",
            str(config.resume_poll_seconds),
            "--resume-wait-seconds",
            str(config.resume_wait_seconds),
            "--shutdown-command",
            # Like `shutdown -h now` on an instance that terminates on shutdown.
            shlex.join([sys.executable, "-m", "trainctl.rehearse.shutdown"]),
            "--",
            *config.training_command,
        ]
        return ProcessHandle(
            argv, env=environment, cwd=instance.directory, log_path=instance.directory / "agent.log"
        )

    def _kill(self, instance: Instance, now: float) -> None:
        if instance.handle is not None and instance.killed_at is None and instance.exited_at is None:
            instance.handle.kill()
            instance.killed_at = now
            instance.exit_code = -9

    def _stop_imds(self, instance: Instance) -> None:
        if instance.imds is not None:
            with contextlib.suppress(Exception):
                instance.imds.stop()
            instance.imds = None

    # --- EC2's actions -----------------------------------------------------------------------------

    def terminate(self, instance: Instance) -> None:
        self.ec2.terminate_instances(InstanceIds=[instance.instance_id])

    def schedule_reclaim(self, instance: Instance, at: float) -> None:
        instance.reclaim_at = at

    def put_event(self, detail_type: str, instance: Instance, detail: dict[str, Any]) -> None:
        """Emit an EC2 event through EventBridge (the synthesized rules route it)."""
        entry = {
            "Source": "aws.ec2",
            "DetailType": detail_type,
            "Detail": json.dumps({"instance-id": instance.instance_id, **detail}),
            "Resources": [f"arn:aws:ec2:us-east-1:123456789012:instance/{instance.instance_id}"],
        }
        copies = 2 if self.duplicate_events else 1
        for _ in range(copies):
            response = self.events.put_events(Entries=[entry])
            if response.get("FailedEntryCount"):
                raise RuntimeError(f"EventBridge refused the {detail_type} event: {response['Entries']}")
        with self._lock:
            self.emitted.append(
                {"detail_type": detail_type, "instance_id": instance.instance_id, "at": time.time(), **detail}
            )

    def emit_state_change(self, instance: Instance, state: str) -> None:
        self.put_event(STATE_CHANGE, instance, {"state": state})

    def shutdown(self) -> None:
        for instance in self.instances.values():
            if instance.handle is not None and instance.handle.poll() is None:
                instance.handle.kill()
            self._stop_imds(instance)

    def of_job(self, job_id: str) -> list[Instance]:
        return sorted(
            (i for i in self.instances.values() if i.job_id == job_id),
            key=lambda i: (i.attempt, i.discovered_at),
        )


class SsmAgent:
    """Delivers SSM Run Command invocations to the instances they address, and only those."""

    def __init__(self, ssm: Any, fleet: Fleet) -> None:
        self.ssm = ssm
        self.fleet = fleet
        self._seen: set[str] = set()
        self._documents: dict[str, list[str]] = {}
        self.deliveries: list[dict[str, Any]] = []
        self._lock = threading.Lock()
        self._threads: list[threading.Thread] = []

    def tick(self) -> None:
        pages = self.ssm.get_paginator("list_commands").paginate()
        for command in (c for page in pages for c in page.get("Commands", [])):
            command_id = command["CommandId"]
            if command_id in self._seen:
                continue
            self._seen.add(command_id)
            lines = self._document_lines(command["DocumentName"])
            parameters = {k: (v[0] if v else "") for k, v in command.get("Parameters", {}).items()}
            for instance_id in command.get("InstanceIds", []):
                instance = self.fleet.instances.get(instance_id)
                record = {
                    "command_id": command_id,
                    "instance_id": instance_id,
                    "job_id": parameters.get(SSM_PARAM_JOB_ID),
                    "deadline": parameters.get(SSM_PARAM_DEADLINE),
                    "sent_at": time.time(),
                    "delivered_at": None,
                    "finished_at": None,
                    "exit_code": None,
                }
                with self._lock:
                    self.deliveries.append(record)
                if instance is None or not instance.alive:
                    record["exit_code"] = "undeliverable"  # like SSM: the instance is not online
                    continue
                thread = threading.Thread(
                    target=self._run,
                    args=(instance, lines, parameters, record),
                    name="rehearse-ssm",
                    daemon=True,
                )
                self._threads.append(thread)
                thread.start()

    def _document_lines(self, name: str) -> list[str]:
        if name not in self._documents:
            content = json.loads(self.ssm.get_document(Name=name)["Content"])
            lines: list[str] = []
            for step in content.get("mainSteps", []):
                if step.get("action") == "aws:runShellScript":
                    lines.extend(step.get("inputs", {}).get("runCommand", []))
            self._documents[name] = lines
        return self._documents[name]

    def _run(
        self, instance: Instance, lines: list[str], parameters: dict[str, str], record: dict[str, Any]
    ) -> None:
        record["delivered_at"] = time.time()
        instance.commands.append(record)
        code = 0
        for line in lines:
            for key, value in parameters.items():
                line = line.replace("{{" + key + "}}", shlex.quote(value))
            argv = shlex.split(line)
            if argv and os.path.basename(argv[0]) == "trainctl":
                argv = [*TRAINCTL_ENTRY, *argv[1:]]  # the CLI installed "on the instance"
            assert instance.handle is not None
            code = instance.handle.run_command(argv, timeout=130)
            if code != 0:
                break
        record["finished_at"] = time.time()
        record["exit_code"] = code

    def join(self, timeout: float = 10) -> None:
        for thread in self._threads:
            thread.join(timeout)
