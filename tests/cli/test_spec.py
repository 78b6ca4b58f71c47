"""trainctl.yaml validation: each bad field gives one message naming it, exit code 2."""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import pytest
import yaml

from trainctl.spec import SpecError, load_spec, parse_spec

SUBNETS = ["subnet-0aaaaaaaaaaaaaaaa", "subnet-0bbbbbbbbbbbbbbbb"]
GOOD: dict[str, Any] = {
    "name": "ResNet 50",
    "command": "python train.py --epochs 90",
    "pools": {"instance_types": ["g5.xlarge", "m5.large"]},
    "market": "spot-then-on-demand",
    "limits": {"max_interruptions": 5, "max_hours": 12, "budget_usd": 40},
    "checkpoint": {"interval_seconds": 300, "retention": 2},
    "env": {"EPOCHS": "90"},
    "tags": {"team": "vision"},
}


def test_good_spec_maps_onto_the_core_job_spec() -> None:
    spec = parse_spec(GOOD).to_job_spec(image=None, default_subnets=SUBNETS, allowed_instance_types=None)
    assert spec.command == ["python", "train.py", "--epochs", "90"]
    # types x subnets, types first: the order the workflow tries pools in.
    assert [p.label for p in spec.pools] == [
        f"g5.xlarge@{SUBNETS[0]}",
        f"g5.xlarge@{SUBNETS[1]}",
        f"m5.large@{SUBNETS[0]}",
        f"m5.large@{SUBNETS[1]}",
    ]
    assert spec.allow_on_demand is True
    assert (spec.limits.max_interruptions, spec.limits.max_hours, spec.limits.budget_usd) == (5, 12, 40)
    assert (spec.checkpoint_interval_seconds, spec.checkpoint_retention) == (300, 2)
    assert spec.env == {"EPOCHS": "90"} and spec.tags == {"team": "vision"}


def test_script_and_explicit_pools() -> None:
    data = {
        **GOOD,
        "command": None,
        "script": "train.py",
        "pools": [{"instance_type": "g5.xlarge", "subnet": SUBNETS[1]}, {"instance_type": "m5.large"}],
    }
    data.pop("command")
    spec = parse_spec(data).to_job_spec(image="repo:tag", default_subnets=SUBNETS)
    assert spec.command == ["python", "train.py"]
    assert [p.label for p in spec.pools] == [f"g5.xlarge@{SUBNETS[1]}", f"m5.large@{SUBNETS[0]}"]
    assert spec.image == "repo:tag"


# (change to the good spec, field named in the message, words the message must contain)
BAD: list[tuple[dict[str, Any], str, list[str]]] = [
    ({"name": None}, "name", ["string"]),
    ({"name": "!!!"}, "name", ["letter or digit"]),
    ({"command": []}, "command", ["non-empty"]),
    ({"command": "python 'unterminated"}, "command", ["cannot be split"]),
    ({"script": "train.py"}, "script", ["exactly one of 'command'", "'script'"]),
    ({"image": "a:b", "dockerfile": "Dockerfile"}, "dockerfile", ["at most one of 'image'"]),
    ({"pools": {"instance_types": ["huge"]}}, "pools.instance_types", ["'huge'", "instance type"]),
    ({"pools": {"instance_types": ["g5.xlarge"], "subnets": ["subnet-1"]}}, "pools.subnets", ["subnet id"]),
    ({"pools": {"instance_types": []}}, "pools.instance_types", ["at least 1"]),
    ({"pools": [{"instance_type": "huge"}]}, "pools[0].instance_type", ["'huge'", "such as g5.xlarge"]),
    (
        {"pools": [{"instance_type": "g5.xlarge", "subnet": "subnet-1"}]},
        "pools[0].subnet",
        ["'subnet-1'", "subnet id such as subnet-0abc1234"],
    ),
    ({"pools": "g5.xlarge"}, "pools", ["instance_types", "instance_type"]),
    (
        {"pools": [{"instance_type": "g5.xlarge", "zone": "a"}]},
        "pools[0].zone",
        ["allowed fields: instance_type, subnet"],
    ),
    ({"market": "cheap"}, "market", ["allowed values: 'spot', 'spot-then-on-demand'"]),
    ({"on_rebalance": "ignore"}, "on_rebalance", ["allowed values: 'checkpoint', 'migrate'"]),
    ({"limits": {"max_interruptions": -1}}, "limits.max_interruptions", ["greater than or equal to 0"]),
    ({"limits": {"max_hours": 0}}, "limits.max_hours", ["greater than 0"]),
    ({"limits": {"budget_usd": "lots"}}, "limits.budget_usd", ["valid number"]),
    ({"limits": {"max_hourz": 3}}, "limits.max_hourz", ["did you mean 'max_hours'", "max_interruptions"]),
    ({"checkpoint": {"interval_seconds": 1}}, "checkpoint.interval_seconds", ["greater than or equal to 10"]),
    ({"checkpoint": {"retention": 0}}, "checkpoint.retention", ["greater than or equal to 1"]),
    # Strict numbers: a boolean or a quoted number is not silently converted.
    ({"checkpoint": {"retention": True}}, "checkpoint.retention", ["valid integer", "(got True)"]),
    ({"checkpoint": {"interval_seconds": "300"}}, "checkpoint.interval_seconds", ["valid integer"]),
    ({"limits": {"max_interruptions": True}}, "limits.max_interruptions", ["valid integer"]),
    ({"limits": {"max_hours": False}}, "limits.max_hours", ["valid number"]),
    ({"env": {"1BAD": "x"}}, "env", ["'1BAD'", "variable name"]),
    ({"tags": {"trainctl:job-id": "x"}}, "tags", ["reserved"]),
    ({"comand": "python x.py"}, "comand", ["did you mean 'command'", "allowed fields"]),
]


@pytest.mark.parametrize(
    ("change", "field", "words"), BAD, ids=[b[1] + ":" + str(i) for i, b in enumerate(BAD)]
)
def test_each_bad_field_is_named(change: dict[str, Any], field: str, words: list[str]) -> None:
    data = {**GOOD, **change}
    with pytest.raises(SpecError) as caught:
        parse_spec(data)
    assert caught.value.field == field
    message = str(caught.value)
    assert f"field '{field}'" in message
    for word in words:
        assert word in message, message
    assert "\n" not in message  # one line, one problem
    assert "pattern" not in message and "^" not in message  # words, not a raw regex


def test_pools_checked_against_the_stack() -> None:
    spec = parse_spec({**GOOD, "pools": {"instance_types": ["p4d.24xlarge"]}})
    with pytest.raises(
        SpecError, match=r"not allowed by the stack.*allowed: g5\.xlarge, m5\.large"
    ) as caught:
        spec.to_job_spec(
            image=None, default_subnets=SUBNETS, allowed_instance_types=["g5.xlarge", "m5.large"]
        )
    assert caught.value.field == "pools.instance_types"
    listed = parse_spec(
        {**GOOD, "pools": [{"instance_type": "g5.xlarge"}, {"instance_type": "p4d.24xlarge"}]}
    )
    with pytest.raises(SpecError) as caught:
        listed.to_job_spec(image=None, default_subnets=SUBNETS, allowed_instance_types=["g5.xlarge"])
    assert caught.value.field == "pools[1].instance_type"
    many = parse_spec({**GOOD, "pools": {"instance_types": [f"m5.{n}xlarge" for n in range(2, 13)]}})
    with pytest.raises(SpecError, match=r"22 pools \(instance types x subnets\); at most 20"):
        many.to_job_spec(image=None, default_subnets=SUBNETS)
    foreign = parse_spec(
        {**GOOD, "pools": {"instance_types": ["g5.xlarge"], "subnets": ["subnet-0ccccccccccccccc1"]}}
    )
    with pytest.raises(SpecError, match="not a subnet of the stack"):
        foreign.to_job_spec(image=None, default_subnets=SUBNETS)


def test_stack_checks_name_the_file_given(tmp_path: Path) -> None:
    # Given a spec in another file than trainctl.yaml (JSON is YAML too)
    path = tmp_path / "other.json"
    path.write_text(json.dumps({**GOOD, "pools": [{"instance_type": "p4d.24xlarge"}]}))
    spec = load_spec(path)
    # When the stack refuses one of its pools, the error names that file
    with pytest.raises(SpecError) as caught:
        spec.to_job_spec(image=None, default_subnets=SUBNETS, allowed_instance_types=["g5.xlarge"])
    message = str(caught.value)
    assert message.startswith(f"{path}: field 'pools[0].instance_type': 'p4d.24xlarge' is not allowed")
    assert caught.value.source == str(path)
    grid = {"instance_types": ["g5.xlarge"], "subnets": ["subnet-0ccc1111"]}
    path.write_text(json.dumps({**GOOD, "pools": grid}))
    with pytest.raises(SpecError, match=rf"^{re.escape(str(path))}: field 'pools.subnets'"):
        load_spec(path).to_job_spec(image=None, default_subnets=SUBNETS)


def test_file_problems(tmp_path: Path) -> None:
    with pytest.raises(SpecError, match="file not found"):
        load_spec(tmp_path / "missing.yaml")
    broken = tmp_path / "trainctl.yaml"
    broken.write_text("name: [unclosed\n")
    with pytest.raises(SpecError, match="not valid YAML at line"):
        load_spec(broken)
    broken.write_text("- just\n- a list\n")
    with pytest.raises(SpecError, match="must be a mapping"):
        load_spec(broken)
    broken.write_text(yaml.safe_dump(GOOD))
    assert load_spec(broken).name == "ResNet 50"


def test_submit_with_a_bad_spec_exits_2_before_any_aws_call(tmp_path: Path, cli: Any) -> None:
    path = tmp_path / "trainctl.yaml"
    path.write_text(yaml.safe_dump({**GOOD, "market": "cheap"}))
    # No moto here: reaching AWS at all would fail differently (and with exit 1).
    result = cli("submit", "--spec", str(path), "--stack", "Nowhere")
    assert result.exit_code == 2
    assert "field 'market'" in result.stderr and "allowed values" in result.stderr
    assert "Traceback" not in result.stderr + result.stdout
