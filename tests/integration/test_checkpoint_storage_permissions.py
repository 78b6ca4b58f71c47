"""Checkpoint storage as the instance role sees S3 on AWS: allowed to list only the
checkpoint key space, so a GET or HEAD of a missing key is answered 403, not 404.

moto enforces no IAM, so the S3 client here answers as AWS does for that role: a
GetObject/HeadObject of a key that does not exist gets 403 AccessDenied (a botocore
`before-call` hook that short-circuits the request), and keys in `denied` get 403 even
though they exist (a refusal that must stay one)."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import boto3
import pytest
from botocore.awsrequest import AWSResponse
from moto import mock_aws

from trainctl_core.checkpoints import (
    CheckpointId,
    FetchFailed,
    ManifestFile,
    S3CheckpointStorage,
    StorageError,
    checkpoint_prefix,
    hash_file,
)

BUCKET = "ckpt-bucket"
JOB = "job-403"


class ForbiddenWhenMissing:
    """Answers GetObject/HeadObject of an absent (or `denied`) key with a 403 AccessDenied."""

    def __init__(self, client: Any) -> None:
        self.lister = boto3.client("s3", region_name="us-east-1")
        self.denied: set[str] = set()
        self.refused: list[str] = []
        for operation in ("GetObject", "HeadObject"):
            client.meta.events.register(f"before-parameter-build.s3.{operation}", self._remember)
            client.meta.events.register(f"before-call.s3.{operation}", self)

    @staticmethod
    def _remember(params: dict[str, Any], context: dict[str, Any], **_: Any) -> None:
        # before-call sees the serialized request; the API parameters are seen here.
        context["object"] = (params["Bucket"], params["Key"])

    def __call__(
        self, model: Any, context: dict[str, Any], **_: Any
    ) -> tuple[AWSResponse, dict[str, Any]] | None:
        bucket, key = context["object"]
        listed = self.lister.list_objects_v2(Bucket=bucket, Prefix=key).get("Contents", [])
        if key not in self.denied and any(entry["Key"] == key for entry in listed):
            return None  # the real call
        self.refused.append(key)
        body = {"Code": "AccessDenied", "Message": "Access Denied"} if model.name == "GetObject" else {}
        response = AWSResponse("https://s3.amazonaws.com", 403, {}, None)
        return response, {
            "Error": {"Code": body.get("Code", "403"), **body},
            "ResponseMetadata": {"HTTPStatusCode": 403},
        }


@pytest.fixture
def storage() -> Iterator[tuple[S3CheckpointStorage, ForbiddenWhenMissing]]:
    with mock_aws():
        client = boto3.client("s3", region_name="us-east-1")
        client.create_bucket(Bucket=BUCKET)
        s3 = ForbiddenWhenMissing(client)
        store = S3CheckpointStorage(client, BUCKET, JOB)
        try:
            yield store, s3
        finally:
            store.close()


def test_a_new_steps_manifest_is_absent_not_a_refusal(storage: tuple[S3CheckpointStorage, Any]) -> None:
    store, s3 = storage
    checkpoint = CheckpointId(100, 0)
    # What every save of a new step asks first (is this step already durable?).
    assert store.read_manifest(checkpoint) is None
    assert s3.refused == [checkpoint_prefix(JOB, checkpoint) + "manifest.json"]


def test_a_file_missing_from_storage_makes_the_checkpoint_incomplete(
    storage: tuple[S3CheckpointStorage, Any], tmp_path: Path
) -> None:
    store, _ = storage
    checkpoint = CheckpointId(100, 0)
    present = tmp_path / "model.bin"
    present.write_bytes(b"weights" * 1000)
    size, digest = hash_file(present)
    store.put_files(checkpoint, [(str(present), "model.bin")], lambda: False)
    files = [
        ManifestFile(path="model.bin", size=size, xxh3_128=digest),
        ManifestFile(path="optimizer.bin", size=size, xxh3_128=digest),  # never uploaded
    ]
    # Skipped for an older checkpoint by restore, not a refusal that stops it.
    with pytest.raises(FetchFailed, match=r"optimizer\.bin: not found"):
        store.fetch(checkpoint, files, str(tmp_path / "restore"))


def test_a_refusal_of_an_object_that_exists_stays_a_refusal(
    storage: tuple[S3CheckpointStorage, Any], tmp_path: Path
) -> None:
    store, s3 = storage
    checkpoint = CheckpointId(100, 0)
    store.put_manifest(checkpoint, b"{}")
    s3.denied.add(checkpoint_prefix(JOB, checkpoint) + "manifest.json")  # e.g. no kms:Decrypt
    with pytest.raises(StorageError) as refused:
        store.read_manifest(checkpoint)
    assert not isinstance(refused.value, FetchFailed)
    assert refused.value.retryable is False
