"""Storage and instance resources, read from the synthesized template."""

from __future__ import annotations

import json
from typing import Any

from aws_cdk.assertions import Match

from infra.stack import (
    OUTPUT_AGENT_LOG_GROUP,
    OUTPUT_ALERTS_TOPIC,
    OUTPUT_CHECKPOINT_BUCKET,
    OUTPUT_CHECKPOINT_DOCUMENT,
    OUTPUT_FIS_TEMPLATE,
    OUTPUT_JOBS_TABLE,
    OUTPUT_LAUNCH_TEMPLATE,
    OUTPUT_REPOSITORY_URI,
    OUTPUT_STATE_MACHINE,
)
from trainctl import runtime_env
from trainctl_core.settings import (
    IDEMPOTENCY_PARTITION_KEY,
    IDEMPOTENCY_TTL_ATTRIBUTE,
    JOBS_BY_INSTANCE_INDEX,
    JOBS_INSTANCE_ATTRIBUTE,
    JOBS_PARTITION_KEY,
    SSM_PARAM_DEADLINE,
    SSM_PARAM_JOB_ID,
    TAG_MANAGED,
)


def _statements(synth: Any, policy_logical_id_fragment: str) -> list[dict[str, Any]]:
    policies = {
        k: v for k, v in synth.resources("AWS::IAM::Policy").items() if policy_logical_id_fragment in k
    }
    assert policies, f"no policy matching {policy_logical_id_fragment}"
    return [s for p in policies.values() for s in p["Properties"]["PolicyDocument"]["Statement"]]


def _by_sid(statements: list[dict[str, Any]], sid: str) -> dict[str, Any]:
    found = [s for s in statements if s.get("Sid") == sid]
    assert len(found) == 1, f"{sid}: {found}"
    return found[0]


# --- storage ---------------------------------------------------------------------------


def test_jobs_table_schema_matches_core_settings(any_synth: Any) -> None:
    any_synth.template.has_resource_properties(
        "AWS::DynamoDB::Table",
        {
            "KeySchema": [{"AttributeName": JOBS_PARTITION_KEY, "KeyType": "HASH"}],
            "BillingMode": "PAY_PER_REQUEST",
            "PointInTimeRecoverySpecification": {"PointInTimeRecoveryEnabled": True},
            "SSESpecification": {"SSEEnabled": True},
            "GlobalSecondaryIndexes": [
                Match.object_like(
                    {
                        "IndexName": JOBS_BY_INSTANCE_INDEX,
                        "KeySchema": [{"AttributeName": JOBS_INSTANCE_ATTRIBUTE, "KeyType": "HASH"}],
                    }
                )
            ],
        },
    )


def test_idempotency_table_expires_records(any_synth: Any) -> None:
    any_synth.template.has_resource_properties(
        "AWS::DynamoDB::Table",
        {
            "KeySchema": [{"AttributeName": IDEMPOTENCY_PARTITION_KEY, "KeyType": "HASH"}],
            "TimeToLiveSpecification": {"AttributeName": IDEMPOTENCY_TTL_ATTRIBUTE, "Enabled": True},
        },
    )


def test_checkpoint_bucket_is_private_versioned_and_expires_junk(default_synth: Any) -> None:
    bucket = default_synth.resources("AWS::S3::Bucket")[
        default_synth.logical_id("CheckpointBucket", "AWS::S3::Bucket")
    ]["Properties"]
    assert bucket["PublicAccessBlockConfiguration"] == {
        "BlockPublicAcls": True,
        "BlockPublicPolicy": True,
        "IgnorePublicAcls": True,
        "RestrictPublicBuckets": True,
    }
    assert bucket["VersioningConfiguration"] == {"Status": "Enabled"}
    assert bucket["BucketEncryption"]["ServerSideEncryptionConfiguration"][0][
        "ServerSideEncryptionByDefault"
    ] == {"SSEAlgorithm": "AES256"}
    rules = {r["Id"]: r for r in bucket["LifecycleConfiguration"]["Rules"]}
    assert rules["abort-incomplete-uploads"]["AbortIncompleteMultipartUpload"] == {"DaysAfterInitiation": 1}
    assert rules["expire-old-checkpoints"]["ExpirationInDays"] == 30
    assert rules["expire-noncurrent-versions"]["NoncurrentVersionExpiration"] == {"NoncurrentDays": 7}
    assert "LoggingConfiguration" in bucket


def test_buckets_deny_plain_http(any_synth: Any) -> None:
    policies = any_synth.resources("AWS::S3::BucketPolicy")
    assert len(policies) == len(any_synth.resources("AWS::S3::Bucket")) == 2
    for policy in policies.values():
        assert any(
            s["Effect"] == "Deny" and s["Condition"] == {"Bool": {"aws:SecureTransport": "false"}}
            for s in policy["Properties"]["PolicyDocument"]["Statement"]
        )


def test_ecr_repository_scans_and_has_lifecycle(any_synth: Any) -> None:
    repo = any_synth.one("AWS::ECR::Repository")["Properties"]
    assert repo["ImageScanningConfiguration"] == {"ScanOnPush": True}
    assert repo["ImageTagMutability"] == "IMMUTABLE"
    assert len(repo["LifecyclePolicy"]["LifecyclePolicyText"]) > 0


def test_stage_drives_removal_policy(default_synth: Any, prod_synth: Any) -> None:
    # dev deletes what it created; prod keeps data and protects the jobs table.
    def policies(synth: Any, cfn_type: str) -> set[str]:
        return {r.get("DeletionPolicy", "Delete") for r in synth.resources(cfn_type).values()}

    assert policies(default_synth, "AWS::S3::Bucket") == {"Delete"}
    assert policies(prod_synth, "AWS::S3::Bucket") == {"Retain"}
    jobs = prod_synth.resources("AWS::DynamoDB::Table")[
        prod_synth.logical_id("JobsTable", "AWS::DynamoDB::Table")
    ]
    assert jobs["DeletionPolicy"] == "Retain"
    assert jobs["Properties"]["DeletionProtectionEnabled"] is True


# --- instances -------------------------------------------------------------------------


def test_launch_template_is_hardened(any_synth: Any) -> None:
    data = any_synth.one("AWS::EC2::LaunchTemplate")["Properties"]["LaunchTemplateData"]
    assert data["MetadataOptions"] == {
        "HttpTokens": "required",
        "HttpPutResponseHopLimit": 2,
        "InstanceMetadataTags": "enabled",
    }
    (device,) = data["BlockDeviceMappings"]
    assert device["Ebs"]["Encrypted"] is True and device["Ebs"]["VolumeType"] == "gp3"
    assert "IamInstanceProfile" in data and "SecurityGroupIds" in data
    # Pools (instance type x subnet) are chosen per launch by the workflow.
    assert "InstanceType" not in data and "InstanceMarketOptions" not in data


def test_user_data_installs_and_starts_the_agent(any_synth: Any) -> None:
    data = any_synth.one("AWS::EC2::LaunchTemplate")["Properties"]["LaunchTemplateData"]
    script = "".join(
        p if isinstance(p, str) else "<token>" for p in data["UserData"]["Fn::Base64"]["Fn::Join"][1]
    )
    assert "aws s3 cp" in script  # agent source from its CDK asset
    assert "pip install --quiet /opt/trainctl/src" in script
    assert "ExecStart=/usr/local/bin/trainctl agent" in script
    assert "systemctl enable --now trainctl-agent.service" in script


def test_security_group_has_no_ingress(any_synth: Any) -> None:
    sg = any_synth.one("AWS::EC2::SecurityGroup")["Properties"]
    assert "SecurityGroupIngress" not in sg
    assert not any_synth.resources("AWS::EC2::SecurityGroupIngress")


def test_checkpoint_document_takes_job_id_and_deadline(any_synth: Any) -> None:
    doc = any_synth.one("AWS::SSM::Document")["Properties"]
    assert doc["DocumentType"] == "Command"
    content = doc["Content"]
    assert set(content["parameters"]) == {SSM_PARAM_JOB_ID, SSM_PARAM_DEADLINE}
    assert all("allowedPattern" in p for p in content["parameters"].values())
    (step,) = content["mainSteps"]
    assert step["inputs"]["runCommand"] == [
        f"/usr/local/bin/trainctl checkpoint-now --job-id {{{{{SSM_PARAM_JOB_ID}}}}} "
        f"--deadline {{{{{SSM_PARAM_DEADLINE}}}}}"
    ]


def test_new_vpc_only_without_context_ids(default_synth: Any, prod_synth: Any) -> None:
    vpc = default_synth.one("AWS::EC2::VPC")
    assert vpc
    assert not default_synth.resources("AWS::EC2::NatGateway")  # ~$0 at idle
    assert len(default_synth.resources("AWS::EC2::VPCEndpoint")) == 2  # S3 + DynamoDB gateways
    assert default_synth.resources("AWS::EC2::FlowLog")
    assert not prod_synth.resources("AWS::EC2::VPC")
    assert (
        prod_synth.json["Outputs"]["SubnetIds"]["Value"]
        == "subnet-0123456789abcdef0,subnet-0fedcba9876543210"
    )


def test_instance_role_least_privilege(any_synth: Any) -> None:
    role = any_synth.resources("AWS::IAM::Role")[any_synth.logical_id("InstanceRole", "AWS::IAM::Role")]
    managed = role["Properties"]["ManagedPolicyArns"]
    assert len(managed) == 1 and "AmazonSSMManagedInstanceCore" in str(managed[0])
    statements = _statements(any_synth, "InstancesInstanceRoleDefaultPolicy")
    objects = _by_sid(statements, "CheckpointObjects")
    assert objects["Resource"]["Fn::Join"][1][-1] == "/*/ckpt/*"
    rows = _by_sid(statements, "UpdateJobRowsOnly")
    assert sorted(rows["Action"]) == ["dynamodb:GetItem", "dynamodb:UpdateItem"]
    assert rows["Condition"] == {"ForAllValues:StringLike": {"dynamodb:LeadingKeys": ["JOB#*"]}}
    agent = _by_sid(statements, "ReadAgentSource")
    assert agent["Action"] == "s3:GetObject" and "*" not in str(agent["Resource"])
    pull = [s for s in statements if "ecr:BatchGetImage" in s["Action"]]
    assert pull and "*" not in str(pull[0]["Resource"])


def test_handshake_permissions_are_a_separate_policy(any_synth: Any) -> None:
    # On the role's default policy it would close a cycle through the launch template.
    (statement,) = _statements(any_synth, "TaskResponsePolicy")
    assert sorted(statement["Action"]) == [
        "states:SendTaskFailure",
        "states:SendTaskHeartbeat",
        "states:SendTaskSuccess",
    ]
    assert statement["Resource"] == {
        "Ref": any_synth.logical_id("ResumeStateMachine", "AWS::StepFunctions::StateMachine")
    }


def test_workflow_may_launch_only_from_our_template(prod_synth: Any) -> None:
    statements = _statements(prod_synth, "ResumeStateMachineRoleDefaultPolicy")
    template_id = prod_synth.logical_id("LaunchTemplate", "AWS::EC2::LaunchTemplate")
    run = _by_sid(statements, "RunTaggedInstancesFromTemplate")
    assert run["Action"] == "ec2:RunInstances"
    assert run["Condition"]["StringEquals"] == {
        "ec2:InstanceType": ["g5.xlarge", "p4d.24xlarge"],
        f"aws:RequestTag/{TAG_MANAGED}": "true",
    }
    assert template_id in str(run["Condition"]["ArnEquals"]["ec2:LaunchTemplate"])
    # IAM allows the union of statements: a second RunInstances grant on instances without
    # the type/tag conditions would silently widen the one above.
    instance_grants = [
        s
        for s in statements
        if "ec2:RunInstances" in _as_list(s["Action"]) and ":instance/" in json.dumps(s["Resource"])
    ]
    assert instance_grants == [run]
    others = _by_sid(statements, "RunInstancesResourcesViaTemplate")
    assert template_id in str(others["Condition"]["ArnEquals"]["ec2:LaunchTemplate"])
    tags = _by_sid(statements, "TagOnLaunchOnly")
    assert tags["Condition"] == {"StringEquals": {"ec2:CreateAction": "RunInstances"}}
    passrole = _by_sid(statements, "PassInstanceRoleToEc2")
    assert passrole["Condition"] == {"StringEquals": {"iam:PassedToService": "ec2.amazonaws.com"}}
    assert passrole["Resource"] == {
        "Fn::GetAtt": [prod_synth.logical_id("InstanceRole", "AWS::IAM::Role"), "Arn"]
    }


def test_outputs_for_the_cli(any_synth: Any) -> None:
    outputs = any_synth.json["Outputs"]
    for name in (
        OUTPUT_JOBS_TABLE,
        OUTPUT_CHECKPOINT_BUCKET,
        OUTPUT_STATE_MACHINE,
        OUTPUT_ALERTS_TOPIC,
        OUTPUT_REPOSITORY_URI,
        OUTPUT_LAUNCH_TEMPLATE,
        OUTPUT_CHECKPOINT_DOCUMENT,
        OUTPUT_FIS_TEMPLATE,
    ):
        assert name in outputs
        assert "Export" not in outputs[name]  # no cross-stack coupling


def _as_list(value: Any) -> list[Any]:
    return value if isinstance(value, list) else [value]


# --- agent logs ------------------------------------------------------------------------


def _agent_log_group(synth: Any) -> tuple[str, dict[str, Any]]:
    logical_id = synth.logical_id("AgentLogs", "AWS::Logs::LogGroup")
    return logical_id, synth.resources("AWS::Logs::LogGroup")[logical_id]


def test_agent_log_group_is_named_for_the_cli_with_retention_and_removal(
    default_synth: Any, prod_synth: Any
) -> None:
    from trainctl.commands.stack import default_agent_log_group

    for synth, removal in ((default_synth, "Delete"), (prod_synth, "Retain")):
        _, group = _agent_log_group(synth)
        # The name `trainctl logs` falls back to when the stack has no AgentLogGroupName output.
        assert group["Properties"]["LogGroupName"] == default_agent_log_group("Trainctl")
        assert group["Properties"]["RetentionInDays"] == 30
        assert group["DeletionPolicy"] == removal and group["UpdateReplacePolicy"] == removal


def test_agent_log_group_output_names_the_group(any_synth: Any) -> None:
    logical_id, _ = _agent_log_group(any_synth)
    output = any_synth.json["Outputs"][OUTPUT_AGENT_LOG_GROUP]
    assert output["Value"] == {"Ref": logical_id}
    assert "Export" not in output
    # The CLI reads the output under the name it defines itself.
    from trainctl.commands.stack import OUTPUT_AGENT_LOG_GROUP as CLI_OUTPUT

    assert CLI_OUTPUT == OUTPUT_AGENT_LOG_GROUP


def test_instance_role_may_only_ship_to_the_agent_log_group(any_synth: Any) -> None:
    logical_id, _ = _agent_log_group(any_synth)
    statements = _statements(any_synth, "InstancesInstanceRoleDefaultPolicy")
    logs_statements = [s for s in statements if any(a.startswith("logs:") for a in _as_list(s["Action"]))]
    create = _by_sid(statements, "CreateAgentLogStreams")
    put = _by_sid(statements, "ShipAgentLogs")
    # Exactly these two, nothing else on CloudWatch Logs (no CreateLogGroup, no `logs:*`).
    assert logs_statements == [create, put]
    assert create["Action"] == "logs:CreateLogStream"
    assert create["Resource"] == {"Fn::GetAtt": [logical_id, "Arn"]}
    assert put["Action"] == "logs:PutLogEvents"
    parts = put["Resource"]["Fn::Join"][1]
    assert {"Ref": logical_id} in parts and parts[-1] == ":log-stream:*"
    assert any(":logs:" in p for p in parts if isinstance(p, str))
    assert "Condition" not in create and "Condition" not in put


def test_user_data_hands_the_agent_its_log_group(any_synth: Any) -> None:
    logical_id, _ = _agent_log_group(any_synth)
    data = any_synth.one("AWS::EC2::LaunchTemplate")["Properties"]["LaunchTemplateData"]
    parts = data["UserData"]["Fn::Base64"]["Fn::Join"][1]
    index = parts.index({"Ref": logical_id})
    assert parts[index - 1].endswith(f"\n{runtime_env.AGENT_LOG_GROUP}=")
    assert parts[index + 1].startswith("\n")
