"""Powertools Logger, Tracer and Metrics singletons shared by every handler.

Service name and metric namespace come from the standard Powertools variables
(POWERTOOLS_SERVICE_NAME, POWERTOOLS_METRICS_NAMESPACE) that the stack sets; the defaults
make local runs and tests work unchanged.
"""

from __future__ import annotations

from aws_lambda_powertools import Logger, Metrics, Tracer
from aws_lambda_powertools.metrics import MetricUnit

METRICS_NAMESPACE = "trainctl"

logger = Logger(service="trainctl")
# Patch botocore only: it is all the handlers call out with. The default patches every
# library X-Ray supports that is installed (requests, httplib, sqlite3, ...), importing
# each at cold start (~60 ms) and tracing each AWS call twice (botocore and httplib).
tracer = Tracer(service="trainctl", patch_modules=("botocore",))
metrics = Metrics(namespace=METRICS_NAMESPACE, service="trainctl")

# Metric names: what the dashboard and alarms show (infra/constructs/observability.py).
METRIC_EVENTS = "Events"  # every EC2 event handled, dimension `outcome`
METRIC_INTERRUPTIONS = "Interruptions"  # losses recorded
METRIC_RESUMES_STARTED = "ResumesStarted"
METRIC_CHECKPOINT_REQUESTS = "CheckpointRequests"
METRIC_CHECKPOINT_SIGNAL_FAILURES = "CheckpointSignalFailures"
METRIC_UNMANAGED_EVENTS = "UnmanagedInstanceEvents"
METRIC_REJECTED_EVENTS = "RejectedEvents"

__all__ = [
    "METRICS_NAMESPACE",
    "MetricUnit",
    "logger",
    "metrics",
    "tracer",
]
