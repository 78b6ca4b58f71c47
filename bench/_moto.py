"""In-process moto accounts for the benchmarks, built like the stack builds them.

Table schemas, the checkpoint document's parameters and the resume definition come from
the same constants and files the stack uses (`trainctl_core.settings`, the rendered
`resume.asl.json`), so a benchmark measures the deployed shapes, not a second copy.
Call `fake_aws_environment()` before the first boto3 client is created.
"""

from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass
from typing import Any

REGION = "us-east-1"
JOBS_TABLE = "trainctl-jobs"
IDEMPOTENCY_TABLE = "trainctl-idempotency"
CHECKPOINT_DOCUMENT = "trainctl-checkpoint"

# Only fake credentials and a region: a benchmark that forgot its mock fails on moto's
# side, never against a real account. No default AMIs: describe_images costs seconds.
_FAKE_ENVIRONMENT = {
    "AWS_ACCESS_KEY_ID": "testing",
    "AWS_SECRET_ACCESS_KEY": "testing",
    "AWS_SESSION_TOKEN": "testing",
    "AWS_DEFAULT_REGION": REGION,
    "AWS_REGION": REGION,
    "MOTO_EC2_LOAD_DEFAULT_AMIS": "false",
}


def fake_aws_environment(environ: dict[str, str] | None = None) -> dict[str, str]:
    """Point `environ` (default: this process) at fake credentials; returns it."""
    target: Any = os.environ if environ is None else environ
    for name, value in _FAKE_ENVIRONMENT.items():
        target[name] = value
    for name in ("AWS_PROFILE", "AWS_ENDPOINT_URL"):
        target.pop(name, None)
    return dict(target)


def create_jobs_table(ddb: Any, name: str = JOBS_TABLE, *, index_projection: str = "KEYS_ONLY") -> None:
    """The jobs table with its lookup indexes (keys only, as deployed)."""
    from trainctl_core.tables import jobs_table_request

    ddb.create_table(**jobs_table_request(name, projection=index_projection))


def create_idempotency_table(ddb: Any, name: str = IDEMPOTENCY_TABLE) -> None:
    from trainctl_core.tables import idempotency_table_request

    ddb.create_table(**idempotency_table_request(name))


def create_checkpoint_document(ssm: Any, name: str = CHECKPOINT_DOCUMENT) -> None:
    """A Command document with the parameters the handlers send (moto never runs it)."""
    from trainctl_core.settings import SSM_PARAM_DEADLINE, SSM_PARAM_JOB_ID

    content = {
        "schemaVersion": "2.2",
        "description": "trainctl checkpoint now",
        "parameters": {SSM_PARAM_JOB_ID: {"type": "String"}, SSM_PARAM_DEADLINE: {"type": "String"}},
        "mainSteps": [
            {
                "action": "aws:runShellScript",
                "name": "checkpoint",
                "inputs": {
                    "runCommand": [
                        f"trainctl checkpoint-now --job-id {{{{{SSM_PARAM_JOB_ID}}}}} "
                        f"--deadline {{{{{SSM_PARAM_DEADLINE}}}}}"
                    ]
                },
            }
        ],
    }
    ssm.create_document(Name=name, DocumentType="Command", DocumentFormat="JSON", Content=json.dumps(content))


@dataclass(frozen=True)
class ResumeAccount:
    """What the resume workflow needs in the account: table, topic, network, template."""

    state_machine_arn: str
    table: str
    topic_arn: str
    subnets: list[str]
    launch_template_id: str


def build_resume_account(
    *, ddb: Any, ec2: Any, sfn: Any, sns: Any, iam: Any, tuning: Any = None
) -> ResumeAccount:
    """Create the resources and the resume state machine rendered exactly as deployed."""
    from infra.workflows.render import WorkflowTuning, load_resume_definition, render, substitutions

    create_jobs_table(ddb, index_projection="ALL")
    topic_arn = sns.create_topic(Name="trainctl-alerts")["TopicArn"]
    vpc_id = ec2.create_vpc(CidrBlock="10.0.0.0/16")["Vpc"]["VpcId"]
    subnets = [
        ec2.create_subnet(VpcId=vpc_id, CidrBlock=f"10.0.{i}.0/24", AvailabilityZone=f"{REGION}{az}")[
            "Subnet"
        ]["SubnetId"]
        for i, az in enumerate("abc")
    ]
    template = ec2.create_launch_template(
        LaunchTemplateName="trainctl",
        LaunchTemplateData={"ImageId": "ami-12345678", "InstanceType": "m5.large"},
    )["LaunchTemplate"]
    role_arn = iam.create_role(RoleName="trainctl-resume", AssumeRolePolicyDocument="{}")["Role"]["Arn"]
    definition = render(
        load_resume_definition(),
        substitutions(
            jobs_table_name=JOBS_TABLE,
            alerts_topic_arn=topic_arn,
            launch_template_id=template["LaunchTemplateId"],
            launch_template_version=str(template["LatestVersionNumber"]),
            tuning=tuning or WorkflowTuning(),
        ),
    )
    arn = sfn.create_state_machine(name="trainctl-resume", definition=definition, roleArn=role_arn)[
        "stateMachineArn"
    ]
    return ResumeAccount(
        state_machine_arn=arn,
        table=JOBS_TABLE,
        topic_arn=topic_arn,
        subnets=subnets,
        launch_template_id=template["LaunchTemplateId"],
    )


def median(values: list[float]) -> float:
    ordered = sorted(values)
    middle = len(ordered) // 2
    return ordered[middle] if len(ordered) % 2 else (ordered[middle - 1] + ordered[middle]) / 2


def percentile(values: list[float], q: float) -> float:
    """Nearest-rank percentile (q in 0..100); exact for the small samples used here."""
    ordered = sorted(values)
    rank = max(1, math.ceil(q / 100 * len(ordered)))
    return ordered[rank - 1]
