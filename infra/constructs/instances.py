"""Instances: network, instance role + profile, launch template, checkpoint SSM document,
and the agent's CloudWatch Logs group.

The instance role is what a training instance can do with its credentials: reach SSM,
read/write checkpoints, update job rows, answer the checkpoint handshake, pull images.
`grant_launch` is the other side: what the resume workflow needs to start such instances.
"""

from __future__ import annotations

from aws_cdk import Annotations, ArnFormat, Fn, Stack
from aws_cdk import aws_dynamodb as dynamodb
from aws_cdk import aws_ec2 as ec2
from aws_cdk import aws_ecr as ecr
from aws_cdk import aws_iam as iam
from aws_cdk import aws_logs as logs
from aws_cdk import aws_s3 as s3
from aws_cdk import aws_s3_assets as s3_assets
from aws_cdk import aws_ssm as ssm
from aws_cdk import aws_stepfunctions as sfn
from constructs import Construct

from infra.config import TrainctlConfig
from infra.constructs.nag import acknowledge
from infra.packaging import REPO_ROOT, agent_asset
from trainctl_core.checkpoints import CKPT_DIR
from trainctl_core.jobs import JOB_ID_PATTERN
from trainctl_core.settings import (
    CHECKPOINT_MODE_STOP,
    CHECKPOINT_MODES,
    JOBS_PARTITION_KEY,
    SSM_PARAM_DEADLINE,
    SSM_PARAM_JOB_ID,
    SSM_PARAM_MODE,
    TAG_JOB_ID,
    TAG_MANAGED,
)
from trainctl_core.store import job_key

# Job rows only (`JOB#<id>`, see trainctl_core.store); other items are not the agent's.
JOB_ROW_KEY_PATTERN = "JOB#*"
# Checkpoint layout `<job>/ckpt/<step>/…` (trainctl_core.checkpoints); nothing else.
CHECKPOINT_KEY_PATTERN = f"*/{CKPT_DIR}/*"
AGENT_BIN = "/usr/local/bin/trainctl"
AGENT_HOME = "/opt/trainctl"
AGENT_ARCHIVE = "/tmp/trainctl-agent.zip"
# The one bootstrap script (Fn::Sub placeholders for the values below); see its README.
BOOTSTRAP_SCRIPT = REPO_ROOT / "training" / "bootstrap" / "user-data.sh"
# Resources a RunInstances call creates (ids unknown in advance) besides the instance.
_RUN_INSTANCES_CREATED = (
    "volume",
    "network-interface",
    "spot-instances-request",
)
ROOT_DEVICE = "/dev/xvda"  # Amazon Linux 2023 (and the AL2023 Deep Learning AMIs)


def bootstrap_script() -> str:
    """The instance bootstrap as deployed: user-data.sh without its shebang (UserData adds one)."""
    lines = BOOTSTRAP_SCRIPT.read_text().splitlines()
    if lines and lines[0].startswith("#!"):
        lines = lines[1:]
    return "\n".join(lines)


def boot_failure_trap() -> str:
    """user-data.sh's ERR trap (power off on a failed step), to be set before the agent
    download that precedes the script too: one line, kept in the script."""
    traps = [
        line for line in bootstrap_script().splitlines() if line.startswith("trap ") and line.endswith(" ERR")
    ]
    if len(traps) != 1:
        raise ValueError(f"{BOOTSTRAP_SCRIPT} must set exactly one ERR trap (found {len(traps)})")
    return traps[0]


def agent_log_group_name(stack_name: str) -> str:
    """`/trainctl/<stack>/agent`: the name `trainctl logs` falls back to without the output."""
    return f"/trainctl/{stack_name}/agent"


class Instances(Construct):
    """What every trainctl training instance is launched with."""

    def __init__(
        self,
        scope: Construct,
        construct_id: str,
        *,
        config: TrainctlConfig,
        jobs_table: dynamodb.ITable,
        checkpoint_bucket: s3.IBucket,
        repository: ecr.IRepository,
    ) -> None:
        super().__init__(scope, construct_id)
        self._config = config
        self.vpc, self.subnet_ids = self._build_network()
        self.security_group = self._build_security_group()
        self.agent_logs = self._build_agent_logs()
        self.role = self._build_role(jobs_table, checkpoint_bucket, repository)
        self._grant_log_shipping()
        self.instance_profile = iam.InstanceProfile(self, "InstanceProfile", role=self.role)
        self.checkpoint_document = self._build_checkpoint_document()
        self.launch_template = self._build_launch_template(jobs_table, checkpoint_bucket)

    # --- network -------------------------------------------------------------------------

    def _build_network(self) -> tuple[ec2.IVpc, list[str]]:
        cfg = self._config
        if cfg.vpc_id:
            # Ids from context, never Vpc.from_lookup: synth stays credential-free.
            # Only the VPC id is used (security group); subnets go to the workflow by id.
            vpc = ec2.Vpc.from_vpc_attributes(self, "Vpc", vpc_id=cfg.vpc_id, availability_zones=Fn.get_azs())
            Annotations.of(self).acknowledge_warning(
                "@aws-cdk/aws-ec2:vpcAttributeIsListTokenavailabilityZones",
                "Nothing selects subnets from the imported VPC; subnet ids come from context.",
            )
            return vpc, list(cfg.subnet_ids)
        # Minimal and free at idle: public subnets only (no NAT gateway, no interface
        # endpoints); instances accept no inbound traffic and reach S3/DynamoDB privately.
        new_vpc = ec2.Vpc(
            self,
            "Vpc",
            ip_addresses=ec2.IpAddresses.cidr(cfg.vpc_cidr),
            max_azs=cfg.max_azs,
            nat_gateways=0,
            subnet_configuration=[
                ec2.SubnetConfiguration(name="training", subnet_type=ec2.SubnetType.PUBLIC, cidr_mask=20)
            ],
            gateway_endpoints={
                "S3": ec2.GatewayVpcEndpointOptions(service=ec2.GatewayVpcEndpointAwsService.S3),
                "DynamoDB": ec2.GatewayVpcEndpointOptions(service=ec2.GatewayVpcEndpointAwsService.DYNAMODB),
            },
        )
        flow_logs = logs.LogGroup(self, "FlowLogs", retention=cfg.log_retention, removal_policy=cfg.removal)
        new_vpc.add_flow_log("FlowLog", destination=ec2.FlowLogDestination.to_cloud_watch_logs(flow_logs))
        return new_vpc, [s.subnet_id for s in new_vpc.public_subnets]

    def _build_security_group(self) -> ec2.SecurityGroup:
        # No ingress at all: the agent is reached through SSM, never over the network.
        return ec2.SecurityGroup(
            self,
            "InstanceSecurityGroup",
            vpc=self.vpc,
            description="trainctl training instances: no inbound; outbound for AWS APIs and packages",
            allow_all_outbound=True,
        )

    # --- agent logs ----------------------------------------------------------------------

    def _build_agent_logs(self) -> logs.LogGroup:
        # Named (not generated) so `trainctl logs` finds it even without the stack output.
        # Default encryption at rest (CloudWatch Logs' own keys), like the handlers' logs: a
        # customer key would cost a key per stack and make every reader need kms:Decrypt, and
        # cdk-nag's AwsSolutions pack does not ask for one. One stream per
        # `<job>/<attempt>/<instance>`, created by the agent.
        return logs.LogGroup(
            self,
            "AgentLogs",
            log_group_name=agent_log_group_name(Stack.of(self).stack_name),
            retention=self._config.log_retention,
            removal_policy=self._config.removal,
        )

    def _grant_log_shipping(self) -> None:
        """Let the agent create its streams in, and put events to, the agent log group only."""
        group_name = self.agent_logs.log_group_name
        streams = Stack.of(self).format_arn(
            service="logs",
            resource="log-group",
            resource_name=f"{group_name}:log-stream:*",
            arn_format=ArnFormat.COLON_RESOURCE_NAME,
        )
        # CreateLogStream authorises on the log group (`…:log-group:<name>:*`, the ARN the
        # group's Arn attribute returns), PutLogEvents on the stream.
        self.role.add_to_policy(
            iam.PolicyStatement(
                sid="CreateAgentLogStreams",
                actions=["logs:CreateLogStream"],
                resources=[self.agent_logs.log_group_arn],
            )
        )
        self.role.add_to_policy(
            iam.PolicyStatement(sid="ShipAgentLogs", actions=["logs:PutLogEvents"], resources=[streams])
        )
        acknowledge(
            self.role,
            "AwsSolutions-IAM5",
            "Stream names are <job>/<attempt>/<instance>, unknown until a job runs (one role "
            "serves every job); the wildcard is the stream name inside the agent log group only.",
            f"Resource::{streams}",
        )

    # --- instance role -------------------------------------------------------------------

    def _build_role(
        self, jobs_table: dynamodb.ITable, checkpoint_bucket: s3.IBucket, repository: ecr.IRepository
    ) -> iam.Role:
        ssm_core = iam.ManagedPolicy.from_aws_managed_policy_name("AmazonSSMManagedInstanceCore")
        role = iam.Role(
            self,
            "InstanceRole",
            assumed_by=iam.ServicePrincipal("ec2.amazonaws.com"),
            description="trainctl training instance: SSM agent, checkpoints, job rows, handshake",
            managed_policies=[ssm_core],
        )
        acknowledge(
            role,
            "AwsSolutions-IAM4",
            "AmazonSSMManagedInstanceCore is the AWS-maintained minimum for the SSM agent, which "
            "delivers the checkpoint-now command; a hand-copied policy would drift.",
            f"Policy::{ssm_core.managed_policy_arn}",
        )
        # IAM cannot see an instance's tags from its role session, so a shared role cannot
        # tell one job's prefix from another's: it is limited to the checkpoint key space,
        # and the agent's fencing (instance id + attempt on every write) does the rest.
        checkpoint_objects = checkpoint_bucket.arn_for_objects(CHECKPOINT_KEY_PATTERN)
        role.add_to_policy(
            iam.PolicyStatement(
                sid="CheckpointObjects",
                actions=["s3:GetObject", "s3:PutObject", "s3:DeleteObject", "s3:AbortMultipartUpload"],
                resources=[checkpoint_objects],
            )
        )
        role.add_to_policy(
            iam.PolicyStatement(
                sid="ListCheckpoints",
                actions=["s3:ListBucket"],
                resources=[checkpoint_bucket.bucket_arn],
                conditions={"StringLike": {"s3:prefix": [CHECKPOINT_KEY_PATTERN]}},
            )
        )
        role.add_to_policy(
            iam.PolicyStatement(
                sid="UpdateJobRowsOnly",
                actions=["dynamodb:GetItem", "dynamodb:UpdateItem"],
                resources=[jobs_table.table_arn],
                conditions={"ForAllValues:StringLike": {"dynamodb:LeadingKeys": [JOB_ROW_KEY_PATTERN]}},
            )
        )
        repository.grant_pull(role)
        role.add_to_policy(
            iam.PolicyStatement(
                sid="SpotPricesForBudget",
                # The agent accrues each attempt's cost against the job's budget guard from
                # the Spot price history of its pool. A read of public prices, and the API
                # has no resource-level permissions: "*" is the only resource it accepts.
                actions=["ec2:DescribeSpotPriceHistory"],
                resources=["*"],
            )
        )
        acknowledge(
            role,
            "AwsSolutions-IAM5",
            "Checkpoints live under <job>/ckpt/<step>/; the wildcards are the job id and the "
            "file name, which the role cannot know in advance (one role serves every job).",
            f"Resource::{checkpoint_objects}",
        )
        acknowledge(
            role,
            "AwsSolutions-IAM5",
            "ecr:GetAuthorizationToken and ec2:DescribeSpotPriceHistory (a read of public Spot "
            "prices) have no resource-level permissions; image pulls are limited to the repository.",
            "Resource::*",
        )
        return role

    def grant_task_response(self, state_machine: sfn.IStateMachine) -> iam.Policy:
        """Let instances answer the checkpoint handshake (SendTaskSuccess/Failure/Heartbeat).

        A separate policy, not the role's default one: the state machine depends on the
        launch template (hence on the role), so a grant on the role itself would close a
        dependency cycle.
        """
        return iam.Policy(
            self,
            "TaskResponsePolicy",
            roles=[self.role],
            statements=[
                iam.PolicyStatement(
                    sid="CheckpointHandshake",
                    actions=["states:SendTaskSuccess", "states:SendTaskFailure", "states:SendTaskHeartbeat"],
                    resources=[state_machine.state_machine_arn],
                )
            ],
        )

    # --- SSM document --------------------------------------------------------------------

    def _build_checkpoint_document(self) -> ssm.CfnDocument:
        job_id_pattern = JOB_ID_PATTERN.pattern
        return ssm.CfnDocument(
            self,
            "CheckpointDocument",
            document_type="Command",
            document_format="JSON",
            update_method="NewVersion",
            content={
                "schemaVersion": "2.2",
                "description": "Ask the trainctl agent to checkpoint now, before the given deadline.",
                "parameters": {
                    SSM_PARAM_JOB_ID: {
                        "type": "String",
                        "description": "The job whose training process should checkpoint.",
                        # Validated by SSM before anything reaches the shell.
                        "allowedPattern": job_id_pattern,
                    },
                    SSM_PARAM_DEADLINE: {
                        "type": "String",
                        "description": "ISO 8601 UTC time by which the checkpoint must be durable.",
                        "allowedPattern": r"^\d{4}-\d{2}-\d{2}T\d{2}:\d{2}:\d{2}(\.\d+)?(Z|[+-]\d{2}:\d{2})$",
                    },
                    SSM_PARAM_MODE: {
                        "type": "String",
                        "description": "stop: training stops after the checkpoint (interruption); "
                        "continue: it goes on (rebalance recommendation).",
                        "allowedValues": list(CHECKPOINT_MODES),
                        # A sender that leaves it out (an older handler) gets the old behaviour.
                        "default": CHECKPOINT_MODE_STOP,
                    },
                },
                "mainSteps": [
                    {
                        "action": "aws:runShellScript",
                        "name": "checkpointNow",
                        "inputs": {
                            "timeoutSeconds": "120",
                            "runCommand": [
                                f"{AGENT_BIN} checkpoint-now --job-id {{{{{SSM_PARAM_JOB_ID}}}}} "
                                f"--deadline {{{{{SSM_PARAM_DEADLINE}}}}} --mode {{{{{SSM_PARAM_MODE}}}}}"
                            ],
                        },
                    }
                ],
            },
        )

    # --- launch template -----------------------------------------------------------------

    def _build_launch_template(
        self, jobs_table: dynamodb.ITable, checkpoint_bucket: s3.IBucket
    ) -> ec2.LaunchTemplate:
        cfg = self._config
        agent = s3_assets.Asset(self, "AgentSource", path=agent_asset())
        # Exactly this object, rather than Asset.grant_read's bucket-wide wildcards.
        self.role.add_to_policy(
            iam.PolicyStatement(
                sid="ReadAgentSource",
                actions=["s3:GetObject"],
                resources=[agent.bucket.arn_for_objects(agent.s3_object_key)],
            )
        )
        template = ec2.LaunchTemplate(
            self,
            "LaunchTemplate",
            machine_image=ec2.MachineImage.from_ssm_parameter(
                cfg.ami_ssm_parameter, os=ec2.OperatingSystemType.LINUX
            ),
            instance_profile=self.instance_profile,
            security_group=self.security_group,
            require_imdsv2=True,
            # 2 hops so a training container (bridge network) still reaches IMDS.
            http_put_response_hop_limit=2,
            # The agent reads its job id / attempt from the instance tags via IMDS.
            instance_metadata_tags=True,
            block_devices=[
                ec2.BlockDevice(
                    device_name=ROOT_DEVICE,
                    volume=ec2.BlockDeviceVolume.ebs(
                        cfg.root_volume_gib,
                        encrypted=True,
                        volume_type=ec2.EbsDeviceVolumeType.GP3,
                        delete_on_termination=True,
                    ),
                )
            ],
            user_data=self._user_data(agent, jobs_table, checkpoint_bucket),
        )
        return template

    def _user_data(
        self, agent: s3_assets.Asset, jobs_table: dynamodb.ITable, checkpoint_bucket: s3.IBucket
    ) -> ec2.UserData:
        """Download the agent source asset, then run training/bootstrap/user-data.sh.

        The script is the one bootstrap (installs the agent, writes the systemd unit, starts
        `trainctl agent`, which takes its command from the job row); its placeholders are
        filled here with Fn::Sub, so the values stay CloudFormation references.
        """
        user_data = ec2.UserData.for_linux()
        # Before the download, so a failed `aws s3 cp` stops the boot instead of the unzip,
        # and powers the instance off like any other failed bootstrap step.
        user_data.add_commands("set -euo pipefail", boot_failure_trap())
        archive = user_data.add_s3_download_command(
            bucket=agent.bucket, bucket_key=agent.s3_object_key, local_file=AGENT_ARCHIVE
        )
        variables = {
            "JobsTableName": jobs_table.table_name,
            "CheckpointBucketName": checkpoint_bucket.bucket_name,
            "AgentLogGroupName": self.agent_logs.log_group_name,
            "AgentArchive": archive,
            "AgentHome": AGENT_HOME,
            "AgentBin": AGENT_BIN,
            "JobsPartitionKey": JOBS_PARTITION_KEY,
            "JobKeyPrefix": job_key("")[JOBS_PARTITION_KEY]["S"],
        }
        user_data.add_commands(Fn.sub(bootstrap_script(), variables))
        return user_data

    # --- launching (for the resume workflow) ---------------------------------------------

    def grant_launch(self, role: iam.IRole) -> None:
        """Allow `role` (the resume workflow's) to start instances from our template only.

        RunInstances authorises every resource it touches; the instance itself must come
        from our template, be one of the allowed types and carry the trainctl tags, and
        the other resources may only be used through the same template.
        """
        stack = Stack.of(self)
        template_arn = stack.format_arn(
            service="ec2", resource="launch-template", resource_name=self.launch_template.launch_template_id
        )

        def ec2_arn(resource: str) -> str:
            return stack.format_arn(service="ec2", resource=resource, resource_name="*")

        from_our_template = {"ArnEquals": {"ec2:LaunchTemplate": template_arn}}
        # The AMI and the security group are named by the template, and the workflow never
        # overrides them: ec2:IsLaunchTemplateResource refuses a call that does (another
        # AMI, another group). Not on the subnet, which the workflow chooses per capacity
        # pool (SubnetId in the call), nor on what the launch creates (volume, interface).
        template_resources = {**from_our_template, "Bool": {"ec2:IsLaunchTemplateResource": "true"}}
        # AMIs are owned by another account (Amazon's DLAMI), hence no account in the ARN.
        any_image = stack.format_arn(service="ec2", resource="image", resource_name="*", account="")
        statements = [
            iam.PolicyStatement(
                sid="RunTaggedInstancesFromTemplate",
                actions=["ec2:RunInstances"],
                resources=[ec2_arn("instance")],
                conditions={
                    **from_our_template,
                    "StringEquals": {
                        "ec2:InstanceType": list(self._config.allowed_instance_types),
                        f"aws:RequestTag/{TAG_MANAGED}": "true",
                    },
                    "Null": {f"aws:RequestTag/{TAG_JOB_ID}": "false"},
                },
            ),
            iam.PolicyStatement(
                sid="RunInstancesResourcesViaTemplate",
                actions=["ec2:RunInstances"],
                resources=[template_arn, *(ec2_arn(r) for r in _RUN_INSTANCES_CREATED)],
                conditions=from_our_template,
            ),
            iam.PolicyStatement(
                sid="IntoOurSubnetsOnly",
                actions=["ec2:RunInstances"],
                resources=[
                    stack.format_arn(service="ec2", resource="subnet", resource_name=subnet)
                    for subnet in self.subnet_ids
                ],
                conditions=from_our_template,
            ),
            iam.PolicyStatement(
                sid="TemplateImageAndSecurityGroup",
                actions=["ec2:RunInstances"],
                resources=[
                    any_image,
                    stack.format_arn(
                        service="ec2",
                        resource="security-group",
                        resource_name=self.security_group.security_group_id,
                    ),
                ],
                conditions=template_resources,
            ),
            iam.PolicyStatement(
                sid="TagOnLaunchOnly",
                actions=["ec2:CreateTags"],
                resources=[
                    ec2_arn(r) for r in ("instance", "volume", "network-interface", "spot-instances-request")
                ],
                conditions={"StringEquals": {"ec2:CreateAction": "RunInstances"}},
            ),
            iam.PolicyStatement(
                sid="PassInstanceRoleToEc2",
                actions=["iam:PassRole"],
                resources=[self.role.role_arn],
                conditions={"StringEquals": {"iam:PassedToService": "ec2.amazonaws.com"}},
            ),
        ]
        for statement in statements:
            role.add_to_principal_policy(statement)
        acknowledge(
            role,
            "AwsSolutions-IAM5",
            "RunInstances creates resources whose ids are unknown in advance; every statement "
            "is pinned to our launch template (ec2:LaunchTemplate) or to the RunInstances "
            "call itself (ec2:CreateAction), and instances must be allowed types with trainctl "
            "tags. The AMI id comes from the template (ec2:IsLaunchTemplateResource).",
            *(f"Resource::{ec2_arn(r)}" for r in (*_RUN_INSTANCES_CREATED, "instance")),
            f"Resource::{any_image}",
        )
