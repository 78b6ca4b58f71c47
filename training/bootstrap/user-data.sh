#!/bin/bash
# trainctl user data: install the agent and run the job's training command under it.
#
# The launch template is shared by every job, so nothing job-specific is baked in here:
# the agent reads its job id from the instance's `trainctl:job-id` tag through IMDS
# (instance metadata tags are enabled on the launch template) and the command, image and
# attempt from the job row. Values below are substituted by infra (Fn::Sub) per stack.
set -euo pipefail

TABLE="${JobsTableName}"
BUCKET="${CheckpointBucketName}"
REGION="${AWS::Region}"
PACKAGE="${AgentPackage}"          # e.g. trainctl==0.1.0, or an S3 URL of the wheel
IMAGE="${TrainingImage}"           # optional: run the job in this container image
LOG_GROUP="${AgentLogGroupName}"   # the agent ships its and the training output here

install -d -m 0750 /run/trainctl /var/lib/trainctl/staging

if [ -n "$IMAGE" ]; then
  # Container mode: the image's entrypoint is the agent (training/Dockerfile).
  # A container cannot power off its host: the agent inside records the outcome and
  # this script shuts the instance down after a success.
  if docker run --rm --network host --name trainctl-job \
      -v /run/trainctl:/run/trainctl -v /var/lib/trainctl:/var/lib/trainctl \
      -e TRAINCTL_JOBS_TABLE="$TABLE" -e TRAINCTL_CHECKPOINT_BUCKET="$BUCKET" -e AWS_REGION="$REGION" \
      -e TRAINCTL_AGENT_LOG_GROUP="$LOG_GROUP" \
      "$IMAGE"; then
    shutdown -h now
  fi
  exit 0
fi

python3 -m venv /opt/trainctl
/opt/trainctl/bin/pip install --quiet "$PACKAGE"

# The job's command comes from the row; `trainctl agent` without a command after `--`
# would refuse, so resolve it first (single source of truth: the job spec).
JOB_ID="$(TOKEN=$(curl -sf -X PUT http://169.254.169.254/latest/api/token \
            -H 'X-aws-ec2-metadata-token-ttl-seconds: 300') && \
          curl -sf -H "X-aws-ec2-metadata-token: $TOKEN" \
            http://169.254.169.254/latest/meta-data/tags/instance/trainctl:job-id)"
COMMAND="$(/opt/trainctl/bin/python - "$JOB_ID" "$TABLE" "$REGION" <<'PY'
import shlex, sys
import boto3
from trainctl_core.store import JobStore
job = JobStore(boto3.client("dynamodb", region_name=sys.argv[3]), sys.argv[2]).get(sys.argv[1])
print(shlex.join(job.spec.command))
PY
)"

cat > /etc/systemd/system/trainctl-agent.service <<UNIT
[Unit]
Description=trainctl agent (job $JOB_ID)
After=network-online.target
Wants=network-online.target

[Service]
Environment=TRAINCTL_JOB_ID=$JOB_ID
Environment=TRAINCTL_JOBS_TABLE=$TABLE
Environment=TRAINCTL_CHECKPOINT_BUCKET=$BUCKET
Environment=TRAINCTL_AGENT_LOG_GROUP=$LOG_GROUP
Environment=TRAINCTL_STAGING_DIR=/var/lib/trainctl/staging
Environment=AWS_REGION=$REGION
WorkingDirectory=/var/lib/trainctl
ExecStart=/opt/trainctl/bin/trainctl agent -- $COMMAND
# Exit codes are outcomes already recorded on the job row: never restart into a loop.
Restart=no
KillMode=mixed
TimeoutStopSec=110

[Install]
WantedBy=multi-user.target
UNIT

systemctl daemon-reload
systemctl start trainctl-agent.service
