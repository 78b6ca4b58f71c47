"""Cost guards while a job runs: the agent accrues its attempt's cost on the job row and
stops the job at its budget or deadline. Offline: moto DynamoDB + EC2 (spot price
history), a fake IMDSv2, a real training child; time moves by a clock the test shifts."""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from typing import Any

import boto3
import pytest
from moto import mock_aws
from moto.core.responses import ActionResult
from moto.ec2.responses.spot_instances import SpotInstances

from infra.workflows.render import load_resume_definition, placeholders, render
from trainctl.agent.fake_imds import FakeImds
from trainctl.agent.imds import ImdsClient
from trainctl.agent.limits import format_usd, limit_reached
from trainctl.agent.pricing import InstancePrices
from trainctl.agent.supervisor import EXIT_LIMIT_REACHED, Agent
from trainctl_core import checkpoints as ck
from trainctl_core import jobs

from .conftest import REGION
from .test_agent import INSTANCE, JOB, World, _id, _run, _train, _until

ZONE = "us-east-1b"

# (instance type, zone) -> [(moment, USD/hour)]: what the patched EC2 knows.
HISTORY: dict[tuple[str, str], list[tuple[datetime, float]]] = {}
CALLS: list[dict[str, Any]] = []


def _z(moment: datetime) -> str:
    return jobs.format_time(moment)


def _parse(value: str | datetime | None) -> datetime | None:
    if value is None:
        return None
    moment = value if isinstance(value, datetime) else datetime.fromisoformat(value.replace("Z", "+00:00"))
    return moment if moment.tzinfo else moment.replace(tzinfo=UTC)  # moto parses to naive UTC


def _describe_spot_price_history(self: Any) -> Any:
    """As EC2 answers (moto's answers one constant price from 2006): the entries in the
    window, plus the one in force at its start."""
    types = self._get_param("InstanceTypes", [])
    zone = self._get_param("AvailabilityZone")
    start, end = _parse(self._get_param("StartTime")), _parse(self._get_param("EndTime"))
    CALLS.append({"types": types, "zone": zone, "start": start, "end": end})
    history = []
    for (instance_type, az), points in HISTORY.items():
        if (types and instance_type not in types) or (zone and az != zone):
            continue
        ordered = sorted(points)
        in_force = [p for p in ordered if start is None or p[0] <= start][-1:]
        inside = [p for p in ordered if (start is None or p[0] > start) and (end is None or p[0] <= end)]
        for at, price in in_force + inside:
            history.append(
                {
                    "InstanceType": instance_type,
                    "ProductDescription": "Linux/UNIX",
                    "SpotPrice": str(price),
                    "AvailabilityZone": az,
                    "Timestamp": _z(at),
                }
            )
    return ActionResult({"SpotPriceHistory": history})


class Clock:
    """Wall-clock and monotonic time, shifted by `offset` (never behind real time, so the
    deadlines the agent hands the training process stay in its future)."""

    def __init__(self) -> None:
        self.offset = timedelta(0)

    def __call__(self) -> datetime:
        return jobs.utcnow() + self.offset

    def monotonic(self) -> float:
        return time.monotonic() + self.offset.total_seconds()


@pytest.fixture
def guarded(tmp_path: Any, monkeypatch: pytest.MonkeyPatch) -> Iterator[tuple[World, Any]]:
    monkeypatch.setattr(SpotInstances, "describe_spot_price_history", _describe_spot_price_history)
    HISTORY.clear()
    CALLS.clear()
    with mock_aws(config={"stepfunctions": {"execute_state_machine": True}}):
        world = World(tmp_path)
        try:
            yield world, boto3.client("ec2", region_name=REGION)
        finally:
            world.close()
    HISTORY.clear()
    CALLS.clear()


def _submit(world: World, limits: jobs.JobLimits, instance_type: str) -> jobs.Job:
    spec = jobs.JobSpec(
        name=JOB,
        command=["python", "train.py"],
        pools=[jobs.CapacityPool(instance_type=instance_type, subnet_id="subnet-0aaa1111")],
        limits=limits,
    )
    return world.launch(world.store.create(jobs.new_job(JOB, spec)), INSTANCE)


def _guarded_agent(world: World, ec2: Any, fake: FakeImds, clock: Clock, tmp_path: Any, marker: Any) -> Agent:
    agent = world.agent(_train(tmp_path), shutdown_command=["touch", str(marker)])
    agent.now = clock
    agent.prices = InstancePrices(ec2, ImdsClient(fake.url), region=REGION, clock=clock.monotonic)
    return agent


def _accrual(world: World) -> tuple[float, datetime, datetime]:
    """(cost on the row, this attempt's launch, its accrual mark)."""
    row = world.store.raw(JOB)
    launched = world.store.get(JOB).attempts[-1].launched_at
    mark = _parse(row["cost_accrued_at"])
    assert mark is not None and row["cost_accrued_attempt"] == 0
    return float(row["cost_usd"]), launched, mark


def _durable_final(world: World, tmp_path: Any) -> jobs.CheckpointRef:
    final = world.store.get(JOB).final_checkpoint
    assert final is not None
    storage = ck.LocalCheckpointStorage(world.ckpt_dir, JOB)
    verified = ck.verify_checkpoint(storage, _id(final), job_id=JOB, dest_dir=str(tmp_path / "verify"))
    assert not isinstance(verified, str), verified
    return final


def test_a_spot_job_at_its_budget_checkpoints_and_ends_failed(
    guarded: tuple[World, Any], tmp_path: Any
) -> None:
    world, ec2 = guarded
    # Given a spot job with a 1 USD budget, whose price goes from 0.5 to 2 USD/h about an hour
    # after its launch
    job = _submit(world, jobs.JobLimits(budget_usd=1.0), "m5.large")
    launched = job.attempts[-1].launched_at
    rise = (launched + timedelta(hours=1)).replace(microsecond=0)  # EC2 reports whole seconds
    HISTORY[("m5.large", ZONE)] = [(launched - timedelta(days=1), 0.5), (rise, 2.0)]
    clock, marker = Clock(), tmp_path / "shutdown-called"
    with FakeImds(INSTANCE, instance_type="m5.large", zone=ZONE, life_cycle="spot") as fake:
        agent = _guarded_agent(world, ec2, fake, clock, tmp_path, marker)
        thread, result = _run(agent)
        _until(lambda: agent.last_checkpoint is not None, what="a periodic checkpoint")
        _until(lambda: "cost_accrued_at" in world.store.raw(JOB), what="the first accrual")
        # While it runs within budget, its cost so far is on the row and it keeps going
        cost, _, _ = _accrual(world)
        assert 0 < cost < 0.01 and world.store.get(JOB).status == jobs.JobStatus.RUNNING
        # When two hours pass
        clock.offset = timedelta(hours=2)
        thread.join(90)
    # Then the job stopped after a durable checkpoint and ended FAILED with the reason
    assert result == {"rc": EXIT_LIMIT_REACHED}
    ended = world.store.get(JOB)
    assert ended.status == jobs.JobStatus.FAILED
    reason = ended.failure_reason or ""
    assert reason.startswith("budget reached: cost ") and reason.endswith(" USD of 1 USD"), reason
    _durable_final(world, tmp_path)
    assert marker.exists()  # and the instance shuts down, like any terminal outcome
    # And the cost on the row is the price history integrated over the attempt: 0.5 USD/h
    # for the first hour, 2 USD/h since (the cached price was refreshed after the hour)
    cost, start, mark = _accrual(world)
    assert start == launched and mark > rise
    expected = (0.5 * (rise - launched).total_seconds() + 2.0 * (mark - rise).total_seconds()) / 3600.0
    assert cost == pytest.approx(expected, rel=1e-9)
    assert 1.0 <= float(reason.split()[3]) <= cost


def test_an_on_demand_job_past_its_max_hours_checkpoints_and_ends_failed(
    guarded: tuple[World, Any], tmp_path: Any
) -> None:
    world, ec2 = guarded
    # Given an on-demand m5.large job (0.096 USD/h list price) allowed one hour
    job = _submit(world, jobs.JobLimits(max_hours=1.0), "m5.large")
    assert job.deadline_at is not None
    clock, marker = Clock(), tmp_path / "shutdown-called"
    with FakeImds(INSTANCE, instance_type="m5.large", zone=ZONE, life_cycle="on-demand") as fake:
        agent = _guarded_agent(world, ec2, fake, clock, tmp_path, marker)
        thread, result = _run(agent)
        _until(lambda: agent.last_checkpoint is not None, what="a periodic checkpoint")
        assert world.store.get(JOB).status == jobs.JobStatus.RUNNING
        # When its deadline passes without any interruption
        clock.offset = timedelta(hours=1, minutes=30)
        thread.join(90)
    # Then it stopped after a durable checkpoint and ended FAILED with the workflow's wording
    assert result == {"rc": EXIT_LIMIT_REACHED}
    ended = world.store.get(JOB)
    assert ended.status == jobs.JobStatus.FAILED
    assert (
        ended.failure_reason == f"max wall-clock reached: deadline {jobs.format_time(job.deadline_at)} passed"
    )
    _durable_final(world, tmp_path)
    assert marker.exists()
    # And its cost is the on-demand rate over the attempt; no spot prices were asked for
    cost, start, mark = _accrual(world)
    assert cost == pytest.approx(0.096 * (mark - start).total_seconds() / 3600.0, rel=1e-9)
    assert CALLS == []


def test_spot_prices_are_cached_and_refreshed_hourly(guarded: tuple[World, Any]) -> None:
    _, ec2 = guarded
    start = datetime.fromisoformat("2025-03-01T10:00:00+00:00")
    HISTORY[("g5.xlarge", ZONE)] = [(start - timedelta(hours=3), 0.40), (start + timedelta(minutes=30), 0.60)]
    clock = Clock()
    with FakeImds(INSTANCE, instance_type="g5.xlarge", zone=ZONE, life_cycle="spot") as fake:
        prices = InstancePrices(ec2, ImdsClient(fake.url), region=REGION, clock=clock.monotonic)
        # The price in force at the start, then the new one from its moment on
        assert prices.cost(start, start + timedelta(hours=1)) == pytest.approx(0.40 * 0.5 + 0.60 * 0.5)
        assert CALLS[0]["types"] == ["g5.xlarge"] and CALLS[0]["zone"] == ZONE
        # Within the hour: from the cache
        assert prices.cost(start + timedelta(hours=1), start + timedelta(hours=2)) == pytest.approx(0.60)
        assert len(CALLS) == 1
        # An hour on: asked again
        clock.offset = timedelta(hours=1)
        assert prices.cost(start + timedelta(hours=2), start + timedelta(hours=3)) == pytest.approx(0.60)
        assert len(CALLS) == 2


def test_a_price_ec2_cannot_give_yet_is_asked_again_later_not_every_heartbeat(
    guarded: tuple[World, Any],
) -> None:
    _, ec2 = guarded
    start = datetime.fromisoformat("2025-03-01T10:00:00+00:00")
    clock = Clock()
    with FakeImds(INSTANCE, instance_type="g5.xlarge", zone=ZONE, life_cycle="spot") as fake:
        prices = InstancePrices(ec2, ImdsClient(fake.url), region=REGION, clock=clock.monotonic)
        # No history yet: unknown, and not asked again on the next heartbeat
        assert prices.cost(start, start + timedelta(minutes=1)) is None
        assert prices.cost(start, start + timedelta(minutes=2)) is None
        assert len(CALLS) == 1
        # Five minutes on, EC2 has it: the whole window is priced
        HISTORY[("g5.xlarge", ZONE)] = [(start - timedelta(hours=1), 0.30)]
        clock.offset = timedelta(minutes=5)
        assert prices.cost(start, start + timedelta(hours=1)) == pytest.approx(0.30)
        assert len(CALLS) == 2


@pytest.mark.parametrize(
    ("instance_type", "life_cycle", "region", "why"),
    [
        ("g5.xlarge", "spot", REGION, "no spot price history for g5.xlarge"),
        ("x9z.large", "on-demand", REGION, "no bundled on-demand price for x9z.large"),
        ("m5.large", "on-demand", "eu-west-1", "us-east-1 list prices"),
        ("m5.large", "scheduled", REGION, "'scheduled' has no price"),
    ],
)
def test_an_unknown_price_is_logged_once_and_never_guessed(
    guarded: tuple[World, Any], caplog: Any, instance_type: str, life_cycle: str, region: str, why: str
) -> None:
    _, ec2 = guarded
    start = jobs.utcnow()
    with FakeImds(INSTANCE, instance_type=instance_type, zone=ZONE, life_cycle=life_cycle) as fake:
        prices = InstancePrices(ec2, ImdsClient(fake.url), region=region)
        with caplog.at_level(logging.WARNING, logger="trainctl.agent.pricing"):
            assert prices.cost(start, start + timedelta(minutes=1)) is None
            assert prices.cost(start + timedelta(minutes=1), start + timedelta(minutes=2)) is None
    warnings = [r.getMessage() for r in caplog.records if r.name == "trainctl.agent.pricing"]
    assert len(warnings) == 1 and why in warnings[0], warnings


def test_without_imds_placement_nothing_is_priced(guarded: tuple[World, Any]) -> None:
    _, ec2 = guarded
    with FakeImds(INSTANCE) as fake:  # no instance type, zone or life cycle
        prices = InstancePrices(ec2, ImdsClient(fake.url), region=REGION)
        now = jobs.utcnow()
        assert prices.cost(now, now + timedelta(minutes=5)) is None
    assert CALLS == []


# --- the guards themselves (pure) ------------------------------------------------------------------


def _job(**limits: Any) -> jobs.Job:
    spec = jobs.JobSpec(
        name=JOB,
        command=["true"],
        pools=[jobs.CapacityPool(instance_type="m5.large", subnet_id="subnet-0aaa1111")],
        limits=jobs.JobLimits(**limits),
    )
    return jobs.new_job(JOB, spec, now=datetime.fromisoformat("2025-03-01T10:00:00+00:00"))


def test_limits_fire_at_the_deadline_and_at_the_budget_not_before() -> None:
    job = _job(max_hours=2.0, budget_usd=10.0)
    assert job.deadline_at is not None
    before = job.deadline_at - timedelta(seconds=1)
    assert limit_reached(job, cost_usd=9.99, now=before) is None
    assert limit_reached(job, cost_usd=10.0, now=before) == "budget reached: cost 10 USD of 10 USD"
    assert limit_reached(job, cost_usd=0.0, now=job.deadline_at) == (
        "max wall-clock reached: deadline 2025-03-01T12:00:00.000Z passed"
    )
    assert limit_reached(_job(), cost_usd=1e9, now=before) is None  # no budget: none to reach


def test_the_reasons_are_worded_as_the_resume_workflow_words_them() -> None:
    definition = load_resume_definition()
    states = json.loads(render(definition, {name: "1" for name in placeholders(definition)}))["States"]

    def template(state: str) -> str:
        expression = states[state]["Parameters"]["failure_reason.$"]
        return str(expression.split("'")[1])

    job = _job(max_hours=1.0, budget_usd=2.5)
    assert job.deadline_at is not None
    budget = limit_reached(job, cost_usd=3.125, now=job.created_at)
    assert budget == template("BudgetReached").format(format_usd(3.125), format_usd(2.5))
    late = limit_reached(job, cost_usd=0.0, now=job.deadline_at)
    assert late == template("MaxHoursReached").format(jobs.format_time(job.deadline_at))
