"""SSM adapter: ask the agent on an instance to checkpoint now.

The only module here that talks to SSM. The command is addressed by instance id (never by
targets), with a short delivery timeout: a notice lasts two minutes, a command that has
not been delivered after that is useless.
"""

from __future__ import annotations

from datetime import datetime
from typing import Any

from botocore.exceptions import ClientError

from trainctl_core.jobs import format_time
from trainctl_core.settings import SSM_PARAM_DEADLINE, SSM_PARAM_JOB_ID

# SSM errors that mean "this instance cannot receive commands" (gone, stopped, or its
# agent is not registered): the checkpoint request is lost, recovery must go on without it.
UNREACHABLE_CODES = frozenset({"InvalidInstanceId", "InvalidInstanceInformationFilterValue"})


class InstanceUnreachable(Exception):
    def __init__(self, instance_id: str, code: str) -> None:
        super().__init__(f"instance {instance_id} cannot receive SSM commands ({code})")
        self.instance_id, self.code = instance_id, code


class CheckpointCommands:
    """Sends the trainctl checkpoint document to one instance."""

    def __init__(self, client: Any, document_name: str) -> None:
        self._ssm = client
        self._document = document_name

    def request_checkpoint(self, *, instance_id: str, job_id: str, deadline: datetime) -> str:
        """Send checkpoint-now to `instance_id`; returns the command id."""
        try:
            response = self._ssm.send_command(
                InstanceIds=[instance_id],
                DocumentName=self._document,
                Parameters={
                    SSM_PARAM_JOB_ID: [job_id],
                    SSM_PARAM_DEADLINE: [format_time(deadline)],
                },
                TimeoutSeconds=60,
                Comment=f"trainctl checkpoint-now {job_id}"[:100],
            )
        except ClientError as exc:
            code = exc.response.get("Error", {}).get("Code", "")
            if code in UNREACHABLE_CODES:
                raise InstanceUnreachable(instance_id, code) from exc
            raise
        return str(response["Command"]["CommandId"])
