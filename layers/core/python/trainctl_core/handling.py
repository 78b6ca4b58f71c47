"""Wiring shared by the EC2-event handlers: build `Recovery` from settings and clients,
and turn its `Result` into logs and metrics (one place, so both handlers report alike)."""

from __future__ import annotations

from typing import Any

from aws_lambda_powertools.utilities.idempotency import (
    DynamoDBPersistenceLayer,
    IdempotencyConfig,
)

from trainctl_core import clients
from trainctl_core.commands import CheckpointCommands
from trainctl_core.errors import CheckpointRequestFailed, InstanceUnreachable
from trainctl_core.jobs import utcnow
from trainctl_core.observability import (
    METRIC_CHECKPOINT_REQUESTS,
    METRIC_CHECKPOINT_SIGNAL_FAILURES,
    METRIC_EVENTS,
    METRIC_INTERRUPTIONS,
    METRIC_REJECTED_EVENTS,
    METRIC_RESUMES_STARTED,
    METRIC_UNMANAGED_EVENTS,
    MetricUnit,
    logger,
    metrics,
)
from trainctl_core.recovery import Outcome, Recovery, Result
from trainctl_core.settings import IDEMPOTENCY_PARTITION_KEY, Settings
from trainctl_core.store import JobStore
from trainctl_core.workflow import ResumeStarter, resume_input


class MalformedEvent(ValueError):
    """The event does not have the shape AWS documents for it.

    Raised (not swallowed): the invocation fails, Lambda retries and then parks the event
    in the on-failure queue, whose alarm tells a human that an event shape changed.
    """


def build_recovery(settings: Settings, *, dynamodb: Any = None, ssm: Any = None, sfn: Any = None) -> Recovery:
    return Recovery(
        jobs=JobStore(dynamodb or clients.client("dynamodb"), settings.jobs_table),
        signaller=CheckpointCommands(ssm or clients.client("ssm"), settings.checkpoint_document),
        resumes=ResumeStarter(sfn or clients.client("stepfunctions"), settings.resume_state_machine_arn),
        resume_input=resume_input,
        clock=utcnow,
        notice_seconds=settings.notice_seconds,
        on_signal_failure=_report_signal_failure,
    )


def idempotency(
    settings: Settings, *, dynamodb: Any = None
) -> tuple[DynamoDBPersistenceLayer, IdempotencyConfig]:
    """Powertools idempotency keyed on the EventBridge event id (duplicate deliveries)."""
    persistence = DynamoDBPersistenceLayer(
        table_name=settings.idempotency_table,
        key_attr=IDEMPOTENCY_PARTITION_KEY,
        boto3_client=dynamodb or clients.client("dynamodb"),
    )
    # Keep records a day: EventBridge retries for at most 24 h.
    config = IdempotencyConfig(event_key_jmespath="id", expires_after_seconds=24 * 3600)
    return persistence, config


def report(result: Result, *, event_type: str) -> dict[str, Any]:
    """Log and count how an event was handled; returns the handler's response.

    Raises `result.retry` (a transient checkpoint-request failure) once everything is
    logged and counted, so that Lambda retries the event while the notice lasts.
    """
    response = {"event": event_type, **result.as_dict()}
    metrics.add_dimension(name="outcome", value=result.outcome.value)
    metrics.add_metric(name=METRIC_EVENTS, unit=MetricUnit.Count, value=1)
    if result.outcome == Outcome.IGNORED_UNMANAGED:
        metrics.add_metric(name=METRIC_UNMANAGED_EVENTS, unit=MetricUnit.Count, value=1)
    if result.interruption_recorded:
        metrics.add_metric(name=METRIC_INTERRUPTIONS, unit=MetricUnit.Count, value=1)
    if result.execution_started:
        metrics.add_metric(name=METRIC_RESUMES_STARTED, unit=MetricUnit.Count, value=1)
    if result.checkpoint_requested:
        metrics.add_metric(name=METRIC_CHECKPOINT_REQUESTS, unit=MetricUnit.Count, value=1)
    logger.info("ec2 event handled", **response)
    if result.retry is not None:
        logger.warning(
            "failing the invocation so that Lambda retries the checkpoint request",
            job_id=result.job_id,
            instance_id=result.instance_id,
            error=str(result.retry),
        )
        raise result.retry
    return response


def reject(event: Any, problem: Exception, *, event_type: str) -> MalformedEvent:
    """Log and count a malformed event; returns the error for the handler to raise."""
    event_id = event.get("id") if isinstance(event, dict) else None
    metrics.add_metric(name=METRIC_REJECTED_EVENTS, unit=MetricUnit.Count, value=1)
    logger.error("malformed ec2 event", event_type=event_type, event_id=event_id, problem=str(problem))
    return MalformedEvent(f"malformed {event_type} event {event_id}: {problem}")


def _report_signal_failure(job_id: str, instance_id: str, error: Exception) -> None:
    metrics.add_metric(name=METRIC_CHECKPOINT_SIGNAL_FAILURES, unit=MetricUnit.Count, value=1)
    code = error.code if isinstance(error, CheckpointRequestFailed) else type(error).__name__
    retryable = isinstance(error, CheckpointRequestFailed) and error.retryable
    # A gone instance is an expected race and a transient failure is retried; any other
    # refusal (access denied, unknown document) repeats on every loss: a human must look.
    expected = isinstance(error, InstanceUnreachable) or retryable
    (logger.warning if expected else logger.error)(
        "checkpoint request not delivered; resume will use the newest periodic checkpoint",
        job_id=job_id,
        instance_id=instance_id,
        error=str(error),
        code=code,
        retryable=retryable,
    )
