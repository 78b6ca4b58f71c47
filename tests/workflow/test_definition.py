"""The deployed definition is the tested one, and the role grants exactly what it calls.

Synthesizes the real app once (cdk-nag included: synthesis fails on any unacknowledged
finding) and compares its state machine with `infra/workflows/resume.asl.json`.
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

os.environ.setdefault("JSII_SILENCE_WARNING_DEPRECATED_NODE_VERSION", "1")
os.environ.setdefault("CDK_DISABLE_VERSION_CHECK", "1")

from infra.app import build_app
from infra.workflows.render import (
    CALL_SECONDS,
    MAX_EXECUTION_TIMEOUT_SECONDS,
    MAX_HANDSHAKE_TIMEOUT_SECONDS,
    MAX_POOLS,
    OTHER_STATES_SECONDS,
    WorkflowTuning,
    load_resume_definition,
    placeholders,
    render_resume,
    substitutions,
)
from tests.workflow.conftest import CAPACITY_MESSAGES, TRANSIENT_MESSAGES
from trainctl_core.jobs import JOB_ID_PATTERN, CapacityPool, InterruptionReason, JobSpec
from trainctl_core.settings import TAG_ATTEMPT, TAG_JOB_ID, TAG_MANAGED

# What Step Functions itself needs for LogLevel.ALL delivery and X-Ray, added by CDK;
# these actions have no resource-level permissions.
PLATFORM_ACTIONS = {
    "logs:CreateLogDelivery",
    "logs:DeleteLogDelivery",
    "logs:DescribeLogGroups",
    "logs:DescribeResourcePolicies",
    "logs:GetLogDelivery",
    "logs:ListLogDeliveries",
    "logs:PutResourcePolicy",
    "logs:UpdateLogDelivery",
    "xray:GetSamplingRules",
    "xray:GetSamplingTargets",
    "xray:PutTelemetryRecords",
    "xray:PutTraceSegments",
}
# Actions an API call needs besides its own: RunInstances tags at launch (TagSpecifications)
# and passes the launch template's instance profile role; publishing to a KMS-encrypted
# topic needs the key.
IMPLIED_ACTIONS = {
    "ec2:RunInstances": {"ec2:CreateTags", "iam:PassRole"},
    "sns:Publish": {"kms:Decrypt", "kms:GenerateDataKey"},
}
CAPACITY_CODES = [
    "InsufficientInstanceCapacity",
    "SpotMaxPriceTooLow",
    "MaxSpotInstanceCountExceeded",
    "Unsupported",
    "InsufficientFreeAddressesInSubnet",
]
# How an EC2 error reaches a Catch: on AWS `Ec2.Ec2Exception` with EC2's message and the
# request's details as the cause; moto keeps the shape with a lower-case name.
EC2_ERROR_SHAPES = [
    ("Ec2.Ec2Exception", "{message} (Service: Ec2, Status Code: 500, Request ID: 7c1a0e1b-0f7e)"),
    ("ec2.ec2Exception", "{message} (Service: ec2, Status Code: 400, Request ID: request-id)"),
]


@pytest.fixture(scope="module")
def template(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, Any]]:
    outdir: Path = tmp_path_factory.mktemp("cdk-workflow")
    app, stack = build_app({}, outdir=str(outdir), cloudformation_validation=False)
    app.synth()  # raises on any unacknowledged cdk-nag finding, ours included
    yield json.loads((outdir / f"{stack.stack_name}.template.json").read_text())


def _state_machine(template: dict[str, Any]) -> dict[str, Any]:
    (machine,) = [
        r for r in template["Resources"].values() if r["Type"] == "AWS::StepFunctions::StateMachine"
    ]
    return dict(machine["Properties"])


def _states(definition: dict[str, Any]) -> Iterator[tuple[str, dict[str, Any]]]:
    """Every state, including those inside Parallel branches and Map processors."""
    for name, state in definition["States"].items():
        yield name, state
        for branch in state.get("Branches", []):
            yield from _states(branch)
        if "ItemProcessor" in state:
            yield from _states(state["ItemProcessor"])


DEPLOYED_TUNING = WorkflowTuning()


def _definition(tuning: WorkflowTuning = DEPLOYED_TUNING) -> dict[str, Any]:
    return render_resume(
        substitutions(
            jobs_table_name="jobs",
            alerts_topic_arn="arn:aws:sns:us-east-1:123456789012:alerts",
            launch_template_id="lt-0123456789abcdef0",
            launch_template_version="1",
            tuning=tuning,
        )
    )


def _api_actions(definition: dict[str, Any]) -> set[str]:
    """IAM actions of every Task resource: ...:service:apiName[.pattern] -> service:ApiName."""
    actions = set()
    for _, state in _states(definition):
        if state["Type"] != "Task":
            continue
        match = re.fullmatch(
            r"arn:aws:states:::(?:aws-sdk:)?([a-z0-9]+):([A-Za-z]+)(?:\.\w+)?", state["Resource"]
        )
        assert match, f"unexpected resource {state['Resource']}"
        service, api = match.groups()
        actions.add(f"{service}:{api[0].upper()}{api[1:]}")
    return actions


# --- the deployed definition is the file ---------------------------------------------------


def test_template_deploys_the_file_verbatim_with_every_placeholder_substituted(
    template: dict[str, Any],
) -> None:
    machine = _state_machine(template)
    assert machine["DefinitionString"] == load_resume_definition()
    assert set(machine["DefinitionSubstitutions"]) == placeholders(load_resume_definition())
    assert machine["StateMachineType"] == "STANDARD"
    assert machine["TracingConfiguration"] == {"Enabled": True}
    assert machine["LoggingConfiguration"]["Level"] == "ALL"


def test_tests_render_with_the_same_substitution_keys_as_the_stack(template: dict[str, Any]) -> None:
    deployed = _state_machine(template)["DefinitionSubstitutions"]
    ours = substitutions(
        jobs_table_name="t", alerts_topic_arn="a", launch_template_id="l", launch_template_version="1"
    )
    assert set(ours) == set(deployed)
    # Plain values (not tokens) are identical, e.g. the tag keys and tuning.
    plain = {k: v for k, v in deployed.items() if isinstance(v, str)}
    assert plain == {k: ours[k] for k in plain}


def test_log_group_is_encrypted_with_kms(template: dict[str, Any]) -> None:
    destination = _state_machine(template)["LoggingConfiguration"]["Destinations"][0]
    log_group_id = destination["CloudWatchLogsLogGroup"]["LogGroupArn"]["Fn::GetAtt"][0]
    assert "KmsKeyId" in template["Resources"][log_group_id]["Properties"]


# --- IAM: exactly what the ASL calls ---------------------------------------------------------


def test_role_grants_exactly_the_actions_the_definition_calls(template: dict[str, Any]) -> None:
    role_id = _state_machine(template)["RoleArn"]["Fn::GetAtt"][0]
    granted: set[str] = set()
    for resource in template["Resources"].values():
        if resource["Type"] == "AWS::IAM::Policy" and {"Ref": role_id} in resource["Properties"].get(
            "Roles", []
        ):
            for statement in resource["Properties"]["PolicyDocument"]["Statement"]:
                assert statement["Effect"] == "Allow"
                action = statement["Action"]
                granted |= {action} if isinstance(action, str) else set(action)

    called = _api_actions(_definition())
    assert called == {
        "dynamodb:GetItem",
        "dynamodb:UpdateItem",
        "ec2:DescribeInstances",
        "ec2:RunInstances",
        "ec2:TerminateInstances",
        "sns:Publish",
    }
    expected = called | PLATFORM_ACTIONS
    for action in called:
        expected |= IMPLIED_ACTIONS.get(action, set())
    assert granted == expected


# --- the definition keeps to what both AWS and moto run -----------------------------------


def test_definition_is_jsonpath_only_without_lambda_or_variables() -> None:
    text = load_resume_definition()
    definition = _definition()
    assert definition.get("QueryLanguage", "JSONPath") == "JSONPath"
    for name, state in _states(definition):
        assert "Assign" not in state and state.get("QueryLanguage", "JSONPath") == "JSONPath", name
        assert "lambda" not in state.get("Resource", ""), name
    # moto returns a one-element list for `$.a[0].b`: index with States.ArrayGetItem instead.
    assert not re.search(r"\$[\w.]*\[\d+\]\.", text)


def test_tags_are_the_shared_constants() -> None:
    (launch,) = [s for n, s in _states(_definition()) if n == "LaunchSpot"]
    for spec in launch["Parameters"]["TagSpecifications"]:
        assert [t["Key"] for t in spec["Tags"]] == [TAG_MANAGED, TAG_JOB_ID, TAG_ATTEMPT]
    assert [s["ResourceType"] for s in launch["Parameters"]["TagSpecifications"]] == ["instance", "volume"]


def test_reasons_are_the_domain_values() -> None:
    text = load_resume_definition()
    for reason in InterruptionReason:
        assert f'"{reason.value}"' in text


def _string_matches(value: str, pattern: str) -> bool:
    """ASL's StringMatches: `*` is any run of characters (our patterns escape nothing)."""
    regex = ".*".join(re.escape(part) for part in pattern.split("*"))
    return re.fullmatch(regex, value, flags=re.DOTALL) is not None


def _rule_holds(rule: dict[str, Any], error: dict[str, str], retries: int = 0) -> bool:
    """Evaluate a ClassifyLaunchError rule against `$.launch.error` (and the retry count)."""
    if "Or" in rule:
        return any(_rule_holds(r, error, retries) for r in rule["Or"])
    if "And" in rule:
        return all(_rule_holds(r, error, retries) for r in rule["And"])
    if "Not" in rule:
        return not _rule_holds(rule["Not"], error, retries)
    if rule["Variable"] == "$.launch.cursor.retries":
        assert rule["NumericLessThanPath"] == "$.launch.retry.limit"
        return retries < 2
    field = {"$.launch.error.Error": "Error", "$.launch.error.Cause": "Cause"}[rule["Variable"]]
    if "IsPresent" in rule:
        return (field in error) is rule["IsPresent"]
    return _string_matches(error[field], rule["StringMatches"])


def _classify(error: dict[str, str], retries: int = 0) -> str:
    state = dict(_states(_definition()))["ClassifyLaunchError"]
    for rule in state["Choices"]:
        if _rule_holds(rule, error, retries):
            return str(rule["Next"])
    return str(state["Default"])


def test_every_ec2_error_is_classified_in_one_place() -> None:
    states = dict(_states(_definition()))
    for launch in ("LaunchSpot", "LaunchOnDemand"):
        assert states[launch]["Catch"] == [
            {"ErrorEquals": ["States.ALL"], "ResultPath": "$.launch.error", "Next": "ClassifyLaunchError"}
        ]
        assert "Retry" not in states[launch]  # a Retry cannot tell throttling from capacity


@pytest.mark.parametrize(("name", "cause"), EC2_ERROR_SHAPES, ids=["aws", "moto"])
def test_capacity_errors_are_recognised_by_message(name: str, cause: str) -> None:
    for code, messages in CAPACITY_MESSAGES.items():
        for message in messages:
            text = message.format(
                type="g5.xlarge", az="us-east-1a", other_azs="us-east-1b, us-east-1c", subnet="subnet-0abc"
            )
            error = {"Error": name, "Cause": cause.format(message=text)}
            assert _classify(error) == "CapacityError", (code, text)


@pytest.mark.parametrize(("name", "cause"), EC2_ERROR_SHAPES, ids=["aws", "moto"])
def test_transient_errors_are_retried_a_bounded_number_of_times(name: str, cause: str) -> None:
    for message in TRANSIENT_MESSAGES.values():
        error = {"Error": name, "Cause": cause.format(message=message)}
        assert _classify(error, retries=0) == "RetryLaunchBackoff", message
        assert _classify(error, retries=2) == "LaunchFailed", message


@pytest.mark.parametrize(
    "message",
    [
        "Value (ami-0) for parameter image is invalid.",
        "You are not authorized to perform this operation.",
        "The parameter iamInstanceProfile.name may not be used in combination with iamInstanceProfile.arn",
    ],
)
def test_other_errors_fail_the_launch(message: str) -> None:
    for name, cause in EC2_ERROR_SHAPES:
        assert _classify({"Error": name, "Cause": cause.format(message=message)}) == "LaunchFailed"


def test_run_instances_asks_for_termination_on_shutdown_and_a_token_per_round() -> None:
    states = dict(_states(_definition()))
    for launch, market in (("LaunchSpot", "spot"), ("LaunchOnDemand", "on-demand")):
        parameters = states[launch]["Parameters"]
        assert parameters["InstanceInitiatedShutdownBehavior"] == "terminate"
        token = parameters["ClientToken.$"]
        for part in (
            "$.job_id",
            "$.job.next_attempt",
            "$.launch.cursor.pool.label",
            "$.launch.round.n",
            # Another execution for the same attempt (an operator's re-run) must not be handed
            # the instance an earlier execution launched (and may have terminated) with it.
            "$$.Execution.Id",
        ):
            assert part in token
        assert f"/{market}/" in token


def test_the_handshake_branch_cannot_fail_the_parallel() -> None:
    # A failing branch stops the other one: the launch branch would lose the instance it
    # launched. So every task of the handshake branch catches everything, it has no Fail
    # state, and nothing reads the (agent-supplied) callback payload.
    recover = dict(_states(_definition()))["Recover"]
    handshake = recover["Branches"][0]["States"]
    for name, state in handshake.items():
        assert state["Type"] != "Fail", name
        if state["Type"] == "Task":
            assert any(c["ErrorEquals"] == ["States.ALL"] for c in state.get("Catch", [])), name
    await_state = handshake["AwaitFinalCheckpoint"]
    assert "ResultSelector" not in await_state and await_state["ResultPath"] is None
    assert await_state["Next"] == "ReadCheckpoints"
    # The launch branch fails only through its own two errors, which the Parallel catches.
    launch = recover["Branches"][1]["States"]
    fails = {s["Error"] for s in launch.values() if s["Type"] == "Fail"}
    assert fails == {"trainctl.LaunchFailed", "trainctl.CapacityExhausted"}
    assert set(recover["Catch"][0]["ErrorEquals"]) == fails
    assert recover["Catch"][-1]["ErrorEquals"] == ["States.ALL"]


def test_every_task_after_the_launch_is_caught() -> None:
    # From the Parallel on, an uncaught error would end the execution with a replacement
    # running and the job stuck; only the final notifications may fail the execution.
    top = _definition()["States"]
    reachable: list[str] = []
    frontier = ["Recover"]
    while frontier:
        name = frontier.pop()
        if name in reachable:
            continue
        reachable.append(name)
        state = top[name]
        nexts = [state.get("Next"), state.get("Default")]
        nexts += [c.get("Next") for c in state.get("Choices", [])] + [
            c["Next"] for c in state.get("Catch", [])
        ]
        frontier += [n for n in nexts if n]
    for name in reachable:
        state = top[name]
        if state["Type"] == "Task" and not state["Resource"].endswith(":sns:publish"):
            assert any(c["ErrorEquals"] == ["States.ALL"] for c in state.get("Catch", [])), name


def test_input_bounds_match_the_tuning_limits() -> None:
    text = json.dumps(dict(_states(_definition()))["ValidateInput"])
    assert f'"NumericLessThanEquals": {MAX_HANDSHAKE_TIMEOUT_SECONDS}' in text
    with pytest.raises(ValueError, match="handshake_timeout_seconds"):
        WorkflowTuning(handshake_timeout_seconds=MAX_HANDSHAKE_TIMEOUT_SECONDS + 1)
    with pytest.raises(ValueError, match="launch_retry_seconds"):
        WorkflowTuning(launch_retry_seconds=0)


def test_run_instances_is_the_third_transition_after_the_guard() -> None:
    # Guard -> Recover (Parallel) -> ConsiderPool (Choice) -> LaunchSpot
    states = dict(_states(_definition()))
    assert states["Guard"]["Default"] == "Recover"
    launch_branch = states["Recover"]["Branches"][1]
    assert launch_branch["StartAt"] == "ConsiderPool"
    assert states["ConsiderPool"]["Default"] == "LaunchSpot"


# --- the execution timeout covers the worst case ----------------------------------------------


def test_the_execution_timeout_is_derived_from_the_tuning() -> None:
    # A timed-out execution marks nothing FAILED, terminates nothing and alerts nobody: the
    # deployed timeout must cover the longest legitimate recovery, whatever the tuning.
    for tuning in (
        WorkflowTuning(),
        WorkflowTuning(launch_rounds=5, launch_backoff_seconds=600),  # 9000 s of round backoff alone
        WorkflowTuning(launch_retries=10, launch_retry_seconds=1, launch_rounds=1),
    ):
        timeout = _definition(tuning)["TimeoutSeconds"]
        assert timeout == tuning.execution_timeout_seconds
        worst_launch = tuning.launch_calls(MAX_POOLS) * CALL_SECONDS + tuning.launch_wait_seconds(MAX_POOLS)
        assert timeout >= max(worst_launch, MAX_HANDSHAKE_TIMEOUT_SECONDS) + OTHER_STATES_SECONDS
    # The deployed defaults over a job's maximum of pools need more than the old fixed hour.
    assert WorkflowTuning().execution_timeout_seconds > 3600


def test_the_pool_bound_is_the_job_spec_limit() -> None:
    pools = [
        CapacityPool(instance_type=f"m5.{i}xlarge", subnet_id="subnet-0123abcd") for i in range(MAX_POOLS + 1)
    ]
    JobSpec(name="x", command=["true"], pools=pools[:MAX_POOLS])
    with pytest.raises(ValueError, match="pools"):
        JobSpec(name="x", command=["true"], pools=pools)


def test_a_tuning_that_cannot_finish_within_a_day_is_refused_naming_its_settings() -> None:
    with pytest.raises(ValueError) as refused:
        WorkflowTuning(launch_rounds=10, launch_backoff_seconds=600)
    message = str(refused.value)
    for setting in (
        "launch_rounds=10",
        "launch_backoff_seconds=600",
        "launch_retries=",
        "launch_retry_seconds=",
    ):
        assert setting in message
    assert f"{MAX_EXECUTION_TIMEOUT_SECONDS} s" in message


def _retry_seconds(state: dict[str, Any]) -> tuple[int, float]:
    """(calls, seconds waited) of a task whose every try fails with its retried errors."""
    calls, waited = 1, 0.0
    for retrier in state.get("Retry", []):
        interval, rate = retrier.get("IntervalSeconds", 1), retrier.get("BackoffRate", 2.0)
        attempts = retrier.get("MaxAttempts", 3)
        calls += attempts
        waited += sum(interval * rate**n for n in range(attempts))  # jitter only shortens these
    return calls, waited


def test_every_state_outside_the_launch_loop_fits_its_allowance() -> None:
    states = dict(_states(_definition()))
    # The launch loop's and the handshake's waits are counted separately (WorkflowTuning);
    # they are the only waits in the definition.
    assert {n for n, s in states.items() if s["Type"] == "Wait"} == {"RetryLaunchBackoff", "Backoff"}
    assert [n for n, s in states.items() if "TimeoutSecondsPath" in s or "TimeoutSeconds" in s] == [
        "AwaitFinalCheckpoint"
    ]
    assert states["AwaitFinalCheckpoint"]["TimeoutSecondsPath"] == "$.validated.handshake_timeout_seconds"
    # Every other task, all on one path and failing every try: still within the allowance.
    total = 0.0
    for name, state in states.items():
        if state["Type"] != "Task" or name in ("LaunchSpot", "LaunchOnDemand"):
            continue
        calls, waited = _retry_seconds(state)
        total += calls * CALL_SECONDS + waited
    assert total <= OTHER_STATES_SECONDS


# --- transient DynamoDB errors are retried, a failed condition never ---------------------------

# Step Functions names DynamoDB errors by integration: `DynamoDB.<name>` for the optimized
# one, `DynamoDb.<name>Exception` for aws-sdk (the suffix is always added). moto names the
# optimized integration's errors by their code (InternalServerError, RequestLimitExceeded).
OPTIMIZED_TRANSIENT = {
    "DynamoDB.ProvisionedThroughputExceededException",
    "DynamoDB.ThrottlingException",
    "DynamoDB.RequestLimitExceeded",
    "DynamoDB.InternalServerError",
    "DynamoDB.InternalServerErrorException",
}
SDK_TRANSIENT = {
    "DynamoDb.ProvisionedThroughputExceededException",
    "DynamoDb.ThrottlingException",
    "DynamoDb.RequestLimitExceededException",
    "DynamoDb.InternalServerErrorException",
}


def test_every_job_row_call_retries_transient_errors_but_never_a_failed_condition() -> None:
    tasks = {n: s for n, s in _states(_definition()) if "dynamodb:" in s.get("Resource", "")}
    assert "AwaitFinalCheckpoint" in tasks and "RecordReplacement" in tasks and "MarkFailed" in tasks
    for name, state in tasks.items():
        retried = {e for r in state.get("Retry", []) for e in r["ErrorEquals"]}
        expected = SDK_TRANSIENT if ":aws-sdk:" in state["Resource"] else OPTIMIZED_TRANSIENT
        assert expected <= retried, name
        assert not any("ConditionalCheckFailed" in e or e.startswith("States.") for e in retried), name


# --- SNS subjects fit SNS's limit ----------------------------------------------------------------

SNS_SUBJECT_LIMIT = 100  # characters


def test_every_subject_fits_in_the_worst_case() -> None:
    # The longest job id (1-63 characters) and attempt (ValidateInput allows 10000, so 10001 next).
    assert JOB_ID_PATTERN.match("a" * 63) and not JOB_ID_PATTERN.match("a" * 64)
    worst = {"$.job_id": "a" * 63, "$.job.next_attempt": "10001"}
    subjects = [
        s["Parameters"]["Subject.$"]
        for _, s in _states(_definition())
        if "Subject.$" in s.get("Parameters", {})
    ]
    assert len(subjects) == 4  # launched, abandoned (twice), failed
    for subject in subjects:
        match = re.fullmatch(r"States\.Format\('([^']*)', (.+)\)", subject)
        assert match, subject
        template, args = match.group(1), [a.strip() for a in match.group(2).split(",")]
        assert template.count("{}") == len(args)
        text = template.replace("{}", "%s") % tuple(worst[a] for a in args)
        assert len(text) <= SNS_SUBJECT_LIMIT, (subject, len(text))


# --- an error object without a Cause cannot strand the job ------------------------------------


def test_every_read_of_an_error_cause_is_of_a_completed_error_object() -> None:
    # ASL makes an error's Cause optional; reading a missing field is a States.Runtime that no
    # Catch takes, which would end the execution with the job left INTERRUPTED. Every Cause
    # read is of an object that is either checked first or merged with the defaults.
    definition = _definition()
    states = dict(_states(definition))
    reads: dict[str, set[str]] = {}
    for name, state in states.items():
        own = {k: v for k, v in state.items() if k not in ("Branches", "ItemProcessor")}
        for path in re.findall(r"\$[\w.]*\.Cause\b", json.dumps(own)):
            reads.setdefault(path.removesuffix(".Cause"), set()).add(name)
    assert set(reads) == {"$.launch.error", "$.caught.error", "$.recovery.checkpoint.error"}

    # $.launch.error (written by the launch tasks' Catch) is checked before anything reads it.
    classify = states["ClassifyLaunchError"]
    assert classify["Choices"][0]["Next"] == "LaunchErrorWithoutCause"
    assert {r["Variable"]: r["IsPresent"] for r in classify["Choices"][0]["Not"]["And"]} == {
        "$.launch.error.Error": True,
        "$.launch.error.Cause": True,
    }
    assert reads["$.launch.error"] == {"ClassifyLaunchError", "LaunchFailed"}
    nexts = [s.get("Next") for s in states.values()] + [
        c.get("Next") for s in states.values() for c in s.get("Catch", [])
    ]
    assert "LaunchFailed" not in nexts  # reached only from ClassifyLaunchError's Default
    assert classify["Default"] == "LaunchFailed"

    # The others are built with States.JsonMerge over defaults that name both fields.
    merge = "States.JsonMerge($.job.error_defaults, {}, false)"
    for facts in ("LaunchFacts", "ResumeFacts"):
        assert set(states[facts]["Parameters"]["error_defaults"]) == {"Error", "Cause"}
    assert states["CheckpointsUnreadable"]["Parameters"]["error.$"] == merge.format("$.checkpoints_error")
    writers = {n for n, s in states.items() if s.get("ResultPath") == "$.caught"}
    assert writers == {"LaunchFailedError", "RecoveryFailedError", "RecordFailedError"}
    for writer in writers:
        assert states[writer]["Parameters"] == {"error.$": merge.format("$.error")}
    for reader in reads["$.caught.error"]:
        assert {n for n in writers if states[n]["Next"] == reader}, reader
        assert reader not in [c["Next"] for s in states.values() for c in s.get("Catch", [])]
