"""What the rehearsal and the recovery bench compute from what they observed: the phase
times of a recovery, the default timeout, the check of every checkpoint command, and
the handlers' metric state under concurrent invocations. No moto, no processes."""

from __future__ import annotations

import threading
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest

from bench.recovery import command_problems as bench_command_problems
from trainctl.rehearse import bridge, verdict
from trainctl.rehearse.instances import Fleet, FleetConfig
from trainctl.rehearse.scenario import (
    MIN_DEFAULT_TIMEOUT_SECONDS,
    REBALANCE_LEAD_SECONDS,
    Options,
    Rehearsal,
    default_timeout_seconds,
    resolve_script,
)
from trainctl_core.settings import SPOT_NOTICE_SECONDS

T0 = 1_800_000_000.0  # the warning, in epoch seconds


def _at(offset: float) -> str:
    """A row timestamp `offset` seconds after the warning, as the store writes them."""
    return datetime.fromtimestamp(T0 + offset, UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")


def _row(**fields: Any) -> dict[str, Any]:
    return {"job_id": "job-1", "failure_reason": None, **fields}


def test_recovery_phases_come_from_the_rows_own_timestamps_not_from_when_they_were_read(
    tmp_path: Path,
) -> None:
    # Given a rehearsal whose loop reads the row late every time (a loaded machine)
    rehearsal = Rehearsal(Options(script=resolve_script(None), interruptions=1, boot_seconds=1.0))
    track = rehearsal._plan("job-1", total_steps=200)
    fleet = Fleet(
        None,
        None,
        FleetConfig(
            boot_seconds=1.0,
            work_root=tmp_path,
            socket_root=tmp_path,
            jobs_table="jobs",
            bucket="bucket",
            region="us-east-1",
            training_command=["true"],
            environment={},
        ),
    )
    final = {"step": 120, "prefix": "job-1/ckpt/000000000120/", "attempt": 0, "created_at": _at(0.3)}
    rehearsal._observe(
        track, _row(status="LAUNCHING", attempt=0, instance_id="i-a", updated_at=_at(-30)), fleet, T0 - 20
    )
    rehearsal._observe(
        track,
        _row(
            status="RUNNING",
            attempt=0,
            instance_id="i-a",
            updated_at=_at(-15),
            heartbeat_at=_at(-0.5),
            heartbeat_step=118,
        ),
        fleet,
        T0 - 0.2,
    )
    # When the warning comes, the final checkpoint is begun at +0.3 s and recorded at
    # +0.7 s, but the loop reads it only at +2.0 s
    plan = track.plans[0]
    plan.outcome = verdict.InterruptionOutcome(
        index=0,
        job_id="job-1",
        attempt=0,
        instance_id="i-a",
        pool="m5.large@us-east-1a",
        kind="notice",
        noticed_at=T0,
    )
    rehearsal._observe(
        track,
        _row(
            status="INTERRUPTED",
            attempt=0,
            instance_id="i-a",
            updated_at=_at(0.7),
            heartbeat_at=_at(0.2),
            heartbeat_step=120,
            last_checkpoint=final,
            final_checkpoint=final,
        ),
        fleet,
        T0 + 2.0,
    )
    # ...the replacement attempt goes RUNNING at +3.8 s (read at +5.0 s) and reports its
    # first step at +4.4 s (read at +6.0 s)
    resume = {"kind": "final", "step": 120, "prefix": final["prefix"]}
    rehearsal._observe(
        track,
        _row(status="LAUNCHING", attempt=1, instance_id="i-b", updated_at=_at(2.9), resume_point=resume),
        fleet,
        T0 + 3.0,
    )
    rehearsal._observe(
        track,
        _row(status="RUNNING", attempt=1, instance_id="i-b", updated_at=_at(3.8), resume_point=resume),
        fleet,
        T0 + 5.0,
    )
    rehearsal._observe(
        track,
        _row(
            status="RUNNING",
            attempt=1,
            instance_id="i-b",
            updated_at=_at(3.8),
            resume_point=resume,
            heartbeat_at=_at(4.4),
            heartbeat_step=121,
        ),
        fleet,
        T0 + 6.0,
    )

    # Then every phase is the moment its own record says, on the same clock
    phases = plan.outcome.as_dict()["breakdown_seconds"]
    assert phases["checkpoint_started"] == 0.3
    assert phases["checkpoint_durable"] == 0.7
    assert phases["running"] == 3.8
    assert phases["training_resumed"] == 4.4
    assert plan.outcome.recovery_seconds == 4.4
    # ...and trainctl's overhead is what is left after the boot and the final checkpoint
    assert plan.outcome.overhead_seconds(boot_seconds=1.0) == pytest.approx(4.4 - 1.0 - 0.7)
    assert (plan.outcome.lost_steps, plan.outcome.checkpoint_kind) == (0, "final")


def test_a_checkpoint_recorded_before_a_later_write_is_bounded_by_that_write_and_its_own_start() -> None:
    # The row's `updated_at` may belong to a write after the checkpoint's (an upper
    # bound); it is never taken as earlier than the checkpoint began.
    outcome = verdict.InterruptionOutcome(
        index=0, job_id="j", attempt=0, instance_id="i", pool="p", kind="notice", noticed_at=T0
    )
    assert outcome.overhead_seconds(boot_seconds=1.0) is None  # not recovered yet
    outcome.resumed_at = T0 + 3.0
    assert outcome.overhead_seconds(boot_seconds=1.0) is None  # nothing durable to subtract


def test_the_default_timeout_leaves_room_for_the_rebalance_lead_at_real_timings() -> None:
    script = resolve_script(None)
    # At AWS's own timings a warning may trail its rebalance recommendation by ten minutes,
    # as long as the old fixed default timeout: the default must cover it, per interruption.
    real = Options(script=script, interruptions=2, rebalance_first=True, time_scale=1.0)
    needed = 2 * (REBALANCE_LEAD_SECONDS + SPOT_NOTICE_SECONDS) + 3 * 20.0  # three 20 s attempts
    assert default_timeout_seconds(real, reference_seconds=20.0) > needed
    assert default_timeout_seconds(real, reference_seconds=20.0) > MIN_DEFAULT_TIMEOUT_SECONDS
    # A long script gets a longer default; a quick demo keeps the floor.
    quick = Options(script=script, interruptions=2)
    assert default_timeout_seconds(quick, reference_seconds=10.0) == MIN_DEFAULT_TIMEOUT_SECONDS
    assert default_timeout_seconds(quick, reference_seconds=600.0) >= 3 * 600.0
    # Jobs that share the cores take longer than one alone.
    burst = Options(script=script, interruptions=1, jobs=20)
    single = Options(script=script, interruptions=1)
    assert default_timeout_seconds(burst, 120.0, cpus=2) > default_timeout_seconds(single, 120.0, cpus=2)
    # A timeout given explicitly wins.
    assert Options(script=script, timeout_seconds=42.0).timeout_for(reference_seconds=600.0) == 42.0
    assert quick.timeout_for(reference_seconds=10.0) == MIN_DEFAULT_TIMEOUT_SECONDS


def _command(job: str, instance: str, *, delivered: bool = True, command_id: str = "c") -> dict[str, Any]:
    return {
        "command_id": command_id,
        "job_id": job,
        "instance_id": instance,
        "delivered_at": 1.0 if delivered else None,
    }


def test_a_command_that_reached_the_wrong_instance_is_caught_even_when_the_count_matches() -> None:
    warned = [("job-a", "i-a", "notice"), ("job-b", "i-b", "notice")]
    # Two warnings, two deliveries: a count would pass. But job-b's command reached
    # job-a's instance, and job-b's own instance got nothing.
    commands = [_command("job-a", "i-a", command_id="c1"), _command("job-b", "i-a", command_id="c2")]

    problems = verdict.command_problems(warned, commands)

    assert problems == [
        "checkpoint command c2 for job job-b addressed i-a, an instance that job was not warned about"
    ]
    assert verdict.command_problems(warned, [_command("job-a", "i-a"), _command("job-b", "i-b")]) == []


def test_each_warning_is_delivered_once_when_asked_and_a_rebalance_counts_as_one_more() -> None:
    warned = [("job-a", "i-a", "notice"), ("job-r", "i-r", "rebalance+notice"), ("job-n", "i-n", "no-notice")]
    twice = [_command("job-a", "i-a"), _command("job-a", "i-a")]
    # Duplicate events may legitimately ask twice; the burst (no duplicates) may not.
    assert verdict.command_problems(warned, twice) == []
    assert verdict.command_problems(warned, twice, at_most_one_per_warning=True) == [
        "2 checkpoint commands for job job-a reached i-a, warned 1 time(s)"
    ]
    # The rebalance's command and the warning's both go to the instance.
    rebalanced = [_command("job-r", "i-r"), _command("job-r", "i-r")]
    assert verdict.command_problems(warned, rebalanced, at_most_one_per_warning=True) == []
    # A command sent too late (never delivered) is fine; one for a loss without notice is not.
    assert verdict.command_problems(warned, [_command("job-a", "i-a", delivered=False)]) == []
    assert len(verdict.command_problems(warned, [_command("job-n", "i-n")])) == 1


def test_the_bench_fails_a_burst_whose_command_reached_another_jobs_instance() -> None:
    report = {
        "interruption_details": [
            {"job_id": "job-a", "instance_id": "i-a", "kind": "notice"},
            {"job_id": "job-b", "instance_id": "i-b", "kind": "notice"},
        ],
        "ssm_commands": [_command("job-a", "i-a"), _command("job-b", "i-a")],
    }
    assert len(bench_command_problems(report)) == 1
    report["ssm_commands"] = [_command("job-a", "i-a"), _command("job-b", "i-b", delivered=False)]
    assert bench_command_problems(report) == []


def test_concurrent_invocations_each_see_only_their_own_metrics() -> None:
    from trainctl_core.observability import metrics

    barrier = threading.Barrier(2)
    seen: dict[str, tuple[dict[str, Any], dict[str, str]]] = {}

    def invocation(outcome: str, count: int) -> None:
        # What a handler's `report()` does, then what the rehearsal's wrapper does.
        metrics.add_dimension(name="outcome", value=outcome)
        for _ in range(count):
            metrics.add_metric(name="Events", unit="Count", value=1)
        barrier.wait()  # both have added theirs before either reads or clears
        provider = metrics.provider
        seen[outcome] = (
            {k: list(v["Value"]) for k, v in provider.metric_set.items()},
            dict(provider.dimension_set),
        )
        barrier.wait()
        metrics.clear_metrics()

    with bridge.isolated_metrics():
        threads = [
            threading.Thread(target=invocation, args=("resume-started", 1)),
            threading.Thread(target=invocation, args=("ignored-stale", 3)),
        ]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()

    assert seen["resume-started"][0] == {"Events": [1.0]}
    assert seen["resume-started"][1]["outcome"] == "resume-started"
    assert seen["ignored-stale"][0] == {"Events": [1.0, 1.0, 1.0]}
    assert seen["ignored-stale"][1]["outcome"] == "ignored-stale"
    # Afterwards the shared state is Powertools' own again, untouched.
    assert isinstance(metrics.provider.metric_set, dict)
    assert "outcome" not in metrics.provider.dimension_set


def test_a_replacement_nobody_asked_for_fails_the_verdict() -> None:
    # A duplicate shares its attempt; an instance replaced without an interruption gets an
    # attempt of its own, and only counting the attempts catches it.
    outcome = verdict.InterruptionOutcome(
        index=0,
        job_id="j",
        attempt=0,
        instance_id="i",
        pool="p",
        kind="notice",
        noticed_at=T0,
        resumed_at=T0 + 3.0,
        last_step=50,
        resume_step=50,
        checkpoint_kind="final",
    )
    common: dict[str, Any] = {
        "reference_sha256": "a" * 64,
        "final_sha256": "a" * 64,
        "job_status": "SUCCEEDED",
        "outcomes": [outcome],
        "planned": 1,
        "duplicate_replacements": 0,
    }
    assert verdict.judge(**common, replaced_attempts=1).passed
    extra = verdict.judge(**common, replaced_attempts=2)
    assert not extra.passed
    assert extra.reasons == [
        "2 replacement(s) for 1 interruption(s): an instance nobody interrupted was replaced"
    ]
