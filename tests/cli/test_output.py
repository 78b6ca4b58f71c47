"""`reporting`: known failures become one line and an exit code; typer's own exits pass."""

from __future__ import annotations

import pytest
import typer

from trainctl.commands.output import reporting


def test_an_exit_raised_inside_a_command_keeps_its_code() -> None:
    # typer vendors its own click, so typer.Exit is not click's Exit: it must not be
    # reported as an "unexpected error" (exit 1).
    with pytest.raises(typer.Exit) as raised, reporting():
        raise typer.Exit(3)
    assert raised.value.exit_code == 3


def test_an_unexpected_error_is_one_line_and_exit_1(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(typer.Exit) as raised, reporting():
        raise KeyError("boom")
    assert raised.value.exit_code == 1
    assert "unexpected error: KeyError" in capsys.readouterr().err
