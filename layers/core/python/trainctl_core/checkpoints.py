"""Checkpoint layout, manifest format and newest-valid selection.

A checkpoint of job `j` at step `s` written by attempt `a` lives under
`s3://<bucket>/j/ckpt/<s:012d>-a<a>/`: its data files first, then `manifest.json` LAST
under the same prefix. A checkpoint exists only if its manifest parses, names the step
and attempt it sits under, and every file it lists has the listed size and xxh3-128
hash, so a save killed at any point (no manifest, a truncated file, a file from another
writer) never becomes a resume point: restore skips it, naming it, and takes the previous
one.

The attempt is part of the key for fencing (DESIGN §2): an attempt that comes back after
its replacement took over (a stopped or hibernated instance) writes under its own keys,
so it can never overwrite the files or the manifest of a newer attempt's checkpoint at
the same step, and the resume point the job row names (step *and* attempt) is the one
restored.

Storage that cannot be read is a `StorageError` (retryable or not), never an invalid
checkpoint: only the checkpoint's own faults make restore skip it.

The module is pure (layout, manifest model, hashing of local files, selection and
retention decisions) plus `S3CheckpointStorage`, an adapter taking an injected S3 client;
the on-instance `Checkpointer` (training/trainctl/checkpoint.py) builds on both.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any, Protocol

import xxhash
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

MANIFEST_NAME = "manifest.json"
MISSING_MANIFEST = "missing manifest (incomplete or killed mid-upload)"
MANIFEST_FORMAT = 1
CKPT_DIR = "ckpt"
STEP_DIGITS = 12
_NAME_PATTERN = re.compile(rf"^(\d{{{STEP_DIGITS}}})-a(\d+)$")
_HASH_CHUNK = 8 * 1024 * 1024


# --- layout ----------------------------------------------------------------------------


def job_checkpoint_root(job_id: str) -> str:
    """`<job_id>/ckpt/`: the prefix under which every checkpoint of a job lives."""
    return f"{job_id}/{CKPT_DIR}/"


@dataclass(frozen=True, order=True)
class CheckpointId:
    """One checkpoint: the step it holds and the attempt that wrote it.

    Ordered by step, then attempt: of two checkpoints at one step, the newer attempt's
    comes first when looking for the newest.
    """

    step: int
    attempt: int

    def __post_init__(self) -> None:
        if self.step < 0:
            raise ValueError(f"step must be >= 0 (got {self.step})")
        if self.attempt < 0:
            raise ValueError(f"attempt must be >= 0 (got {self.attempt})")

    @property
    def name(self) -> str:
        """The key segment: `<step:012d>-a<attempt>` (fixed-width step: listings sort)."""
        return f"{self.step:0{STEP_DIGITS}d}-a{self.attempt}"

    def __str__(self) -> str:
        return f"step {self.step} (attempt {self.attempt})"


def checkpoint_prefix(job_id: str, checkpoint: CheckpointId) -> str:
    """`<job_id>/ckpt/<step:012d>-a<attempt>/`: one checkpoint's prefix (files + manifest)."""
    return f"{job_checkpoint_root(job_id)}{checkpoint.name}/"


def checkpoint_id_of(prefix_or_name: str) -> CheckpointId | None:
    """The checkpoint a prefix (or its last path segment) names, if it is one."""
    name = prefix_or_name.rstrip("/").rsplit("/", 1)[-1]
    match = _NAME_PATTERN.match(name)
    return CheckpointId(int(match.group(1)), int(match.group(2))) if match else None


def validate_relative_path(path: str) -> str:
    """A manifest file path: relative, '/'-separated, no '..', not the manifest itself."""
    parts = path.split("/")
    if not path or path.startswith("/") or any(p in ("", ".", "..") for p in parts):
        raise ValueError(f"checkpoint file path must be relative and normalised (got {path!r})")
    if path == MANIFEST_NAME:
        raise ValueError(f"{MANIFEST_NAME} is reserved for the manifest")
    return path


# --- manifest ----------------------------------------------------------------------------


class ManifestFile(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")

    path: str
    size: int = Field(ge=0)
    xxh3_128: str = Field(pattern=r"^[0-9a-f]{32}$")

    @field_validator("path")
    @classmethod
    def _relative(cls, value: str) -> str:
        return validate_relative_path(value)


class Manifest(BaseModel):
    """`manifest.json`: what a checkpoint is made of; written last."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    format: int = MANIFEST_FORMAT
    job_id: str
    step: int = Field(ge=0)
    attempt: int = Field(ge=0)
    instance_id: str
    framework: str
    created_at: datetime
    files: list[ManifestFile]
    extra: dict[str, Any] = Field(default_factory=dict)

    @field_validator("format")
    @classmethod
    def _known_format(cls, value: int) -> int:
        if value != MANIFEST_FORMAT:
            raise ValueError(f"unsupported manifest format {value} (this reader knows {MANIFEST_FORMAT})")
        return value

    @field_validator("files")
    @classmethod
    def _unique_paths(cls, files: list[ManifestFile]) -> list[ManifestFile]:
        paths = [f.path for f in files]
        if len(set(paths)) != len(paths):
            raise ValueError("manifest lists a file twice")
        return files

    def to_json(self) -> bytes:
        data = self.model_dump(mode="json")
        data["created_at"] = format_time(self.created_at)
        return json.dumps(data, indent=1, sort_keys=True).encode()

    @property
    def total_bytes(self) -> int:
        return sum(f.size for f in self.files)


class InvalidManifest(ValueError):
    """A manifest that does not parse or does not describe the checkpoint it sits in."""


def parse_manifest(
    raw: bytes,
    *,
    expect_job_id: str | None = None,
    expect_step: int | None = None,
    expect_attempt: int | None = None,
) -> Manifest:
    try:
        manifest = Manifest.model_validate_json(raw)
    except ValidationError as exc:
        raise InvalidManifest(
            f"manifest does not parse: {exc.error_count()} error(s): {exc.errors()[0]['msg']}"
        ) from exc
    if expect_job_id is not None and manifest.job_id != expect_job_id:
        raise InvalidManifest(f"manifest belongs to job {manifest.job_id}, not {expect_job_id}")
    if expect_step is not None and manifest.step != expect_step:
        raise InvalidManifest(f"manifest says step {manifest.step} but sits under step {expect_step}")
    if expect_attempt is not None and manifest.attempt != expect_attempt:
        raise InvalidManifest(
            f"manifest says attempt {manifest.attempt} but sits under attempt {expect_attempt}"
        )
    return manifest


def parse_manifest_at(raw: bytes, checkpoint: CheckpointId, *, job_id: str) -> Manifest:
    """`parse_manifest`, checked against the job and the key it was read from."""
    return parse_manifest(
        raw, expect_job_id=job_id, expect_step=checkpoint.step, expect_attempt=checkpoint.attempt
    )


def format_time(moment: datetime) -> str:
    """ISO 8601 in UTC with a `Z` (the manifest's and the job row's time format)."""
    return moment.astimezone(UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")


def utcnow() -> datetime:
    return datetime.now(UTC)


# --- hashing -------------------------------------------------------------------------------


def new_hasher() -> xxhash.xxh3_128:
    return xxhash.xxh3_128()


def hash_bytes(data: bytes | memoryview) -> str:
    return xxhash.xxh3_128_hexdigest(data)


def hash_file(path: str | os.PathLike[str]) -> tuple[int, str]:
    """(size, xxh3-128 hex) of a local file, streamed (never the whole file in memory)."""
    hasher = new_hasher()
    size = 0
    buffer = bytearray(_HASH_CHUNK)
    view = memoryview(buffer)
    with open(path, "rb", buffering=0) as handle:
        while True:
            read = handle.readinto(buffer)
            if not read:
                break
            hasher.update(view[:read])
            size += read
    return size, hasher.hexdigest()


def verify_local_file(expected: ManifestFile, path: str | os.PathLike[str]) -> str | None:
    """None if the local copy matches the manifest entry, else why not."""
    try:
        actual_size = os.path.getsize(path)
    except FileNotFoundError:
        return f"file {expected.path} is missing"
    if actual_size != expected.size:
        return f"file {expected.path} has {actual_size} bytes, manifest says {expected.size}"
    _, digest = hash_file(path)
    if digest != expected.xxh3_128:
        return f"file {expected.path} hash {digest} != manifest {expected.xxh3_128}"
    return None


# --- selection and retention (pure) -----------------------------------------------------------


@dataclass(frozen=True)
class Skipped:
    checkpoint: CheckpointId
    reason: str

    @property
    def step(self) -> int:
        return self.checkpoint.step


@dataclass
class Selection:
    """The outcome of looking for a resume point: the chosen checkpoint (or None) and why."""

    checkpoint: CheckpointId | None
    skipped: list[Skipped] = field(default_factory=list)
    considered: int = 0

    @property
    def step(self) -> int | None:
        return self.checkpoint.step if self.checkpoint is not None else None

    @property
    def reason(self) -> str:
        """Human-readable 'why starting fresh' when nothing was chosen."""
        if self.checkpoint is not None:
            return f"resuming from {self.checkpoint}"
        if not self.considered:
            return "no checkpoint found"
        details = "; ".join(f"{s.checkpoint}: {s.reason}" for s in self.skipped)
        return f"no valid checkpoint among {self.considered}: {details}"


def candidate_checkpoints(
    checkpoints: Iterable[CheckpointId],
    *,
    at_most: int | None = None,
    prefer: CheckpointId | None = None,
) -> list[CheckpointId]:
    """Checkpoints to try, in order: newest first by (step, attempt).

    `prefer` is the resume point the job row names. It is tried first; then, should it be
    missing or corrupt, the newer checkpoints of *its own attempt* (newest first), then
    every strictly older step. A newer checkpoint of the same attempt continues the very
    history the row names (one attempt trains forward from one restore): the row merely
    had not recorded it yet (a checkpoint is recorded after it is durable, and retention
    may already have removed the one before it). Any other checkpoint at the resume
    step or above is excluded: a newer attempt's is not ours to take, and an older
    attempt's is a superseded attempt's late upload (a fork), never the history the job
    continues from.
    `at_most` caps the step when only the resume step is known (a late upload must not
    win just by having a higher step).
    """
    unique = sorted(set(checkpoints), reverse=True)
    if prefer is None:
        return [c for c in unique if at_most is None or c.step <= at_most]
    descendants = [c for c in unique if c.attempt == prefer.attempt and c.step > prefer.step]
    older = [c for c in unique if c.step < prefer.step]
    return [prefer, *descendants, *older] if prefer in unique else [*descendants, *older]


def select_newest_valid(
    checkpoints: Iterable[CheckpointId],
    verify: Callable[[CheckpointId], str | None],
    *,
    at_most: int | None = None,
    prefer: CheckpointId | None = None,
    on_skip: Callable[[Skipped], None] | None = None,
) -> Selection:
    """The first candidate (see `candidate_checkpoints`) whose `verify` returns None; the
    ones tried before it are recorded as skipped.

    `verify(checkpoint)` returns None for a valid checkpoint, else the reason it is not.
    It may do I/O (the caller decides how deep to check); this function only decides.
    """
    candidates = candidate_checkpoints(checkpoints, at_most=at_most, prefer=prefer)
    selection = Selection(checkpoint=None, considered=len(candidates))
    for checkpoint in candidates:
        reason = verify(checkpoint)
        if reason is None:
            selection.checkpoint = checkpoint
            return selection
        skipped = Skipped(checkpoint, reason)
        selection.skipped.append(skipped)
        if on_skip:
            on_skip(skipped)
    return selection


def retention_victims(
    valid: Iterable[CheckpointId], *, keep: int, protect: Iterable[CheckpointId] = ()
) -> list[CheckpointId]:
    """Checkpoints to delete so that the newest `keep` valid ones remain.

    `protect` (e.g. the job row's resume point) is never deleted. Invalid/partial
    checkpoints are not this function's business: they may still be uploading.
    """
    if keep < 1:
        raise ValueError("retention must keep at least one checkpoint")
    ordered = sorted(set(valid), reverse=True)
    protected = set(protect)
    return [c for c in ordered[keep:] if c not in protected]


def retention_plan(
    listed: Iterable[CheckpointId],
    valid: Iterable[CheckpointId],
    *,
    keep: int,
    attempt: int,
    anchor: CheckpointId | None = None,
    protect: Iterable[CheckpointId] = (),
) -> list[CheckpointId]:
    """What retention run by `attempt` deletes, given every listed checkpoint and the valid ones.

    `anchor` is the checkpoint this attempt continued from (restored or named by the job
    row). Its history (this attempt's checkpoints and older attempts' up to the anchor's
    step) keeps its newest `keep` valid checkpoints; partial ones older than all of those
    can no longer complete and go too. An older attempt's checkpoint above the anchor's
    step is a superseded attempt's late upload (a fork that can never be resumed): it
    goes. A newer attempt's checkpoints are never touched: then this attempt is the
    superseded one.
    """
    listed_set = set(listed)
    valid_set = set(valid) & listed_set
    protected = set(protect)
    newer = {c for c in listed_set if c.attempt > attempt}
    forks = {c for c in listed_set if anchor is not None and c.attempt < attempt and c.step > anchor.step}
    history = listed_set - newer - forks
    history_valid = valid_set & history
    victims = retention_victims(history_valid, keep=keep, protect=protected)
    if history_valid:
        oldest_kept = sorted(history_valid, reverse=True)[:keep][-1]
        victims += sorted(
            (c for c in history - valid_set if c < oldest_kept and c not in protected), reverse=True
        )
    victims += sorted((c for c in forks if c not in protected), reverse=True)
    return victims


# --- storage backends ----------------------------------------------------------------------------


class CheckpointStorage(Protocol):
    """Where checkpoints live (S3, or a local directory); used by the Checkpointer."""

    def describe(self, checkpoint: CheckpointId) -> str: ...

    def list_checkpoints(self) -> list[CheckpointId]:
        """Every checkpoint key present (valid or not), oldest first."""
        ...

    def read_manifest(self, checkpoint: CheckpointId) -> bytes | None: ...

    def put_files(
        self, checkpoint: CheckpointId, files: Sequence[tuple[str, str]], cancelled: Callable[[], bool]
    ) -> None:
        """Upload local files [(local_path, relative_path)] under the checkpoint's prefix."""
        ...

    def put_manifest(self, checkpoint: CheckpointId, manifest: bytes) -> None: ...

    def fetch(self, checkpoint: CheckpointId, files: Sequence[ManifestFile], dest_dir: str) -> dict[str, str]:
        """Make the files available locally; returns relative path -> local path."""
        ...

    def delete(self, checkpoint: CheckpointId) -> None: ...


class LocalCheckpointStorage:
    """Checkpoints in a local directory with the same layout as S3 (tests, local runs).

    `root/<job_id>/ckpt/<step>-a<attempt>/…`; files are hard-linked from staging when
    possible (same filesystem) so a local "upload" costs no copy; the manifest is renamed
    into place last.
    """

    def __init__(self, root: str, job_id: str) -> None:
        self.root = root
        self.job_id = job_id

    def _dir(self, checkpoint: CheckpointId) -> str:
        return os.path.join(self.root, checkpoint_prefix(self.job_id, checkpoint))

    def describe(self, checkpoint: CheckpointId) -> str:
        return self._dir(checkpoint)

    def list_checkpoints(self) -> list[CheckpointId]:
        base = os.path.join(self.root, job_checkpoint_root(self.job_id))
        try:
            names = os.listdir(base)
        except FileNotFoundError:
            return []
        return sorted(c for c in (checkpoint_id_of(n) for n in names) if c is not None)

    def read_manifest(self, checkpoint: CheckpointId) -> bytes | None:
        try:
            with open(os.path.join(self._dir(checkpoint), MANIFEST_NAME), "rb") as handle:
                return handle.read()
        except FileNotFoundError:
            return None

    def put_files(
        self, checkpoint: CheckpointId, files: Sequence[tuple[str, str]], cancelled: Callable[[], bool]
    ) -> None:
        target = self._dir(checkpoint)
        for local, relative in files:
            if cancelled():
                return
            dest = os.path.join(target, relative)
            os.makedirs(os.path.dirname(dest), exist_ok=True)
            tmp = dest + ".part"
            try:
                os.link(local, tmp)
            except OSError:
                _copy_file(local, tmp)
            os.replace(tmp, dest)

    def put_manifest(self, checkpoint: CheckpointId, manifest: bytes) -> None:
        target = self._dir(checkpoint)
        os.makedirs(target, exist_ok=True)
        _atomic_write(os.path.join(target, MANIFEST_NAME), manifest)

    def fetch(self, checkpoint: CheckpointId, files: Sequence[ManifestFile], dest_dir: str) -> dict[str, str]:
        # Read in place: no second copy on disk.
        return {f.path: os.path.join(self._dir(checkpoint), f.path) for f in files}

    def delete(self, checkpoint: CheckpointId) -> None:
        target = self._dir(checkpoint)
        # Manifest first: a half-deleted checkpoint must not look valid.
        with contextlib.suppress(FileNotFoundError):
            os.unlink(os.path.join(target, MANIFEST_NAME))
        for dirpath, _dirs, names in os.walk(target, topdown=False):
            for name in names:
                os.unlink(os.path.join(dirpath, name))
            os.rmdir(dirpath)


class S3CheckpointStorage:
    """Checkpoints in S3 through an injected client; data via s3transfer (multipart, concurrent)."""

    def __init__(
        self,
        client: Any,
        bucket: str,
        job_id: str,
        *,
        transfer_config: Any = None,
    ) -> None:
        from s3transfer.manager import TransferConfig, TransferManager

        self._s3 = client
        self.bucket = bucket
        self.job_id = job_id
        # 64 MiB parts, 8 in flight: few requests per GB while still saturating the link;
        # s3transfer streams from the file (no copy of the checkpoint in memory).
        config = transfer_config or TransferConfig(
            multipart_threshold=64 * 1024 * 1024,
            multipart_chunksize=64 * 1024 * 1024,
            max_request_concurrency=8,
        )
        self._transfer = TransferManager(client, config)

    def describe(self, checkpoint: CheckpointId) -> str:
        return f"s3://{self.bucket}/{checkpoint_prefix(self.job_id, checkpoint)}"

    def list_checkpoints(self) -> list[CheckpointId]:
        paginator = self._s3.get_paginator("list_objects_v2")
        found: list[CheckpointId] = []
        root = job_checkpoint_root(self.job_id)
        try:
            for page in paginator.paginate(Bucket=self.bucket, Prefix=root, Delimiter="/"):
                for common in page.get("CommonPrefixes", []):
                    checkpoint = checkpoint_id_of(common["Prefix"])
                    if checkpoint is not None:
                        found.append(checkpoint)
        except Exception as exc:
            raise _s3_failure(exc, f"listing s3://{self.bucket}/{root}") from exc
        return sorted(found)

    def read_manifest(self, checkpoint: CheckpointId) -> bytes | None:
        key = checkpoint_prefix(self.job_id, checkpoint) + MANIFEST_NAME
        try:
            response = self._s3.get_object(Bucket=self.bucket, Key=key)
            body: bytes = response["Body"].read()
        except Exception as exc:
            failure = self._failure(exc, key, f"reading s3://{self.bucket}/{key}")
            if isinstance(failure, FetchFailed):
                return None  # no manifest: the checkpoint does not exist (yet)
            raise failure from exc
        return body

    def put_files(
        self, checkpoint: CheckpointId, files: Sequence[tuple[str, str]], cancelled: Callable[[], bool]
    ) -> None:
        prefix = checkpoint_prefix(self.job_id, checkpoint)
        futures = [self._transfer.upload(local, self.bucket, prefix + relative) for local, relative in files]
        pending = list(futures)
        while pending:
            if cancelled():
                # An urgent checkpoint supersedes this one: free the link for it. The
                # files already sent stay without a manifest, i.e. they do not exist.
                for future in pending:
                    future.cancel()
                for future in pending:
                    with contextlib.suppress(Exception):
                        future.result()
                return
            pending = [f for f in pending if not f.done()]
            if pending:
                time.sleep(0.05)
        for future in futures:
            future.result()  # re-raise the first upload error, if any

    def put_manifest(self, checkpoint: CheckpointId, manifest: bytes) -> None:
        self._s3.put_object(
            Bucket=self.bucket,
            Key=checkpoint_prefix(self.job_id, checkpoint) + MANIFEST_NAME,
            Body=manifest,
            ContentType="application/json",
        )

    def fetch(self, checkpoint: CheckpointId, files: Sequence[ManifestFile], dest_dir: str) -> dict[str, str]:
        prefix = checkpoint_prefix(self.job_id, checkpoint)
        local: dict[str, str] = {}
        futures = []
        for entry in files:
            path = os.path.join(dest_dir, entry.path)
            os.makedirs(os.path.dirname(path), exist_ok=True)
            local[entry.path] = path
            futures.append(self._transfer.download(self.bucket, prefix + entry.path, path))
        first: Exception | None = None
        for entry, future in zip(files, futures, strict=True):
            try:
                future.result()
            except Exception as exc:
                # Wait for every download before raising: none may still be writing into
                # dest_dir when the caller retries or moves on.
                if first is None:
                    first = self._failure(exc, prefix + entry.path, f"download of {entry.path}")
                    first.__cause__ = exc
        if first is not None:
            raise first
        return local

    def delete(self, checkpoint: CheckpointId) -> None:
        prefix = checkpoint_prefix(self.job_id, checkpoint)
        # Manifest first: a half-deleted checkpoint must not look valid.
        self._s3.delete_object(Bucket=self.bucket, Key=prefix + MANIFEST_NAME)
        keys = list(self._keys(prefix))
        for start in range(0, len(keys), 1000):
            batch = [{"Key": k} for k in keys[start : start + 1000]]
            self._s3.delete_objects(Bucket=self.bucket, Delete={"Objects": batch, "Quiet": True})

    def _failure(self, exc: BaseException, key: str, what: str) -> FetchFailed | StorageError:
        """`_s3_failure`, except that a 403 on a key that a listing shows is absent is a
        missing object. S3 answers a GET or HEAD of a missing key with 404 only to callers
        allowed s3:ListBucket on the bucket; the instance role may list the checkpoint
        key space only (an `s3:prefix` condition, which a GET does not carry), so on AWS
        it gets 403 for every object that does not exist. The listing it is allowed tells
        the two apart: a 403 on an object that is there stays a refusal."""
        failure = _s3_failure(exc, what)
        if isinstance(failure, StorageError) and _forbidden(exc) and self._absent(key):
            return FetchFailed(f"{what}: not found in storage")
        return failure

    def _absent(self, key: str) -> bool:
        try:
            page = self._s3.list_objects_v2(Bucket=self.bucket, Prefix=key, MaxKeys=1)
        except Exception:
            return False  # cannot tell: the original refusal stands
        return not any(entry.get("Key") == key for entry in page.get("Contents", []))

    def _keys(self, prefix: str) -> Iterator[str]:
        paginator = self._s3.get_paginator("list_objects_v2")
        for page in paginator.paginate(Bucket=self.bucket, Prefix=prefix):
            for obj in page.get("Contents", []):
                yield obj["Key"]

    def close(self) -> None:
        self._transfer.shutdown()


class FetchFailed(RuntimeError):
    """A file the manifest lists is not in storage: the checkpoint is incomplete (invalid)."""


class StorageError(RuntimeError):
    """The checkpoint storage could not be read; this says nothing about the checkpoint.

    `retryable`: the same request may succeed later (network, timeout, throttling, a 5xx,
    credentials not yet available), as opposed to a refusal that repeats on every try
    (access denied, a missing bucket, a full local disk). Restore retries the first kind
    for a bounded time and fails on the second (see `Checkpointer.restore_checkpoint`),
    instead of skipping a checkpoint that may be intact.
    """

    def __init__(self, message: str, *, retryable: bool) -> None:
        super().__init__(message)
        self.retryable = retryable


# S3 error codes of a request that may succeed when repeated (besides any 5xx status).
_TRANSIENT_CODES = frozenset(
    {
        "RequestTimeout",
        "RequestTimeoutException",
        "SlowDown",
        "Throttling",
        "ThrottlingException",
        "RequestLimitExceeded",
        "ServiceUnavailable",
        "InternalError",
        # Instance-profile credentials being rotated: botocore fetches fresh ones.
        "ExpiredToken",
        "RequestExpired",
    }
)
_MISSING_CODES = frozenset({"404", "NoSuchKey", "NotFound"})


def _forbidden(exc: BaseException) -> bool:
    """A 403 from S3 (a HEAD's has no body, so its code is just "403")."""
    from botocore.exceptions import ClientError

    if not isinstance(exc, ClientError):
        return False
    status = exc.response.get("ResponseMetadata", {}).get("HTTPStatusCode")
    return status == 403 or exc.response.get("Error", {}).get("Code") in ("AccessDenied", "403")


def _s3_failure(exc: BaseException, what: str) -> FetchFailed | StorageError:
    """An S3 / s3transfer error as a type: `FetchFailed` (the object does not exist) or
    `StorageError` (the store could not be read), never matched on message text."""
    # Imported here: the pure half of this module needs neither.
    from botocore.exceptions import BotoCoreError, ClientError, ParamValidationError
    from s3transfer.exceptions import RetriesExceededError

    if isinstance(exc, ClientError):
        error = exc.response.get("Error", {})
        code = str(error.get("Code", ""))
        status = int(exc.response.get("ResponseMetadata", {}).get("HTTPStatusCode") or 0)
        if code in _MISSING_CODES or status == 404:
            return FetchFailed(f"{what}: not found in storage")
        retryable = status >= 500 or code in _TRANSIENT_CODES
        return StorageError(f"{what} failed: {code or status}: {exc}", retryable=retryable)
    if isinstance(exc, ParamValidationError):
        return StorageError(f"{what} failed: {exc}", retryable=False)
    if isinstance(exc, BotoCoreError | RetriesExceededError):
        # Connection refused/reset, timeouts, no credentials yet: botocore (and s3transfer,
        # for a download's body) already retried this one request.
        return StorageError(f"{what} failed: {exc}", retryable=True)
    return StorageError(f"{what} failed: {type(exc).__name__}: {exc}", retryable=False)


def verify_checkpoint(
    storage: CheckpointStorage, checkpoint: CheckpointId, *, job_id: str, dest_dir: str
) -> tuple[Manifest, dict[str, str]] | str:
    """Fetch and fully verify one checkpoint: (manifest, local paths) or the reason it is invalid.

    Invalid means: no manifest, a manifest that does not parse or describes another
    checkpoint, a listed file missing from storage, or a size or hash mismatch. Storage
    that cannot be read (`StorageError`) says nothing about the checkpoint and propagates.
    """
    raw = storage.read_manifest(checkpoint)
    if raw is None:
        return MISSING_MANIFEST
    try:
        manifest = parse_manifest_at(raw, checkpoint, job_id=job_id)
    except InvalidManifest as exc:
        return str(exc)
    try:
        paths = storage.fetch(checkpoint, manifest.files, dest_dir)
    except FetchFailed as exc:
        return str(exc)
    for entry in manifest.files:
        problem = verify_local_file(entry, paths[entry.path])
        if problem:
            return problem
    return manifest, paths


def _atomic_write(path: str, data: bytes) -> None:
    tmp = f"{path}.tmp-{os.getpid()}"
    with open(tmp, "wb") as handle:
        handle.write(data)
        handle.flush()
        os.fsync(handle.fileno())
    os.replace(tmp, path)
    _fsync_dir(os.path.dirname(path))


def _fsync_dir(path: str) -> None:
    fd = os.open(path or ".", os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _copy_file(src: str, dst: str) -> None:
    with open(src, "rb") as source, open(dst, "wb") as target:
        while chunk := source.read(_HASH_CHUNK):
            target.write(chunk)
        target.flush()
        os.fsync(target.fileno())
