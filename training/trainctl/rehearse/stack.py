"""The synthesized stack, read as data: what the rehearsal provisions in moto.

The template comes from the same app factory `cdk synth` and the infra tests use
(`infra.app.build_app`), synthesized in a subprocess (jsii starts a node process; it
should not live in the rehearsal's) with `REHEARSAL_CONTEXT`, and cached by a hash of
`infra/`, `cdk.json` and that context, so a second rehearsal skips the synth. Nothing here
is a second copy of the stack: every schema, pattern, document, definition and allowed
instance type is read from the template.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from infra.packaging import REPO_ROOT
from trainctl.commands.stack import OUTPUT_INSTANCE_TYPES  # the output `trainctl submit` reads

CACHE_ENV = "TRAINCTL_REHEARSE_CACHE"
# The stage the rehearsal (and the opt-in AWS suite, which deploys with the same `-c`
# values) synthesizes: CPU instance types, because its jobs are small CPU scripts. The
# default stack allows only GPU types (infra/config.py); the types a stage allows are a
# deploy-time setting, so this is the stack a user with a CPU stage would deploy, and the
# rehearsal's capacity pools are read back from the template (`allowed_instance_types`).
REHEARSAL_CONTEXT: dict[str, str] = {"trainctl:allowed_instance_types": "m5.large,c5.large"}
_SYNTH_SCRIPT = """
import json, sys
from infra.app import build_app
app, stack = build_app(json.loads(sys.argv[2]), outdir=sys.argv[1], cloudformation_validation=False)
app.synth()
print(json.dumps({"stack_name": stack.stack_name}))
"""


class StackError(RuntimeError):
    """The template could not be synthesized or lacks a resource the rehearsal needs."""


@dataclass(frozen=True)
class RuleSpec:
    logical_id: str
    pattern: dict[str, Any]
    target_function: str  # logical id of the Lambda function the rule invokes


@dataclass(frozen=True)
class FunctionSpec:
    logical_id: str
    handler: str  # "functions.interruption.handler.handler"
    environment: dict[str, Any]  # values may be intrinsics ({"Ref": ...})

    @property
    def module(self) -> str:
        return self.handler.rsplit(".", 1)[0]

    @property
    def attribute(self) -> str:
        return self.handler.rsplit(".", 1)[1]


@dataclass(frozen=True)
class StackSpec:
    """The resources of the synthesized template the rehearsal recreates."""

    template: dict[str, Any]

    @property
    def resources(self) -> dict[str, dict[str, Any]]:
        resources: dict[str, dict[str, Any]] = self.template["Resources"]
        return resources

    def of_type(self, cfn_type: str) -> dict[str, dict[str, Any]]:
        return {k: v for k, v in self.resources.items() if v["Type"] == cfn_type}

    def one(self, cfn_type: str, fragment: str = "") -> tuple[str, dict[str, Any]]:
        """(logical id, Properties) of the one resource of `cfn_type` whose id has `fragment`."""
        found = {k: v for k, v in self.of_type(cfn_type).items() if fragment in k}
        if len(found) != 1:
            raise StackError(
                f"expected one {cfn_type} matching {fragment!r} in the template, found {sorted(found)}"
            )
        logical_id, resource = next(iter(found.items()))
        return logical_id, dict(resource.get("Properties", {}))

    @property
    def jobs_table(self) -> tuple[str, dict[str, Any]]:
        return self.one("AWS::DynamoDB::Table", "JobsTable")

    @property
    def idempotency_table(self) -> tuple[str, dict[str, Any]]:
        return self.one("AWS::DynamoDB::Table", "IdempotencyTable")

    @property
    def checkpoint_bucket(self) -> tuple[str, dict[str, Any]]:
        return self.one("AWS::S3::Bucket", "CheckpointBucket")

    @property
    def checkpoint_document(self) -> tuple[str, dict[str, Any]]:
        return self.one("AWS::SSM::Document", "CheckpointDocument")

    @property
    def launch_template(self) -> tuple[str, dict[str, Any]]:
        return self.one("AWS::EC2::LaunchTemplate")

    @property
    def state_machine(self) -> tuple[str, dict[str, Any]]:
        return self.one("AWS::StepFunctions::StateMachine", "Resume")

    @property
    def alerts_topic(self) -> tuple[str, dict[str, Any]]:
        return self.one("AWS::SNS::Topic", "Alerts")

    @property
    def subnets(self) -> list[tuple[str, dict[str, Any]]]:
        return sorted((k, dict(v.get("Properties", {}))) for k, v in self.of_type("AWS::EC2::Subnet").items())

    @property
    def vpc(self) -> tuple[str, dict[str, Any]]:
        return self.one("AWS::EC2::VPC")

    @property
    def allowed_instance_types(self) -> list[str]:
        """The instance types the stack lets the resume workflow launch (its output)."""
        output = self.template.get("Outputs", {}).get(OUTPUT_INSTANCE_TYPES, {})
        value = output.get("Value")
        if not isinstance(value, str) or not value.strip():
            raise StackError(f"the template has no {OUTPUT_INSTANCE_TYPES} output listing instance types")
        return [t.strip() for t in value.split(",") if t.strip()]

    @property
    def rules(self) -> list[RuleSpec]:
        rules = []
        for logical_id, resource in sorted(self.of_type("AWS::Events::Rule").items()):
            props = resource.get("Properties", {})
            for target in props.get("Targets", []):
                arn = target.get("Arn", {})
                function = arn.get("Fn::GetAtt", [None])[0] if isinstance(arn, dict) else None
                if function in self.resources and self.resources[function]["Type"] == "AWS::Lambda::Function":
                    rules.append(RuleSpec(logical_id, dict(props["EventPattern"]), function))
        if not rules:
            raise StackError("the template has no EventBridge rule targeting a Lambda function")
        return rules

    def function(self, logical_id: str) -> FunctionSpec:
        props = self.resources[logical_id]["Properties"]
        return FunctionSpec(
            logical_id=logical_id,
            handler=str(props["Handler"]),
            environment=dict(props.get("Environment", {}).get("Variables", {})),
        )


def source_hash(root: Path = REPO_ROOT) -> str:
    """Hash of everything the template is made from (infra/, cdk.json, the synth context)."""
    digest = hashlib.sha256()
    digest.update(json.dumps(REHEARSAL_CONTEXT, sort_keys=True).encode())
    files = sorted(p for p in (root / "infra").rglob("*") if p.is_file() and "__pycache__" not in p.parts)
    for path in [*files, root / "cdk.json"]:
        digest.update(str(path.relative_to(root)).encode())
        digest.update(path.read_bytes())
    return digest.hexdigest()[:20]


def cache_dir() -> Path:
    configured = os.environ.get(CACHE_ENV)
    if configured:
        return Path(configured)
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "trainctl" / "rehearse"


def load_stack(cache: Path | None = None) -> StackSpec:
    """The synthesized template, from the cache when infra/ and cdk.json are unchanged."""
    cache = cache or cache_dir()
    cached = cache / f"template-{source_hash()}.json"
    if cached.exists():
        return StackSpec(json.loads(cached.read_text()))
    template = synthesize()
    cache.mkdir(parents=True, exist_ok=True)
    # Atomic: parallel rehearsals (pytest -n 2) may synthesize at the same time.
    fd, tmp = tempfile.mkstemp(dir=cache, suffix=".tmp")
    with os.fdopen(fd, "w") as handle:
        json.dump(template, handle)
    os.replace(tmp, cached)
    return StackSpec(template)


def synthesize() -> dict[str, Any]:
    """Run the app factory (with `REHEARSAL_CONTEXT`) in a subprocess; return the template."""
    # CDK's Python library runs its constructs in Node.js (jsii): without it, synth fails
    # with a long traceback whose last line does not say so.
    node = os.environ.get("JSII_NODE", "node")
    if shutil.which(node) is None:
        raise StackError(
            f"synthesizing the stack needs Node.js, and {node!r} is not on PATH: install Node.js "
            "20 or newer, as the README says, or point JSII_NODE at it"
        )
    with tempfile.TemporaryDirectory(prefix="trainctl-synth-") as outdir:
        environment = {
            **os.environ,
            "JSII_SILENCE_WARNING_END_OF_LIFE_NODE_VERSION": "20",
            "JSII_SILENCE_WARNING_UNTESTED_NODE_VERSION": "1",
            "CDK_DISABLE_VERSION_CHECK": "1",
        }
        done = subprocess.run(
            [sys.executable, "-c", _SYNTH_SCRIPT, outdir, json.dumps(REHEARSAL_CONTEXT)],
            cwd=REPO_ROOT,
            env=environment,
            capture_output=True,
            text=True,
            check=False,
        )
        if done.returncode != 0:
            raise StackError(f"cdk synth failed (exit {done.returncode}): {done.stderr.strip()[-2000:]}")
        stack_name = json.loads(done.stdout.strip().splitlines()[-1])["stack_name"]
        template: dict[str, Any] = json.loads((Path(outdir) / f"{stack_name}.template.json").read_text())
        return template
