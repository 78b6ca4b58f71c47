"""The offline rehearsal end to end: moto from the synthesized stack, real agents, real
handlers, the real resume workflow. Each test is one rehearsal of the tiny numpy example
with few steps; the verdict and its numbers are what a user reads, so they are what the
tests assert."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from typer.testing import CliRunner

from trainctl.rehearse.scenario import Options, rehearse, resolve_script

# Short runs: 200 steps of ~30 ms (progress reaches the agent once a second), checkpoints every 20.
FAST_TRAINING = {"TRAIN_STEPS": "200", "TRAIN_CHECKPOINT_EVERY": "20", "TRAIN_STEP_SECONDS": "0.025"}


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    here = Path(__file__).parent
    for item in items:
        if here in Path(str(item.fspath)).parents:
            item.add_marker(pytest.mark.timeout(300))
            if {"run", "cli"} & set(getattr(item, "fixturenames", ())):
                # Every rehearsal starts moto, the agents and the trainings: the slow tier.
                item.add_marker(pytest.mark.slow)


@pytest.fixture
def run(tmp_path: Path) -> Callable[..., dict[str, Any]]:
    """Run one rehearsal of tiny_train (or `script`) with `overrides`; returns the report."""

    def _run(script: str | Path | None = None, **overrides: Any) -> dict[str, Any]:
        environment = {**FAST_TRAINING, **overrides.pop("environment", {})}
        options = Options(
            script=resolve_script(str(script) if script else None),
            environment=environment,
            workdir=tmp_path / "rehearsal",
            keep_workdir=True,
            timeout_seconds=240,
            **overrides,
        )
        return rehearse(options)

    return _run


@pytest.fixture
def cli(monkeypatch: pytest.MonkeyPatch) -> Callable[..., tuple[int, dict[str, Any]]]:
    """`trainctl rehearse ... --json` through the real CLI; returns (exit code, report)."""
    from trainctl.cli import app

    for name, value in FAST_TRAINING.items():
        monkeypatch.setenv(name, value)

    def _cli(*args: str) -> tuple[int, dict[str, Any]]:
        result = CliRunner().invoke(app, ["rehearse", *args, "--json"])
        lines = [line for line in result.stdout.splitlines() if line.startswith("{")]
        assert lines, f"no JSON on stdout (exit {result.exit_code}): {result.output[-2000:]}"
        return result.exit_code, json.loads(lines[-1])

    return _cli


def assert_recovered(report: dict[str, Any], interruptions: int) -> None:
    """What every passing rehearsal shows, stated once."""
    assert report["verdict"] == "pass", report["reasons"]
    assert report["interruptions"] == interruptions
    assert report["identical"] is True
    assert report["final_sha256"] == report["reference_sha256"] is not None
    assert report["replacements"] == interruptions
    assert report["duplicate_replacements"] == 0
    assert report["handler_errors"] == 0
    assert all(seconds is not None and seconds > 0 for seconds in report["recovery_seconds"])
