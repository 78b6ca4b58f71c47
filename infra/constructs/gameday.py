"""Game day: an FIS experiment that sends a real Spot interruption to one trainctl instance."""

from __future__ import annotations

from aws_cdk import Stack
from aws_cdk import aws_cloudwatch as cloudwatch
from aws_cdk import aws_fis as fis
from aws_cdk import aws_iam as iam
from constructs import Construct

from infra.constructs.nag import acknowledge
from trainctl_core.settings import SPOT_NOTICE_SECONDS, TAG_MANAGED

TARGET_NAME = "TrainctlSpotInstances"
ACTION_NAME = "InterruptOne"


class GameDay(Construct):
    """`aws fis start-experiment --experiment-template-id <output>` to rehearse for real."""

    def __init__(self, scope: Construct, construct_id: str, *, stop_alarm: cloudwatch.IAlarm) -> None:
        super().__init__(scope, construct_id)
        stack = Stack.of(self)
        instances = stack.format_arn(service="ec2", resource="instance", resource_name="*")
        role = iam.Role(
            self,
            "ExperimentRole",
            assumed_by=iam.ServicePrincipal(
                "fis.amazonaws.com", conditions={"StringEquals": {"aws:SourceAccount": stack.account}}
            ),
            description="FIS game day: interrupt trainctl-managed Spot instances only",
        )
        role.add_to_policy(
            iam.PolicyStatement(
                sid="InterruptTrainctlInstancesOnly",
                actions=["ec2:SendSpotInstanceInterruptions"],
                resources=[instances],
                conditions={"StringEquals": {f"aws:ResourceTag/{TAG_MANAGED}": "true"}},
            )
        )
        role.add_to_policy(
            iam.PolicyStatement(
                sid="ResolveTargets",
                actions=["ec2:DescribeInstances"],
                # DescribeInstances has no resource-level permissions.
                resources=["*"],
            )
        )
        acknowledge(
            role,
            "AwsSolutions-IAM5",
            "ec2:DescribeInstances has no resource-level permissions (FIS resolves targets with it).",
            "Resource::*",
        )
        acknowledge(
            role,
            "AwsSolutions-IAM5",
            f"Any instance id, but only instances tagged {TAG_MANAGED}=true (aws:ResourceTag condition).",
            f"Resource::{instances}",
        )
        self.role = role
        self.template = fis.CfnExperimentTemplate(
            self,
            "SpotInterruption",
            description="trainctl game day: Spot interruption warning to one running trainctl instance",
            role_arn=role.role_arn,
            targets={
                TARGET_NAME: fis.CfnExperimentTemplate.ExperimentTemplateTargetProperty(
                    resource_type="aws:ec2:spot-instance",
                    resource_tags={TAG_MANAGED: "true"},
                    filters=[
                        fis.CfnExperimentTemplate.ExperimentTemplateTargetFilterProperty(
                            path="State.Name", values=["running"]
                        )
                    ],
                    selection_mode="COUNT(1)",
                )
            },
            actions={
                ACTION_NAME: fis.CfnExperimentTemplate.ExperimentTemplateActionProperty(
                    action_id="aws:ec2:send-spot-instance-interruptions",
                    description="The real 2-minute warning, as EC2 would send it",
                    parameters={"durationBeforeInterruption": f"PT{SPOT_NOTICE_SECONDS // 60}M"},
                    targets={"SpotInstances": TARGET_NAME},
                )
            },
            stop_conditions=[
                fis.CfnExperimentTemplate.ExperimentTemplateStopConditionProperty(
                    source="aws:cloudwatch:alarm", value=stop_alarm.alarm_arn
                )
            ],
            tags={"Name": "trainctl-spot-interruption"},
        )
