"""Instances as local processes, plus the EC2 and SSM behaviour around them.

`Fleet` polls moto for the instances RunInstances created (the workflow launches them).
After the boot delay each one becomes a local process running the real agent
(`trainctl agent -- <training command>`) with its own fake IMDSv2 endpoint, agent socket,
staging and working directory (a replacement starts on an empty disk, as on EC2), and the
standard `AWS_ENDPOINT_URL` / `AWS_EC2_METADATA_SERVICE_ENDPOINT` pointing at moto and at
its IMDS. Each process tree is tied to the rehearsal (`tether.py`): it dies with the
rehearsal process even when that is killed outright. EC2's side is emulated too: an
instance terminated in moto has its processes SIGKILLed, every instance that ends emits
the state-change events EC2 would, and an instance whose agent exits on its own shuts
down (terminates).

`SsmAgent` stands in for the SSM agent on each instance: a command sent to an instance id
runs the document's command on *that* instance only, against that instance's agent socket.
(moto adds every instance of the region to a command sent without Targets;
`cloud.MotoCloud` patches that, so a command's InstanceIds are the ones its sender gave.)
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import re
import shlex
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, NamedTuple, Protocol

from trainctl.agent.fake_imds import FakeImds
from trainctl.rehearse.tether import kill_tree, tethered
from trainctl_core.settings import SSM_PARAM_DEADLINE, SSM_PARAM_JOB_ID, TAG_ATTEMPT, TAG_JOB_ID, TAG_MANAGED

logger = logging.getLogger("trainctl.rehearse")

TRAINCTL_ENTRY = [sys.executable, "-c", "from trainctl.cli import main; main()"]
STATE_CHANGE = "EC2 Instance State-change Notification"
PLACEHOLDER = re.compile(r"\{\{\s*(\w+)\s*\}\}")


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
    reclaimed: bool = False  # EC2 was told to terminate it after the reclaim
    killed_at: float | None = None
    ended_at: float | None = None  # observed shutting-down/terminated in moto
    commands: list[dict[str, Any]] = field(default_factory=list)

    @property
    def pool(self) -> str:
        return f"{self.instance_type}@{self.zone}"

    @property
    def alive(self) -> bool:
        """Booted and its agent still running."""
        return self.handle is not None and self.killed_at is None and self.handle.poll() is None

    @property
    def online(self) -> bool:
        """Booted and not yet gone: SSM reaches it even after its agent exited (the
        command then fails on the instance, as it would on EC2)."""
        return self.handle is not None and self.killed_at is None and self.ended_at is None


class ProcessHandle:
    """The agent process (and, below it, the training process) of one instance.

    Started through the tether (`trainctl.rehearse.tether`), in a session of its own: the
    whole tree dies with the rehearsal process, however that ends.
    """

    def __init__(self, argv: list[str], *, env: Mapping[str, str], cwd: Path, log_path: Path) -> None:
        self._log = open(log_path, "ab")  # noqa: SIM115 - kept open for the process's lifetime
        self.env = dict(env)
        command, fds = tethered(argv)
        self.process = subprocess.Popen(
            command,
            env=self.env,
            cwd=cwd,
            stdin=subprocess.DEVNULL,
            stdout=self._log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
            pass_fds=fds,
        )

    def poll(self) -> int | None:
        code = self.process.poll()
        if code is not None and not self._log.closed:
            self._log.close()
        return code

    def kill(self) -> None:
        """SIGKILL the whole tree at once: the machine is gone, nothing gets to clean up."""
        kill_tree(self.process.pid)
        with contextlib.suppress(subprocess.TimeoutExpired):
            self.process.wait(timeout=5)
        if not self._log.closed:
            self._log.close()

    def run_command(self, argv: list[str], timeout: float) -> int:
        """Run a command "on this instance" (SSM's aws:runShellScript), with its environment.

        Not through the tether: the command (`trainctl checkpoint-now`) talks to this
        instance's agent, and ends as soon as the agent is gone, which the tether sees to;
        a launcher per command would cost a process start in the middle of the notice.
        """
        process = subprocess.Popen(
            argv,
            env=self.env,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            start_new_session=True,  # stopped by the rehearsal, not by the terminal's Ctrl-C
        )
        try:
            _, stderr = process.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            kill_tree(process.pid)
            process.communicate()
            return 124
        if process.returncode != 0:
            tail = stderr.decode(errors="replace")[-500:]
            logger.info("ssm command exited %s: %s", process.returncode, tail)
        return process.returncode


Spawner = Callable[[Instance, Mapping[str, str]], Handle]


class Ec2Event(NamedTuple):
    """An event EC2 would send about an instance (`at`: its time, default now)."""

    detail_type: str
    instance: Instance
    detail: dict[str, Any]
    at: float | None = None


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
        self._kill_lock = threading.Lock()
        self._reaper: threading.Thread | None = None
        self._closed = threading.Event()

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
            if instance.reclaim_at is not None and now >= instance.reclaim_at and not instance.reclaimed:
                # The Spot reclaim: the machine stopped dead at the deadline (the reaper
                # sees to that on time, however slow this loop is); EC2 terminates it.
                self._kill(instance, now)
                instance.reclaimed = True
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
        # Type, zone and market as EC2 reports them, so the agent's recovery metrics and
        # cost accrual see the pool the workflow chose (an on-demand instance has no
        # InstanceLifecycle; IMDS says "on-demand").
        instance.imds = FakeImds(
            instance.instance_id,
            tags=tags,
            instance_type=instance.instance_type,
            zone=instance.zone,
            life_cycle=raw.get("InstanceLifecycle", "on-demand"),
        ).start()
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
        with self._kill_lock:
            if (
                instance.handle is not None
                and instance.killed_at is None
                and instance.exited_at is None
                and instance.handle.poll() is None  # an agent that already exited is not killed
            ):
                instance.handle.kill()
                instance.killed_at = now
                instance.exit_code = -9

    def _reap(self) -> None:
        """SIGKILL every instance whose reclaim time has come, when it comes: under load a
        pass of the rehearsal's loop can take seconds, and a late kill would give the
        agent more time than the notice does."""
        while not self._closed.wait(0.02):
            now = time.time()
            for instance in list(self.instances.values()):
                if instance.reclaim_at is not None and now >= instance.reclaim_at:
                    self._kill(instance, now)

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
        with self._lock:
            if self._reaper is None:
                self._reaper = threading.Thread(target=self._reap, name="rehearse-reaper", daemon=True)
                self._reaper.start()

    def put_event(self, detail_type: str, instance: Instance, detail: dict[str, Any]) -> None:
        """Emit an EC2 event through EventBridge (the synthesized rules route it)."""
        self.put_events([Ec2Event(detail_type, instance, detail)])

    def put_events(self, events: Sequence[Ec2Event]) -> None:
        """Emit several at once: up to 10 per PutEvents call (its limit), so a burst's
        warnings go out together rather than one request each behind a busy moto."""
        entries = []
        for event in events:
            entry: dict[str, Any] = {
                "Source": "aws.ec2",
                "DetailType": event.detail_type,
                "Detail": json.dumps({"instance-id": event.instance.instance_id, **event.detail}),
                "Resources": [f"arn:aws:ec2:us-east-1:123456789012:instance/{event.instance.instance_id}"],
            }
            if event.at is not None:
                # The moment EC2 issued it: the handler's deadline is the event time + notice.
                entry["Time"] = datetime.fromtimestamp(event.at, UTC)
            entries.append(entry)
        copies = 2 if self.duplicate_events else 1
        for _ in range(copies):
            for start in range(0, len(entries), 10):
                response = self.events.put_events(Entries=entries[start : start + 10])
                if response.get("FailedEntryCount"):
                    raise RuntimeError(f"EventBridge refused EC2 events: {response['Entries']}")
        now = time.time()
        with self._lock:
            self.emitted.extend(
                {"detail_type": e.detail_type, "instance_id": e.instance.instance_id, "at": now, **e.detail}
                for e in events
            )

    def emit_state_change(self, instance: Instance, state: str) -> None:
        self.put_event(STATE_CHANGE, instance, {"state": state})

    def shutdown(self) -> None:
        self._closed.set()
        if self._reaper is not None:
            self._reaper.join(timeout=5)
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
        self._documents: dict[str, tuple[list[str], dict[str, str]]] = {}
        self.deliveries: list[dict[str, Any]] = []
        self.lock = threading.Lock()  # guards `deliveries`
        self._tick_lock = threading.Lock()
        self._threads: list[threading.Thread] = []
        self._closed = threading.Event()
        self._poller: threading.Thread | None = None

    def start(self, every: float = 0.1) -> SsmAgent:
        """Poll for commands on a thread of its own: delivery must not wait for a slow
        pass of the rehearsal's loop (SSM delivers in about a second)."""

        def poll() -> None:
            while not self._closed.wait(every):
                try:
                    self.tick()
                except Exception:  # moto stopping, or a request failing under load: next poll
                    if not self._closed.is_set():
                        logger.exception("ssm: polling for commands failed")

        self._poller = threading.Thread(target=poll, name="rehearse-ssm-poll", daemon=True)
        self._poller.start()
        return self

    def tick(self) -> None:
        with self._tick_lock:
            self._deliver_new()

    def _deliver_new(self) -> None:
        pages = self.ssm.get_paginator("list_commands").paginate()
        for command in (c for page in pages for c in page.get("Commands", [])):
            command_id = command["CommandId"]
            if command_id in self._seen:
                continue
            self._seen.add(command_id)
            lines, defaults = self._document(command["DocumentName"])
            # Like SSM: a parameter the sender left out takes the document's default.
            parameters = {
                **defaults,
                **{k: (v[0] if v else "") for k, v in command.get("Parameters", {}).items()},
            }
            for instance_id in command.get("InstanceIds", []):
                instance = self.fleet.instances.get(instance_id)
                record = {
                    "command_id": command_id,
                    "instance_id": instance_id,
                    "job_id": parameters.get(SSM_PARAM_JOB_ID),
                    "deadline": parameters.get(SSM_PARAM_DEADLINE),
                    "sent_at": command["RequestedDateTime"].timestamp(),
                    "seen_at": time.time(),
                    "delivered_at": None,
                    "finished_at": None,
                    "exit_code": None,
                }
                with self.lock:
                    self.deliveries.append(record)
                if instance is None or not instance.online:
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

    def _document(self, name: str) -> tuple[list[str], dict[str, str]]:
        """The document's shell lines and its parameters' default values."""
        if name not in self._documents:
            content = json.loads(self.ssm.get_document(Name=name)["Content"])
            lines: list[str] = []
            for step in content.get("mainSteps", []):
                if step.get("action") == "aws:runShellScript":
                    lines.extend(step.get("inputs", {}).get("runCommand", []))
            defaults = {
                key: str(spec["default"])
                for key, spec in content.get("parameters", {}).items()
                if isinstance(spec, dict) and "default" in spec
            }
            self._documents[name] = (lines, defaults)
        return self._documents[name]

    def _run(
        self, instance: Instance, lines: list[str], parameters: dict[str, str], record: dict[str, Any]
    ) -> None:
        record["delivered_at"] = time.time()
        instance.commands.append(record)
        code = 0
        for line in lines:
            # SSM's placeholders: {{Name}}, spaces allowed inside the braces.
            line = PLACEHOLDER.sub(
                lambda m: shlex.quote(parameters[m.group(1)]) if m.group(1) in parameters else m.group(0),
                line,
            )
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
        self._closed.set()
        if self._poller is not None:
            self._poller.join(timeout)
        for thread in list(self._threads):
            thread.join(timeout)
