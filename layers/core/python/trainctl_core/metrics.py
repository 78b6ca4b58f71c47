"""Recovery metrics the on-instance agent reports as structured log lines.

The agent already ships its log lines to the stack's agent log group; CloudWatch Logs
metric filters on that group (infra/constructs/observability.py) turn the lines below
into CloudWatch metrics, so the agent needs no `cloudwatch:PutMetricData` permission and
no extra client. This module is the contract between the two sides: the agent writes
`metric_line(...)`, infra builds one metric filter per entry of `AGENT_METRICS` from the
same constants. Pure standard library (no boto3, no Powertools): the agent, the handlers'
layer and infra all import it.

One log event per observation, and the whole event is one JSON object (a JSON metric
filter only matches an event that parses as JSON, so the line must not go through a
formatter that prefixes it):

    {"trainctl_metric": "<Name>", "value": <number>, "unit": "Seconds|Count|None",
     "job_id": "...", "pool": "<instance_type>@<az>"}
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from enum import StrEnum

# Same namespace as the handlers' Powertools metrics (trainctl_core.observability), so
# one dashboard shows both; kept here too because that module needs Powertools.
METRICS_NAMESPACE = "trainctl"

# Field names of a metric line.
METRIC_FIELD = "trainctl_metric"
VALUE_FIELD = "value"
UNIT_FIELD = "unit"
JOB_ID_FIELD = "job_id"
POOL_FIELD = "pool"

# Metric names (what the dashboard and the JobsFailed alarm show).
TIME_TO_CHECKPOINT = "TimeToCheckpoint"
TIME_TO_RESUME = "TimeToResume"
LOST_STEPS = "LostSteps"
REPLACEMENTS = "Replacements"
JOBS_FAILED = "JobsFailed"
JOBS_SUCCEEDED = "JobsSucceeded"

# Dimension of the Replacements metric: the capacity pool the replacement came from.
POOL_DIMENSION = "Pool"
# `<instance_type>@<availability zone>`, e.g. `g5.xlarge@us-east-1a` (zone names start with
# their region's two-letter prefix; Local and Wavelength Zones add more segments). Zones,
# not subnet ids: the dashboard shows where capacity came from, readable without a lookup.
POOL_PATTERN = re.compile(r"^[a-z][a-z0-9-]*\.[a-z0-9]+@[a-z]{2}-[a-z0-9-]+$")


class Unit(StrEnum):
    """The CloudWatch units a metric line may carry (CloudWatch's own spelling)."""

    SECONDS = "Seconds"
    COUNT = "Count"
    NONE = "None"


@dataclass(frozen=True)
class AgentMetric:
    """One metric: its unit and the dimensions a filter takes from the line's fields."""

    name: str
    unit: Unit
    description: str
    # Dimension name -> field of the line it comes from.
    dimensions: Mapping[str, str] = field(default_factory=dict)

    @property
    def filter_pattern(self) -> str:
        """The CloudWatch Logs filter pattern that selects this metric's lines."""
        return f'{{ $.{METRIC_FIELD} = "{self.name}" }}'

    @property
    def value_selector(self) -> str:
        """Where a metric filter reads the value (`metricValue`)."""
        return f"$.{VALUE_FIELD}"

    @property
    def dimension_selectors(self) -> dict[str, str]:
        """Dimension name -> JSON selector, as a metric filter's `dimensions` takes them."""
        return {name: f"$.{source}" for name, source in self.dimensions.items()}


AGENT_METRICS: dict[str, AgentMetric] = {
    m.name: m
    for m in (
        AgentMetric(
            TIME_TO_CHECKPOINT,
            Unit.SECONDS,
            "Interruption notice -> the final checkpoint is durable in S3.",
        ),
        AgentMetric(
            TIME_TO_RESUME,
            Unit.SECONDS,
            "Interruption notice -> training resumed on the replacement instance.",
        ),
        AgentMetric(LOST_STEPS, Unit.COUNT, "Training steps redone after a resume."),
        AgentMetric(
            REPLACEMENTS,
            Unit.COUNT,
            "A replacement instance started training (value 1), by capacity pool.",
            dimensions={POOL_DIMENSION: POOL_FIELD},
        ),
        AgentMetric(JOBS_FAILED, Unit.COUNT, "A job ended FAILED on its instance (value 1)."),
        AgentMetric(JOBS_SUCCEEDED, Unit.COUNT, "A job ended SUCCEEDED (value 1)."),
    )
}


class MetricLineError(ValueError):
    """A metric line that would not produce the metric it names; the message says why."""


def metric_line(name: str, value: float, unit: Unit | str, *, job_id: str, pool: str | None = None) -> str:
    """The JSON log line (no trailing newline) that reports one observation of `name`.

    Raises MetricLineError for an unknown metric, a unit other than the metric's, a value
    that is not a finite number >= 0 (CloudWatch percentiles need non-negative values),
    an empty job id, or a missing/malformed pool where the metric has the Pool dimension.
    """
    metric = AGENT_METRICS.get(name)
    if metric is None:
        raise MetricLineError(f"unknown metric {name!r}; known: {sorted(AGENT_METRICS)}")
    if str(unit) != metric.unit.value:
        raise MetricLineError(f"{name} is measured in {metric.unit.value}, not {unit!r}")
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise MetricLineError(f"{name}: value must be a number, got {value!r}")
    if not math.isfinite(value) or value < 0:
        raise MetricLineError(f"{name}: value must be finite and >= 0, got {value!r}")
    if not isinstance(job_id, str) or not job_id:
        raise MetricLineError(f"{name}: job_id is required")
    if pool is None and POOL_FIELD in metric.dimensions.values():
        raise MetricLineError(f"{name} is reported per capacity pool: pool is required")
    if pool is not None and not POOL_PATTERN.fullmatch(pool):
        raise MetricLineError(
            f"{name}: pool must be <instance_type>@<az> (g5.xlarge@us-east-1a), got {pool!r}"
        )
    line: dict[str, object] = {
        METRIC_FIELD: name,
        VALUE_FIELD: value,
        UNIT_FIELD: metric.unit.value,
        JOB_ID_FIELD: job_id,
    }
    if pool is not None:
        line[POOL_FIELD] = pool
    return json.dumps(line, separators=(",", ":"))
