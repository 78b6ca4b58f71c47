"""The SSM adapter turns every SDK failure into a typed, boto3-free error that says whether
a later attempt can succeed (the interruption handler retries only those)."""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

import boto3
import pytest
from botocore.exceptions import EndpointConnectionError, NoCredentialsError, ReadTimeoutError
from botocore.stub import Stubber

from trainctl_core.commands import CheckpointCommands
from trainctl_core.errors import CheckpointRequestFailed, InstanceUnreachable

INSTANCE = "i-1234567890abcdef0"
DEADLINE = datetime(2026, 12, 3, 12, 2, tzinfo=UTC)


def request(client: Any) -> str:
    return CheckpointCommands(client, "trainctl-checkpoint").request_checkpoint(
        instance_id=INSTANCE, job_id="job-1", deadline=DEADLINE
    )


@pytest.mark.parametrize(
    ("code", "status", "kind", "retryable"),
    [
        ("InvalidInstanceId", 400, InstanceUnreachable, False),
        ("ThrottlingException", 400, CheckpointRequestFailed, True),
        ("InternalServerError", 500, CheckpointRequestFailed, True),
        ("SomethingNew", 503, CheckpointRequestFailed, True),  # any 5xx may pass
        ("AccessDeniedException", 400, CheckpointRequestFailed, False),
        ("InvalidDocument", 400, CheckpointRequestFailed, False),
    ],
)
def test_aws_errors_become_typed_failures(code: str, status: int, kind: type, retryable: bool) -> None:
    client = boto3.client("ssm", region_name="us-east-1")
    with Stubber(client) as stub:
        stub.add_client_error("send_command", service_error_code=code, http_status_code=status)

        with pytest.raises(CheckpointRequestFailed) as info:
            request(client)

    assert type(info.value) is kind
    assert (info.value.instance_id, info.value.code, info.value.retryable) == (INSTANCE, code, retryable)
    assert code in str(info.value)


class Broken:
    def __init__(self, error: Exception) -> None:
        self.error = error

    def send_command(self, **kwargs: Any) -> Any:
        raise self.error


@pytest.mark.parametrize(
    ("error", "retryable"),
    [
        (EndpointConnectionError(endpoint_url="https://ssm.us-east-1.amazonaws.com"), True),
        (ReadTimeoutError(endpoint_url="https://ssm.us-east-1.amazonaws.com"), True),
        (NoCredentialsError(), False),
    ],
)
def test_transport_errors_become_typed_failures(error: Exception, retryable: bool) -> None:
    with pytest.raises(CheckpointRequestFailed) as info:
        request(Broken(error))

    assert info.value.retryable is retryable
    assert info.value.code == type(error).__name__
    assert info.value.__cause__ is error


def test_a_delivered_request_returns_the_command_id() -> None:
    client = boto3.client("ssm", region_name="us-east-1")
    with Stubber(client) as stub:
        stub.add_response(
            "send_command",
            {"Command": {"CommandId": "0b2a6b58-1f3c-4b8e-9d5e-2c7f1a9e4d31"}},
            {
                "InstanceIds": [INSTANCE],
                "DocumentName": "trainctl-checkpoint",
                "Parameters": {
                    "JobId": ["job-1"],
                    "Deadline": ["2026-12-03T12:02:00.000Z"],
                    "Mode": ["stop"],
                },
                "TimeoutSeconds": 60,
                "Comment": "trainctl checkpoint-now job-1",
            },
        )
        assert request(client) == "0b2a6b58-1f3c-4b8e-9d5e-2c7f1a9e4d31"
