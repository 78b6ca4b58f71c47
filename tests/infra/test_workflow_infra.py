"""The resume workflow's deployment around its ASL: execution logs, their key, tracing.

(The ASL itself and the role's task grants are tests/workflow's.) Execution data holds
task tokens, so the logs must be complete (ALL, with data) and under the stack's own key,
which CloudWatch Logs may use for this account's log groups only.
"""

from __future__ import annotations

from typing import Any

from tests.infra.conftest import render


def _machine(synth: Any) -> dict[str, Any]:
    props: dict[str, Any] = synth.one("AWS::StepFunctions::StateMachine")["Properties"]
    return props


def test_executions_log_everything_with_their_data_to_the_workflow_log_group(any_synth: Any) -> None:
    group = any_synth.logical_id("ResumeLogs", "AWS::Logs::LogGroup")
    assert _machine(any_synth)["LoggingConfiguration"] == {
        "Destinations": [{"CloudWatchLogsLogGroup": {"LogGroupArn": {"Fn::GetAtt": [group, "Arn"]}}}],
        "IncludeExecutionData": True,
        "Level": "ALL",
    }
    assert _machine(any_synth)["TracingConfiguration"] == {"Enabled": True}


def test_workflow_log_group_is_encrypted_with_its_own_rotated_key(any_synth: Any) -> None:
    group = any_synth.resources("AWS::Logs::LogGroup")[
        any_synth.logical_id("ResumeLogs", "AWS::Logs::LogGroup")
    ]
    key_id = any_synth.logical_id("ResumeLogsKey", "AWS::KMS::Key")
    assert group["Properties"]["KmsKeyId"] == {"Fn::GetAtt": [key_id, "Arn"]}
    key = any_synth.resources("AWS::KMS::Key")[key_id]
    assert key["Properties"]["EnableKeyRotation"] is True
    # The key goes (or stays) with the log group it protects.
    assert key["DeletionPolicy"] == group["DeletionPolicy"]


def test_logs_key_policy_lets_cloudwatch_logs_use_it_for_this_accounts_log_groups_only(
    any_synth: Any,
) -> None:
    key_id = any_synth.logical_id("ResumeLogsKey", "AWS::KMS::Key")
    policy = render(any_synth.resources("AWS::KMS::Key")[key_id]["Properties"]["KeyPolicy"])
    assert policy == {
        "Version": "2012-10-17",
        "Statement": [
            # CDK's default: the account administers the key through IAM.
            {
                "Effect": "Allow",
                "Principal": {"AWS": f"arn:{any_synth.partition}:iam::{any_synth.account}:root"},
                "Action": "kms:*",
                "Resource": "*",
            },
            # CloudWatch Logs of this region, and only for log groups of this account and
            # region (the encryption context names the log group).
            {
                "Effect": "Allow",
                "Principal": {"Service": f"logs.{any_synth.region}.amazonaws.com"},
                "Action": [
                    "kms:Decrypt",
                    "kms:DescribeKey",
                    "kms:Encrypt",
                    "kms:GenerateDataKey",
                    "kms:GenerateDataKeyWithoutPlaintext",
                    "kms:ReEncryptFrom",
                    "kms:ReEncryptTo",
                ],
                "Resource": "*",
                "Condition": {
                    "ArnLike": {"kms:EncryptionContext:aws:logs:arn": any_synth.arn("logs", "log-group:*")}
                },
            },
        ],
    }
