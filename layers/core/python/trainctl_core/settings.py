"""Runtime settings: one validated model, read once.

The environment variable names are constants that `infra/` imports as well, so the stack
that sets a variable and the code that reads it cannot drift apart.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from functools import lru_cache

from pydantic import BaseModel, ConfigDict, Field, ValidationError

# Environment variable names (shared with infra/constructs/*).
ENV_JOBS_TABLE = "TRAINCTL_JOBS_TABLE"
ENV_IDEMPOTENCY_TABLE = "TRAINCTL_IDEMPOTENCY_TABLE"
ENV_CHECKPOINT_BUCKET = "TRAINCTL_CHECKPOINT_BUCKET"
ENV_CHECKPOINT_DOCUMENT = "TRAINCTL_CHECKPOINT_DOCUMENT"
ENV_RESUME_STATE_MACHINE_ARN = "TRAINCTL_RESUME_STATE_MACHINE_ARN"
ENV_NOTICE_SECONDS = "TRAINCTL_NOTICE_SECONDS"

# DynamoDB schema of the jobs table (shared with infra/constructs/storage.py).
JOBS_PARTITION_KEY = "pk"
JOBS_BY_INSTANCE_INDEX = "by-instance"
JOBS_INSTANCE_ATTRIBUTE = "instance_id"
# The instance whose loss was recorded last: late events about an instance the job has
# already replaced find the job through this index (a stale attempt, not an unmanaged
# instance).
JOBS_BY_INTERRUPTED_INSTANCE_INDEX = "by-interrupted-instance"
JOBS_INTERRUPTED_INSTANCE_ATTRIBUTE = "interrupted_instance_id"
# Index name -> partition-key attribute (keys-only projections), for infra and tests.
JOBS_INDEXES = {
    JOBS_BY_INSTANCE_INDEX: JOBS_INSTANCE_ATTRIBUTE,
    JOBS_BY_INTERRUPTED_INSTANCE_INDEX: JOBS_INTERRUPTED_INSTANCE_ATTRIBUTE,
}
IDEMPOTENCY_PARTITION_KEY = "id"
IDEMPOTENCY_TTL_ATTRIBUTE = "expiration"

# Resource tags every trainctl-managed instance carries (IAM conditions key on them).
TAG_JOB_ID = "trainctl:job-id"
TAG_ATTEMPT = "trainctl:attempt"
TAG_MANAGED = "trainctl:managed"

# Parameters of the trainctl checkpoint SSM Command document.
SSM_PARAM_JOB_ID = "JobId"
SSM_PARAM_DEADLINE = "Deadline"
# What the agent does after the checkpoint: "stop" (a Spot warning or a migrating
# rebalance: the training process ends and the replacement resumes) or "continue" (a
# rebalance under the default policy: checkpoint, keep training on this instance).
SSM_PARAM_MODE = "Mode"
CHECKPOINT_MODE_STOP = "stop"
CHECKPOINT_MODE_CONTINUE = "continue"
CHECKPOINT_MODES = (CHECKPOINT_MODE_STOP, CHECKPOINT_MODE_CONTINUE)

# EC2 gives two minutes between the Spot interruption warning and the reclaim.
SPOT_NOTICE_SECONDS = 120


class SettingsError(RuntimeError):
    """A required setting is missing or invalid; raised at cold start, naming it."""


class Settings(BaseModel):
    """Everything the handlers need from their environment."""

    model_config = ConfigDict(frozen=True, populate_by_name=True)

    jobs_table: str = Field(validation_alias=ENV_JOBS_TABLE, min_length=1)
    idempotency_table: str = Field(validation_alias=ENV_IDEMPOTENCY_TABLE, min_length=1)
    checkpoint_document: str = Field(validation_alias=ENV_CHECKPOINT_DOCUMENT, min_length=1)
    resume_state_machine_arn: str = Field(validation_alias=ENV_RESUME_STATE_MACHINE_ARN, min_length=1)
    notice_seconds: int = Field(validation_alias=ENV_NOTICE_SECONDS, default=SPOT_NOTICE_SECONDS, gt=0)

    @classmethod
    def from_environ(cls, environ: Mapping[str, str] | None = None) -> Settings:
        env = os.environ if environ is None else environ
        names = [str(f.validation_alias) for f in cls.model_fields.values() if f.validation_alias]
        try:
            return cls.model_validate({k: env[k] for k in names if k in env})
        except ValidationError as exc:
            problems = "; ".join(
                f"{'.'.join(str(p) for p in err['loc'])}: {err['msg']}" for err in exc.errors()
            )
            raise SettingsError(f"invalid trainctl settings: {problems}") from exc


@lru_cache(maxsize=1)
def get_settings() -> Settings:
    """The process-wide settings, validated on first use (i.e. at cold start)."""
    return Settings.from_environ()
