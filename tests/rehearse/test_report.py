"""The human report of `trainctl rehearse`: what a newcomer reads after `make demo`."""

from __future__ import annotations

from typing import Any

from rich.console import Console

from trainctl.rehearse.command import _print_report


def _report(**overrides: Any) -> dict[str, Any]:
    detail = {
        "index": 0,
        "kind": "no-notice",
        "pool": "m5.large@us-east-1a",
        "replacement_pool": "c5.large@us-east-1b",
        "lost_steps": 7,
        "resume_step": 180,
        "checkpoint_kind": "fallback",
        "recovery_seconds": 12.25,
    }
    return {
        "script": "/somewhere/tiny_train.py",
        "interruptions": 1,
        "interruption_details": [detail],
        "reference_sha256": "ab" * 32,
        "final_sha256": "cd" * 32,
        "identical": False,
        "replacements": 1,
        "duplicate_replacements": 0,
        "pools_tried": [{}],
        "wall_seconds": 30.1,
        "reasons": ["final artifact differs from the reference"],
        "verdict": "fail",
        **overrides,
    }


def test_the_report_fits_80_columns_without_truncating_a_value() -> None:
    console = Console(width=80, record=True, color_system=None)

    _print_report(console, _report())

    text = console.export_text()
    assert all(len(line) <= 80 for line in text.splitlines())
    assert "…" not in text
    # Every value of the row is there whole; hashes stay on one line so they can be compared.
    for value in ("no-notice", "m5.large@1a→c5.large@1b", "180", "fallback", "12.2 s"):
        assert value in text
    assert f"reference {'ab' * 32}" in text
    assert f"rehearsal {'cd' * 32}" in text
    assert "final artifact differs" in text
    assert text.rstrip().endswith("verdict: fail")


def test_a_loss_with_no_replacement_yet_shows_dashes_not_none() -> None:
    console = Console(width=80, record=True, color_system=None)
    report = _report()
    report["interruption_details"][0].update(
        replacement_pool=None, lost_steps=None, resume_step=None, recovery_seconds=None
    )

    _print_report(console, report)

    text = console.export_text()
    assert "None" not in text
    assert "m5.large@1a→-" in text
