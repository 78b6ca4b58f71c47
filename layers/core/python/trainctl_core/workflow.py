"""Step Functions adapter: start the resume workflow, complete its checkpoint handshake.

The only module here that talks to Step Functions. The execution name is derived from
the input document (`<job>-launch` for the launch, `<job>-<attempt>` for the resume after
the loss of that attempt), so a second start of the same run is `ExecutionAlreadyExists`,
which this adapter reports as "already started" rather than an error.
"""

from __future__ import annotations

import json
from datetime import datetime
from typing import Any

from botocore.exceptions import ClientError

# Re-exported: the agent imports the handshake's error from here.
from trainctl_core.errors import HandshakeError
from trainctl_core.jobs import InterruptionReason, execution_name, format_time

__all__ = ["Handshake", "HandshakeError", "ResumeStarter", "execution_name_for", "resume_input"]


def resume_input(
    *,
    job_id: str,
    instance_id: str | None,
    attempt: int,
    reason: InterruptionReason,
    deadline: datetime | None,
    noticed_at: datetime,
) -> dict[str, Any]:
    """The resume workflow's input document (its contract is in infra/workflows/).

    It depends only on the recorded loss, never on when it is computed: Step Functions
    treats a second start with the same name *and input* as the same execution, so a
    retried handler gets success rather than an error while the workflow runs.
    `noticed_at` is the moment the remaining notice is measured from: when the loss was
    recorded (the workflow starts right after).
    """
    document: dict[str, Any] = {
        "job_id": job_id,
        "instance_id": instance_id,
        "attempt": attempt,
        "reason": reason.value,
        "deadline": format_time(deadline) if deadline else None,
    }
    if deadline is not None:
        # Step Functions cannot subtract timestamps, so the handshake's timeout is computed
        # here. At least 1 s: a deadline already past still lets a landed checkpoint count.
        document["handshake_timeout_seconds"] = max(1, int((deadline - noticed_at).total_seconds()))
    return document


def execution_name_for(document: dict[str, Any]) -> str:
    """The execution name of a workflow input document (see `jobs.execution_name`)."""
    return execution_name(document["job_id"], int(document["attempt"]), document["reason"])


class ResumeStarter:
    """Starts the resume state machine: the launch of a job, or the resume after a loss."""

    def __init__(self, client: Any, state_machine_arn: str) -> None:
        self._sfn = client
        self._arn = state_machine_arn

    def start(self, document: dict[str, Any]) -> bool:
        """Start the execution named after `document`.

        True when started, or already running with the same input (Step Functions answers
        such a repeat with success). False on `ExecutionAlreadyExists`: the name is taken
        by an execution that has ended or has another input, i.e. this run was started.
        """
        try:
            self._sfn.start_execution(
                stateMachineArn=self._arn,
                name=execution_name_for(document),
                input=json.dumps(document),
            )
        except ClientError as exc:
            if exc.response.get("Error", {}).get("Code") == "ExecutionAlreadyExists":
                return False
            raise
        return True


class Handshake:
    """Completes the workflow's `waitForTaskToken` checkpoint handshake."""

    def __init__(self, client: Any) -> None:
        self._sfn = client

    def complete(self, task_token: str, output: dict[str, Any]) -> None:
        try:
            self._sfn.send_task_success(taskToken=task_token, output=json.dumps(output))
        except ClientError as exc:
            code = exc.response.get("Error", {}).get("Code")
            if code in ("TaskTimedOut", "InvalidToken", "TaskDoesNotExist"):
                raise HandshakeError(f"handshake token no longer valid: {code}") from exc
            raise
