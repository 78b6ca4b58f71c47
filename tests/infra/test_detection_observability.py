"""Rules, handlers, IAM hygiene across the stack, alarms, dashboard and the FIS template."""

from __future__ import annotations

import json
import re
from collections.abc import Iterator
from typing import Any

import pytest
from aws_cdk.assertions import Match

from infra.constructs.detection import INSTANCE_STATE_HANDLER, INTERRUPTION_HANDLER
from tests.infra.conftest import render
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


# The only partial wildcards, and only in identity policies: CDK's KMS grants (e.g.
# Topic.grant_publish on the encrypted alerts topic) name the data-key variants this way,
# on one key's ARN. Hand-written statements and key policies name exact actions.
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
                for statement in _as_list(statements):
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
        for action in _as_list(statement["Action"]):
            identity_policy = where.startswith(("AWS::IAM::Policy", "AWS::IAM::Role.Policies"))
            if "*" in action and not (identity_policy and action in CDK_KMS_GRANT_ACTIONS):
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
            if any(a.startswith("logs:") for a in _as_list(s["Action"]))
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
            for what in ("Started", "Succeeded", "Failed")
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
