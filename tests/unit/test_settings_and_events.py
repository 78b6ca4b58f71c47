"""Settings fail at cold start naming the variable; event models accept every documented
shape in tests/events and refuse malformed details."""

from __future__ import annotations

import json
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest
from aws_lambda_powertools.utilities.parser import ValidationError, parse

from trainctl_core import events, settings
from trainctl_core.settings import Settings, SettingsError

EVENTS = Path(__file__).parents[1] / "events"
COMPLETE = {
    settings.ENV_JOBS_TABLE: "trainctl-jobs",
    settings.ENV_IDEMPOTENCY_TABLE: "trainctl-idempotency",
    settings.ENV_CHECKPOINT_DOCUMENT: "trainctl-checkpoint",
    settings.ENV_RESUME_STATE_MACHINE_ARN: "arn:aws:states:us-east-1:123456789012:stateMachine:resume",
}


# --- settings --------------------------------------------------------------------------------


def test_complete_environment_gives_settings_with_the_spot_notice_default() -> None:
    loaded = Settings.from_environ(COMPLETE)
    assert loaded.jobs_table == "trainctl-jobs"
    assert loaded.resume_state_machine_arn.endswith(":stateMachine:resume")
    assert loaded.notice_seconds == 120


@pytest.mark.parametrize("name", list(COMPLETE))
def test_a_missing_variable_is_named(name: str) -> None:
    environ = {k: v for k, v in COMPLETE.items() if k != name}
    with pytest.raises(SettingsError) as info:
        Settings.from_environ(environ)
    assert name in str(info.value)
    # ... and only that one: the message points at the one thing to fix
    assert all(other not in str(info.value) for other in COMPLETE if other != name)


@pytest.mark.parametrize("name", list(COMPLETE))
def test_an_empty_variable_is_named(name: str) -> None:
    with pytest.raises(SettingsError, match=name):
        Settings.from_environ({**COMPLETE, name: ""})


@pytest.mark.parametrize("value", ["0", "-5", "two minutes"])
def test_an_invalid_notice_period_is_named(value: str) -> None:
    with pytest.raises(SettingsError, match=settings.ENV_NOTICE_SECONDS):
        Settings.from_environ({**COMPLETE, settings.ENV_NOTICE_SECONDS: value})


def test_several_problems_are_all_reported() -> None:
    with pytest.raises(SettingsError) as info:
        Settings.from_environ({})
    assert all(name in str(info.value) for name in COMPLETE)


def test_settings_are_read_once_per_process(monkeypatch: pytest.MonkeyPatch) -> None:
    for name, value in COMPLETE.items():
        monkeypatch.setenv(name, value)
    settings.get_settings.cache_clear()
    try:
        first = settings.get_settings()
        monkeypatch.setenv(settings.ENV_JOBS_TABLE, "changed-later")
        assert settings.get_settings() is first
        assert first.jobs_table == "trainctl-jobs"
    finally:
        settings.get_settings.cache_clear()


# --- events: every documented shape parses ------------------------------------------------------


def load(name: str) -> dict[str, Any]:
    event: dict[str, Any] = json.loads((EVENTS / f"{name}.json").read_text())
    return event


MODELS: dict[str, type[Any]] = {
    "spot_interruption_warning": events.SpotInterruptionEvent,
    "rebalance_recommendation": events.RebalanceEvent,
    "instance_state_running": events.StateChangeEvent,
    "instance_state_shutting_down": events.StateChangeEvent,
    "instance_state_terminated": events.StateChangeEvent,
}


def test_every_sample_event_has_a_model() -> None:
    assert {p.stem for p in EVENTS.glob("*.json")} == set(MODELS)


@pytest.mark.parametrize("name", list(MODELS))
def test_each_sample_parses_into_its_model(name: str) -> None:
    raw = load(name)

    parsed = parse(event=raw, model=MODELS[name])

    assert parsed.id == raw["id"]
    assert parsed.detail.instance_id == raw["detail"]["instance-id"]
    assert parsed.time.tzinfo is not None


@pytest.mark.parametrize("name", list(MODELS))
def test_each_sample_is_refused_by_the_other_models(name: str) -> None:
    # A handler subscribed to one event type must never mistake another for it.
    for other in {m for m in MODELS.values() if m is not MODELS[name]}:
        with pytest.raises(ValidationError):
            parse(event=load(name), model=other)


def test_warning_carries_action_and_deadline() -> None:
    warning = parse(event=load("spot_interruption_warning"), model=events.SpotInterruptionEvent)
    assert warning.detail.instance_action == "terminate"
    assert warning.deadline(120) == datetime(2026, 12, 3, 12, 2, tzinfo=UTC)


@pytest.mark.parametrize(
    ("state", "is_loss"),
    [
        ("pending", False),
        ("running", False),
        ("stopping", False),  # a stop without a Spot warning is the user's own doing
        ("stopped", False),
        ("shutting-down", True),
        ("terminated", True),
    ],
)
def test_only_shutting_down_and_terminated_are_losses(state: str, is_loss: bool) -> None:
    event = load("instance_state_terminated")
    event["detail"]["state"] = state
    assert parse(event=event, model=events.StateChangeEvent).is_loss is is_loss
    # ... and the deployed rule only lets losses reach the handler at all
    assert (state in events.rule_patterns()["InstanceStateChange"]["detail"]["state"]) is is_loss  # type: ignore[index,operator]


# --- events: malformed details are refused ------------------------------------------------------


@pytest.mark.parametrize(
    ("name", "detail", "field"),
    [
        ("spot_interruption_warning", {"instance-action": "terminate"}, "instance-id"),
        (
            "spot_interruption_warning",
            {"instance-id": "i-123", "instance-action": "terminate"},
            "instance-id",
        ),
        (
            "spot_interruption_warning",
            {"instance-id": "i-1234567890abcdef0", "instance-action": "reboot"},
            "instance-action",
        ),
        ("spot_interruption_warning", {"instance-id": "i-1234567890abcdef0"}, "instance-action"),
        ("rebalance_recommendation", {}, "instance-id"),
        ("rebalance_recommendation", {"instance-id": "I-1234567890ABCDEF0"}, "instance-id"),
        ("instance_state_terminated", {"instance-id": "i-1234567890abcdef0", "state": "vanished"}, "state"),
        ("instance_state_terminated", {"instance-id": "i-1234567890abcdef0"}, "state"),
        ("instance_state_terminated", {"instance-id": None, "state": "terminated"}, "instance-id"),
    ],
)
def test_malformed_details_are_refused_naming_the_field(
    name: str, detail: dict[str, Any], field: str
) -> None:
    event = {**load(name), "detail": detail}
    with pytest.raises(ValidationError) as info:
        parse(event=event, model=MODELS[name])
    assert field in str(info.value)


@pytest.mark.parametrize(
    "change",
    [
        {"source": "my.app"},
        {"time": "yesterday"},
        {"detail": "not an object"},
        {"detail-type": "EC2 Instance Launch Successful"},
    ],
)
def test_malformed_envelopes_are_refused(change: dict[str, Any]) -> None:
    with pytest.raises(ValidationError):
        parse(event={**load("spot_interruption_warning"), **change}, model=events.SpotInterruptionEvent)


@pytest.mark.parametrize("missing", ["id", "time", "detail", "source"])
def test_envelopes_missing_a_required_field_are_refused(missing: str) -> None:
    event = {k: v for k, v in load("instance_state_terminated").items() if k != missing}
    with pytest.raises(ValidationError):
        parse(event=event, model=events.StateChangeEvent)
