"""The job's cost guards, checked by the agent while the job runs (pure).

The resume workflow checks the same guards at each recovery (its `Guard` state in
infra/workflows/resume.asl.json); the agent checks them between recoveries, so a job that
is never interrupted still stops at its deadline or budget. Same tests, same wording of
the FAILED reason, whichever side sees the limit first.
"""

from __future__ import annotations

from datetime import datetime

from trainctl_core.jobs import Job, format_time


def limit_reached(job: Job, *, cost_usd: float, now: datetime) -> str | None:
    """The FAILED reason if `now` or `cost_usd` (the row's) hits a guard of `job`, else None."""
    if job.deadline_at is not None and now >= job.deadline_at:
        return f"max wall-clock reached: deadline {format_time(job.deadline_at)} passed"
    budget = job.spec.limits.budget_usd
    if budget is not None and cost_usd >= budget:
        return f"budget reached: cost {format_usd(cost_usd)} USD of {format_usd(budget)} USD"
    return None


def format_usd(value: float) -> str:
    """Up to 6 decimals, no trailing zeros (`12.5`, `0.000417`, `20`)."""
    text = f"{value:.6f}".rstrip("0").rstrip(".")
    return text or "0"
