"""Deployment configuration: one validated model built from CDK context.

Every setting is a flat context key `trainctl:<field>` so it can come from `cdk.json`, from
`cdk deploy -c trainctl:<field>=<value>` (the CLI passes strings) or from tests. Unknown
keys are errors, not silently ignored typos.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from enum import StrEnum
from typing import Any

from aws_cdk import RemovalPolicy
from aws_cdk import aws_logs as logs
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

CONTEXT_PREFIX = "trainctl:"

# Public Deep Learning AMI (NVIDIA driver, Amazon Linux 2023). Resolved by CloudFormation
# at deploy time from the public SSM parameter, so synth needs no credentials or lookups.
DEFAULT_AMI_PARAMETER = (
    "/aws/service/deeplearning/ami/x86_64/base-oss-nvidia-driver-gpu-amazon-linux-2023/latest/ami-id"
)

# Latest Powertools v3 layer version confirmed in the Powertools docs
# (docs/getting-started/install.md, "Lambda Layer": commercial, China and GovCloud ARNs).
DEFAULT_POWERTOOLS_LAYER_VERSION = 27
# A Lambda layer version ARN (any partition), for trainctl:powertools_layer_arn.
_LAYER_VERSION_ARN = re.compile(
    r"^arn:aws(?:-[a-z]+)*:lambda:(?P<region>[a-z]{2}(?:-[a-z]+)+-\d):\d{12}:layer:[A-Za-z0-9_-]+:\d+$"
)

# CloudWatch Logs accepts only these retention periods (days -> CDK enum member).
_RETENTION_DAYS: dict[int, logs.RetentionDays] = dict(
    zip(
        (
            1,
            3,
            5,
            7,
            14,
            30,
            60,
            90,
            120,
            150,
            180,
            365,
            400,
            545,
            731,
            1096,
            1827,
            2192,
            2557,
            2922,
            3288,
            3653,
        ),
        [r for r in logs.RetentionDays if r is not logs.RetentionDays.INFINITE],
        strict=True,
    )
)
_INSTANCE_TYPE = re.compile(r"^[a-z][a-z0-9-]*\.[a-z0-9]+$")
_EMAIL = re.compile(r"^[^@\s]+@[^@\s]+\.[^@\s]+$")


class ConfigError(ValueError):
    """The deployment configuration is invalid; the message names every bad key."""


class Stage(StrEnum):
    DEV = "dev"
    PROD = "prod"


class Removal(StrEnum):
    DESTROY = "destroy"
    RETAIN = "retain"


class TrainctlConfig(BaseModel):
    """What a user may change without editing code (`-c trainctl:<field>=<value>`)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    stack_name: str = Field(default="Trainctl", pattern=r"^[A-Za-z][A-Za-z0-9-]{0,127}$")
    stage: Stage = Stage.DEV
    # Env-agnostic unless both are given (then lookups/ARNs render concrete values).
    account: str | None = Field(default=None, pattern=r"^\d{12}$")
    region: str | None = Field(default=None, pattern=r"^[a-z]{2}(-[a-z]+)+-\d$")
    # Existing network (no lookups: ids come from context) or, if unset, a new minimal VPC.
    vpc_id: str | None = Field(default=None, pattern=r"^vpc-[0-9a-f]{8,17}$")
    subnet_ids: tuple[str, ...] = ()
    vpc_cidr: str = Field(default="10.42.0.0/16", pattern=r"^\d+\.\d+\.\d+\.\d+/\d+$")
    max_azs: int = Field(default=3, ge=1, le=6)
    # Instances the resume workflow may launch (enforced by the ec2:InstanceType condition).
    allowed_instance_types: tuple[str, ...] = ("g5.xlarge", "g5.2xlarge", "g6.xlarge", "g6.2xlarge")
    ami_ssm_parameter: str = Field(default=DEFAULT_AMI_PARAMETER, pattern=r"^/[A-Za-z0-9_./-]+$")
    root_volume_gib: int = Field(default=200, ge=30, le=16384)
    alert_email: str | None = None
    log_retention_days: int = 30
    # Opt-in S3 expiration of *current* checkpoint objects by age (0 = never, the default).
    # Retention is the Checkpointer's job (it keeps the newest N per job); an age rule
    # cannot tell a paused job's only checkpoint from junk, and it may delete a
    # checkpoint's files while its younger manifest survives. See docs/DEPLOY.md.
    checkpoint_expiry_days: int = Field(default=0, ge=0)
    # Overwritten/deleted object versions (retention pruning, a fenced agent's overwrite)
    # are kept this long, then removed.
    noncurrent_version_days: int = Field(default=7, ge=1)
    ecr_immutable_tags: bool = True
    ecr_max_images: int = Field(default=20, ge=1, le=1000)
    # None: no reservation. A reservation is taken from the account pool and fails the
    # deploy on accounts with the default low concurrency quota, so it is opt-in.
    handler_reserved_concurrency: int | None = Field(default=None, ge=1, le=1000)
    powertools_layer_version: int = Field(default=DEFAULT_POWERTOOLS_LAYER_VERSION, ge=1)
    # The whole layer ARN instead (python3.11/arm64 Powertools v3), for a region Powertools
    # does not publish to (e.g. cn-northwest-1) or a copy in your own account.
    powertools_layer_arn: str | None = None
    # None: follow the stage (dev destroys, prod retains data).
    removal_policy: Removal | None = None
    # The FIS game-day template. AWS FIS does not exist in every region (not in the China
    # regions, for one): turn it off there, or the deploy fails on the template's type.
    gameday: bool = True

    @field_validator("account", mode="before")
    @classmethod
    def _account_as_text(cls, value: Any) -> Any:
        # A 12-digit account id written as a JSON number in cdk.json is still an id.
        return str(value) if isinstance(value, int) else value

    @field_validator("subnet_ids", "allowed_instance_types", mode="before")
    @classmethod
    def _split_csv(cls, value: Any) -> Any:
        # `-c trainctl:subnet_ids=subnet-a,subnet-b` arrives as one string.
        if isinstance(value, str):
            return tuple(v.strip() for v in value.split(",") if v.strip())
        return value

    @field_validator("subnet_ids")
    @classmethod
    def _check_subnets(cls, value: tuple[str, ...]) -> tuple[str, ...]:
        for subnet in value:
            if not re.fullmatch(r"subnet-[0-9a-f]{8,17}", subnet):
                raise ValueError(f"{subnet!r} is not a subnet id (subnet-0123abcd...)")
        return value

    @field_validator("allowed_instance_types")
    @classmethod
    def _check_instance_types(cls, value: tuple[str, ...]) -> tuple[str, ...]:
        if not value:
            raise ValueError("at least one instance type is required")
        for itype in value:
            if not _INSTANCE_TYPE.fullmatch(itype):
                raise ValueError(f"{itype!r} is not an EC2 instance type (e.g. g5.xlarge)")
        return value

    @field_validator("alert_email")
    @classmethod
    def _check_email(cls, value: str | None) -> str | None:
        if value is not None and not _EMAIL.fullmatch(value):
            raise ValueError(f"{value!r} is not an e-mail address")
        return value

    @field_validator("log_retention_days")
    @classmethod
    def _check_retention(cls, value: int) -> int:
        if value not in _RETENTION_DAYS:
            raise ValueError(f"CloudWatch Logs accepts only {sorted(_RETENTION_DAYS)}")
        return value

    @field_validator("powertools_layer_arn")
    @classmethod
    def _check_layer_arn(cls, value: str | None) -> str | None:
        if value is not None and not _LAYER_VERSION_ARN.fullmatch(value):
            raise ValueError(
                f"{value!r} is not a Lambda layer version ARN "
                "(arn:aws:lambda:<region>:<account>:layer:<name>:<version>)"
            )
        return value

    @model_validator(mode="after")
    def _check_layer(self) -> TrainctlConfig:
        if self.powertools_layer_arn is None:
            return self
        if "powertools_layer_version" in self.model_fields_set:
            raise ValueError("give powertools_layer_arn or powertools_layer_version, not both")
        found = _LAYER_VERSION_ARN.fullmatch(self.powertools_layer_arn)
        assert found is not None  # checked by the field validator
        # Lambda attaches layers from the function's own region only.
        if self.region is not None and found["region"] != self.region:
            raise ValueError(
                f"powertools_layer_arn is in {found['region']}, the stack in {self.region}: "
                "Lambda only attaches layers from the function's region"
            )
        return self

    @model_validator(mode="after")
    def _check_network(self) -> TrainctlConfig:
        if bool(self.vpc_id) != bool(self.subnet_ids):
            raise ValueError("vpc_id and subnet_ids go together (or omit both for a new VPC)")
        if (self.account is None) != (self.region is None):
            raise ValueError("account and region go together (or omit both: env-agnostic)")
        return self

    @property
    def removal(self) -> RemovalPolicy:
        """Removal policy for stateful resources: explicit setting, else by stage."""
        choice = self.removal_policy or (Removal.RETAIN if self.stage is Stage.PROD else Removal.DESTROY)
        return RemovalPolicy.RETAIN if choice is Removal.RETAIN else RemovalPolicy.DESTROY

    @property
    def log_retention(self) -> logs.RetentionDays:
        return _RETENTION_DAYS[self.log_retention_days]

    @classmethod
    def from_context(cls, context: Mapping[str, Any]) -> TrainctlConfig:
        """Validate the `trainctl:*` keys of a CDK context; raise ConfigError naming each problem."""
        values = {
            k.removeprefix(CONTEXT_PREFIX): v for k, v in context.items() if k.startswith(CONTEXT_PREFIX)
        }
        try:
            return cls.model_validate(values)
        except ValidationError as exc:
            problems = "; ".join(
                f"{CONTEXT_PREFIX}{'.'.join(str(p) for p in err['loc']) or '(config)'}: {err['msg']}"
                for err in exc.errors()
            )
            raise ConfigError(f"invalid trainctl context: {problems}") from exc
