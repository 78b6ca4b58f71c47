"""Test-session defaults: never reach real AWS, keep Powertools quiet and offline."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import pytest

# Set before any test module imports boto3 or a handler: fake credentials and a region
# mean a forgotten mock fails on moto's side, never against a real account.
for name, value in {
    "AWS_ACCESS_KEY_ID": "testing",
    "AWS_SECRET_ACCESS_KEY": "testing",
    "AWS_SECURITY_TOKEN": "testing",
    "AWS_SESSION_TOKEN": "testing",
    "AWS_DEFAULT_REGION": "us-east-1",
    "AWS_REGION": "us-east-1",
    "POWERTOOLS_TRACE_DISABLED": "1",
    "POWERTOOLS_METRICS_NAMESPACE": "trainctl",
    "POWERTOOLS_SERVICE_NAME": "trainctl",
    "MOTO_EC2_LOAD_DEFAULT_AMIS": "false",
    "JSII_SILENCE_WARNING_END_OF_LIFE_NODE_VERSION": "20",
    "CDK_DISABLE_VERSION_CHECK": "1",
}.items():
    os.environ[name] = value
for name in ("AWS_PROFILE", "AWS_ENDPOINT_URL", "AWS_EC2_METADATA_SERVICE_ENDPOINT"):
    os.environ.pop(name, None)

EVENTS_DIR = Path(__file__).parent / "events"


def load_event(name: str, **overrides: Any) -> dict[str, Any]:
    """A real EC2 event shape from tests/events, with top-level or detail overrides."""
    event = json.loads((EVENTS_DIR / f"{name}.json").read_text())
    for key, value in overrides.items():
        if key in event["detail"]:
            event["detail"][key] = value
        else:
            event[key] = value
    return event


@pytest.fixture
def event_loader():
    return load_event
