"""Pure checkpoint logic: layout, manifest, selection, retention."""

from __future__ import annotations

import json
from datetime import UTC, datetime

import pytest

from trainctl_core import checkpoints as ck


def _manifest(**overrides: object) -> ck.Manifest:
    data: dict[str, object] = {
        "job_id": "job-1",
        "step": 40,
        "attempt": 2,
        "instance_id": "i-0123456789abcdef0",
        "framework": "torch",
        "created_at": datetime(2025, 1, 2, 3, 4, 5, tzinfo=UTC),
        "files": [ck.ManifestFile(path="state.bin", size=4096, xxh3_128="0" * 32)],
    }
    data.update(overrides)
    return ck.Manifest.model_validate(data)


def C(step: int, attempt: int = 0) -> ck.CheckpointId:
    return ck.CheckpointId(step, attempt)


def test_layout_matches_the_contract() -> None:
    # The attempt is in the key: two attempts never share a checkpoint's objects.
    assert ck.checkpoint_prefix("job-1", C(40, 2)) == "job-1/ckpt/000000000040-a2/"
    assert ck.checkpoint_id_of("job-1/ckpt/000000000040-a2/") == C(40, 2)
    assert ck.checkpoint_id_of("job-1/ckpt/latest/") is None
    # Newest first means: higher step, then (same step) the newer attempt.
    assert sorted([C(5, 1), C(6, 0), C(5, 3)], reverse=True) == [C(6, 0), C(5, 3), C(5, 1)]


def test_manifest_round_trip_has_contract_fields() -> None:
    raw = _manifest().to_json()
    data = json.loads(raw)
    assert set(data) == {
        "format",
        "job_id",
        "step",
        "attempt",
        "instance_id",
        "framework",
        "created_at",
        "files",
        "extra",
    }
    assert data["format"] == 1 and data["created_at"] == "2025-01-02T03:04:05.000Z"
    assert data["files"] == [{"path": "state.bin", "size": 4096, "xxh3_128": "0" * 32}]
    assert ck.parse_manifest(raw, expect_job_id="job-1", expect_step=40) == _manifest()


@pytest.mark.parametrize(
    "raw",
    [b"", b"{", b'{"format": 2}', _manifest(files=[]).to_json().replace(b'"format": 1', b'"format": 9')],
)
def test_unparseable_manifest_is_invalid(raw: bytes) -> None:
    with pytest.raises(ck.InvalidManifest):
        ck.parse_manifest(raw)


def test_manifest_under_the_wrong_step_attempt_or_job_is_invalid() -> None:
    with pytest.raises(ck.InvalidManifest, match="step"):
        ck.parse_manifest(_manifest().to_json(), expect_step=41)
    with pytest.raises(ck.InvalidManifest, match="job"):
        ck.parse_manifest(_manifest().to_json(), expect_job_id="other")
    # A manifest copied under another attempt's key does not describe that checkpoint.
    with pytest.raises(ck.InvalidManifest, match="says attempt 2 but sits under attempt 3"):
        ck.parse_manifest_at(_manifest().to_json(), C(40, 3), job_id="job-1")
    assert ck.parse_manifest_at(_manifest().to_json(), C(40, 2), job_id="job-1") == _manifest()


@pytest.mark.parametrize("path", ["/etc/passwd", "../x", "a//b", "manifest.json", ""])
def test_manifest_file_paths_must_be_relative(path: str) -> None:
    with pytest.raises(ValueError):
        ck.ManifestFile(path=path, size=1, xxh3_128="0" * 32)


def test_select_newest_valid_skips_invalid_and_names_them() -> None:
    reasons = {C(30): "bad hash", C(20): None, C(10): None}
    selection = ck.select_newest_valid([C(10), C(30), C(20)], reasons.__getitem__)
    assert selection.checkpoint == C(20) and selection.step == 20
    assert selection.skipped == [ck.Skipped(C(30), "bad hash")]


def test_select_respects_the_resume_cap() -> None:
    selection = ck.select_newest_valid([C(10), C(20), C(30)], lambda c: None, at_most=25)
    assert selection.step == 20


def test_nothing_valid_explains_why() -> None:
    selection = ck.select_newest_valid([C(1), C(2)], lambda c: "missing manifest")
    assert selection.step is None
    assert "step 2 (attempt 0): missing manifest" in selection.reason and "step 1" in selection.reason
    assert ck.select_newest_valid([], lambda c: None).reason == "no checkpoint found"


def test_retention_keeps_newest_and_protected() -> None:
    steps = [C(s) for s in (1, 2, 3, 4, 5)]
    assert ck.retention_victims(steps, keep=2) == [C(3), C(2), C(1)]
    assert ck.retention_victims(steps, keep=2, protect=[C(2)]) == [C(3), C(1)]
    with pytest.raises(ValueError):
        ck.retention_victims([C(1)], keep=0)


def test_hash_file_streams_and_detects_changes(tmp_path) -> None:  # type: ignore[no-untyped-def]
    path = tmp_path / "f"
    path.write_bytes(b"x" * 10_000_000)
    size, digest = ck.hash_file(path)
    assert size == 10_000_000 and digest == ck.hash_bytes(b"x" * 10_000_000)
    entry = ck.ManifestFile(path="f", size=size, xxh3_128=digest)
    assert ck.verify_local_file(entry, path) is None
    path.write_bytes(b"y" * 10_000_000)
    assert "hash" in (ck.verify_local_file(entry, path) or "")
    path.write_bytes(b"y")
    assert "bytes" in (ck.verify_local_file(entry, path) or "")
