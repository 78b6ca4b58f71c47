"""Detection: EventBridge rules for the EC2 events and the two handlers behind them."""

from __future__ import annotations

from dataclasses import dataclass
from typing import cast

from aws_cdk import ArnFormat, Aws, CfnCondition, Duration, Fn, Stack, Token
from aws_cdk import aws_dynamodb as dynamodb
from aws_cdk import aws_events as events
from aws_cdk import aws_events_targets as targets
from aws_cdk import aws_iam as iam
from aws_cdk import aws_lambda as lambda_
from aws_cdk import aws_lambda_destinations as destinations
from aws_cdk import aws_logs as logs
from aws_cdk import aws_sqs as sqs
from aws_cdk import aws_ssm as ssm
from aws_cdk import aws_stepfunctions as sfn
from aws_cdk.region_info import RegionInfo
from constructs import Construct

from infra.config import CONTEXT_PREFIX, ConfigError, TrainctlConfig
from infra.constructs.nag import acknowledge
from infra.packaging import core_layer_asset, functions_asset
from trainctl_core.events import rule_patterns
from trainctl_core.observability import METRICS_NAMESPACE
from trainctl_core.settings import (
    ENV_CHECKPOINT_BUCKET,
    ENV_CHECKPOINT_DOCUMENT,
    ENV_IDEMPOTENCY_TABLE,
    ENV_JOBS_TABLE,
    ENV_RESUME_STATE_MACHINE_ARN,
    JOBS_BY_INSTANCE_INDEX,
    JOBS_BY_INTERRUPTED_INSTANCE_INDEX,
    TAG_MANAGED,
)

SERVICE_NAME = "trainctl"
# The AWS-managed Powertools layer (Python 3.11, arm64, like the handlers). Powertools
# publishes it from one account in every commercial region and from other accounts, one
# per region, in the China and GovCloud regions (Powertools docs, "Lambda Layer": "AWS
# China regions", "AWS GovCloud regions"); no other region of those partitions has it.
POWERTOOLS_LAYER_NAME = "AWSLambdaPowertoolsPythonV3-python311-arm64"
POWERTOOLS_ACCOUNT = "017000801446"
POWERTOOLS_REGIONAL_ACCOUNTS = {
    "cn-north-1": "498634801083",
    "us-gov-east-1": "165087284144",
    "us-gov-west-1": "165093116878",
}
POWERTOOLS_CONDITION_PREFIX = "PowertoolsLayerIn"  # + the region: PowertoolsLayerInCnNorth1
# Indexes of the jobs table the handlers query (trainctl_core.store.JobStore:
# find_by_instance, find_by_interrupted_instance), named one by one rather than `index/*`.
HANDLER_QUERY_INDEXES = (JOBS_BY_INSTANCE_INDEX, JOBS_BY_INTERRUPTED_INSTANCE_INDEX)
INTERRUPTION_HANDLER = "functions.interruption.handler.handler"
INSTANCE_STATE_HANDLER = "functions.instance_state.handler.handler"
# Which rule (key of trainctl_core.events.rule_patterns) feeds which handler.
RULE_HANDLERS = {
    "SpotInterruptionWarning": "interruption",
    "RebalanceRecommendation": "interruption",
    "InstanceStateChange": "instance_state",
}
# An interruption is worth acting on only within its 2-minute notice; retrying a stale
# event past that just wastes the replacement's head start, so give up and park it.
EVENT_MAX_AGE = Duration.minutes(10)
EVENT_RETRY_ATTEMPTS = 4


@dataclass(frozen=True)
class Handler:
    function: lambda_.Function
    log_group: logs.LogGroup


class Detection(Construct):
    """Rules → handlers, each with retries, a max event age and dead-letter queues."""

    def __init__(
        self,
        scope: Construct,
        construct_id: str,
        *,
        config: TrainctlConfig,
        jobs_table: dynamodb.ITable,
        idempotency_table: dynamodb.ITable,
        checkpoint_bucket_name: str,
        checkpoint_document: ssm.CfnDocument,
        state_machine: sfn.IStateMachine,
    ) -> None:
        super().__init__(scope, construct_id)
        self._config = config
        # Events EventBridge could not deliver, and invocations that failed after Lambda's
        # own retries: both are lost interruptions, so both alarm (observability).
        self.events_dlq = self._build_queue("EventsDeadLetterQueue")
        self.handler_failures = self._build_queue("HandlerFailureQueue")
        code = lambda_.Code.from_asset(functions_asset())
        layers = [
            lambda_.LayerVersion(
                self,
                "CoreLayer",
                code=lambda_.Code.from_asset(core_layer_asset()),
                compatible_runtimes=[lambda_.Runtime.PYTHON_3_11],
                compatible_architectures=[lambda_.Architecture.ARM_64],
                description="trainctl_core: job model, store, events, settings",
            ),
            lambda_.LayerVersion.from_layer_version_arn(
                self, "PowertoolsLayer", powertools_layer_arn(self, config)
            ),
        ]
        environment = {
            ENV_JOBS_TABLE: jobs_table.table_name,
            ENV_IDEMPOTENCY_TABLE: idempotency_table.table_name,
            ENV_CHECKPOINT_DOCUMENT: checkpoint_document.ref,
            ENV_RESUME_STATE_MACHINE_ARN: state_machine.state_machine_arn,
            ENV_CHECKPOINT_BUCKET: checkpoint_bucket_name,
            "POWERTOOLS_SERVICE_NAME": SERVICE_NAME,
            "POWERTOOLS_METRICS_NAMESPACE": METRICS_NAMESPACE,
            "POWERTOOLS_LOG_LEVEL": "INFO",
        }
        self.interruption = self._build_handler(
            "InterruptionHandler",
            INTERRUPTION_HANDLER,
            code,
            layers,
            environment,
            "Spot interruption warning / rebalance: checkpoint now, mark interrupted, start resume",
        )
        self.instance_state = self._build_handler(
            "InstanceStateHandler",
            INSTANCE_STATE_HANDLER,
            code,
            layers,
            environment,
            "Instance shutting-down/terminated without a warning: resume from the last checkpoint",
        )
        for handler in (self.interruption, self.instance_state):
            self._grant_tables(handler.function, jobs_table, idempotency_table)
            state_machine.grant_start_execution(handler.function)
        self._grant_send_checkpoint(self.interruption.function, checkpoint_document)
        self.rules = self._build_rules()

    # --- pieces --------------------------------------------------------------------------

    def _build_queue(self, construct_id: str) -> sqs.Queue:
        queue = sqs.Queue(
            self,
            construct_id,
            # SQS-managed SSE: free, and EventBridge can write to it without a key policy.
            encryption=sqs.QueueEncryption.SQS_MANAGED,
            enforce_ssl=True,
            retention_period=Duration.days(14),  # the maximum: time to investigate
        )
        acknowledge(queue, "AwsSolutions-SQS3", "This queue is itself a dead-letter queue.")
        return queue

    def _grant_tables(
        self, function: lambda_.Function, jobs_table: dynamodb.ITable, idempotency_table: dynamodb.ITable
    ) -> None:
        """Exactly the DynamoDB calls a handler makes, rather than grant_read_write_data's dozen.

        Jobs table: `JobStore.find_by_instance` / `find_by_interrupted_instance` (Query on
        an index, GetItem of the hit) and `JobStore.apply` (a conditional UpdateItem, GetItem
        after a lost condition); handlers never create, delete or scan rows. Idempotency
        table: what Powertools' DynamoDBPersistenceLayer calls (get/put/update/delete_item
        of one record).
        """
        function.add_to_role_policy(
            iam.PolicyStatement(
                sid="ReadAndTransitionJobRows",
                actions=["dynamodb:GetItem", "dynamodb:UpdateItem"],
                resources=[jobs_table.table_arn],
            )
        )
        function.add_to_role_policy(
            iam.PolicyStatement(
                sid="FindJobByInstance",
                actions=["dynamodb:Query"],
                resources=[f"{jobs_table.table_arn}/index/{index}" for index in HANDLER_QUERY_INDEXES],
            )
        )
        function.add_to_role_policy(
            iam.PolicyStatement(
                sid="IdempotencyRecords",
                actions=[
                    "dynamodb:GetItem",
                    "dynamodb:PutItem",
                    "dynamodb:UpdateItem",
                    "dynamodb:DeleteItem",
                ],
                resources=[idempotency_table.table_arn],
            )
        )
        # Both tables use the free AWS managed key today; a customer key would need this.
        for table in (jobs_table, idempotency_table):
            if table.encryption_key is not None:
                table.encryption_key.grant_encrypt_decrypt(function)

    def _build_handler(
        self,
        construct_id: str,
        handler: str,
        code: lambda_.Code,
        layers: list[lambda_.ILayerVersion],
        environment: dict[str, str],
        description: str,
    ) -> Handler:
        log_group = logs.LogGroup(
            self,
            f"{construct_id}Logs",
            retention=self._config.log_retention,
            removal_policy=self._config.removal,
        )
        # Own role without AWSLambdaBasicExecutionRole: logs go to this one log group only.
        role = iam.Role(self, f"{construct_id}Role", assumed_by=iam.ServicePrincipal("lambda.amazonaws.com"))
        # Lambda writes the function's logs with the function's role: without this nothing
        # (not even the Powertools metrics, which are log lines) would reach CloudWatch.
        # The group exists (created above), so no logs:CreateLogGroup; its Arn attribute
        # (`…:log-group:<name>:*`) covers the streams Lambda creates in it.
        role.add_to_policy(
            iam.PolicyStatement(
                sid="WriteOwnLogGroup",
                actions=["logs:CreateLogStream", "logs:PutLogEvents"],
                resources=[log_group.log_group_arn],
            )
        )
        function = lambda_.Function(
            self,
            construct_id,
            description=description,
            runtime=lambda_.Runtime.PYTHON_3_11,
            architecture=lambda_.Architecture.ARM_64,  # cheaper per ms; pure-Python code
            handler=handler,
            code=code,
            layers=layers,
            environment=environment,
            role=role,
            log_group=log_group,
            memory_size=512,
            timeout=Duration.seconds(30),
            tracing=lambda_.Tracing.ACTIVE,
            reserved_concurrent_executions=self._config.handler_reserved_concurrency,
            # Async invocations (EventBridge) failing after Lambda's retries are parked.
            retry_attempts=2,
            max_event_age=EVENT_MAX_AGE,
            on_failure=destinations.SqsDestination(self.handler_failures),
        )
        acknowledge(
            role,
            "AwsSolutions-IAM5",
            "X-Ray PutTraceSegments/PutTelemetryRecords have no resource-level permissions.",
            "Resource::*",
        )
        acknowledge(
            function,
            "AwsSolutions-L1",
            "Pinned to Python 3.11 to match the project, its core layer and the Powertools layer.",
        )
        return Handler(function=function, log_group=log_group)

    def _grant_send_checkpoint(self, function: lambda_.Function, document: ssm.CfnDocument) -> None:
        stack = Stack.of(self)
        instances = stack.format_arn(service="ec2", resource="instance", resource_name="*")
        # SendCommand authorises both the document and each target instance.
        function.add_to_role_policy(
            iam.PolicyStatement(
                sid="SendOurCheckpointDocument",
                actions=["ssm:SendCommand"],
                resources=[stack.format_arn(service="ssm", resource="document", resource_name=document.ref)],
            )
        )
        function.add_to_role_policy(
            iam.PolicyStatement(
                sid="ToTrainctlInstancesOnly",
                actions=["ssm:SendCommand"],
                resources=[instances],
                conditions={"StringEquals": {f"aws:ResourceTag/{TAG_MANAGED}": "true"}},
            )
        )
        acknowledge(
            function.role,  # type: ignore[arg-type]
            "AwsSolutions-IAM5",
            f"Any instance id, but only instances tagged {TAG_MANAGED}=true (aws:ResourceTag condition).",
            f"Resource::{instances}",
        )

    def _build_rules(self) -> dict[str, events.Rule]:
        rules: dict[str, events.Rule] = {}
        for rule_id, pattern in rule_patterns().items():
            handler = self.interruption if RULE_HANDLERS[rule_id] == "interruption" else self.instance_state
            rule = events.Rule(
                self,
                rule_id,
                description=f"trainctl: {rule_id} -> {handler.function.node.id}",
                event_pattern=_event_pattern(pattern),
            )
            rule.add_target(
                targets.LambdaFunction(
                    handler.function,
                    dead_letter_queue=self.events_dlq,
                    retry_attempts=EVENT_RETRY_ATTEMPTS,
                    max_event_age=EVENT_MAX_AGE,
                )
            )
            rules[rule_id] = rule
        return rules


def powertools_layer_arn(scope: Construct, config: TrainctlConfig) -> str:
    """The Powertools layer in the stack's region: the configured ARN, else the published one.

    With a known region the account is picked at synth (an unsupported region fails it with
    a ConfigError); an env-agnostic template picks it at deploy time from AWS::Partition
    and AWS::Region, so the same template deploys to China and GovCloud too.
    """
    if config.powertools_layer_arn:
        return config.powertools_layer_arn
    stack = Stack.of(scope)
    return stack.format_arn(
        service="lambda",
        account=_powertools_account(stack),
        resource="layer",
        resource_name=f"{POWERTOOLS_LAYER_NAME}:{config.powertools_layer_version}",
        arn_format=ArnFormat.COLON_RESOURCE_NAME,
    )


def _powertools_account(stack: Stack) -> str:
    if not Token.is_unresolved(stack.region):
        region = stack.region
        if region in POWERTOOLS_REGIONAL_ACCOUNTS:
            return POWERTOOLS_REGIONAL_ACCOUNTS[region]
        # A region CDK does not know yet (no partition) is a new commercial one.
        if RegionInfo.get(region).partition in ("aws", None):
            return POWERTOOLS_ACCOUNT
        raise ConfigError(
            f"Powertools publishes no Lambda layer in {region} (outside the commercial regions "
            f"only in {', '.join(sorted(POWERTOOLS_REGIONAL_ACCOUNTS))}): publish the layer in "
            f"your account and set {CONTEXT_PREFIX}powertools_layer_arn"
        )
    # Picked at deploy time by nested conditions on the region, not by a mapping:
    # CloudFormation resolves an Fn::FindInMap even in the Fn::If branch it does not take,
    # so a region missing from a mapping would fail the deploy in every commercial region.
    # A region outside the commercial partition that Powertools does not publish in gets the
    # commercial account, which has no layer in that partition: the function's creation
    # fails there (set powertools_layer_arn instead).
    account: str = POWERTOOLS_ACCOUNT
    for region, owner in sorted(POWERTOOLS_REGIONAL_ACCOUNTS.items(), reverse=True):
        condition_id = POWERTOOLS_CONDITION_PREFIX + "".join(part.title() for part in region.split("-"))
        condition = stack.node.try_find_child(condition_id) or CfnCondition(
            stack, condition_id, expression=Fn.condition_equals(Aws.REGION, region)
        )
        account = Token.as_string(Fn.condition_if(cast(CfnCondition, condition).logical_id, owner, account))
    return account


def _event_pattern(pattern: dict[str, object]) -> events.EventPattern:
    """trainctl_core's plain-dict pattern as a CDK EventPattern (same JSON once synthesized)."""
    known = {"source": "source", "detail-type": "detail_type", "detail": "detail"}
    unknown = set(pattern) - set(known)
    if unknown:
        raise ValueError(f"unsupported event pattern fields: {sorted(unknown)}")
    return events.EventPattern(**{known[k]: v for k, v in pattern.items()})  # type: ignore[arg-type]
