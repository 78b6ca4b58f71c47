"""Storage and instance resources, read from the synthesized template."""

from __future__ import annotations

import fnmatch
import json
import re
import shutil
import subprocess
import sys
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
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
from tests.infra.conftest import PROD_CONTEXT, as_list, normalised_statements, policy_statements, render
from trainctl import runtime_env
from trainctl_core.settings import (
    CHECKPOINT_MODES,
    IDEMPOTENCY_PARTITION_KEY,
    IDEMPOTENCY_TTL_ATTRIBUTE,
    JOBS_BY_INSTANCE_INDEX,
    JOBS_BY_INTERRUPTED_INSTANCE_INDEX,
    JOBS_PARTITION_KEY,
    SSM_PARAM_DEADLINE,
    SSM_PARAM_JOB_ID,
    SSM_PARAM_MODE,
    TAG_JOB_ID,
    TAG_MANAGED,
)
from trainctl_core.tables import jobs_table_request

PROD_SUBNETS = tuple(PROD_CONTEXT["trainctl:subnet_ids"].split(","))


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
    # The tables tests and benchmarks create in moto (trainctl_core.tables) are the
    # deployed ones: same keys, same lookup indexes, keys-only projections.
    request = jobs_table_request("unused")
    any_synth.template.has_resource_properties(
        "AWS::DynamoDB::Table",
        {
            "KeySchema": request["KeySchema"],
            "AttributeDefinitions": Match.array_equals(request["AttributeDefinitions"]),
            "BillingMode": "PAY_PER_REQUEST",
            "PointInTimeRecoverySpecification": {"PointInTimeRecoveryEnabled": True},
            "SSESpecification": {"SSEEnabled": True},
            # Keys only: the store re-reads the row consistently after the index hit,
            # and ALL would copy every heartbeat write of the row into the indexes.
            "GlobalSecondaryIndexes": Match.array_equals(request["GlobalSecondaryIndexes"]),
        },
    )
    assert {i["IndexName"] for i in request["GlobalSecondaryIndexes"]} == {
        JOBS_BY_INSTANCE_INDEX,
        JOBS_BY_INTERRUPTED_INSTANCE_INDEX,
    }
    assert all(i["Projection"] == {"ProjectionType": "KEYS_ONLY"} for i in request["GlobalSecondaryIndexes"])


def test_idempotency_table_expires_records(any_synth: Any) -> None:
    # Powertools' schema (string key `id`, TTL on `expiration`), billed per request, backed
    # up and encrypted like the jobs table; always deleted with the stack (short-lived).
    table = any_synth.resources("AWS::DynamoDB::Table")[
        any_synth.logical_id("IdempotencyTable", "AWS::DynamoDB::Table")
    ]
    assert table["Properties"] == {
        "KeySchema": [{"AttributeName": IDEMPOTENCY_PARTITION_KEY, "KeyType": "HASH"}],
        "AttributeDefinitions": [{"AttributeName": IDEMPOTENCY_PARTITION_KEY, "AttributeType": "S"}],
        "TimeToLiveSpecification": {"AttributeName": IDEMPOTENCY_TTL_ATTRIBUTE, "Enabled": True},
        "BillingMode": "PAY_PER_REQUEST",
        "PointInTimeRecoverySpecification": {"PointInTimeRecoveryEnabled": True},
        "SSESpecification": {"SSEEnabled": True},
        "Tags": [{"Key": "project", "Value": "trainctl"}],
    }
    assert table["DeletionPolicy"] == "Delete"


def _checkpoint_bucket(synth: Any) -> dict[str, Any]:
    return dict(
        synth.resources("AWS::S3::Bucket")[synth.logical_id("CheckpointBucket", "AWS::S3::Bucket")][
            "Properties"
        ]
    )


def test_checkpoint_bucket_is_private_versioned_and_expires_junk(default_synth: Any) -> None:
    bucket = _checkpoint_bucket(default_synth)
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
    assert rules == {
        "abort-incomplete-uploads": {
            "Id": "abort-incomplete-uploads",
            "AbortIncompleteMultipartUpload": {"DaysAfterInitiation": 1},
            "Status": "Enabled",
        },
        "expire-noncurrent-versions": {
            "Id": "expire-noncurrent-versions",
            "NoncurrentVersionExpiration": {"NoncurrentDays": 7},
            "ExpiredObjectDeleteMarker": True,
            "Status": "Enabled",
        },
    }
    assert "LoggingConfiguration" in bucket


def test_current_checkpoints_never_expire_by_age_by_default(any_synth: Any) -> None:
    # A paused job's newest checkpoint can be the oldest object in the bucket, and an age
    # rule deletes a checkpoint's files before its (younger) manifest: retention belongs
    # to the Checkpointer (keep N), so no rule may expire current objects by default.
    for rule in _checkpoint_bucket(any_synth)["LifecycleConfiguration"]["Rules"]:
        assert not {"ExpirationInDays", "ExpirationDate"} & set(rule), rule


def test_checkpoint_expiry_by_age_is_opt_in() -> None:
    from aws_cdk import App, Stack
    from aws_cdk.assertions import Template

    from infra.app import cdk_json_context
    from infra.config import TrainctlConfig
    from infra.constructs.storage import Storage

    # Given a deployment that asks for it explicitly (the storage construct alone is enough)
    stack = Stack(App(context=cdk_json_context()), "OptIn")
    Storage(stack, "Storage", config=TrainctlConfig.from_context({"trainctl:checkpoint_expiry_days": 45}))
    # Then current checkpoints expire after that many days, on top of the junk rules
    (bucket,) = [
        b["Properties"]
        for b in Template.from_stack(stack).to_json()["Resources"].values()
        if b["Type"] == "AWS::S3::Bucket" and "VersioningConfiguration" in b["Properties"]
    ]
    rules = {r["Id"]: r for r in bucket["LifecycleConfiguration"]["Rules"]}
    assert rules["expire-old-checkpoints"]["ExpirationInDays"] == 45
    assert {"abort-incomplete-uploads", "expire-noncurrent-versions"} < set(rules)


def test_buckets_deny_plain_http(any_synth: Any) -> None:
    # The whole TLS statement, as the first of each bucket's policy: a narrower action, a
    # principal other than everyone, or the objects left out would all let plain HTTP in.
    buckets = any_synth.resources("AWS::S3::Bucket")
    policies = any_synth.resources("AWS::S3::BucketPolicy")
    assert len(policies) == len(buckets) == 2
    covered = set()
    for policy in policies.values():
        (bucket,) = [k for k in buckets if policy["Properties"]["Bucket"] == {"Ref": k}]
        covered.add(bucket)
        statements = policy["Properties"]["PolicyDocument"]["Statement"]
        assert render(statements[0]) == {
            "Effect": "Deny",
            "Principal": {"AWS": "*"},
            "Action": "s3:*",
            "Resource": [f"${{{bucket}.Arn}}", f"${{{bucket}.Arn}}/*"],
            "Condition": {"Bool": {"aws:SecureTransport": "false"}},
        }
        # Nothing else in a bucket policy may allow anyone but S3's own log delivery.
        for other in statements[1:]:
            assert other["Effect"] == "Allow" and other["Principal"] == {
                "Service": "logging.s3.amazonaws.com"
            }
    assert covered == set(buckets)


def test_access_log_delivery_is_limited_to_the_checkpoint_bucket(any_synth: Any) -> None:
    logs_bucket = any_synth.logical_id("AccessLogsBucket", "AWS::S3::Bucket")
    checkpoints = any_synth.logical_id("CheckpointBucket", "AWS::S3::Bucket")
    (policy,) = [
        p
        for p in any_synth.resources("AWS::S3::BucketPolicy").values()
        if p["Properties"]["Bucket"] == {"Ref": logs_bucket}
    ]
    delivery = render(policy["Properties"]["PolicyDocument"]["Statement"][1:])
    assert delivery == [
        {
            "Effect": "Allow",
            "Principal": {"Service": "logging.s3.amazonaws.com"},
            "Action": "s3:PutObject",
            "Resource": f"${{{logs_bucket}.Arn}}/checkpoint-bucket/*",
            "Condition": {
                "ArnLike": {"aws:SourceArn": f"${{{checkpoints}.Arn}}"},
                "StringEquals": {"aws:SourceAccount": any_synth.account},
            },
        }
    ]


def test_access_log_bucket_is_private_encrypted_and_expires_logs(any_synth: Any) -> None:
    logs_bucket = any_synth.logical_id("AccessLogsBucket", "AWS::S3::Bucket")
    bucket = any_synth.resources("AWS::S3::Bucket")[logs_bucket]["Properties"]
    assert bucket["PublicAccessBlockConfiguration"] == {
        "BlockPublicAcls": True,
        "BlockPublicPolicy": True,
        "IgnorePublicAcls": True,
        "RestrictPublicBuckets": True,
    }
    # SSE-S3: server access logging delivers to SSE-S3 buckets only.
    assert bucket["BucketEncryption"] == {
        "ServerSideEncryptionConfiguration": [{"ServerSideEncryptionByDefault": {"SSEAlgorithm": "AES256"}}]
    }
    assert bucket["OwnershipControls"] == {"Rules": [{"ObjectOwnership": "BucketOwnerEnforced"}]}
    assert bucket["LifecycleConfiguration"] == {
        "Rules": [{"Id": "expire-access-logs", "ExpirationInDays": 90, "Status": "Enabled"}]
    }
    # And the checkpoint bucket logs into it, under its own prefix.
    assert _checkpoint_bucket(any_synth)["LoggingConfiguration"] == {
        "DestinationBucketName": {"Ref": logs_bucket},
        "LogFilePrefix": "checkpoint-bucket/",
    }


def _ecr_rules(max_images: int) -> list[dict[str, Any]]:
    return [
        {
            "rulePriority": 1,
            "description": "Drop untagged layers after a day",
            "selection": {
                "tagStatus": "untagged",
                "countType": "sinceImagePushed",
                "countNumber": 1,
                "countUnit": "days",
            },
            "action": {"type": "expire"},
        },
        {
            "rulePriority": 2,
            "description": "Keep the newest images only",
            "selection": {"tagStatus": "any", "countType": "imageCountMoreThan", "countNumber": max_images},
            "action": {"type": "expire"},
        },
    ]


def test_ecr_repository_scans_and_has_lifecycle(any_synth: Any) -> None:
    repo = any_synth.one("AWS::ECR::Repository")["Properties"]
    assert repo["ImageScanningConfiguration"] == {"ScanOnPush": True}
    assert repo["ImageTagMutability"] == "IMMUTABLE"
    assert json.loads(repo["LifecyclePolicy"]["LifecyclePolicyText"]) == {"rules": _ecr_rules(20)}


@pytest.mark.parametrize(
    ("immutable", "max_images", "mutability"), [("true", "5", "IMMUTABLE"), ("false", "300", "MUTABLE")]
)
def test_ecr_tag_mutability_and_image_count_follow_the_config(
    immutable: str, max_images: str, mutability: str
) -> None:
    from aws_cdk import App, Stack
    from aws_cdk.assertions import Template

    from infra.app import cdk_json_context
    from infra.config import TrainctlConfig
    from infra.constructs.storage import Storage

    config = TrainctlConfig.from_context(
        {"trainctl:ecr_immutable_tags": immutable, "trainctl:ecr_max_images": max_images}
    )
    stack = Stack(App(context=cdk_json_context()), "Images")
    Storage(stack, "Storage", config=config)
    (repo,) = [
        r["Properties"]
        for r in Template.from_stack(stack).to_json()["Resources"].values()
        if r["Type"] == "AWS::ECR::Repository"
    ]
    assert repo["ImageTagMutability"] == mutability
    assert json.loads(repo["LifecyclePolicy"]["LifecyclePolicyText"]) == {
        "rules": _ecr_rules(int(max_images))
    }


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


def test_security_group_has_no_ingress(any_synth: Any) -> None:
    sg = any_synth.one("AWS::EC2::SecurityGroup")["Properties"]
    assert "SecurityGroupIngress" not in sg
    assert not any_synth.resources("AWS::EC2::SecurityGroupIngress")


def test_checkpoint_document_takes_job_id_deadline_and_mode(any_synth: Any) -> None:
    doc = any_synth.one("AWS::SSM::Document")["Properties"]
    assert doc["DocumentType"] == "Command"
    content = doc["Content"]
    parameters = content["parameters"]
    assert set(parameters) == {SSM_PARAM_JOB_ID, SSM_PARAM_DEADLINE, SSM_PARAM_MODE}
    # Every parameter is validated by SSM before it reaches the shell.
    assert all("allowedPattern" in parameters[p] for p in (SSM_PARAM_JOB_ID, SSM_PARAM_DEADLINE))
    assert parameters[SSM_PARAM_MODE]["allowedValues"] == list(CHECKPOINT_MODES)
    assert parameters[SSM_PARAM_MODE]["default"] == "stop"  # an older sender keeps the old meaning
    (step,) = content["mainSteps"]
    assert step["inputs"]["runCommand"] == [
        f"/usr/local/bin/trainctl checkpoint-now --job-id {{{{{SSM_PARAM_JOB_ID}}}}} "
        f"--deadline {{{{{SSM_PARAM_DEADLINE}}}}} --mode {{{{{SSM_PARAM_MODE}}}}}"
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


_AGENT_ASSET = re.compile(r"^[0-9a-f]{64}\.zip$")


def test_instance_role_least_privilege(any_synth: Any) -> None:
    role_id = any_synth.logical_id("InstanceRole", "AWS::IAM::Role")
    role = any_synth.resources("AWS::IAM::Role")[role_id]["Properties"]
    managed = role["ManagedPolicyArns"]
    assert len(managed) == 1 and "AmazonSSMManagedInstanceCore" in str(managed[0])
    assert "Policies" not in role
    attached = [
        p["Properties"]["PolicyDocument"]["Statement"]
        for p in any_synth.resources("AWS::IAM::Policy").values()
        if {"Ref": role_id} in p["Properties"]["Roles"]
    ]
    statements = normalised_statements([s for policy in attached for s in policy])

    # The agent source object is named by its content hash: check its shape, then pin it.
    (agent,) = [s for s in statements if s.get("Sid") == "ReadAgentSource"]
    bucket, _, key = agent["Resource"][0].partition(":s3:::")[2].partition("/")
    assert bucket == f"cdk-hnb659fds-assets-{any_synth.account}-{any_synth.region}", bucket
    assert _AGENT_ASSET.fullmatch(key), key

    ids = {
        name: any_synth.logical_id(fragment, cfn_type)
        for name, (fragment, cfn_type) in {
            "bucket": ("CheckpointBucket", "AWS::S3::Bucket"),
            "table": ("JobsTable", "AWS::DynamoDB::Table"),
            "repo": ("TrainingImages", "AWS::ECR::Repository"),
            "logs": ("AgentLogs", "AWS::Logs::LogGroup"),
            "machine": ("ResumeStateMachine", "AWS::StepFunctions::StateMachine"),
        }.items()
    }
    # Everything a training instance's credentials can do besides the SSM agent's managed
    # policy. A new action (s3:DeleteObjectVersion, dynamodb:PutItem), a wider resource or
    # a dropped condition fails here.
    expected: list[dict[str, Any]] = [
        {
            "Sid": "CheckpointObjects",
            "Effect": "Allow",
            "Action": ["s3:AbortMultipartUpload", "s3:DeleteObject", "s3:GetObject", "s3:PutObject"],
            "Resource": [f"${{{ids['bucket']}.Arn}}/*/ckpt/*"],
        },
        {
            "Sid": "ListCheckpoints",
            "Effect": "Allow",
            "Action": ["s3:ListBucket"],
            "Resource": [f"${{{ids['bucket']}.Arn}}"],
            "Condition": {"StringLike": {"s3:prefix": ["*/ckpt/*"]}},
        },
        {
            "Sid": "UpdateJobRowsOnly",
            "Effect": "Allow",
            "Action": ["dynamodb:GetItem", "dynamodb:UpdateItem"],
            "Resource": [f"${{{ids['table']}.Arn}}"],
            "Condition": {"ForAllValues:StringLike": {"dynamodb:LeadingKeys": ["JOB#*"]}},
        },
        {
            "Effect": "Allow",
            "Action": ["ecr:BatchCheckLayerAvailability", "ecr:BatchGetImage", "ecr:GetDownloadUrlForLayer"],
            "Resource": [f"${{{ids['repo']}.Arn}}"],
        },
        # No resource-level permissions exist for the registry login token.
        {"Effect": "Allow", "Action": ["ecr:GetAuthorizationToken"], "Resource": ["*"]},
        # Nor for Spot price history (the agent's budget accrual): public prices, read only.
        {
            "Sid": "SpotPricesForBudget",
            "Effect": "Allow",
            "Action": ["ec2:DescribeSpotPriceHistory"],
            "Resource": ["*"],
        },
        {
            "Sid": "CreateAgentLogStreams",
            "Effect": "Allow",
            "Action": ["logs:CreateLogStream"],
            "Resource": [f"${{{ids['logs']}.Arn}}"],
        },
        {
            "Sid": "ShipAgentLogs",
            "Effect": "Allow",
            "Action": ["logs:PutLogEvents"],
            "Resource": [any_synth.arn("logs", f"log-group:${{{ids['logs']}}}:log-stream:*")],
        },
        {
            "Sid": "ReadAgentSource",
            "Effect": "Allow",
            "Action": ["s3:GetObject"],
            "Resource": [f"arn:{any_synth.partition}:s3:::{bucket}/{key}"],
        },
        {
            "Sid": "CheckpointHandshake",
            "Effect": "Allow",
            "Action": ["states:SendTaskFailure", "states:SendTaskHeartbeat", "states:SendTaskSuccess"],
            "Resource": [f"${{{ids['machine']}}}"],
        },
    ]
    assert statements == normalised_statements(expected)


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


def _workflow_statements(synth: Any) -> list[dict[str, Any]]:
    return _statements(synth, "ResumeStateMachineRoleDefaultPolicy")


_LAUNCH_ACTIONS = ("ec2:RunInstances", "ec2:CreateTags", "iam:PassRole")


def _grants_any(statement: dict[str, Any], actions: tuple[str, ...]) -> bool:
    """Whether an Allow statement grants one of `actions` (IAM matches case-insensitively,
    with `*`/`?` wildcards; a NotAction grants everything it does not name)."""
    if statement["Effect"] != "Allow":
        return False
    if "NotAction" in statement:
        excluded = [a.lower() for a in as_list(statement["NotAction"])]
        return any(not any(fnmatch.fnmatchcase(a.lower(), x) for x in excluded) for a in actions)
    patterns = [a.lower() for a in as_list(statement["Action"])]
    return any(fnmatch.fnmatchcase(a.lower(), p) for a in actions for p in patterns)


def test_launch_grant_check_sees_every_kind_of_identity_policy() -> None:
    # The matcher behind the test below: wildcards, case and NotAction all count.
    assert _grants_any({"Effect": "Allow", "Action": "ec2:Run*"}, _LAUNCH_ACTIONS)
    assert _grants_any({"Effect": "Allow", "Action": ["IAM:passrole"]}, _LAUNCH_ACTIONS)
    assert _grants_any({"Effect": "Allow", "NotAction": "s3:*"}, _LAUNCH_ACTIONS)
    assert not _grants_any({"Effect": "Deny", "Action": "ec2:RunInstances"}, _LAUNCH_ACTIONS)
    assert not _grants_any({"Effect": "Allow", "Action": "ec2:DescribeInstances"}, _LAUNCH_ACTIONS)


def test_workflow_may_launch_only_from_our_template(any_synth: Any) -> None:
    # Every RunInstances / CreateTags / PassRole grant anywhere in the template (any role's
    # policies, managed or inline), in full: IAM allows the union of statements, so a
    # second, looser one in another policy or on another role would widen these.
    grants = [(owner, s) for owner, s in any_synth.identity_statements() if _grants_any(s, _LAUNCH_ACTIONS)]
    role = any_synth.logical_id("ResumeStateMachineRole", "AWS::IAM::Role")
    assert {owner for owner, _ in grants} == {f"${{{role}}}"}
    statements = normalised_statements([s for _, s in grants])
    template = any_synth.arn(
        "ec2", f"launch-template/${{{any_synth.logical_id('LaunchTemplate', 'AWS::EC2::LaunchTemplate')}}}"
    )
    from_template = {"ArnEquals": {"ec2:LaunchTemplate": template}}
    if any_synth.explicit_env:
        subnets = list(PROD_SUBNETS)
    else:  # the new VPC's subnets, by reference
        subnets = [f"${{{k}}}" for k in sorted(any_synth.resources("AWS::EC2::Subnet"))]
    security_group = any_synth.logical_id("InstanceSecurityGroup", "AWS::EC2::SecurityGroup")
    types = (
        ["g5.xlarge", "p4d.24xlarge"]
        if any_synth.explicit_env
        else ["g5.xlarge", "g5.2xlarge", "g6.xlarge", "g6.2xlarge"]
    )
    expected: list[dict[str, Any]] = [
        {
            "Sid": "RunTaggedInstancesFromTemplate",
            "Effect": "Allow",
            "Action": ["ec2:RunInstances"],
            "Resource": [any_synth.arn("ec2", "instance/*")],
            "Condition": {
                **from_template,
                "StringEquals": {"ec2:InstanceType": types, f"aws:RequestTag/{TAG_MANAGED}": "true"},
                "Null": {f"aws:RequestTag/{TAG_JOB_ID}": "false"},
            },
        },
        {
            "Sid": "RunInstancesResourcesViaTemplate",
            "Effect": "Allow",
            "Action": ["ec2:RunInstances"],
            "Resource": [
                template,
                *(
                    any_synth.arn("ec2", f"{r}/*")
                    for r in ("network-interface", "spot-instances-request", "volume")
                ),
            ],
            "Condition": from_template,
        },
        {
            # Chosen per capacity pool by the workflow (SubnetId in the call), so not a
            # template resource: pinned by ARN to the deployment's subnets instead.
            "Sid": "IntoOurSubnetsOnly",
            "Effect": "Allow",
            "Action": ["ec2:RunInstances"],
            "Resource": [any_synth.arn("ec2", f"subnet/{subnet}") for subnet in subnets],
            "Condition": from_template,
        },
        {
            # Named by the template and never overridden: another AMI or security group in
            # the call is refused (ec2:IsLaunchTemplateResource).
            "Sid": "TemplateImageAndSecurityGroup",
            "Effect": "Allow",
            "Action": ["ec2:RunInstances"],
            "Resource": [
                any_synth.arn("ec2", "image/*", account=False),
                any_synth.arn("ec2", f"security-group/${{{security_group}.GroupId}}"),
            ],
            "Condition": {**from_template, "Bool": {"ec2:IsLaunchTemplateResource": "true"}},
        },
        {
            "Sid": "TagOnLaunchOnly",
            "Effect": "Allow",
            "Action": ["ec2:CreateTags"],
            "Resource": [
                any_synth.arn("ec2", f"{r}/*")
                for r in ("instance", "volume", "network-interface", "spot-instances-request")
            ],
            "Condition": {"StringEquals": {"ec2:CreateAction": "RunInstances"}},
        },
        {
            "Sid": "PassInstanceRoleToEc2",
            "Effect": "Allow",
            "Action": ["iam:PassRole"],
            "Resource": [f"${{{any_synth.logical_id('InstanceRole', 'AWS::IAM::Role')}.Arn}}"],
            "Condition": {"StringEquals": {"iam:PassedToService": "ec2.amazonaws.com"}},
        },
    ]
    assert statements == normalised_statements(expected)


def test_launches_use_only_the_deployment_subnets_and_security_group(any_synth: Any) -> None:
    # The ARNs the grant pins are the subnets the workflow is told about (stack output)
    # and the group the launch template names.
    (subnet_grant,) = [s for s in _workflow_statements(any_synth) if s.get("Sid") == "IntoOurSubnetsOnly"]
    granted = {render(r).rsplit("/", 1)[1] for r in as_list(subnet_grant["Resource"])}
    output = render(any_synth.json["Outputs"]["SubnetIds"]["Value"])
    assert granted == set(output.split(","))
    data = any_synth.one("AWS::EC2::LaunchTemplate")["Properties"]["LaunchTemplateData"]
    (group,) = data["SecurityGroupIds"]
    (image_and_group,) = [
        s for s in _workflow_statements(any_synth) if s.get("Sid") == "TemplateImageAndSecurityGroup"
    ]
    (granted_group,) = [r for r in render(image_and_group["Resource"]) if ":security-group/" in r]
    assert granted_group.endswith(f":security-group/{render(group)}")


def test_workflow_terminates_only_managed_instances(any_synth: Any) -> None:
    # The construct's grant (workflow.py) as deployed: every TerminateInstances statement
    # is limited to instances carrying trainctl:managed=true.
    terminate = [
        s for _, s in policy_statements(any_synth) if "ec2:TerminateInstances" in as_list(s["Action"])
    ]
    assert terminate, "the workflow must be able to terminate a failed job's instance"
    for statement in terminate:
        assert statement["Effect"] == "Allow"
        assert as_list(statement["Action"]) == ["ec2:TerminateInstances"]
        assert render(statement["Resource"]) == any_synth.arn("ec2", "instance/*")
        assert statement["Condition"] == {"StringEquals": {f"aws:ResourceTag/{TAG_MANAGED}": "true"}}


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
    logs_statements = [s for s in statements if any(a.startswith("logs:") for a in as_list(s["Action"]))]
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


# --- user data: training/bootstrap/user-data.sh, as the launch template deploys it ------

# `${Name}` (a substitution) or `${!Name}` (a literal `${Name}`), as Fn::Sub reads them.
_PLACEHOLDER = re.compile(r"\$\{(!?)([^}]*)\}")
_PSEUDO = {
    "AWS::Region": "eu-west-1",
    "AWS::AccountId": "123456789012",
    "AWS::Partition": "aws",
    "AWS::URLSuffix": "amazonaws.com",
}
# The 2-minute Spot notice: systemd must give the agent less than that to stop.
_SPOT_NOTICE_SECONDS = 120
# EC2 rejects user data over 16 KB (before base64).
_USER_DATA_LIMIT = 16 * 1024


def _user_data_parts(synth: Any) -> list[Any]:
    data = synth.one("AWS::EC2::LaunchTemplate")["Properties"]["LaunchTemplateData"]
    separator, parts = data["UserData"]["Fn::Base64"]["Fn::Join"]
    assert separator == ""
    return list(parts)


def _bootstrap_sub(synth: Any) -> tuple[int, str, dict[str, Any]]:
    """(index in the user data, body, variables) of the bootstrap script's Fn::Sub."""
    found = [
        (i, p["Fn::Sub"][0], p["Fn::Sub"][1])
        for i, p in enumerate(_user_data_parts(synth))
        if isinstance(p, dict) and isinstance(p.get("Fn::Sub"), list)
    ]
    assert len(found) == 1, found
    return found[0]


def _dummy(token: Any) -> str:
    """A value standing in for a CloudFormation reference (physical names are unknown)."""
    assert isinstance(token, dict) and set(token) == {"Ref"}, f"unexpected token {token}"
    return f"dummy-{token['Ref'].lower()}"


def _fn_sub(body: str, variables: dict[str, Any]) -> str:
    def one(match: re.Match[str]) -> str:
        literal, name = match.groups()
        if literal:
            return "${" + name + "}"
        if name in variables:
            value = variables[name]
            return value if isinstance(value, str) else _dummy(value)
        assert name in _PSEUDO, f"unresolved placeholder ${{{name}}} would reach the template"
        return _PSEUDO[name]

    return _PLACEHOLDER.sub(one, body)


def _render(synth: Any) -> str:
    """The user data as an instance receives it, with dummy values for references."""
    rendered = []
    for part in _user_data_parts(synth):
        if isinstance(part, str):
            rendered.append(part)
        elif isinstance(part.get("Fn::Sub"), str):
            rendered.append(_fn_sub(part["Fn::Sub"], {}))
        elif isinstance(part.get("Fn::Sub"), list):
            rendered.append(_fn_sub(*part["Fn::Sub"]))
        else:
            rendered.append(_dummy(part))
    return "".join(rendered)


def test_user_data_is_the_bootstrap_script_after_the_agent_download(any_synth: Any) -> None:
    from infra.constructs.instances import AGENT_BIN, bootstrap_script

    _, body, variables = _bootstrap_sub(any_synth)
    # The one bootstrap: training/bootstrap/user-data.sh, verbatim (shebang aside).
    assert body == bootstrap_script()
    assert "#!" not in body.splitlines()[0]
    # After the CDK asset download, and unpacking what that download wrote.
    before = _render(any_synth).split(bootstrap_script().splitlines()[0])[0]
    download = re.search(r"aws s3 cp 's3://[^']+' '([^']+)'", before)
    assert download and download.group(1) == variables["AgentArchive"]
    assert before.index("set -euo pipefail") < download.start()
    # References to this stack's resources, not copies of their names.
    assert variables["JobsTableName"] == {"Ref": any_synth.logical_id("JobsTable", "AWS::DynamoDB::Table")}
    assert variables["CheckpointBucketName"] == {
        "Ref": any_synth.logical_id("CheckpointBucket", "AWS::S3::Bucket")
    }
    # The SSM checkpoint document runs the binary the bootstrap links.
    assert variables["AgentBin"] == AGENT_BIN
    document = any_synth.one("AWS::SSM::Document")["Properties"]["Content"]
    assert document["mainSteps"][0]["inputs"]["runCommand"][0].startswith(f"{AGENT_BIN} checkpoint-now ")


def test_every_bootstrap_placeholder_is_substituted(any_synth: Any) -> None:
    from infra.constructs.instances import BOOTSTRAP_SCRIPT

    _, _, variables = _bootstrap_sub(any_synth)
    in_file = {name for literal, name in _PLACEHOLDER.findall(BOOTSTRAP_SCRIPT.read_text()) if not literal}
    # Every placeholder is a variable infra fills or a pseudo parameter; no variable is unused.
    assert in_file - set(_PSEUDO) == set(variables)
    assert all(value not in ("", None) for value in variables.values())
    _render(any_synth)  # raises on any placeholder Fn::Sub could not resolve


def test_rendered_user_data_is_valid_bash_under_the_ec2_limit(any_synth: Any, tmp_path: Any) -> None:
    script = tmp_path / "user-data"
    script.write_text(_render(any_synth))
    assert len(script.read_bytes()) < _USER_DATA_LIMIT
    checked = subprocess.run(["bash", "-n", str(script)], capture_output=True, text=True, check=False)
    assert checked.returncode == 0, checked.stderr


# Stand-ins for what the script calls on an instance; each records its call in $LOG.
_STUBS = {
    "dnf": """echo "dnf $*" >> "$LOG"
for pkg in "$@"; do case "$pkg" in python3.11|docker) cp "$PKGS/$pkg" "$STUBS/$pkg" ;; esac; done
""",
    "systemctl": 'echo "systemctl $*" >> "$LOG"\n',
    "shutdown": 'echo "shutdown $*" >> "$LOG"\n',
    "curl": """case "$*" in
  *"-X PUT http://169.254.169.254/latest/api/token"*) echo token-1 ;;
  *"X-aws-ec2-metadata-token: token-1"*/meta-data/tags/instance/trainctl:job-id) echo "$JOB_ID" ;;
  *) exit 22 ;;
esac
""",
    "aws": """echo "aws $*" >> "$LOG"
case "$1 $2" in
  "s3 cp") [ -z "$S3_FAILS" ] || exit 1; cp "$AGENT_ZIP" "$4" ;;
  "dynamodb get-item") echo "$JOB_IMAGE" ;;
  "ecr get-login-password") echo ecr-secret ;;
  *) exit 1 ;;
esac
""",
}
_STUBS["shutdown"] = 'echo "shutdown $*" >> "$LOG"\n'
_PACKAGES = {
    "python3.11": """echo "python3.11 $*" >> "$LOG"
if [ "$1 $2" = "-m venv" ]; then
  venv="${@: -1}"
  mkdir -p "$venv/bin"
  for tool in pip trainctl; do
    printf '#!/bin/bash\\necho "%s $*" >> "$LOG"\\n' "$tool" > "$venv/bin/$tool"
    chmod +x "$venv/bin/$tool"
  done
  exit 0
fi
exec "$REAL_PYTHON" "$@"
""",
    "docker": """echo "docker $*" >> "$LOG"
if [ "$1" = login ]; then echo "docker login password $(cat)" >> "$LOG"; fi
""",
}
_TOOLS = ("cat", "chmod", "cp", "cut", "dirname", "install", "ln", "mkdir", "rm")
# Folders Amazon Linux 2023 has; the script must create everything else it writes to.
_ON_EVERY_INSTANCE = ("usr/local/bin", "etc/systemd/system", "opt", "run", "var/lib", "tmp")
# Absolute paths the script writes, moved under the test's root.
_INSTANCE_PATHS = re.compile(
    r"(?<![\w/])(/tmp/trainctl-agent\.zip|/opt/trainctl|/usr/local/bin/|/run/trainctl"
    r"|/var/lib/trainctl|/etc/trainctl|/etc/systemd/system)"
)


@dataclass
class _Boot:
    root: Path
    log: list[str]
    unit: dict[str, list[str]]
    env: dict[str, str]
    env_file: str
    stubs: Path


def _boot(synth: Any, tmp_path: Path, *, job_image: str, s3_fails: bool = False) -> _Boot:
    """Run the rendered user data as cloud-init would, with the instance's commands stubbed.
    With `s3_fails` the agent download fails and the boot must too (no unit, no env file)."""
    root, stubs, packages, tools = (tmp_path / d for d in ("root", "stubs", "packages", "tools"))
    for folder in (root, stubs, packages, tools):
        folder.mkdir()
    for present in _ON_EVERY_INSTANCE:
        (root / present).mkdir(parents=True)
    for folder, scripts in ((stubs, _STUBS), (packages, _PACKAGES)):
        for name, body in scripts.items():
            (folder / name).write_text("#!/bin/bash\n" + body)
            (folder / name).chmod(0o755)
    for tool in _TOOLS:
        found = shutil.which(tool)
        assert found, tool
        (tools / tool).symlink_to(found)
    agent_zip = tmp_path / "agent-source.zip"
    with zipfile.ZipFile(agent_zip, "w") as archive:
        archive.writestr("pyproject.toml", "[project]\nname = 'trainctl'\n")
    script = tmp_path / "user-data"
    script.write_text(_INSTANCE_PATHS.sub(lambda m: f"{root}{m.group(1)}", _render(synth)))
    log = tmp_path / "calls.log"
    env = {
        "PATH": f"{stubs}:{tools}",
        "LOG": str(log),
        "STUBS": str(stubs),
        "PKGS": str(packages),
        "REAL_PYTHON": sys.executable,
        "AGENT_ZIP": str(agent_zip),
        "JOB_ID": "job-1",
        "JOB_IMAGE": job_image,
        "S3_FAILS": "1" if s3_fails else "",
    }
    ran = subprocess.run(
        ["/bin/bash", str(script)], env=env, capture_output=True, text=True, check=False, timeout=60
    )
    if s3_fails:
        assert ran.returncode != 0 and "trainctl bootstrap failed at line" in ran.stderr, ran.stderr
        return _Boot(root, log.read_text().splitlines(), {}, {}, "", stubs)
    assert ran.returncode == 0, ran.stderr
    unit: dict[str, list[str]] = {}
    for line in (root / "etc/systemd/system/trainctl-agent.service").read_text().splitlines():
        if "=" in line and not line.startswith("#"):
            key, value = line.split("=", 1)
            unit.setdefault(key, []).append(value)
    env_file = root / "etc/trainctl/agent.env"
    values = dict(line.split("=", 1) for line in env_file.read_text().splitlines())
    return _Boot(root, log.read_text().splitlines(), unit, values, str(env_file), stubs)


def _never_restarts(boot: _Boot) -> None:
    # Exit codes are outcomes the agent recorded; a restart would rerun a user bug forever.
    assert boot.unit["Restart"] == ["no"]
    assert boot.unit["KillMode"] == ["mixed"]
    (timeout,) = boot.unit["TimeoutStopSec"]
    assert 60 <= int(timeout) < _SPOT_NOTICE_SECONDS
    assert boot.unit["EnvironmentFile"] == [boot.env_file]
    assert boot.log[-2:] == ["systemctl daemon-reload", "systemctl enable --now trainctl-agent.service"]


def test_user_data_starts_the_agent_without_a_command_and_never_restarts(
    default_synth: Any, tmp_path: Path
) -> None:
    from infra.constructs.instances import AGENT_BIN, AGENT_HOME

    # When an instance boots a job without an image
    boot = _boot(default_synth, tmp_path, job_image="None")
    home, agent_bin = f"{boot.root}{AGENT_HOME}", f"{boot.root}{AGENT_BIN}"
    # Then Python 3.11 is installed, and the agent from the downloaded source asset
    assert "dnf install -y -q python3.11" in boot.log
    assert (Path(home) / "src" / "pyproject.toml").is_file()  # really unpacked
    assert f"pip install --quiet {home}/src" in boot.log
    assert Path(agent_bin).resolve() == Path(home, "venv", "bin", "trainctl")
    # And the agent starts with no command (it runs the job row's) and is never restarted
    assert boot.unit["ExecStart"] == [f"{agent_bin} agent"]
    _never_restarts(boot)
    _powers_off_after_a_terminal_outcome_or_an_agent_that_could_not_run(boot, tmp_path)
    assert not any(call.startswith("docker") for call in boot.log)
    # The job row was read for its image only, by the key of the tagged job
    (read,) = [call for call in boot.log if call.startswith("aws dynamodb get-item")]
    assert f'--key {{"{JOBS_PARTITION_KEY}":{{"S":"JOB#job-1"}}}}' in read and "spec.image" in read


def test_user_data_hands_the_agent_its_table_bucket_log_group_and_region(
    default_synth: Any, tmp_path: Path
) -> None:
    _, _, variables = _bootstrap_sub(default_synth)
    logical_id, _ = _agent_log_group(default_synth)
    assert variables["AgentLogGroupName"] == {"Ref": logical_id}
    boot = _boot(default_synth, tmp_path, job_image="None")
    assert boot.env == {
        runtime_env.JOBS_TABLE: _dummy(variables["JobsTableName"]),
        runtime_env.CHECKPOINT_BUCKET: _dummy(variables["CheckpointBucketName"]),
        runtime_env.AGENT_LOG_GROUP: _dummy({"Ref": logical_id}),
        runtime_env.STAGING_DIR: f"{boot.root}{runtime_env.DEFAULT_STAGING_DIR}",
        runtime_env.REGION: _PSEUDO["AWS::Region"],
        "AWS_DEFAULT_REGION": _PSEUDO["AWS::Region"],
    }


def test_user_data_runs_a_job_image_with_the_agent_as_entrypoint(default_synth: Any, tmp_path: Path) -> None:
    image = "123456789012.dkr.ecr.eu-west-1.amazonaws.com/trainctl:abc123"
    # When the job row names an image in our ECR registry
    boot = _boot(default_synth, tmp_path, job_image=image)
    # Then docker is installed, logged in to that registry and the image pulled
    assert "dnf install -y -q docker" in boot.log
    login = boot.log.index(
        "docker login --username AWS --password-stdin 123456789012.dkr.ecr.eu-west-1.amazonaws.com"
    )
    assert boot.log[login + 1] == "docker login password ecr-secret"
    assert f"docker pull --quiet {image}" in boot.log
    # And the unit runs it with the agent's environment and no command after the image
    # (arguments replace the image's default CMD, so the agent runs the row's command)
    (exec_start,) = boot.unit["ExecStart"]
    argv = exec_start.split()
    assert argv[:3] == ["/usr/bin/docker", "run", "--rm"]
    assert argv[argv.index("--env-file") + 1] == boot.env_file
    assert argv[argv.index(image) + 1 :] == ["--staging-dir", boot.env[runtime_env.STAGING_DIR]]
    assert f"{boot.root}/run/trainctl:{boot.root}/run/trainctl" in argv
    _never_restarts(boot)
    _powers_off_after_a_terminal_outcome_or_an_agent_that_could_not_run(boot, tmp_path)


def _powers_off_after_a_terminal_outcome_or_an_agent_that_could_not_run(boot: _Boot, tmp_path: Path) -> None:
    # The host powers off when the agent left its marker (a container cannot power off
    # its host): after any terminal outcome, failures included; and when the agent could
    # not run the attempt at all (a non-zero exit, a core dump, the OOM killer). Not after
    # a notice or a stop from outside (the agent exits 0 on SIGTERM; `systemctl kill`).
    (after,) = boot.unit["ExecStopPost"]
    marker = boot.root / "run/trainctl/shutdown-requested"
    assert not marker.exists()  # none left over from before this boot
    for result, left, shut_down in (
        ("success", True, True),
        ("exit-code", True, True),
        ("exit-code", False, True),
        ("core-dump", False, True),
        ("oom-kill", False, True),
        ("success", False, False),
        ("signal", False, False),
    ):
        if left:
            marker.touch()
        else:
            marker.unlink(missing_ok=True)
        log = tmp_path / f"after-{result}-{left}.log"
        env = {"PATH": str(boot.stubs), "LOG": str(log), "SERVICE_RESULT": result}
        assert subprocess.run([after], env=env, check=False).returncode == 0
        assert (log.exists() and log.read_text() == "shutdown -h now\n") is shut_down, (result, left)


def test_an_agent_download_that_fails_powers_the_instance_off(default_synth: Any, tmp_path: Path) -> None:
    # When the agent source cannot be downloaded (S3 or KMS refuses, the asset is gone)
    boot = _boot(default_synth, tmp_path, job_image="None", s3_fails=True)
    # Then nothing else runs, and the instance powers off instead of billing idle (the
    # launch template terminates on shutdown: the instance-state rule recovers the job)
    assert [line.split()[:3] for line in boot.log] == [["aws", "s3", "cp"], ["shutdown", "-h", "now"]]
    assert not (boot.root / "etc/systemd/system/trainctl-agent.service").exists()
