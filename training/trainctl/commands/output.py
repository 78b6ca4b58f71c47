"""What every command shares: options, injected collaborators, output and error mapping.

Human output is rich tables/text on stdout; `--json` prints one JSON document instead.
Failures never escape as tracebacks: `reporting()` maps the known error types to one line
on stderr (or a JSON `{"error": ...}` with `--json`) and the exit code (1: the cloud said
no, 2: the input is wrong and nothing was created).
"""

from __future__ import annotations

import json
import os
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Annotated, Any

import typer
from pydantic import BaseModel
from rich.console import Console
from typer.exceptions import TyperException

from trainctl.commands.stack import ENV_STACK, EXIT_FAILURE, EXIT_USAGE, CliError, Cloud, aws_errors
from trainctl.spec import SpecError
from trainctl_core.jobs import JobError
from trainctl_core.store import JobNotFound

ENV_DEBUG = "TRAINCTL_DEBUG"

StackOpt = Annotated[
    str | None,
    typer.Option("--stack", envvar=ENV_STACK, help="Stack name (default: Trainctl).", show_default=False),
]
RegionOpt = Annotated[
    str | None, typer.Option("--region", help="AWS region (default: from the profile or AWS_REGION).")
]
ProfileOpt = Annotated[str | None, typer.Option("--profile", help="AWS named profile.")]
JsonOpt = Annotated[bool, typer.Option("--json", help="Print one JSON document instead of text.")]


def _default_docker() -> Any:
    import docker  # lazy: only build/push need the Docker SDK

    return docker.from_env()


@dataclass
class Deps:
    """Collaborators a command uses; tests pass their own as typer's `obj`."""

    cloud_factory: Callable[[str | None, str | None, str | None], Cloud] = Cloud.from_options
    docker_factory: Callable[[], Any] = _default_docker
    now: Callable[[], datetime] = field(default=lambda: datetime.now(UTC))
    sleep: Callable[[float], None] = time.sleep


def deps(ctx: typer.Context) -> Deps:
    obj = ctx.obj if ctx.obj is not None else ctx.find_root().obj
    return obj if isinstance(obj, Deps) else Deps()


def cloud_of(ctx: typer.Context, stack: str | None, region: str | None, profile: str | None) -> Cloud:
    return deps(ctx).cloud_factory(stack, region, profile)


def console() -> Console:
    # Created per use so it writes to whatever sys.stdout is now (typer's CliRunner swaps it).
    # soft_wrap: long lines (pool lists, ARNs) are left to the terminal, not broken mid-word.
    return Console(file=sys.stdout, highlight=False, soft_wrap=True)


def to_jsonable(value: Any) -> Any:
    if isinstance(value, BaseModel):
        return value.model_dump(mode="json")
    if isinstance(value, datetime):
        return value.astimezone(UTC).isoformat().replace("+00:00", "Z")
    if isinstance(value, dict):
        return {str(k): to_jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [to_jsonable(v) for v in value]
    return value


def emit_json(document: Any) -> None:
    sys.stdout.write(json.dumps(to_jsonable(document), indent=2, sort_keys=False) + "\n")


@contextmanager
def reporting(json_output: bool = False) -> Iterator[None]:
    """Run a command body; known failures become a message and an exit code."""
    try:
        with aws_errors():
            yield
    except SpecError as exc:
        _fail(str(exc), EXIT_USAGE, None, json_output)
    except JobNotFound as exc:
        _fail(str(exc), EXIT_FAILURE, "see `trainctl list` for the jobs of this stack", json_output)
    except CliError as exc:
        _fail(exc.message, exc.exit_code, exc.hint, json_output)
    except JobError as exc:
        _fail(str(exc), EXIT_FAILURE, None, json_output)
    except (typer.Exit, typer.Abort, TyperException):
        raise  # typer's own control flow and usage errors (typer vendors its click)
    except Exception as exc:
        # A bug, not a condition we know: still one line, with a way to see the traceback.
        if os.environ.get(ENV_DEBUG) == "1":
            raise
        _fail(
            f"unexpected error: {type(exc).__name__}: {exc}",
            EXIT_FAILURE,
            f"set {ENV_DEBUG}=1 for the traceback",
            json_output,
        )


def _fail(message: str, code: int, hint: str | None, json_output: bool) -> None:
    if json_output:
        emit_json({"error": message, "hint": hint, "exit_code": code})
    else:
        err = Console(file=sys.stderr, highlight=False)
        err.print(f"[bold red]error:[/] {message}", markup=True, soft_wrap=True)
        if hint:
            err.print(f"[dim]hint: {hint}[/]", markup=True, soft_wrap=True)
    raise typer.Exit(code)


def age(moment: datetime | None, now: datetime) -> str:
    """`3m12s ago`-style age of a timestamp."""
    if moment is None:
        return "-"
    return f"{duration(max(0.0, (now - moment).total_seconds()))} ago"


def duration(seconds: float | None) -> str:
    if seconds is None:
        return "?"
    total = round(seconds)
    hours, rest = divmod(total, 3600)
    minutes, secs = divmod(rest, 60)
    if hours:
        return f"{hours}h{minutes:02d}m"
    if minutes:
        return f"{minutes}m{secs:02d}s"
    return f"{secs}s"
