"""Rules, handlers, IAM hygiene across the stack, alarms, dashboard and the FIS template."""

from __future__ import annotations

import json
from typing import Any

import pytest
from aws_cdk.assertions import Match

from infra.constructs.detection import INSTANCE_STATE_HANDLER, INTERRUPTION_HANDLER
from trainctl_core.events import rule_patterns
from trainctl_core.settings import (
    ENV_CHECKPOINT_BUCKET,
    ENV_CHECKPOINT_DOCUMENT,
    ENV_IDEMPOTENCY_TABLE,
    ENV_JOBS_TABLE,
    ENV_RESUME_STATE_MACHINE_ARN,
    TAG_MANAGED,
)

# Actions that have no resource-level permissions, so "*" is the only possible resource.
STAR_RESOURCE_ALLOWED = {
    "ecr:GetAuthorizationToken",
    "xray:PutTraceSegments",
    "xray:PutTelemetryRecords",
    "ec2:DescribeInstances",
    # CDK's Step Functions log delivery + X-Ray (CloudWatch Logs delivery APIs are account-wide).
    "logs:CreateLogDelivery",
    "logs:GetLogDelivery",
    "logs:UpdateLogDelivery",
    "logs:DeleteLogDelivery",
    "logs:ListLogDeliveries",
    "logs:PutResourcePolicy",
    "logs:DescribeResourcePolicies",
    "logs:DescribeLogGroups",
    "xray:GetSamplingRules",
    "xray:GetSamplingTargets",
    # Custom::VpcRestrictDefaultSG provider (CDK) revokes rules on the default SG by id.
}


# The only partial wildcards: CDK's KMS grants (e.g. Topic.grant_publish on the encrypted
# alerts topic) name data-key variants this way; they are scoped to one key.
CDK_KMS_GRANT_ACTIONS = {"kms:GenerateDataKey*", "kms:ReEncrypt*"}


def _functions(synth: Any) -> dict[str, dict[str, Any]]:
    return {
        k: v["Properties"]
        for k, v in synth.resources("AWS::Lambda::Function").items()
        if v["Properties"].get("Handler") in (INTERRUPTION_HANDLER, INSTANCE_STATE_HANDLER)
    }


def _all_statements(synth: Any) -> list[tuple[str, dict[str, Any]]]:
    out = []
    for logical_id, res in synth.json["Resources"].items():
        if res["Type"] == "AWS::IAM::Policy":
            out += [(logical_id, s) for s in res["Properties"]["PolicyDocument"]["Statement"]]
        if res["Type"] == "AWS::IAM::Role":
            for policy in res["Properties"].get("Policies", []):
                out += [(logical_id, s) for s in policy["PolicyDocument"]["Statement"]]
    return out


def _as_list(value: Any) -> list[Any]:
    return value if isinstance(value, list) else [value]


# --- rules -----------------------------------------------------------------------------


def test_rules_deploy_the_core_patterns(any_synth: Any) -> None:
    deployed = [r["Properties"]["EventPattern"] for r in any_synth.resources("AWS::Events::Rule").values()]
    expected = list(rule_patterns().values())
    assert sorted(json.dumps(p, sort_keys=True) for p in deployed) == sorted(
        json.dumps(p, sort_keys=True) for p in expected
    )


def test_every_rule_target_retries_ages_out_and_dead_letters(any_synth: Any) -> None:
    dlq = any_synth.logical_id("EventsDeadLetterQueue", "AWS::SQS::Queue")
    for rule in any_synth.resources("AWS::Events::Rule").values():
        (target,) = rule["Properties"]["Targets"]
        assert target["RetryPolicy"] == {"MaximumRetryAttempts": 4, "MaximumEventAgeInSeconds": 600}
        assert target["DeadLetterConfig"] == {"Arn": {"Fn::GetAtt": [dlq, "Arn"]}}


def test_rules_route_to_the_right_handler(any_synth: Any) -> None:
    functions = _functions(any_synth)
    by_handler = {props["Handler"]: logical_id for logical_id, props in functions.items()}
    routes = {}
    for logical_id, rule in any_synth.resources("AWS::Events::Rule").items():
        (target,) = rule["Properties"]["Targets"]
        routes[logical_id] = target["Arn"]["Fn::GetAtt"][0]
    warning = next(k for k in routes if "SpotInterruptionWarning" in k)
    rebalance = next(k for k in routes if "RebalanceRecommendation" in k)
    state = next(k for k in routes if "InstanceStateChange" in k)
    assert routes[warning] == routes[rebalance] == by_handler[INTERRUPTION_HANDLER]
    assert routes[state] == by_handler[INSTANCE_STATE_HANDLER]


# --- handlers --------------------------------------------------------------------------


def test_handlers_runtime_layers_and_environment(any_synth: Any) -> None:
    functions = _functions(any_synth)
    assert len(functions) == 2
    for props in functions.values():
        assert props["Runtime"] == "python3.11"
        assert props["Architectures"] == ["arm64"]
        assert props["TracingConfig"] == {"Mode": "Active"}
        env = props["Environment"]["Variables"]
        for name in (
            ENV_JOBS_TABLE,
            ENV_IDEMPOTENCY_TABLE,
            ENV_CHECKPOINT_DOCUMENT,
            ENV_RESUME_STATE_MACHINE_ARN,
            ENV_CHECKPOINT_BUCKET,
            "POWERTOOLS_SERVICE_NAME",
            "POWERTOOLS_METRICS_NAMESPACE",
        ):
            assert name in env, name
        layers = json.dumps(props["Layers"])
        assert ":017000801446:layer:AWSLambdaPowertoolsPythonV3-python311-arm64:" in layers
        assert "AWS::Region" in layers or "eu-west-1" in layers  # region-following ARN
        assert len(props["Layers"]) == 2


def test_function_asset_contains_only_the_functions_package(default_synth: Any) -> None:
    # The handler string `functions.interruption.handler.handler` must import from the asset root.
    (props,) = [p for p in _functions(default_synth).values() if p["Handler"] == INTERRUPTION_HANDLER]
    asset_hash = (
        props["Code"]["S3Key"]["Fn::Sub"].split("/")[-1].removesuffix(".zip")
        if isinstance(props["Code"]["S3Key"], dict)
        else props["Code"]["S3Key"].removesuffix(".zip")
    )
    root = default_synth.outdir / f"asset.{asset_hash}"
    assert (root / "functions" / "interruption" / "handler.py").is_file()
    assert (root / "functions" / "instance_state" / "handler.py").is_file()
    assert sorted(p.name for p in root.iterdir()) == ["functions"]
    assert not list(root.rglob("__pycache__"))


def test_reserved_concurrency_is_opt_in(default_synth: Any, prod_synth: Any) -> None:
    assert all("ReservedConcurrentExecutions" not in p for p in _functions(default_synth).values())
    assert all(p["ReservedConcurrentExecutions"] == 5 for p in _functions(prod_synth).values())


def test_async_failures_go_to_the_failure_queue(any_synth: Any) -> None:
    queue = any_synth.logical_id("HandlerFailureQueue", "AWS::SQS::Queue")
    configs = any_synth.resources("AWS::Lambda::EventInvokeConfig")
    assert len(configs) == 2
    for config in configs.values():
        props = config["Properties"]
        assert props["MaximumRetryAttempts"] == 2
        assert props["MaximumEventAgeInSeconds"] == 600
        assert props["DestinationConfig"]["OnFailure"]["Destination"] == {"Fn::GetAtt": [queue, "Arn"]}


def test_send_command_only_our_document_and_tagged_instances(any_synth: Any) -> None:
    send = [s for _, s in _all_statements(any_synth) if "ssm:SendCommand" in _as_list(s["Action"])]
    assert {s["Sid"] for s in send} == {"SendOurCheckpointDocument", "ToTrainctlInstancesOnly"}
    for statement in send:
        assert _as_list(statement["Action"]) == ["ssm:SendCommand"]
        if statement["Sid"] == "SendOurCheckpointDocument":
            doc = any_synth.logical_id("CheckpointDocument", "AWS::SSM::Document")
            assert {"Ref": doc} in statement["Resource"]["Fn::Join"][1]
            assert "Condition" not in statement
        else:
            assert json.dumps(statement["Resource"]).endswith(':instance/*"]]}') or statement[
                "Resource"
            ].endswith(":instance/*")
            assert statement["Condition"] == {"StringEquals": {f"aws:ResourceTag/{TAG_MANAGED}": "true"}}
    # Only the interruption handler checkpoints instances.
    owners = {
        logical_id
        for logical_id, s in _all_statements(any_synth)
        if "ssm:SendCommand" in _as_list(s["Action"])
    }
    assert len(owners) == 1 and "InterruptionHandler" in owners.pop()


def test_handlers_may_start_the_resume_workflow(any_synth: Any) -> None:
    machine = any_synth.logical_id("ResumeStateMachine", "AWS::StepFunctions::StateMachine")
    starters = {
        logical_id
        for logical_id, s in _all_statements(any_synth)
        if "states:StartExecution" in _as_list(s["Action"]) and s["Resource"] == {"Ref": machine}
    }
    assert any("InterruptionHandler" in s for s in starters)
    assert any("InstanceStateHandler" in s for s in starters)


# --- IAM hygiene -----------------------------------------------------------------------


def test_no_wildcard_actions_anywhere(any_synth: Any) -> None:
    for logical_id, statement in _all_statements(any_synth):
        for action in _as_list(statement.get("Action", [])):
            assert action != "*" and not action.endswith(":*"), f"{logical_id}: {action}"
            if "*" in action:
                assert action in CDK_KMS_GRANT_ACTIONS, f"{logical_id}: {action}"


def test_star_resources_only_where_the_api_has_no_resource_level(any_synth: Any) -> None:
    for logical_id, statement in _all_statements(any_synth):
        if "*" in _as_list(statement.get("Resource", [])):
            if "CustomVpcRestrictDefaultSG" in logical_id:
                continue  # CDK-owned provider role (inline policy, scoped to the default SG)
            extra = set(_as_list(statement["Action"])) - STAR_RESOURCE_ALLOWED
            assert not extra, f"{logical_id}: '*' resource for {sorted(extra)}"


# --- observability ---------------------------------------------------------------------


def test_alerts_topic_is_encrypted_and_tls_only(any_synth: Any) -> None:
    topic = any_synth.one("AWS::SNS::Topic")["Properties"]
    key = any_synth.logical_id("AlertsKey", "AWS::KMS::Key")
    assert topic["KmsMasterKeyId"] == {"Fn::GetAtt": [key, "Arn"]}
    assert any_synth.resources("AWS::KMS::Key")[key]["Properties"]["EnableKeyRotation"] is True
    policy = any_synth.one("AWS::SNS::TopicPolicy")["Properties"]["PolicyDocument"]["Statement"]
    assert any(s["Effect"] == "Deny" and "aws:SecureTransport" in json.dumps(s) for s in policy)


def test_alert_email_is_optional(default_synth: Any, prod_synth: Any) -> None:
    assert not default_synth.resources("AWS::SNS::Subscription")
    prod_synth.template.has_resource_properties(
        "AWS::SNS::Subscription", {"Protocol": "email", "Endpoint": "ops@example.com"}
    )


@pytest.mark.parametrize(
    ("metric", "namespace"),
    [
        ("ApproximateNumberOfMessagesVisible", "AWS/SQS"),
        ("Errors", "AWS/Lambda"),
        ("ExecutionsFailed", "AWS/States"),
        ("JobsFailed", "trainctl"),
    ],
)
def test_alarms_notify_the_alerts_topic(any_synth: Any, metric: str, namespace: str) -> None:
    topic = any_synth.logical_id("AlertsTopic", "AWS::SNS::Topic")
    alarms = [
        a["Properties"]
        for a in any_synth.resources("AWS::CloudWatch::Alarm").values()
        if a["Properties"]["MetricName"] == metric
    ]
    assert alarms
    for alarm in alarms:
        assert alarm["Namespace"] == namespace
        assert alarm["AlarmActions"] == [{"Ref": topic}]
        assert alarm["TreatMissingData"] == "notBreaching"


def test_dead_letter_queue_alarms_fire_on_the_first_message(any_synth: Any) -> None:
    dlq_alarms = [
        a["Properties"]
        for a in any_synth.resources("AWS::CloudWatch::Alarm").values()
        if a["Properties"]["MetricName"] == "ApproximateNumberOfMessagesVisible"
    ]
    assert len(dlq_alarms) == 2
    for alarm in dlq_alarms:
        assert alarm["Threshold"] == 0 and alarm["ComparisonOperator"] == "GreaterThanThreshold"


def test_dashboard_shows_the_recovery_story(any_synth: Any) -> None:
    body = json.dumps(any_synth.one("AWS::CloudWatch::Dashboard")["Properties"]["DashboardBody"])
    for title in (
        "Interruptions",
        "Time to checkpoint",
        "Time to resume",
        "Lost steps",
        "Replacements by pool",
        "Savings",
    ):
        assert title in body, title


# --- game day --------------------------------------------------------------------------


def test_fis_interrupts_one_tagged_spot_instance_and_stops_on_alarm(any_synth: Any) -> None:
    guard = any_synth.logical_id("GuardAlarm", "AWS::CloudWatch::CompositeAlarm")
    any_synth.template.has_resource_properties(
        "AWS::FIS::ExperimentTemplate",
        {
            "Targets": {
                "TrainctlSpotInstances": Match.object_like(
                    {
                        "ResourceType": "aws:ec2:spot-instance",
                        "ResourceTags": {TAG_MANAGED: "true"},
                        "SelectionMode": "COUNT(1)",
                    }
                )
            },
            "Actions": {
                "InterruptOne": Match.object_like(
                    {
                        "ActionId": "aws:ec2:send-spot-instance-interruptions",
                        "Parameters": {"durationBeforeInterruption": "PT2M"},
                        "Targets": {"SpotInstances": "TrainctlSpotInstances"},
                    }
                )
            },
            "StopConditions": [{"Source": "aws:cloudwatch:alarm", "Value": {"Fn::GetAtt": [guard, "Arn"]}}],
        },
    )
    statements = [s for lid, s in _all_statements(any_synth) if "ExperimentRole" in lid]
    interrupt = next(s for s in statements if s["Action"] == "ec2:SendSpotInstanceInterruptions")
    assert interrupt["Condition"] == {"StringEquals": {f"aws:ResourceTag/{TAG_MANAGED}": "true"}}
