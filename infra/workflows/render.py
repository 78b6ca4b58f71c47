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
# Throttling (RequestLimitExceeded) and EC2 server errors: the same RunInstances again after
# 2, 4, 8 and 16 s (30 s in all, a quarter of the Spot notice), then the launch fails.
DEFAULT_LAUNCH_RETRIES = 4
DEFAULT_LAUNCH_RETRY_SECONDS = 2


# The longest handshake an input may ask for (ValidateInput enforces the same bound): the
# rest of the execution's hour is left for the launch rounds and the record.
MAX_HANDSHAKE_TIMEOUT_SECONDS = 1800


@dataclass(frozen=True)
class WorkflowTuning:
    """Numbers the ASL reads through substitutions (strings in the definition).

    `launch_rounds` rounds over every pool with `launch_backoff_seconds` (doubling) between
    them; a throttled or server-failed RunInstances is repeated up to `launch_retries`
    times, `launch_retry_seconds` (doubling) apart.
    """

    handshake_timeout_seconds: int = DEFAULT_HANDSHAKE_TIMEOUT_SECONDS
    launch_rounds: int = DEFAULT_LAUNCH_ROUNDS
    launch_backoff_seconds: int = DEFAULT_LAUNCH_BACKOFF_SECONDS
    launch_retries: int = DEFAULT_LAUNCH_RETRIES
    launch_retry_seconds: int = DEFAULT_LAUNCH_RETRY_SECONDS

    def __post_init__(self) -> None:
        # The ASL reads these as whole numbers of seconds/rounds; a bad value would only
        # show up as a failed execution in the middle of a recovery.
        limits = {
            "handshake_timeout_seconds": (1, MAX_HANDSHAKE_TIMEOUT_SECONDS),
            "launch_rounds": (1, 10),
            "launch_backoff_seconds": (1, 600),
            "launch_retries": (0, 10),
            "launch_retry_seconds": (1, 60),
        }
        for name, (low, high) in limits.items():
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or not low <= value <= high:
                raise ValueError(
                    f"WorkflowTuning.{name} must be a whole number from {low} to {high}, got {value!r}"
                )


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
        "LaunchRetries": str(tuning.launch_retries),
        "LaunchRetrySeconds": str(tuning.launch_retry_seconds),
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
