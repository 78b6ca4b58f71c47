"""EC2 Spot interruption warnings and rebalance recommendations.

Warning -> (1) SSM checkpoint-now to the instance, (2) RUNNING -> INTERRUPTED for
(job, instance, attempt), (3) start the resume workflow `<job>-<attempt>`.
Rebalance -> checkpoint-now only, or the same path as a warning when the job's policy
is `on_rebalance: migrate`.

Failures:
- A malformed event raises (retried, then parked in the on-failure queue, which alarms).
- A normal outcome, logged with the ids, counted under `Events{outcome}`, never retried:
  an instance no job runs on (`ignored_unmanaged`), an ended job (`ignored_terminal`), or
  an instance the job already replaced, i.e. a late event (`ignored_stale`).
- A failed checkpoint request never holds up (2) and (3): the failure is logged and
  counted (`CheckpointSignalFailures`), the loss is recorded and the resume started, and
  the workflow falls back to the newest periodic checkpoint if no final one arrives.
  Then the invocation raises only if a retry can still help: the error was transient
  (throttling, 5xx, timeout) and the notice deadline has not passed. The retry finds the
  loss recorded with its request marked as failed, asks again, and every other step is a
  no-op (conditional write, deterministic execution name). An unreachable instance
  (already gone) or a refusal that would repeat (e.g. AccessDenied: logged at error
  level) does not raise: retrying cannot deliver it.
- Any other AWS error (DynamoDB, Step Functions) raises so Lambda retries. The write is
  conditional and the execution name deterministic, so a retry never records or resumes
  twice. It may send the checkpoint-now command again (it went out first, before the
  failure): the agent joins a second request for the same notice to the checkpoint in
  flight, or answers it with the final checkpoint it already recorded.
"""

from __future__ import annotations

from typing import Annotated, Any

from aws_lambda_powertools.logging import correlation_paths
from aws_lambda_powertools.utilities.idempotency import idempotent_function
from aws_lambda_powertools.utilities.parser import ValidationError, parse
from aws_lambda_powertools.utilities.typing import LambdaContext
from pydantic import Field

from trainctl_core.events import RebalanceEvent, SpotInterruptionEvent
from trainctl_core.handling import build_recovery, idempotency, reject, report
from trainctl_core.observability import logger, metrics, tracer
from trainctl_core.settings import get_settings

InterruptionEvent = Annotated[SpotInterruptionEvent | RebalanceEvent, Field(discriminator="detail_type")]

settings = get_settings()
recovery = build_recovery(settings)
persistence, idempotency_config = idempotency(settings)


@idempotent_function(data_keyword_argument="event", persistence_store=persistence, config=idempotency_config)
def process(event: dict[str, Any]) -> dict[str, Any]:
    try:
        parsed = parse(event=event, model=InterruptionEvent)  # type: ignore[call-overload]  # a discriminated union, not a class
    except ValidationError as exc:
        raise reject(event, exc, event_type="interruption") from exc
    if isinstance(parsed, SpotInterruptionEvent):
        result = recovery.on_spot_warning(
            instance_id=parsed.detail.instance_id, noticed_at=parsed.time, event_id=parsed.id
        )
        return report(result, event_type="spot_warning")
    result = recovery.on_rebalance(
        instance_id=parsed.detail.instance_id, noticed_at=parsed.time, event_id=parsed.id
    )
    return report(result, event_type="rebalance")


@logger.inject_lambda_context(correlation_id_path=correlation_paths.EVENT_BRIDGE)
@metrics.log_metrics
@tracer.capture_lambda_handler
def handler(event: dict[str, Any], context: LambdaContext) -> dict[str, Any]:
    idempotency_config.register_lambda_context(context)
    return process(event=event)
