"""The rehearsal's emulation and set-up, piece by piece (no training, no full rehearsal)."""

from __future__ import annotations

import json
from collections.abc import Iterator, Mapping
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest

from trainctl.rehearse.cloud import FAKE_AMI, MotoCloud
from trainctl.rehearse.instances import Fleet, FleetConfig, Instance, SsmAgent
from trainctl.rehearse.scenario import Options, base_environment, resolve_script
from trainctl.rehearse.stack import StackError, StackSpec
from trainctl_core.commands import CheckpointCommands
from trainctl_core.settings import SSM_PARAM_DEADLINE, SSM_PARAM_JOB_ID, TAG_JOB_ID, TAG_MANAGED

DOCUMENT = "trainctl-checkpoint"


class RecordingInstance:
    """An "instance" that records the commands SSM runs on it."""

    def __init__(self) -> None:
        self.commands: list[list[str]] = []

    def poll(self) -> int | None:
        return None

    def kill(self) -> None:
        pass

    def run_command(self, argv: list[str], timeout: float) -> int:
        self.commands.append(argv)
        return 0


@pytest.fixture
def cloud() -> Iterator[MotoCloud]:
    with MotoCloud() as started:
        yield started


def _document(ssm: Any) -> None:
    # The checkpoint document's shape (parameters and one shell line); a parameter with a
    # default that the sender leaves out, written with SSM's optional spaces.
    content = {
        "schemaVersion": "2.2",
        "description": "checkpoint now",
        "parameters": {
            SSM_PARAM_JOB_ID: {"type": "String"},
            SSM_PARAM_DEADLINE: {"type": "String"},
            "Mode": {"type": "String", "default": "stop"},
        },
        "mainSteps": [
            {
                "action": "aws:runShellScript",
                "name": "checkpoint",
                "inputs": {
                    "runCommand": [
                        f"trainctl checkpoint-now --job-id {{{{{SSM_PARAM_JOB_ID}}}}} "
                        f"--deadline {{{{ {SSM_PARAM_DEADLINE} }}}} --mode {{{{Mode}}}}"
                    ]
                },
            }
        ],
    }
    ssm.create_document(Name=DOCUMENT, Content=json.dumps(content), DocumentType="Command")


def test_a_checkpoint_command_reaches_only_the_instance_it_was_sent_to(
    cloud: MotoCloud, tmp_path: Path
) -> None:
    # Given three running job instances, each booted as a recording "instance"
    ec2, ssm = cloud.client("ec2"), cloud.client("ssm")
    _document(ssm)
    ids = []
    for job in ("job-a", "job-b", "job-c"):
        tags = [{"Key": TAG_MANAGED, "Value": "true"}, {"Key": TAG_JOB_ID, "Value": job}]
        launched = ec2.run_instances(
            ImageId=FAKE_AMI,
            MinCount=1,
            MaxCount=1,
            InstanceType="m5.large",
            TagSpecifications=[{"ResourceType": "instance", "Tags": tags}],
        )
        ids.append(launched["Instances"][0]["InstanceId"])
    booted: dict[str, RecordingInstance] = {}

    def spawn(instance: Instance, environment: Mapping[str, str]) -> RecordingInstance:
        booted[instance.instance_id] = RecordingInstance()
        return booted[instance.instance_id]

    config = FleetConfig(
        boot_seconds=0,
        work_root=tmp_path / "instances",
        socket_root=tmp_path,
        jobs_table="jobs",
        bucket="bucket",
        region="us-east-1",
        training_command=["true"],
        environment={},
    )
    fleet = Fleet(ec2, cloud.client("events"), config, spawn=spawn)
    agent = SsmAgent(ssm, fleet)
    try:
        fleet.tick(datetime.now(UTC).timestamp())
        assert sorted(booted) == sorted(ids)

        # When the interruption handler's adapter asks the second one to checkpoint
        deadline = datetime.now(UTC) + timedelta(minutes=2)
        CheckpointCommands(ssm, DOCUMENT).request_checkpoint(
            instance_id=ids[1], job_id="job-b", deadline=deadline
        )
        agent.tick()
        agent.join()
    finally:
        fleet.shutdown()

    # Then only that instance ran the command, with the sender's values and the default
    assert [d["instance_id"] for d in agent.deliveries] == [ids[1]]
    assert booted[ids[0]].commands == booted[ids[2]].commands == []
    (argv,) = booted[ids[1]].commands
    assert argv[-6:] == ["--job-id", "job-b", "--deadline", argv[-3], "--mode", "stop"]
    assert argv[-3].startswith(deadline.strftime("%Y-%m-%dT%H:%M"))


def test_seed_option_wins_over_an_exported_train_seed(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("TRAIN_SEED", "99")
    script = resolve_script(None)

    assert base_environment(Options(script=script, seed=3))["TRAIN_SEED"] == "3"
    # Settings given to the rehearsal itself still win (they are explicit too).
    explicit = Options(script=script, seed=3, environment={"TRAIN_SEED": "5"})
    assert base_environment(explicit)["TRAIN_SEED"] == "5"


def test_pools_come_from_the_instance_types_the_template_allows() -> None:
    spec = StackSpec({"Resources": {}, "Outputs": {"AllowedInstanceTypes": {"Value": "m5.large, c5.large"}}})
    assert spec.allowed_instance_types == ["m5.large", "c5.large"]
    with pytest.raises(StackError, match="no AllowedInstanceTypes output"):
        _ = StackSpec({"Resources": {}, "Outputs": {}}).allowed_instance_types
