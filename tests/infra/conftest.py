"""Synthesize the app once per session per configuration; every infra test reads from that.

Two configurations: the defaults from cdk.json (env-agnostic, dev, new VPC) and an
explicit-env prod deployment into an existing VPC, because cdk-nag finding ids and ARNs
render differently with a concrete account/region.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

os.environ.setdefault("JSII_SILENCE_WARNING_END_OF_LIFE_NODE_VERSION", "20")
os.environ.setdefault("CDK_DISABLE_VERSION_CHECK", "1")

from aws_cdk.assertions import Template

from infra.app import build_app


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    here = Path(__file__).parent
    for item in items:
        if here in Path(str(item.fspath)).parents:
            item.add_marker(pytest.mark.infra)


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

    def logical_id(self, path_fragment: str, cfn_type: str) -> str:
        """Logical id of the resource of `cfn_type` whose id contains `path_fragment`."""
        ids = [k for k in self.resources(cfn_type) if path_fragment in k]
        assert len(ids) == 1, f"{path_fragment!r} / {cfn_type}: {ids}"
        return ids[0]


def _synth(name: str, context: dict[str, Any], root: Path) -> Synth:
    outdir = root / name
    # The built-in CloudFormation validation costs ~12 s per synth; cfn-lint covers it.
    app, stack = build_app(context, outdir=str(outdir), cloudformation_validation=False)
    app.synth()  # raises ValidationFailed on any unacknowledged cdk-nag finding
    template_json = json.loads((outdir / f"{stack.stack_name}.template.json").read_text())
    return Synth(name, outdir, Template.from_json(template_json), template_json, dict(context))


@pytest.fixture(scope="session")
def synth_root(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
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
