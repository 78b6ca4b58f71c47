"""The agent's log shipper against moto CloudWatch Logs, and a real agent run read back by
`trainctl logs JOB`."""

from __future__ import annotations

import json
import logging
import socket
import sys
import threading
import time
from collections.abc import Iterator
from typing import Any

import boto3
import pytest
from botocore.config import Config
from botocore.exceptions import ClientError
from moto import mock_aws
from typer.testing import CliRunner

from trainctl import runtime_env
from trainctl.agent import cli as agent_cli
from trainctl.agent.logship import (
    EVENT_OVERHEAD_BYTES,
    MAX_BATCH_BYTES,
    MAX_BATCH_EVENTS,
    MAX_EVENT_BYTES,
    PENDING_ATTEMPT,
    LogShipper,
    stream_name,
)
from trainctl.agent.supervisor import Agent, AgentConfig
from trainctl.cli import app
from trainctl.commands import stack as stack_mod
from trainctl.commands.output import Deps
from trainctl_core import clients, jobs
from trainctl_core.store import JobStore

from .conftest import REGION
from .test_agent import INSTANCE, JOB, World

GROUP = "/trainctl/Trainctl/agent"


class Recording:
    """The moto logs client, recording every PutLogEvents call (and optionally gating it)."""

    def __init__(self, client: Any) -> None:
        self.client = client
        self.exceptions = client.exceptions
        self.puts: list[list[dict[str, Any]]] = []
        self.gate = threading.Event()
        self.gate.set()
        self.entered = threading.Event()

    def create_log_stream(self, **kwargs: Any) -> Any:
        return self.client.create_log_stream(**kwargs)

    def put_log_events(self, **kwargs: Any) -> Any:
        self.entered.set()
        self.gate.wait()  # a hanging endpoint, while the test holds the gate closed
        self.puts.append(list(kwargs["logEvents"]))
        return self.client.put_log_events(**kwargs)


@pytest.fixture
def logs() -> Iterator[Any]:
    with mock_aws():
        client = boto3.client("logs", region_name=REGION)
        client.create_log_group(logGroupName=GROUP)
        yield client


def _events(client: Any, stream: str) -> list[dict[str, Any]]:
    events: list[dict[str, Any]] = []
    kwargs: dict[str, Any] = {"logGroupName": GROUP, "logStreamName": stream, "startFromHead": True}
    while True:
        page = client.get_log_events(**kwargs)
        events.extend(page["events"])
        if not page["events"] or page.get("nextForwardToken") == kwargs.get("nextToken"):
            return events
        kwargs["nextToken"] = page["nextForwardToken"]


def _shipper(client: Any, **kwargs: Any) -> LogShipper:
    kwargs.setdefault("interval", 0.05)
    return LogShipper(client, GROUP, job_id=JOB, instance_id=INSTANCE, **kwargs)


def _batch_bytes(batch: list[dict[str, Any]]) -> int:
    return sum(len(e["message"].encode()) + EVENT_OVERHEAD_BYTES for e in batch)


# --- batching and ordering ------------------------------------------------------------------


def test_many_lines_ship_in_batches_within_the_put_log_events_limits(logs: Any) -> None:
    # Given a shipper whose thread is not running yet (everything queues up)
    recording = Recording(logs)
    shipper = _shipper(recording)
    shipper.bind_attempt(0)
    small = [f"step {i} loss {1 / (i + 1):.5f}" for i in range(MAX_BATCH_EVENTS + 2_500)]
    big = [f"{i:04d}" + "x" * 200_000 for i in range(12)]  # ~2.4 MB in total
    for line in small + big:
        shipper.write(line + "\n")
    # When it starts and closes
    shipper.start()
    assert shipper.close(timeout=30)
    # Then no call broke a limit, and every line arrived once, in order
    assert len(recording.puts) >= 2 + 2
    for batch in recording.puts:
        assert len(batch) <= MAX_BATCH_EVENTS
        assert _batch_bytes(batch) <= MAX_BATCH_BYTES
        stamps = [e["timestamp"] for e in batch]
        assert stamps == sorted(stamps)
    stored = [e["message"] for e in _events(logs, stream_name(JOB, 0, INSTANCE))]
    assert stored == small + big
    assert shipper.shipped == len(small) + len(big) and shipper.dropped == 0 == shipper.rejected


def test_oversized_lines_are_cut_to_the_event_limit(logs: Any) -> None:
    shipper = _shipper(logs).start()
    shipper.bind_attempt(0)
    shipper.write("é" * MAX_EVENT_BYTES)  # 2 bytes per character: twice the limit
    shipper.write("")  # nothing to ship: CloudWatch refuses empty messages
    assert shipper.close(timeout=10)
    (event,) = _events(logs, stream_name(JOB, 0, INSTANCE))
    size = len(event["message"].encode())
    assert MAX_EVENT_BYTES - EVENT_OVERHEAD_BYTES - 1 <= size <= MAX_EVENT_BYTES - EVENT_OVERHEAD_BYTES
    assert set(event["message"]) == {"é"}  # cut on a character boundary


def test_a_clock_stepping_back_keeps_events_chronological(logs: Any) -> None:
    # moto, like CloudWatch, refuses a batch out of chronological order.
    ticks = iter([1_000.0, 1_010.0, 1_005.0, 990.0, 1_020.0])
    now = time.time()
    shipper = _shipper(logs, clock=lambda: now - 3_600 + next(ticks))
    shipper.bind_attempt(1)
    for word in ("a", "b", "c", "d", "e"):
        shipper.write(word)
    shipper.start()
    assert shipper.close(timeout=10)
    events = _events(logs, stream_name(JOB, 1, INSTANCE))
    assert [e["message"] for e in events] == ["a", "b", "c", "d", "e"]
    stamps = [e["timestamp"] for e in events]
    assert stamps == sorted(stamps) and shipper.rejected == 0


def test_a_batch_never_spans_24_hours(logs: Any) -> None:
    recording = Recording(logs)
    shipper = _shipper(recording)
    shipper.bind_attempt(0)
    start = time.time() - 30 * 3600  # within CloudWatch's 14 days
    for hour in range(31):
        shipper.write(f"hour {hour}", timestamp=start + hour * 3600)
    shipper.start()
    assert shipper.close(timeout=10)
    assert len(recording.puts) >= 2
    for batch in recording.puts:
        assert batch[-1]["timestamp"] - batch[0]["timestamp"] < 24 * 3600 * 1000
    assert len(_events(logs, stream_name(JOB, 0, INSTANCE))) == 31


def test_events_cloudwatch_rejects_are_counted_and_do_not_wedge_the_queue(logs: Any) -> None:
    shipper = _shipper(logs)
    shipper.bind_attempt(0)
    shipper.write("from a stale clock", timestamp=time.time() - 15 * 24 * 3600)  # > 14 days old
    shipper.write("fresh")
    shipper.start()
    assert shipper.close(timeout=10)
    assert shipper.rejected == 1 and shipper.shipped == 1
    assert [e["message"] for e in _events(logs, stream_name(JOB, 0, INSTANCE))] == ["fresh"]


class _RefusesFirstBatch(Recording):
    def put_log_events(self, **kwargs: Any) -> Any:
        if not self.puts:
            self.puts.append([])
            raise ClientError(
                {"Error": {"Code": "InvalidParameterException", "Message": "bad batch"}}, "PutLogEvents"
            )
        return super().put_log_events(**kwargs)


def test_a_batch_cloudwatch_refuses_is_dropped_not_retried_forever(logs: Any) -> None:
    shipper = _shipper(_RefusesFirstBatch(logs)).start()
    shipper.bind_attempt(0)
    shipper.write("refused")
    assert shipper.flush(timeout=10)
    shipper.write("accepted")
    assert shipper.close(timeout=10)
    assert shipper.rejected == 1 and shipper.shipped == 1
    assert [e["message"] for e in _events(logs, stream_name(JOB, 0, INSTANCE))] == ["accepted"]


# --- stream naming --------------------------------------------------------------------------


def test_lines_written_before_the_attempt_is_known_go_to_that_attempts_stream(logs: Any) -> None:
    shipper = _shipper(logs).start()
    shipper.write("waiting for the job row")
    assert not shipper.flush(timeout=0.2)  # no stream yet: nothing can ship
    # When the agent learns its attempt, the stream is created and the lines follow
    shipper.bind_attempt(3)
    assert shipper.flush(timeout=10)
    shipper.write("training")
    assert shipper.close(timeout=10)
    streams = [s["logStreamName"] for s in logs.describe_log_streams(logGroupName=GROUP)["logStreams"]]
    assert streams == [f"{JOB}/3/{INSTANCE}"]
    assert [e["message"] for e in _events(logs, streams[0])] == ["waiting for the job row", "training"]


def test_an_existing_or_deleted_stream_is_reused_or_recreated(logs: Any) -> None:
    stream = stream_name(JOB, 0, INSTANCE)
    logs.create_log_stream(logGroupName=GROUP, logStreamName=stream)  # an agent restart
    shipper = _shipper(logs).start()
    shipper.bind_attempt(0)
    shipper.write("first")
    assert shipper.flush(timeout=10)
    logs.delete_log_stream(logGroupName=GROUP, logStreamName=stream)
    shipper.write("second")
    assert shipper.close(timeout=10)
    assert [e["message"] for e in _events(logs, stream)] == ["second"]


def test_an_agent_that_never_learned_its_attempt_still_ships_why(logs: Any) -> None:
    shipper = _shipper(logs).start()
    shipper.write("job row never named this instance")
    assert shipper.close(timeout=10)
    stream = stream_name(JOB, PENDING_ATTEMPT, INSTANCE)
    assert [e["message"] for e in _events(logs, stream)] == ["job row never named this instance"]


def test_agent_log_records_ship_but_the_shippers_own_warnings_do_not(logs: Any) -> None:
    shipper = _shipper(logs).start()
    shipper.bind_attempt(0)
    shipper.attach("trainctl")
    agent_logger = logging.getLogger("trainctl.agent")
    agent_logger.info("checkpoint recorded: step %s", 40)
    agent_logger.debug("below the level")
    # Shipping "cannot ship" would feed an outage with its own warnings.
    logging.getLogger("trainctl.agent.logship").warning("cannot ship logs")
    assert shipper.close(timeout=10)
    # close() detached the handler: later records stay local
    agent_logger.info("after close")
    messages = [e["message"] for e in _events(logs, stream_name(JOB, 0, INSTANCE))]
    assert messages == ["trainctl.agent INFO checkpoint recorded: step 40"]


# --- CloudWatch unreachable -----------------------------------------------------------------


def _closed_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def test_an_unreachable_endpoint_neither_raises_nor_grows_the_buffer_without_bound() -> None:
    # Given a client whose endpoint refuses connections
    client = boto3.client(
        "logs",
        region_name=REGION,
        endpoint_url=f"http://127.0.0.1:{_closed_port()}",
        config=Config(connect_timeout=0.5, read_timeout=0.5, retries={"max_attempts": 1}),
    )
    shipper = _shipper(client, max_buffered_events=50, max_backoff=0.2).start()
    shipper.bind_attempt(0)
    # When training writes far more than the buffer holds
    for i in range(500):
        shipper.write(f"step {i}")
    # Then nothing was raised, the buffer kept the newest, and flush/close give up in time
    assert not shipper.flush(timeout=0.5)
    assert shipper.pending() <= 50 and shipper.dropped >= 450
    assert not shipper.close(timeout=0.5)
    assert shipper.shipped == 0


def test_a_hanging_endpoint_does_not_block_writers_and_reports_what_it_dropped(logs: Any) -> None:
    # Given CloudWatch hanging on the first put
    recording = Recording(logs)
    recording.gate.clear()
    shipper = _shipper(recording, max_buffered_events=20).start()
    shipper.bind_attempt(0)
    shipper.write("line 0")
    assert recording.entered.wait(10)
    # When training keeps writing while the put hangs (a blocking write would hang here)
    for i in range(1, 101):
        shipper.write(f"line {i}")
    assert not shipper.flush(timeout=0.2)
    assert shipper.pending() == 20 and shipper.dropped == 80
    # And CloudWatch answers again
    recording.gate.set()
    assert shipper.close(timeout=10)
    # Then the stream has the in-flight line, a counted notice, and the newest 20 lines
    messages = [e["message"] for e in _events(logs, stream_name(JOB, 0, INSTANCE))]
    assert messages[0] == "line 0"
    assert "dropped 80 older log events" in messages[1]
    assert messages[2:] == [f"line {i}" for i in range(81, 101)]


# --- a real agent run -----------------------------------------------------------------------


class _SnapshotOnOutcome(JobStore):
    """The real store; records what the log stream held when the outcome was written."""

    seen_at_outcome: list[str] | None = None

    def __init__(self, logs: Any, *args: Any) -> None:
        super().__init__(*args)
        self.logs = logs

    def apply(self, transition: jobs.Transition) -> jobs.Job:
        if transition.target_status in (jobs.JobStatus.SUCCEEDED, jobs.JobStatus.FAILED):
            stream = stream_name(JOB, 0, INSTANCE)
            self.seen_at_outcome = [e["message"] for e in _events(self.logs, stream)]
        return super().apply(transition)


@pytest.fixture
def world(tmp_path: Any) -> Iterator[World]:
    with mock_aws():
        clients.reset()  # the agent CLI's cached clients must talk to this mock
        world = World(tmp_path)
        boto3.client("logs", region_name=REGION).create_log_group(logGroupName=GROUP)
        yield world
        clients.reset()


def test_the_childs_output_is_shipped_before_the_job_is_marked_failed(world: World) -> None:
    # Given a running job and an agent shipping to the log group
    world.add_job()
    logs = boto3.client("logs", region_name=REGION)
    store = _SnapshotOnOutcome(logs, world.ddb, "trainctl-jobs")
    shipper = _shipper(logs).start()
    script = "import sys; print('loading data'); print('ValueError: bad shape', file=sys.stderr); sys.exit(3)"
    config = AgentConfig(
        job_id=JOB,
        instance_id=INSTANCE,
        command=[sys.executable, "-c", script],
        socket_path=str(world.tmp / "agent.sock"),
        child_env={"PYTHONUNBUFFERED": "1"},  # stdout and stderr interleave as written
        resume_poll_seconds=0.1,
    )
    # When the training process fails
    assert Agent(config, store, logs=shipper).run() == 3
    shipper.close()
    # Then its output was in CloudWatch before FAILED was written (so --follow shows it)
    assert store.seen_at_outcome == ["loading data", "ValueError: bad shape"]
    assert world.store.get(JOB).status == jobs.JobStatus.FAILED


def test_a_real_agent_run_ends_with_its_output_in_trainctl_logs(world: World, tmp_path: Any) -> None:
    # Given a deployed stack (outputs the CLI reads) and a launched job
    world.add_job()
    cfn = boto3.client("cloudformation", region_name=REGION)
    cfn.create_stack(
        StackName="Trainctl",
        TemplateBody=json.dumps(
            {
                "Resources": {
                    "Marker": {
                        "Type": "AWS::SSM::Parameter",
                        "Properties": {"Name": "/trainctl/logship-test", "Type": "String", "Value": "x"},
                    }
                },
                "Outputs": {
                    stack_mod.OUTPUT_JOBS_TABLE: {"Value": "trainctl-jobs"},
                    stack_mod.OUTPUT_AGENT_LOG_GROUP: {"Value": GROUP},
                },
            }
        ),
    )
    script = "print('epoch 1 loss 0.50'); print('epoch 2 loss 0.25')"
    # When the agent runs it with the log group set the way user data sets it
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv(runtime_env.AGENT_LOG_GROUP, GROUP)
        patch.delenv(stack_mod.ENV_STACK, raising=False)
        rc = agent_cli.agent_main(
            [
                "--job-id",
                JOB,
                "--instance-id",
                INSTANCE,
                "--table",
                "trainctl-jobs",
                "--region",
                REGION,
                "--socket",
                str(tmp_path / "agent.sock"),
                "--no-imds",
                "--resume-poll-seconds",
                "0.1",
                "--shutdown-command",
                "",
                "--",
                sys.executable,
                "-c",
                script,
            ]
        )
    assert rc == 0 and world.store.get(JOB).status == jobs.JobStatus.SUCCEEDED
    # Then the stream <job>/0/<instance> holds the child's output and the agent's outcome
    logs = boto3.client("logs", region_name=REGION)
    messages = [e["message"] for e in _events(logs, stream_name(JOB, 0, INSTANCE))]
    child = messages.index("epoch 1 loss 0.50")
    assert messages[child + 1] == "epoch 2 loss 0.25"
    assert any("RUNNING on" in m for m in messages[:child])  # the agent's own records
    assert any(f"job {JOB} SUCCEEDED" in m for m in messages[child:])
    # And `trainctl logs JOB` prints it, labelled with the attempt
    result = CliRunner().invoke(app, ["logs", JOB, "--region", REGION], obj=Deps(), env={"COLUMNS": "200"})
    assert result.exit_code == 0, result.output
    lines = result.stdout.splitlines()
    assert any(line.endswith("[0] epoch 1 loss 0.50") for line in lines)
    assert any(line.endswith("[0] epoch 2 loss 0.25") for line in lines)
