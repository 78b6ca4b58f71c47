"""Offline verification: cdk-nag, cfn-lint, the rule patterns against real events, config."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
from aws_cdk import aws_s3 as s3
from moto.events.models import EventPattern

from infra.app import build_app
from infra.config import ConfigError, Removal, Stage, TrainctlConfig
from infra.packaging import REPO_ROOT
from tests.infra.conftest import PROD_CONTEXT

EVENTS = REPO_ROOT / "tests" / "events"


# --- cdk-nag ---------------------------------------------------------------------------


def test_nag_report_has_no_unacknowledged_findings(any_synth: Any) -> None:
    # The fixture's synth would already have raised ValidationFailed; the report says why not.
    report = json.loads((any_synth.outdir / "validation-report.json").read_text())
    violations = [v for r in report["pluginReports"] for v in r.get("violations", [])]
    assert violations == []


def test_a_new_finding_fails_the_synth(tmp_path: Path) -> None:
    # Proves cdk-nag is really wired in: one non-compliant bucket must stop synthesis.
    app, stack = build_app({}, outdir=str(tmp_path), cloudformation_validation=False)
    s3.Bucket(stack, "NonCompliant")
    with pytest.raises(RuntimeError, match="ValidationFailed"):
        app.synth()
    report = json.loads((tmp_path / "validation-report.json").read_text())
    rules = {v["ruleName"] for r in report["pluginReports"] for v in r["violations"]}
    assert {"AwsSolutions-S1", "AwsSolutions-S10"} <= rules


# --- cfn-lint --------------------------------------------------------------------------

# W3005: CDK adds DependsOn on a role's default policy next to a GetAtt of the role; the
# redundancy is CDK's, harmless, and not something the app can change.
CFN_LINT_IGNORED = "W3005"


def test_cfn_lint_is_clean(default_synth: Any, prod_synth: Any) -> None:
    templates = [str(s.outdir / "Trainctl.template.json") for s in (default_synth, prod_synth)]
    result = subprocess.run(
        [
            str(Path(sys.executable).parent / "cfn-lint"),
            "--ignore-checks",
            CFN_LINT_IGNORED,
            "--",
            *templates,
        ],
        capture_output=True,
        text=True,
        check=False,
    )
    assert result.returncode == 0, result.stdout + result.stderr


@pytest.mark.parametrize(
    ("region", "partition", "extra"),
    [
        # AWS FIS does not exist in the China regions: the game day is switched off there.
        ("cn-north-1", "aws-cn", {"trainctl:gameday": "false"}),
        ("us-gov-west-1", "aws-us-gov", {}),
    ],
)
def test_other_partitions_synthesize_nag_and_cfn_lint_clean(
    tmp_path: Path, region: str, partition: str, extra: dict[str, str]
) -> None:
    # cdk.json targets these partitions: the ARNs, the cdk-nag acknowledgements built from
    # them and the Powertools layer must all hold there too, not only in `aws`.
    # An existing VPC, as in the prod fixture: a new one would need an AZ lookup here.
    network = {k: v for k, v in PROD_CONTEXT.items() if k in ("trainctl:vpc_id", "trainctl:subnet_ids")}
    context = {"trainctl:account": "123456789012", "trainctl:region": region, **network, **extra}
    app, stack = build_app(context, outdir=str(tmp_path), cloudformation_validation=False)
    app.synth()  # raises ValidationFailed on any unacknowledged finding
    path = tmp_path / f"{stack.stack_name}.template.json"
    template = json.loads(path.read_text())
    # (The state machine definition is the ASL's; see the test below.)
    resources = dict(template["Resources"])
    del resources[_logical_id(template, "AWS::StepFunctions::StateMachine")]
    text = json.dumps({**template, "Resources": resources})
    assert f"arn:{partition}:" in text and "arn:aws:" not in text
    result = subprocess.run(
        [
            str(Path(sys.executable).parent / "cfn-lint"),
            "--regions",
            region,
            "--ignore-checks",
            CFN_LINT_IGNORED,
            "--",
            str(path),
        ],
        capture_output=True,
        text=True,
        check=False,
    )
    assert result.returncode == 0, result.stdout + result.stderr


def _logical_id(template: dict[str, Any], cfn_type: str) -> str:
    (found,) = [k for k, r in template["Resources"].items() if r["Type"] == cfn_type]
    return found


def test_resume_definition_uses_the_stacks_partition(tmp_path: Path) -> None:
    context = {"trainctl:account": "123456789012", "trainctl:region": "us-gov-west-1"}
    app, stack = build_app(context, outdir=str(tmp_path), cloudformation_validation=False)
    app.synth()
    template = json.loads((tmp_path / f"{stack.stack_name}.template.json").read_text())
    machine = template["Resources"][_logical_id(template, "AWS::StepFunctions::StateMachine")]
    definition = json.dumps(machine["Properties"]["DefinitionString"])
    # Step Functions refuses an integration ARN of another partition than the execution's
    # ("The resource belongs to a different partition"): they name the stack's partition.
    assert "arn:aws:" not in definition
    assert "arn:${Partition}:states:::" in definition
    partition = machine["Properties"]["DefinitionSubstitutions"]["Partition"]
    assert partition in ({"Ref": "AWS::Partition"}, "aws-us-gov")


# --- event patterns vs real events -----------------------------------------------------


def _deployed_patterns(synth: Any) -> dict[str, dict[str, Any]]:
    return {
        next(
            name
            for name in ("SpotInterruptionWarning", "RebalanceRecommendation", "InstanceStateChange")
            if name in k
        ): r["Properties"]["EventPattern"]
        for k, r in synth.resources("AWS::Events::Rule").items()
    }


def _event(name: str) -> dict[str, Any]:
    return dict(json.loads((EVENTS / f"{name}.json").read_text()))


def _matches(pattern: dict[str, Any], event: dict[str, Any]) -> bool:
    return bool(EventPattern.load(json.dumps(pattern)).matches_event(event))  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("event_name", "rule"),
    [
        ("spot_interruption_warning", "SpotInterruptionWarning"),
        ("rebalance_recommendation", "RebalanceRecommendation"),
        ("instance_state_shutting_down", "InstanceStateChange"),
        ("instance_state_terminated", "InstanceStateChange"),
    ],
)
def test_each_real_event_matches_exactly_its_rule(default_synth: Any, event_name: str, rule: str) -> None:
    matched = {
        name for name, p in _deployed_patterns(default_synth).items() if _matches(p, _event(event_name))
    }
    assert matched == {rule}


def _near_misses() -> list[tuple[str, dict[str, Any]]]:
    warning = _event("spot_interruption_warning")
    misses = [
        ("instance running (not a loss)", _event("instance_state_running")),
        ("other source", {**warning, "source": "aws.autoscaling"}),
        ("custom source", {**warning, "source": "trainctl.test"}),
        ("detail-type case", {**warning, "detail-type": warning["detail-type"].lower()}),
        ("spot fleet warning", {**warning, "detail-type": "EC2 Spot Fleet Instance Interruption Warning"}),
    ]
    for state in ("pending", "stopping", "stopped"):
        event = _event("instance_state_terminated")
        event["detail"] = {**event["detail"], "state": state}
        misses.append((f"state {state}", event))
    return misses


@pytest.mark.parametrize(("label", "event"), _near_misses(), ids=lambda v: v if isinstance(v, str) else "")
def test_near_misses_match_no_rule(default_synth: Any, label: str, event: dict[str, Any]) -> None:
    assert not [name for name, p in _deployed_patterns(default_synth).items() if _matches(p, event)], label


# --- configuration ---------------------------------------------------------------------


def test_config_defaults_are_env_agnostic_dev() -> None:
    config = TrainctlConfig.from_context({})
    assert config.account is None and config.region is None
    assert config.stage is Stage.DEV and config.vpc_id is None


def test_config_parses_cli_strings() -> None:
    config = TrainctlConfig.from_context(
        {
            "trainctl:subnet_ids": "subnet-0123456789abcdef0, subnet-0fedcba9876543210",
            "trainctl:vpc_id": "vpc-0123456789abcdef0",
            "trainctl:ecr_immutable_tags": "false",
            "trainctl:log_retention_days": "90",
            "trainctl:removal_policy": "retain",
            "trainctl:account": 123456789012,
            "trainctl:region": "us-west-2",
            "unrelated": "ignored",
        }
    )
    assert config.subnet_ids == ("subnet-0123456789abcdef0", "subnet-0fedcba9876543210")
    assert config.ecr_immutable_tags is False and config.log_retention_days == 90
    assert config.removal_policy is Removal.RETAIN and config.account == "123456789012"


def test_config_takes_a_powertools_layer_arn_and_the_gameday_switch() -> None:
    arn = "arn:aws-cn:lambda:cn-northwest-1:123456789012:layer:Powertools-python311-arm64:3"
    config = TrainctlConfig.from_context(
        {
            "trainctl:powertools_layer_arn": arn,
            "trainctl:gameday": "false",
            "trainctl:account": "123456789012",
            "trainctl:region": "cn-northwest-1",
        }
    )
    assert config.powertools_layer_arn == arn and config.gameday is False
    assert TrainctlConfig.from_context({}).gameday is True


@pytest.mark.parametrize(
    ("context", "message"),
    [
        (
            {"trainctl:powertools_layer_arn": "AWSLambdaPowertoolsPythonV3:27"},
            "trainctl:powertools_layer_arn",
        ),
        (
            {
                "trainctl:powertools_layer_arn": "arn:aws:lambda:eu-west-1:017000801446:layer:P:27",
                "trainctl:powertools_layer_version": "27",
            },
            "not both",
        ),
        (
            {
                "trainctl:powertools_layer_arn": "arn:aws:lambda:eu-west-1:017000801446:layer:P:27",
                "trainctl:account": "123456789012",
                "trainctl:region": "us-east-1",
            },
            "function's region",
        ),
        ({"trainctl:stage": "staging"}, "trainctl:stage"),
        ({"trainctl:alert_email": "not-an-email"}, "trainctl:alert_email"),
        ({"trainctl:log_retention_days": "31"}, "trainctl:log_retention_days"),
        ({"trainctl:allowed_instance_types": "g5.xlarge,GPU!"}, "trainctl:allowed_instance_types"),
        ({"trainctl:vpc_id": "vpc-0123456789abcdef0"}, "vpc_id and subnet_ids go together"),
        ({"trainctl:subnet_ids": "subnet-nothex"}, "trainctl:subnet_ids"),
        ({"trainctl:account": "123456789012"}, "account and region go together"),
        ({"trainctl:alertEmail": "ops@example.com"}, "trainctl:alertEmail"),  # typo'd key
    ],
)
def test_config_errors_name_the_key(context: dict[str, Any], message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        TrainctlConfig.from_context(context)


# --- the pinned CLI --------------------------------------------------------------------


@pytest.mark.slow
@pytest.mark.skipif(not (REPO_ROOT / "node_modules" / ".bin" / "cdk").exists(), reason="run `npm ci` first")
def test_pinned_cli_synthesizes_offline(tmp_path: Path) -> None:
    # What `make synth` runs, minus CDK's built-in validation (covered above by cfn-lint).
    env = {
        **os.environ,
        "CDK_DISABLE_VERSION_CHECK": "1",
        "CDK_VALIDATION": "false",
        "JSII_SILENCE_WARNING_END_OF_LIFE_NODE_VERSION": "20",
    }
    for name in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN", "AWS_SECURITY_TOKEN"):
        env.pop(name, None)  # prove no credentials are needed
    result = subprocess.run(
        [
            str(REPO_ROOT / "node_modules" / ".bin" / "cdk"),
            "synth",
            "--app",
            f"{sys.executable} -m infra.app",
            "--output",
            str(tmp_path),
            "--quiet",
        ],
        cwd=REPO_ROOT,
        env=env,
        capture_output=True,
        text=True,
        check=False,
        timeout=180,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert (tmp_path / "Trainctl.template.json").is_file()
    assert shutil.which("node")


# --- the idle cost the docs state ------------------------------------------------------

_NUMBERS = {"one": 1, "two": 2, "three": 3, "four": 4, "five": 5, "six": 6, "seven": 7, "eight": 8}


def _count(pattern: str, text: str) -> int:
    found = re.search(pattern, text)
    assert found, pattern
    word = found.group(1)
    return int(word) if word.isdigit() else _NUMBERS[word.lower()]


def test_docs_count_the_resources_that_bill_at_idle(default_synth: Any) -> None:
    # What costs money while nothing runs: customer KMS keys, alarms, dashboards. The
    # deploy guide and the README must count what the stack really creates.
    counts = {t: len(default_synth.resources(t)) for t in ("AWS::KMS::Key", "AWS::CloudWatch::Alarm")}
    composite = len(default_synth.resources("AWS::CloudWatch::CompositeAlarm"))
    dashboards = len(default_synth.resources("AWS::CloudWatch::Dashboard"))
    deploy = (REPO_ROOT / "docs" / "DEPLOY.md").read_text()
    assert _count(r"\| (\d+) KMS customer keys?", deploy) == counts["AWS::KMS::Key"]
    assert _count(r"\| (\d+) metric alarms", deploy) == counts["AWS::CloudWatch::Alarm"]
    assert _count(r"\+ (\d+) composite alarms?", deploy) == composite
    assert _count(r"\| (\d+) dashboards?", deploy) == dashboards
    readme = " ".join((REPO_ROOT / "README.md").read_text().split())
    assert (
        _count(r"idle it costs about \$\d+ a month\*\*: (\w+) KMS keys?", readme) == counts["AWS::KMS::Key"]
    )
    assert _count(r"(\w+) alarms and a composite one", readme) == counts["AWS::CloudWatch::Alarm"]
    # $1 per key, $0.10 per metric alarm, $0.50 per composite alarm (us-east-1 list prices)
    monthly = counts["AWS::KMS::Key"] * 1.0 + counts["AWS::CloudWatch::Alarm"] * 0.10 + composite * 0.50
    assert f"about ${round(monthly)} a month" in readme
    assert f"about ${round(monthly)} a month" in " ".join(deploy.split())


# --- the test session ------------------------------------------------------------------


def test_infra_tests_share_one_xdist_group_and_nothing_else_joins_it(request: pytest.FixtureRequest) -> None:
    # `make test` (-n 2 --dist loadgroup) sends a group to one worker: every infra test in
    # it means the session fixtures synthesize once, and no other tier is serialised.
    here = Path(__file__).parent
    for item in request.session.items:
        groups = [m.args for m in item.iter_markers("xdist_group")]
        if here in Path(str(item.fspath)).parents:
            assert groups == [("infra",)], item.nodeid
        else:
            assert ("infra",) not in groups, item.nodeid
    assert request.node.get_closest_marker("xdist_group") is not None


def test_a_second_worker_reuses_the_synth_instead_of_repeating_it(
    default_synth: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    import tests.infra.conftest as infra_conftest

    # Given the run's synth already done (by this worker or another)
    def no_second_synth(*args: Any, **kwargs: Any) -> Any:
        raise AssertionError("synthesized again")

    monkeypatch.setattr(infra_conftest, "build_app", no_second_synth)
    # When another worker asks for the same configuration, it reads the same output
    again = infra_conftest._synth("default", {}, default_synth.outdir.parent)
    assert again.outdir == default_synth.outdir
    assert again.json == default_synth.json
