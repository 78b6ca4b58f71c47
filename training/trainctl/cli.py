"""`trainctl`: the command line (typer + rich).

Each command family lives in its own module and registers itself here, so this file stays
a table of contents. The on-instance commands (`agent`, `checkpoint-now`) keep their own
argparse parsers because they run under user data / SSM with raw argument lists, which
are passed through untouched.
"""

from __future__ import annotations

import typer

from trainctl.agent.cli import agent_main, checkpoint_now_main
from trainctl.commands import register as register_commands
from trainctl.rehearse.command import register as register_rehearse

app = typer.Typer(
    name="trainctl",
    help="Keep ML training jobs on EC2 Spot alive through interruptions.",
    no_args_is_help=True,
    add_completion=False,
    rich_markup_mode="rich",
)

_PASSTHROUGH = {"allow_extra_args": True, "ignore_unknown_options": True, "help_option_names": []}


@app.command(context_settings=_PASSTHROUGH, add_help_option=False)
def agent(ctx: typer.Context) -> None:
    """Run the job under the agent (on the instance); the command defaults to the job row's."""
    raise typer.Exit(agent_main(ctx.args))


@app.command("checkpoint-now", context_settings=_PASSTHROUGH, add_help_option=False)
def checkpoint_now(ctx: typer.Context) -> None:
    """Ask the local agent for a durable checkpoint now (what the SSM document runs)."""
    raise typer.Exit(checkpoint_now_main(ctx.args))


register_commands(app)
register_rehearse(app)


def main() -> None:
    app()


if __name__ == "__main__":  # `python -m trainctl.cli`, where the `trainctl` script is not on PATH
    main()
