"""`trainctl rehearse`: the scenarios of issue 6, each a full offline recovery."""

from __future__ import annotations

import re
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from tests.rehearse.conftest import assert_recovered
from trainctl.rehearse.scenario import EXAMPLES_DIR, Options, RehearsalError, resolve_script
from trainctl.rehearse.stack import REHEARSAL_CONTEXT, load_stack

Run = Callable[..., dict[str, Any]]


def test_demo_scenario_passes_with_no_lost_steps_for_the_noticed_interruption(
    cli: Callable[..., tuple[int, dict[str, Any]]], tmp_path: Path
) -> None:
    # What `make demo` runs: two interruptions, the second without notice.
    png = tmp_path / "timeline.png"
    code, report = cli("--interruptions", "2", "--no-notice", "1", "--timeline", str(png))

    assert code == 0
    assert_recovered(report, 2)
    notice, lost = report["interruption_details"]
    assert (notice["kind"], lost["kind"]) == ("notice", "no-notice")
    # The noticed one resumes from the checkpoint taken on the notice: nothing redone.
    assert report["checkpoint_kinds"] == ["final", "fallback"]
    assert report["lost_steps"][0] == 0
    assert notice["resume_step"] == notice["last_step"]
    assert notice["breakdown_seconds"]["checkpoint_durable"] is not None
    # Without notice (the no-notice scenario): nobody is warned, the replacement resumes
    # from the newest periodic checkpoint (every 20 steps), at most what was trained.
    assert lost["resume_step"] % 20 == 0 and 0 < lost["resume_step"] <= lost["last_step"]
    assert lost["breakdown_seconds"]["ssm_delivered"] is None
    assert lost["breakdown_seconds"]["checkpoint_durable"] is None
    assert report["ssm_deliveries"] == 1  # the noticed interruption's only
    # Every replacement went to another pool than the one being reclaimed.
    assert all(d["replacement_pool"] != d["pool"] for d in report["interruption_details"])
    # The pools are the instance types the synthesized stack allows (its rehearsal stage).
    allowed = load_stack().allowed_instance_types
    assert allowed == REHEARSAL_CONTEXT["trainctl:allowed_instance_types"].split(",")
    assert {p["pool"].split("@")[0] for p in report["pools_tried"]} <= set(allowed)
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_three_interruptions_at_chosen_fractions(run: Run) -> None:
    report = run(interruptions=3, at=[0.2, 0.45, 0.7], environment={"TRAIN_STEPS": "300"})

    assert_recovered(report, 3)
    assert report["checkpoint_kinds"] == ["final", "final", "final"]
    assert report["lost_steps"] == [0, 0, 0]
    details = report["interruption_details"]
    # Each interruption came no earlier than its fraction of the reference's 300 steps.
    assert [d["last_step"] >= threshold for d, threshold in zip(details, (60, 135, 210), strict=True)] == [
        True
    ] * 3
    assert [d["attempt"] for d in details] == [0, 1, 2]
    assert [d["resume_step"] for d in details] == sorted(d["resume_step"] for d in details)


def test_duplicate_events_launch_one_replacement_per_loss(run: Run) -> None:
    report = run(interruptions=2, no_notice=1, duplicate_events=True)

    assert_recovered(report, 2)
    # Every event went through EventBridge twice and each delivery was handed over twice.
    assert report["handler_invocations"] >= 2 * report["events_emitted"]
    instances = report["per_job"][0]["instances"]
    assert sorted(i["attempt"] for i in instances) == [0, 1, 2]


def test_capacity_errors_move_the_replacement_to_a_fallback_pool(run: Run) -> None:
    # The first job pool (m5.large in zone a) has no capacity: the launch falls through to
    # the next pool, and so does every replacement that would land there.
    report = run(interruptions=1, capacity_errors=["m5.large@us-east-1a"])

    assert_recovered(report, 1)
    refused = [p for p in report["pools_tried"] if p["result"] == "InsufficientInstanceCapacity"]
    assert refused and {p["pool"] for p in refused} == {"m5.large@us-east-1a"}
    used = {i["pool"] for i in report["per_job"][0]["instances"]}
    assert "m5.large@us-east-1a" not in used
    assert report["checkpoint_kinds"] == ["final"]


def test_a_script_that_does_not_restore_its_data_position_fails_and_says_where(
    run: Run, tmp_path: Path
) -> None:
    # A user bug: the model and optimizer are restored, the data position is not.
    source = (EXAMPLES_DIR / "tiny_train.py").read_text()
    buggy = source.replace(
        "        state = restored\n",
        "        state = restored\n        state['epoch'], state['batch'] = 0, 0  # forgot the position\n",
    )
    assert buggy != source
    script = tmp_path / "my_train.py"
    script.write_text(buggy)

    report = run(script, interruptions=1)

    assert report["verdict"] == "fail"
    assert report["identical"] is False
    assert report["final_sha256"] != report["reference_sha256"]
    assert any("final artifact differs" in reason for reason in report["reasons"])
    resumed_from = report["interruption_details"][0]["resume_step"]
    match = re.search(
        r"diverged after step (\d+): the checkpoint at step (\d+) \(written by attempt 1, which resumed "
        r"from step (\d+)\)",
        report["divergence"],
    )
    assert match, report["divergence"]
    # Everything up to the resume matches the reference; the first checkpoint after it does not.
    last_same, first_different, named = (int(g) for g in match.groups())
    assert named == resumed_from
    assert last_same <= resumed_from < first_different


def test_the_cli_exits_non_zero_on_fail(
    cli: Callable[..., tuple[int, dict[str, Any]]], tmp_path: Path
) -> None:
    script = tmp_path / "forgets_everything.py"
    # Restores nothing at all: every attempt starts over from step 0.
    script.write_text(
        (EXAMPLES_DIR / "tiny_train.py")
        .read_text()
        .replace("    restored = ckpt.restore()\n", "    restored = None\n    ckpt.restore()\n")
    )
    code, report = cli(str(script), "--interruptions", "1", "--timeout", "200")
    assert code == 1
    assert report["verdict"] == "fail"
    # The replacement threw the noticed interruption's work away and started over: the
    # final model may even be identical (it is deterministic from scratch), but the steps
    # trained before the notice were all redone.
    detail = report["interruption_details"][0]
    assert detail["resume_step"] == 0
    assert report["lost_steps"][0] == detail["last_step"] > 0
    assert any(f"lost {detail['last_step']} steps" in reason for reason in report["reasons"]), report[
        "reasons"
    ]


def test_bad_options_are_refused_with_the_reason() -> None:
    with pytest.raises(RehearsalError, match="no such script or example: 'nope'"):
        resolve_script("nope")
    with pytest.raises(RehearsalError, match="--no-notice 3 must be between 0 and --interruptions"):
        Options(script=resolve_script(None), interruptions=2, no_notice=3).validate()
    with pytest.raises(RehearsalError, match="--at gives 1 fraction"):
        Options(script=resolve_script(None), interruptions=2, at=[0.5]).validate()


@pytest.mark.timeout(240)
def test_burst_of_twenty_jobs_interrupted_at_once(run: Run) -> None:
    report = run(
        jobs=20,
        interruptions=1,
        simultaneous=True,
        # As soon as every job trains: 40 Python processes start slowly on 2 cores, so each
        # trains ~20 s (sleep-bound), longer than the spread of their starts.
        at=[0.02],
        boot_seconds=0.5,
        # A 30 s notice (a quarter of AWS's 120 s): twenty handlers, resume executions and
        # final checkpoints all land in it, on two cores shared by forty processes and moto.
        time_scale=0.25,
        environment={"TRAIN_STEPS": "400", "TRAIN_STEP_SECONDS": "0.05", "TRAIN_CHECKPOINT_EVERY": "50"},
    )

    assert report["verdict"] == "pass", report["reasons"]
    assert report["jobs"] == 20
    assert report["interruptions"] == 20
    assert report["replacements"] == 20
    assert report["duplicate_replacements"] == 0
    assert report["identical"] is True
    assert all(job["status"] == "SUCCEEDED" for job in report["per_job"])
    details = report["interruption_details"]
    assert all(d["recovery_seconds"] is not None for d in details)
    # All twenty warnings were issued in the same tick of the loop, within a second, far
    # inside one notice period: the interruptions really overlapped.
    assert len({d["tick"] for d in details}) == 1
    noticed = [d["noticed_at"] for d in details]
    assert max(noticed) - min(noticed) < 1.0 < report["notice_seconds"]
    # Each warning's checkpoint command reached its own instance and no other (every
    # command record checked, not their count)...
    delivered = [(c["job_id"], c["instance_id"]) for c in report["ssm_commands"] if c["delivered_at"]]
    assert set(delivered) == {(d["job_id"], d["instance_id"]) for d in details}
    # ...once, unless a handler invocation failed after sending it and was retried
    # (EventBridge's at-least-once delivery, which the handlers must tolerate).
    assert len(delivered) == 20 or report["handler_errors"] > 0


def test_rebalance_first_checkpoints_keeps_training_then_survives_the_warning(run: Run) -> None:
    # A rebalance recommendation asks for a checkpoint but does not end training (the
    # default policy, on_rebalance: checkpoint); the warning that follows takes the final one.
    # Early, in a longer run: the rebalance's checkpoint command (a CLI process start) must
    # be done, and training gone on past it, well before the job would end.
    report = run(interruptions=1, at=[0.3], rebalance_first=True, environment={"TRAIN_STEPS": "400"})

    assert_recovered(report, 1)
    (detail,) = report["interruption_details"]
    assert detail["kind"] == "rebalance+notice"
    assert detail["rebalance_at"] < detail["noticed_at"]
    # The rebalance's checkpoint was made durable, and training went on past it...
    assert detail["rebalance_checkpoint_step"] is not None
    assert detail["last_step"] > detail["rebalance_checkpoint_step"]
    # ...until the warning, whose final checkpoint the replacement resumed from.
    assert report["checkpoint_kinds"] == ["final"]
    assert report["lost_steps"] == [0]
    assert detail["resume_step"] == detail["last_step"]
    # Two checkpoint commands, both to this instance: the rebalance's and the warning's.
    assert report["ssm_deliveries"] == 2


def test_the_torch_example_rehearses_too(run: Run) -> None:
    pytest.importorskip("torch")
    # Long enough (~8 s) that the warning, injected when a heartbeat (about one a second)
    # shows half the steps done, reaches a run that is still training: with 120 steps the
    # run could finish before the notice, and the replacement resumed from a fallback.
    report = run(
        "train",
        interruptions=1,
        environment={"TRAIN_STEPS": "400", "TRAIN_CHECKPOINT_EVERY": "20", "TRAIN_STEP_SECONDS": "0.02"},
    )

    assert_recovered(report, 1)
    assert report["lost_steps"] == [0]
    assert report["checkpoint_kinds"] == ["final"]
