"""`trainctl rehearse`: watch a training script survive Spot interruptions, offline.

Public and stable (scripts depend on the flags and on the `--json` keys). Exit code 0
only on a `pass` verdict; 1 on `fail` (a timeout included); 2 when the rehearsal could
not run at all (bad option, a script that fails uninterrupted, the stack cannot be
synthesized, an unexpected error); 128 + the signal's number when it was stopped by
SIGINT (Ctrl-C: 130), SIGTERM (143) or SIGHUP (129), after stopping every process it
started and removing its scratch files.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import sys
import threading
from collections.abc import Iterator
from pathlib import Path
from types import FrameType
from typing import Annotated, Any, NoReturn

import typer

from trainctl.rehearse.interrupts import Interrupted, StopRequest

EXIT_FAIL = 1
EXIT_ERROR = 2
ENV_DEBUG = "TRAINCTL_DEBUG"  # "1": let an unexpected error's traceback through
STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)


@contextlib.contextmanager
def signals_unwind(stop: StopRequest) -> Iterator[None]:
    """SIGINT, SIGTERM and SIGHUP (Ctrl-C, a CI timeout or `kill`, a closed terminal)
    all stop the rehearsal by unwinding: every `finally` runs, so its processes are
    killed, moto stops and its scratch directories are removed. (SIGTERM's and SIGHUP's
    default action would end the process on the spot and leave all that behind.)

    The first signal raises `Interrupted` in the main thread at once, and records the
    request in `stop`, which the rehearsal checks at safe points: an exception raised
    from a signal handler can land where Python ignores it (a weakref callback during an
    import, a `__del__`), and the check still stops the run. Later signals are ignored,
    so that they do not break off the clean-up (which is bounded).
    """
    if threading.current_thread() is not threading.main_thread():
        yield  # signal handlers can only be set from the main thread
        return

    def handler(signum: int, _frame: FrameType | None) -> None:
        if stop.requested:
            return
        stop.request(signum)
        raise Interrupted(signum)

    previous = {number: signal.signal(number, handler) for number in STOP_SIGNALS}
    try:
        yield
    finally:
        for number, old in previous.items():
            signal.signal(number, old)


def _fractions(value: str | None) -> list[float] | None:
    if not value:
        return None
    try:
        return [float(part) for part in value.split(",") if part.strip()]
    except ValueError:
        raise typer.BadParameter(
            f"--at takes comma-separated fractions like 0.3,0.6 (got {value!r})"
        ) from None


def _pools(value: str | None) -> list[str]:
    return [part.strip() for part in (value or "").split(",") if part.strip()]


def rehearse_command(
    script: Annotated[
        str | None,
        typer.Argument(
            help="Training script, or a bundled example name (default: tiny_train).", show_default=False
        ),
    ] = None,
    interruptions: Annotated[int, typer.Option("--interruptions", "-n", help="How many interruptions.")] = 2,
    at: Annotated[
        str | None,
        typer.Option(
            "--at", help="When, as comma-separated fractions of the steps (default: evenly spaced)."
        ),
    ] = None,
    no_notice: Annotated[
        int, typer.Option("--no-notice", help="How many of them (the last ones) come without a warning.")
    ] = 0,
    duplicate_events: Annotated[
        bool,
        typer.Option("--duplicate-events", help="Deliver every EC2 event twice and send each warning twice."),
    ] = False,
    capacity_errors: Annotated[
        str | None,
        typer.Option(
            "--capacity-errors",
            help="Pools with no capacity, comma-separated: TYPE@ZONE (m5.large@us-east-1a), TYPE or ZONE.",
        ),
    ] = None,
    rebalance_first: Annotated[
        bool, typer.Option("--rebalance-first", help="Precede each warning with a rebalance recommendation.")
    ] = False,
    boot_seconds: Annotated[float, typer.Option("--boot-seconds", help="Emulated instance boot time.")] = 1.0,
    time_scale: Annotated[
        float,
        typer.Option("--time-scale", help="Scale of AWS's timings (the 120 s notice, backoffs); 1 = real."),
    ] = 0.05,
    seed: Annotated[
        int,
        typer.Option("--seed", help="Training seed (TRAIN_SEED) of both runs; wins over an exported one."),
    ] = 7,
    json_output: Annotated[
        bool, typer.Option("--json", help="Print one JSON object (nothing else).")
    ] = False,
    timeline: Annotated[
        Path | None, typer.Option("--timeline", help="Write a PNG timeline here (needs matplotlib).")
    ] = None,
    timeout: Annotated[
        float | None,
        typer.Option(
            "--timeout",
            help="Give up (fail) when the interrupted run takes longer than this many seconds "
            "(default: computed from the scenario, at least 600).",
            show_default=False,
        ),
    ] = None,
    keep: Annotated[
        Path | None, typer.Option("--keep", help="Keep the instances' logs and outputs in this directory.")
    ] = None,
) -> None:
    """Rehearse the whole recovery flow on this machine: moto for AWS, processes for instances."""
    from rich.console import Console

    from trainctl.rehearse.scenario import Options, RehearsalError, resolve_script
    from trainctl.rehearse.stack import StackError

    console = Console(stderr=json_output)
    try:
        options = Options(
            script=resolve_script(script),
            interruptions=interruptions,
            at=_fractions(at),
            no_notice=no_notice,
            duplicate_events=duplicate_events,
            capacity_errors=_pools(capacity_errors),
            rebalance_first=rebalance_first,
            boot_seconds=boot_seconds,
            time_scale=time_scale,
            seed=seed,
            timeout_seconds=timeout,
            workdir=keep,
            keep_workdir=keep is not None,
        )
        options.validate()
        stop = StopRequest()
        with signals_unwind(stop):
            result = _run(console, options, stop, json_output=json_output, timeline=timeline)
    except KeyboardInterrupt as exc:  # Ctrl-C, or SIGTERM/SIGHUP through `signals_unwind`
        signum = exc.signum if isinstance(exc, Interrupted) else signal.SIGINT
        cleaned = "its processes were stopped" + ("" if keep else " and its scratch files removed")
        message = f"rehearsal interrupted by {signal.Signals(signum).name}: {cleaned}"
        _error(console, message, 128 + signum, json_output=json_output)
    except (RehearsalError, typer.BadParameter) as exc:  # a bad option: its own message
        _error(console, str(exc), EXIT_ERROR, json_output=json_output)
    except StackError as exc:  # no Node.js, a failing synth, a template without a resource
        _error(console, str(exc), EXIT_ERROR, json_output=json_output, brief=True)
    except Exception as exc:
        # A failure the rehearsal does not know (moto, botocore, a bug): an error, not a
        # verdict on the script; one line, with a way to see the traceback.
        if os.environ.get(ENV_DEBUG) == "1":
            raise
        message = f"unexpected error: {type(exc).__name__}: {exc}"
        hint = f"set {ENV_DEBUG}=1 for the traceback"
        _error(console, message, EXIT_ERROR, json_output=json_output, brief=True, hint=hint)
    if json_output:
        print(json.dumps(result, default=str))
    else:
        _print_report(console, result)
    raise typer.Exit(0 if result["verdict"] == "pass" else EXIT_FAIL)


def _run(
    console: Any, options: Any, stop: StopRequest, *, json_output: bool, timeline: Path | None
) -> dict[str, Any]:
    from trainctl.rehearse.scenario import rehearse

    if json_output:
        result = rehearse(options, stop=stop)
    else:
        with console.status("starting...") as status:
            result = rehearse(options, progress=lambda line: status.update(line), stop=stop)
    if timeline is not None:
        from trainctl.rehearse.timeline import TimelineUnavailable, write_png

        try:
            write_png(result, timeline)
            result["timeline_png"] = str(timeline)
        except TimelineUnavailable as exc:
            console.print(f"[yellow]{exc}[/yellow]")
    return result


def _error(
    console: Any, message: str, code: int, *, json_output: bool, brief: bool = False, hint: str | None = None
) -> NoReturn:
    """Report that the rehearsal reached no verdict, and exit with `code`.

    `brief`: on the terminal, only the message's first and last lines (the stack's and
    botocore's errors carry a long tail, which `--json` keeps whole).
    """
    if json_output:
        print(json.dumps({"verdict": "error", "error": message, "hint": hint, "exit_code": code}))
        sys.stdout.flush()
    else:
        from rich.markup import escape

        shown = _one_line(message) if brief else message
        # Escaped: a tool's message may hold brackets that rich would read as markup.
        console.print(f"[red]rehearsal error:[/red] {escape(shown)}", soft_wrap=True)
        if hint:
            console.print(f"[dim]hint: {escape(hint)}[/dim]")
    raise typer.Exit(code)


def _one_line(message: str) -> str:
    """A long message's first and last lines (where a tool's stderr states its error)."""
    lines = [line.strip() for line in message.strip().splitlines() if line.strip()]
    if len(lines) <= 1:
        return lines[0] if lines else message
    return f"{lines[0]} ... {lines[-1]}"


def _short_pool(label: str | None) -> str:
    """`m5.large@us-east-1a` as `m5.large@1a`: the table must fit an 80-column terminal."""
    if not label:
        return "-"
    instance_type, _, zone = label.partition("@")
    return f"{instance_type}@{zone[-2:]}" if zone else instance_type


def _print_report(console: Any, result: dict[str, Any]) -> None:
    from rich import box
    from rich.table import Table

    table = Table(
        title=f"{Path(result['script']).name}: {result['interruptions']} interruption(s)",
        box=box.SIMPLE_HEAD,
        pad_edge=False,
        show_edge=False,
        collapse_padding=True,
    )
    for column in ("#", "kind", "pool→replacement", "lost", "from step", "checkpoint", "recovery"):
        table.add_column(column, no_wrap=True)
    for detail in result["interruption_details"]:
        recovery = detail["recovery_seconds"]
        table.add_row(
            str(detail["index"] + 1),
            detail["kind"],
            f"{_short_pool(detail['pool'])}→{_short_pool(detail['replacement_pool'])}",
            "-" if detail["lost_steps"] is None else str(detail["lost_steps"]),
            "-" if detail["resume_step"] is None else str(detail["resume_step"]),
            str(detail["checkpoint_kind"]),
            "-" if recovery is None else f"{recovery:.1f} s",
        )
    console.print(table)
    # soft_wrap: a hash is copied whole, never broken across lines.
    console.print("sha256 of the final artifact:")
    console.print(f"  reference {result['reference_sha256']}", soft_wrap=True)
    console.print(f"  rehearsal {result['final_sha256']}", soft_wrap=True)
    console.print(
        f"identical: {result['identical']}; replacements {result['replacements']}, "
        f"duplicates {result['duplicate_replacements']}, RunInstances calls {len(result['pools_tried'])}, "
        f"wall {result['wall_seconds']:.0f} s"
    )
    if result.get("timeline_png"):
        console.print(f"timeline: {result['timeline_png']}")
    for reason in result["reasons"]:
        console.print(f"[red]- {reason}[/red]")
    if result.get("divergence"):
        console.print(f"[red]  {result['divergence']}[/red]")
    colour = "green" if result["verdict"] == "pass" else "red"
    console.print(f"verdict: [bold {colour}]{result['verdict']}[/bold {colour}]")


def register(app: typer.Typer) -> None:
    """Add `rehearse` to the trainctl CLI."""
    app.command("rehearse")(rehearse_command)
