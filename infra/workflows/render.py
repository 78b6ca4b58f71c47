"""Load the resume workflow's ASL and fill in its `${...}` placeholders.

`resume.asl.json` is deployed as is: the construct hands its text to CloudFormation with
`DefinitionSubstitutions`, which replaces each `${Name}` at deploy time. Tests and the
offline rehearsal call `render` with concrete values to get the very same definition that
AWS would run; `placeholders` lets a test prove the two sides name the same keys.
"""

from __future__ import annotations

import json
import re
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from trainctl_core.settings import SPOT_NOTICE_SECONDS, TAG_ATTEMPT, TAG_JOB_ID, TAG_MANAGED

RESUME_ASL_PATH = Path(__file__).with_name("resume.asl.json")

_PLACEHOLDER = re.compile(r"\$\{([A-Za-z][A-Za-z0-9]*)\}")

# Tuning knobs with their deployed values. A few seconds of margin under the two-minute
# notice: past the reclaim there is no final checkpoint left to wait for.
DEFAULT_HANDSHAKE_TIMEOUT_SECONDS = SPOT_NOTICE_SECONDS - 10
DEFAULT_LAUNCH_ROUNDS = 3
DEFAULT_LAUNCH_BACKOFF_SECONDS = 30


@dataclass(frozen=True)
class WorkflowTuning:
    """Numbers the ASL reads through substitutions (strings in the definition)."""

    handshake_timeout_seconds: int = DEFAULT_HANDSHAKE_TIMEOUT_SECONDS
    launch_rounds: int = DEFAULT_LAUNCH_ROUNDS
    launch_backoff_seconds: int = DEFAULT_LAUNCH_BACKOFF_SECONDS


def load_resume_definition() -> str:
    """The ASL text exactly as stored (placeholders unfilled)."""
    return RESUME_ASL_PATH.read_text(encoding="utf-8")


def placeholders(definition: str) -> set[str]:
    """Names of the `${Name}` placeholders in `definition`."""
    return set(_PLACEHOLDER.findall(definition))


def substitutions(
    *,
    jobs_table_name: str,
    alerts_topic_arn: str,
    launch_template_id: str,
    launch_template_version: str,
    tuning: WorkflowTuning = WorkflowTuning(),
) -> dict[str, str]:
    """Every substitution the resume ASL needs; values may be CDK tokens."""
    return {
        "JobsTableName": jobs_table_name,
        "AlertsTopicArn": alerts_topic_arn,
        "LaunchTemplateId": launch_template_id,
        "LaunchTemplateVersion": launch_template_version,
        "TagManaged": TAG_MANAGED,
        "TagJobId": TAG_JOB_ID,
        "TagAttempt": TAG_ATTEMPT,
        "HandshakeTimeoutSeconds": str(tuning.handshake_timeout_seconds),
        "LaunchRounds": str(tuning.launch_rounds),
        "LaunchBackoffSeconds": str(tuning.launch_backoff_seconds),
    }


def render(definition: str, values: Mapping[str, str]) -> str:
    """Replace `${Name}` like CloudFormation's DefinitionSubstitutions; unknown names fail."""
    missing = placeholders(definition) - set(values)
    if missing:
        raise KeyError(f"no substitution for: {', '.join(sorted(missing))}")
    return _PLACEHOLDER.sub(lambda m: values[m.group(1)], definition)


def render_resume(values: Mapping[str, str]) -> dict[str, Any]:
    """The resume workflow as AWS would run it with `values`, parsed."""
    parsed: dict[str, Any] = json.loads(render(load_resume_definition(), values))
    return parsed
