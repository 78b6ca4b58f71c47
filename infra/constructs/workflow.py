"""The resume workflow: the state machine that recovers (or first launches) a job.

Its definition is `infra/workflows/resume.asl.json`, deployed as is with
`DefinitionSubstitutions`; tests render the same file and execute it in moto. The role
gets exactly the API actions that file calls (a test derives them from the ASL) plus what
Step Functions itself needs for logging and tracing. The execution timeout is the ASL's own
`TimeoutSeconds`, derived from the tuning (`WorkflowTuning.execution_timeout_seconds`).
"""

from __future__ import annotations

from aws_cdk import ArnFormat, RemovalPolicy, Stack
from aws_cdk import aws_dynamodb as dynamodb
from aws_cdk import aws_ec2 as ec2
from aws_cdk import aws_iam as iam
from aws_cdk import aws_kms as kms
from aws_cdk import aws_logs as logs
from aws_cdk import aws_s3 as s3
from aws_cdk import aws_sns as sns
from aws_cdk import aws_stepfunctions as sfn
from constructs import Construct

from infra.constructs.nag import acknowledge
from infra.workflows.render import load_resume_definition, substitutions
from trainctl_core.settings import TAG_MANAGED

# Instance-side resources RunInstances authorises besides the instance and the template.
_RUN_INSTANCES_RESOURCES = (
    "volume",
    "network-interface",
    "subnet",
    "security-group",
    "spot-instances-request",
)


class ResumeWorkflow(Construct):
    """Standard state machine running resume.asl.json, logged (ALL, KMS) and traced."""

    def __init__(
        self,
        scope: Construct,
        construct_id: str,
        *,
        jobs_table: dynamodb.ITable,
        alerts_topic: sns.ITopic,
        launch_template: ec2.LaunchTemplate,
        checkpoint_bucket: s3.IBucket,
        removal_policy: RemovalPolicy,
        log_retention: logs.RetentionDays,
    ) -> None:
        super().__init__(scope, construct_id)
        # The checkpoint bucket is part of the agreed signature but the workflow never
        # touches S3: checkpoints are referenced by the prefix recorded on the job row.
        del checkpoint_bucket
        self._removal_policy = removal_policy
        self._log_retention = log_retention
        self.log_group = self._build_log_group()
        self.state_machine = self._build_state_machine(jobs_table, alerts_topic, launch_template)
        self._grant_table(jobs_table)
        self._grant_terminate()
        self._grant_sweep()
        self._grant_publish(alerts_topic)
        self._acknowledge_findings()

    # --- pieces -------------------------------------------------------------------------

    def _build_log_group(self) -> logs.LogGroup:
        # Execution data (inputs, outputs) includes task tokens: keep it under our own key.
        key = kms.Key(
            self,
            "LogsKey",
            description="trainctl resume workflow execution logs",
            enable_key_rotation=True,
            removal_policy=self._removal_policy,
        )
        stack = Stack.of(self)
        key.add_to_resource_policy(
            iam.PolicyStatement(
                # What CloudWatch Logs calls on a log group's key, named one by one
                # (AWS's example policy writes them as Encrypt*/Decrypt*/... wildcards).
                actions=[
                    "kms:Encrypt",
                    "kms:Decrypt",
                    "kms:ReEncryptFrom",
                    "kms:ReEncryptTo",
                    "kms:GenerateDataKey",
                    "kms:GenerateDataKeyWithoutPlaintext",
                    "kms:DescribeKey",
                ],
                principals=[iam.ServicePrincipal(f"logs.{stack.region}.amazonaws.com")],
                resources=["*"],  # in a key policy, "*" means this key
                conditions={
                    "ArnLike": {
                        "kms:EncryptionContext:aws:logs:arn": stack.format_arn(
                            service="logs",
                            resource="log-group",
                            resource_name="*",
                            arn_format=ArnFormat.COLON_RESOURCE_NAME,
                        )
                    }
                },
            )
        )
        return logs.LogGroup(
            self,
            "Logs",
            encryption_key=key,
            retention=self._log_retention,
            removal_policy=self._removal_policy,
        )

    def _build_state_machine(
        self,
        jobs_table: dynamodb.ITable,
        alerts_topic: sns.ITopic,
        launch_template: ec2.LaunchTemplate,
    ) -> sfn.StateMachine:
        values = substitutions(
            jobs_table_name=jobs_table.table_name,
            alerts_topic_arn=alerts_topic.topic_arn,
            launch_template_id=launch_template.launch_template_id or "",
            # Pinned to the version deployed with this stack, so a template change and the
            # workflow that launches it roll out together.
            launch_template_version=launch_template.latest_version_number,
            partition=Stack.of(self).partition,
        )
        return sfn.StateMachine(
            self,
            "StateMachine",
            state_machine_type=sfn.StateMachineType.STANDARD,
            # from_string, not from_file: from_file uploads an S3 asset, and the template
            # should carry the definition inline so tests can compare it with the file.
            definition_body=sfn.DefinitionBody.from_string(load_resume_definition()),
            definition_substitutions=values,
            logs=sfn.LogOptions(
                destination=self.log_group, level=sfn.LogLevel.ALL, include_execution_data=True
            ),
            tracing_enabled=True,
            # No `timeout=`: CDK applies it only to definitions it builds itself (a
            # from_string body is passed through untouched), so the timeout lives in the ASL.
            removal_policy=self._removal_policy,
        )

    def _grant_table(self, jobs_table: dynamodb.ITable) -> None:
        # The table only, not its indexes: the workflow reads and writes rows by key.
        self.state_machine.add_to_role_policy(
            iam.PolicyStatement(
                sid="JobRows",
                actions=["dynamodb:GetItem", "dynamodb:UpdateItem"],
                resources=[jobs_table.table_arn],
            )
        )
        if jobs_table.encryption_key is not None:
            jobs_table.encryption_key.grant_encrypt_decrypt(self.state_machine)

    def _grant_terminate(self) -> None:
        # Launching is granted by `Instances.grant_launch` (template, instance types and tags
        # pinned there, next to the template it names); a second, looser RunInstances grant
        # here would widen it, since IAM allows the union of statements.
        stack = Stack.of(self)
        self.state_machine.add_to_role_policy(
            iam.PolicyStatement(
                sid="TerminateManagedInstances",
                actions=["ec2:TerminateInstances"],
                resources=[stack.format_arn(service="ec2", resource="instance", resource_name="*")],
                conditions={"StringEquals": {f"aws:ResourceTag/{TAG_MANAGED}": "true"}},
            )
        )

    def _grant_publish(self, alerts_topic: sns.ITopic) -> None:
        # Written out rather than `grant_publish`, whose key grant is kms:GenerateDataKey*.
        # A publisher to a KMS-encrypted topic needs kms:GenerateDataKey and kms:Decrypt on
        # the topic's key (SNS Developer Guide, "Allow a user to send messages to a topic
        # with SSE"), nothing more.
        self.state_machine.add_to_role_policy(
            iam.PolicyStatement(
                sid="PublishAlerts", actions=["sns:Publish"], resources=[alerts_topic.topic_arn]
            )
        )
        if alerts_topic.master_key is not None:
            self.state_machine.add_to_role_policy(
                iam.PolicyStatement(
                    sid="EncryptAlerts",
                    actions=["kms:GenerateDataKey", "kms:Decrypt"],
                    resources=[alerts_topic.master_key.key_arn],
                )
            )

    def _grant_sweep(self) -> None:
        # After a failed recovery the workflow looks for a replacement that was launched
        # but never recorded (tagged with the job and the next attempt) and terminates it.
        # DescribeInstances has no resource-level permissions: "*" is the only resource.
        self.state_machine.add_to_role_policy(
            iam.PolicyStatement(
                sid="FindStrayReplacements",
                actions=["ec2:DescribeInstances"],
                resources=["*"],
            )
        )

    def _acknowledge_findings(self) -> None:
        stack = Stack.of(self)

        def ec2_arn(resource: str) -> str:
            return stack.format_arn(service="ec2", resource=resource, resource_name="*")

        acknowledge(
            self.state_machine,
            "AwsSolutions-IAM5",
            "Instance ids are unknown in advance: termination is limited to instances carrying "
            "the trainctl:managed tag (aws:ResourceTag condition). ec2:DescribeInstances (a read, "
            "used to find an unrecorded replacement after a failed recovery), log delivery and X-Ray "
            "actions have no resource-level permissions.",
            f"Resource::{ec2_arn('instance')}",
            "Resource::*",
        )
