"""SSM adapter: ask the agent on an instance to checkpoint now.

The only module here that talks to SSM. The command is addressed by instance id (never by
targets), with a short delivery timeout: a notice lasts two minutes, a command that has
not been delivered after that is useless.

Every SDK failure leaves this module as a `CheckpointRequestFailed` (see `errors`), so
the domain can decide what a lost request means without importing botocore:
`InstanceUnreachable` when the instance cannot receive commands, otherwise with
`retryable` telling a transient failure from a refusal that would repeat.
"""

from __future__ import annotations

from datetime import datetime
from typing import Any

from botocore.exceptions import BotoCoreError, ClientError, HTTPClientError
from botocore.exceptions import ConnectionError as BotoConnectionError

# Re-exported: callers (CLI, tests) import the adapter's errors from here too.
from trainctl_core.errors import CheckpointRequestFailed, InstanceUnreachable
from trainctl_core.jobs import format_time
from trainctl_core.settings import (
    CHECKPOINT_MODE_CONTINUE,
    CHECKPOINT_MODE_STOP,
    SSM_PARAM_DEADLINE,
    SSM_PARAM_JOB_ID,
    SSM_PARAM_MODE,
)

# SSM errors that mean "this instance cannot receive commands" (gone, stopped, or its
# agent is not registered): the checkpoint request is lost, recovery must go on without it.
UNREACHABLE_CODES = frozenset({"InvalidInstanceId", "InvalidInstanceInformationFilterValue"})

# Errors a later attempt can get past. botocore's standard retry mode already retried
# these a few times within the call; a caller may still try again later (e.g. a Lambda
# retry), unlike a refusal such as AccessDeniedException or InvalidDocument.
TRANSIENT_CODES = frozenset(
    {
        "ThrottlingException",
        "Throttling",
        "TooManyRequestsException",
        "RequestLimitExceeded",
        "InternalServerError",
        "InternalFailure",
        "ServiceUnavailable",
        "RequestTimeout",
        "RequestTimeoutException",
    }
)

__all__ = [
    "UNREACHABLE_CODES",
    "CheckpointCommands",
    "CheckpointRequestFailed",
    "InstanceUnreachable",
]


class CheckpointCommands:
    """Sends the trainctl checkpoint document to one instance."""

    def __init__(self, client: Any, document_name: str) -> None:
        self._ssm = client
        self._document = document_name

    def request_checkpoint(
        self, *, instance_id: str, job_id: str, deadline: datetime, stop: bool = True
    ) -> str:
        """Send checkpoint-now to `instance_id`; returns the command id.

        `stop`: the training process ends after the checkpoint (Spot warning, migrating
        rebalance); otherwise it checkpoints and keeps training (rebalance, default policy).

        Raises `InstanceUnreachable` or `CheckpointRequestFailed` (never a botocore error).
        """
        try:
            response = self._ssm.send_command(
                InstanceIds=[instance_id],
                DocumentName=self._document,
                Parameters={
                    SSM_PARAM_JOB_ID: [job_id],
                    SSM_PARAM_DEADLINE: [format_time(deadline)],
                    SSM_PARAM_MODE: [CHECKPOINT_MODE_STOP if stop else CHECKPOINT_MODE_CONTINUE],
                },
                TimeoutSeconds=60,
                Comment=f"trainctl checkpoint-now {job_id}"[:100],
            )
        except ClientError as exc:
            raise _client_error(instance_id, exc) from exc
        except BotoCoreError as exc:
            # No answer at all (connect/read timeout, connection reset) may pass; anything
            # else here (no credentials, invalid parameters) is a configuration problem.
            transient = isinstance(exc, (BotoConnectionError, HTTPClientError))
            raise CheckpointRequestFailed(
                instance_id,
                type(exc).__name__,
                retryable=transient,
                message=f"checkpoint request to instance {instance_id} failed: {exc}",
            ) from exc
        return str(response["Command"]["CommandId"])


def _client_error(instance_id: str, exc: ClientError) -> CheckpointRequestFailed:
    error = exc.response.get("Error", {})
    code = str(error.get("Code", ""))
    if code in UNREACHABLE_CODES:
        return InstanceUnreachable(instance_id, code)
    status = int(exc.response.get("ResponseMetadata", {}).get("HTTPStatusCode") or 0)
    return CheckpointRequestFailed(
        instance_id,
        code or f"HTTP {status}",
        retryable=code in TRANSIENT_CODES or status >= 500,
        message=f"checkpoint request to instance {instance_id} failed ({code}): {error.get('Message', '')}",
    )
