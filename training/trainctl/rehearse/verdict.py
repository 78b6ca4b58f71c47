"""The verdict: did the interrupted run produce what an uninterrupted run produces?

Pure functions over what the rehearsal (or the opt-in AWS suite, tests/e2e) observed, so
both judge a run the same way:

* the final artifact is byte-identical to the reference run's (sha256), and so are the
  files of the final checkpoint;
* no noticed interruption lost a step (lost steps = the last step trained before the loss
  minus the step the next attempt resumed from);
* every interruption was recovered by exactly one replacement;
* every checkpoint command went to an instance its job was warned about, and no other.

When the artifacts differ, `divergence` compares the checkpoints both runs wrote at the
same steps (file hashes from their manifests) and names the first step that differs and
which attempt wrote it, so a user sees where their resume logic goes wrong.
"""

from __future__ import annotations

import hashlib
from collections import Counter
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from trainctl_core import checkpoints as layout
from trainctl_core.checkpoints import CheckpointStorage

Digests = dict[int, tuple[int, frozenset[tuple[str, str]]]]  # step -> (attempt, {(path, hash)})


@dataclass
class InterruptionOutcome:
    """One injected interruption and what followed it."""

    index: int
    job_id: str
    attempt: int
    instance_id: str
    pool: str
    kind: str  # "notice" | "rebalance+notice" | "no-notice"
    noticed_at: float
    ssm_delivered_at: float | None = None
    checkpoint_started_at: float | None = None
    checkpoint_durable_at: float | None = None
    replacement_launched_at: float | None = None
    replacement_booted_at: float | None = None
    running_at: float | None = None
    resumed_at: float | None = None
    killed_at: float | None = None
    last_step: int | None = None
    resume_step: int | None = None
    checkpoint_kind: str | None = None
    replacement_pool: str | None = None

    @property
    def noticed(self) -> bool:
        return self.kind != "no-notice"

    @property
    def lost_steps(self) -> int | None:
        return lost_steps(self.last_step, self.resume_step)

    @property
    def recovery_seconds(self) -> float | None:
        if self.resumed_at is None:
            return None
        return round(self.resumed_at - self.noticed_at, 3)

    def since_notice(self, moment: float | None) -> float | None:
        return None if moment is None else round(moment - self.noticed_at, 3)

    def overhead_seconds(self, boot_seconds: float) -> float | None:
        """trainctl's own share of the recovery: what is left of it after the instance's
        boot and the final checkpoint (notice -> durable), both of which it waits for but
        does not do. None: not recovered, or no final checkpoint to subtract."""
        durable = self.since_notice(self.checkpoint_durable_at)
        if self.recovery_seconds is None or durable is None:
            return None
        return round(self.recovery_seconds - boot_seconds - durable, 3)

    def as_dict(self) -> dict[str, Any]:
        return {
            "index": self.index,
            "job_id": self.job_id,
            "attempt": self.attempt,
            "instance_id": self.instance_id,
            "pool": self.pool,
            "kind": self.kind,
            "last_step": self.last_step,
            "resume_step": self.resume_step,
            "lost_steps": self.lost_steps,
            "checkpoint_kind": self.checkpoint_kind,
            "replacement_pool": self.replacement_pool,
            "recovery_seconds": self.recovery_seconds,
            "breakdown_seconds": {
                "ssm_delivered": self.since_notice(self.ssm_delivered_at),
                "checkpoint_started": self.since_notice(self.checkpoint_started_at),
                "checkpoint_durable": self.since_notice(self.checkpoint_durable_at),
                "replacement_launched": self.since_notice(self.replacement_launched_at),
                "replacement_booted": self.since_notice(self.replacement_booted_at),
                "running": self.since_notice(self.running_at),
                "training_resumed": self.since_notice(self.resumed_at),
                "killed": self.since_notice(self.killed_at),
            },
        }


@dataclass
class Verdict:
    passed: bool
    reasons: list[str] = field(default_factory=list)
    divergence: str | None = None

    @property
    def word(self) -> str:
        return "pass" if self.passed else "fail"


def lost_steps(last_step: int | None, resume_step: int | None) -> int | None:
    """Steps that had to be redone: trained before the loss, not in the resume point."""
    if last_step is None:
        return None
    return max(0, last_step - (resume_step or 0))


def sha256_file(path: str) -> str | None:
    try:
        with open(path, "rb") as handle:
            return hashlib.file_digest(handle, "sha256").hexdigest()
    except FileNotFoundError:
        return None


def checkpoint_digests(storage: CheckpointStorage, job_id: str) -> Digests:
    """Every verified-manifest checkpoint of `job_id`: step -> (attempt, file hashes).

    Two attempts may hold a checkpoint of one step: the newer attempt's counts (listed last).
    """
    found: Digests = {}
    for checkpoint in storage.list_checkpoints():
        raw = storage.read_manifest(checkpoint)
        if raw is None:
            continue
        try:
            manifest = layout.parse_manifest_at(raw, checkpoint, job_id=job_id)
        except layout.InvalidManifest:
            continue
        found[checkpoint.step] = (manifest.attempt, frozenset((f.path, f.xxh3_128) for f in manifest.files))
    return found


def divergence(
    reference: Digests, run: Digests, resumed_from: Mapping[int, int | None] | None = None
) -> str | None:
    """Where the run's checkpoints first differ from the reference's, in words (None: nowhere).

    `resumed_from` maps an attempt to the step it resumed from, so the message can say
    which resume went wrong.
    """
    common = sorted(set(reference) & set(run))
    last_same: int | None = None
    for step in common:
        if reference[step][1] != run[step][1]:
            attempt = run[step][0]
            since = (
                f"after step {last_same}" if last_same is not None else "before the first common checkpoint"
            )
            resumed = (resumed_from or {}).get(attempt)
            how = f", which resumed from step {resumed}" if resumed is not None else ""
            return (
                f"the runs diverged {since}: the checkpoint at step {step} "
                f"(written by attempt {attempt}{how}) differs from the uninterrupted run's at the same step"
            )
        last_same = step
    return None


def judge(
    *,
    reference_sha256: str | None,
    final_sha256: str | None,
    job_status: str,
    outcomes: Sequence[InterruptionOutcome],
    planned: int,
    duplicate_replacements: int,
    reference_digests: Digests | None = None,
    run_digests: Digests | None = None,
    failure_reason: str | None = None,
    parked_events: int = 0,
    replaced_attempts: int | None = None,
) -> Verdict:
    reasons: list[str] = []
    ended = job_status in ("SUCCEEDED", "FAILED", "CANCELLED")
    if job_status != "SUCCEEDED":
        # Not ended: it stalled, or the run was given up on (timeout).
        state = f"the job ended {job_status}" if ended else f"the job was still {job_status}"
        reasons.append(state + (f": {failure_reason}" if failure_reason else ""))
    if len(outcomes) < planned:
        reasons.append(
            f"only {len(outcomes)} of {planned} interruptions could be injected before the job "
            + ("ended" if ended else "was given up on")
        )
    identical = reference_sha256 is not None and reference_sha256 == final_sha256
    where = None
    if job_status == "SUCCEEDED" and not identical:
        if final_sha256 is None:
            reasons.append("the interrupted run wrote no final artifact (TRAIN_OUTPUT)")
        else:
            reasons.append("the final artifact differs from the uninterrupted run's")
        if reference_digests is not None and run_digests is not None:
            where = divergence(
                reference_digests, run_digests, {o.attempt + 1: o.resume_step for o in outcomes}
            )
            if where is None:
                final_step = max(run_digests, default=None)
                where = (
                    "every checkpoint both runs wrote matches; the difference comes after the last "
                    f"checkpoint (step {final_step}) or from state the checkpoint does not hold"
                )
    for outcome in outcomes:
        if outcome.resumed_at is None and job_status == "SUCCEEDED":
            reasons.append(f"interruption {outcome.index + 1}: the replacement never resumed training")
        if outcome.noticed and (outcome.lost_steps or 0) > 0:
            reasons.append(
                f"interruption {outcome.index + 1} ({outcome.kind}) lost {outcome.lost_steps} steps "
                f"(trained to {outcome.last_step}, resumed from {outcome.resume_step}, "
                f"{outcome.checkpoint_kind})"
            )
    if duplicate_replacements:
        reasons.append(f"{duplicate_replacements} duplicate replacement instance(s) were launched")
    # A duplicate shares its attempt; a replacement of an instance nobody interrupted gets
    # an attempt of its own, so only counting the attempts finds it. (None: not counted,
    # e.g. on real AWS where a second, real interruption is possible.)
    if replaced_attempts is not None and replaced_attempts > len(outcomes):
        reasons.append(
            f"{replaced_attempts} replacement(s) for {len(outcomes)} interruption(s): "
            "an instance nobody interrupted was replaced"
        )
    if parked_events:
        reasons.append(f"{parked_events} event(s) failed in the handlers after every retry")
    return Verdict(passed=not reasons, reasons=reasons, divergence=where)


def command_problems(
    warned: Iterable[tuple[str, str, str]],
    commands: Iterable[Mapping[str, Any]],
    *,
    at_most_one_per_warning: bool = False,
) -> list[str]:
    """Checkpoint commands that went where they should not, in words (empty: none).

    `warned` holds (job id, instance id, kind) per interruption; `commands` one record
    per (command, addressed instance) with its `command_id`, `job_id` (the command's job
    parameter), `instance_id` and `delivered_at` (None: never ran there). A command must
    address an instance its job was warned about (a rebalance recommendation counts) and
    no other: a count of deliveries cannot tell a command that reached the wrong
    instance while the right one was missed. With `at_most_one_per_warning`, each warning
    (two for a rebalance followed by a warning) may also have been delivered once only.
    """
    allowed: Counter[tuple[str, str]] = Counter()
    for job_id, instance_id, kind in warned:
        if kind != "no-notice":
            allowed[(job_id, instance_id)] += 2 if kind == "rebalance+notice" else 1
    problems: list[str] = []
    delivered: Counter[tuple[str, str]] = Counter()
    for command in commands:
        key = (str(command.get("job_id")), str(command.get("instance_id")))
        if key not in allowed:
            problems.append(
                f"checkpoint command {command.get('command_id')} for job {key[0]} addressed "
                f"{key[1]}, an instance that job was not warned about"
            )
        elif command.get("delivered_at") is not None:
            delivered[key] += 1
    if at_most_one_per_warning:
        for (job_id, instance_id), count in sorted(delivered.items()):
            if count > allowed[(job_id, instance_id)]:
                problems.append(
                    f"{count} checkpoint commands for job {job_id} reached {instance_id}, "
                    f"warned {allowed[(job_id, instance_id)]} time(s)"
                )
    return problems


def summarize_pools(calls: Sequence[Mapping[str, Any]]) -> list[dict[str, Any]]:
    return [dict(call) for call in calls]
