"""`trainctl rehearse` as a process: how it ends when it does not reach a verdict.

Stopped by a signal (a CI timeout, `kill`, a closed terminal), it must take every
process it started with it and remove its scratch files; killed outright, its emulated
instances must still die; given up on (timeout) it fails with what it saw; unable to run
it says why in one line and exits 2. Each rehearsal here runs as a child process in a
temporary directory of its own ($TMPDIR), so what it leaves behind can be seen.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from typer.testing import CliRunner

from tests.rehearse.conftest import FAST_TRAINING
from trainctl.rehearse.scenario import REPO_ROOT
from trainctl.rehearse.tether import descendants

pytestmark = pytest.mark.slow

Process = tuple[int, str]  # pid, start time (tells a pid reused by another process apart)


@pytest.fixture
def scratch() -> Iterator[Path]:
    """A short $TMPDIR of the rehearsal's own (short: its agent sockets live there too)."""
    path = Path(tempfile.mkdtemp(prefix="trt-", dir="/tmp"))
    yield path
    shutil.rmtree(path, ignore_errors=True)


@pytest.fixture
def start(scratch: Path) -> Iterator[Callable[..., subprocess.Popen[str]]]:
    """Start `trainctl rehearse --json ARGS` in `scratch`; killed if a test leaves it running."""
    started: list[subprocess.Popen[str]] = []

    def _start(*args: str, **training: str) -> subprocess.Popen[str]:
        environment = {
            **os.environ,
            **FAST_TRAINING,
            **training,
            "TMPDIR": str(scratch),
            "MOTO_EC2_LOAD_DEFAULT_AMIS": "false",
        }
        process = subprocess.Popen(
            [sys.executable, "-m", "trainctl.cli", "rehearse", "--json", *args],
            cwd=REPO_ROOT,
            env=environment,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        started.append(process)
        return process

    yield _start
    for process in started:
        if process.poll() is None:
            process.kill()  # its launchers take its instances and reference run along
            process.communicate()


def _stat(pid: int) -> list[str] | None:
    try:
        with open(f"/proc/{pid}/stat") as handle:
            return handle.read().rsplit(")", 1)[1].split()
    except OSError:
        return None


def _alive(process: Process) -> bool:
    """Still running (a zombie has ended; a reused pid is another process)."""
    fields = _stat(process[0])
    return fields is not None and fields[0] != "Z" and fields[19] == process[1]


def _cmdline(pid: int) -> str:
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as handle:
            return handle.read().replace(b"\0", b" ").decode(errors="replace")
    except OSError:
        return ""


def _tree(pid: int) -> list[Process]:
    return [(p, fields[19]) for p in descendants(pid) if (fields := _stat(p)) is not None]


def _working_in(directory: Path) -> list[int]:
    """Live processes whose working directory is under `directory` (the instances' and
    the reference run's are), however they came to be."""
    found = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                cwd = os.readlink(f"/proc/{entry}/cwd")
            except OSError:
                continue
            fields = _stat(int(entry))
            if cwd.startswith(str(directory)) and fields is not None and fields[0] != "Z":
                found.append(int(entry))
    return found


def _wait_for(rehearsal: subprocess.Popen[str], what: str, found: Callable[[list[int]], bool]) -> None:
    """Until `found(the rehearsal's descendants)`; fails if the rehearsal ends first."""
    deadline = time.monotonic() + 240
    while not found(descendants(rehearsal.pid)):
        if rehearsal.poll() is not None:
            out, err = rehearsal.communicate()
            pytest.fail(
                f"the rehearsal ended (exit {rehearsal.returncode}) before {what}: {out} {err[-3000:]}"
            )
        assert time.monotonic() < deadline, f"no {what} after 240 s"
        time.sleep(0.2)


def _training_under_an_agent(pids: list[int]) -> bool:
    # The agent itself, not its launcher (whose command line holds the agent's).
    agents = [p for p in pids if " agent " in (line := _cmdline(p)) and "rehearse.tether" not in line]
    return any(descendants(agent) for agent in agents)


def _gone(processes: list[Process], seconds: float = 30) -> list[Process]:
    """The processes still alive after waiting up to `seconds` for them to end."""
    deadline = time.monotonic() + seconds
    while (alive := [p for p in processes if _alive(p)]) and time.monotonic() < deadline:
        time.sleep(0.1)
    return alive


def _report(stdout: str) -> dict[str, Any]:
    lines = [line for line in stdout.splitlines() if line.startswith("{")]
    assert lines, f"no JSON on stdout: {stdout!r}"
    parsed: dict[str, Any] = json.loads(lines[-1])
    return parsed


@pytest.mark.timeout(400)
def test_sigterm_mid_run_stops_every_process_it_started_and_removes_its_scratch_files(
    scratch: Path, start: Callable[..., subprocess.Popen[str]]
) -> None:
    # Given a rehearsal whose instance is training (agent, and the training below it)
    rehearsal = start("--interruptions", "0", TRAIN_STEPS="600")
    _wait_for(rehearsal, "a training process under an agent", _training_under_an_agent)
    tree = _tree(rehearsal.pid)
    assert len(tree) >= 3  # at least the launcher, the agent and the training

    # When it is sent SIGTERM (what a CI timeout or `kill` sends)
    rehearsal.send_signal(signal.SIGTERM)
    out, err = rehearsal.communicate(timeout=120)

    # Then it says so and exits 128 + 15, after stopping all it started
    assert rehearsal.returncode == 128 + signal.SIGTERM, err[-3000:]
    report = _report(out)
    assert report["verdict"] == "error"
    assert report["error"].startswith("rehearsal interrupted by SIGTERM")
    assert _gone(tree) == []
    assert _working_in(scratch) == []
    assert os.listdir(scratch) == []  # the work directory and the agents' sockets


@pytest.mark.timeout(400)
def test_sighup_during_the_reference_run_does_not_wait_for_it(
    scratch: Path, start: Callable[..., subprocess.Popen[str]]
) -> None:
    # Given a rehearsal still running its (long: ~40 minutes) uninterrupted reference
    rehearsal = start("--interruptions", "1", TRAIN_STEPS="100000")
    _wait_for(rehearsal, "the reference run", lambda pids: any("tiny_train.py" in _cmdline(p) for p in pids))
    tree = _tree(rehearsal.pid)

    # When it is sent SIGHUP (its terminal closed)
    rehearsal.send_signal(signal.SIGHUP)
    out, err = rehearsal.communicate(timeout=120)  # long before the reference would end

    # Then the reference run was stopped, not waited for
    assert rehearsal.returncode == 128 + signal.SIGHUP, err[-3000:]
    assert _report(out)["error"].startswith("rehearsal interrupted by SIGHUP")
    assert _gone(tree) == []
    assert _working_in(scratch) == []
    assert os.listdir(scratch) == []


@pytest.mark.timeout(400)
def test_instances_die_with_a_rehearsal_killed_outright(
    scratch: Path, start: Callable[..., subprocess.Popen[str]]
) -> None:
    # Given a rehearsal whose instance is training
    rehearsal = start("--interruptions", "0", TRAIN_STEPS="600")
    _wait_for(rehearsal, "a training process under an agent", _training_under_an_agent)
    tree = _tree(rehearsal.pid)

    # When it is SIGKILLed: no handler runs, nothing of it cleans up
    rehearsal.kill()
    rehearsal.communicate(timeout=60)

    # Then its instances' processes end all the same (their launcher sees it gone)
    assert _gone(tree) == []
    assert _working_in(scratch) == []


def test_a_rehearsal_that_times_out_fails_with_what_it_saw(
    cli: Callable[..., tuple[int, dict[str, Any]]],
) -> None:
    code, report = cli("--interruptions", "1", "--timeout", "2")

    assert code == 1
    assert report["verdict"] == "fail"
    assert report["timed_out"] is True and report["timeout_seconds"] == 2
    assert report["reasons"][0].startswith("the rehearsal did not finish within its timeout (2 s")
    # Partial results: the job as it was, and what the reference run gave.
    (job,) = report["per_job"]
    assert job["status"] != "SUCCEEDED"
    assert any(f"the job was still {job['status']}" in reason for reason in report["reasons"])
    assert report["reference_sha256"] is not None and report["final_sha256"] is None
    assert report["identical"] is False


def test_a_stack_that_cannot_be_synthesized_is_an_error_in_one_line(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    from trainctl.cli import app

    # No cached template, and no Node.js to synthesize one with.
    monkeypatch.setenv("TRAINCTL_REHEARSE_CACHE", str(tmp_path / "cache"))
    monkeypatch.setenv("PATH", str(tmp_path / "empty"))
    monkeypatch.delenv("JSII_NODE", raising=False)
    for name, value in FAST_TRAINING.items():
        monkeypatch.setenv(name, value)

    human = CliRunner().invoke(app, ["rehearse"])
    machine = CliRunner().invoke(app, ["rehearse", "--json"])

    assert human.exit_code == machine.exit_code == 2
    assert "Traceback" not in human.output
    (line, *rest) = [line for line in human.output.splitlines() if line.strip()]
    assert line.startswith("rehearsal error: synthesizing the stack needs Node.js")
    assert rest == []
    report = _report(machine.stdout)
    assert report["verdict"] == "error" and report["exit_code"] == 2
    assert "needs Node.js" in report["error"]


def test_an_unexpected_failure_is_an_error_not_a_fail(monkeypatch: pytest.MonkeyPatch) -> None:
    from botocore.exceptions import EndpointConnectionError

    from trainctl.cli import app
    from trainctl.rehearse import scenario

    # What a botocore failure in the middle of the rehearsal looks like to the command.
    def unreachable(*_args: Any, **_kwargs: Any) -> dict[str, Any]:
        raise EndpointConnectionError(endpoint_url="http://127.0.0.1:1/")

    monkeypatch.setattr(scenario, "rehearse", unreachable)
    monkeypatch.delenv("TRAINCTL_DEBUG", raising=False)

    result = CliRunner().invoke(app, ["rehearse"])

    assert result.exit_code == 2  # not 1: no verdict was reached
    assert "Traceback" not in result.output
    lines = [line for line in result.output.splitlines() if line.strip()]
    assert lines[0].startswith("rehearsal error: unexpected error: EndpointConnectionError:")
    assert "TRAINCTL_DEBUG=1" in lines[-1]


def test_a_bad_at_option_is_a_usage_error_not_an_unexpected_one(monkeypatch: pytest.MonkeyPatch) -> None:
    from trainctl.cli import app

    monkeypatch.delenv("TRAINCTL_DEBUG", raising=False)
    result = CliRunner().invoke(app, ["rehearse", "--interruptions", "2", "--at", "0.3,half"])

    assert result.exit_code == 2
    lines = [line for line in result.output.splitlines() if line.strip()]
    assert lines == ["rehearsal error: --at takes comma-separated fractions like 0.3,0.6 (got '0.3,half')"]
