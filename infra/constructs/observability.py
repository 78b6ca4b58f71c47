"""Observability: the encrypted alerts topic, the agent's metric filters, alarms and the
trainctl dashboard.

Built in two steps because of the data flow: the topic exists before the workflow (which
publishes to it), the alarms after it (they watch its executions).

Every trainctl-namespace metric shown or alarmed on has an emitter in this repository:
the handlers' Powertools metrics (trainctl_core.observability, emitted by
trainctl_core.handling) or the agent's metric lines (trainctl_core.metrics), which the
metric filters built here turn into metrics. tests/infra checks both against the
synthesized template.
"""

from __future__ import annotations

from collections.abc import Sequence

from aws_cdk import ArnFormat, Duration, Stack
from aws_cdk import aws_cloudwatch as cloudwatch
from aws_cdk import aws_cloudwatch_actions as cw_actions
from aws_cdk import aws_iam as iam
from aws_cdk import aws_kms as kms
from aws_cdk import aws_lambda as lambda_
from aws_cdk import aws_logs as logs
from aws_cdk import aws_sns as sns
from aws_cdk import aws_sns_subscriptions as subscriptions
from aws_cdk import aws_sqs as sqs
from aws_cdk import aws_stepfunctions as sfn
from constructs import Construct

from infra.config import TrainctlConfig
from trainctl_core.metrics import (
    AGENT_METRICS,
    JOBS_FAILED,
    JOBS_SUCCEEDED,
    LOST_STEPS,
    METRICS_NAMESPACE,
    POOL_DIMENSION,
    REPLACEMENTS,
    TIME_TO_CHECKPOINT,
    TIME_TO_RESUME,
    AgentMetric,
    Unit,
)
from trainctl_core.observability import METRIC_INTERRUPTIONS

# Dimensions every handler metric carries: `outcome` (trainctl_core.handling.report) and
# `service` (Powertools' default dimension).
HANDLER_DIMENSIONS = ("outcome", "service")
SAVINGS_NOTE = (
    "**Savings vs on-demand** are not a metric: `trainctl savings JOB` computes them per job "
    "from each attempt's billed seconds and the Spot and on-demand prices of its pool."
)

PERIOD = Duration.minutes(5)
_AT_LEAST = cloudwatch.ComparisonOperator.GREATER_THAN_OR_EQUAL_TO_THRESHOLD
_UNITS = {
    Unit.SECONDS: cloudwatch.Unit.SECONDS,
    Unit.COUNT: cloudwatch.Unit.COUNT,
    Unit.NONE: cloudwatch.Unit.NONE,
}


def _agent_metric(name: str, statistic: str, label: str | None = None) -> cloudwatch.Metric:
    """An agent metric as its filter publishes it: no dimensions (Replacements aside)."""
    return cloudwatch.Metric(
        namespace=METRICS_NAMESPACE, metric_name=name, statistic=statistic, label=label, period=PERIOD
    )


def _search(
    schema: Sequence[str], metric_name: str, statistic: str, label: str, *, total: bool = False
) -> cloudwatch.MathExpression:
    # SEARCH with an exact schema `{namespace,dim,...}`: one series per dimension value
    # (pools, handler outcomes) without listing the values here; SUM(...) adds them up.
    search = (
        f"SEARCH('{{{','.join((METRICS_NAMESPACE, *schema))}}} MetricName=\"{metric_name}\"', "
        f"'{statistic}', {int(PERIOD.to_seconds())})"
    )
    return cloudwatch.MathExpression(
        expression=f"SUM({search})" if total else search,
        label=label,
        period=PERIOD,
        using_metrics={},
    )


class Observability(Construct):
    """Alerts topic now; `monitor(...)` adds alarms and the dashboard once all exists."""

    def __init__(self, scope: Construct, construct_id: str, *, config: TrainctlConfig) -> None:
        super().__init__(scope, construct_id)
        self._config = config
        self.alerts_key = self._build_key()
        self.alerts_topic = sns.Topic(
            self,
            "AlertsTopic",
            display_name="trainctl alerts",
            master_key=self.alerts_key,
            enforce_ssl=True,
        )
        self._allow_alarm_publishing()
        if config.alert_email:
            self.alerts_topic.add_subscription(subscriptions.EmailSubscription(config.alert_email))
        self.alarms: list[cloudwatch.Alarm] = []
        self.guard_alarm: cloudwatch.CompositeAlarm | None = None
        self.dashboard: cloudwatch.Dashboard | None = None

    def _allow_alarm_publishing(self) -> None:
        """Let this account's CloudWatch alarms publish to the topic (its resource policy).

        `enforce_ssl` gives the topic a policy of its own, which replaces SNS's default one
        (the owner account may publish). Alarms publish as the `cloudwatch.amazonaws.com`
        service principal, which no identity policy covers: without this statement every
        alarm notification fails with "no resource-based policy allows the SNS:Publish
        action" and is dropped, while the alarm itself looks healthy. The state machine
        publishes with its role (an identity-policy grant, same account), nothing else
        publishes here.
        """
        stack = Stack.of(self)
        self.alerts_topic.add_to_resource_policy(
            iam.PolicyStatement(
                sid="CloudWatchAlarmsPublish",
                principals=[iam.ServicePrincipal("cloudwatch.amazonaws.com")],
                actions=["sns:Publish"],
                resources=[self.alerts_topic.topic_arn],
                # Confused-deputy guard: only alarms of this account and region.
                conditions={
                    "StringEquals": {"aws:SourceAccount": stack.account},
                    "ArnLike": {
                        "aws:SourceArn": stack.format_arn(
                            service="cloudwatch",
                            resource="alarm",
                            resource_name="*",
                            arn_format=ArnFormat.COLON_RESOURCE_NAME,
                        )
                    },
                },
            )
        )

    def _build_key(self) -> kms.Key:
        # A customer key (the ~$1/month of the stack): CloudWatch alarms cannot publish to a
        # topic encrypted with the AWS managed aws/sns key, whose policy cannot be changed.
        key = kms.Key(
            self,
            "AlertsKey",
            description="trainctl alerts topic encryption",
            enable_key_rotation=True,
            removal_policy=self._config.removal,
        )
        key.add_to_resource_policy(
            iam.PolicyStatement(
                sid="CloudWatchAlarmsPublish",
                principals=[iam.ServicePrincipal("cloudwatch.amazonaws.com")],
                actions=["kms:Decrypt", "kms:GenerateDataKey"],
                resources=["*"],  # in a key policy, "*" means this key
                conditions={"StringEquals": {"aws:SourceAccount": Stack.of(self).account}},
            )
        )
        return key

    def monitor(
        self,
        *,
        functions: Sequence[lambda_.IFunction],
        dead_letter_queues: Sequence[sqs.IQueue],
        state_machine: sfn.IStateMachine,
        agent_logs: logs.ILogGroup,
    ) -> None:
        """Alarm on everything that means a lost interruption or a failed job; draw the dashboard."""
        self.metric_filters = {
            metric.name: self._metric_filter(agent_logs, metric) for metric in AGENT_METRICS.values()
        }
        for queue in dead_letter_queues:
            self._alarm(
                f"{queue.node.id}Depth",
                f"Messages in {queue.node.id}: EC2 events or handler invocations were lost",
                queue.metric_approximate_number_of_messages_visible(
                    period=Duration.minutes(1), statistic=cloudwatch.Stats.MAXIMUM
                ),
                threshold=0,
                operator=cloudwatch.ComparisonOperator.GREATER_THAN_THRESHOLD,
            )
        for function in functions:
            self._alarm(
                f"{function.node.id}Errors",
                f"{function.node.id} raised errors (will be retried, then parked)",
                function.metric_errors(period=PERIOD, statistic=cloudwatch.Stats.SUM),
            )
        self._alarm(
            "ResumeExecutionsFailed",
            "Resume workflow executions failed",
            state_machine.metric_failed(period=PERIOD, statistic=cloudwatch.Stats.SUM),
        )
        self._alarm(
            "ResumeExecutionsTimedOut",
            "Resume workflow executions hit the state machine timeout: a recovery stalled, and "
            "nothing marked its job FAILED",
            # The backstop for ResumeExecutionsFailed: an execution that times out never fails,
            # so without this a stuck recovery would stay silent. No alarm on aborted
            # executions: `trainctl cancel` stops a job's running executions by design.
            state_machine.metric_timed_out(period=PERIOD, statistic=cloudwatch.Stats.SUM),
        )
        self._alarm(
            "JobsFailed",
            "trainctl jobs ended FAILED on their instance (the agent's JobsFailed lines)",
            # A job the workflow ends FAILED (a guard, all capacity pools exhausted) fails its
            # execution too, so ResumeExecutionsFailed covers the jobs no agent ran to the end.
            _agent_metric(JOBS_FAILED, cloudwatch.Stats.SUM),
        )
        # One alarm for "something is wrong": the FIS stop condition watches it.
        self.guard_alarm = cloudwatch.CompositeAlarm(
            self,
            "GuardAlarm",
            alarm_description="Any trainctl alarm: stops game-day experiments",
            alarm_rule=cloudwatch.AlarmRule.any_of(*self.alarms),
        )
        self.dashboard = self._build_dashboard(functions, state_machine)

    def _metric_filter(self, agent_logs: logs.ILogGroup, metric: AgentMetric) -> logs.MetricFilter:
        """Turn the agent's `metric.name` lines (trainctl_core.metrics) into the metric."""
        return logs.MetricFilter(
            self,
            f"{metric.name}Filter",
            log_group=agent_logs,
            filter_pattern=logs.FilterPattern.literal(metric.filter_pattern),
            metric_namespace=METRICS_NAMESPACE,
            metric_name=metric.name,
            metric_value=metric.value_selector,
            unit=_UNITS[metric.unit],
            dimensions=metric.dimension_selectors or None,
        )

    def _alarm(
        self,
        construct_id: str,
        description: str,
        metric: cloudwatch.IMetric,
        *,
        threshold: float = 1,
        operator: cloudwatch.ComparisonOperator = _AT_LEAST,
    ) -> cloudwatch.Alarm:
        alarm = cloudwatch.Alarm(
            self,
            construct_id,
            alarm_description=description,
            metric=metric,
            threshold=threshold,
            comparison_operator=operator,
            evaluation_periods=1,
            # No data means nothing happened: an idle deployment stays quiet.
            treat_missing_data=cloudwatch.TreatMissingData.NOT_BREACHING,
        )
        alarm.add_alarm_action(cw_actions.SnsAction(self.alerts_topic))
        self.alarms.append(alarm)
        return alarm

    def _build_dashboard(
        self, functions: Sequence[lambda_.IFunction], state_machine: sfn.IStateMachine
    ) -> cloudwatch.Dashboard:
        dashboard = cloudwatch.Dashboard(self, "Dashboard", default_interval=Duration.days(7))
        dashboard.add_widgets(
            cloudwatch.GraphWidget(
                title="Interruptions",
                left=[_search(HANDLER_DIMENSIONS, METRIC_INTERRUPTIONS, "Sum", "interruptions", total=True)],
                width=8,
            ),
            cloudwatch.GraphWidget(
                title="Time to checkpoint (s)",
                left=[
                    _agent_metric(TIME_TO_CHECKPOINT, "p50", "p50"),
                    _agent_metric(TIME_TO_CHECKPOINT, cloudwatch.Stats.MAXIMUM, "max"),
                ],
                width=8,
            ),
            cloudwatch.GraphWidget(
                title="Time to resume (s)",
                left=[
                    _agent_metric(TIME_TO_RESUME, "p50", "p50"),
                    _agent_metric(TIME_TO_RESUME, cloudwatch.Stats.MAXIMUM, "max"),
                ],
                width=8,
            ),
        )
        dashboard.add_widgets(
            cloudwatch.GraphWidget(
                title="Lost steps",
                left=[_agent_metric(LOST_STEPS, cloudwatch.Stats.SUM, "lost steps")],
                width=8,
            ),
            cloudwatch.GraphWidget(
                title="Replacements by pool",
                left=[_search((POOL_DIMENSION,), REPLACEMENTS, "Sum", "")],
                stacked=True,
                width=8,
            ),
            cloudwatch.GraphWidget(
                title="Jobs ended",
                left=[
                    _agent_metric(JOBS_SUCCEEDED, cloudwatch.Stats.SUM, "succeeded"),
                    _agent_metric(JOBS_FAILED, cloudwatch.Stats.SUM, "failed"),
                ],
                width=5,
            ),
            cloudwatch.TextWidget(markdown=SAVINGS_NOTE, width=3, height=6),
        )
        dashboard.add_widgets(
            cloudwatch.GraphWidget(
                title="Handlers: invocations / errors",
                left=[f.metric_invocations(period=PERIOD) for f in functions],
                right=[f.metric_errors(period=PERIOD) for f in functions],
                width=12,
            ),
            cloudwatch.GraphWidget(
                title="Resume workflow executions",
                left=[
                    state_machine.metric_started(period=PERIOD),
                    state_machine.metric_succeeded(period=PERIOD),
                    state_machine.metric_failed(period=PERIOD),
                    state_machine.metric_timed_out(period=PERIOD),
                ],
                width=12,
            ),
            cloudwatch.AlarmStatusWidget(title="Alarms", alarms=list(self.alarms), width=24),
        )
        return dashboard
