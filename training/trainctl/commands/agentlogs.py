"""The agent's CloudWatch Logs: a job's streams and their events.

One stream per attempt, `<job>/<attempt>/<instance>`, in the stack's agent log group.
`trainctl logs` prints them; `trainctl savings` reads the agent's recovery metric lines
from them (when training resumed, when the final checkpoint was durable).
"""

from __future__ import annotations

from typing import Any

from trainctl.commands.stack import CliError

# filter_log_events takes at most 100 stream names per call.
MAX_STREAMS_PER_CALL = 100


class LogGroupMissing(CliError):
    def __init__(self, group: str) -> None:
        super().__init__(
            f"log group {group} does not exist",
            hint="no agent has shipped logs to this stack yet, or pass --log-group",
        )
        self.group = group


def job_streams(client: Any, group: str, prefix: str) -> list[str]:
    """Names of the streams starting with `prefix` (`<job>/` or `<job>/<attempt>/`)."""
    try:
        return [
            s["logStreamName"]
            for page in client.get_paginator("describe_log_streams").paginate(
                logGroupName=group, logStreamNamePrefix=prefix
            )
            for s in page.get("logStreams", [])
        ]
    except client.exceptions.ResourceNotFoundException:
        raise LogGroupMissing(group) from None


def stream_events(
    client: Any,
    group: str,
    streams: list[str],
    *,
    start_ms: int = 0,
    filter_pattern: str | None = None,
) -> list[dict[str, Any]]:
    """Every event of `streams` at or after `start_ms`, oldest first (ties by event id)."""
    events: list[dict[str, Any]] = []
    for index in range(0, len(streams), MAX_STREAMS_PER_CALL):
        kwargs: dict[str, Any] = {
            "logGroupName": group,
            "logStreamNames": streams[index : index + MAX_STREAMS_PER_CALL],
        }
        if start_ms:
            kwargs["startTime"] = start_ms
        if filter_pattern:
            kwargs["filterPattern"] = filter_pattern
        for page in client.get_paginator("filter_log_events").paginate(**kwargs):
            events.extend(page.get("events", []))
    return sorted(events, key=lambda e: (e["timestamp"], e["eventId"]))
