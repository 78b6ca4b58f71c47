"""Finding the deployed stack: its outputs, and clients in the user's region/profile.

Every command that touches AWS goes through `Cloud`: one boto3 session per invocation
(`--profile`/`--region` honoured, the standard `AWS_*` variables otherwise), the stack's
outputs read once with `describe_stacks`, and botocore's errors turned into `CliError`s
that say what to do (never a traceback).
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from functools import cached_property
from typing import Any

import boto3
from botocore.config import Config
from botocore.exceptions import (
    BotoCoreError,
    ClientError,
    EndpointConnectionError,
    NoCredentialsError,
    NoRegionError,
    PartialCredentialsError,
    ProfileNotFound,
    TokenRetrievalError,
)

# The stack's output names and default name, as infra/stack.py and infra/config.py define
# them. Copies, because importing infra pulls in aws_cdk (seconds of start-up for every
# command); tests/cli/test_stack.py fails if the two sides drift apart.
OUTPUT_JOBS_TABLE = "JobsTableName"
OUTPUT_CHECKPOINT_BUCKET = "CheckpointBucketName"
OUTPUT_STATE_MACHINE = "ResumeStateMachineArn"
OUTPUT_REPOSITORY_URI = "TrainingImageRepositoryUri"
OUTPUT_CHECKPOINT_DOCUMENT = "CheckpointDocumentName"
OUTPUT_FIS_TEMPLATE = "GameDayExperimentTemplateId"
OUTPUT_SUBNETS = "SubnetIds"
OUTPUT_INSTANCE_TYPES = "AllowedInstanceTypes"
DEFAULT_STACK_NAME = "Trainctl"

ENV_STACK = "TRAINCTL_STACK"

# Stack states whose outputs are missing or about to go away. UPDATE_* states (including
# UPDATE_ROLLBACK_COMPLETE) keep the last good outputs, so they are usable.
UNUSABLE_STACK_STATUSES = frozenset(
    {
        "CREATE_IN_PROGRESS",
        "CREATE_FAILED",
        "ROLLBACK_IN_PROGRESS",
        "ROLLBACK_FAILED",
        "ROLLBACK_COMPLETE",
        "DELETE_IN_PROGRESS",
        "DELETE_FAILED",
        "DELETE_COMPLETE",
    }
)
# The agent's CloudWatch Logs group: a stack output when the stack exports one, else this
# naming convention (`/trainctl/<stack>/agent`, one stream per `<job>/<attempt>/<instance>`).
OUTPUT_AGENT_LOG_GROUP = "AgentLogGroupName"

EXIT_FAILURE = 1  # the cloud said no (not deployed, no credentials, no such job, ...)
EXIT_USAGE = 2  # the user's input is wrong (bad spec, bad option); nothing was created

_CONFIG = Config(retries={"max_attempts": 4, "mode": "standard"}, connect_timeout=5, read_timeout=20)


class CliError(Exception):
    """A failure the CLI reports as one line on stderr with an exit code."""

    def __init__(self, message: str, *, exit_code: int = EXIT_FAILURE, hint: str | None = None) -> None:
        super().__init__(message)
        self.message, self.exit_code, self.hint = message, exit_code, hint


class StackNotDeployed(CliError):
    pass


class StackOutputMissing(CliError):
    pass


def default_agent_log_group(stack_name: str) -> str:
    return f"/trainctl/{stack_name}/agent"


@dataclass
class Cloud:
    """The user's AWS session plus the trainctl stack it talks to."""

    stack_name: str = DEFAULT_STACK_NAME
    region: str | None = None
    profile: str | None = None
    _clients: dict[str, Any] = field(default_factory=dict, repr=False)

    @classmethod
    def from_options(cls, stack: str | None, region: str | None, profile: str | None) -> Cloud:
        return cls(
            stack_name=stack or os.environ.get(ENV_STACK) or DEFAULT_STACK_NAME,
            region=region,
            profile=profile,
        )

    @cached_property
    def session(self) -> boto3.session.Session:
        with aws_errors(self):
            return boto3.session.Session(profile_name=self.profile, region_name=self.region)

    @property
    def region_name(self) -> str:
        name = self.session.region_name
        if not name:
            raise CliError(
                "no AWS region configured",
                exit_code=EXIT_USAGE,
                hint="pass --region, or set AWS_REGION / a region in your profile",
            )
        return str(name)

    def client(self, service: str) -> Any:
        """One client per service for this invocation."""
        if service not in self._clients:
            with aws_errors(self):
                self._clients[service] = self.session.client(  # type: ignore[call-overload]
                    service, region_name=self.region_name, config=_CONFIG
                )
        return self._clients[service]

    @cached_property
    def outputs(self) -> dict[str, str]:
        """The stack's outputs (OutputKey -> OutputValue)."""
        with aws_errors(self):
            try:
                stacks = self.client("cloudformation").describe_stacks(StackName=self.stack_name)["Stacks"]
            except ClientError as exc:
                error = exc.response.get("Error", {})
                if error.get("Code") == "ValidationError" and "does not exist" in error.get("Message", ""):
                    raise StackNotDeployed(
                        f"stack {self.stack_name!r} is not deployed in {self.region_name}",
                        hint=(
                            "deploy it with `npx cdk deploy` (README, Deploy), or name another "
                            f"stack with --stack / {ENV_STACK}"
                        ),
                    ) from None
                raise
        if not stacks:
            raise StackNotDeployed(f"stack {self.stack_name!r} is not deployed in {self.region_name}")
        stack = stacks[0]
        status = str(stack.get("StackStatus", ""))
        if status in UNUSABLE_STACK_STATUSES:
            raise StackNotDeployed(
                f"stack {self.stack_name!r} is in state {status}",
                hint="wait for it, or fix and redeploy it (`npx cdk deploy`), before using trainctl",
            )
        return {o["OutputKey"]: o["OutputValue"] for o in stack.get("Outputs", [])}

    def output(self, name: str) -> str:
        value = self.outputs.get(name)
        if not value:
            raise StackOutputMissing(
                f"stack {self.stack_name!r} has no output {name!r}",
                hint="the stack predates this trainctl version: redeploy it",
            )
        return value

    def output_list(self, name: str) -> list[str]:
        return [v for v in self.outputs.get(name, "").split(",") if v]

    # Named accessors: each command reads only the outputs it needs.
    @property
    def jobs_table(self) -> str:
        return self.output(OUTPUT_JOBS_TABLE)

    @property
    def state_machine_arn(self) -> str:
        return self.output(OUTPUT_STATE_MACHINE)

    @property
    def checkpoint_document(self) -> str:
        return self.output(OUTPUT_CHECKPOINT_DOCUMENT)

    @property
    def checkpoint_bucket(self) -> str:
        return self.output(OUTPUT_CHECKPOINT_BUCKET)

    @property
    def repository_uri(self) -> str:
        return self.output(OUTPUT_REPOSITORY_URI)

    @property
    def fis_template_id(self) -> str:
        return self.output(OUTPUT_FIS_TEMPLATE)

    @property
    def subnets(self) -> list[str]:
        return self.output_list(OUTPUT_SUBNETS)

    @property
    def allowed_instance_types(self) -> list[str]:
        return self.output_list(OUTPUT_INSTANCE_TYPES)

    @property
    def agent_log_group(self) -> str:
        return self.outputs.get(OUTPUT_AGENT_LOG_GROUP) or default_agent_log_group(self.stack_name)


@contextmanager
def aws_errors(cloud: Cloud | None = None) -> Iterator[None]:
    """Turn botocore's exceptions into `CliError`s that tell the user what to do."""
    profile = cloud.profile if cloud else None
    try:
        yield
    except CliError:
        raise
    except ProfileNotFound:
        raise CliError(
            f"AWS profile {profile!r} not found",
            exit_code=EXIT_USAGE,
            hint="check ~/.aws/config or --profile",
        ) from None
    except (NoCredentialsError, PartialCredentialsError, TokenRetrievalError):
        raise CliError(
            "no usable AWS credentials",
            hint="run `aws configure` / `aws sso login`, or pass --profile",
        ) from None
    except NoRegionError:
        raise CliError(
            "no AWS region configured", exit_code=EXIT_USAGE, hint="pass --region, or set AWS_REGION"
        ) from None
    except EndpointConnectionError as exc:
        raise CliError(f"cannot reach AWS: {exc}", hint="check your network / AWS_ENDPOINT_URL") from None
    except ClientError as exc:
        error = exc.response.get("Error", {})
        code = error.get("Code", "Error")
        if code in (
            "ExpiredToken",
            "ExpiredTokenException",
            "InvalidClientTokenId",
            "UnrecognizedClientException",
        ):
            raise CliError(
                f"AWS rejected the credentials ({code})", hint="refresh them or pass --profile"
            ) from None
        if code in ("AccessDenied", "AccessDeniedException", "UnauthorizedOperation"):
            operation = exc.operation_name
            raise CliError(f"not allowed to call {operation}: {error.get('Message', code)}") from None
        raise CliError(
            f"{exc.operation_name} failed: {code}: {error.get('Message', '')}".rstrip(": ")
        ) from None
    except BotoCoreError as exc:
        raise CliError(f"AWS client error: {exc}") from None


# Injected by tests (typer's `obj`); the default builds a Cloud from the options.
CloudFactory = Callable[[str | None, str | None, str | None], Cloud]
