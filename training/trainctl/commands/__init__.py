"""The user-facing trainctl commands, one module per family; `register` wires them in."""

from __future__ import annotations

import typer


def register(app: typer.Typer) -> None:
    """Add the job, image and savings commands to the `trainctl` app."""
    from trainctl.commands import images, jobs, savings

    app.command("submit")(jobs.submit)
    app.command("status")(jobs.status)
    app.command("list")(jobs.list_jobs)
    app.command("cancel")(jobs.cancel)
    app.command("logs")(jobs.logs)
    app.command("interrupt")(jobs.interrupt)
    app.command("build")(images.build)
    app.command("push")(images.push)
    app.command("savings")(savings.savings)
