"""Environment variables the agent hands to the training process (and the CLI reads).

One module so the agent that sets a variable and the Checkpointer that reads it cannot
drift apart. Endpoints are *not* here on purpose: processes use the standard
`AWS_ENDPOINT_URL` / `AWS_EC2_METADATA_SERVICE_ENDPOINT`.
"""

from __future__ import annotations

from trainctl_core.settings import ENV_CHECKPOINT_BUCKET, ENV_JOBS_TABLE

JOB_ID = "TRAINCTL_JOB_ID"
ATTEMPT = "TRAINCTL_ATTEMPT"
INSTANCE_ID = "TRAINCTL_INSTANCE_ID"
CHECKPOINT_BUCKET = ENV_CHECKPOINT_BUCKET
JOBS_TABLE = ENV_JOBS_TABLE
CHECKPOINT_PREFIX = "TRAINCTL_CHECKPOINT_PREFIX"  # s3://bucket/<job>/ckpt/ (informational)
CHECKPOINT_DIR = "TRAINCTL_CHECKPOINT_DIR"  # local-directory backend root (no S3)
STAGING_DIR = "TRAINCTL_STAGING_DIR"  # local scratch for snapshots before upload
CHECKPOINT_KEEP = "TRAINCTL_CHECKPOINT_KEEP"
CHECKPOINT_INTERVAL_SECONDS = "TRAINCTL_CHECKPOINT_INTERVAL_SECONDS"
RESUME_STEP = "TRAINCTL_RESUME_STEP"
RESUME_PREFIX = "TRAINCTL_RESUME_PREFIX"
AGENT_SOCKET = "TRAINCTL_AGENT_SOCKET"
# CloudWatch Logs group the agent ships its own and the child's output to (unset: no shipping).
AGENT_LOG_GROUP = "TRAINCTL_AGENT_LOG_GROUP"
REGION = "AWS_REGION"

DEFAULT_AGENT_SOCKET = "/run/trainctl/agent.sock"
DEFAULT_STAGING_DIR = "/var/lib/trainctl/staging"
