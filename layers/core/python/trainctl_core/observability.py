"""Powertools Logger, Tracer and Metrics singletons shared by every handler.

Service name and metric namespace come from the standard Powertools variables
(POWERTOOLS_SERVICE_NAME, POWERTOOLS_METRICS_NAMESPACE), which the stack sets on each
function; only when a variable is absent (local runs, tests, the rehearsal) do the
defaults below apply. Passing a value to Powertools explicitly would override its
variable, so the variable is read here and wins.
"""

from __future__ import annotations

import os

from aws_lambda_powertools import Logger, Metrics, Tracer
from aws_lambda_powertools.metrics import MetricUnit
from aws_lambda_powertools.shared.constants import METRICS_NAMESPACE_ENV, SERVICE_NAME_ENV

DEFAULT_SERVICE_NAME = "trainctl"
METRICS_NAMESPACE = "trainctl"
"""The default namespace, and the one the stack's dashboard and alarms read."""

SERVICE_NAME = os.environ.get(SERVICE_NAME_ENV) or DEFAULT_SERVICE_NAME
NAMESPACE = os.environ.get(METRICS_NAMESPACE_ENV) or METRICS_NAMESPACE

logger = Logger(service=SERVICE_NAME)
# Patch botocore only: it is all the handlers call out with. The default patches every
# library X-Ray supports that is installed (requests, httplib, sqlite3, ...), importing
# each at cold start (~60 ms) and tracing each AWS call twice (botocore and httplib).
tracer = Tracer(service=SERVICE_NAME, patch_modules=("botocore",))
metrics = Metrics(namespace=NAMESPACE, service=SERVICE_NAME)

# Metric names: what the dashboard and alarms show (infra/constructs/observability.py).
METRIC_EVENTS = "Events"  # every EC2 event handled, dimension `outcome`
METRIC_INTERRUPTIONS = "Interruptions"  # losses recorded
METRIC_RESUMES_STARTED = "ResumesStarted"
METRIC_CHECKPOINT_REQUESTS = "CheckpointRequests"
METRIC_CHECKPOINT_SIGNAL_FAILURES = "CheckpointSignalFailures"
METRIC_UNMANAGED_EVENTS = "UnmanagedInstanceEvents"
METRIC_REJECTED_EVENTS = "RejectedEvents"

__all__ = [
    "DEFAULT_SERVICE_NAME",
    "METRICS_NAMESPACE",
    "NAMESPACE",
    "SERVICE_NAME",
    "MetricUnit",
    "logger",
    "metrics",
    "tracer",
]
