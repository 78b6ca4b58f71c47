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


@pytest.mark.parametrize(
    ("context", "message"),
    [
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
