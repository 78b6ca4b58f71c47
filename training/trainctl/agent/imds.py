"""IMDSv2: the on-instance backup signal (the SSM document is the fast path).

Paths (IMDSv2 session token first, then GETs carrying it):
  PUT /latest/api/token                                 X-aws-ec2-metadata-token-ttl-seconds
  GET /latest/meta-data/instance-id
  GET /latest/meta-data/spot/instance-action            404 until a notice:
                                                        {"action": "terminate|stop|hibernate",
                                                         "time": "2025-01-01T00:02:00Z"}
  GET /latest/meta-data/events/recommendations/rebalance  404 until: {"noticeTime": "..."}
  GET /latest/meta-data/tags/instance/<key>             (instance tags in metadata enabled)
  GET /latest/meta-data/instance-type, placement/availability-zone, instance-life-cycle
                                                        (what the instance costs)

The base URL is the standard `AWS_EC2_METADATA_SERVICE_ENDPOINT` (default
http://169.254.169.254), so the offline rehearsal points each fake instance at its own
fake IMDS. Off EC2 the endpoint does not answer: calls fail fast and the agent carries on
with SSM signals alone.
"""

from __future__ import annotations

import json
import logging
import os
import urllib.error
import urllib.request
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import datetime

logger = logging.getLogger("trainctl.agent.imds")

DEFAULT_ENDPOINT = "http://169.254.169.254"
ENDPOINT_ENV = "AWS_EC2_METADATA_SERVICE_ENDPOINT"
TOKEN_PATH = "/latest/api/token"
TOKEN_TTL_HEADER = "X-aws-ec2-metadata-token-ttl-seconds"
TOKEN_HEADER = "X-aws-ec2-metadata-token"
INSTANCE_ID_PATH = "/latest/meta-data/instance-id"
INSTANCE_ACTION_PATH = "/latest/meta-data/spot/instance-action"
REBALANCE_PATH = "/latest/meta-data/events/recommendations/rebalance"
TAGS_PATH = "/latest/meta-data/tags/instance/"
INSTANCE_TYPE_PATH = "/latest/meta-data/instance-type"
ZONE_PATH = "/latest/meta-data/placement/availability-zone"
LIFE_CYCLE_PATH = "/latest/meta-data/instance-life-cycle"  # spot | on-demand | scheduled | ...
TOKEN_TTL_SECONDS = 21600


class ImdsUnavailable(RuntimeError):
    """The metadata service did not answer (not on EC2, or IMDS disabled)."""


class ImdsUnreachable(ImdsUnavailable):
    """No answer at all (connection refused, timed out): possibly only for a moment, e.g.
    while a busy instance boots; a refusal (an HTTP error) is never this."""


@dataclass(frozen=True)
class InstanceAction:
    action: str  # terminate | stop | hibernate
    time: datetime


@dataclass(frozen=True)
class InstancePlacement:
    """What the instance's price depends on, as IMDS says it."""

    instance_type: str
    zone: str
    life_cycle: str  # instance-life-cycle: "spot", "on-demand", ...


@dataclass(frozen=True)
class RebalanceRecommendation:
    notice_time: datetime


def parse_instance_action(body: str) -> InstanceAction:
    data = json.loads(body)
    return InstanceAction(action=str(data["action"]), time=_parse_time(data["time"]))


def parse_rebalance(body: str) -> RebalanceRecommendation:
    data = json.loads(body)
    return RebalanceRecommendation(notice_time=_parse_time(data["noticeTime"]))


def _parse_time(value: str) -> datetime:
    return datetime.fromisoformat(value.replace("Z", "+00:00"))


def endpoint_from_env(environ: Mapping[str, str] | None = None) -> str:
    source = os.environ if environ is None else environ
    return source.get(ENDPOINT_ENV, DEFAULT_ENDPOINT).rstrip("/")


class ImdsClient:
    """A small IMDSv2 client (token cached, refreshed on 401)."""

    def __init__(self, endpoint: str | None = None, *, timeout: float = 1.0) -> None:
        self.endpoint = (endpoint or endpoint_from_env()).rstrip("/")
        self.timeout = timeout
        self._token: str | None = None

    def _token_value(self, refresh: bool = False) -> str:
        if self._token is None or refresh:
            request = urllib.request.Request(
                self.endpoint + TOKEN_PATH, method="PUT", headers={TOKEN_TTL_HEADER: str(TOKEN_TTL_SECONDS)}
            )
            try:
                self._token = self._open(request).decode()
            except urllib.error.HTTPError as exc:
                # 403 (IMDS turned off for this instance), 405 (a proxy's X-Forwarded-For),
                # 400: no session, so no metadata; the agent carries on with SSM signals.
                raise ImdsUnavailable(f"IMDS token request refused: HTTP {exc.code}") from exc
        return self._token

    def _open(self, request: urllib.request.Request) -> bytes:
        try:
            with urllib.request.urlopen(request, timeout=self.timeout) as response:
                body: bytes = response.read()
                return body
        except urllib.error.HTTPError:
            raise
        except (urllib.error.URLError, OSError, TimeoutError) as exc:
            raise ImdsUnreachable(f"IMDS at {self.endpoint} unreachable: {exc}") from exc

    def get(self, path: str) -> str | None:
        """The body at `path`, or None on 404 (e.g. no notice yet)."""
        for attempt in range(2):
            request = urllib.request.Request(
                self.endpoint + path, headers={TOKEN_HEADER: self._token_value(refresh=attempt > 0)}
            )
            try:
                return self._open(request).decode()
            except urllib.error.HTTPError as exc:
                if exc.code == 404:
                    return None
                if exc.code == 401 and attempt == 0:
                    continue  # token expired: fetch a new one once
                raise ImdsUnavailable(f"IMDS {path}: HTTP {exc.code}") from exc
        return None

    def instance_id(self) -> str:
        value = self.get(INSTANCE_ID_PATH)
        if not value:
            raise ImdsUnavailable("IMDS has no instance-id")
        return value.strip()

    def tag(self, key: str) -> str | None:
        value = self.get(TAGS_PATH + key)
        return value.strip() if value else None

    def pool(self) -> str | None:
        """The capacity pool this instance came from: `<instance type>@<availability zone>`."""
        instance_type, zone = self.get(INSTANCE_TYPE_PATH), self.get(ZONE_PATH)
        if not instance_type or not zone:
            return None
        return f"{instance_type.strip()}@{zone.strip()}"

    def placement(self) -> InstancePlacement | None:
        """Instance type, zone and purchase option (None when IMDS lacks one of them)."""
        instance_type, zone, life_cycle = (
            self.get(INSTANCE_TYPE_PATH),
            self.get(ZONE_PATH),
            self.get(LIFE_CYCLE_PATH),
        )
        if not instance_type or not zone or not life_cycle:
            return None
        return InstancePlacement(instance_type.strip(), zone.strip(), life_cycle.strip())

    def instance_action(self) -> InstanceAction | None:
        body = self.get(INSTANCE_ACTION_PATH)
        return parse_instance_action(body) if body else None

    def rebalance(self) -> RebalanceRecommendation | None:
        body = self.get(REBALANCE_PATH)
        return parse_rebalance(body) if body else None

    def poll(self) -> tuple[InstanceAction | None, RebalanceRecommendation | None]:
        return self.instance_action(), self.rebalance()
