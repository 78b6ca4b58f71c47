"""The agent-metrics contract (trainctl_core.metrics) against the deployed metric filters.

CloudWatch Logs evaluates a metric filter's JSON pattern on each log event; neither moto
nor any offline tool does (moto treats `{ … }` patterns as "match everything"), so the
small subset trainctl uses is evaluated here: `{ $.a.b = "text" }` / `= number` / `!=`,
joined with `&&`. A pattern outside that subset fails the test instead of passing
silently, so a filter change cannot outgrow what is checked.
"""

from __future__ import annotations

import json
import math
import re
from typing import Any

import pytest

from trainctl_core import metrics as contract
from trainctl_core.metrics import AGENT_METRICS, MetricLineError, Unit, metric_line

POOL = "g5.xlarge@us-east-1a"
_MISSING = object()
_TERM = re.compile(r'\s*(\$(?:\.[A-Za-z_][A-Za-z0-9_]*)+)\s*(=|!=)\s*("(?:[^"\\]|\\.)*"|-?\d+(?:\.\d+)?)\s*')


class UnsupportedPattern(AssertionError):
    """A filter pattern outside the subset this evaluator implements."""


def _select(event: Any, selector: str) -> Any:
    value = event
    for key in selector.removeprefix("$.").split("."):
        if not isinstance(value, dict) or key not in value:
            return _MISSING
        value = value[key]
    return value


def _term_matches(value: Any, raw: str) -> bool:
    if raw.startswith('"'):
        # String comparison; `*` is CloudWatch's only wildcard.
        expected = re.escape(json.loads(raw)).replace(r"\*", ".*")
        return isinstance(value, str) and re.fullmatch(expected, value) is not None
    number = isinstance(value, int | float) and not isinstance(value, bool)
    return number and math.isclose(value, float(raw))


def pattern_matches(pattern: str, message: str) -> bool:
    """Whether CloudWatch Logs would select `message` with the JSON filter `pattern`."""
    body = pattern.strip()
    if not (body.startswith("{") and body.endswith("}")):
        raise UnsupportedPattern(pattern)
    try:
        event = json.loads(message)
    except ValueError:
        return False  # JSON patterns select JSON events only
    if not isinstance(event, dict):
        return False
    for term in body[1:-1].split("&&"):
        found = _TERM.fullmatch(term)
        if found is None:
            raise UnsupportedPattern(term)
        selector, operator, raw = found.groups()
        value = _select(event, selector)
        if value is _MISSING:
            return False  # a missing field matches neither = nor !=
        if _term_matches(value, raw) != (operator == "="):
            return False
    return True


def publish(
    transform: dict[str, Any], pattern: str, message: str
) -> tuple[str, str, float, dict[str, str]] | None:
    """What a metric filter publishes for one event: (namespace, name, value, dimensions)."""
    if not pattern_matches(pattern, message):
        return None
    event = json.loads(message)
    value = _select(event, transform["MetricValue"])
    assert isinstance(value, int | float), f"{transform['MetricValue']} is not a number in {message}"
    dimensions = {d["Key"]: _select(event, d["Value"]) for d in transform.get("Dimensions", [])}
    # CloudWatch Logs drops an event whose dimension field is missing or not a string.
    if any(not isinstance(v, str) or not v for v in dimensions.values()):
        return None
    return transform["MetricNamespace"], transform["MetricName"], float(value), dimensions


def _filters(synth: Any) -> list[dict[str, Any]]:
    return [r["Properties"] for r in synth.resources("AWS::Logs::MetricFilter").values()]


def _published(synth: Any, message: str) -> list[tuple[str, str, float, dict[str, str]]]:
    out = []
    for props in _filters(synth):
        (transform,) = props["MetricTransformations"]
        result = publish(transform, props["FilterPattern"], message)
        if result is not None:
            out.append(result)
    return out


def _sample(name: str) -> str:
    metric = AGENT_METRICS[name]
    return metric_line(name, 7, metric.unit, job_id="job-1", pool=POOL)


# --- the evaluator itself (so a broken evaluator cannot make the tests below pass) -------


@pytest.mark.parametrize(
    ("pattern", "message", "expected"),
    [
        ('{ $.m = "A" }', '{"m": "A"}', True),
        ('{ $.m = "A" }', '{"m": "AB"}', False),
        ('{ $.m = "A*" }', '{"m": "AB"}', True),
        ('{ $.m != "A" }', '{"m": "B"}', True),
        ('{ $.m != "A" }', '{"x": "B"}', False),
        ('{ $.m = "A" && $.n = 2 }', '{"m": "A", "n": 2}', True),
        ('{ $.m = "A" && $.n = 2 }', '{"m": "A", "n": 3}', False),
        ('{ $.a.b = "x" }', '{"a": {"b": "x"}}', True),
        ('{ $.m = "A" }', 'prefix {"m": "A"}', False),
        ('{ $.m = "A" }', '["A"]', False),
    ],
)
def test_pattern_evaluator(pattern: str, message: str, expected: bool) -> None:
    assert pattern_matches(pattern, message) is expected


def test_pattern_evaluator_refuses_what_it_does_not_implement() -> None:
    with pytest.raises(UnsupportedPattern):
        pattern_matches('{ $.m = "A" || $.m = "B" }', '{"m": "A"}')
    with pytest.raises(UnsupportedPattern):
        pattern_matches("ERROR", "ERROR")


# --- the deployed filters --------------------------------------------------------------


def test_metric_filters_are_the_contract_on_the_agent_log_group(any_synth: Any) -> None:
    agent_logs = any_synth.logical_id("AgentLogs", "AWS::Logs::LogGroup")
    deployed = {}
    for props in _filters(any_synth):
        assert props["LogGroupName"] == {"Ref": agent_logs}
        (transform,) = props["MetricTransformations"]
        deployed[transform["MetricName"]] = (props["FilterPattern"], transform)
    assert set(deployed) == set(AGENT_METRICS)
    for name, metric in AGENT_METRICS.items():
        pattern, transform = deployed[name]
        assert pattern == f'{{ $.trainctl_metric = "{name}" }}'
        assert transform["MetricNamespace"] == contract.METRICS_NAMESPACE
        assert transform["MetricValue"] == "$.value"
        assert transform["Unit"] == metric.unit.value
        assert "DefaultValue" not in transform  # no zeros invented while nothing happens
        expected_dimensions = [{"Key": "Pool", "Value": "$.pool"}] if name == contract.REPLACEMENTS else []
        assert transform.get("Dimensions", []) == expected_dimensions


@pytest.mark.parametrize("name", sorted(AGENT_METRICS))
def test_each_metric_line_feeds_exactly_its_filter(default_synth: Any, name: str) -> None:
    # Given the line the agent writes for one observation
    line = metric_line(name, 7.5, AGENT_METRICS[name].unit, job_id="job-1", pool=POOL)
    # Then exactly one filter publishes it: its own metric, its value, its dimensions
    dimensions = {"Pool": POOL} if name == contract.REPLACEMENTS else {}
    assert _published(default_synth, line) == [(contract.METRICS_NAMESPACE, name, 7.5, dimensions)]


def test_a_line_through_a_log_formatter_feeds_no_filter(default_synth: Any) -> None:
    # The agent's logging handler prefixes records ("trainctl.agent INFO …"): a metric
    # line must be written to the shipper as is, or CloudWatch never parses it as JSON.
    line = _sample(contract.JOBS_FAILED)
    assert _published(default_synth, line)
    assert _published(default_synth, f"trainctl.agent INFO {line}") == []


def test_other_json_log_lines_feed_no_filter(default_synth: Any) -> None:
    for message in (
        '{"level": "INFO", "message": "checkpoint saved", "value": 3}',
        '{"trainctl_metric": "SavingsUSD", "value": 1.5, "unit": "None", "job_id": "job-1"}',
        '{"trainctl_metric": "timetocheckpoint", "value": 1, "unit": "Seconds", "job_id": "job-1"}',
    ):
        assert _published(default_synth, message) == [], message


# --- metric_line -----------------------------------------------------------------------


def test_metric_line_is_one_json_object_on_one_line() -> None:
    line = metric_line(contract.REPLACEMENTS, 1, Unit.COUNT, job_id="job-1", pool=POOL)
    assert "\n" not in line
    assert json.loads(line) == {
        "trainctl_metric": "Replacements",
        "value": 1,
        "unit": "Count",
        "job_id": "job-1",
        "pool": POOL,
    }
    # Units may be given as CloudWatch spells them; the pool is optional where not a dimension.
    assert json.loads(metric_line("TimeToResume", 41.25, "Seconds", job_id="j")) == {
        "trainctl_metric": "TimeToResume",
        "value": 41.25,
        "unit": "Seconds",
        "job_id": "j",
    }


@pytest.mark.parametrize(
    ("args", "kwargs", "message"),
    [
        (("SavingsUSD", 1, "None"), {"job_id": "j"}, "unknown metric 'SavingsUSD'"),
        (("TimeToCheckpoint", 1, "Count"), {"job_id": "j"}, "TimeToCheckpoint is measured in Seconds"),
        (("LostSteps", -1, "Count"), {"job_id": "j"}, "finite and >= 0"),
        (("TimeToResume", math.nan, "Seconds"), {"job_id": "j"}, "finite and >= 0"),
        (("TimeToResume", math.inf, "Seconds"), {"job_id": "j"}, "finite and >= 0"),
        (("JobsFailed", True, "Count"), {"job_id": "j"}, "must be a number"),
        (("JobsFailed", "1", "Count"), {"job_id": "j"}, "must be a number"),
        (("JobsFailed", 1, "Count"), {"job_id": ""}, "job_id is required"),
        (("Replacements", 1, "Count"), {"job_id": "j"}, "pool is required"),
        (
            ("Replacements", 1, "Count"),
            {"job_id": "j", "pool": "g5.xlarge@subnet-0abc1234"},
            "<instance_type>@<az>",
        ),
        (("Replacements", 1, "Count"), {"job_id": "j", "pool": "g5.xlarge"}, "<instance_type>@<az>"),
    ],
)
def test_metric_line_refuses_what_would_not_become_its_metric(
    args: tuple[Any, ...], kwargs: dict[str, Any], message: str
) -> None:
    with pytest.raises(MetricLineError, match=re.escape(message)):
        metric_line(*args, **kwargs)


@pytest.mark.parametrize(
    "pool", ["g5.xlarge@us-east-1a", "p4d.24xlarge@us-west-2-lax-1a", "g6.2xlarge@eu-west-1c"]
)
def test_pool_accepts_availability_zones(pool: str) -> None:
    assert json.loads(metric_line("Replacements", 1, "Count", job_id="j", pool=pool))["pool"] == pool


def test_agent_and_handler_metrics_share_one_namespace(any_synth: Any) -> None:
    from trainctl_core.observability import METRICS_NAMESPACE as HANDLER_NAMESPACE

    assert contract.METRICS_NAMESPACE == HANDLER_NAMESPACE
    for function in any_synth.resources("AWS::Lambda::Function").values():
        env = function["Properties"].get("Environment", {}).get("Variables", {})
        if "POWERTOOLS_METRICS_NAMESPACE" in env:
            assert env["POWERTOOLS_METRICS_NAMESPACE"] == contract.METRICS_NAMESPACE


def test_the_contract_imports_nothing_but_the_standard_library() -> None:
    # The agent, the handlers' layer and infra all import it: no AWS SDK, no Powertools.
    import subprocess
    import sys

    code = (
        "import sys, json; before = set(sys.modules); import trainctl_core.metrics; "
        "print(json.dumps(sorted({m.split('.')[0] for m in set(sys.modules) - before})))"
    )
    loaded = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True, timeout=60
    )
    third_party = set(json.loads(loaded.stdout)) - set(sys.stdlib_module_names) - {"trainctl_core"}
    assert third_party == set()
