"""`--timeline PNG`: one lane per job, a bar per attempt, markers for what happened.

matplotlib is imported here only (lazily, when a PNG is asked for): the rehearsal itself
does not need it.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any


class TimelineUnavailable(RuntimeError):
    """matplotlib is not installed."""


def write_png(result: dict[str, Any], path: Path) -> Path:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError as exc:  # pragma: no cover - depends on the environment
        raise TimelineUnavailable("--timeline needs matplotlib: pip install 'trainctl[train]'") from exc

    events = result.get("timeline", [])
    jobs = [j["job_id"] for j in result.get("per_job", [])]
    lanes = {job: index for index, job in enumerate(jobs)}
    figure, axis = plt.subplots(figsize=(10, 1.2 + 0.5 * max(1, len(jobs))))
    end = max((e["t"] for e in events), default=1.0)
    starts: dict[tuple[str, int], float] = {}
    colours = ["tab:blue", "tab:green", "tab:purple", "tab:olive", "tab:cyan"]
    for event in events:
        job, attempt = event.get("job_id"), event.get("attempt")
        if job not in lanes or attempt is None:
            continue
        if event["event"] == "job running":
            starts[(job, attempt)] = event["t"]
        elif event["event"].startswith("interruption") or event["event"] in ("job succeeded", "job failed"):
            started = starts.pop((job, attempt), None)
            if started is not None:
                axis.barh(
                    lanes[job], event["t"] - started, left=started, height=0.4, color=colours[attempt % 5]
                )
                axis.text(started, lanes[job] + 0.28, f"attempt {attempt}", fontsize=7)
            if event["event"].startswith("interruption"):
                marker = "x" if "no-notice" in event["event"] else "v"
                axis.plot(event["t"], lanes[job], marker=marker, color="tab:red", markersize=9, zorder=3)
        elif event["event"] == "training resumed":
            axis.plot(event["t"], lanes[job], marker="^", color="black", markersize=7, zorder=3)
    axis.set_yticks(list(lanes.values()), [j[-20:] for j in lanes])
    axis.set_xlim(0, end * 1.02)
    axis.set_xlabel("seconds since start (v notice, x loss without notice, ^ training resumed)")
    axis.set_title(
        f"trainctl rehearse: {result.get('verdict')} - {result.get('interruptions')} interruptions, "
        f"lost steps {result.get('lost_steps')}",
        fontsize=9,
    )
    figure.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path, dpi=110)
    plt.close(figure)
    return path
