"""What importing a module drags in, and what the observability singletons read.

Each check runs in a fresh interpreter: in this process boto3 and the Powertools
singletons are long loaded, which would hide both a stray import and a stale setting.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

SDK_PACKAGES = ("boto3", "botocore", "s3transfer")


def run_python(code: str, env: dict[str, str] | None = None) -> str:
    completed = subprocess.run(
        [sys.executable, "-c", code],
        capture_output=True,
        text=True,
        env=env if env is not None else dict(os.environ),
        timeout=60,
        check=False,
    )
    assert completed.returncode == 0, completed.stderr
    return completed.stdout.strip()


@pytest.mark.parametrize(
    "module",
    ["trainctl_core.jobs", "trainctl_core.errors", "trainctl_core.recovery"],
)
def test_domain_modules_do_not_load_an_aws_sdk(module: str) -> None:
    # Domain code takes its adapters as ports: importing it must not import boto3.
    loaded = run_python(
        f"import sys, json, {module}; "
        f"print(json.dumps(sorted(m for m in sys.modules if m.split('.')[0] in {SDK_PACKAGES!r})))"
    )
    assert json.loads(loaded) == []


def test_the_adapters_raise_the_domain_errors() -> None:
    # The store and the SSM adapter re-export the errors from `errors`: one class each,
    # so `except ConcurrentUpdate` in the domain catches what the store raises.
    from trainctl_core import commands, errors, store, workflow

    assert store.ConcurrentUpdate is errors.ConcurrentUpdate
    assert store.JobAlreadyExists is errors.JobAlreadyExists
    assert store.Superseded is errors.Superseded
    assert commands.InstanceUnreachable is errors.InstanceUnreachable
    assert issubclass(errors.InstanceUnreachable, errors.CheckpointRequestFailed)
    assert workflow.HandshakeError is errors.HandshakeError


OBSERVED = (
    "from trainctl_core.observability import logger, metrics, tracer; import json; "
    "print(json.dumps([logger.service, metrics.namespace, metrics.service, tracer.service]))"
)


def _env_without_powertools_names() -> dict[str, str]:
    env = dict(os.environ)
    env.pop("POWERTOOLS_SERVICE_NAME", None)
    env.pop("POWERTOOLS_METRICS_NAMESPACE", None)
    return env


def test_the_powertools_variables_name_the_service_and_the_namespace() -> None:
    env = _env_without_powertools_names() | {
        "POWERTOOLS_SERVICE_NAME": "trainctl-interruption",
        "POWERTOOLS_METRICS_NAMESPACE": "trainctl-staging",
    }

    observed = json.loads(run_python(OBSERVED, env))

    assert observed == [
        "trainctl-interruption",
        "trainctl-staging",
        "trainctl-interruption",
        "trainctl-interruption",
    ]


def test_without_the_variables_the_defaults_apply() -> None:
    observed = json.loads(run_python(OBSERVED, _env_without_powertools_names()))

    assert observed == ["trainctl", "trainctl", "trainctl", "trainctl"]
