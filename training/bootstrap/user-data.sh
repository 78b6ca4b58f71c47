#!/bin/bash
# trainctl user data: install the agent and start it under systemd; the agent runs the job.
#
# This file IS the launch template's user data: infra (infra/constructs/instances.py) puts
# it after the command that downloads the agent source asset and renders it with Fn::Sub.
# Every dollar-brace placeholder below is a CloudFormation substitution, so bash variables
# are written `$VAR` (a literal dollar-brace would need a `!` after the brace); tests fail
# on any placeholder infra does not fill and run `bash -n` on the rendered script.
#
# The launch template is shared by every job, so nothing job-specific is baked in: the
# agent reads its job id from the instance's `trainctl:job-id` tag through IMDS (metadata
# tags are on) and the command from the job row, so `trainctl agent` gets no command here.
set -euo pipefail
# A bootstrap that fails (a package index down, a full disk) must not leave an instance
# billing with no agent: say where, and power off. The launch template terminates on
# shutdown, and the instance-state rule then recovers the job from its last checkpoint.
trap 'echo "trainctl bootstrap failed at line $LINENO: powering off" >&2; shutdown -h now' ERR

TABLE="${JobsTableName}"
BUCKET="${CheckpointBucketName}"
LOG_GROUP="${AgentLogGroupName}"    # the agent ships its own and the training output here
REGION="${AWS::Region}"
ARCHIVE="${AgentArchive}"           # the agent source asset, downloaded just before this
AGENT_HOME="${AgentHome}"
AGENT_BIN="${AgentBin}"             # what the SSM checkpoint document runs
KEY_ATTR="${JobsPartitionKey}"      # job rows are {KEY_ATTR: KEY_PREFIX<job id>}
KEY_PREFIX="${JobKeyPrefix}"
PACKAGE="$AGENT_HOME/src"           # the unpacked source, installed with pip
STAGING=/var/lib/trainctl/staging
TORCH_VERSION=2.13.0                # = training/Dockerfile and pyproject's `train` extra
ENV_FILE=/etc/trainctl/agent.env
UNIT_FILE=/etc/systemd/system/trainctl-agent.service

install -d -m 0750 /run/trainctl /var/lib/trainctl "$STAGING"
install -d -m 0755 /etc/trainctl
# Left by a containerised agent that wants its host shut down (see trainctl-after-job).
rm -f /run/trainctl/shutdown-requested

# The project needs Python >= 3.11; Amazon Linux 2023's python3 is 3.9.
command -v python3.11 >/dev/null || dnf install -y -q python3.11

# The agent on the host in both modes: `trainctl checkpoint-now` (the SSM document) runs
# here and reaches the agent, in a container or not, over /run/trainctl/agent.sock. The
# package brings the checkpoint library's own dependencies (numpy, xxhash, boto3).
rm -rf "$PACKAGE" && mkdir -p "$PACKAGE"
python3.11 -m zipfile -e "$ARCHIVE" "$PACKAGE"
# System site-packages stay visible: an AMI that ships a framework for this Python (a
# Deep Learning AMI's PyTorch) is used as is instead of being downloaded on every boot.
python3.11 -m venv --system-site-packages "$AGENT_HOME/venv"
"$AGENT_HOME/venv/bin/pip" install --quiet --upgrade pip
"$AGENT_HOME/venv/bin/pip" install --quiet "$PACKAGE"
ln -sf "$AGENT_HOME/venv/bin/trainctl" "$AGENT_BIN"

# One environment for the agent, on the host (EnvironmentFile) or in a container (--env-file).
cat > "$ENV_FILE" <<ENV
TRAINCTL_JOBS_TABLE=$TABLE
TRAINCTL_CHECKPOINT_BUCKET=$BUCKET
TRAINCTL_AGENT_LOG_GROUP=$LOG_GROUP
TRAINCTL_STAGING_DIR=$STAGING
AWS_REGION=$REGION
AWS_DEFAULT_REGION=$REGION
ENV

# Container mode when the job names an image (`image:` in the job spec, e.g. from
# `trainctl build/push`). Only the image is read here; the command stays the agent's to
# resolve from the same row.
TOKEN="$(curl -sf -X PUT http://169.254.169.254/latest/api/token \
           -H 'X-aws-ec2-metadata-token-ttl-seconds: 300')"
JOB_ID="$(curl -sf -H "X-aws-ec2-metadata-token: $TOKEN" \
           http://169.254.169.254/latest/meta-data/tags/instance/trainctl:job-id)"
KEY="$(printf '{"%s":{"S":"%s%s"}}' "$KEY_ATTR" "$KEY_PREFIX" "$JOB_ID")"
IMAGE="$(aws dynamodb get-item --region "$REGION" --table-name "$TABLE" --key "$KEY" \
           --consistent-read --projection-expression spec.image \
           --query 'Item.spec.M.image.S' --output text)"
if [ "$IMAGE" = "None" ]; then IMAGE=""; fi

# Powers the host off when the unit ends, in both modes:
# - the agent left the marker file: a container cannot power off its host, so the agent
#   in it (training/Dockerfile, its --shutdown-command) leaves it after every terminal
#   outcome of the attempt (succeeded, failed, superseded, no resume point);
# - the agent could not run the attempt at all: it exited non-zero (every outcome's exit
#   code comes with a shutdown already; this is a bad configuration, a crash, an image
#   that does not start), dumped core or was killed for memory. Nobody would use that
#   instance again, and it would bill until noticed.
# Not after an interruption notice or a stop from outside (SIGTERM: the agent exits 0;
# `systemctl kill`: "signal"): whoever stops it owns what comes next.
cat > /usr/local/bin/trainctl-after-job <<'SH'
#!/bin/sh
[ -e /run/trainctl/shutdown-requested ] && exec shutdown -h now
case "$SERVICE_RESULT" in
  exit-code|core-dump|oom-kill) exec shutdown -h now ;;
esac
exit 0
SH
chmod 0755 /usr/local/bin/trainctl-after-job
STOP_POST="ExecStopPost=/usr/local/bin/trainctl-after-job"
UNIT_PATH=""
if [ -n "$IMAGE" ]; then
  command -v docker >/dev/null || dnf install -y -q docker
  systemctl start docker
  case "$IMAGE" in
    *.dkr.ecr.*)
      aws ecr get-login-password --region "$REGION" \
        | docker login --username AWS --password-stdin "$(echo "$IMAGE" | cut -d/ -f1)" ;;
  esac
  docker pull --quiet "$IMAGE"
  # The image's entrypoint is the agent (training/Dockerfile); arguments replace its
  # default CMD, so it too runs the row's command. Host network: IMDS (hop limit 2), AWS.
  EXEC="/usr/bin/docker run --rm --name trainctl-job --network host --stop-timeout 110"
  EXEC="$EXEC --env-file $ENV_FILE -v /run/trainctl:/run/trainctl -v /var/lib/trainctl:/var/lib/trainctl"
  EXEC="$EXEC $IMAGE --staging-dir $STAGING"
else
  EXEC="$AGENT_BIN agent"
  # Host mode: the agent runs the job's command (`python train.py`) with this PATH, so
  # its `python` is the venv's, which imports trainctl; systemd's default PATH finds no
  # `python` at all (Amazon Linux has only its own python3, 3.9). In the unit, not in
  # agent.env: that file is the container's environment too. Plus PyTorch, the
  # examples' and integrations' framework, unless the AMI already has it: pinned like
  # the image, the CUDA build on a GPU instance, else the CPU one. (Every boot of a
  # replacement pays for this download: bake it into the AMI or name an image.)
  UNIT_PATH="Environment=PATH=$AGENT_HOME/venv/bin:/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin"
  if "$AGENT_HOME/venv/bin/python" -c "import torch" >/dev/null 2>&1; then
    :
  elif nvidia-smi -L >/dev/null 2>&1; then
    "$AGENT_HOME/venv/bin/pip" install --quiet --retries 10 --timeout 60 "torch==$TORCH_VERSION"
  else
    "$AGENT_HOME/venv/bin/pip" install --quiet --retries 10 --timeout 60 \
      --index-url https://download.pytorch.org/whl/cpu \
      "torch==$TORCH_VERSION"
  fi
fi

cat > "$UNIT_FILE" <<UNIT
[Unit]
Description=trainctl agent (job $JOB_ID: checkpoints, heartbeats, interruption signals)
After=network-online.target docker.service
Wants=network-online.target

[Service]
EnvironmentFile=$ENV_FILE
$UNIT_PATH
WorkingDirectory=/var/lib/trainctl
ExecStart=$EXEC
$STOP_POST
# Exit codes are outcomes the agent already recorded on the job row: never restart into
# a loop on a user bug.
Restart=no
# SIGTERM to the agent only (it checkpoints and stops its child within 100 s, then exits;
# in a container tini hands it to the agent), SIGKILL to all after the timeout, just under
# the 2-minute Spot notice.
KillMode=mixed
TimeoutStopSec=110

[Install]
WantedBy=multi-user.target
UNIT

systemctl daemon-reload
systemctl enable --now trainctl-agent.service
