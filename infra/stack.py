"""The trainctl stack: composes one construct per concern, nothing else."""

from __future__ import annotations

from typing import Any

from aws_cdk import CfnOutput, Fn, Stack, Tags
from constructs import Construct

from infra.config import TrainctlConfig
from infra.constructs.detection import Detection
from infra.constructs.gameday import GameDay
from infra.constructs.instances import Instances
from infra.constructs.observability import Observability
from infra.constructs.storage import Storage
from infra.constructs.workflow import ResumeWorkflow

# Output names the trainctl CLI reads (describe-stacks); stable, never exported.
OUTPUT_JOBS_TABLE = "JobsTableName"
OUTPUT_CHECKPOINT_BUCKET = "CheckpointBucketName"
OUTPUT_STATE_MACHINE = "ResumeStateMachineArn"
OUTPUT_ALERTS_TOPIC = "AlertsTopicArn"
OUTPUT_REPOSITORY_URI = "TrainingImageRepositoryUri"
OUTPUT_LAUNCH_TEMPLATE = "LaunchTemplateId"
OUTPUT_CHECKPOINT_DOCUMENT = "CheckpointDocumentName"
OUTPUT_FIS_TEMPLATE = "GameDayExperimentTemplateId"
OUTPUT_SUBNETS = "SubnetIds"
OUTPUT_SECURITY_GROUP = "InstanceSecurityGroupId"
OUTPUT_INSTANCE_TYPES = "AllowedInstanceTypes"
OUTPUT_AGENT_LOG_GROUP = "AgentLogGroupName"


class TrainctlStack(Stack):
    def __init__(self, scope: Construct, construct_id: str, *, config: TrainctlConfig, **kwargs: Any) -> None:
        super().__init__(scope, construct_id, **kwargs)
        Tags.of(self).add("project", "trainctl")

        storage = Storage(self, "Storage", config=config)
        instances = Instances(
            self,
            "Instances",
            config=config,
            jobs_table=storage.jobs_table,
            checkpoint_bucket=storage.checkpoint_bucket,
            repository=storage.repository,
        )
        observability = Observability(self, "Observability", config=config)
        workflow = ResumeWorkflow(
            self,
            "Resume",
            jobs_table=storage.jobs_table,
            alerts_topic=observability.alerts_topic,
            launch_template=instances.launch_template,
            checkpoint_bucket=storage.checkpoint_bucket,
            removal_policy=config.removal,
            log_retention=config.log_retention,
        )
        state_machine = workflow.state_machine
        instances.grant_task_response(state_machine)
        instances.grant_launch(state_machine.role)
        detection = Detection(
            self,
            "Detection",
            config=config,
            jobs_table=storage.jobs_table,
            idempotency_table=storage.idempotency_table,
            checkpoint_bucket_name=storage.checkpoint_bucket.bucket_name,
            checkpoint_document=instances.checkpoint_document,
            state_machine=state_machine,
        )
        observability.monitor(
            functions=[detection.interruption.function, detection.instance_state.function],
            dead_letter_queues=[detection.events_dlq, detection.handler_failures],
            state_machine=state_machine,
            agent_logs=instances.agent_logs,
        )
        assert observability.guard_alarm is not None  # set by monitor()
        gameday = GameDay(self, "GameDay", stop_alarm=observability.guard_alarm) if config.gameday else None

        outputs = {
            OUTPUT_JOBS_TABLE: storage.jobs_table.table_name,
            OUTPUT_CHECKPOINT_BUCKET: storage.checkpoint_bucket.bucket_name,
            OUTPUT_STATE_MACHINE: state_machine.state_machine_arn,
            OUTPUT_ALERTS_TOPIC: observability.alerts_topic.topic_arn,
            OUTPUT_REPOSITORY_URI: storage.repository.repository_uri,
            OUTPUT_LAUNCH_TEMPLATE: instances.launch_template.launch_template_id or "",
            OUTPUT_CHECKPOINT_DOCUMENT: instances.checkpoint_document.ref,
            OUTPUT_SUBNETS: Fn.join(",", instances.subnet_ids),
            OUTPUT_SECURITY_GROUP: instances.security_group.security_group_id,
            OUTPUT_INSTANCE_TYPES: ",".join(config.allowed_instance_types),
            OUTPUT_AGENT_LOG_GROUP: instances.agent_logs.log_group_name,
        }
        if gameday is not None:
            outputs[OUTPUT_FIS_TEMPLATE] = gameday.template.ref
        for name, value in outputs.items():
            # Explicit ids keep the output keys stable whatever the construct tree becomes.
            CfnOutput(self, name, value=value).override_logical_id(name)
