"""boto3 clients, created once per process and injectable.

Handlers build their adapters from these at module scope (reused across warm
invocations); tests and the offline rehearsal pass their own clients instead. Endpoints
come from the standard AWS variables (`AWS_ENDPOINT_URL`, per-service overrides), so
pointing a process at moto needs no trainctl-specific setting.
"""

from __future__ import annotations

from functools import cache
from typing import Any

import boto3
from botocore.config import Config

# Fail fast inside a 2-minute notice: short connect/read timeouts, standard retry mode
# (botocore's own retries; we add none on top).
_CONFIG = Config(
    connect_timeout=3,
    read_timeout=10,
    retries={"max_attempts": 4, "mode": "standard"},
)


@cache
def client(service: str, region_name: str | None = None) -> Any:
    """A cached boto3 client for `service` (one per service and region per process)."""
    # The service name is dynamic here; call sites annotate the client type they expect.
    return boto3.session.Session().client(service, region_name=region_name, config=_CONFIG)  # type: ignore[call-overload]


def reset() -> None:
    """Forget cached clients (tests that switch endpoints or credentials)."""
    client.cache_clear()
