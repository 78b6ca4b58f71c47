"""Rules, handlers, IAM hygiene across the stack, alarms, dashboard and the FIS template."""

from __future__ import annotations

import json
import re
from collections.abc import Iterator
from typing import Any

import pytest
from aws_cdk.assertions import Match

from infra.constructs.detection import INSTANCE_STATE_HANDLER, INTERRUPTION_HANDLER
from tests.infra.conftest import as_list, normalised_statements, policy_statements, render
from trainctl_core.events import rule_patterns
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

# Actions that have no resource-level permissions, so "*" is the only possible resource.
STAR_RESOURCE_ALLOWED = {
    "ecr:GetAuthorizationToken",
    "ec2:DescribeSpotPriceHistory",
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


def _functions(synth: Any) -> dict[str, dict[str, Any]]:
    return {
        k: v["Properties"]
        for k, v in synth.resources("AWS::Lambda::Function").items()
        if v["Properties"].get("Handler") in (INTERRUPTION_HANDLER, INSTANCE_STATE_HANDLER)
    }


def _role_statements(synth: Any, role_id: str) -> list[dict[str, Any]]:
    """Every identity-policy statement of one role: inline and attached AWS::IAM::Policy."""
    role = synth.resources("AWS::IAM::Role")[role_id]["Properties"]
    out = [s for policy in role.get("Policies", []) for s in policy["PolicyDocument"]["Statement"]]
    for policy in synth.resources("AWS::IAM::Policy").values():
        if {"Ref": role_id} in policy["Properties"].get("Roles", []):
            out += policy["Properties"]["PolicyDocument"]["Statement"]
    return out


def _every_statement(synth: Any) -> Iterator[tuple[str, str, dict[str, Any]]]:
    """(logical id, where, statement) for every policy statement anywhere in the template:
    identity policies, key policies, bucket/queue/topic policies, trust policies."""

    def walk(node: Any, where: str) -> Iterator[tuple[str, dict[str, Any]]]:
        if isinstance(node, dict):
            statements = node.get("Statement")
            if isinstance(statements, dict | list) and "Version" in node:
                for statement in as_list(statements):
                    yield where, statement
            for key, value in node.items():
                yield from walk(value, f"{where}.{key}")
        elif isinstance(node, list):
            for value in node:
                yield from walk(value, where)

    for logical_id, resource in synth.json["Resources"].items():
        for where, statement in walk(resource.get("Properties", {}), resource["Type"]):
            yield logical_id, where, statement


def _root_key_admin(where: str, statement: dict[str, Any]) -> bool:
    # CDK's default key policy: the account (root) may use and manage the key, which is
    # what lets IAM policies grant the key at all and keeps it from becoming unmanageable
    # (AWS's documented default key policy). It names no other principal.
    return (
        where == "AWS::KMS::Key.KeyPolicy"
        and statement.get("Action") == "kms:*"
        and statement.get("Resource") == "*"
        and render(statement.get("Principal", {})).get("AWS", "").endswith(":root")
        and "Condition" not in statement
    )


def _wildcard_actions(synth: Any) -> set[tuple[str, str]]:
    """(logical id, action) for every wildcard action an Allow statement grants."""
    found = set()
    for logical_id, where, statement in _every_statement(synth):
        if statement["Effect"] != "Allow":
            continue  # a wildcard in a Deny (TLS-only policies) takes away, never grants
        assert "NotAction" not in statement, f"{logical_id}: Allow with NotAction"
        if _root_key_admin(where, statement):
            continue
        for action in as_list(statement["Action"]):
            # Partial wildcards too: CDK's KMS grants (e.g. Topic.grant_publish) name
            # kms:GenerateDataKey*, so key use is written out action by action.
            if "*" in action:
                found.add((logical_id, action))
    return found


def _fragment(logical_id: str) -> str:
    return re.sub(r"[0-9A-F]{8}$", "", logical_id)


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
        core, powertools = props["Layers"]
        assert core == {"Ref": any_synth.logical_id("CoreLayer", "AWS::Lambda::LayerVersion")}
        if any_synth.explicit_env:  # eu-west-1: the commercial account, picked at synth
            assert powertools == (
                "arn:aws:lambda:eu-west-1:017000801446:layer:AWSLambdaPowertoolsPythonV3-python311-arm64:27"
            )
        else:  # picked at deploy time from the region (see the test below)
            rendered = render(powertools)
            assert rendered.startswith("arn:${AWS::Partition}:lambda:${AWS::Region}:<")
            assert rendered.endswith(">:layer:AWSLambdaPowertoolsPythonV3-python311-arm64:27")
            # No mapping lookup: CloudFormation resolves an Fn::FindInMap even in an
            # Fn::If branch it does not take, so a missing key would fail every deploy.
            assert "Fn::FindInMap" not in json.dumps(powertools)
            assert "Mappings" not in any_synth.json


def _evaluate(node: Any, template: dict[str, Any], pseudo: dict[str, str]) -> Any:
    """A template value as CloudFormation computes it for the given pseudo parameters."""
    if isinstance(node, list):
        return [_evaluate(n, template, pseudo) for n in node]
    if not isinstance(node, dict):
        return node
    ((key, arg),) = node.items()
    if key == "Ref":
        return pseudo[arg]
    if key == "Fn::Join":
        return arg[0].join(_evaluate(part, template, pseudo) for part in arg[1])
    if key == "Fn::Equals":
        left, right = _evaluate(arg, template, pseudo)
        return left == right
    if key == "Fn::If":
        name, then, otherwise = arg
        chosen = then if _evaluate(template["Conditions"][name], template, pseudo) else otherwise
        return _evaluate(chosen, template, pseudo)
    raise AssertionError(f"unexpected intrinsic {key}")


@pytest.mark.parametrize(
    ("partition", "region", "account"),
    [
        # The accounts the Powertools docs list ("Lambda Layer": commercial, China, GovCloud).
        ("aws", "us-east-1", "017000801446"),
        ("aws", "ap-southeast-7", "017000801446"),
        ("aws-cn", "cn-north-1", "498634801083"),
        ("aws-us-gov", "us-gov-east-1", "165087284144"),
        ("aws-us-gov", "us-gov-west-1", "165093116878"),
        # Not published there: the commercial account has no layer in aws-cn, so creating
        # the functions fails the deploy (powertools_layer_arn is the way out).
        ("aws-cn", "cn-northwest-1", "017000801446"),
    ],
)
def test_env_agnostic_powertools_layer_follows_partition_and_region(
    default_synth: Any, partition: str, region: str, account: str
) -> None:
    (props, *_) = _functions(default_synth).values()
    pseudo = {"AWS::Partition": partition, "AWS::Region": region}
    layer = props["Layers"][1]
    assert _evaluate(layer, default_synth.json, pseudo) == (
        f"arn:{partition}:lambda:{region}:{account}:layer:AWSLambdaPowertoolsPythonV3-python311-arm64:27"
    )


def _layer_arn(context: dict[str, Any]) -> str:
    """The Powertools layer ARN `powertools_layer_arn` gives a stack with this context."""
    from aws_cdk import App, Environment, Stack

    from infra.app import cdk_json_context
    from infra.config import TrainctlConfig
    from infra.constructs.detection import powertools_layer_arn

    config = TrainctlConfig.from_context(context)
    env = Environment(account=config.account, region=config.region) if config.account else None
    # cdk.json's feature flags (partition literals for a known region), as the app has them.
    stack = Stack(App(context=cdk_json_context()), "Layer", env=env)
    return str(stack.resolve(powertools_layer_arn(stack, config)))


@pytest.mark.parametrize(
    ("region", "expected"),
    [
        ("us-gov-west-1", "arn:aws-us-gov:lambda:us-gov-west-1:165093116878:layer:"),
        ("us-gov-east-1", "arn:aws-us-gov:lambda:us-gov-east-1:165087284144:layer:"),
        ("cn-north-1", "arn:aws-cn:lambda:cn-north-1:498634801083:layer:"),
        ("eu-central-2", "arn:aws:lambda:eu-central-2:017000801446:layer:"),
    ],
)
def test_explicit_env_powertools_layer_is_the_published_one(region: str, expected: str) -> None:
    context = {"trainctl:account": "123456789012", "trainctl:region": region}
    assert _layer_arn(context) == f"{expected}AWSLambdaPowertoolsPythonV3-python311-arm64:27"
    assert _layer_arn({**context, "trainctl:powertools_layer_version": "30"}).endswith("-arm64:30")


def test_unpublished_region_fails_the_synth_naming_the_override() -> None:
    from infra.config import ConfigError

    with pytest.raises(ConfigError, match="trainctl:powertools_layer_arn") as raised:
        _layer_arn({"trainctl:account": "123456789012", "trainctl:region": "cn-northwest-1"})
    assert "cn-northwest-1" in str(raised.value)


def test_powertools_layer_arn_override_is_used_verbatim() -> None:
    own = "arn:aws-cn:lambda:cn-northwest-1:123456789012:layer:Powertools-python311-arm64:4"
    context = {"trainctl:account": "123456789012", "trainctl:region": "cn-northwest-1"}
    assert _layer_arn({**context, "trainctl:powertools_layer_arn": own}) == own
    # Env-agnostic too: no mapping, no condition, the ARN as given.
    assert _layer_arn({"trainctl:powertools_layer_arn": own}) == own


def test_core_layer_matches_the_handlers_runtime_and_architecture(any_synth: Any) -> None:
    # Lambda refuses a layer whose declared runtimes/architectures exclude the function's.
    layer = any_synth.one("AWS::Lambda::LayerVersion")["Properties"]
    assert layer["CompatibleRuntimes"] == ["python3.11"]
    assert layer["CompatibleArchitectures"] == ["arm64"]
    for props in _functions(any_synth).values():
        assert [props["Runtime"]] == layer["CompatibleRuntimes"]
        assert props["Architectures"] == layer["CompatibleArchitectures"]


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
    send = [s for _, s in policy_statements(any_synth) if "ssm:SendCommand" in as_list(s["Action"])]
    assert {s["Sid"] for s in send} == {"SendOurCheckpointDocument", "ToTrainctlInstancesOnly"}
    for statement in send:
        assert as_list(statement["Action"]) == ["ssm:SendCommand"]
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
        for logical_id, s in policy_statements(any_synth)
        if "ssm:SendCommand" in as_list(s["Action"])
    }
    assert len(owners) == 1 and "InterruptionHandler" in owners.pop()


def test_handlers_may_start_the_resume_workflow(any_synth: Any) -> None:
    machine = any_synth.logical_id("ResumeStateMachine", "AWS::StepFunctions::StateMachine")
    starters = {
        logical_id
        for logical_id, s in policy_statements(any_synth)
        if "states:StartExecution" in as_list(s["Action"]) and s["Resource"] == {"Ref": machine}
    }
    assert any("InterruptionHandler" in s for s in starters)
    assert any("InstanceStateHandler" in s for s in starters)


def test_handlers_get_exactly_the_dynamodb_calls_they_make(any_synth: Any) -> None:
    # JobStore.find_by_instance / find_by_interrupted_instance (Query on an index, GetItem),
    # JobStore.apply (UpdateItem) and Powertools' DynamoDBPersistenceLayer (get/put/update/
    # delete of one record). No Scan, PutItem or BatchWriteItem on job rows, no index/*.
    jobs = any_synth.logical_id("JobsTable", "AWS::DynamoDB::Table")
    records = any_synth.logical_id("IdempotencyTable", "AWS::DynamoDB::Table")
    expected = [
        {
            "Sid": "ReadAndTransitionJobRows",
            "Effect": "Allow",
            "Action": ["dynamodb:GetItem", "dynamodb:UpdateItem"],
            "Resource": [f"${{{jobs}.Arn}}"],
        },
        {
            "Sid": "FindJobByInstance",
            "Effect": "Allow",
            "Action": ["dynamodb:Query"],
            "Resource": [
                f"${{{jobs}.Arn}}/index/{JOBS_BY_INSTANCE_INDEX}",
                f"${{{jobs}.Arn}}/index/{JOBS_BY_INTERRUPTED_INSTANCE_INDEX}",
            ],
        },
        {
            "Sid": "IdempotencyRecords",
            "Effect": "Allow",
            "Action": ["dynamodb:DeleteItem", "dynamodb:GetItem", "dynamodb:PutItem", "dynamodb:UpdateItem"],
            "Resource": [f"${{{records}.Arn}}"],
        },
    ]
    # The indexes granted are exactly the ones the table has (the store queries both).
    table = any_synth.resources("AWS::DynamoDB::Table")[jobs]["Properties"]
    assert {i["IndexName"] for i in table["GlobalSecondaryIndexes"]} == {
        JOBS_BY_INSTANCE_INDEX,
        JOBS_BY_INTERRUPTED_INSTANCE_INDEX,
    }
    functions = _functions(any_synth)
    assert len(functions) == 2
    for props in functions.values():
        role_id = props["Role"]["Fn::GetAtt"][0]
        dynamodb = [
            s
            for s in _role_statements(any_synth, role_id)
            if any(a.lower().startswith("dynamodb:") for a in as_list(s["Action"]))
        ]
        assert normalised_statements(dynamodb) == normalised_statements(expected)


def test_handlers_write_logs_to_their_own_log_group_only(any_synth: Any) -> None:
    # Lambda ships a function's logs (and so its Powertools EMF metrics) with the
    # function's role; the roles have no AWSLambdaBasicExecutionRole, so this grant is all
    # there is, and it names the function's own group.
    functions = _functions(any_synth)
    assert len(functions) == 2
    for props in functions.values():
        role_id = props["Role"]["Fn::GetAtt"][0]
        role = any_synth.resources("AWS::IAM::Role")[role_id]["Properties"]
        assert "ManagedPolicyArns" not in role
        group_id = props["LoggingConfig"]["LogGroup"]["Ref"]
        logs_statements = [
            s
            for s in _role_statements(any_synth, role_id)
            if any(a.startswith("logs:") for a in as_list(s["Action"]))
        ]
        assert logs_statements == [
            {
                "Sid": "WriteOwnLogGroup",
                "Effect": "Allow",
                "Action": ["logs:CreateLogStream", "logs:PutLogEvents"],
                # The group's Arn attribute ends in `:*`, which covers its streams.
                "Resource": {"Fn::GetAtt": [group_id, "Arn"]},
            }
        ]


def test_log_groups_keep_the_configured_retention(default_synth: Any, prod_synth: Any) -> None:
    for synth in (default_synth, prod_synth):
        for logical_id, group in synth.resources("AWS::Logs::LogGroup").items():
            assert group["Properties"]["RetentionInDays"] == 30, logical_id


# --- IAM hygiene -----------------------------------------------------------------------


def test_no_wildcard_actions_in_any_policy_or_key_policy(any_synth: Any) -> None:
    found = _wildcard_actions(any_synth)
    assert found == set()


def test_wildcard_check_sees_key_policies_and_inline_policies(default_synth: Any) -> None:
    # The check above walks every statement: key policies (the root statement aside)
    # and identity policies are both in what it reads.
    places = {where for _, where, _ in _every_statement(default_synth)}
    assert {
        "AWS::KMS::Key.KeyPolicy",
        "AWS::IAM::Policy.PolicyDocument",
        "AWS::IAM::Role.AssumeRolePolicyDocument",
        "AWS::S3::BucketPolicy.PolicyDocument",
        "AWS::SNS::TopicPolicy.PolicyDocument",
        "AWS::SQS::QueuePolicy.PolicyDocument",
    } <= places
    alerts_key = default_synth.logical_id("AlertsKey", "AWS::KMS::Key")
    key_statements = [s for lid, where, s in _every_statement(default_synth) if lid == alerts_key]
    assert [s for s in key_statements if _root_key_admin("AWS::KMS::Key.KeyPolicy", s)]
    (alarms,) = [s for s in key_statements if s.get("Sid") == "CloudWatchAlarmsPublish"]
    assert sorted(alarms["Action"]) == ["kms:Decrypt", "kms:GenerateDataKey"]


def test_star_resources_only_where_the_api_has_no_resource_level(any_synth: Any) -> None:
    for logical_id, statement in policy_statements(any_synth):
        if "*" in as_list(statement.get("Resource", [])):
            if "CustomVpcRestrictDefaultSG" in logical_id:
                continue  # CDK-owned provider role (inline policy, scoped to the default SG)
            extra = set(as_list(statement["Action"])) - STAR_RESOURCE_ALLOWED
            assert not extra, f"{logical_id}: '*' resource for {sorted(extra)}"


# --- observability ---------------------------------------------------------------------


def test_alerts_topic_is_encrypted_and_tls_only(any_synth: Any) -> None:
    topic = any_synth.one("AWS::SNS::Topic")["Properties"]
    key = any_synth.logical_id("AlertsKey", "AWS::KMS::Key")
    assert topic["KmsMasterKeyId"] == {"Fn::GetAtt": [key, "Arn"]}
    assert any_synth.resources("AWS::KMS::Key")[key]["Properties"]["EnableKeyRotation"] is True
    policy = any_synth.one("AWS::SNS::TopicPolicy")["Properties"]
    topic_id = any_synth.logical_id("AlertsTopic", "AWS::SNS::Topic")
    assert policy["Topics"] == [{"Ref": topic_id}]
    # The whole policy: TLS only for everyone, and CloudWatch alarms of this account and
    # region may publish. The topic policy replaces SNS's default one, so without the
    # second statement every alarm notification would be refused.
    assert render(policy["PolicyDocument"]) == {
        "Version": "2012-10-17",
        "Statement": [
            {
                "Sid": "AllowPublishThroughSSLOnly",
                "Effect": "Deny",
                "Principal": "*",
                "Action": "sns:Publish",
                "Resource": f"${{{topic_id}}}",
                "Condition": {"Bool": {"aws:SecureTransport": "false"}},
            },
            {
                "Sid": "CloudWatchAlarmsPublish",
                "Effect": "Allow",
                "Principal": {"Service": "cloudwatch.amazonaws.com"},
                "Action": "sns:Publish",
                "Resource": f"${{{topic_id}}}",
                "Condition": {
                    "StringEquals": {"aws:SourceAccount": any_synth.account},
                    "ArnLike": {"aws:SourceArn": any_synth.arn("cloudwatch", "alarm:*")},
                },
            },
        ],
    }


def test_every_alarm_action_can_publish_to_its_topic(any_synth: Any) -> None:
    # Walks alarm -> action -> topic -> topic policy and key policy, so an alarm wired to a
    # topic CloudWatch may not publish to (or whose key it may not use) fails here.
    topic_id = any_synth.logical_id("AlertsTopic", "AWS::SNS::Topic")
    topic = any_synth.resources("AWS::SNS::Topic")[topic_id]["Properties"]
    key_id = topic["KmsMasterKeyId"]["Fn::GetAtt"][0]
    actions = [
        a
        for alarm in any_synth.resources("AWS::CloudWatch::Alarm").values()
        for a in alarm["Properties"]["AlarmActions"]
    ]
    assert actions and set(map(json.dumps, actions)) == {json.dumps({"Ref": topic_id})}

    def allows_cloudwatch(statements: list[dict[str, Any]], action: str) -> bool:
        return any(
            s["Effect"] == "Allow"
            and s.get("Principal") == {"Service": "cloudwatch.amazonaws.com"}
            and action in as_list(s["Action"])
            for s in statements
        )

    topic_policy = any_synth.one("AWS::SNS::TopicPolicy")["Properties"]["PolicyDocument"]["Statement"]
    key_policy = any_synth.resources("AWS::KMS::Key")[key_id]["Properties"]["KeyPolicy"]["Statement"]
    assert allows_cloudwatch(topic_policy, "sns:Publish")
    assert allows_cloudwatch(key_policy, "kms:GenerateDataKey")
    assert allows_cloudwatch(key_policy, "kms:Decrypt")


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
        ("ExecutionsTimedOut", "AWS/States"),
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


# A metric as a dashboard widget or an alarm reads it: (namespace, name, dimensions, stat).
# Dimensions map name -> value; a SEARCH schema (`{ns,Pool}`) names dimensions without
# values (None): it matches whatever values are emitted.
MetricRef = tuple[str, str, tuple[tuple[str, str | None], ...], str]
_SEARCH = re.compile(r"""SEARCH\('\{([^}]*)\} MetricName="([^"]+)"', '([^']+)', \d+\)""")


def _dashboard(synth: Any) -> dict[str, Any]:
    body = synth.one("AWS::CloudWatch::Dashboard")["Properties"]["DashboardBody"]
    return dict(json.loads(render(body)))


def _widget_metrics(widget: dict[str, Any]) -> list[MetricRef]:
    refs: list[MetricRef] = []
    for entry in widget["properties"].get("metrics", []):
        if isinstance(entry[0], dict):  # a math expression: only schema'd SEARCHes are used
            searches = _SEARCH.findall(entry[0]["expression"])
            assert searches, f"unrecognised expression {entry[0]['expression']!r}"
            for schema, name, stat in searches:
                namespace, *dimensions = schema.split(",")
                refs.append((namespace, name, tuple((d, None) for d in sorted(dimensions)), stat))
            continue
        options = entry[-1] if isinstance(entry[-1], dict) else {}
        plain = [e for e in entry if not isinstance(e, dict)]
        namespace, name, *pairs = plain
        dimensions = tuple(sorted(zip(pairs[::2], pairs[1::2], strict=True)))
        refs.append((namespace, name, dimensions, options.get("stat", "Average")))
    return refs


def _alarm_metrics(synth: Any) -> dict[str, list[MetricRef]]:
    out: dict[str, list[MetricRef]] = {}
    for logical_id, alarm in synth.resources("AWS::CloudWatch::Alarm").items():
        props = render(alarm["Properties"])
        if "MetricName" in props:
            stats = [(props, props.get("Statistic") or props.get("ExtendedStatistic"))]
        else:
            stats = [(m["MetricStat"]["Metric"], m["MetricStat"]["Stat"]) for m in props["Metrics"]]
        out[logical_id] = [
            (
                metric["Namespace"],
                metric["MetricName"],
                tuple(sorted((d["Name"], d["Value"]) for d in metric.get("Dimensions", []))),
                stat,
            )
            for metric, stat in stats
        ]
    return out


def _handler_emitted() -> set[tuple[str, str, frozenset[str]]]:
    """(namespace, metric, dimension names) the handlers' reporting really emits."""
    from trainctl_core.handling import reject, report
    from trainctl_core.observability import metrics
    from trainctl_core.recovery import Outcome, Result

    emitted: set[tuple[str, str, frozenset[str]]] = set()

    def collect() -> None:
        blob = metrics.serialize_metric_set()
        for directive in blob["_aws"]["CloudWatchMetrics"]:
            for dimension_set in directive["Dimensions"]:
                for metric in directive["Metrics"]:
                    emitted.add((directive["Namespace"], metric["Name"], frozenset(dimension_set)))
        metrics.clear_metrics()

    try:
        for outcome in Outcome:
            metrics.clear_metrics()
            every_flag = Result(
                outcome=outcome,
                instance_id="i-0123456789abcdef0",
                job_id="job-1",
                attempt=0,
                checkpoint_requested=True,
                interruption_recorded=True,
                execution_started=True,
            )
            report(every_flag, event_type="test")
            collect()
        reject({"id": "e-1"}, ValueError("bad"), event_type="test")
        collect()
    finally:
        metrics.clear_metrics()
    return emitted


def _filter_emitted(synth: Any) -> set[tuple[str, str, frozenset[str]]]:
    out = set()
    for props in (r["Properties"] for r in synth.resources("AWS::Logs::MetricFilter").values()):
        for transform in props["MetricTransformations"]:
            dimensions = frozenset(d["Key"] for d in transform.get("Dimensions", []))
            out.add((transform["MetricNamespace"], transform["MetricName"], dimensions))
    return out


def test_every_dashboard_and_alarm_metric_has_an_emitter(any_synth: Any) -> None:
    # trainctl metrics come from the handlers' Powertools reporting or from the agent's
    # metric lines via the stack's metric filters; AWS/* metrics from AWS, for resources
    # of this stack. A widget or alarm on anything else would stay empty forever.
    produced = _handler_emitted() | _filter_emitted(any_synth)
    resources = set(any_synth.json["Resources"])
    used = [
        ref for w in _dashboard(any_synth)["widgets"] if w["type"] == "metric" for ref in _widget_metrics(w)
    ]
    used += [ref for refs in _alarm_metrics(any_synth).values() for ref in refs]
    assert used
    for namespace, name, dimensions, _ in used:
        if namespace == "trainctl":
            assert (namespace, name, frozenset(d for d, _ in dimensions)) in produced, (name, dimensions)
        else:
            assert namespace.startswith("AWS/"), namespace
            for dimension, value in dimensions:
                referenced = re.fullmatch(r"\$\{([A-Za-z0-9]+)(\.[A-Za-z]+)?\}", value or "")
                assert referenced and referenced.group(1) in resources, (namespace, name, dimension, value)


def test_emitter_check_knows_the_handler_metrics() -> None:
    # The check above is only as good as its producers: the handlers' interruption count
    # carries the service and outcome dimensions, and nothing emits savings.
    emitted = _handler_emitted()
    assert ("trainctl", "Interruptions", frozenset({"service", "outcome"})) in emitted
    assert not [e for e in emitted if "Savings" in e[1]]


def test_dashboard_widgets_show_their_metrics(any_synth: Any) -> None:
    functions = {props["Handler"]: f"${{{lid}}}" for lid, props in _functions(any_synth).items()}
    machine = f"${{{any_synth.logical_id('ResumeStateMachine', 'AWS::StepFunctions::StateMachine')}}}"
    handlers = (functions[INTERRUPTION_HANDLER], functions[INSTANCE_STATE_HANDLER])
    expected: dict[str, list[MetricRef]] = {
        "Interruptions": [("trainctl", "Interruptions", (("outcome", None), ("service", None)), "Sum")],
        "Time to checkpoint (s)": [
            ("trainctl", "TimeToCheckpoint", (), "p50"),
            ("trainctl", "TimeToCheckpoint", (), "Maximum"),
        ],
        "Time to resume (s)": [
            ("trainctl", "TimeToResume", (), "p50"),
            ("trainctl", "TimeToResume", (), "Maximum"),
        ],
        "Lost steps": [("trainctl", "LostSteps", (), "Sum")],
        "Replacements by pool": [("trainctl", "Replacements", (("Pool", None),), "Sum")],
        "Jobs ended": [("trainctl", "JobsSucceeded", (), "Sum"), ("trainctl", "JobsFailed", (), "Sum")],
        "Handlers: invocations / errors": [
            *(("AWS/Lambda", "Invocations", (("FunctionName", f),), "Sum") for f in handlers),
            *(("AWS/Lambda", "Errors", (("FunctionName", f),), "Sum") for f in handlers),
        ],
        "Resume workflow executions": [
            ("AWS/States", f"Executions{what}", (("StateMachineArn", machine),), "Sum")
            for what in ("Started", "Succeeded", "Failed", "TimedOut")
        ],
    }
    widgets = _dashboard(any_synth)["widgets"]
    shown = {w["properties"]["title"]: _widget_metrics(w) for w in widgets if w["type"] == "metric"}
    assert {title: sorted(refs, key=str) for title, refs in shown.items()} == {
        title: sorted(refs, key=str) for title, refs in expected.items()
    }
    # The Interruptions series adds up every outcome; Replacements keeps one per pool.
    by_title = {w["properties"].get("title"): w for w in widgets}
    (interruptions,) = by_title["Interruptions"]["properties"]["metrics"]
    assert interruptions[0]["expression"].startswith("SUM(SEARCH(")
    (pools,) = by_title["Replacements by pool"]["properties"]["metrics"]
    assert pools[0]["expression"].startswith("SEARCH(")


def test_dashboard_says_where_savings_come_from(any_synth: Any) -> None:
    # Nothing emits a savings metric (the CLI computes savings per job), so the dashboard
    # explains instead of graphing an empty series.
    texts = [w["properties"]["markdown"] for w in _dashboard(any_synth)["widgets"] if w["type"] == "text"]
    assert any("trainctl savings" in t for t in texts)


def test_jobs_failed_alarm_reads_the_agent_metric(any_synth: Any) -> None:
    (refs,) = [refs for lid, refs in _alarm_metrics(any_synth).items() if "JobsFailed" in lid]
    assert refs == [("trainctl", "JobsFailed", (), "Sum")]


def test_resume_executions_alarm_on_failure_and_on_timeout(any_synth: Any) -> None:
    # A recovery that hits the state machine's timeout never fails (no Catch runs), so
    # ExecutionsFailed alone would miss it: the timeout alarm is its backstop.
    machine = f"${{{any_synth.logical_id('ResumeStateMachine', 'AWS::StepFunctions::StateMachine')}}}"
    by_metric = {
        refs[0][1]: render(any_synth.resources("AWS::CloudWatch::Alarm")[lid]["Properties"])
        for lid, refs in _alarm_metrics(any_synth).items()
        if refs[0][0] == "AWS/States"
    }
    assert set(by_metric) == {"ExecutionsFailed", "ExecutionsTimedOut"}
    for alarm in by_metric.values():
        assert alarm["Dimensions"] == [{"Name": "StateMachineArn", "Value": machine}]
        assert alarm["Statistic"] == "Sum" and alarm["Period"] == 300
        assert alarm["Threshold"] == 1 and alarm["ComparisonOperator"] == "GreaterThanOrEqualToThreshold"
        assert alarm["EvaluationPeriods"] == 1


def test_guard_alarm_covers_every_alarm(any_synth: Any) -> None:
    # The FIS stop condition: any trainctl alarm in ALARM stops the experiment.
    (composite,) = any_synth.resources("AWS::CloudWatch::CompositeAlarm").values()
    rule = render(composite["Properties"]["AlarmRule"])
    named = re.findall(r'ALARM\("\$\{([A-Za-z0-9]+)\.Arn\}"\)', rule)
    assert sorted(named) == sorted(any_synth.resources("AWS::CloudWatch::Alarm"))
    # Any one of them, not all at once.
    assert rule == "(" + " OR ".join(f'ALARM("${{{lid}.Arn}}")' for lid in named) + ")"


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


def test_fis_role_is_trusted_by_fis_of_this_account_and_interrupts_tagged_instances_only(
    any_synth: Any,
) -> None:
    role_id = any_synth.logical_id("ExperimentRole", "AWS::IAM::Role")
    template = any_synth.one("AWS::FIS::ExperimentTemplate")["Properties"]
    assert template["RoleArn"] == {"Fn::GetAtt": [role_id, "Arn"]}
    role = any_synth.resources("AWS::IAM::Role")[role_id]["Properties"]
    # Only FIS acting for this account may assume it (confused-deputy guard).
    assert render(role["AssumeRolePolicyDocument"]) == {
        "Version": "2012-10-17",
        "Statement": [
            {
                "Effect": "Allow",
                "Principal": {"Service": "fis.amazonaws.com"},
                "Action": "sts:AssumeRole",
                "Condition": {"StringEquals": {"aws:SourceAccount": any_synth.account}},
            }
        ],
    }
    assert "ManagedPolicyArns" not in role and "Policies" not in role
    # Everything the role may do: interrupt tagged instances, and resolve targets (a read
    # without resource-level permissions).
    assert render(_role_statements(any_synth, role_id)) == [
        {
            "Sid": "InterruptTrainctlInstancesOnly",
            "Effect": "Allow",
            "Action": "ec2:SendSpotInstanceInterruptions",
            "Resource": any_synth.arn("ec2", "instance/*"),
            "Condition": {"StringEquals": {f"aws:ResourceTag/{TAG_MANAGED}": "true"}},
        },
        {"Sid": "ResolveTargets", "Effect": "Allow", "Action": "ec2:DescribeInstances", "Resource": "*"},
    ]


def test_gameday_can_be_left_out_where_fis_does_not_exist(tmp_path: Any) -> None:
    from infra.app import build_app
    from infra.stack import OUTPUT_FIS_TEMPLATE

    # Given a deployment to a region without AWS FIS (the China regions, for one)
    app, stack = build_app(
        {"trainctl:gameday": "false"}, outdir=str(tmp_path), cloudformation_validation=False
    )
    app.synth()  # still nag-clean
    template = json.loads((tmp_path / f"{stack.stack_name}.template.json").read_text())
    types = {r["Type"] for r in template["Resources"].values()}
    # Then nothing of the game day is deployed, and the rest is
    assert "AWS::FIS::ExperimentTemplate" not in types
    assert not [k for k in template["Resources"] if k.startswith("GameDay")]
    assert OUTPUT_FIS_TEMPLATE not in template["Outputs"]
    assert {"AWS::CloudWatch::CompositeAlarm", "AWS::StepFunctions::StateMachine"} <= types
