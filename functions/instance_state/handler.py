"""EC2 instance state changes: a job's instance going away without a Spot warning.

`shutting-down`/`terminated` of a RUNNING (or LAUNCHING) job's current instance with no
loss recorded yet -> RUNNING -> INTERRUPTED and the resume workflow, which resumes from the
newest periodic checkpoint. If a warning already recorded the loss, the workflow it
started is the one (same execution name): nothing new happens. Anything else is a no-op
with a structured log line.

Outcomes and failures:
- A malformed event raises (Lambda retries, then parks it in the on-failure queue, which
  alarms): an event shape AWS changed needs a human.
- Not a loss (`pending`, `running`, `stopping`, `stopped`): `ignored_not_a_loss`.
- An instance no job runs on: `ignored_unmanaged`. The instance of a job's last recorded
  loss, already replaced (late events of every normal recovery): `ignored_stale`, with the
  job and the attempt it was. An ended job: `ignored_terminal`. None of these raise: a
  retry would change nothing. Each is counted under the `Events` metric's `outcome`.
- A DynamoDB or Step Functions error raises so that Lambda retries: the transition is
  conditional and the execution name deterministic, so a retry never records or resumes
  twice.
"""

from __future__ import annotations

from typing import Any

from aws_lambda_powertools.logging import correlation_paths
from aws_lambda_powertools.utilities.idempotency import idempotent_function
from aws_lambda_powertools.utilities.parser import ValidationError, parse
from aws_lambda_powertools.utilities.typing import LambdaContext

from trainctl_core.events import StateChangeEvent
from trainctl_core.handling import build_recovery, idempotency, reject, report
from trainctl_core.observability import logger, metrics, tracer
from trainctl_core.settings import get_settings

settings = get_settings()
recovery = build_recovery(settings)
persistence, idempotency_config = idempotency(settings)


@idempotent_function(data_keyword_argument="event", persistence_store=persistence, config=idempotency_config)
def process(event: dict[str, Any]) -> dict[str, Any]:
    try:
        parsed = parse(event=event, model=StateChangeEvent)
    except ValidationError as exc:
        raise reject(event, exc, event_type="state_change") from exc
    result = recovery.on_state_change(
        instance_id=parsed.detail.instance_id,
        state=parsed.detail.state,
        changed_at=parsed.time,
        event_id=parsed.id,
        is_loss=parsed.is_loss,
    )
    return report(result, event_type="state_change")


@logger.inject_lambda_context(correlation_id_path=correlation_paths.EVENT_BRIDGE)
@metrics.log_metrics
@tracer.capture_lambda_handler
def handler(event: dict[str, Any], context: LambdaContext) -> dict[str, Any]:
    idempotency_config.register_lambda_context(context)
    return process(event=event)
