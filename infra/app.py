"""CDK entry point (`cdk.json`: `python3 -m infra.app`) and the one app factory tests use.

A bare `App()` only sees `cdk.json` when the CLI runs it; `build_app` loads `cdk.json`
itself so tests synthesize exactly what the CLI deploys (feature flags included).
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from typing import Any

from aws_cdk import App, Environment, Validations
from cdk_nag import AwsSolutionsChecks

from infra.config import TrainctlConfig
from infra.packaging import REPO_ROOT
from infra.stack import TrainctlStack

CDK_JSON = REPO_ROOT / "cdk.json"


def cdk_json_context() -> dict[str, Any]:
    return dict(json.loads(CDK_JSON.read_text())["context"])


def build_app(
    context: Mapping[str, Any] | None = None,
    outdir: str | None = None,
    *,
    cloudformation_validation: bool = True,
) -> tuple[App, TrainctlStack]:
    """Build the app with cdk-nag (AwsSolutions) registered; `context` overrides cdk.json.

    `cloudformation_validation=False` skips CDK's built-in template validation (~12 s per
    synth); tests run cfn-lint instead.
    """
    app = App(
        context=cdk_json_context(),
        # Test overrides win over cdk.json (and over -c, which only the CLI passes).
        post_cli_context=dict(context or {}),
        outdir=outdir,
        builtin_cloud_formation_validation=cloudformation_validation,
    )
    config = TrainctlConfig.from_context(_context_of(app))
    env = Environment(account=config.account, region=config.region) if config.account else None
    stack = TrainctlStack(
        app,
        config.stack_name,
        config=config,
        env=env,
        description="trainctl: keeps ML training jobs on EC2 Spot alive through interruptions",
    )
    Validations.of(app).add_plugins(AwsSolutionsChecks(app))
    return app, stack


def _context_of(app: App) -> dict[str, Any]:
    """Every `trainctl:*` key visible to the app (cdk.json, -c, overrides), by precedence."""
    keys = set(cdk_json_context())
    keys |= set(json.loads(os.environ.get("CDK_CONTEXT_JSON", "{}")))
    keys |= set(app.node.get_all_context() or {})
    return {k: app.node.try_get_context(k) for k in keys if k.startswith("trainctl:")}


def main() -> None:
    app, _ = build_app()
    app.synth()


if __name__ == "__main__":
    main()
