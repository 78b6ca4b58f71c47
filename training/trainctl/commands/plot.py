"""`trainctl savings JOB --plot PNG`: a timeline of attempts, interruptions and checkpoints."""

from __future__ import annotations

from datetime import datetime
from pathlib import Path

from trainctl.commands.costs import SavingsReport
from trainctl_core.jobs import Job


def plot_timeline(job: Job, report: SavingsReport, path: Path, *, now: datetime) -> Path:
    """Draw one bar per attempt (spot/on-demand), notices and known checkpoints; write PNG."""
    try:
        import matplotlib

        matplotlib.use("Agg")  # files only, never a window (works without a display)
        import matplotlib.dates as mdates
        import matplotlib.pyplot as plt
    except ImportError as exc:  # pragma: no cover - matplotlib is in the train extra
        from trainctl.commands.stack import CliError

        raise CliError("--plot needs matplotlib: pip install 'trainctl[train]'") from exc

    figure, axis = plt.subplots(figsize=(10, 1.2 + 0.5 * max(1, len(report.attempts))))
    colors = {"spot": "#2b8cbe", "on-demand": "#e6550d"}
    for row, cost in enumerate(report.attempts):
        usage = cost.usage
        start = mdates.date2num(usage.started_at)
        width = mdates.date2num(usage.ended_at) - start
        axis.barh(row, width, left=start, height=0.5, color=colors[usage.market], label=usage.market)
        axis.text(start, row + 0.32, f"{usage.instance_type} ${cost.paid_usd:.2f}", fontsize=7)
    rows = {c.usage.attempt: i for i, c in enumerate(report.attempts)}
    for overhead in report.interruptions:
        row = rows.get(overhead.attempt, 0)
        axis.plot(
            [mdates.date2num(overhead.noticed_at)],
            [row],
            marker="x",
            color="red",
            markersize=9,
            label="interruption",
        )
    for checkpoint in (job.last_checkpoint, job.final_checkpoint):
        if checkpoint is not None and checkpoint.attempt in rows:
            axis.plot(
                [mdates.date2num(checkpoint.created_at)],
                [rows[checkpoint.attempt]],
                marker="|",
                color="black",
                markersize=14,
                label="checkpoint",
            )
    handles, labels = axis.get_legend_handles_labels()
    unique = dict(zip(labels, handles, strict=False))
    if unique:
        axis.legend(unique.values(), unique.keys(), loc="upper left", fontsize=7, ncols=4)
    axis.set_yticks(range(len(report.attempts)), [f"attempt {c.usage.attempt}" for c in report.attempts])
    axis.xaxis.set_major_formatter(mdates.DateFormatter("%H:%M"))
    pct = f" ({report.net_saving_pct:.0f}%)" if report.net_saving_pct is not None else ""
    axis.set_title(f"{job.job_id}: net saving ${report.net_saving_usd:.2f}{pct}", fontsize=9)
    axis.set_xlabel(f"UTC (as of {now:%Y-%m-%d %H:%M})")
    figure.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path, format="png", dpi=120)
    plt.close(figure)
    return path
