"""Errors the AWS adapters raise and the domain handles.

They live here, free of boto3, so that domain code (`recovery`) can catch what an
adapter raises without importing the adapter, and with it botocore. Each adapter
translates its SDK's errors into these types; nothing matches on message text.
The adapters re-export the ones they raise (`store.ConcurrentUpdate`, ...), so callers
may import them from either place.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from trainctl_core.jobs import JobError

if TYPE_CHECKING:
    from trainctl_core.jobs import Job


# --- jobs table (store.py) ------------------------------------------------------------------


class JobNotFound(JobError):
    def __init__(self, job_id: str) -> None:
        super().__init__(f"job {job_id} does not exist")
        self.job_id = job_id


class JobAlreadyExists(JobError):
    def __init__(self, job_id: str) -> None:
        super().__init__(f"job {job_id} already exists")
        self.job_id = job_id


class ConcurrentUpdate(JobError):
    """The row changed since the writer read it; `current` is the row as it is now."""

    def __init__(self, job_id: str, current: Job | None) -> None:
        super().__init__(f"job {job_id} changed since it was read")
        self.job_id, self.current = job_id, current


class WriteContention(JobError):
    """The row kept changing under a writer that re-read and retried: it gave up.

    Raised so that the caller fails (Lambda retries the event later) rather than acting
    on a row it could not pin down.
    """

    def __init__(self, job_id: str, tries: int) -> None:
        super().__init__(f"job {job_id}: gave up writing after {tries} concurrent changes")
        self.job_id, self.tries = job_id, tries


class StoreUnavailable(Exception):
    """An agent's fenced write did not reach the table (throttled, a 5xx, a connection or
    read timeout) after botocore's own retries: the same write may succeed later.

    `code` is the AWS error code or the transport error's class name.
    """

    def __init__(self, job_id: str, code: str) -> None:
        super().__init__(f"job {job_id}: the jobs table is unavailable ({code})")
        self.job_id, self.code = job_id, code


class Superseded(JobError):
    """A fenced write from an instance/attempt that is no longer the job's current one."""

    def __init__(self, job_id: str, instance_id: str, attempt: int, current: Job | None) -> None:
        super().__init__(f"job {job_id}: instance {instance_id} attempt {attempt} is no longer current")
        self.job_id, self.instance_id, self.attempt, self.current = (
            job_id,
            instance_id,
            attempt,
            current,
        )


# --- checkpoint requests (commands.py) --------------------------------------------------------


class CheckpointRequestFailed(Exception):
    """The checkpoint-now command could not be sent to the instance.

    `code` is the AWS error code (or the transport error's class name); `retryable` says
    whether the same request may succeed later (throttling, a 5xx, a timeout), as opposed
    to a refusal that repeats on every try (access denied, an unknown document).
    """

    def __init__(self, instance_id: str, code: str, *, retryable: bool, message: str | None = None) -> None:
        super().__init__(message or f"checkpoint request to instance {instance_id} failed ({code})")
        self.instance_id, self.code, self.retryable = instance_id, code, retryable


class InstanceUnreachable(CheckpointRequestFailed):
    """The instance cannot receive SSM commands: gone, stopped, or its agent is not registered."""

    def __init__(self, instance_id: str, code: str) -> None:
        super().__init__(
            instance_id,
            code,
            retryable=False,
            message=f"instance {instance_id} cannot receive SSM commands ({code})",
        )


# --- resume workflow (workflow.py) --------------------------------------------------------------


class HandshakeError(Exception):
    """The workflow no longer waits for this token (timed out, or already completed)."""
