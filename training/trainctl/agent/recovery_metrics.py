"""What the agent reports about a recovery, as metric lines (trainctl_core.metrics).

Pure: takes the job row and the moments the agent observed, returns the lines. The
agent writes them to its log shipper, and the stack's metric filters turn them into the
dashboard's TimeToCheckpoint, TimeToResume, LostSteps, Replacements and JobsFailed /
JobsSucceeded metrics. A metric that cannot be computed truthfully (no recorded notice,
no pool known) is left out, never guessed.
"""

from __future__ import annotations

from collections.abc import Mapping
from datetime import datetime
from typing import Any

from trainctl_core import metrics
from trainctl_core.jobs import Job


def _seconds(start: datetime, end: datetime) -> float:
    return round(max(0.0, (end - start).total_seconds()), 3)


def final_checkpoint_lines(
    job: Job, *, attempt: int, durable_at: datetime, agent_noticed_at: datetime | None
) -> list[str]:
    """TimeToCheckpoint: the notice (as recorded on the row, else as the agent got it) →
    the final checkpoint durable and on the row."""
    interruption = job.interruption_for(attempt)
    noticed_at = interruption.noticed_at if interruption is not None else agent_noticed_at
    if noticed_at is None:
        return []
    return [
        metrics.metric_line(
            metrics.TIME_TO_CHECKPOINT,
            _seconds(noticed_at, durable_at),
            metrics.Unit.SECONDS,
            job_id=job.job_id,
        )
    ]


def previous_attempt_last_step(job: Job, row: Mapping[str, Any]) -> int | None:
    """The newest step the interrupted attempt is known to have trained.

    Its last heartbeat (still on the row until this attempt's first one) and its newest
    recorded checkpoints. A lower bound: steps trained after the last heartbeat and never
    checkpointed are not on the row.
    """
    previous = job.attempt - 1
    candidates: list[int] = []
    heartbeat = row.get("heartbeat_step")
    if isinstance(heartbeat, int | float) and not isinstance(heartbeat, bool):
        candidates.append(int(heartbeat))
    for ref in (job.last_checkpoint, job.final_checkpoint):
        if ref is not None and ref.attempt == previous:
            candidates.append(ref.step)
    return max(candidates) if candidates else None


def resumed_lines(job: Job, row: Mapping[str, Any], *, resumed_at: datetime, pool: str | None) -> list[str]:
    """On a replacement's first progress report: TimeToResume, LostSteps, Replacements.

    Nothing for a job's first attempt (a launch, not a recovery).
    """
    if job.attempt == 0:
        return []
    lines: list[str] = []
    interruption = job.interruption_for(job.attempt - 1)
    if interruption is not None:
        lines.append(
            metrics.metric_line(
                metrics.TIME_TO_RESUME,
                _seconds(interruption.noticed_at, resumed_at),
                metrics.Unit.SECONDS,
                job_id=job.job_id,
            )
        )
    last_step = previous_attempt_last_step(job, row)
    if last_step is not None:
        resumed_from = (job.resume_point.step if job.resume_point else None) or 0
        lines.append(
            metrics.metric_line(
                metrics.LOST_STEPS, max(0, last_step - resumed_from), metrics.Unit.COUNT, job_id=job.job_id
            )
        )
    if pool is not None and metrics.POOL_PATTERN.fullmatch(pool):
        lines.append(
            metrics.metric_line(metrics.REPLACEMENTS, 1, metrics.Unit.COUNT, job_id=job.job_id, pool=pool)
        )
    return lines


def outcome_line(job_id: str, *, succeeded: bool) -> str:
    name = metrics.JOBS_SUCCEEDED if succeeded else metrics.JOBS_FAILED
    return metrics.metric_line(name, 1, metrics.Unit.COUNT, job_id=job_id)
