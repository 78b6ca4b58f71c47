"""moto on 127.0.0.1, provisioned from the synthesized stack.

moto's CloudFormation cannot create a CDK template whole (DESIGN §5), so each resource the
flow needs is read from the template and created through its service's API: the two
tables (schemas as synthesized), the checkpoint bucket, the SSM checkpoint document, a
VPC with the template's subnets, the launch template (user data is irrelevant locally),
the alerts topic, the resume state machine (the template's DefinitionString with its
DefinitionSubstitutions filled in, as CloudFormation would) and the EventBridge rules
with their synthesized patterns, each delivering to an SQS queue named after the Lambda
function it targets (moto cannot invoke Lambda targets; `bridge.py` does).

The server runs in this process so moto's backends can be patched where they differ from
AWS in ways the flow depends on: RunInstances can be given capacity errors (the state
machine's own `aws-sdk:ec2` calls reach the patch), and SendCommand with InstanceIds
addresses only those instances (moto adds every instance of the region, DESIGN §5).
"""

from __future__ import annotations

import contextlib
import json
import threading
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

import boto3
from botocore.config import Config

from infra.workflows.render import render
from trainctl.rehearse.stack import StackError, StackSpec

REGION = "us-east-1"
ACCOUNT = "123456789012"
CREDENTIALS = {
    "AWS_ACCESS_KEY_ID": "testing",
    "AWS_SECRET_ACCESS_KEY": "testing",
    "AWS_SESSION_TOKEN": "testing",
}
FAKE_AMI = "ami-0123456789abcdef0"
# Substitutions that are AWS durations: scaled with the rehearsal's time scale.
TIMED_SUBSTITUTIONS = ("HandshakeTimeoutSeconds", "LaunchBackoffSeconds", "LaunchRetrySeconds")

# EC2's real messages for the capacity codes (the workflow matches on them).
CAPACITY_MESSAGE = (
    "We currently do not have sufficient {type} capacity in the Availability Zone you requested. "
    "Our system will be working on provisioning additional capacity."
)


@dataclass(frozen=True)
class PoolSpec:
    """A capacity pool the rehearsal's jobs use (instance type in one of the subnets)."""

    instance_type: str
    subnet_id: str
    zone: str

    @property
    def label(self) -> str:
        return f"{self.instance_type}@{self.zone}"


@dataclass
class LaunchCall:
    instance_type: str
    subnet_id: str
    market: str
    at: float
    error: str | None = None


@dataclass
class LaunchFaults:
    """Capacity errors per (instance type, subnet); every RunInstances call is recorded."""

    out_of_capacity: set[tuple[str, str]] = field(default_factory=set)
    calls: list[LaunchCall] = field(default_factory=list)
    lock: threading.Lock = field(default_factory=threading.Lock)


@dataclass
class Provisioned:
    """Names and ARNs of what was created, plus clients pointed at the server."""

    endpoint: str
    jobs_table: str
    idempotency_table: str
    bucket: str
    document: str
    state_machine_arn: str
    topic_arn: str
    notifications_queue_url: str
    launch_template_id: str
    subnets: dict[str, str]  # subnet id -> availability zone
    handler_queues: dict[str, str]  # function logical id -> queue url
    rule_patterns: dict[str, dict[str, Any]]
    functions: dict[str, dict[str, str]]  # function logical id -> resolved environment
    handlers: dict[str, str]  # function logical id -> "module.attribute"
    definition: str


def client(service: str, endpoint: str) -> Any:
    return boto3.session.Session().client(  # type: ignore[call-overload]
        service,
        region_name=REGION,
        endpoint_url=endpoint,
        aws_access_key_id=CREDENTIALS["AWS_ACCESS_KEY_ID"],
        aws_secret_access_key=CREDENTIALS["AWS_SECRET_ACCESS_KEY"],
        aws_session_token=CREDENTIALS["AWS_SESSION_TOKEN"],
        config=Config(retries={"max_attempts": 4, "mode": "standard"}, max_pool_connections=50),
    )


class MotoCloud:
    """A ThreadedMotoServer on a free port with Step Functions execution on."""

    def __init__(self) -> None:
        self.faults = LaunchFaults()
        self._server: Any = None
        self._restore: list[Any] = []
        self.endpoint = ""

    def start(self) -> MotoCloud:
        from moto.moto_server.werkzeug_app import DomainDispatcherApplication
        from moto.server import ThreadedMotoServer

        # moto's conditional writes are not atomic across threads (DESIGN §5): serialise
        # request dispatch so the rehearsal exercises trainctl's idempotency, not moto's races.
        lock = threading.RLock()
        original_call = DomainDispatcherApplication.__call__

        def locked(app: Any, environ: Any, start_response: Any) -> Any:
            with lock:
                return original_call(app, environ, start_response)

        DomainDispatcherApplication.__call__ = locked  # type: ignore[method-assign,assignment]
        self._restore.append(lambda: setattr(DomainDispatcherApplication, "__call__", original_call))
        self._patch_run_instances()
        self._patch_send_command_targets()
        self._patch_choice_timestamps()
        self._patch_definition_parsing()
        self._patch_backend_lookup()
        self._server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
        self._server.start()
        host, port = self._server.get_host_and_port()
        self.port = int(port)
        self.endpoint = f"http://{host}:{port}"
        # moto's backends are per process, not per server: start from an empty account
        # (an earlier rehearsal or test in this process may have left resources behind).
        self._post("/moto-api/reset", {})
        self._post("/moto-api/config", {"stepfunctions": {"execute_state_machine": True}})
        return self

    def _post(self, path: str, body: dict[str, Any]) -> None:
        request = urllib.request.Request(
            self.endpoint + path,
            data=json.dumps(body).encode(),
            method="POST",
            headers={"Content-Type": "application/json"},
        )
        with urllib.request.urlopen(request, timeout=30) as response:
            response.read()

    def stop(self) -> None:
        if self._server is not None:
            with contextlib.suppress(Exception):
                self._post("/moto-api/reset", {})
            with contextlib.suppress(Exception):
                self._server.stop()
            self._server = None
        while self._restore:
            self._restore.pop()()

    def client(self, service: str) -> Any:
        return client(service, self.endpoint)

    def _patch_run_instances(self) -> None:
        from moto.ec2.exceptions import EC2ClientError
        from moto.ec2.models.instances import InstanceBackend

        original = InstanceBackend.run_instances
        faults = self.faults

        def run_instances(
            backend: Any, image_id: str, count: int, user_data: Any, security_group_names: Any, **kwargs: Any
        ) -> Any:
            import time

            market = "spot" if kwargs.get("instance_market_options") == "spot" else "on-demand"
            call = LaunchCall(
                str(kwargs.get("instance_type")), str(kwargs.get("subnet_id")), market, time.time()
            )
            with faults.lock:
                faults.calls.append(call)
            if (call.instance_type, call.subnet_id) in faults.out_of_capacity:
                call.error = "InsufficientInstanceCapacity"
                raise EC2ClientError(call.error, CAPACITY_MESSAGE.format(type=call.instance_type))
            return original(backend, image_id, count, user_data, security_group_names, **kwargs)

        InstanceBackend.run_instances = run_instances  # type: ignore[method-assign,assignment]
        self._restore.append(lambda: setattr(InstanceBackend, "run_instances", original))

    def _patch_send_command_targets(self) -> None:
        # moto resolves a command's Targets with an EC2 filter built from them; no Targets
        # is an empty filter, which matches every instance in the region, so a checkpoint
        # request for one instance would reach every job's agent. On AWS a command sent
        # with InstanceIds addresses exactly those.
        from moto.ssm.models import Command

        original = Command._get_instance_ids_from_targets

        def from_targets(command: Any) -> list[str]:
            if not command.targets:
                return []
            return original(command)

        Command._get_instance_ids_from_targets = from_targets  # type: ignore[method-assign,assignment]
        self._restore.append(lambda: setattr(Command, "_get_instance_ids_from_targets", original))

    def _patch_backend_lookup(self) -> None:
        # moto's server finds the backend of every request by listing its own package
        # directory (a listdir and ~150 isdir calls per request): a third of its CPU in a
        # burst. The list cannot change while the server runs.
        from moto import backends

        original = backends.list_of_moto_modules
        modules = tuple(original())
        backends.list_of_moto_modules = lambda: modules  # type: ignore[assignment]
        self._restore.append(lambda: setattr(backends, "list_of_moto_modules", original))

    def _patch_definition_parsing(self) -> None:
        # moto parses the ASL again for every execution (a pure-Python ANTLR parse, ~0.3 s
        # of CPU here); a burst of resumes would spend seconds of the notice period on it
        # while the agents' checkpoint uploads wait. The parse tree of one definition is
        # parsed once; each execution still gets fresh components built from it.
        from moto.stepfunctions.parser.asl.parse.asl_parser import AmazonStateLanguageParser
        from moto.stepfunctions.parser.asl.parse.preprocessor import Preprocessor

        original = AmazonStateLanguageParser.parse
        trees: dict[str, Any] = {}
        lock = threading.Lock()

        def parse(definition: str) -> tuple[Any, Any]:
            with lock:
                tree = trees.get(definition)
            if tree is None:
                program, tree = original(definition)
                with lock:
                    trees[definition] = tree
                return program, tree
            return Preprocessor().visit(tree), tree

        AmazonStateLanguageParser.parse = staticmethod(parse)  # type: ignore[method-assign]
        self._restore.append(lambda: setattr(AmazonStateLanguageParser, "parse", staticmethod(original)))

    def _patch_choice_timestamps(self) -> None:
        # moto parses Choice timestamps only as %Y-%m-%dT%H:%M:%SZ; AWS accepts RFC 3339
        # (our millisecond timestamps). Same fix as tests/workflow/conftest.py.
        from moto.stepfunctions.parser.asl.component.state.choice.comparison.operator.implementations.is_operator import (  # noqa: E501
            IsTimestamp,
        )

        original = IsTimestamp.string_to_timestamp

        def parse(value: str) -> datetime | None:
            try:
                return datetime.fromisoformat(value.replace("Z", "+00:00"))
            except (TypeError, ValueError):
                return None

        IsTimestamp.string_to_timestamp = staticmethod(parse)  # type: ignore[assignment]
        self._restore.append(lambda: setattr(IsTimestamp, "string_to_timestamp", original))

    def __enter__(self) -> MotoCloud:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


# --- provisioning from the template -------------------------------------------------------------


class _Resolver:
    """Resolves the intrinsics the rehearsal needs (Ref / Fn::GetAtt of created resources)."""

    def __init__(self) -> None:
        # CloudFormation's pseudo parameters, as moto's account and region have them.
        self.refs: dict[str, str] = {
            "AWS::Partition": "aws",
            "AWS::Region": REGION,
            "AWS::AccountId": ACCOUNT,
            "AWS::URLSuffix": "amazonaws.com",
        }
        self.attrs: dict[tuple[str, str], str] = {}

    def resolve(self, value: Any) -> Any:
        if isinstance(value, dict) and len(value) == 1:
            ((key, arg),) = value.items()
            if key == "Ref":
                if arg not in self.refs:
                    raise StackError(f"the rehearsal cannot resolve Ref {arg}")
                return self.refs[arg]
            if key == "Fn::GetAtt":
                name, attribute = arg if isinstance(arg, list) else str(arg).split(".", 1)
                if (name, attribute) not in self.attrs:
                    raise StackError(f"the rehearsal cannot resolve Fn::GetAtt {name}.{attribute}")
                return self.attrs[(name, attribute)]
            if key == "Fn::Join":
                separator, parts = arg
                return str(separator).join(str(self.resolve(p)) for p in parts)
        if isinstance(value, dict):
            return {k: self.resolve(v) for k, v in value.items()}
        if isinstance(value, list):
            return [self.resolve(v) for v in value]
        return value

    def can_resolve(self, value: Any) -> bool:
        try:
            self.resolve(value)
        except StackError:
            return False
        return True


def provision(cloud: MotoCloud, stack: StackSpec, *, time_scale: float) -> Provisioned:
    """Create every resource the flow needs from the template's properties."""
    resolver = _Resolver()
    ddb, s3, ssm, ec2 = (cloud.client(s) for s in ("dynamodb", "s3", "ssm", "ec2"))
    sqs, sns, events, sfn, iam = (cloud.client(s) for s in ("sqs", "sns", "events", "stepfunctions", "iam"))

    # Tables: the synthesized key schema, attributes and indexes.
    tables = {}
    for (logical_id, props), name in (
        (stack.jobs_table, "trainctl-jobs"),
        (stack.idempotency_table, "trainctl-idempotency"),
    ):
        request: dict[str, Any] = {
            "TableName": name,
            "AttributeDefinitions": props["AttributeDefinitions"],
            "KeySchema": props["KeySchema"],
            "BillingMode": props.get("BillingMode", "PAY_PER_REQUEST"),
        }
        if props.get("GlobalSecondaryIndexes"):
            request["GlobalSecondaryIndexes"] = props["GlobalSecondaryIndexes"]
        ddb.create_table(**request)
        ttl = props.get("TimeToLiveSpecification")
        if ttl:
            ddb.update_time_to_live(TableName=name, TimeToLiveSpecification=ttl)
        resolver.refs[logical_id] = name
        resolver.attrs[(logical_id, "Arn")] = f"arn:aws:dynamodb:{REGION}:{ACCOUNT}:table/{name}"
        tables[logical_id] = name

    bucket_id, bucket_props = stack.checkpoint_bucket
    bucket = "trainctl-checkpoints-rehearsal"
    s3.create_bucket(Bucket=bucket)
    if bucket_props.get("VersioningConfiguration"):
        s3.put_bucket_versioning(
            Bucket=bucket, VersioningConfiguration=bucket_props["VersioningConfiguration"]
        )
    resolver.refs[bucket_id] = bucket
    resolver.attrs[(bucket_id, "Arn")] = f"arn:aws:s3:::{bucket}"

    document_id, document_props = stack.checkpoint_document
    document = "trainctl-checkpoint"
    ssm.create_document(
        Name=document,
        Content=json.dumps(document_props["Content"]),
        DocumentType=document_props.get("DocumentType", "Command"),
        DocumentFormat=document_props.get("DocumentFormat", "JSON"),
    )
    resolver.refs[document_id] = document

    # Network: the template's VPC CIDR and subnet CIDRs, one availability zone each.
    vpc_id_logical, vpc_props = stack.vpc
    vpc_id = ec2.create_vpc(CidrBlock=vpc_props.get("CidrBlock", "10.0.0.0/16"))["Vpc"]["VpcId"]
    resolver.refs[vpc_id_logical] = vpc_id
    subnets: dict[str, str] = {}
    for index, (logical_id, props) in enumerate(stack.subnets):
        zone = f"{REGION}{'abcdef'[index % 6]}"
        subnet_id = ec2.create_subnet(VpcId=vpc_id, CidrBlock=props["CidrBlock"], AvailabilityZone=zone)[
            "Subnet"
        ]["SubnetId"]
        resolver.refs[logical_id] = subnet_id
        subnets[subnet_id] = zone
    for logical_id in stack.of_type("AWS::EC2::SecurityGroup"):
        group = ec2.create_security_group(
            GroupName=logical_id, Description="trainctl rehearsal", VpcId=vpc_id
        )
        resolver.attrs[(logical_id, "GroupId")] = group["GroupId"]
        resolver.refs[logical_id] = group["GroupId"]
    for parameter in stack.template.get("Parameters", {}):
        resolver.refs[parameter] = FAKE_AMI  # the AMI SSM parameter: any image id will do

    template_id, template_props = stack.launch_template
    data = {
        k: v
        for k, v in template_props["LaunchTemplateData"].items()
        if k != "UserData" and resolver.can_resolve(v)  # e.g. the instance profile ARN: not needed
    }
    created = ec2.create_launch_template(
        LaunchTemplateName="trainctl-rehearsal", LaunchTemplateData=resolver.resolve(data)
    )["LaunchTemplate"]
    resolver.refs[template_id] = created["LaunchTemplateId"]
    resolver.attrs[(template_id, "LatestVersionNumber")] = str(created["LatestVersionNumber"])

    topic_id, _ = stack.alerts_topic
    topic_arn = sns.create_topic(Name="trainctl-alerts")["TopicArn"]
    resolver.refs[topic_id] = topic_arn
    notifications = _queue(sqs, "trainctl-notifications")
    sns.subscribe(TopicArn=topic_arn, Protocol="sqs", Endpoint=notifications[1])

    machine_id, machine_props = stack.state_machine
    definition = machine_props["DefinitionString"]
    if not isinstance(definition, str):
        definition = resolver.resolve(definition)
    values = {}
    for name, value in machine_props.get("DefinitionSubstitutions", {}).items():
        resolved = str(resolver.resolve(value))
        if name in TIMED_SUBSTITUTIONS:
            resolved = str(max(1, round(int(resolved) * time_scale)))
        values[name] = resolved
    rendered = render(definition, values)
    role_arn = iam.create_role(RoleName="trainctl-resume", AssumeRolePolicyDocument="{}")["Role"]["Arn"]
    machine_arn = sfn.create_state_machine(name="trainctl-resume", definition=rendered, roleArn=role_arn)[
        "stateMachineArn"
    ]
    resolver.refs[machine_id] = machine_arn

    # Rules -> one queue per target function (the local stand-in for the Lambda target).
    handler_queues: dict[str, str] = {}
    patterns: dict[str, dict[str, Any]] = {}
    for rule in stack.rules:
        if rule.target_function not in handler_queues:
            # In flight for as long as a handler may take; a failed invocation makes its
            # message visible again sooner itself (bridge.RETRY_SECONDS).
            url, _ = _queue(sqs, f"trainctl-{rule.target_function[:60]}", visibility_seconds=60)
            handler_queues[rule.target_function] = url
        queue_arn = sqs.get_queue_attributes(
            QueueUrl=handler_queues[rule.target_function], AttributeNames=["QueueArn"]
        )["Attributes"]["QueueArn"]
        events.put_rule(Name=rule.logical_id[:64], EventPattern=json.dumps(rule.pattern), State="ENABLED")
        events.put_targets(Rule=rule.logical_id[:64], Targets=[{"Id": "handler", "Arn": queue_arn}])
        patterns[rule.logical_id] = rule.pattern

    functions: dict[str, dict[str, str]] = {}
    handlers: dict[str, str] = {}
    for logical_id in handler_queues:
        spec = stack.function(logical_id)
        functions[logical_id] = {k: str(resolver.resolve(v)) for k, v in spec.environment.items()}
        handlers[logical_id] = spec.handler

    return Provisioned(
        endpoint=cloud.endpoint,
        jobs_table=tables[stack.jobs_table[0]],
        idempotency_table=tables[stack.idempotency_table[0]],
        bucket=bucket,
        document=document,
        state_machine_arn=machine_arn,
        topic_arn=topic_arn,
        notifications_queue_url=notifications[0],
        launch_template_id=created["LaunchTemplateId"],
        subnets=subnets,
        handler_queues=handler_queues,
        rule_patterns=patterns,
        functions=functions,
        handlers=handlers,
        definition=rendered,
    )


def _queue(sqs: Any, name: str, *, visibility_seconds: int = 2) -> tuple[str, str]:
    attributes = {"VisibilityTimeout": str(visibility_seconds)}
    url = sqs.create_queue(QueueName=name, Attributes=attributes)["QueueUrl"]
    arn = sqs.get_queue_attributes(QueueUrl=url, AttributeNames=["QueueArn"])["Attributes"]["QueueArn"]
    return str(url), str(arn)


@contextlib.contextmanager
def running_cloud() -> Iterator[MotoCloud]:
    cloud = MotoCloud().start()
    try:
        yield cloud
    finally:
        cloud.stop()
