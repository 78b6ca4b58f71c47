"""Load the resume workflow's ASL and fill in its `${...}` placeholders.

`resume.asl.json` is deployed as is: the construct hands its text to CloudFormation with
`DefinitionSubstitutions`, which replaces each `${Name}` at deploy time. Tests and the
offline rehearsal call `render` with concrete values to get the very same definition that
AWS would run; `placeholders` lets a test prove the two sides name the same keys.

The stored file is JSON except for one spot: `"TimeoutSeconds": ${ExecutionTimeoutSeconds}`
(a number, so its placeholder cannot sit inside quotes). Parse the rendered text, not the file.
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from annotated_types import MaxLen

from trainctl_core.jobs import JobSpec
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

# The longest handshake an input may ask for (ValidateInput enforces the same bound).
MAX_HANDSHAKE_TIMEOUT_SECONDS = 1800

# The most capacity pools a job may list (JobSpec.pools): the launch loop's worst case grows
# with it, and the execution timeout must cover the worst case of any job.
MAX_POOLS: int = next(m.max_length for m in JobSpec.model_fields["pools"].metadata if isinstance(m, MaxLen))
# What one AWS call may take (RunInstances usually answers within a second or two).
CALL_SECONDS = 5
# Everything outside the launch loop and the handshake's wait: validating, loading, the
# handshake's token write and checkpoint read, recording, retiring, notifying, or the
# failure path's sweep, mark and alert. Every such task is tried at most 4 times (3 retries
# 1, 2 and 4 s apart); a test checks that the definition's tasks fit in this.
OTHER_STATES_SECONDS = 900
# A recovery whose worst case is longer than this is a mistake in the tuning, not a plan.
MAX_EXECUTION_TIMEOUT_SECONDS = 24 * 3600


@dataclass(frozen=True)
class WorkflowTuning:
    """Numbers the ASL reads through substitutions (strings in the definition).

    `launch_rounds` rounds over every pool with `launch_backoff_seconds` (doubling) between
    them; a throttled or server-failed RunInstances is repeated up to `launch_retries`
    times, `launch_retry_seconds` (doubling) apart. The execution's timeout is derived from
    them (`execution_timeout_seconds`), so no legitimate recovery is cut off: a timed-out
    execution marks nothing FAILED, terminates nothing and alerts nobody.
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
        worst = self.worst_case_seconds()
        if worst > MAX_EXECUTION_TIMEOUT_SECONDS:
            raise ValueError(
                f"WorkflowTuning: with launch_rounds={self.launch_rounds}, "
                f"launch_backoff_seconds={self.launch_backoff_seconds}, launch_retries={self.launch_retries} "
                f"and launch_retry_seconds={self.launch_retry_seconds}, a recovery of a {MAX_POOLS}-pool job "
                f"can take {worst} s, more than the {MAX_EXECUTION_TIMEOUT_SECONDS} s an execution may run: "
                "lower launch_rounds or launch_backoff_seconds (the backoff doubles every round), or "
                "launch_retries"
            )

    def launch_calls(self, pools: int) -> int:
        """RunInstances calls of a launch that fails every way it can over `pools` pools.

        Each round tries every pool on Spot and then on-demand, and in each of them the call is
        throttled `launch_retries` times before a capacity error moves on.
        """
        return self.launch_rounds * 2 * pools * (self.launch_retries + 1)

    def launch_wait_seconds(self, pools: int) -> int:
        """Seconds the same launch spends in its Wait states (retry backoffs and round backoffs)."""
        retry_waits = self.launch_retry_seconds * (2**self.launch_retries - 1)
        round_waits = self.launch_backoff_seconds * (2 ** (self.launch_rounds - 1) - 1)
        return self.launch_rounds * 2 * pools * retry_waits + round_waits

    def worst_case_seconds(self, pools: int = MAX_POOLS) -> int:
        """The longest a recovery can legitimately take.

        The two Parallel branches run side by side: the longer of the handshake's wait (an
        input may ask for up to MAX_HANDSHAKE_TIMEOUT_SECONDS) and the launch, plus every other
        state. State transitions themselves take milliseconds and are not counted.
        """
        launch = self.launch_calls(pools) * CALL_SECONDS + self.launch_wait_seconds(pools)
        return max(launch, MAX_HANDSHAKE_TIMEOUT_SECONDS) + OTHER_STATES_SECONDS

    @property
    def execution_timeout_seconds(self) -> int:
        """The state machine's TimeoutSeconds: the worst case, rounded up to whole minutes."""
        return math.ceil(self.worst_case_seconds() / 60) * 60


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
    partition: str = "aws",
) -> dict[str, str]:
    """Every substitution the resume ASL needs; values may be CDK tokens.

    `partition` names the service integrations' ARNs (`arn:<partition>:states:::…`): Step
    Functions refuses an integration of another partition than the execution's.
    """
    return {
        "Partition": partition,
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
        "ExecutionTimeoutSeconds": str(tuning.execution_timeout_seconds),
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
