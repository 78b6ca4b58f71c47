"""Synthesize the app once per test run per configuration; every infra test reads from that.

Two configurations: the defaults from cdk.json (env-agnostic, dev, new VPC) and an
explicit-env prod deployment into an existing VPC, because cdk-nag finding ids and ARNs
render differently with a concrete account/region.
"""

from __future__ import annotations

import fcntl
import json
import os
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

os.environ.setdefault("JSII_SILENCE_WARNING_END_OF_LIFE_NODE_VERSION", "20")
os.environ.setdefault("CDK_DISABLE_VERSION_CHECK", "1")

from aws_cdk.assertions import Template

from infra.app import build_app

# The infra tests form one xdist group (`make test`: `-n 2 --dist loadgroup`), which sends
# them to one worker; only this directory's tests join it, the other tiers stay spread.
# (With pytest 9.2 the group has no effect until pytest-xdist#1386 is fixed: the synth
# shared between workers below is what keeps a run to one synth per configuration.)
XDIST_GROUP = "infra"


@pytest.hookimpl(tryfirst=True)  # before xdist's own hook, which reads the group marks
def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    # A conftest hook sees the whole session's items, hence the path check.
    here = Path(__file__).parent
    for item in items:
        if here in Path(str(item.fspath)).parents:
            item.add_marker(pytest.mark.infra)
            item.add_marker(pytest.mark.xdist_group(XDIST_GROUP))


PROD_CONTEXT: dict[str, Any] = {
    "trainctl:account": "123456789012",
    "trainctl:region": "eu-west-1",
    "trainctl:stage": "prod",
    "trainctl:alert_email": "ops@example.com",
    "trainctl:vpc_id": "vpc-0123456789abcdef0",
    "trainctl:subnet_ids": "subnet-0123456789abcdef0,subnet-0fedcba9876543210",
    "trainctl:handler_reserved_concurrency": "5",
    "trainctl:allowed_instance_types": "g5.xlarge,p4d.24xlarge",
}


def render(node: Any) -> Any:
    """A template value with its references as text: `${Logical}`, `${Logical.Attr}`.

    Fn::Join is flattened and a plain Fn::Sub string kept, so an ARN reads like the ARN
    it becomes (`arn:${AWS::Partition}:logs:…:log-group:${AgentLogs…}:*`); other
    intrinsics are kept as `<json>`. Lists and mappings are rendered item by item.
    """
    if isinstance(node, list):
        return [render(item) for item in node]
    if isinstance(node, dict):
        if len(node) == 1:
            ((key, arg),) = node.items()
            if key == "Ref":
                return f"${{{arg}}}"
            if key == "Fn::GetAtt":
                return f"${{{'.'.join(arg)}}}"
            if key == "Fn::Join":
                separator, parts = arg
                return str(separator).join(str(render(part)) for part in parts)
            if key == "Fn::Sub" and isinstance(arg, str):
                return arg  # `${Name}` placeholders already read like the rest
            if key.startswith("Fn::"):
                return f"<{json.dumps(node, sort_keys=True)}>"
        return {key: render(value) for key, value in node.items()}
    return node


@dataclass(frozen=True)
class Synth:
    name: str
    outdir: Path
    template: Template
    json: dict[str, Any]
    context: dict[str, Any]

    @property
    def explicit_env(self) -> bool:
        return "trainctl:account" in self.context

    @property
    def partition(self) -> str:
        return "aws" if self.explicit_env else "${AWS::Partition}"

    @property
    def region(self) -> str:
        return str(self.context["trainctl:region"]) if self.explicit_env else "${AWS::Region}"

    @property
    def account(self) -> str:
        return str(self.context["trainctl:account"]) if self.explicit_env else "${AWS::AccountId}"

    def arn(self, service: str, resource: str, *, account: bool = True) -> str:
        """`arn:<partition>:<service>:<region>:<account>:<resource>` as `render` shows it."""
        owner = self.account if account else ""
        return f"arn:{self.partition}:{service}:{self.region}:{owner}:{resource}"

    def resources(self, cfn_type: str) -> dict[str, dict[str, Any]]:
        return {k: v for k, v in self.json["Resources"].items() if v["Type"] == cfn_type}

    def one(self, cfn_type: str) -> dict[str, Any]:
        found = self.resources(cfn_type)
        assert len(found) == 1, f"expected one {cfn_type}, found {sorted(found)}"
        return next(iter(found.values()))

    def identity_statements(self) -> list[tuple[str, dict[str, Any]]]:
        """(owner, statement) for every identity-policy statement in the template.

        Owners are the roles (and users/groups) a policy is attached to, so a grant counts
        for whoever really receives it: AWS::IAM::Policy and AWS::IAM::ManagedPolicy
        documents and the inline `Policies` of roles, users and groups.
        """
        out: list[tuple[str, dict[str, Any]]] = []
        for logical_id, resource in self.json["Resources"].items():
            props = resource.get("Properties", {})
            if resource["Type"] in ("AWS::IAM::Policy", "AWS::IAM::ManagedPolicy"):
                owners = [render(o) for key in ("Roles", "Users", "Groups") for o in props.get(key, [])] or [
                    f"<unattached {logical_id}>"
                ]
                for statement in as_list(props["PolicyDocument"]["Statement"]):
                    out += [(owner, statement) for owner in owners]
            if resource["Type"] in ("AWS::IAM::Role", "AWS::IAM::User", "AWS::IAM::Group"):
                for policy in props.get("Policies", []):
                    for statement in as_list(policy["PolicyDocument"]["Statement"]):
                        out.append((f"${{{logical_id}}}", statement))
        return out

    def logical_id(self, path_fragment: str, cfn_type: str) -> str:
        """Logical id of the resource of `cfn_type` whose id contains `path_fragment`."""
        ids = [k for k in self.resources(cfn_type) if path_fragment in k]
        assert len(ids) == 1, f"{path_fragment!r} / {cfn_type}: {ids}"
        return ids[0]


def as_list(value: Any) -> list[Any]:
    """A policy field that may be one value or a list, as a list."""
    return value if isinstance(value, list) else [value]


def policy_statements(synth: Any) -> list[tuple[str, dict[str, Any]]]:
    """(logical id, statement) for every statement of an AWS::IAM::Policy or a role's
    inline policies, owned by the resource that declares it."""
    out = []
    for logical_id, res in synth.json["Resources"].items():
        if res["Type"] == "AWS::IAM::Policy":
            out += [(logical_id, s) for s in res["Properties"]["PolicyDocument"]["Statement"]]
        if res["Type"] == "AWS::IAM::Role":
            for policy in res["Properties"].get("Policies", []):
                out += [(logical_id, s) for s in policy["PolicyDocument"]["Statement"]]
    return out


def normalised_statements(statements: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Statements with references rendered and single actions/resources as lists, sorted."""
    out = []
    for statement in statements:
        item = render(statement)
        for key in ("Action", "Resource"):
            item[key] = sorted(as_list(item[key]))
        out.append(item)
    return sorted(out, key=lambda s: json.dumps(s, sort_keys=True))


_SYNTH_DONE = "synth-complete.json"


@contextmanager
def _exclusive(lock: Path) -> Iterator[None]:
    """Hold an exclusive lock on `lock` (POSIX advisory lock; released on exit or crash)."""
    with lock.open("w") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def _synth(name: str, context: dict[str, Any], root: Path) -> Synth:
    """Synthesize `context` into `root/name`, or reuse it if another worker already did."""
    outdir = root / name
    with _exclusive(root / f"{name}.lock"):
        done = outdir / _SYNTH_DONE
        if not done.exists():
            # The built-in CloudFormation validation costs ~12 s per synth; cfn-lint covers it.
            app, stack = build_app(context, outdir=str(outdir), cloudformation_validation=False)
            app.synth()  # raises ValidationFailed on any unacknowledged cdk-nag finding
            done.write_text(json.dumps({"template": f"{stack.stack_name}.template.json"}))
        template_file = json.loads(done.read_text())["template"]
    template_json = json.loads((outdir / template_file).read_text())
    return Synth(name, outdir, Template.from_json(template_json), template_json, dict(context))


@pytest.fixture(scope="session")
def synth_root(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    # Under xdist every worker has its own session (and basetemp); their parent folder is
    # shared by the run, so the first worker's synth serves all of them. Grouping the
    # tests alone does not: pytest-xdist's loadgroup ignores xdist_group marks on pytest
    # 9.2 (pytest-dev/pytest-xdist#1386), spreading infra tests over every worker.
    if os.environ.get("PYTEST_XDIST_WORKER"):
        root = tmp_path_factory.getbasetemp().parent / "cdk"
        root.mkdir(exist_ok=True)
        yield root
    else:
        yield tmp_path_factory.mktemp("cdk")


@pytest.fixture(scope="session")
def default_synth(synth_root: Path) -> Synth:
    return _synth("default", {}, synth_root)


@pytest.fixture(scope="session")
def prod_synth(synth_root: Path) -> Synth:
    return _synth("prod", PROD_CONTEXT, synth_root)


@pytest.fixture(scope="session", params=["default", "prod"])
def any_synth(request: pytest.FixtureRequest) -> Synth:
    fixture: Synth = request.getfixturevalue(f"{request.param}_synth")
    return fixture
