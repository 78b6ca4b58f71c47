"""Observability: the encrypted alerts topic, alarms and the trainctl dashboard.

Built in two steps because of the data flow: the topic exists before the workflow (which
publishes to it), the alarms after it (they watch its executions).
"""

from __future__ import annotations

from collections.abc import Sequence

from aws_cdk import Duration, Stack
from aws_cdk import aws_cloudwatch as cloudwatch
from aws_cdk import aws_cloudwatch_actions as cw_actions
from aws_cdk import aws_iam as iam
from aws_cdk import aws_kms as kms
from aws_cdk import aws_lambda as lambda_
from aws_cdk import aws_sns as sns
from aws_cdk import aws_sns_subscriptions as subscriptions
from aws_cdk import aws_sqs as sqs
from aws_cdk import aws_stepfunctions as sfn
from constructs import Construct

from infra.config import TrainctlConfig
from trainctl_core.observability import METRIC_INTERRUPTIONS, METRICS_NAMESPACE

# Metrics the dashboard shows that trainctl_core.observability does not define yet; the
# emitters (workflow, agent) must use these names in namespace METRICS_NAMESPACE.
METRIC_TIME_TO_CHECKPOINT = "TimeToCheckpoint"  # seconds, notice -> final checkpoint durable
METRIC_TIME_TO_RESUME = "TimeToResume"  # seconds, notice -> replacement training again
METRIC_LOST_STEPS = "LostSteps"  # steps redone after a resume
METRIC_REPLACEMENTS = "Replacements"  # count, dimension `Pool` (instance type/AZ)
METRIC_SAVINGS = "SavingsUSD"  # on-demand price minus Spot price, per job-hour
METRIC_JOBS_FAILED = "JobsFailed"  # count, dimension service=trainctl (alarmed)
SERVICE_DIMENSION = {"service": "trainctl"}  # Powertools adds `service` to every metric

PERIOD = Duration.minutes(5)
_AT_LEAST = cloudwatch.ComparisonOperator.GREATER_THAN_OR_EQUAL_TO_THRESHOLD


def _search(metric_name: str, statistic: str, label: str) -> cloudwatch.MathExpression:
    # SEARCH matches the metric whatever its dimensions (service, Pool, …) so the dashboard
    # needs no update when an emitter adds one.
    return cloudwatch.MathExpression(
        expression=(
            f'SEARCH(\'Namespace="{METRICS_NAMESPACE}" MetricName="{metric_name}"\', '
            f"'{statistic}', {int(PERIOD.to_seconds())})"
        ),
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
        if config.alert_email:
            self.alerts_topic.add_subscription(subscriptions.EmailSubscription(config.alert_email))
        self.alarms: list[cloudwatch.Alarm] = []
        self.guard_alarm: cloudwatch.CompositeAlarm | None = None
        self.dashboard: cloudwatch.Dashboard | None = None

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
    ) -> None:
        """Alarm on everything that means a lost interruption or a failed job; draw the dashboard."""
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
            "JobsFailed",
            "trainctl jobs ended FAILED (guard hit or all capacity pools exhausted)",
            cloudwatch.Metric(
                namespace=METRICS_NAMESPACE,
                metric_name=METRIC_JOBS_FAILED,
                dimensions_map=SERVICE_DIMENSION,
                period=PERIOD,
                statistic=cloudwatch.Stats.SUM,
            ),
        )
        # One alarm for "something is wrong": the FIS stop condition watches it.
        self.guard_alarm = cloudwatch.CompositeAlarm(
            self,
            "GuardAlarm",
            alarm_description="Any trainctl alarm: stops game-day experiments",
            alarm_rule=cloudwatch.AlarmRule.any_of(*self.alarms),
        )
        self.dashboard = self._build_dashboard(functions, state_machine)

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
                left=[_search(METRIC_INTERRUPTIONS, "Sum", "interruptions")],
                width=8,
            ),
            cloudwatch.GraphWidget(
                title="Time to checkpoint (s)",
                left=[
                    _search(METRIC_TIME_TO_CHECKPOINT, "p50", "p50"),
                    _search(METRIC_TIME_TO_CHECKPOINT, "Maximum", "max"),
                ],
                width=8,
            ),
            cloudwatch.GraphWidget(
                title="Time to resume (s)",
                left=[
                    _search(METRIC_TIME_TO_RESUME, "p50", "p50"),
                    _search(METRIC_TIME_TO_RESUME, "Maximum", "max"),
                ],
                width=8,
            ),
        )
        dashboard.add_widgets(
            cloudwatch.GraphWidget(
                title="Lost steps", left=[_search(METRIC_LOST_STEPS, "Sum", "lost steps")], width=8
            ),
            cloudwatch.GraphWidget(
                title="Replacements by pool",
                left=[_search(METRIC_REPLACEMENTS, "Sum", "")],
                stacked=True,
                width=8,
            ),
            cloudwatch.GraphWidget(
                title="Savings vs on-demand (USD)", left=[_search(METRIC_SAVINGS, "Sum", "USD")], width=8
            ),
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
                ],
                width=12,
            ),
            cloudwatch.AlarmStatusWidget(title="Alarms", alarms=list(self.alarms), width=24),
        )
        return dashboard
