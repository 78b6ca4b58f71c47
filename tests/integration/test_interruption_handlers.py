"""The EC2-event handlers end to end against moto, fed real event shapes."""

from __future__ import annotations

import copy
import threading
from typing import Any

import pytest
from aws_lambda_powertools.utilities.idempotency.exceptions import (
    IdempotencyAlreadyInProgressError,
)

from tests.integration.conftest import recent
from trainctl_core.errors import CheckpointRequestFailed
from trainctl_core.handling import MalformedEvent
from trainctl_core.jobs import InterruptionReason, JobStatus


def deliver(module: Any, event: dict[str, Any], context: Any) -> dict[str, Any]:
    return module.handler(copy.deepcopy(event), context)


# --- Spot interruption warning ---------------------------------------------------------


def test_warning_checkpoints_records_and_starts_one_resume(env, interruption, context, event_loader):
    # Given a RUNNING job on the instance
    env.add_job()
    event = event_loader("spot_interruption_warning")

    # When the warning arrives
    response = deliver(interruption, event, context)

    # Then the instance is asked to checkpoint by the deadline (event time + 120 s) ...
    assert response["outcome"] == "resume_started"
    [command] = env.ssm_commands()
    assert command["DocumentName"] == "trainctl-checkpoint"
    assert command["InstanceIds"] == [env.instance_id]
    assert command["Parameters"] == {
        "JobId": [env.job_id],
        "Deadline": ["2026-12-03T12:02:00.000Z"],
        "Mode": ["stop"],  # the training process ends after this checkpoint
    }
    # ... the loss is recorded on the job row ...
    job = env.store.get(env.job_id)
    assert job.status == JobStatus.INTERRUPTED
    [record] = job.interruptions
    assert (record.instance_id, record.attempt, record.reason) == (
        env.instance_id,
        0,
        InterruptionReason.SPOT_WARNING,
    )
    assert record.event_id == event["id"]
    # ... and exactly one resume execution runs, named after job and attempt.
    [execution] = env.executions()
    assert execution["name"] == f"{env.job_id}-0"
    document = env.execution_input(f"{env.job_id}-0")
    assert document["reason"] == "spot-warning"
    assert document["instance_id"] == env.instance_id
    assert document["deadline"] == "2026-12-03T12:02:00.000Z"
    # (That sample's notice ran out long ago: the handshake still gets its minimum.)
    assert document["handshake_timeout_seconds"] == 1


def test_the_handshake_waits_for_what_is_left_of_the_notice(env, interruption, context, event_loader):
    # Given a warning EC2 sent 5 s ago (its deadline is 115 s away)
    from datetime import datetime, timedelta

    env.add_job()
    event = event_loader("spot_interruption_warning", time=recent(5))

    deliver(interruption, event, context)

    # Then the row says when EC2 noticed and when trainctl recorded it, and the workflow
    # waits for the final checkpoint exactly as long as the notice lasts from then on
    [record] = env.store.get(env.job_id).interruptions
    noticed = datetime.fromisoformat(event["time"])
    assert record.noticed_at == noticed
    assert record.deadline == noticed + timedelta(seconds=120)
    assert record.recorded_at is not None and record.recorded_at >= noticed
    document = env.execution_input(f"{env.job_id}-0")
    left = record.deadline - record.recorded_at
    assert document["handshake_timeout_seconds"] == int(left.total_seconds())
    assert 0 < document["handshake_timeout_seconds"] <= 115


def test_same_warning_delivered_three_times_acts_once(env, interruption, context, event_loader):
    env.add_job()
    event = event_loader("spot_interruption_warning")

    responses = [deliver(interruption, event, context) for _ in range(3)]

    assert responses[0] == responses[1] == responses[2]
    assert len(env.ssm_commands()) == 1
    assert len(env.executions()) == 1
    assert len(env.store.get(env.job_id).interruptions) == 1


def test_redelivery_with_a_new_event_id_still_acts_once(env, interruption, context, event_loader):
    # EventBridge retries keep the id, but a replayed archive gives new ids: the domain
    # key (job, instance, attempt) must hold on its own.
    env.add_job()
    deliver(interruption, event_loader("spot_interruption_warning"), context)
    replay = event_loader("spot_interruption_warning", id="99999999-1234-1234-1234-123456789012")

    response = deliver(interruption, replay, context)

    assert response["outcome"] == "resume_started"
    assert response["interruption_recorded"] is False
    assert response["execution_started"] is False
    assert len(env.ssm_commands()) == 1
    assert len(env.executions()) == 1


def test_warning_for_unmanaged_instance_is_ignored(env, interruption, context, event_loader):
    env.add_job(instance_id="i-0aaaaaaaaaaaaaaaa")
    event = event_loader("spot_interruption_warning")

    response = deliver(interruption, event, context)

    assert response["outcome"] == "ignored_unmanaged"
    assert env.ssm_commands() == []
    assert env.executions() == []
    assert env.store.get(env.job_id).status == JobStatus.RUNNING


@pytest.mark.parametrize("status", [JobStatus.SUCCEEDED, JobStatus.CANCELLED, JobStatus.FAILED])
def test_warning_for_ended_job_changes_nothing(env, interruption, context, event_loader, status):
    before = env.add_job(status=status)

    response = deliver(interruption, event_loader("spot_interruption_warning"), context)

    assert response["outcome"] == "ignored_terminal"
    assert env.ssm_commands() == []
    assert env.executions() == []
    after = env.store.get(env.job_id)
    assert (after.status, after.version) == (before.status, before.version)


def test_warning_for_a_launching_replacement_is_a_loss_too(env, interruption, context, event_loader):
    env.add_job(status=JobStatus.LAUNCHING)

    response = deliver(interruption, event_loader("spot_interruption_warning"), context)

    assert response["outcome"] == "resume_started"
    assert env.store.get(env.job_id).status == JobStatus.INTERRUPTED


@pytest.mark.parametrize(
    "broken",
    [
        {"detail": {"instance-action": "terminate"}},  # no instance id
        {"detail": {"instance-id": "not-an-instance", "instance-action": "terminate"}},
        {"detail": {"instance-id": "i-1234567890abcdef0", "instance-action": "explode"}},
        {"time": "yesterday"},
        {"source": "my.app"},
    ],
)
def test_malformed_warning_raises_and_touches_nothing(env, interruption, context, event_loader, broken):
    before = env.add_job()
    event = {**event_loader("spot_interruption_warning"), **broken}

    with pytest.raises(MalformedEvent) as info:
        deliver(interruption, event, context)

    assert "malformed" in str(info.value)
    assert env.ssm_commands() == []
    assert env.executions() == []
    assert env.store.get(env.job_id).version == before.version


def ssm_error(code: str) -> Exception:
    """An SSM error as moto serialises it (the class must live in moto's SSM module)."""
    from moto.ssm.exceptions import SSMException

    error = type(code, (SSMException,), {"__module__": SSMException.__module__, "code": code})
    return error(code, f"simulated {code}")


def test_ssm_failure_does_not_stop_the_resume(env, interruption, context, event_loader, monkeypatch):
    # Given the instance cannot receive commands any more (already gone)
    from moto.ssm.models import SimpleSystemManagerBackend

    def gone(self: Any, **kwargs: Any) -> Any:
        raise ssm_error("InvalidInstanceId")

    monkeypatch.setattr(SimpleSystemManagerBackend, "send_command", gone)
    env.add_job()

    response = deliver(interruption, event_loader("spot_interruption_warning"), context)

    # Then the loss is still recorded and the workflow (which falls back to the newest
    # periodic checkpoint when the handshake times out) still starts.
    assert response["checkpoint_requested"] is False
    assert response["outcome"] == "resume_started"
    assert env.store.get(env.job_id).status == JobStatus.INTERRUPTED
    assert len(env.executions()) == 1


def test_a_refused_checkpoint_request_does_not_stop_the_resume(
    env, interruption, context, event_loader, monkeypatch, caplog
):
    # Given SSM refuses the command (a permissions problem: it repeats on every try)
    from moto.ssm.models import SimpleSystemManagerBackend

    def denied(self: Any, **kwargs: Any) -> Any:
        raise ssm_error("AccessDeniedException")

    monkeypatch.setattr(SimpleSystemManagerBackend, "send_command", denied)
    env.add_job()

    # When the warning arrives
    response = deliver(interruption, event_loader("spot_interruption_warning", time=recent()), context)

    # Then the loss is recorded and the resume starts anyway, without a retry (it could
    # not help), and the refusal is logged as an error for a human to fix
    assert response["outcome"] == "resume_started"
    assert (response["checkpoint_requested"], response["interruption_recorded"]) == (False, True)
    assert response["execution_started"] is True
    assert "AccessDeniedException" in response["checkpoint_error"]
    job = env.store.get(env.job_id)
    assert job.status == JobStatus.INTERRUPTED
    assert job.interruptions[0].checkpoint_requested is False
    assert [e["name"] for e in env.executions()] == [f"{env.job_id}-0"]
    [logged] = [r for r in caplog.records if r.getMessage().startswith("checkpoint request not delivered")]
    assert (logged.levelname, logged.code, logged.retryable) == ("ERROR", "AccessDeniedException", False)


@pytest.fixture
def no_backoff(monkeypatch: pytest.MonkeyPatch) -> None:
    """botocore retries throttling a few times with jittered backoff: skip the sleeps."""
    from botocore.retries.standard import ExponentialBackoff

    monkeypatch.setattr(ExponentialBackoff, "delay_amount", lambda self, context: 0)


def test_a_throttled_checkpoint_request_records_resumes_then_retries(
    env, interruption, context, event_loader, monkeypatch, no_backoff
):
    # Given SSM throttles every send (botocore's own retries included)
    from moto.ssm.models import SimpleSystemManagerBackend

    original = SimpleSystemManagerBackend.send_command

    def throttled(self: Any, **kwargs: Any) -> Any:
        raise ssm_error("ThrottlingException")

    monkeypatch.setattr(SimpleSystemManagerBackend, "send_command", throttled)
    env.add_job()
    event = event_loader("spot_interruption_warning", time=recent())

    # When the warning arrives, the invocation fails so that Lambda retries it ...
    with pytest.raises(CheckpointRequestFailed, match="ThrottlingException") as info:
        deliver(interruption, event, context)
    assert info.value.retryable
    # ... but only after the loss was recorded and the resume started
    job = env.store.get(env.job_id)
    assert job.status == JobStatus.INTERRUPTED
    assert job.interruptions[0].checkpoint_requested is False
    assert [e["name"] for e in env.executions()] == [f"{env.job_id}-0"]
    assert env.ssm_commands() == []

    # When Lambda retries the event and SSM answers again
    monkeypatch.setattr(SimpleSystemManagerBackend, "send_command", original)
    response = deliver(interruption, event, context)

    # Then the checkpoint request goes out, and nothing else happens twice
    assert response["outcome"] == "resume_started"
    assert response["checkpoint_requested"] is True
    assert (response["interruption_recorded"], response["execution_started"]) == (False, False)
    [command] = env.ssm_commands()
    assert command["InstanceIds"] == [env.instance_id]
    assert len(env.executions()) == 1
    assert len(env.store.get(env.job_id).interruptions) == 1


def test_a_throttled_request_after_the_notice_ran_out_is_not_retried(
    env, interruption, context, event_loader, monkeypatch, no_backoff
):
    # Given a warning older than the two-minute notice (the instance is gone by now)
    from moto.ssm.models import SimpleSystemManagerBackend

    def throttled(self: Any, **kwargs: Any) -> Any:
        raise ssm_error("ThrottlingException")

    monkeypatch.setattr(SimpleSystemManagerBackend, "send_command", throttled)
    env.add_job()

    response = deliver(interruption, event_loader("spot_interruption_warning", time=recent(180)), context)

    # Then there is nothing a retry could deliver: the handler succeeds
    assert response["outcome"] == "resume_started" and response["execution_started"] is True
    assert "ThrottlingException" in response["checkpoint_error"]
    assert env.store.get(env.job_id).status == JobStatus.INTERRUPTED


# --- rebalance recommendation ------------------------------------------------------------


def test_rebalance_asks_for_a_checkpoint_only(env, interruption, context, event_loader):
    env.add_job()

    response = deliver(interruption, event_loader("rebalance_recommendation"), context)

    assert response["outcome"] == "checkpoint_requested"
    [command] = env.ssm_commands()
    assert command["InstanceIds"] == [env.instance_id]
    # Checkpoint and keep training: the Spot warning may never come.
    assert command["Parameters"]["Mode"] == ["continue"]
    assert env.executions() == []
    assert env.store.get(env.job_id).status == JobStatus.RUNNING


def test_rebalance_with_migrate_policy_resumes_early(env, interruption, context, event_loader):
    env.add_job(on_rebalance="migrate")

    response = deliver(interruption, event_loader("rebalance_recommendation"), context)

    assert response["outcome"] == "resume_started"
    [command] = env.ssm_commands()
    assert command["Parameters"]["Mode"] == ["stop"]  # migrating: the final checkpoint
    assert env.execution_input(f"{env.job_id}-0")["reason"] == "rebalance-migrate"
    assert env.store.get(env.job_id).interruptions[0].reason == InterruptionReason.REBALANCE_MIGRATE


def test_rebalance_then_warning_checkpoints_twice_resumes_once(env, interruption, context, event_loader):
    env.add_job()
    deliver(interruption, event_loader("rebalance_recommendation"), context)

    response = deliver(interruption, event_loader("spot_interruption_warning"), context)

    assert response["outcome"] == "resume_started"
    # Checkpoint on the risk (training goes on), final checkpoint on the notice.
    assert [c["Parameters"]["Mode"] for c in env.ssm_commands()] == [["continue"], ["stop"]]
    assert len(env.executions()) == 1


# --- instance state change ----------------------------------------------------------------


@pytest.mark.parametrize("event_name", ["instance_state_terminated", "instance_state_shutting_down"])
def test_loss_without_notice_resumes_from_periodic_checkpoint(
    env, instance_state, context, event_loader, event_name
):
    env.add_job()

    response = deliver(instance_state, event_loader(event_name), context)

    assert response["outcome"] == "resume_started"
    assert env.ssm_commands() == []  # nobody left to checkpoint
    job = env.store.get(env.job_id)
    assert job.status == JobStatus.INTERRUPTED
    assert job.interruptions[0].reason == InterruptionReason.TERMINATED_WITHOUT_NOTICE
    document = env.execution_input(f"{env.job_id}-0")
    assert document["reason"] == "terminated-without-notice"
    assert document["deadline"] is None


def test_state_change_that_is_not_a_loss_is_a_no_op(env, instance_state, context, event_loader):
    before = env.add_job()

    response = deliver(instance_state, event_loader("instance_state_running"), context)

    assert response["outcome"] == "ignored_not_a_loss"
    assert env.executions() == []
    assert env.store.get(env.job_id).version == before.version


def test_state_change_of_unmanaged_instance_is_ignored(env, instance_state, context, event_loader):
    response = deliver(instance_state, event_loader("instance_state_terminated"), context)

    assert response["outcome"] == "ignored_unmanaged"
    assert env.executions() == []


def test_malformed_state_change_raises(env, instance_state, context, event_loader):
    event = event_loader("instance_state_terminated")
    event["detail"]["state"] = "vanished"

    with pytest.raises(MalformedEvent):
        deliver(instance_state, event, context)


# --- the same loss reported by several signals, in any order ---------------------------


@pytest.mark.parametrize("order", ["warning-first", "state-change-first"])
def test_warning_and_state_change_for_one_loss_act_once(
    env, interruption, instance_state, context, event_loader, order
):
    env.add_job()
    warning = (interruption, event_loader("spot_interruption_warning"))
    terminated = (instance_state, event_loader("instance_state_terminated"))
    sequence = [warning, terminated] if order == "warning-first" else [terminated, warning]

    for module, event in sequence:
        deliver(module, event, context)

    assert len(env.ssm_commands()) == 1
    assert len(env.executions()) == 1
    job = env.store.get(env.job_id)
    assert job.status == JobStatus.INTERRUPTED
    assert len(job.interruptions) == 1
    # Whoever recorded the loss first decides the workflow's reason.
    expected = "spot-warning" if order == "warning-first" else "terminated-without-notice"
    assert env.execution_input(f"{env.job_id}-0")["reason"] == expected


def test_late_event_about_a_replaced_instance_is_a_stale_attempt(
    env, interruption, instance_state, context, event_loader, capsys
):
    # Given the job already moved on to a replacement (attempt 1 on another instance)
    from trainctl_core import jobs

    job = env.add_job()
    deliver(interruption, event_loader("spot_interruption_warning"), context)
    job = env.store.get(env.job_id)
    env.store.apply(
        jobs.mark_launching(
            job,
            instance_id="i-0bbbbbbbbbbbbbbbb",
            pool="g5.xlarge@subnet-0bbb2222",
            resume_point=jobs.ResumePoint(kind=jobs.CheckpointKind.NONE),
            now=jobs.utcnow(),
        )
    )

    # When a late state-change about the old instance arrives
    late = event_loader("instance_state_terminated")

    response = deliver(instance_state, late, context)

    # Then it is recognised as the job's replaced attempt 0 (not an unmanaged instance),
    # counted as such, and nothing about the new attempt changes
    assert (response["outcome"], response["job_id"], response["attempt"]) == ("ignored_stale", env.job_id, 0)
    documents = emitted_metrics(capsys.readouterr().out)
    assert metric_total(documents, "UnmanagedInstanceEvents") == 0
    assert [d["outcome"] for d in documents if d.get("Events")] == ["resume_started", "ignored_stale"]
    after = env.store.get(env.job_id)
    assert (after.status, after.attempt, after.instance_id) == (
        JobStatus.LAUNCHING,
        1,
        "i-0bbbbbbbbbbbbbbbb",
    )
    assert len(env.executions()) == 1


def test_concurrent_duplicate_deliveries_have_one_winner(
    env, interruption, context, event_loader, serialized_moto
):
    env.add_job()
    event = event_loader("spot_interruption_warning")
    outcomes: list[str] = []
    errors: list[BaseException] = []
    barrier = threading.Barrier(8)

    def worker() -> None:
        barrier.wait()
        try:
            outcomes.append(deliver(interruption, event, context)["outcome"])
        except IdempotencyAlreadyInProgressError as exc:
            errors.append(exc)  # Lambda would retry these and get the stored result

    threads = [threading.Thread(target=worker) for _ in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()

    assert len(outcomes) + len(errors) == 8
    assert outcomes and set(outcomes) == {"resume_started"}
    assert len(env.ssm_commands()) == 1
    assert len(env.executions()) == 1
    assert len(env.store.get(env.job_id).interruptions) == 1


# --- gaps in issue 2's list: every event type redelivered, ended jobs, metrics ----------


def emitted_metrics(captured: str) -> list[dict[str, Any]]:
    """The EMF documents Powertools printed (one JSON object per flushed invocation)."""
    import json

    documents = []
    for line in captured.splitlines():
        if line.startswith("{") and '"_aws"' in line:
            documents.append(json.loads(line))
    return documents


def metric_total(documents: list[dict[str, Any]], name: str) -> float:
    total = 0.0
    for document in documents:
        value = document.get(name)
        if value is not None:
            total += sum(value) if isinstance(value, list) else value
    return total


@pytest.mark.parametrize(
    ("handler", "event_name", "ssm_commands", "executions"),
    [
        ("instance_state", "instance_state_terminated", 0, 1),
        ("instance_state", "instance_state_shutting_down", 0, 1),
        ("interruption", "rebalance_recommendation", 1, 0),
    ],
)
def test_every_event_type_delivered_three_times_acts_once(
    env, request, context, event_loader, handler, event_name, ssm_commands, executions
):
    # Given a RUNNING job and the same event (same id) delivered three times
    before = env.add_job()
    module = request.getfixturevalue(handler)
    event = event_loader(event_name)

    responses = [deliver(module, event, context) for _ in range(3)]

    # Then the stored result is replayed, and AWS saw one action
    assert responses[0] == responses[1] == responses[2]
    assert len(env.ssm_commands()) == ssm_commands
    assert len(env.executions()) == executions
    after = env.store.get(env.job_id)
    assert len(after.interruptions) == executions
    assert after.version == before.version + executions


@pytest.mark.parametrize("status", [JobStatus.SUCCEEDED, JobStatus.CANCELLED, JobStatus.FAILED])
@pytest.mark.parametrize(
    ("handler", "event_name"),
    [("instance_state", "instance_state_terminated"), ("interruption", "rebalance_recommendation")],
)
def test_other_events_for_an_ended_job_change_nothing(
    env, request, context, event_loader, status, handler, event_name
):
    # The instance of an ended job is terminated by trainctl itself: its state change
    # (and any late rebalance) must not resurrect the job.
    before = env.add_job(status=status)

    response = deliver(request.getfixturevalue(handler), event_loader(event_name), context)

    assert response["outcome"] == "ignored_terminal"
    assert env.ssm_commands() == [] and env.executions() == []
    after = env.store.get(env.job_id)
    assert (after.status, after.version) == (before.status, before.version)


def test_rebalance_for_unmanaged_instance_is_ignored(env, interruption, context, event_loader):
    response = deliver(interruption, event_loader("rebalance_recommendation"), context)

    assert response["outcome"] == "ignored_unmanaged"
    assert env.ssm_commands() == []


@pytest.mark.parametrize("detail", [{}, {"instance-id": "i-XYZ"}])
def test_malformed_rebalance_raises_and_touches_nothing(env, interruption, context, event_loader, detail):
    env.add_job()
    event = {**event_loader("rebalance_recommendation"), "detail": detail}

    with pytest.raises(MalformedEvent):
        deliver(interruption, event, context)
    assert env.ssm_commands() == []


def test_late_events_about_the_last_instance_of_an_ended_job_are_terminal_not_unmanaged(
    env, interruption, instance_state, context, event_loader, capsys
):
    # Given a job whose attempt 0 was lost, then cancelled while its replacement launched
    from trainctl_core import jobs

    env.add_job()
    deliver(interruption, event_loader("spot_interruption_warning"), context)
    job = env.store.get(env.job_id)
    job = env.store.apply(
        jobs.mark_launching(
            job,
            instance_id="i-0bbbbbbbbbbbbbbbb",
            pool="g5.xlarge@subnet-0bbb2222",
            resume_point=jobs.ResumePoint(kind=jobs.CheckpointKind.NONE),
            now=jobs.utcnow(),
        )
    )
    env.store.apply(jobs.mark_cancelled(job, now=jobs.utcnow()))
    capsys.readouterr()

    # When the old instance's termination arrives late
    response = deliver(instance_state, event_loader("instance_state_terminated"), context)

    # Then it is the ended job's, counted under that outcome
    outcome = (response["outcome"], response["job_id"], response["attempt"])
    assert outcome == ("ignored_terminal", env.job_id, 0)
    documents = emitted_metrics(capsys.readouterr().out)
    assert [d["outcome"] for d in documents] == ["ignored_terminal"]
    assert metric_total(documents, "UnmanagedInstanceEvents") == 0
    assert env.store.get(env.job_id).status == JobStatus.CANCELLED


def test_unmanaged_instance_is_counted(env, interruption, context, event_loader, capsys):
    deliver(interruption, event_loader("spot_interruption_warning"), context)

    documents = emitted_metrics(capsys.readouterr().out)
    assert metric_total(documents, "UnmanagedInstanceEvents") == 1
    assert metric_total(documents, "Events") == 1
    assert {d.get("outcome") for d in documents} == {"ignored_unmanaged"}
    assert metric_total(documents, "ResumesStarted") == 0


def test_recovery_metrics_count_one_loss_once(
    env, interruption, instance_state, context, event_loader, capsys
):
    env.add_job()

    deliver(interruption, event_loader("spot_interruption_warning"), context)
    deliver(instance_state, event_loader("instance_state_terminated"), context)

    documents = emitted_metrics(capsys.readouterr().out)
    assert metric_total(documents, "Events") == 2
    assert metric_total(documents, "Interruptions") == 1
    assert metric_total(documents, "ResumesStarted") == 1
    assert metric_total(documents, "CheckpointRequests") == 1


def test_ssm_failure_is_counted(env, interruption, context, event_loader, monkeypatch, capsys):
    from moto.ssm.models import SimpleSystemManagerBackend

    def gone(self: Any, **kwargs: Any) -> Any:
        raise ssm_error("InvalidInstanceId")

    monkeypatch.setattr(SimpleSystemManagerBackend, "send_command", gone)
    env.add_job()

    deliver(interruption, event_loader("spot_interruption_warning"), context)

    documents = emitted_metrics(capsys.readouterr().out)
    assert metric_total(documents, "CheckpointSignalFailures") == 1
    assert metric_total(documents, "CheckpointRequests") == 0
    assert metric_total(documents, "ResumesStarted") == 1


def test_malformed_event_is_counted(env, interruption, context, event_loader, capsys):
    event = event_loader("spot_interruption_warning")
    event["detail"]["instance-action"] = "explode"

    with pytest.raises(MalformedEvent):
        deliver(interruption, event, context)

    assert metric_total(emitted_metrics(capsys.readouterr().out), "RejectedEvents") == 1


def test_concurrent_warnings_and_state_changes_for_one_loss_have_one_winner(
    env, interruption, instance_state, context, event_loader, serialized_moto
):
    # Given one loss reported by 8 concurrent deliveries: the warning delivered 4 times
    # (same id: event-id idempotency) and 4 state changes with distinct ids (a replayed
    # archive: only the domain key (job, instance, attempt) can deduplicate them)
    env.add_job()
    warning = event_loader("spot_interruption_warning")
    deliveries = [(interruption, warning)] * 4 + [
        (instance_state, event_loader("instance_state_terminated", id=f"bbbbbbbb-0000-0000-0000-{n:012d}"))
        for n in range(4)
    ]
    responses: list[tuple[str, dict[str, Any]]] = []
    in_progress: list[BaseException] = []
    failures: list[BaseException] = []
    barrier = threading.Barrier(len(deliveries))

    def worker(module: Any, event: dict[str, Any]) -> None:
        barrier.wait()
        try:
            responses.append((event["id"], deliver(module, event, context)))
        except IdempotencyAlreadyInProgressError as exc:
            in_progress.append(exc)  # Lambda retries these and gets the stored result
        except BaseException as exc:
            failures.append(exc)

    threads = [threading.Thread(target=worker, args=pair) for pair in deliveries]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()

    # Then nothing fails, exactly one delivery records the loss and starts the resume,
    # and exactly one checkpoint request goes out (only the warning sends one)
    assert failures == []
    assert len(responses) + len(in_progress) == 8
    assert len(in_progress) <= 3  # only same-id warnings can collide
    # A replayed warning returns the stored response: count each event once.
    by_event = dict(responses)
    assert len(by_event) == 5
    assert {r["outcome"] for r in by_event.values()} == {"resume_started"}
    assert sum(r["interruption_recorded"] for r in by_event.values()) == 1
    assert sum(r["execution_started"] for r in by_event.values()) == 1
    job = env.store.get(env.job_id)
    assert job.status == JobStatus.INTERRUPTED and len(job.interruptions) == 1
    assert len(env.executions()) == 1
    assert len(env.ssm_commands()) == 1


def log_records(caplog: Any, message: str) -> list[Any]:
    return [r for r in caplog.records if r.getMessage() == message]


def test_each_error_outcome_has_a_clear_log_line_with_ids(
    env, interruption, context, event_loader, monkeypatch, caplog
):
    from moto.ssm.models import SimpleSystemManagerBackend

    caplog.set_level("INFO")
    # an unmanaged instance: info, with the instance id
    deliver(interruption, event_loader("spot_interruption_warning"), context)
    (unmanaged,) = log_records(caplog, "ec2 event handled")
    assert (unmanaged.levelname, unmanaged.outcome, unmanaged.instance_id) == (
        "INFO",
        "ignored_unmanaged",
        env.instance_id,
    )
    caplog.clear()

    # a malformed event: error, with the event id and the problem
    broken = event_loader("spot_interruption_warning", id="cccccccc-0000-0000-0000-000000000001")
    broken["detail"]["instance-id"] = "nope"
    with pytest.raises(MalformedEvent):
        deliver(interruption, broken, context)
    (rejected,) = log_records(caplog, "malformed ec2 event")
    assert rejected.levelname == "ERROR"
    assert rejected.event_id == broken["id"] and "instance-id" in rejected.problem
    caplog.clear()

    # SSM cannot reach the instance: warning naming job and instance, then the resume
    def gone(self: Any, **kwargs: Any) -> Any:
        raise ssm_error("InvalidInstanceId")

    monkeypatch.setattr(SimpleSystemManagerBackend, "send_command", gone)
    env.add_job()
    deliver(
        interruption,
        event_loader("spot_interruption_warning", id="cccccccc-0000-0000-0000-000000000002"),
        context,
    )
    (undelivered,) = [
        r for r in caplog.records if r.getMessage().startswith("checkpoint request not delivered")
    ]
    assert undelivered.levelname == "WARNING"
    assert (undelivered.job_id, undelivered.instance_id) == (env.job_id, env.instance_id)
    assert "InvalidInstanceId" in undelivered.error
    (handled,) = log_records(caplog, "ec2 event handled")
    assert (handled.outcome, handled.job_id, handled.attempt) == ("resume_started", env.job_id, 0)
