"""The deployed definition is the tested one, and the role grants exactly what it calls.

Synthesizes the real app once (cdk-nag included: synthesis fails on any unacknowledged
finding) and compares its state machine with `infra/workflows/resume.asl.json`.
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

os.environ.setdefault("JSII_SILENCE_WARNING_DEPRECATED_NODE_VERSION", "1")
os.environ.setdefault("CDK_DISABLE_VERSION_CHECK", "1")

from infra.app import build_app
from infra.workflows.render import (
    load_resume_definition,
    placeholders,
    render_resume,
    substitutions,
)
from trainctl_core.jobs import InterruptionReason
from trainctl_core.settings import TAG_ATTEMPT, TAG_JOB_ID, TAG_MANAGED

# What Step Functions itself needs for LogLevel.ALL delivery and X-Ray, added by CDK;
# these actions have no resource-level permissions.
PLATFORM_ACTIONS = {
    "logs:CreateLogDelivery",
    "logs:DeleteLogDelivery",
    "logs:DescribeLogGroups",
    "logs:DescribeResourcePolicies",
    "logs:GetLogDelivery",
    "logs:ListLogDeliveries",
    "logs:PutResourcePolicy",
    "logs:UpdateLogDelivery",
    "xray:GetSamplingRules",
    "xray:GetSamplingTargets",
    "xray:PutTelemetryRecords",
    "xray:PutTraceSegments",
}
# Actions an API call needs besides its own: RunInstances tags at launch (TagSpecifications)
# and passes the launch template's instance profile role; publishing to a KMS-encrypted
# topic needs the key.
IMPLIED_ACTIONS = {
    "ec2:RunInstances": {"ec2:CreateTags", "iam:PassRole"},
    "sns:Publish": {"kms:Decrypt", "kms:GenerateDataKey*"},
}
CAPACITY_CODES = [
    "InsufficientInstanceCapacity",
    "SpotMaxPriceTooLow",
    "MaxSpotInstanceCountExceeded",
    "Unsupported",
    "InsufficientFreeAddressesInSubnet",
]


@pytest.fixture(scope="module")
def template(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, Any]]:
    outdir: Path = tmp_path_factory.mktemp("cdk-workflow")
    app, stack = build_app({}, outdir=str(outdir), cloudformation_validation=False)
    app.synth()  # raises on any unacknowledged cdk-nag finding, ours included
    yield json.loads((outdir / f"{stack.stack_name}.template.json").read_text())


def _state_machine(template: dict[str, Any]) -> dict[str, Any]:
    (machine,) = [
        r for r in template["Resources"].values() if r["Type"] == "AWS::StepFunctions::StateMachine"
    ]
    return dict(machine["Properties"])


def _states(definition: dict[str, Any]) -> Iterator[tuple[str, dict[str, Any]]]:
    """Every state, including those inside Parallel branches and Map processors."""
    for name, state in definition["States"].items():
        yield name, state
        for branch in state.get("Branches", []):
            yield from _states(branch)
        if "ItemProcessor" in state:
            yield from _states(state["ItemProcessor"])


def _definition() -> dict[str, Any]:
    return render_resume(
        substitutions(
            jobs_table_name="jobs",
            alerts_topic_arn="arn:aws:sns:us-east-1:123456789012:alerts",
            launch_template_id="lt-0123456789abcdef0",
            launch_template_version="1",
        )
    )


def _api_actions(definition: dict[str, Any]) -> set[str]:
    """IAM actions of every Task resource: ...:service:apiName[.pattern] -> service:ApiName."""
    actions = set()
    for _, state in _states(definition):
        if state["Type"] != "Task":
            continue
        match = re.fullmatch(
            r"arn:aws:states:::(?:aws-sdk:)?([a-z0-9]+):([A-Za-z]+)(?:\.\w+)?", state["Resource"]
        )
        assert match, f"unexpected resource {state['Resource']}"
        service, api = match.groups()
        actions.add(f"{service}:{api[0].upper()}{api[1:]}")
    return actions


# --- the deployed definition is the file ---------------------------------------------------


def test_template_deploys_the_file_verbatim_with_every_placeholder_substituted(
    template: dict[str, Any],
) -> None:
    machine = _state_machine(template)
    assert machine["DefinitionString"] == load_resume_definition()
    assert set(machine["DefinitionSubstitutions"]) == placeholders(load_resume_definition())
    assert machine["StateMachineType"] == "STANDARD"
    assert machine["TracingConfiguration"] == {"Enabled": True}
    assert machine["LoggingConfiguration"]["Level"] == "ALL"


def test_tests_render_with_the_same_substitution_keys_as_the_stack(template: dict[str, Any]) -> None:
    deployed = _state_machine(template)["DefinitionSubstitutions"]
    ours = substitutions(
        jobs_table_name="t", alerts_topic_arn="a", launch_template_id="l", launch_template_version="1"
    )
    assert set(ours) == set(deployed)
    # Plain values (not tokens) are identical, e.g. the tag keys and tuning.
    plain = {k: v for k, v in deployed.items() if isinstance(v, str)}
    assert plain == {k: ours[k] for k in plain}


def test_log_group_is_encrypted_with_kms(template: dict[str, Any]) -> None:
    destination = _state_machine(template)["LoggingConfiguration"]["Destinations"][0]
    log_group_id = destination["CloudWatchLogsLogGroup"]["LogGroupArn"]["Fn::GetAtt"][0]
    assert "KmsKeyId" in template["Resources"][log_group_id]["Properties"]


# --- IAM: exactly what the ASL calls ---------------------------------------------------------


def test_role_grants_exactly_the_actions_the_definition_calls(template: dict[str, Any]) -> None:
    role_id = _state_machine(template)["RoleArn"]["Fn::GetAtt"][0]
    granted: set[str] = set()
    for resource in template["Resources"].values():
        if resource["Type"] == "AWS::IAM::Policy" and {"Ref": role_id} in resource["Properties"].get(
            "Roles", []
        ):
            for statement in resource["Properties"]["PolicyDocument"]["Statement"]:
                assert statement["Effect"] == "Allow"
                action = statement["Action"]
                granted |= {action} if isinstance(action, str) else set(action)

    called = _api_actions(_definition())
    assert called == {
        "dynamodb:GetItem",
        "dynamodb:UpdateItem",
        "ec2:RunInstances",
        "ec2:TerminateInstances",
        "sns:Publish",
    }
    expected = called | PLATFORM_ACTIONS
    for action in called:
        expected |= IMPLIED_ACTIONS.get(action, set())
    assert granted == expected


# --- the definition keeps to what both AWS and moto run -----------------------------------


def test_definition_is_jsonpath_only_without_lambda_or_variables() -> None:
    text = load_resume_definition()
    definition = json.loads(text)
    assert definition.get("QueryLanguage", "JSONPath") == "JSONPath"
    for name, state in _states(definition):
        assert "Assign" not in state and state.get("QueryLanguage", "JSONPath") == "JSONPath", name
        assert "lambda" not in state.get("Resource", ""), name
    # moto returns a one-element list for `$.a[0].b`: index with States.ArrayGetItem instead.
    assert not re.search(r"\$[\w.]*\[\d+\]\.", text)


def test_tags_are_the_shared_constants() -> None:
    (launch,) = [s for n, s in _states(_definition()) if n == "LaunchSpot"]
    for spec in launch["Parameters"]["TagSpecifications"]:
        assert [t["Key"] for t in spec["Tags"]] == [TAG_MANAGED, TAG_JOB_ID, TAG_ATTEMPT]
    assert [s["ResourceType"] for s in launch["Parameters"]["TagSpecifications"]] == ["instance", "volume"]


def test_reasons_are_the_domain_values() -> None:
    text = load_resume_definition()
    for reason in InterruptionReason:
        assert f'"{reason.value}"' in text


def test_capacity_errors_are_recognised_by_name_and_by_message() -> None:
    states = dict(_states(_definition()))
    for launch in ("LaunchSpot", "LaunchOnDemand"):
        by_name = states[launch]["Catch"][0]["ErrorEquals"]
        assert by_name == [f"Ec2.{code}Exception" for code in CAPACITY_CODES]
    rules = json.dumps(states["ClassifyLaunchError"])
    for code in CAPACITY_CODES:
        assert f"*{code}*" in rules


def test_run_instances_is_the_third_transition_after_the_guard() -> None:
    # Guard -> Recover (Parallel) -> ConsiderPool (Choice) -> LaunchSpot
    states = dict(_states(_definition()))
    assert states["Guard"]["Default"] == "Recover"
    launch_branch = states["Recover"]["Branches"][1]
    assert launch_branch["StartAt"] == "ConsiderPool"
    assert states["ConsiderPool"]["Default"] == "LaunchSpot"
