"""Choosing the resume point: the newest checkpoint whose manifest verifies, with every
kind of partial or corrupt checkpoint skipped by name, and retention that never deletes
what a resume may still need.

Storage is an in-memory fake of `CheckpointStorage` (no S3, no sockets); the files a
"fetch" hands back are written to tmp_path, because verification hashes local files.
Manifest parsing basics and the simple selection cases live in
tests/training/test_checkpoint_layout.py; this file covers the composed decision.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable, Sequence
from datetime import UTC, datetime
from pathlib import Path

import pytest

from trainctl_core import checkpoints as ck

JOB = "job-1"
CREATED = datetime(2026, 12, 3, 12, 0, tzinfo=UTC)


def C(step: int, attempt: int = 0) -> ck.CheckpointId:
    return ck.CheckpointId(step, attempt)


class MemoryStorage:
    """`CheckpointStorage` in a dict: {checkpoint: {relative path: bytes}}, manifest included."""

    def __init__(self) -> None:
        self.objects: dict[ck.CheckpointId, dict[str, bytes]] = {}
        self.deleted: list[ck.CheckpointId] = []

    # --- writing helpers for the tests ---

    def save(
        self, step: int, files: dict[str, bytes], *, manifest: bool = True, attempt: int = 0, **fields: object
    ) -> None:
        self.objects[C(step, attempt)] = dict(files)
        if manifest:
            made = make_manifest(step, files, attempt=attempt, **fields)
            self.objects[C(step, attempt)][ck.MANIFEST_NAME] = made.to_json()

    # --- the protocol ---

    def describe(self, checkpoint: ck.CheckpointId) -> str:
        return f"memory://{ck.checkpoint_prefix(JOB, checkpoint)}"

    def list_checkpoints(self) -> list[ck.CheckpointId]:
        return sorted(self.objects)

    def read_manifest(self, checkpoint: ck.CheckpointId) -> bytes | None:
        return self.objects.get(checkpoint, {}).get(ck.MANIFEST_NAME)

    def put_files(
        self, checkpoint: ck.CheckpointId, files: Sequence[tuple[str, str]], cancelled: Callable[[], bool]
    ) -> None:
        for local, relative in files:
            self.objects.setdefault(checkpoint, {})[relative] = Path(local).read_bytes()

    def put_manifest(self, checkpoint: ck.CheckpointId, manifest: bytes) -> None:
        self.objects.setdefault(checkpoint, {})[ck.MANIFEST_NAME] = manifest

    def fetch(
        self, checkpoint: ck.CheckpointId, files: Sequence[ck.ManifestFile], dest_dir: str
    ) -> dict[str, str]:
        paths: dict[str, str] = {}
        for entry in files:
            data = self.objects.get(checkpoint, {}).get(entry.path)
            if data is None:
                raise ck.FetchFailed(f"download failed: {entry.path} not found")
            path = os.path.join(dest_dir, checkpoint.name, entry.path)
            os.makedirs(os.path.dirname(path), exist_ok=True)
            Path(path).write_bytes(data)
            paths[entry.path] = path
        return paths

    def delete(self, checkpoint: ck.CheckpointId) -> None:
        self.deleted.append(checkpoint)
        self.objects.pop(checkpoint, None)


def make_manifest(step: int, files: dict[str, bytes], **fields: object) -> ck.Manifest:
    data: dict[str, object] = {
        "job_id": JOB,
        "step": step,
        "attempt": 0,
        "instance_id": "i-0123456789abcdef0",
        "framework": "torch",
        "created_at": CREATED,
        "files": [ck.ManifestFile(path=p, size=len(b), xxh3_128=ck.hash_bytes(b)) for p, b in files.items()],
    }
    data.update(fields)
    return ck.Manifest.model_validate(data)


def choose(
    storage: MemoryStorage,
    tmp_path: Path,
    *,
    at_most: int | None = None,
    prefer: ck.CheckpointId | None = None,
) -> ck.Selection:
    """What restore does: newest first, full verification, first valid wins."""

    def verify(checkpoint: ck.CheckpointId) -> str | None:
        outcome = ck.verify_checkpoint(storage, checkpoint, job_id=JOB, dest_dir=str(tmp_path))
        return outcome if isinstance(outcome, str) else None

    return ck.select_newest_valid(storage.list_checkpoints(), verify, at_most=at_most, prefer=prefer)


STATE = {"model.pt": b"weights" * 100, "optim/state.pt": b"moments" * 50}


# Each way a newer checkpoint can be broken, and the words its skip reason must contain.
BROKEN: dict[str, str] = {
    "killed before the manifest": "missing manifest",
    "manifest truncated": "does not parse",
    "file truncated": "bytes, manifest says",
    "file from another writer": "hash",
    "file never uploaded": "not found",
    "manifest of another step": "says step 199 but sits under step 200",
    "manifest of another job": "belongs to job job-2",
    "manifest of another attempt": "says attempt 1 but sits under attempt 0",
    "unknown manifest format": "does not parse",
}


def save_broken(storage: MemoryStorage, step: int, kind: str) -> None:
    """Save a checkpoint at `step` the way `kind` of failure leaves it."""
    if kind == "killed before the manifest":
        storage.save(step, STATE, manifest=False)
        return
    storage.save(step, STATE, job_id="job-2" if kind == "manifest of another job" else JOB)
    objects = storage.objects[C(step)]
    if kind == "manifest truncated":
        objects[ck.MANIFEST_NAME] = objects[ck.MANIFEST_NAME][:20]
    elif kind == "file truncated":
        objects["model.pt"] = objects["model.pt"][:7]
    elif kind == "file from another writer":
        objects["model.pt"] = objects["model.pt"].upper()
    elif kind == "file never uploaded":
        del objects["optim/state.pt"]
    elif kind == "manifest of another step":
        objects[ck.MANIFEST_NAME] = make_manifest(step - 1, STATE).to_json()
    elif kind == "manifest of another attempt":
        objects[ck.MANIFEST_NAME] = make_manifest(step, STATE, attempt=1).to_json()
    elif kind == "unknown manifest format":
        objects[ck.MANIFEST_NAME] = objects[ck.MANIFEST_NAME].replace(b'"format": 1', b'"format": 7')


@pytest.mark.parametrize("kind", list(BROKEN))
def test_a_broken_newest_checkpoint_is_skipped_by_name_for_the_previous_one(
    kind: str, tmp_path: Path
) -> None:
    # Given a good checkpoint at step 100 and a broken one at step 200
    storage = MemoryStorage()
    storage.save(100, STATE)
    save_broken(storage, 200, kind)

    selection = choose(storage, tmp_path)

    # Then restore resumes from 100 and says why 200 was not used
    assert selection.step == 100
    [skipped] = selection.skipped
    assert skipped.step == 200
    assert BROKEN[kind] in skipped.reason


def test_every_checkpoint_broken_means_start_fresh_with_all_reasons(tmp_path: Path) -> None:
    storage = MemoryStorage()
    for step, kind in zip(
        (100, 200, 300),
        ("killed before the manifest", "file truncated", "file from another writer"),
        strict=True,
    ):
        save_broken(storage, step, kind)

    selection = choose(storage, tmp_path)

    assert selection.step is None
    assert [s.step for s in selection.skipped] == [300, 200, 100]
    assert "no valid checkpoint among 3" in selection.reason
    assert "step 100 (attempt 0): missing manifest" in selection.reason


def test_the_resume_cap_ignores_newer_checkpoints_even_when_valid(tmp_path: Path) -> None:
    # A superseded attempt's late upload (step 300) must not beat the row's resume point.
    storage = MemoryStorage()
    for step in (100, 200, 300):
        storage.save(step, STATE)

    selection = choose(storage, tmp_path, at_most=200)

    assert selection.step == 200
    assert selection.considered == 2
    assert selection.skipped == []


# --- attempts: the resume point the job row names wins (fencing, DESIGN §2) -----------------


def test_the_named_resume_point_beats_an_older_attempts_late_checkpoint_at_the_same_step(
    tmp_path: Path,
) -> None:
    # Given attempt 1 resumed and checkpointed step 300, and attempt 0 (a stopped instance
    # that came back) also published a step-300 checkpoint, plus a later one, late
    storage = MemoryStorage()
    storage.save(200, STATE)
    storage.save(300, {"model.pt": b"attempt one"}, attempt=1)
    storage.save(300, {"model.pt": b"stale attempt zero"}, attempt=0)
    storage.save(400, {"model.pt": b"stale attempt zero"}, attempt=0)

    # When attempt 2 restores the resume point the row names (step 300 of attempt 1)
    selection = choose(storage, tmp_path, prefer=C(300, 1))

    # Then it gets exactly that one, and nothing else was even considered first
    assert selection.checkpoint == C(300, 1) and selection.skipped == []


def test_a_broken_named_resume_point_falls_back_to_an_older_step_never_a_sibling(tmp_path: Path) -> None:
    storage = MemoryStorage()
    storage.save(200, STATE)
    storage.save(300, STATE, attempt=1)
    storage.objects[C(300, 1)]["model.pt"] = b"truncated"  # the named one is broken
    storage.save(300, STATE, attempt=0)  # another attempt's (valid) checkpoint at that step

    selection = choose(storage, tmp_path, prefer=C(300, 1))

    # The named one is skipped by name; the other attempt's step 300 is not a resume point
    assert [s.checkpoint for s in selection.skipped] == [C(300, 1)]
    assert "bytes, manifest says" in selection.skipped[0].reason
    assert selection.checkpoint == C(200)


def test_a_missing_named_resume_point_falls_back_to_older_steps(tmp_path: Path) -> None:
    storage = MemoryStorage()
    storage.save(100, STATE)
    storage.save(300, STATE, attempt=0)

    selection = choose(storage, tmp_path, prefer=C(300, 1))

    assert selection.checkpoint == C(100) and selection.considered == 1


def _history_with_a_lagging_row(storage: MemoryStorage) -> None:
    """Attempt 1 resumed from step 100 (attempt 0) and checkpointed up to step 400; retention
    already removed step 200, the one the job row still names. Around it: a late upload
    of the older attempt 0 at a higher step, and a newer attempt's checkpoint."""
    storage.save(100, STATE)
    storage.save(300, {"model.pt": b"attempt one, step 300"}, attempt=1)
    storage.save(400, {"model.pt": b"attempt one, step 400"}, attempt=1)
    storage.save(500, {"model.pt": b"stale attempt zero"}, attempt=0)  # a late upload (fork)
    storage.save(450, {"model.pt": b"attempt three"}, attempt=3)  # not ours to take


def test_a_missing_named_resume_point_takes_the_newest_checkpoint_of_its_own_attempt(
    tmp_path: Path,
) -> None:
    # Given the row names step 200 of attempt 1, which retention already deleted
    storage = MemoryStorage()
    _history_with_a_lagging_row(storage)

    selection = choose(storage, tmp_path, prefer=C(200, 1))

    # Then restore continues the same history from its newest checkpoint, not from an
    # older step (lost work), not from the older attempt's fork, not from a newer attempt
    assert selection.checkpoint == C(400, 1) and selection.skipped == []


def test_a_corrupt_named_resume_point_tries_its_attempts_newer_checkpoints_then_older_steps(
    tmp_path: Path,
) -> None:
    storage = MemoryStorage()
    _history_with_a_lagging_row(storage)
    storage.save(200, STATE, attempt=1)
    storage.objects[C(200, 1)]["model.pt"] = b"truncated"  # the named one is corrupt
    storage.objects[C(400, 1)]["model.pt"] = b"bit rot"  # and so is the newest of attempt 1

    selection = choose(storage, tmp_path, prefer=C(200, 1))

    assert [s.checkpoint for s in selection.skipped] == [C(200, 1), C(400, 1)]
    assert selection.checkpoint == C(300, 1)
    # With every checkpoint of attempt 1 broken, an older step; never the forks above it
    storage.objects[C(300, 1)]["model.pt"] = b"bit rot"
    assert choose(storage, tmp_path, prefer=C(200, 1)).checkpoint == C(100)


def test_candidates_after_the_named_resume_point_are_its_attempts_newer_ones_then_older_steps() -> None:
    listed = [C(100), C(300, 1), C(400, 1), C(500, 0), C(450, 3), C(200, 1), C(200, 0), C(150, 1)]

    assert ck.candidate_checkpoints(listed, prefer=C(200, 1)) == [
        C(200, 1),
        C(400, 1),
        C(300, 1),
        C(150, 1),
        C(100),
    ]
    # Missing: the same order without it
    assert ck.candidate_checkpoints([c for c in listed if c != C(200, 1)], prefer=C(200, 1)) == [
        C(400, 1),
        C(300, 1),
        C(150, 1),
        C(100),
    ]


def test_retention_plan_keeps_the_history_and_drops_a_superseded_attempts_forks() -> None:
    # Given attempt 2 continued from step 300 of attempt 1, keep=2
    listed = [C(100), C(200), C(300, 1), C(320, 2), C(340, 2), C(360, 2)]
    listed += [C(310, 0), C(330, 1)]  # late uploads above the resume step: forks
    listed += [C(380, 3)]  # a newer attempt (this one is the stale one)
    listed += [C(150), C(350, 2)]  # partial (no valid manifest)
    valid = [c for c in listed if c not in (C(150), C(350, 2))]

    victims = ck.retention_plan(listed, valid, keep=2, attempt=2, anchor=C(300, 1), protect=[C(300, 1)])

    # Then the newest two of its history stay, with the resume point; older and partial
    # older ones go; forks go; the newer attempt's checkpoint is never touched
    assert set(victims) == {C(320, 2), C(200), C(100), C(150), C(310, 0), C(330, 1)}
    assert C(380, 3) not in victims and C(350, 2) not in victims  # 350: may still be uploading


def test_retention_plan_without_an_anchor_treats_older_attempts_as_history() -> None:
    listed = [C(10, 0), C(20, 1), C(30, 1)]
    assert ck.retention_plan(listed, listed, keep=2, attempt=1) == [C(10, 0)]


def test_a_valid_checkpoint_returns_its_manifest_and_verified_local_files(tmp_path: Path) -> None:
    storage = MemoryStorage()
    storage.save(100, STATE)

    outcome = ck.verify_checkpoint(storage, C(100), job_id=JOB, dest_dir=str(tmp_path))

    assert not isinstance(outcome, str)
    manifest, paths = outcome
    assert manifest.step == 100 and manifest.total_bytes == sum(len(b) for b in STATE.values())
    assert {k: Path(v).read_bytes() for k, v in paths.items()} == STATE


def test_verification_stops_at_the_first_failing_check_without_hashing_a_missing_file(
    tmp_path: Path,
) -> None:
    storage = MemoryStorage()
    storage.save(5, STATE)
    storage.objects[C(5)].pop("model.pt")
    assert "model.pt not found" in str(
        ck.verify_checkpoint(storage, C(5), job_id=JOB, dest_dir=str(tmp_path))
    )


def test_skips_are_reported_as_they_happen() -> None:
    seen: list[ck.Skipped] = []
    reasons = {C(3): "missing manifest", C(2): "bad hash", C(1): None}

    selection = ck.select_newest_valid([C(1), C(2), C(3), C(3)], reasons.__getitem__, on_skip=seen.append)

    assert selection.step == 1
    assert seen == [ck.Skipped(C(3), "missing manifest"), ck.Skipped(C(2), "bad hash")]
    assert selection.considered == 3  # duplicates in a listing are one candidate


def test_verify_is_not_called_below_the_chosen_step() -> None:
    asked: list[ck.CheckpointId] = []

    def verify(checkpoint: ck.CheckpointId) -> str | None:
        asked.append(checkpoint)
        return None

    assert ck.select_newest_valid([C(s) for s in range(10)], verify).step == 9
    assert asked == [C(9)]


# --- retention ----------------------------------------------------------------------------------


def test_retention_keeps_the_newest_n_and_the_resume_point() -> None:
    valid = [C(s) for s in (10, 20, 30, 40, 50, 20)]  # a duplicate listing entry changes nothing
    assert ck.retention_victims(valid, keep=3) == [C(20), C(10)]
    assert ck.retention_victims(valid, keep=3, protect=[C(10)]) == [C(20)]
    assert ck.retention_victims(valid, keep=10) == []


def test_retention_counts_only_valid_checkpoints(tmp_path: Path) -> None:
    # Given two broken newer saves (maybe still uploading) and three valid ones, keep=2
    storage = MemoryStorage()
    for step in (100, 200, 300):
        storage.save(step, STATE)
    storage.save(400, STATE, manifest=False)
    storage.save(500, STATE, manifest=False)
    valid = [
        c
        for c in storage.list_checkpoints()
        if not isinstance(ck.verify_checkpoint(storage, c, job_id=JOB, dest_dir=str(tmp_path)), str)
    ]

    victims = ck.retention_victims(valid, keep=2)

    # Then only the oldest valid one goes; the partial ones are not retention's business.
    assert victims == [C(100)]
    for checkpoint in victims:
        storage.delete(checkpoint)
    assert choose(storage, tmp_path).step == 300


@pytest.mark.parametrize("keep", [0, -1])
def test_retention_must_keep_at_least_one(keep: int) -> None:
    with pytest.raises(ValueError, match="at least one"):
        ck.retention_victims([1, 2], keep=keep)


# --- layout edge cases ----------------------------------------------------------------------------


def test_negative_steps_or_attempts_are_no_checkpoint() -> None:
    with pytest.raises(ValueError, match="step must be >= 0"):
        C(-1)
    with pytest.raises(ValueError, match="attempt must be >= 0"):
        C(1, -1)


@pytest.mark.parametrize(
    ("name", "checkpoint"),
    [
        ("job-1/ckpt/000000000007-a0/", C(7)),
        ("000000000007-a12", C(7, 12)),
        ("7-a0", None),
        ("job-1/ckpt/00000000000x-a1/", None),
        # The layout before attempts were in the key: not a checkpoint of this layout.
        ("job-1/ckpt/000000000007/", None),
        ("000000000007-a", None),
    ],
)
def test_only_fixed_width_step_and_attempt_names_are_checkpoints(
    name: str, checkpoint: ck.CheckpointId | None
) -> None:
    assert ck.checkpoint_id_of(name) == checkpoint


def test_a_manifest_listing_a_file_twice_is_invalid() -> None:
    data = json.loads(make_manifest(1, {"model.pt": b"x"}).to_json())
    data["files"] = data["files"] * 2
    raw = json.dumps(data).encode()
    with pytest.raises(ck.InvalidManifest, match="does not parse"):
        ck.parse_manifest(raw)
